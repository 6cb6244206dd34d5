"""PreferenceTrainer on the tiny Llama: the loss it trains, references, LoRA, KTO/BCO."""

import json
import math
from pathlib import Path

import pytest
import torch
import transformers

from prefkit.losses.base import PairLogps
from prefkit.losses.pairwise import dpo
from prefkit.losses.unpaired import kto_kl_estimate
from prefkit.models.tiny import build_tiny_llama
from prefkit.train.logps import completion_logps
from prefkit.train.trainer import PreferenceTrainer

transformers.logging.set_verbosity_error()


def _metrics(out_dir, split="train"):
    lines = Path(out_dir, "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == split]


def _manual_dpo(policy, ref, batch, beta=0.1):
    b = batch["weight"].shape[0]
    args = (batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
    with torch.no_grad():
        pol, rf = completion_logps(policy, *args), completion_logps(ref, *args)
    pair = PairLogps(
        policy_chosen=pol.sum[:b],
        policy_rejected=pol.sum[b:],
        chosen_len=pol.n_tokens[:b],
        rejected_len=pol.n_tokens[b:],
        ref_chosen=rf.sum[:b],
        ref_rejected=rf.sum[b:],
    )
    return (dpo(pair, beta=beta).loss * batch["weight"]).mean().item()


def test_first_step_loss_equals_manual_weighted_dpo(tokenizer, pref_args, make_pairs):
    policy = build_tiny_llama(vocab_size=len(tokenizer), seed=0)
    ref = build_tiny_llama(vocab_size=len(tokenizer), seed=1)  # a different reference: loss != log 2
    records = make_pairs(8, weights=True)
    args = pref_args(max_steps=1, per_device_train_batch_size=8, loss_params={"beta": 0.3})
    trainer = PreferenceTrainer(policy, args, train_dataset=records, processing_class=tokenizer, ref_model=ref)
    batch = next(iter(trainer.get_train_dataloader()))  # the whole dataset: order does not change the mean
    assert batch["input_ids"].shape[0] == 16 and sorted(batch["example_index"].tolist()) == list(range(8))
    expected = _manual_dpo(policy, ref, batch, beta=0.3)
    unweighted = _manual_dpo(policy, ref, {**batch, "weight": torch.ones(8)}, beta=0.3)
    assert abs(expected - math.log(2)) > 1e-3 and abs(expected - unweighted) > 1e-4

    direct = trainer.compute_loss(policy, batch).item()
    assert direct == pytest.approx(expected, abs=1e-5)
    trainer.train()
    (first,) = _metrics(args.output_dir)
    assert first["loss"] == pytest.approx(expected, abs=1e-5)
    for key in (
        "rewards/chosen",
        "rewards/rejected",
        "rewards/margins",
        "rewards/accuracies",
        "logps/chosen",
        "logps/rejected",
        "loss/dpo",
    ):
        assert key in first and math.isfinite(first[key])
    assert first["rewards/margins"] == pytest.approx(first["rewards/chosen"] - first["rewards/rejected"], abs=1e-5)


def test_default_reference_is_a_frozen_copy_of_the_initial_policy(tokenizer, tiny_model, pref_args, make_pairs):
    initial = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    trainer = PreferenceTrainer(
        tiny_model, pref_args(max_steps=3), train_dataset=make_pairs(8), processing_class=tokenizer
    )
    ref = trainer.ref_model
    assert ref is not tiny_model and not ref.training
    assert all(not p.requires_grad for p in ref.parameters())
    trainer.train()
    assert all(torch.equal(initial[k], v) for k, v in ref.state_dict().items())
    assert any(not torch.equal(initial[k], v) for k, v in tiny_model.state_dict().items())
    losses = [r["loss"] for r in _metrics(trainer.args.output_dir)]
    assert losses[0] == pytest.approx(math.log(2), abs=1e-6)  # policy == reference at step 1
    assert losses[-1] < losses[0]


def test_reference_free_loss_creates_no_reference(tokenizer, tiny_model, pref_args, make_pairs, monkeypatch):
    import prefkit.train.trainer as trainer_module

    def no_copy(*_a, **_k):
        raise AssertionError("a reference-free loss must not copy the policy")

    monkeypatch.setattr(trainer_module, "frozen_copy", no_copy)
    args = pref_args(loss="simpo", max_steps=2)
    assert args.reference_free
    trainer = PreferenceTrainer(tiny_model, args, train_dataset=make_pairs(8), processing_class=tokenizer)
    assert trainer.ref_model is None and not trainer.ref_from_adapters and not trainer.needs_reference
    trainer.train()
    rows = _metrics(args.output_dir)
    assert len(rows) == 2 and all(math.isfinite(r["loss"]) for r in rows) and "loss/simpo" in rows[0]

    with pytest.raises(ValueError, match="reference-free"):
        PreferenceTrainer(
            build_tiny_llama(vocab_size=len(tokenizer)),
            args,
            train_dataset=make_pairs(4),
            processing_class=tokenizer,
            ref_model=build_tiny_llama(vocab_size=len(tokenizer)),
        )


def test_lora_reference_is_the_base_model_with_adapters_disabled(tokenizer, pref_args, make_pairs):
    from peft import LoraConfig

    policy = build_tiny_llama(vocab_size=len(tokenizer), seed=0)
    fresh = build_tiny_llama(vocab_size=len(tokenizer), seed=0)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")  # B = 0
    args = pref_args(max_steps=4, learning_rate=5e-3)
    trainer = PreferenceTrainer(policy, args, train_dataset=make_pairs(8), processing_class=tokenizer, peft_config=lora)
    assert trainer.is_peft and trainer.ref_from_adapters and trainer.ref_model is None
    trainer.train()
    losses = [r["loss"] for r in _metrics(args.output_dir)]
    assert losses[0] == pytest.approx(math.log(2), abs=1e-6)  # zero-init B: policy == reference
    assert losses[-1] < losses[0] - 1e-3

    batch = next(iter(trainer.get_eval_dataloader(trainer.train_dataset)))
    cols = (batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
    ref = trainer._ref_logps(trainer.model, *cols, tokens=False).sum
    with torch.no_grad():
        base = completion_logps(fresh, *cols).sum
        pol = completion_logps(trainer.model, *cols).sum
    torch.testing.assert_close(ref, base, atol=1e-5, rtol=0)  # adapters off == untouched base model
    assert (pol - base).abs().max() > 1e-3  # adapters on: trained

    trainer.save_model()  # adapters only; PEFT writes its own README.md, prefkit's card replaces it
    out = Path(args.output_dir)
    assert (out / "adapter_model.safetensors").is_file() and not (out / "model.safetensors").exists()
    card = (out / "README.md").read_text()
    assert "policy with LoRA adapters disabled" in card and "LoRA: r=4" in card


def test_kto_uses_mismatched_kl_rows_and_logs_kl(tokenizer, tiny_model, pref_args, make_unpaired):
    args = pref_args(loss="kto", max_steps=2, per_device_train_batch_size=4)
    trainer = PreferenceTrainer(
        tiny_model,
        args,
        train_dataset=make_unpaired(8),
        processing_class=tokenizer,
        ref_model=build_tiny_llama(vocab_size=len(tokenizer), seed=3),
    )
    batch = next(iter(trainer.get_train_dataloader()))
    assert "kl_input_ids" in batch
    _, metrics, _ = trainer.compute_preference_loss(tiny_model, batch, train=True)
    kl_cols = (batch["kl_input_ids"], batch["kl_attention_mask"], batch["kl_completion_mask"])
    with torch.no_grad():
        expected = kto_kl_estimate(
            completion_logps(tiny_model, *kl_cols).sum, completion_logps(trainer.ref_model, *kl_cols).sum
        )
    assert metrics["kl"].item() == pytest.approx(expected.item(), abs=1e-5)

    trainer.train()
    rows = _metrics(args.output_dir)
    assert len(rows) == 2
    for row in rows:
        assert row["kl"] >= 0 and math.isfinite(row["kl"])
        assert {"rewards/chosen", "rewards/rejected", "rewards/margins", "loss/kto"} <= set(row)


def test_bco_keeps_a_running_reward_shift(tokenizer, tiny_model, pref_args, make_unpaired):
    args = pref_args(loss="bco", max_steps=3, per_device_train_batch_size=4, save_strategy="steps", save_steps=2)
    trainer = PreferenceTrainer(tiny_model, args, train_dataset=make_unpaired(8), processing_class=tokenizer)
    assert "kl_input_ids" not in next(iter(trainer.get_train_dataloader()))
    trainer.train()
    assert trainer.bco_count == 12
    state = json.loads(Path(args.output_dir, "checkpoint-2", "prefkit_state.json").read_text())
    assert state["bco_count"] == 8 and math.isfinite(state["bco_reward_shift"])
    assert all("reward_shift" in r for r in _metrics(args.output_dir))


def test_wrong_record_kind_is_a_clear_error(tokenizer, tiny_model, pref_args, make_unpaired):
    with pytest.raises(ValueError, match="pairwise and need PairwiseRecords"):
        PreferenceTrainer(tiny_model, pref_args(), train_dataset=make_unpaired(4), processing_class=tokenizer)


def test_kto_needs_batches_of_two(tokenizer, tiny_model, pref_args, make_unpaired):
    with pytest.raises(ValueError, match="at least 2"):
        PreferenceTrainer(
            tiny_model,
            pref_args(loss="kto", per_device_train_batch_size=1),
            train_dataset=make_unpaired(4),
            processing_class=tokenizer,
        )


def test_tokenized_dataset_and_eval_accuracy(tokenizer, tiny_model, pref_args, make_pairs):
    from prefkit.data.tokenize import tokenize_records

    dataset, _ = tokenize_records(make_pairs(8), tokenizer, max_length=64, max_prompt_length=32, progress=False)
    args = pref_args(max_steps=3, eval_strategy="steps", eval_steps=3)
    trainer = PreferenceTrainer(
        tiny_model, args, train_dataset=dataset, eval_dataset=dataset, processing_class=tokenizer
    )
    trainer.train()
    (evaluation,) = _metrics(args.output_dir, "eval")
    assert 0.0 <= evaluation["eval_rewards/accuracies"] <= 1.0
    assert evaluation["eval_rewards/accuracies"] > 0.5  # learned the (shared) preference
    assert "rewards/accuracies" not in evaluation and "eval_loss/dpo" in evaluation
    # train windows never contain eval values and vice versa
    assert all(not any(k.startswith("eval_") for k in r) for r in _metrics(args.output_dir))


def test_metrics_are_window_averages(tokenizer, tiny_model, pref_args, make_pairs):
    args = pref_args(max_steps=4, logging_steps=2, per_device_train_batch_size=2)
    trainer = PreferenceTrainer(tiny_model, args, train_dataset=make_pairs(8), processing_class=tokenizer)
    seen = []
    original = trainer._store_metrics

    def spy(metrics, split):
        seen.append(metrics["loss/dpo"].mean().item())
        original(metrics, split)

    trainer._store_metrics = spy
    trainer.train()
    rows = _metrics(args.output_dir)
    assert [r["step"] for r in rows] == [2, 4]
    assert rows[0]["loss/dpo"] == pytest.approx(sum(seen[:2]) / 2, abs=1e-6)
    assert rows[1]["loss/dpo"] == pytest.approx(sum(seen[2:4]) / 2, abs=1e-6)
    assert rows[1]["loss"] == pytest.approx(rows[1]["loss/dpo"], abs=1e-5)


def test_gradient_accumulation_matches_one_big_batch(tokenizer, pref_args, make_pairs, tmp_path):
    logged = {}
    for name, bs, ga in (("big", 4, 1), ("accumulated", 2, 2)):
        args = pref_args(
            output_dir=str(tmp_path / name),
            max_steps=2,
            per_device_train_batch_size=bs,
            gradient_accumulation_steps=ga,
        )
        PreferenceTrainer(
            build_tiny_llama(vocab_size=len(tokenizer), seed=0),
            args,
            train_dataset=make_pairs(8),
            processing_class=tokenizer,
        ).train()
        logged[name] = _metrics(args.output_dir)
    for big, acc in zip(logged["big"], logged["accumulated"]):
        for key in ("loss", "grad_norm", "rewards/margins"):
            assert acc[key] == pytest.approx(big[key], abs=1e-5), key


def test_best_checkpoint_by_eval_reward_accuracy(tokenizer, tiny_model, pref_args, make_pairs):
    args = pref_args(
        max_steps=4,
        eval_strategy="steps",
        eval_steps=2,
        save_strategy="steps",
        save_steps=2,
        load_best_model_at_end=True,
        metric_for_best_model="rewards/margins",
        greater_is_better=True,
    )
    trainer = PreferenceTrainer(
        tiny_model, args, train_dataset=make_pairs(8), eval_dataset=make_pairs(4), processing_class=tokenizer
    )
    trainer.train()
    best = Path(trainer.state.best_model_checkpoint)
    assert best.parent == Path(args.output_dir) and best.name in ("checkpoint-2", "checkpoint-4") and best.is_dir()
    saved = json.loads((best / "trainer_state.json").read_text())
    assert saved["best_model_checkpoint"] == str(best)  # the published path, never the staging one


def test_batch_coupled_loss_refuses_per_example_weights(tokenizer, tiny_model, pref_args, make_pairs):
    """AOT sorts over the batch, so loss[i] is not pair i's: weights other than 1 are refused."""
    trainer = PreferenceTrainer(
        tiny_model, pref_args(loss="aot_pair"), train_dataset=make_pairs(8, weights=True), processing_class=tokenizer
    )
    with pytest.raises(ValueError, match="sorts over the batch"):
        trainer.train()


def test_batch_coupled_loss_trains_without_weights(tokenizer, tiny_model, pref_args, make_pairs):
    trainer = PreferenceTrainer(
        tiny_model, pref_args(loss="aot"), train_dataset=make_pairs(8), processing_class=tokenizer
    )
    trainer.train()
    assert trainer.state.global_step == 2
