"""group_robust under two-process data parallelism equals one process with the same global batch.

`scripts/group_robust_worker.py` trains group-robust DPO for 3 SGD steps on 16 pairs of two groups, with
per-device batch 4 on 2 processes (``accelerate launch``, gloo on CPU) and with batch 8 in this process.
The trainer adds up every process's group sums and counts before alpha's update, so both processes hold
the same alpha, equal to the one-process run's; each process's loss is scaled so that DDP's average of
the gradients is the gradient of sum_g alpha_g L_g over the global batch. So alpha, the logged losses
and the parameter updates agree up to float32 summation order.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).resolve().parent / "scripts" / "group_robust_worker.py"
DDP_CPU = ROOT / "examples" / "accelerate" / "ddp_cpu.yaml"
TOL = 1e-5


def accelerate_launch(args: list[str]) -> None:
    """``accelerate launch`` with 2 CPU processes (as in tests/train/test_ddp.py), failing with its output."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(DDP_CPU)]
    cmd += ["--main_process_port", "0", *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"accelerate launch failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr[-6000:]}"


def _worker_module():
    spec = importlib.util.spec_from_file_location("group_robust_worker", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_two_processes_share_one_alpha_and_match_one_process(tmp_path):
    two_dir, one_dir = tmp_path / "two", tmp_path / "one"
    two_dir.mkdir()
    one_dir.mkdir()
    accelerate_launch([str(WORKER), "--batch", "4", "--out-dir", str(two_dir)])
    _worker_module().run(batch=8, steps=3, out_dir=str(one_dir))
    one, two = torch.load(one_dir / "result.pt"), torch.load(two_dir / "result.pt")
    assert one["num_processes"] == 1 and two["num_processes"] == 2

    alpha_rank0, alpha_rank1 = torch.load(two_dir / "alpha-0.pt"), torch.load(two_dir / "alpha-1.pt")
    assert torch.equal(alpha_rank0, alpha_rank1)  # one alpha on every process, bit for bit
    alpha_one = torch.load(one_dir / "alpha-0.pt")
    torch.testing.assert_close(alpha_rank0, alpha_one, atol=1e-6, rtol=0)
    assert (alpha_one[-1] - 0.5).abs().max() > 1e-3  # alpha has moved

    torch.testing.assert_close(two["losses"], one["losses"], atol=TOL, rtol=0)
    for key in one["metrics"]:
        torch.testing.assert_close(two["metrics"][key], one["metrics"][key], atol=1e-4, rtol=0, equal_nan=True)
    largest = 0.0
    for name in one["before"]:
        update_one = one["after"][name] - one["before"][name]
        update_two = two["after"][name] - two["before"][name]
        torch.testing.assert_close(update_two, update_one, atol=TOL, rtol=0, msg=lambda m: f"{name}: {m}")
        largest = max(largest, update_one.abs().max().item())
    assert largest > 1e-2
