"""Checkpoints: exact resume, atomic checkpoint folders, stopping on a non-finite loss."""

import json
import math
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import get_last_checkpoint

from prefkit.models.tiny import build_tiny_llama
from prefkit.train.trainer import NonFiniteLossError, PreferenceTrainer

transformers.logging.set_verbosity_error()


class CrashAt(TrainerCallback):
    """Simulates a crash right after optimizer step ``step`` (before it is logged or saved)."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt(f"simulated crash at step {self.step}")


def _rows(out_dir):
    rows = [json.loads(line) for line in Path(out_dir, "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if r["split"] == "train"}, rows


@pytest.mark.parametrize("loss", ["dpo", "bco"])
def test_resume_continues_exactly(tokenizer, pref_args, make_pairs, make_unpaired, tmp_path, loss):
    records = make_pairs(8) if loss == "dpo" else make_unpaired(8)
    keys = ["loss", "grad_norm", "rewards/chosen", "rewards/rejected", "logps/chosen"]
    keys += ["reward_shift"] if loss == "bco" else ["rewards/margins"]

    def trainer(out, callbacks=None):
        args = pref_args(
            output_dir=str(out),
            loss=loss,
            max_steps=6,
            per_device_train_batch_size=2,
            save_strategy="steps",
            save_steps=3,
        )  # 4 steps per epoch: the resume crosses an epoch
        return PreferenceTrainer(
            build_tiny_llama(vocab_size=len(tokenizer), seed=0),
            args,
            train_dataset=records,
            processing_class=tokenizer,
            callbacks=callbacks,
        )

    full = tmp_path / "full"
    trainer(full).train()
    reference, _ = _rows(full)
    assert sorted(reference) == [1, 2, 3, 4, 5, 6]

    cut = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        trainer(cut, callbacks=[CrashAt(5)]).train()
    interrupted, _ = _rows(cut)
    assert sorted(interrupted) == [1, 2, 3, 4]  # step 4 was logged after the last checkpoint (3)
    assert get_last_checkpoint(str(cut)).endswith("checkpoint-3")

    resumed = trainer(cut)
    resumed.train(resume_from_checkpoint=True)
    if loss == "bco":
        assert resumed.bco_count == 12
    after, all_rows = _rows(cut)
    assert [r["step"] for r in all_rows if r["split"] == "train"] == [1, 2, 3, 4, 5, 6]  # no duplicate step 4
    for step in range(1, 7):
        for key in keys:
            if key not in reference[step]:  # e.g. a BCO batch with no undesirable example
                assert key not in after[step]
                continue
            assert after[step][key] == pytest.approx(reference[step][key], abs=1e-6), (step, key)


def test_resuming_a_finished_run_trains_nothing(tokenizer, pref_args, make_pairs, tmp_path):
    """The last step (5) falls in the middle of an epoch (3 steps of 2 pairs per epoch): transformers
    alone would take a 6th step on resume; the run must stay at step 5 with the same weights."""

    def trainer():
        args = pref_args(
            output_dir=str(tmp_path), max_steps=5, per_device_train_batch_size=2, save_strategy="steps", save_steps=5
        )
        return PreferenceTrainer(
            build_tiny_llama(vocab_size=len(tokenizer), seed=0),
            args,
            train_dataset=make_pairs(6),
            processing_class=tokenizer,
        )

    first = trainer()
    first.train()
    weights = {k: v.clone() for k, v in first.model.state_dict().items()}
    resumed = trainer()
    resumed.train(resume_from_checkpoint=True)
    assert resumed.state.global_step == 5
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-5"]
    for name, value in resumed.model.state_dict().items():
        assert torch.equal(value, weights[name]), name
    steps = [r["step"] for r in _rows(tmp_path)[1] if r["split"] == "train"]
    assert steps == sorted(set(steps)) and max(steps) == 5


def test_bco_resume_without_state_file_is_an_error(tokenizer, pref_args, make_unpaired):
    args = pref_args(loss="bco", max_steps=2, save_strategy="steps", save_steps=2)
    trainer = PreferenceTrainer(
        build_tiny_llama(vocab_size=len(tokenizer)),
        args,
        train_dataset=make_unpaired(8),
        processing_class=tokenizer,
    )
    trainer.train()
    checkpoint = Path(args.output_dir, "checkpoint-2")
    (checkpoint / "prefkit_state.json").unlink()
    with pytest.raises(FileNotFoundError, match="reward shift"):
        trainer.train(resume_from_checkpoint=str(checkpoint))


def test_interrupted_save_leaves_no_partial_checkpoint(tokenizer, pref_args, make_pairs, monkeypatch):
    args = pref_args(max_steps=4, save_strategy="steps", save_steps=1)
    original = Trainer._save_rng_state

    def crash_on_second_save(self, output_dir):
        if self.state.global_step == 2:
            raise OSError("disk full (simulated) while writing the RNG state")
        return original(self, output_dir)

    monkeypatch.setattr(Trainer, "_save_rng_state", crash_on_second_save)
    trainer = PreferenceTrainer(
        build_tiny_llama(vocab_size=len(tokenizer)),
        args,
        train_dataset=make_pairs(8),
        processing_class=tokenizer,
    )
    with pytest.raises(OSError, match="disk full"):
        trainer.train()
    out = Path(args.output_dir)
    assert (out / "checkpoint-1" / "trainer_state.json").is_file()
    assert not (out / "checkpoint-2").exists()
    staged = out / ".staging-checkpoint-2" / "checkpoint-2"
    assert (staged / "model.safetensors").is_file()  # the half-written save went to the staging folder
    assert get_last_checkpoint(str(out)) == str(out / "checkpoint-1")

    monkeypatch.setattr(Trainer, "_save_rng_state", original)
    resumed = PreferenceTrainer(
        build_tiny_llama(vocab_size=len(tokenizer)),
        args,
        train_dataset=make_pairs(8),
        processing_class=tokenizer,
    )
    resumed.train(resume_from_checkpoint=True)
    assert resumed.state.global_step == 4
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint-")) == [
        "checkpoint-1",
        "checkpoint-2",
        "checkpoint-3",
        "checkpoint-4",
    ]
    assert not (out / ".staging-checkpoint-2").exists()
    for n in range(1, 5):
        assert (out / f"checkpoint-{n}" / "trainer_state.json").is_file()
        assert (out / f"checkpoint-{n}" / "prefkit_state.json").is_file()


def test_save_total_limit_still_rotates(tokenizer, pref_args, make_pairs):
    args = pref_args(max_steps=4, save_strategy="steps", save_steps=1, save_total_limit=2)
    PreferenceTrainer(
        build_tiny_llama(vocab_size=len(tokenizer)),
        args,
        train_dataset=make_pairs(8),
        processing_class=tokenizer,
    ).train()
    names = sorted(p.name for p in Path(args.output_dir).iterdir() if p.is_dir())
    assert names == ["checkpoint-3", "checkpoint-4"]


class NaNAtStep3(PreferenceTrainer):
    """Makes the loss of optimizer step 3 NaN and remembers that batch's example indices."""

    seen = None

    def compute_preference_loss(self, model, inputs, train):
        loss, metrics, per_example = super().compute_preference_loss(model, inputs, train)
        if train and self.state.global_step == 2:
            self.seen = inputs["example_index"].tolist()
            loss, per_example = loss * float("nan"), per_example * float("nan")
        return loss, metrics, per_example


def test_non_finite_loss_stops_before_the_update(tokenizer, pref_args, make_pairs):
    args = pref_args(max_steps=5, save_strategy="steps", save_steps=1, per_device_train_batch_size=2)
    trainer = NaNAtStep3(
        build_tiny_llama(vocab_size=len(tokenizer)),
        args,
        train_dataset=make_pairs(8),
        processing_class=tokenizer,
    )
    with pytest.raises(NonFiniteLossError) as info:
        trainer.train()
    message = str(info.value)
    assert "global step 3" in message
    assert str(trainer.seen) in message
    assert all(f"'p{i}'" in message for i in trainer.seen)
    out = Path(args.output_dir)
    assert (out / "checkpoint-2").is_dir() and not (out / "checkpoint-3").exists()
    assert not list(out.glob(".staging-*"))
    assert trainer.state.global_step == 2
    saved = load_file(str(out / "checkpoint-2" / "model.safetensors"))
    for name, param in trainer.model.state_dict().items():
        if name in saved:
            assert torch.equal(param, saved[name]), name  # no optimizer step after the last checkpoint
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 2


def test_non_finite_weight_in_the_data_names_the_row(tokenizer, pref_args, make_pairs):
    records = make_pairs(4)
    records[2].weight = float("nan")
    args = pref_args(max_steps=2, per_device_train_batch_size=4)
    trainer = PreferenceTrainer(
        build_tiny_llama(vocab_size=len(tokenizer)), args, train_dataset=records, processing_class=tokenizer
    )
    with pytest.raises(NonFiniteLossError, match=r"global step 1") as info:
        trainer.train()
    assert "non-finite at examples [2]" in str(info.value) and "'p2'" in str(info.value)
    assert not math.isnan(trainer.model.model.embed_tokens.weight.sum().item())
