"""`EndToEndTrainer`: personalized heads with their backbone under ``transformers.Trainer``.

Gradient accumulation equals the large batch, the backbone's own learning rate (0: frozen), checkpoints
are complete and resume continues the run exactly (VPL, whose episodes and latent draws are random),
a non-finite loss stops the run, two processes equal one with the same global batch, and ``prefkit
train`` resumes a personalized end-to-end run.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import TrainingArguments

from prefkit.data.records import PairwiseRecord
from prefkit.models.end_to_end import EndToEndRewardModel, tokenize_pairs
from prefkit.models.pal import PAL
from prefkit.models.tiny import build_tiny_llama
from prefkit.models.vpl import VPL
from prefkit.train.end_to_end import EndToEndTrainer, Episodes, PairRows, train_end_to_end

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).resolve().parent / "scripts" / "end_to_end_worker.py"
DDP_CPU = ROOT / "examples" / "accelerate" / "ddp_cpu.yaml"
USERS = ["alice", "bob"]
HIDDEN = 32


def records(n_prompts: int = 4) -> list[PairwiseRecord]:
    out = []
    for i in range(n_prompts):
        yes, no = f"yes, sure {i}", f"no way {i}"
        out.append(PairwiseRecord(f"q{i}?", yes, no, user_id="alice", id=f"a{i}"))
        out.append(PairwiseRecord(f"q{i}?", no, yes, user_id="bob", id=f"b{i}"))
    return out


def pal_model(tokenizer) -> EndToEndRewardModel:
    lm = build_tiny_llama(
        vocab_size=len(tokenizer), hidden_size=HIDDEN, num_layers=1, num_heads=2, intermediate_size=64
    )
    torch.manual_seed(0)
    return EndToEndRewardModel(lm, PAL(HIDDEN, 2, variant="mixture", users=USERS), pooling="mean")


def vpl_model(tokenizer) -> EndToEndRewardModel:
    lm = build_tiny_llama(
        vocab_size=len(tokenizer), hidden_size=HIDDEN, num_layers=1, num_heads=2, intermediate_size=64
    )
    torch.manual_seed(0)
    return EndToEndRewardModel(lm, VPL(HIDDEN, 4, 16), pooling="mean", users=USERS, beta_kl=0.1)


def params(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same(a: dict, b: dict, atol: float) -> None:
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=atol, rtol=0, msg=lambda m: f"{name}: {m}")


def test_gradient_accumulation_equals_the_large_batch(tokenizer, tmp_path):
    """PAL's objective is a mean over pairs: 2 accumulated batches of 4 are one batch of 8 (the whole
    data, so every step sees the same pairs), with gradient clipping on the accumulated gradient (plain
    SGD, as in the DDP tests, so that the updates are compared rather than Adam's normalisation)."""
    runs = {}
    for batch, accumulation in ((8, 1), (4, 2)):
        model = pal_model(tokenizer)
        data = tokenize_pairs(records(), tokenizer, USERS)
        logged = train_end_to_end(
            model,
            data,
            tokenizer,
            output_dir=str(tmp_path / f"{batch}"),
            epochs=3,
            batch_size=batch,
            gradient_accumulation_steps=accumulation,
            optim="sgd",  # Adam divides by sqrt(v): float rounding in near-zero gradients would dominate
            lr=0.05,
            backbone_lr=1e-2,
        )
        runs[batch] = (params(model), [row["loss"] for row in logged])
    assert len(runs[8][1]) == len(runs[4][1]) == 3
    assert runs[8][1] == pytest.approx(runs[4][1], abs=1e-5)
    assert_same(runs[8][0], runs[4][0], atol=1e-5)


def test_backbone_learning_rate_and_freezing(tokenizer, tmp_path):
    model = pal_model(tokenizer)
    data = tokenize_pairs(records(), tokenizer, USERS)
    args = TrainingArguments(output_dir=str(tmp_path), learning_rate=0.05, report_to=[], use_cpu=True)
    trainer = EndToEndTrainer(model, args, PairRows(data, tokenizer.pad_token_id), backbone_learning_rate=1e-4)
    optimizer = trainer.create_optimizer()
    lrs = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    assert {lrs[id(p)] for p in model.backbone.parameters()} == {1e-4}
    assert {lrs[id(p)] for p in model.head.parameters()} == {0.05}
    assert args.remove_unused_columns is False

    frozen = pal_model(tokenizer)
    before = params(frozen.backbone)
    train_end_to_end(frozen, data, tokenizer, output_dir=str(tmp_path / "f"), epochs=2, batch_size=4, backbone_lr=0.0)
    assert not any(p.requires_grad for p in frozen.backbone.parameters())
    assert_same(before, params(frozen.backbone), atol=0)
    with pytest.raises(ValueError, match="backbone_learning_rate must be a number >= 0"):
        EndToEndTrainer(model, args, PairRows(data, tokenizer.pad_token_id), backbone_learning_rate=-1.0)
    with pytest.raises(TypeError, match="a PAL head trains on PairRows"):
        EndToEndTrainer(model, args, Episodes(data, tokenizer.pad_token_id, 4, 2, 2, 0))


def test_vpl_logs_kl_and_active_units_and_needs_max_steps(tokenizer, tmp_path):
    model = vpl_model(tokenizer)
    data = tokenize_pairs(records(), tokenizer, USERS)
    logged = train_end_to_end(
        model, data, tokenizer, output_dir=str(tmp_path), max_steps=3, batch_size=2, lr=0.01, context_size=2
    )
    assert [row["step"] for row in logged] == [1, 2, 3]
    for row in logged:
        assert {"loss", "bt", "kl", "accuracy", "active_units"} <= set(row)
        assert isinstance(row["active_units"], int) and 0 <= row["active_units"] <= 4
        assert row["kl"] >= 0
    with pytest.raises(ValueError, match="give max_steps"):
        train_end_to_end(model, data, tokenizer, output_dir=str(tmp_path), epochs=1)


def test_checkpoints_are_complete_and_resume_is_exact(tokenizer, tmp_path):
    """VPL: episodes are drawn per index and z per step from the restored RNG, so 6 steps straight equal
    3 steps, a checkpoint, and 3 more steps of a fresh model resumed from it."""
    data = tokenize_pairs(records(), tokenizer, USERS)
    settings = dict(max_steps=6, batch_size=2, lr=0.01, backbone_lr=1e-2, context_size=2, seed=3)
    straight = vpl_model(tokenizer)
    train_end_to_end(straight, data, tokenizer, output_dir=str(tmp_path / "straight"), **settings)

    saved = vpl_model(tokenizer)
    run = tmp_path / "saved"
    train_end_to_end(saved, data, tokenizer, output_dir=str(run), save_strategy="steps", save_steps=3, **settings)
    assert sorted(p.name for p in run.iterdir() if p.name.startswith("checkpoint")) == ["checkpoint-3", "checkpoint-6"]
    assert not [p for p in run.iterdir() if p.name.startswith(".staging")]
    state = json.loads((run / "checkpoint-3" / "prefkit_state.json").read_text())
    assert set(state) == {"checkpointing"} and state["checkpointing"]["metrics_lines"] >= 1
    assert (run / "checkpoint-3" / "model.safetensors").is_file()
    assert (run / "checkpoint-3" / "optimizer.pt").is_file()

    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    shutil.copytree(run / "checkpoint-3", resumed_dir / "checkpoint-3")  # as if the run died after step 3
    resumed = vpl_model(tokenizer)
    logged = train_end_to_end(
        resumed, data, tokenizer, output_dir=str(resumed_dir), resume=True, save_steps=3, **settings
    )
    assert [row["step"] for row in logged] == [1, 2, 3, 4, 5, 6]  # the log history is restored too
    assert_same(params(straight), params(resumed), atol=1e-6)
    assert_same(params(straight), params(saved), atol=0)


def test_non_finite_loss_stops_before_the_step(tokenizer, tmp_path):
    model = pal_model(tokenizer)
    with torch.no_grad():
        model.head.user_logits.fill_(float("nan"))
    data = tokenize_pairs(records(), tokenizer, USERS)
    with pytest.raises(
        FloatingPointError,
        match=r"non-finite end-to-end training loss .* at global step 1, on the batch of rows \d+ \(id [ab]\d\)",
    ):
        train_end_to_end(model, data, tokenizer, output_dir=str(tmp_path), epochs=1, batch_size=4)


def test_the_trained_model_saves_and_loads(tokenizer, tmp_path):
    model = vpl_model(tokenizer)
    data = tokenize_pairs(records(), tokenizer, USERS)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, report_to=[], use_cpu=True)
    episodes = Episodes(data, tokenizer.pad_token_id, 8, 2, 2, 0)
    trainer = EndToEndTrainer(model, args, episodes, eval_dataset=episodes)
    trainer.train()
    metrics = trainer.evaluate()
    assert {"eval_loss", "eval_kl", "eval_bt", "eval_accuracy"} <= set(metrics)
    trainer.save_model(str(tmp_path / "final"))
    loaded = EndToEndRewardModel.from_pretrained(str(tmp_path / "final"))
    assert loaded.users == USERS and loaded.beta_kl == 0.1 and isinstance(loaded.head, VPL)
    batch = episodes.collate([episodes[0]])
    model.eval()
    with torch.no_grad():
        torch.manual_seed(0)
        expected = model(batch)["loss"]
        torch.manual_seed(0)
        assert float(loaded(batch)["loss"]) == pytest.approx(float(expected), abs=1e-6)


def test_two_processes_match_one_process(tmp_path):
    """Per-device batch 4 on 2 processes (``accelerate launch``, gloo) against batch 8 in this process: the
    whole data every step, DDP averages the two halves' mean-loss gradients, so the updates agree."""
    two, one = tmp_path / "two", tmp_path / "one"
    two.mkdir()
    one.mkdir()
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(DDP_CPU)]
    cmd += ["--main_process_port", "0", str(WORKER), "--batch", "4", "--out-dir", str(two)]
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"accelerate launch failed:\n{proc.stdout}\n{proc.stderr[-6000:]}"
    spec = importlib.util.spec_from_file_location("end_to_end_worker", WORKER)
    worker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(worker)
    worker.run(batch=8, out_dir=str(one))
    a, b = torch.load(one / "result.pt"), torch.load(two / "result.pt")
    assert (a["num_processes"], b["num_processes"]) == (1, 2)
    torch.testing.assert_close(b["losses"], a["losses"], atol=1e-5, rtol=0)
    largest = 0.0
    for name in a["before"]:
        update_one = a["after"][name] - a["before"][name]
        update_two = b["after"][name] - b["before"][name]
        torch.testing.assert_close(update_two, update_one, atol=1e-5, rtol=0, msg=lambda m: f"{name}: {m}")
        largest = max(largest, update_one.abs().max().item())
    assert largest > 1e-2  # the runs trained


# ---- `prefkit train` -------------------------------------------------------------------------

EXAMPLES = ROOT / "examples"
TINY = ["model=tiny", "tiny_hidden_size=16", "tiny_num_layers=1", "progress=false", "shot_draws=1", "shots=[1]"]


@pytest.mark.parametrize("method", ["vpl", "micro"])
def test_prefkit_train_end_to_end_and_eval_rm(method, tmp_path):
    from prefkit.cli import main

    out, report = tmp_path / "run", tmp_path / "eval"
    steps = ["personalized.steps=4", "personalized.log_every=2"]
    steps += ["personalized.router_steps=5"] if method == "micro" else []
    argv = ["train", str(EXAMPLES / f"personalized_{method}.yaml"), *TINY, f"output_dir={out}"]
    argv += [f"train_file={EXAMPLES / 'data' / 'groups_pairs.jsonl'}", "personalized.end_to_end=true", *steps]
    argv += ["personalized.batch_size=4" if method == "micro" else "personalized.users_per_step=4"]
    assert main(argv) == 0
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert history[0]["stage"] == "end_to_end" and history[-1]["stage"] == "final"
    assert ("router" in {row["stage"] for row in history}) == (method == "micro")
    if method == "vpl":
        assert "active_units" in history[-1] and "kl" in history[0]
        assert set(json.loads((out / "users.json").read_text())["user_latents"]) == set(
            json.loads((out / "users.json").read_text())["users"]
        )
    assert main(["eval", "rm", "--model", str(out), "--data", str(out / "heldout.jsonl"), "--output", str(report)]) == 0
    ours = json.loads((out / "eval" / "results.json").read_text())["seen"]["accuracy"]
    assert json.loads((report / "results.json").read_text())["seen"]["accuracy"] == pytest.approx(ours)


def test_prefkit_train_resumes_an_end_to_end_run(tmp_path):
    from prefkit.cli import main

    argv = ["train", str(EXAMPLES / "personalized_pal.yaml"), *TINY]
    argv += [f"train_file={EXAMPLES / 'data' / 'groups_pairs.jsonl'}", "personalized.end_to_end=true"]
    argv += ["personalized.epochs=2", "personalized.batch_size=64", "personalized.save_steps=3"]
    full = tmp_path / "full"
    assert main([*argv, f"output_dir={full}"]) == 0
    steps = sorted(int(p.name.split("-")[1]) for p in (full / "checkpoints").glob("checkpoint-*"))
    assert len(steps) == 2 and steps[-1] > 3  # save_total_limit 2 keeps the last two
    died = tmp_path / "died"
    (died / "checkpoints").mkdir(parents=True)
    first = f"checkpoint-{steps[0]}"
    shutil.copytree(full / "checkpoints" / first, died / "checkpoints" / first)
    assert main([*argv, f"output_dir={died}", "--resume"]) == 0
    head = PAL.from_pretrained(str(died))
    expected = PAL.from_pretrained(str(full))
    assert_same(params(expected), params(head), atol=1e-5)
    assert main([*argv, f"output_dir={tmp_path / 'fresh'}", "--resume"]) == 2  # nothing to resume from
    off = ["train", str(EXAMPLES / "personalized_pal.yaml"), *TINY, f"output_dir={tmp_path / 'x'}", "--resume"]
    assert main(off) == 2  # frozen-embedding heads fit in one go


def test_prefkit_train_end_to_end_with_lora(tmp_path):
    from safetensors.torch import load_file

    from prefkit.cli import main

    out, report = tmp_path / "run", tmp_path / "eval"
    argv = ["train", str(EXAMPLES / "personalized_pal.yaml"), *TINY, f"output_dir={out}", "backbone_layers=1"]
    argv += [f"train_file={EXAMPLES / 'data' / 'groups_pairs.jsonl'}", "personalized.end_to_end=true"]
    argv += ["personalized.epochs=1", "personalized.batch_size=64", "personalized.lora_r=4"]
    argv += ["personalized.lora_target_modules=[q_proj,v_proj]", "personalized.backbone_lr=1e-2"]
    assert main(argv) == 0
    weights = load_file(str(out / "backbone" / "model.safetensors"))
    assert not [k for k in weights if "lora" in k]  # merged: a plain backbone that AutoModel loads
    assert main(["eval", "rm", "--model", str(out), "--data", str(out / "heldout.jsonl"), "--output", str(report)]) == 0
    ours = json.loads((out / "eval" / "results.json").read_text())["seen"]["accuracy"]
    assert json.loads((report / "results.json").read_text())["seen"]["accuracy"] == pytest.approx(ours)
    assert main([*argv[:-1], "personalized.lora_r=-1"]) == 2


def test_pair_rows_in_user_chunks(tokenizer):
    data = tokenize_pairs(records(5), tokenizer, USERS)  # 5 pairs per user
    single = PairRows(data, tokenizer.pad_token_id)
    assert len(single) == 10 and single[3] == [3]
    chunked = PairRows(data, tokenizer.pad_token_id, pairs_per_user=2, seed=1)
    assert [len(c) for c in chunked.chunks] == [2, 2, 1, 2, 2, 1]  # 5 = 2 + 2 + 1 for each user
    assert sorted(r for c in chunked.chunks for r in c) == list(range(10))  # every pair exactly once
    users = data.user_index.tolist()
    assert all(len({users[r] for r in c}) == 1 for c in chunked.chunks)  # one user per chunk
    assert chunked.chunks == PairRows(data, tokenizer.pad_token_id, pairs_per_user=2, seed=1).chunks
    batch = chunked.collate([chunked[0], chunked[2]])
    assert batch["input_ids"].shape[0] == 2 * 3 and batch["user_index"].tolist() == [users[0]] * 3
    with pytest.raises(ValueError, match="pairs_per_user must be an int >= 0"):
        PairRows(data, tokenizer.pad_token_id, pairs_per_user=-1)


def test_prefkit_train_warm_start_and_user_chunks(tmp_path):
    from prefkit.cli import main
    from prefkit.train.config import ConfigError
    from prefkit.train.personalized import parse_personalized_config

    out = tmp_path / "run"
    argv = ["train", str(EXAMPLES / "personalized_mixture_bt.yaml"), *TINY, f"output_dir={out}"]
    argv += [f"train_file={EXAMPLES / 'data' / 'groups_pairs.jsonl'}", "personalized.end_to_end=true"]
    argv += ["personalized.warm_start=true", "personalized.pairs_per_user=8", "personalized.batch_size=4"]
    argv += ["personalized.max_steps=2", "personalized.logging_steps=1", "personalized.iters=3"]
    assert main(argv) == 0
    stages = [json.loads(line)["stage"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert stages[0] == "warm_start/em" and stages.count("end_to_end") == 2 and stages[-1] == "final"
    with pytest.raises(ConfigError, match="pairs_per_user does not apply to vpl end to end"):
        parse_personalized_config({"personalized": {"method": "vpl", "end_to_end": True, "pairs_per_user": 4}})
    # the default value is accepted (a config switched to another method by an override)
    parse_personalized_config({"personalized": {"method": "vpl", "end_to_end": True, "pairs_per_user": 0}})


def test_prefkit_train_end_to_end_under_accelerate(tmp_path):
    """`accelerate launch ... prefkit train` with a personalized end-to-end config on 2 processes: both train
    (each on half of every global batch), the main one evaluates and writes the run once."""
    out = tmp_path / "run"
    argv = ["-m", "prefkit.cli", "train", str(EXAMPLES / "personalized_pal.yaml"), *TINY, f"output_dir={out}"]
    argv += [f"train_file={EXAMPLES / 'data' / 'groups_pairs.jsonl'}", "personalized.end_to_end=true"]
    argv += ["personalized.epochs=1", "personalized.batch_size=64", "personalized.save_steps=2"]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(DDP_CPU)]
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(
        [*cmd, "--main_process_port", "0", *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, f"accelerate launch failed:\n{proc.stdout}\n{proc.stderr[-6000:]}"
    assert proc.stdout.count("Done. Output in") == 1
    n_train = len(json.loads((out / "users.json").read_text())["users"])
    assert n_train == 16
    checkpoints = sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("checkpoint-"))
    last = json.loads((out / "checkpoints" / checkpoints[-1] / "trainer_state.json").read_text())
    assert last["epoch"] == pytest.approx(1.0)  # one pass over the data with 2 x 64 pairs per step
    n_pairs = 800 - len((out / "heldout.jsonl").read_text().splitlines())  # groups_pairs.jsonl has 800 rows
    assert last["global_step"] == math.ceil(n_pairs / 128)
    for name in ("config.json", "model.safetensors", "backbone/model.safetensors", "eval/results.json"):
        assert (out / name).is_file(), name


def test_evaluation_batches_its_own_records(tokenizer, tmp_path):
    """An evaluation set's rows are its own: eval_loss is the objective on those records, not on the
    training records with the same row numbers."""
    model = pal_model(tokenizer)
    train = tokenize_pairs(records(4), tokenizer, USERS)
    held_out = [PairwiseRecord(f"other {i}?", "no", "yes please", user_id=u) for i, u in enumerate(USERS * 2)]
    evaluation = tokenize_pairs(held_out, tokenizer, USERS)
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_eval_batch_size=4, report_to=[], use_cpu=True, max_steps=1
    )
    pad = tokenizer.pad_token_id
    trainer = EndToEndTrainer(model, args, PairRows(train, pad), eval_dataset=PairRows(evaluation, pad))
    metrics = trainer.evaluate()
    model.eval()
    with torch.no_grad():
        expected = float(model(evaluation.batch(range(4), pad))["loss"])
        on_train_rows = float(model(train.batch(range(4), pad))["loss"])
    assert metrics["eval_loss"] == pytest.approx(expected, abs=1e-5)
    assert abs(expected - on_train_rows) > 1e-4  # the two would be told apart
