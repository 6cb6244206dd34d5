"""TDPO through the trainer: the reference scores the batch first, the policy's pass adds the per-token KL."""

import json
from pathlib import Path

import pytest
import torch

from prefkit.cli import main
from prefkit.train.config import ConfigError
from prefkit.train.trainer import PreferenceTrainer


def test_tdpo2_in_the_trainer_is_dpo_without_its_kl_term(tokenizer, tiny_model, pref_args, make_pairs):
    records = make_pairs(4)
    losses = {}
    for name, params in (("dpo", {}), ("tdpo2", {"alpha": 0.0}), ("tdpo2", {})):
        args = pref_args(loss=name, loss_params=params)
        trainer = PreferenceTrainer(tiny_model, args, train_dataset=records, processing_class=tokenizer)
        batch = next(iter(trainer.get_train_dataloader()))
        with torch.no_grad():
            loss, metrics, _ = trainer.compute_preference_loss(trainer.model, batch, train=True)
        losses[(name, bool(params))] = loss.item()
        if name == "tdpo2" and not params:
            # the policy starts as the reference: every token's KL is 0
            assert metrics["kl/chosen"].abs().max().item() < 1e-6
    assert losses[("tdpo2", True)] == pytest.approx(losses[("dpo", False)], rel=1e-6)


def test_prefkit_train_tdpo(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(Path(__file__).resolve().parents[2])
    base = ["train", "examples/dpo_tiny.yaml", "max_steps=3", "eval_strategy=no", "save_strategy=no"]
    out = tmp_path / "tdpo"
    assert main([*base, "loss=tdpo2", "loss_params={}", f"output_dir={out}"]) == 0
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    kl = [m[k] for m in metrics for k in m if k.endswith("kl/rejected")]
    assert kl and all(x >= 0 for x in kl) and max(kl) > 0  # the policy moved off the reference
    capsys.readouterr()
    assert main([*base, "loss=tdpo1", "loss_params={}", "share_prompt=true", f"output_dir={tmp_path / 'x'}"]) == 2
    assert "share_prompt: expected false for tdpo1" in capsys.readouterr().err


def test_tdpo_refuses_layouts_without_a_live_reference(pref_args):
    with pytest.raises(ConfigError, match="precompute_ref_logps: tdpo2 read the reference"):
        pref_args(loss="tdpo2", precompute_ref_logps=True)
