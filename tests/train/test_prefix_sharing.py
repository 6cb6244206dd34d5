"""Prefix sharing: packed ``[prompt][completion 1]...[completion K]`` rows give the unshared log-probs.

`shared_prefix_logps` on the packed rows of `pack_shared_rows` must equal `completion_logps` on the
``B * K`` unshared rows of `pad_rows` (sums, token counts, per-token values, WPO's logsumsq, and the
gradients of all of them), for tiny Llama / Qwen2 (grouped-query attention, q/k/v biases) models with
eager and sdpa attention; and a 3-step `PreferenceTrainer` run must not depend on ``share_prompt``.
"""

from __future__ import annotations

import pytest
import torch
from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

from prefkit.data.collators import ListCollator, PairwiseCollator, pack_shared_rows, pad_rows
from prefkit.models.tiny import build_tiny_llama
from prefkit.train import logps as logps_module
from prefkit.train.logps import completion_logps, shared_prefix_logps, shared_prefix_mask

# Completions of at most 8 tokens over a 64-token vocabulary keep every summed log-prob below 64 in
# magnitude (8 * log 64 = 33 for a uniform model), where float32 still resolves 4e-6 < TOL.
TOL = 1e-5
VOCAB = 64
PAD = 0


def tiny(arch: str, attn: str, dtype=torch.float32):
    if arch == "llama":
        model = build_tiny_llama(
            vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, attn_implementation=attn
        )
    else:
        config = Qwen2Config(
            vocab_size=VOCAB,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=64,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = Qwen2ForCausalLM._from_config(config, attn_implementation=attn)
    assert model.config._attn_implementation == attn
    return model.to(dtype)


def random_examples(b: int, k: int, seed: int = 0):
    """``b`` prompts of 1..9 tokens, each with ``k`` completions of 1..8 tokens (ids 3..63)."""
    g = torch.Generator().manual_seed(seed)

    def ids(lo, hi):
        n = int(torch.randint(lo, hi + 1, (), generator=g))
        return torch.randint(3, VOCAB, (n,), generator=g).tolist()

    prompts = [ids(1, 9) for _ in range(b)]
    completions = [[ids(1, 8) for _ in range(k)] for _ in range(b)]
    return prompts, completions


def both_layouts(prompts, completions):
    """The unshared ``[B*K, T]`` rows (completion-major: row ``k*B + b``) and the packed rows."""
    b, k = len(prompts), len(completions[0])
    rows = [[j * b + i for j in range(k)] for i in range(b)]
    flat_prompts = [prompts[i] for j in range(k) for i in range(b)]
    flat_completions = [completions[i][j] for j in range(k) for i in range(b)]
    return pad_rows(flat_prompts, flat_completions, PAD, None), pack_shared_rows(prompts, completions, rows, PAD, None)


def run_both(model, unshared, packed):
    plain = completion_logps(
        model,
        unshared["input_ids"],
        unshared["attention_mask"],
        unshared["completion_mask"],
        per_token=True,
        logsumsq=True,
    )
    return plain, run_shared(model, packed)


def run_shared(model, packed):
    return shared_prefix_logps(
        model,
        packed["input_ids"],
        packed["position_ids"],
        packed["segment_ids"],
        packed["completion_rows"],
        packed["completion_mask"],
        per_token=True,
        logsumsq=True,
    )


def objective(out, w_sum, w_tok):
    """A scalar that reaches every output: weighted sums plus weighted per-token values."""
    return (out.sum * w_sum).sum() + (out.per_token * w_tok).sum()


# ------------------------------------------------------------------------- collators


def test_pairwise_collator_packs_each_prompt_once():
    examples = [
        {"prompt_input_ids": [5, 6, 7], "chosen_input_ids": [8, 2], "rejected_input_ids": [9, 9, 2]},
        {"prompt_input_ids": [4], "chosen_input_ids": [10, 11, 12, 2], "rejected_input_ids": [2], "margin": 1.5},
    ]
    batch = PairwiseCollator(PAD, share_prompt=True)(examples)
    # Row 0 = [5 6 7][8 2][9 9 2] (8 tokens); row 1 = [4][10 11 12 2][2] (6 tokens) + 2 pads.
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 2, 9, 9, 2], [4, 10, 11, 12, 2, 2, 0, 0]]
    # Each completion restarts where its prompt ends (positions 3.. and 1..).
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 3, 4, 5], [0, 1, 2, 3, 4, 1, 0, 0]]
    assert batch["segment_ids"].tolist() == [[0, 0, 0, 1, 1, 2, 2, 2], [0, 1, 1, 1, 1, 2, -1, -1]]
    # Chosen rows 0..1, rejected rows 2..3, as in the unshared batch.
    assert batch["completion_rows"].tolist() == [[0, 2], [1, 3]]
    assert torch.equal(batch["completion_mask"], PairwiseCollator(PAD)(examples)["completion_mask"])
    assert batch["margin"].tolist() == [0.0, 1.5] and batch["weight"].tolist() == [1.0, 1.0]
    assert "attention_mask" not in batch


def test_list_collator_packs_record_major_with_spare_rows():
    examples = [
        {"prompt_input_ids": [5, 6], "completions_input_ids": [[7], [8, 2], [9, 9, 2]], "ranking": [1, 0, 2]},
        {"prompt_input_ids": [4], "completions_input_ids": [[10, 2], [11]], "ranking": [0, 1]},
    ]
    batch = ListCollator(PAD, share_prompt=True, pad_to_multiple_of=4)(examples)
    unshared = ListCollator(PAD, pad_to_multiple_of=4)(examples)
    # Example 1 has 2 of K = 3 completions: its spare third row repeats completion 0, [10 2].
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 2, 9, 9, 2], [4, 10, 2, 11, 10, 2, 0, 0]]
    assert batch["segment_ids"][1].tolist() == [0, 1, 1, 2, 3, 3, -1, -1]
    assert batch["completion_rows"].tolist() == [[0, 1, 2], [3, 4, 5]]
    assert torch.equal(batch["completion_mask"], unshared["completion_mask"])  # [6, 8]: widths 5 -> 8
    assert torch.equal(batch["ranking"], unshared["ranking"]) and torch.equal(batch["levels"], unshared["levels"])


def test_block_mask_hides_other_completions():
    # [p p][c1 c1][c2][pad]: c2 (position 4) sees the prompt and itself, not c1.
    segment_ids = torch.tensor([[0, 0, 1, 1, 2, -1]])
    visible = shared_prefix_mask(segment_ids, torch.bool)[0, 0]
    additive = shared_prefix_mask(segment_ids, torch.float32)[0, 0]  # eager's form: 0 or finfo.min
    assert torch.equal(additive == 0, visible) and bool((additive[~visible] == torch.finfo(torch.float32).min).all())
    assert visible.int().tolist() == [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 0, 0],
        [1, 1, 0, 0, 1, 0],
        [0, 0, 0, 0, 0, 1],  # padding sees only itself: no empty softmax row
    ]


# ------------------------------------------------------------------------- values and gradients


@pytest.mark.parametrize("k", [2, 4])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_values_and_gradients_match_unshared_rows(arch, attn, k):
    model = tiny(arch, attn)
    unshared, packed = both_layouts(*random_examples(3, k, seed=k))
    plain, shared = run_both(model, unshared, packed)

    assert torch.equal(shared.n_tokens, plain.n_tokens)
    torch.testing.assert_close(shared.sum, plain.sum, atol=TOL, rtol=0)
    torch.testing.assert_close(shared.per_token, plain.per_token, atol=TOL, rtol=0)
    torch.testing.assert_close(shared.logsumsq, plain.logsumsq, atol=TOL, rtol=0)
    assert shared.per_token[unshared["completion_mask"] == 0].abs().max() == 0  # the unshared layout

    g = torch.Generator().manual_seed(1)
    w_sum, w_tok = torch.randn(plain.sum.shape, generator=g), torch.randn(plain.per_token.shape, generator=g)
    params = [p for p in model.parameters() if p.requires_grad]
    g_plain = torch.autograd.grad(objective(plain, w_sum, w_tok), params, allow_unused=True)
    g_shared = torch.autograd.grad(objective(shared, w_sum, w_tok), params, allow_unused=True)
    for a, b in zip(g_plain, g_shared):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(b, a, atol=TOL, rtol=0)


def test_float64_is_exact_to_rounding():
    """In float64 the two layouts agree to ~1e-12: the packing computes the same function."""
    model = tiny("llama", "sdpa", torch.float64)
    unshared, packed = both_layouts(*random_examples(4, 3, seed=7))
    plain, shared = run_both(model, unshared, packed)
    torch.testing.assert_close(shared.per_token, plain.per_token, atol=1e-10, rtol=0)
    torch.testing.assert_close(shared.sum, plain.sum, atol=1e-10, rtol=0)


# ------------------------------------------------------------------------- errors


def test_attention_without_4d_masks_is_refused():
    model = tiny("llama", "sdpa")
    model.model.config._attn_implementation = "flash_attention_2"
    _, packed = both_layouts(*random_examples(2, 2))
    with pytest.raises(NotImplementedError, match="share_prompt.*flash_attention_2"):
        run_shared(model, packed)


def test_rows_longer_than_a_sliding_window_are_refused():
    config = MistralConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=4,
        intermediate_size=64,
        sliding_window=4,
    )
    model = MistralForCausalLM._from_config(config, attn_implementation="sdpa")
    _, packed = both_layouts([[5, 6, 7]], [[[8, 9], [10]]])  # longest row: 3 + 2 = 5 > 4
    with pytest.raises(NotImplementedError, match="sliding window"):
        run_shared(model, packed)


def test_probe_catches_a_mask_that_lets_completions_see_each_other(monkeypatch):
    model = tiny("llama", "eager")
    _, packed = both_layouts(*random_examples(2, 2, seed=3))

    def plain_causal(segment_ids, dtype):  # wrong: completion 2 also attends to completion 1
        return shared_prefix_mask(torch.where(segment_ids > 0, 1, segment_ids), dtype)

    monkeypatch.setattr(logps_module, "shared_prefix_mask", plain_causal)
    with pytest.raises(NotImplementedError, match="share_prompt"):
        run_shared(model, packed)


def test_inconsistent_position_ids_are_refused():
    model = tiny("llama", "sdpa")
    _, packed = both_layouts(*random_examples(2, 2))
    packed["position_ids"] = torch.arange(packed["input_ids"].shape[1]).expand_as(packed["input_ids"])
    with pytest.raises(ValueError, match="position_ids"):
        run_shared(model, packed)


# ------------------------------------------------------------------------- trainer


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_trainer_runs_match_with_and_without_sharing(attn, tokenizer, pref_args, make_pairs, tmp_path):
    """3 steps of dpo + ld_dpo + wpo (sums, per-token log-probs and logsumsq, policy and reference)."""
    from prefkit.train.trainer import PreferenceTrainer

    def train(share: bool):
        model = build_tiny_llama(
            vocab_size=len(tokenizer), hidden_size=16, num_layers=2, intermediate_size=32, attn_implementation=attn
        )
        args = pref_args(
            output_dir=str(tmp_path / f"share-{share}"),
            max_steps=3,
            per_device_train_batch_size=2,
            loss=["dpo", "ld_dpo", "wpo"],
            share_prompt=share,
        )
        trainer = PreferenceTrainer(model, args, train_dataset=make_pairs(6), processing_class=tokenizer)
        trainer.train()
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        return losses, dict(model.named_parameters())

    losses_off, params_off = train(False)
    losses_on, params_on = train(True)
    assert len(losses_on) == 3
    assert losses_on == pytest.approx(losses_off, abs=TOL, rel=0)
    for name, value in params_off.items():
        torch.testing.assert_close(params_on[name], value, atol=TOL, rtol=0, msg=name)


def test_trainer_refuses_share_prompt_for_unpaired_losses(tokenizer, tiny_model, pref_args, make_unpaired):
    from prefkit.train.trainer import PreferenceTrainer

    with pytest.raises(ValueError, match="share_prompt"):
        PreferenceTrainer(
            tiny_model,
            pref_args(loss="kto", share_prompt=True),
            train_dataset=make_unpaired(4),
            processing_class=tokenizer,
        )
