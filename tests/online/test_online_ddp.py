"""Two-process online training through accelerate equals one process with the same global batch.

`scripts/online_ddp_worker.py` trains a tiny model for 2 SGD steps on 8 prompts x 4 completions per step. It
runs under ``accelerate launch`` (2 processes, gloo) with 2 prompts per process, and in this process with 4
prompts. The sampler gives both runs the same prompts per step; every completion is seeded by the run's
seed, the step and its prompt's dataset index (not by the process or the batch), so both runs sample the
same completions; advantages see the rewards of every process (REINFORCE++ normalises over the global
batch); the grpo loss is a mean over completions and online DPO's a mean over pairs (one per prompt: the
vowel-share reward does not tie), and DDP averages the two processes' equal-sized means. PPO's critic is
not wrapped: its gradients are averaged by the trainer, its value loss is normalised by every process's
tokens, and the reward statistics and advantage whitening see every process's values. So
the sampled completions are equal, and the logged losses and rewards and the parameter updates agree within
float rounding.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).resolve().parent / "scripts" / "online_ddp_worker.py"
CASES = ("grpo", "rpp-shared", "online-dpo", "ppo")
TOL = 1e-5


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _worker():
    return _load("online_ddp_worker", WORKER)


accelerate_launch = _load("ddp_test", ROOT / "tests" / "train" / "test_ddp.py").accelerate_launch


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    out = tmp_path_factory.mktemp("online_ddp")
    accelerate_launch([str(WORKER), "--batch", "2", "--out-dir", str(out), *CASES], cwd=ROOT)
    return {case: torch.load(out / f"{case}.pt") for case in CASES}


@pytest.mark.parametrize("case", CASES)
def test_two_processes_match_one(case, two_processes, tmp_path):
    _worker().run(case, batch=4, steps=2, out=str(tmp_path / "one.pt"))
    one, two = torch.load(tmp_path / "one.pt"), two_processes[case]
    assert one["num_processes"] == 1 and two["num_processes"] == 2
    assert len(one["completions"]) == 2 * 4 * 4
    assert two["completions"] == one["completions"]
    torch.testing.assert_close(two["losses"], one["losses"], atol=TOL, rtol=0)
    torch.testing.assert_close(two["reward"], one["reward"], atol=TOL, rtol=0)
    largest = 0.0
    for name in one["before"]:
        update_one = one["after"][name] - one["before"][name]
        update_two = two["after"][name] - two["before"][name]
        torch.testing.assert_close(update_two, update_one, atol=TOL, rtol=0, msg=lambda m: f"{name}: {m}")
        largest = max(largest, update_one.abs().max().item())
    assert largest > 1e-3
