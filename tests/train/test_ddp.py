"""Two-process data-parallel training through accelerate equals one process with the same global batch.

`scripts/ddp_worker.py` trains a tiny model for 2 SGD steps on 16 fixed pairs. It runs

- under ``accelerate launch --config_file examples/accelerate/ddp_cpu.yaml`` (2 processes, gloo) with
  per-device batch 2 and 2 accumulation steps: global batch 2 x 2 x 2 = 8 pairs;
- in this process (one process) with per-device batch 8 and no accumulation: global batch 8.

Both draw the same seeded permutation of the 16 pairs, and accelerate gives process ``r`` the
micro-batches ``r, r + 2, ...`` of it, so each step's 8 pairs are the same in both runs. Each
process's loss is the mean over its micro-batch; transformers divides it by the accumulation steps
and DDP averages the gradients over the processes, so with equal micro-batch sizes the gradient is
that of the mean over the global batch, as in the single process. The logged loss is gathered and
averaged over the processes. So the logged losses of both steps (the second one after the first
update) and the parameter updates must agree within 1e-5; they differ only by float32 summation
order (at most 6e-8 in the losses and 5e-7 in the updates observed). Cases: `RewardTrainer` (bt),
`PreferenceTrainer` with dpo and a frozen-copy reference, the same with ``share_prompt``, and mapo (token masks from
the reference's hidden states, a third reference pass). sparsepo's learned masks are refused under several processes
(`test_sparsepo_refuses_several_processes`).

Also: ``prefkit train`` under the same launch writes one run's output once; every
examples/accelerate/*.yaml passes accelerate's launch-time checks; a wrapped reward model is scored
through the wrapper's forward (or refused when its own method would bypass it). The launch uses a config file with
``distributed_type: MULTI_GPU`` (torchrun), not ``--cpu --num_processes 2``: with ``--cpu`` accelerate
1.x starts a single process unless MPI is set up (see examples/accelerate/ddp_cpu.yaml).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).resolve().parent / "scripts" / "ddp_worker.py"
DDP_CPU = ROOT / "examples" / "accelerate" / "ddp_cpu.yaml"
TOL = 1e-5
CASES = ("reward", "dpo", "dpo-shared", "gpm", "mapo")
UNPAIRED = ("kto", "bco")


def _worker_module():
    spec = importlib.util.spec_from_file_location("ddp_worker", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def accelerate_launch(args: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    """``accelerate launch`` with 2 CPU processes (port chosen freely), failing with its output."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(DDP_CPU)]
    cmd += ["--main_process_port", "0", *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"accelerate launch failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr[-6000:]}"
    return proc


@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory):
    """All cases trained in one 2-process launch (one start-up): per-device batch 2, accumulation 2."""
    out = tmp_path_factory.mktemp("ddp")
    accelerate_launch([str(WORKER), "--batch", "2", "--grad-accum", "2", "--out-dir", str(out), *CASES], cwd=ROOT)
    return {case: torch.load(out / f"{case}.pt") for case in CASES}


@pytest.fixture(scope="module")
def two_process_unpaired(tmp_path_factory):
    """KTO and BCO in one 2-process launch: per-device batch 4, no accumulation (global batch 8)."""
    out = tmp_path_factory.mktemp("ddp_unpaired")
    accelerate_launch([str(WORKER), "--batch", "4", "--out-dir", str(out), *UNPAIRED], cwd=ROOT)
    return {case: torch.load(out / f"{case}.pt") for case in UNPAIRED}


def single_process(case: str, out: Path) -> dict:
    """The reference run, in this process: per-device batch 8, no accumulation."""
    _worker_module().run(case, batch=8, grad_accum=1, steps=2, out=str(out))
    return torch.load(out)


def assert_same_updates(one: dict, two: dict) -> None:
    assert one["before"].keys() == two["before"].keys() == one["after"].keys() == two["after"].keys()
    for name in one["before"]:
        update_one = one["after"][name] - one["before"][name]
        update_two = two["after"][name] - two["before"][name]
        torch.testing.assert_close(update_two, update_one, atol=TOL, rtol=0, msg=lambda m: f"{name}: {m}")


def test_bco_shares_one_reward_shift_across_processes(two_process_unpaired, tmp_path):
    """BCO's running reward shift takes the rewards of every process's batch, so with the same global
    batch (and no accumulation, which would update the shift between micro-batches) the two runs
    agree: losses, the logged shift and the updates."""
    one, two = single_process("bco", tmp_path / "one.pt"), two_process_unpaired["bco"]
    assert two["num_processes"] == 2
    torch.testing.assert_close(two["losses"], one["losses"], atol=TOL, rtol=0)
    torch.testing.assert_close(two["metrics"]["rewards/chosen"], one["metrics"]["rewards/chosen"], atol=1e-4, rtol=0)
    assert_same_updates(one, two)


def test_kto_averages_its_reference_point_over_processes(two_process_unpaired):
    """KTO's z0 is each process's batch mean of the mismatched KL rows, averaged over the processes
    (TRL's rule) and clamped; the KL rows pair completions within each process's batch, so the run is
    not equal to one process with batch 8, but it trains and logs finite values."""
    two = two_process_unpaired["kto"]
    assert two["num_processes"] == 2
    assert torch.isfinite(two["losses"]).all()
    assert any((two["after"][n] - two["before"][n]).abs().max() > 1e-3 for n in two["before"])


@pytest.mark.parametrize("case", CASES)
def test_two_processes_match_one(case, two_process_results, tmp_path):
    one, two = single_process(case, tmp_path / "one.pt"), two_process_results[case]
    assert one["num_processes"] == 1 and two["num_processes"] == 2
    assert one["losses"].shape == two["losses"].shape == (2,)
    torch.testing.assert_close(two["losses"], one["losses"], atol=TOL, rtol=0)
    assert abs(one["losses"][1] - one["losses"][0]) > 1e-3  # the second loss comes after the first update
    # prefkit's own metrics are averaged over every process's examples, not the main process's only
    assert one["metrics"].keys() == two["metrics"].keys() and one["metrics"]
    for key in one["metrics"]:
        torch.testing.assert_close(two["metrics"][key], one["metrics"][key], atol=1e-4, rtol=1e-5, msg=key)
    assert one["before"].keys() == two["before"].keys() == one["after"].keys() == two["after"].keys()
    largest = 0.0
    for name in one["before"]:
        torch.testing.assert_close(two["before"][name], one["before"][name], atol=0, rtol=0)  # same seeded init
        update_one = one["after"][name] - one["before"][name]
        update_two = two["after"][name] - two["before"][name]
        torch.testing.assert_close(update_two, update_one, atol=TOL, rtol=0, msg=lambda m: f"{name}: {m}")
        largest = max(largest, update_one.abs().max().item())
    assert largest > 1e-2  # the updates are far larger than the tolerance


E2E_CONFIG = """\
model: tiny
tiny_hidden_size: 32
tiny_num_layers: 1
tiny_num_heads: 2
tiny_intermediate_size: 64
train_file: {train_file}
eval_fraction: 0.25
loss: dpo
precompute_ref_logps: true
max_length: 96
max_prompt_length: 48
output_dir: {output_dir}
max_steps: 4
per_device_train_batch_size: 2
per_device_eval_batch_size: 8
learning_rate: 1.0e-3
lr_scheduler_type: constant
logging_steps: 1
save_strategy: steps
save_steps: 2
seed: 0
data_seed: 0
use_cpu: true
dataloader_pin_memory: false
disable_tqdm: true
report_to: none
ddp_find_unused_parameters: false
"""


def test_prefkit_train_under_accelerate(tmp_path):
    """`accelerate launch ... prefkit train CONFIG.yaml` (DPO, cached reference log-probs, checkpoints, final
    evaluation) with 2 processes: one run's output, written once by the main process."""
    out = tmp_path / "run"
    config = tmp_path / "config.yaml"
    train_file = ROOT / "examples" / "data" / "pairs_tiny.jsonl"
    config.write_text(E2E_CONFIG.format(train_file=train_file, output_dir=out))
    proc = accelerate_launch(["-m", "prefkit.cli", "train", str(config)], cwd=tmp_path)
    assert proc.stdout.count("Done. Output in") == 1
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_steps = [entry["step"] for entry in lines if entry["split"] == "train"]
    assert train_steps == [1, 2, 3, 4]  # logged once per step, by the main process only
    assert [entry["split"] for entry in lines].count("summary") == 1
    assert [entry["split"] for entry in lines].count("eval") == 1  # the final held-out evaluation
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(("checkpoint-", ".staging"))) == [
        "checkpoint-2",
        "checkpoint-4",
    ]
    state = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["global_step"] == 4
    # 36 training pairs (12 of 48 held out); 4 steps x 2 pairs x 2 processes = 16 pairs seen (one process: 8)
    assert state["epoch"] == pytest.approx(16 / 36)
    for name in ("config.yaml", "README.md", "model.safetensors", "tokenizer.json", "ref_logps/train.safetensors"):
        assert (out / name).is_file(), name
    # --resume under the same launch: every process checks the saved config.yaml and continues alike
    proc = accelerate_launch(["-m", "prefkit.cli", "train", str(config), "max_steps=6", "--resume"], cwd=tmp_path)
    assert proc.stdout.count("Done. Output in") == 1
    assert json.loads((out / "checkpoint-6" / "trainer_state.json").read_text())["global_step"] == 6
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert history == [history[0]] and history[0]["changed"] == {"max_steps": {"from": 4, "to": 6}}


@pytest.mark.parametrize("name", ["ddp_cpu", "ddp", "fsdp", "deepspeed_zero2", "deepspeed_zero3"])
def test_accelerate_example_configs_are_valid(name, monkeypatch):
    """Each examples/accelerate/*.yaml goes through accelerate's own launch-time checks, and its FSDP /
    DeepSpeed settings build accelerate's plugin from the environment the launcher would set (neither
    GPUs nor deepspeed are needed for that; the runs themselves are not tested here)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import DeepSpeedPlugin, FullyShardedDataParallelPlugin
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    path = ROOT / "examples" / "accelerate" / f"{name}.yaml"
    parser = launch_command_parser()
    known = {action.dest for action in parser._actions}
    args = parser.parse_args(["--config_file", str(path), "train.py"])
    args, defaults, _ = _validate_launch_command(args)  # unknown top-level keys are an error here
    nested = {**defaults.fsdp_config, **defaults.deepspeed_config}
    assert set(nested) <= known, f"keys accelerate launch does not know: {sorted(set(nested) - known)}"
    assert args.num_processes >= 2 and defaults.mixed_precision == "no"  # precision comes from the prefkit config
    if name.startswith("deepspeed"):
        args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)
        _, env = prepare_deepspeed_cmd_env(args)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        plugin = DeepSpeedPlugin()
        assert plugin.zero_stage == int(name[-1])
        # left to the prefkit config (TrainingArguments) on purpose
        assert plugin.gradient_accumulation_steps == plugin.gradient_clipping == "auto"
    else:
        assert args.multi_gpu or args.use_fsdp  # the torchrun launcher: num_processes processes
        env = prepare_multi_gpu_env(args)
        if name == "fsdp":
            for key, value in env.items():
                monkeypatch.setenv(key, value)
            plugin = FullyShardedDataParallelPlugin()
            assert plugin.fsdp_version == 2 and plugin.state_dict_type.name == "FULL_STATE_DICT"


class _Wrapper(torch.nn.Module):
    """Stands in for DDP / FSDP1 / a DeepSpeed engine: holds the model as ``.module``, has no ``config``,
    and forwards its calls."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


def test_reward_scores_run_through_a_wrapper(tokenizer):
    from prefkit.models.reward import SequenceClassifierReward, build_reward_model
    from prefkit.train.reward_trainer import model_scores

    model = build_reward_model("tiny", tiny=_worker_module().TINY, vocab_size=len(tokenizer), pad_token_id=0)
    ids = torch.tensor([[5, 6, 7, 0], [8, 9, 10, 11]])  # row 0 right-padded: its reward is read at position 2
    attn, comp = (ids != 0).long(), torch.ones_like(ids)
    calls = []
    wrapper = _Wrapper(model)
    wrapper.register_forward_hook(lambda *_: calls.append(1))
    torch.testing.assert_close(model_scores(wrapper, ids, attn, comp), model_scores(model, ids, attn, comp))
    assert calls == [1]  # scored by the wrapper's forward, so DDP would synchronise the gradients
    # a model scored by its own method would bypass the wrapper's forward: refused
    with pytest.raises(NotImplementedError, match="bypasses the _Wrapper wrapper's forward"):
        model_scores(_Wrapper(SequenceClassifierReward(model)), ids, attn, comp)


def test_wrapped_judge_runs_through_the_wrapper(tokenizer):
    """A general preference model's forward is its compare(), so under a wrapper it is called through the
    wrapper's forward (DDP synchronises its gradients); a judge whose forward is something else is refused."""
    from prefkit.models.gpm import build_gpm
    from prefkit.models.tiny import build_tiny_llama
    from prefkit.train.reward_trainer import RewardTrainer

    gpm = build_gpm(build_tiny_llama(vocab_size=len(tokenizer), hidden_size=16, num_layers=1, num_heads=2))
    ids = torch.tensor([[5, 6], [7, 8]])
    ones = torch.ones_like(ids)
    calls = []
    wrapper = _Wrapper(gpm)
    wrapper.register_forward_hook(lambda *_: calls.append(1))
    direct = RewardTrainer._judge_logits(gpm, ids, ones, ones, 1)
    torch.testing.assert_close(RewardTrainer._judge_logits(wrapper, ids, ones, ones, 1), direct)
    assert direct.shape == (1,) and calls == [1]

    class OwnCompare(torch.nn.Module):  # compare() is not its forward
        def compare(self, *args):
            return gpm.compare(*args)

    with pytest.raises(NotImplementedError, match=r"compare\(\) method"):
        RewardTrainer._judge_logits(_Wrapper(OwnCompare()), ids, ones, ones, 1)


def test_sparsepo_refuses_several_processes(monkeypatch, tokenizer, tiny_model, pref_args, make_pairs):
    """DDP reports a learned mask's parameters ready twice (they are used outside the policy's forward), so the
    trainer refuses it under several processes in one line instead of failing inside backward."""
    from transformers import TrainingArguments

    from prefkit.train.trainer import PreferenceTrainer

    args = pref_args(loss="sparsepo", loss_params={})
    monkeypatch.setattr(TrainingArguments, "world_size", property(lambda self: 2))
    with pytest.raises(ValueError, match="learned token masks train on one process only"):
        PreferenceTrainer(tiny_model, args, train_dataset=make_pairs(4), processing_class=tokenizer)
