"""precompute_ref_logps: reference log-probs computed once, cached on disk, no reference in memory."""

import gc
import json
import math
import os
import weakref
from pathlib import Path

import pytest
import torch
import transformers

import prefkit.train.trainer as trainer_module
from prefkit.data.collators import PairwiseCollator, UnpairedCollator
from prefkit.models import fingerprint  # the atomic writer the cache uses
from prefkit.models.tiny import build_tiny_llama
from prefkit.train.logps import completion_logps
from prefkit.train.reference_cache import StaleReferenceCacheError, model_hash
from prefkit.train.trainer import PreferenceTrainer

transformers.logging.set_verbosity_error()

SMALL = {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64}


def _model(tokenizer, seed=0):
    return build_tiny_llama(vocab_size=len(tokenizer), seed=seed, **SMALL)


def _losses(out_dir):
    rows = [json.loads(line) for line in Path(out_dir, "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if r["split"] == "train" and "loss" in r}


def _trainer(tokenizer, pref_args, records, out, *, ref_seed=None, precompute=True, eval_records=None, **kw):
    args = pref_args(output_dir=str(out), precompute_ref_logps=precompute, max_steps=3, **kw)
    return PreferenceTrainer(
        _model(tokenizer),
        args,
        train_dataset=records,
        eval_dataset=eval_records,
        processing_class=tokenizer,
        ref_model=None if ref_seed is None else _model(tokenizer, ref_seed),
    )


@pytest.fixture
def count_computes(monkeypatch):
    """How many datasets the reference scored (calls of compute_reference_logps)."""
    calls = []
    real = trainer_module.compute_reference_logps

    def counting(*args, **kwargs):
        calls.append(kwargs["desc"])
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer_module, "compute_reference_logps", counting)
    return calls


# ------------------------------------------------------------------------------------------
# (a) the same training with and without the cache
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("loss", "ref_seed", "extra"),
    [
        ("dpo", None, {}),  # the reference is the initial policy (scored without copying it); with eval data
        ("ld_dpo", 1, {"share_prompt": True}),  # per-token reference values, prefix sharing
        ("bco", 1, {}),  # unpaired: completion sums (and BCO's running shift from them)
    ],
)
def test_training_equals_the_uncached_run(
    tokenizer, pref_args, make_pairs, make_unpaired, tmp_path, loss, ref_seed, extra, count_computes
):
    records = make_unpaired(8) if loss == "bco" else make_pairs(8)
    eval_records = records[:3] if loss == "dpo" else None
    runs = {}
    for precompute in (False, True):
        out = tmp_path / f"pre{precompute}"
        trainer = _trainer(
            tokenizer,
            pref_args,
            records,
            out,
            ref_seed=ref_seed,
            precompute=precompute,
            eval_records=eval_records,
            loss=loss,
            per_device_train_batch_size=2,
            **extra,
        )
        trainer.train()
        params = {k: v.detach().clone() for k, v in trainer.model.named_parameters()}
        eval_loss = trainer.evaluate()["eval_loss"] if eval_records else None
        runs[precompute] = (_losses(out), params, eval_loss, trainer)
    assert count_computes == ["reference log-probs (train)"] + (["reference log-probs (eval)"] if eval_records else [])
    (plain_losses, plain_params, plain_eval, plain), (cached_losses, cached_params, cached_eval, cached) = (
        runs[False],
        runs[True],
    )
    assert sorted(cached_losses) == [1, 2, 3]
    for step, value in plain_losses.items():
        assert cached_losses[step] == pytest.approx(value, abs=1e-6), step
    assert cached_eval == pytest.approx(plain_eval, abs=1e-6)
    initial = dict(_model(tokenizer).named_parameters())
    for name, value in plain_params.items():
        assert (value - initial[name]).abs().max() > 0  # every step updated the weights...
        torch.testing.assert_close(cached_params[name], value, atol=1e-6, rtol=0)  # ...identically
    assert cached.ref_model is None and plain.ref_model is not None
    assert "precomputed" in cached.run_info["reference"]
    files = ["eval.safetensors", "train.safetensors"] if eval_records else ["train.safetensors"]
    assert sorted(os.listdir(tmp_path / "preTrue" / "ref_logps")) == files


def test_cached_values_are_each_rows_reference_logps(tokenizer, pref_args, make_pairs, tmp_path):
    """The columns pair each row with its own values, and a shuffled batch carries its rows' values."""
    ref = _model(tokenizer, seed=1)
    expected_ref = _model(tokenizer, seed=1)
    args = pref_args(output_dir=str(tmp_path / "out"), precompute_ref_logps=True, loss="ld_dpo")
    trainer = PreferenceTrainer(
        _model(tokenizer), args, train_dataset=make_pairs(6), processing_class=tokenizer, ref_model=ref
    )
    data = trainer.train_dataset
    collate = PairwiseCollator(tokenizer.pad_token_id)
    for i in range(len(data)):
        batch = collate([data[i]])
        with torch.no_grad():
            out = completion_logps(
                expected_ref, batch["input_ids"], batch["attention_mask"], batch["completion_mask"], per_token=True
            )
        assert data[i]["ref_chosen_logps"] == pytest.approx(out.sum[0].item(), abs=1e-5)
        assert data[i]["ref_rejected_logps"] == pytest.approx(out.sum[1].item(), abs=1e-5)
        chosen_tokens = out.per_token[0][batch["completion_mask"][0].bool()]
        assert data[i]["ref_chosen_token_logps"] == pytest.approx(chosen_tokens.tolist(), abs=1e-5)

    batch = next(iter(trainer.get_train_dataloader()))  # shuffled
    for row, index in enumerate(batch["example_index"].tolist()):
        assert batch["ref_chosen_logps"][row].item() == data[index]["ref_chosen_logps"]


def test_collators_pass_the_reference_columns_through(tokenizer):
    # prompt [5, 6] + chosen [7, 8, 9]: the chosen row's completion columns are 2, 3, 4;
    # prompt [5, 6] + rejected [7]: column 2 only (row width 5 = the longest row).
    example = {
        "prompt_input_ids": [5, 6],
        "chosen_input_ids": [7, 8, 9],
        "rejected_input_ids": [7],
        "ref_chosen_logps": -1.75,
        "ref_rejected_logps": -0.5,
        "ref_chosen_token_logps": [-0.5, -0.25, -1.0],  # sums to -1.75
        "ref_rejected_token_logps": [-0.5],
    }
    batch = PairwiseCollator(0)([example])
    assert batch["ref_chosen_logps"].tolist() == [-1.75] and batch["ref_rejected_logps"].tolist() == [-0.5]
    assert batch["ref_chosen_token_logps"].tolist() == [[0.0, 0.0, -0.5, -0.25, -1.0]]
    assert batch["ref_rejected_token_logps"].tolist() == [[0.0, 0.0, -0.5, 0.0, 0.0]]
    assert (batch["ref_chosen_token_logps"] != 0).long().tolist() == batch["completion_mask"][:1].tolist()
    with pytest.raises(ValueError, match="2 values for a completion of 3 tokens"):
        PairwiseCollator(0)([{**example, "ref_chosen_token_logps": [-0.5, -0.25]}])

    unpaired = {"prompt_input_ids": [5], "completion_input_ids": [7, 8], "label": True, "ref_completion_logps": -3.0}
    assert UnpairedCollator(0, kl_rows=False)([unpaired])["ref_completion_logps"].tolist() == [-3.0]


# ------------------------------------------------------------------------------------------
# (b) no reference model is held
# ------------------------------------------------------------------------------------------


def test_reference_model_is_dropped_after_precompute(tokenizer, pref_args, make_pairs, tmp_path, monkeypatch):
    ref = _model(tokenizer, seed=1)
    alive = weakref.ref(ref)
    args = pref_args(output_dir=str(tmp_path / "a"), precompute_ref_logps=True)
    trainer = PreferenceTrainer(
        _model(tokenizer), args, train_dataset=make_pairs(4), processing_class=tokenizer, ref_model=ref
    )
    del ref
    gc.collect()
    assert alive() is None and trainer.ref_model is None and trainer.reference_precomputed

    def no_copy(*_a, **_k):
        raise AssertionError("with precompute_ref_logps the initial policy is scored, never copied")

    monkeypatch.setattr(trainer_module, "frozen_copy", no_copy)
    args = pref_args(output_dir=str(tmp_path / "b"), precompute_ref_logps=True)
    trainer = PreferenceTrainer(_model(tokenizer), args, train_dataset=make_pairs(4), processing_class=tokenizer)
    assert trainer.ref_model is None and trainer.model.training  # the policy is back in training mode


def test_lora_reference_hash_is_the_base_models(tokenizer, pref_args, make_pairs, tmp_path):
    from peft import LoraConfig

    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    args = pref_args(output_dir=str(tmp_path), precompute_ref_logps=True, learning_rate=5e-3)
    trainer = PreferenceTrainer(
        _model(tokenizer), args, train_dataset=make_pairs(4), processing_class=tokenizer, peft_config=lora
    )
    assert trainer.ref_from_adapters and trainer.reference_precomputed
    assert model_hash(trainer.model) == model_hash(_model(tokenizer))  # adapters left out, names normalised
    trainer.train()  # B starts at 0: policy == reference, so the first loss is log 2
    assert _losses(args.output_dir)[1] == pytest.approx(math.log(2), abs=1e-6)


# ------------------------------------------------------------------------------------------
# (c) a second run (and a resumed run) loads the cache
# ------------------------------------------------------------------------------------------


def test_second_run_and_resume_load_the_cache(tokenizer, pref_args, make_pairs, tmp_path, count_computes):
    records = make_pairs(8)
    kw = {"save_strategy": "steps", "save_steps": 2, "per_device_train_batch_size": 2}
    first = _trainer(tokenizer, pref_args, records, tmp_path / "run", ref_seed=1, **kw)
    first.train()
    full = _losses(tmp_path / "run")
    assert count_computes == ["reference log-probs (train)"]

    forwards = []
    ref = _model(tokenizer, seed=1)
    ref.get_input_embeddings().register_forward_hook(lambda *_: forwards.append(1))
    args = pref_args(output_dir=str(tmp_path / "run"), precompute_ref_logps=True, max_steps=3, **kw)
    resumed = PreferenceTrainer(
        _model(tokenizer), args, train_dataset=records, processing_class=tokenizer, ref_model=ref
    )
    assert count_computes == ["reference log-probs (train)"] and forwards == []  # loaded, not recomputed
    assert resumed.train_dataset["ref_chosen_logps"] == first.train_dataset["ref_chosen_logps"]
    resumed.train(resume_from_checkpoint=True)  # from checkpoint-2
    assert _losses(tmp_path / "run")[3] == pytest.approx(full[3], abs=1e-6)


# ------------------------------------------------------------------------------------------
# (d) a stale cache is refused
# ------------------------------------------------------------------------------------------


def test_stale_cache_is_refused_naming_what_differs(tokenizer, pref_args, make_pairs, tmp_path, count_computes):
    records = make_pairs(6)
    out = tmp_path / "run"
    _trainer(tokenizer, pref_args, records, out, ref_seed=1)
    cache = out / "ref_logps" / "train.safetensors"
    before = cache.read_bytes()

    changed = list(records)
    changed[2] = type(records[2])(prompt=records[2].prompt, chosen="A different answer.", rejected=records[2].rejected)
    with pytest.raises(StaleReferenceCacheError, match=r"(?s)- data: .*1 of 6 rows .*rows 2\).*Delete .*train"):
        _trainer(tokenizer, pref_args, changed, out, ref_seed=1)
    with pytest.raises(StaleReferenceCacheError, match="computed for 6 rows, this run's train dataset has 5"):
        _trainer(tokenizer, pref_args, records[:5], out, ref_seed=1)

    other_weights = _model(tokenizer, seed=1)
    with torch.no_grad():
        other_weights.lm_head.weight[0, 0] += 1e-3
    args = pref_args(output_dir=str(out), precompute_ref_logps=True)
    with pytest.raises(StaleReferenceCacheError, match="(?s)- reference model: .*reference_cache_dir") as err:
        PreferenceTrainer(
            _model(tokenizer), args, train_dataset=records, processing_class=tokenizer, ref_model=other_weights
        )
    assert "- data" not in str(err.value)

    with pytest.raises(StaleReferenceCacheError, match="per-token"):
        _trainer(tokenizer, pref_args, records, out, ref_seed=1, loss="ld_dpo")

    assert cache.read_bytes() == before and count_computes == ["reference log-probs (train)"]  # never rewritten
    _trainer(tokenizer, pref_args, records, tmp_path / "run2", ref_seed=1, reference_cache_dir=str(out / "ref_logps"))
    assert count_computes == ["reference log-probs (train)"]  # another output_dir reads the same cache

    cache.write_bytes(b"not a cache")
    with pytest.raises(StaleReferenceCacheError, match="not a readable prefkit reference cache"):
        _trainer(tokenizer, pref_args, records, out, ref_seed=1)


# ------------------------------------------------------------------------------------------
# (e) atomic writes
# ------------------------------------------------------------------------------------------


def test_interrupted_write_leaves_no_file(tokenizer, pref_args, make_pairs, tmp_path, monkeypatch):
    real = fingerprint.save_file

    def crash(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(fingerprint, "save_file", crash)
    with pytest.raises(OSError, match="simulated"):
        _trainer(tokenizer, pref_args, make_pairs(4), tmp_path / "run")
    assert os.listdir(tmp_path / "run" / "ref_logps") == []

    monkeypatch.setattr(fingerprint, "save_file", real)
    _trainer(tokenizer, pref_args, make_pairs(4), tmp_path / "run")
    assert os.listdir(tmp_path / "run" / "ref_logps") == ["train.safetensors"]


# ------------------------------------------------------------------------------------------
# Losses the cache cannot serve
# ------------------------------------------------------------------------------------------


def test_kto_and_reference_free_losses_are_refused(tokenizer, pref_args, make_pairs, make_unpaired, tmp_path):
    with pytest.raises(ValueError, match="cannot serve loss kto: .*shuffled batch"):
        _trainer(tokenizer, pref_args, make_unpaired(4), tmp_path, loss="kto")
    with pytest.raises(ValueError, match=r"\(simpo\) is reference-free"):
        _trainer(tokenizer, pref_args, make_pairs(4), tmp_path, loss="simpo")
