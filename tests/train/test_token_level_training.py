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


def test_sparsepo_trains_its_masks_with_the_policy_and_resumes_exactly(tmp_path, monkeypatch):
    """The learned mask is a submodule of the policy while training (optimizer, checkpoints), saved beside the final
    model; a run resumed from its checkpoint ends where the uninterrupted run ends."""
    from safetensors.torch import load_file

    from prefkit.models.loading import load_policy

    monkeypatch.chdir(Path(__file__).resolve().parents[2])
    base = ["train", "examples/dpo_tiny.yaml", "loss=sparsepo", "loss_params={independent: true}", "eval_strategy=no"]
    base += ["save_strategy=steps", "save_steps=2", "disable_tqdm=true", "logging_steps=1"]
    full, part = tmp_path / "full", tmp_path / "part"
    assert main([*base, "max_steps=4", f"output_dir={full}"]) == 0
    assert main([*base, "max_steps=2", f"output_dir={part}"]) == 0
    assert main([*base, "max_steps=4", f"output_dir={part}", "--resume"]) == 0
    mask_full, mask_part = load_file(full / "token_mask.safetensors"), load_file(part / "token_mask.safetensors")
    assert set(mask_full) == set(mask_part) and any(k.startswith("kl.") for k in mask_full)  # independent: two nets
    for key in mask_full:
        assert torch.allclose(mask_full[key], mask_part[key], atol=1e-6), key
    initial = load_file(full / "checkpoint-2" / "model.safetensors")
    assert any(k.startswith("prefkit_token_mask.") for k in initial)  # checkpoints carry the mask
    assert not torch.equal(initial["prefkit_token_mask.reward.mixer.weight"], mask_full["reward.mixer.weight"])
    policy = load_policy(str(full))  # the final model is the policy alone
    assert not hasattr(policy, "prefkit_token_mask")
    metrics = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines()]
    assert any("mask/reward_sparsity" in m for m in metrics)


def test_mapo_in_the_trainer_and_token_mask_refusals(tokenizer, tiny_model, pref_args, make_pairs, capsys):
    trainer = PreferenceTrainer(
        tiny_model, pref_args(loss="mapo", loss_params={}), train_dataset=make_pairs(4), processing_class=tokenizer
    )
    batch = next(iter(trainer.get_train_dataloader()))
    with torch.no_grad():
        loss, metrics, _ = trainer.compute_preference_loss(trainer.model, batch, train=True)
    assert torch.isfinite(loss) and 0 < metrics["mask/reward_mean"].mean().item() <= 1
    assert not hasattr(trainer.model, "prefkit_token_mask")  # activation masks train nothing
    with pytest.raises(ConfigError, match="at most one token-mask loss"):
        pref_args(loss=["sparsepo", "mapo"])
    monkeypatch_root = Path(__file__).resolve().parents[2]
    argv = ["train", str(monkeypatch_root / "examples/dpo_tiny.yaml"), "loss=sparsepo", "lora_r=8"]
    assert main(argv) == 2
    assert "lora_r: expected 0 for sparsepo" in capsys.readouterr().err
