"""Padding-free packing: several units per row give the unpacked log-probs and gradients.

A unit is ``[prompt][chosen]`` or ``[prompt][rejected]`` (without ``share_prompt``) or
``[prompt][chosen][rejected]`` (with it). `shared_prefix_logps` on rows that pack several units
(`pack_shared_rows(..., packing=True)`) must equal `completion_logps` on the unpacked ``[2B, T]``
rows of `pad_rows` (sums, token counts, per-token values, logsumsq, and all their gradients) on a
tiny Llama with eager and sdpa attention, in one row or in rows of a token budget; and a DPO
`PreferenceTrainer` run must not depend on ``packing``.
"""

from __future__ import annotations

import inspect

import pytest
import torch

from prefkit.data.collators import PairwiseCollator, pack_shared_rows
from prefkit.models.tiny import build_tiny_llama
from prefkit.train import logps as logps_module
from prefkit.train.config import ConfigError
from prefkit.train.logps import completion_logps, shared_prefix_logps, shared_prefix_mask

# Completions of at most 8 tokens over a 64-token vocabulary keep every summed log-prob below 64 in
# magnitude (8 * log 64 = 33 for a uniform model), where float32 still resolves 4e-6 < TOL.
TOL = 1e-5
VOCAB = 64
PAD = 0


def tiny(attn: str, dtype=torch.float32):
    model = build_tiny_llama(
        vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, attn_implementation=attn
    )
    assert model.config._attn_implementation == attn
    return model.to(dtype)


def random_pairs(b: int, seed: int = 0):
    """``b`` pairwise examples: prompts of 1..9 tokens, chosen / rejected of 1..8 tokens (ids 3..63)."""
    g = torch.Generator().manual_seed(seed)

    def ids(lo, hi):
        n = int(torch.randint(lo, hi + 1, (), generator=g))
        return torch.randint(3, VOCAB, (n,), generator=g).tolist()

    return [
        {"prompt_input_ids": ids(1, 9), "chosen_input_ids": ids(1, 8), "rejected_input_ids": ids(1, 8)}
        for _ in range(b)
    ]


def run_packed(model, batch, **kwargs):
    return shared_prefix_logps(
        model,
        batch["input_ids"],
        batch["position_ids"],
        batch["segment_ids"],
        batch["completion_rows"],
        batch["completion_mask"],
        **kwargs,
    )


def run_unpacked(model, batch, **kwargs):
    return completion_logps(model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"], **kwargs)


def objective(out, w_sum, w_tok):
    """A scalar that reaches every output: weighted sums plus weighted per-token values."""
    return (out.sum * w_sum).sum() + (out.per_token * w_tok).sum()


def padding_share(batch) -> float:
    ids = batch["input_ids"]
    real = batch["segment_ids"] >= 0 if "segment_ids" in batch else batch["attention_mask"].bool()
    return 1.0 - real.sum().item() / ids.numel()


# ------------------------------------------------------------------------- collator

EXAMPLES = [
    {"prompt_input_ids": [5, 6, 7], "chosen_input_ids": [8, 2], "rejected_input_ids": [9, 9, 2]},
    {"prompt_input_ids": [4], "chosen_input_ids": [10, 11, 12, 2], "rejected_input_ids": [2], "margin": 1.5},
]


def test_packing_puts_every_sequence_in_one_row():
    batch = PairwiseCollator(PAD, packing=True, packing_max_tokens=64)(EXAMPLES)
    # Units [5 6 7][8 2] (chosen 0), [4][10 11 12 2] (chosen 1), [5 6 7][9 9 2] (rejected 0), [4][2]
    # (rejected 1): 18 tokens in one row of 64, longest first (ties in order).
    assert batch["input_ids"].tolist() == [[5, 6, 7, 9, 9, 2, 5, 6, 7, 8, 2, 4, 10, 11, 12, 2, 4, 2]]
    # Positions restart at 0 on every unit's prompt and run on through its completion.
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 1]]
    assert batch["segment_ids"].tolist() == [[0, 0, 0, 1, 1, 1, 0, 0, 0, 1, 1, 0, 1, 1, 1, 1, 0, 1]]
    assert batch["completion_rows"].tolist() == [[2], [0], [1], [3]]  # each unit's unpacked row, in row order
    assert torch.equal(batch["completion_mask"], PairwiseCollator(PAD)(EXAMPLES)["completion_mask"])
    assert batch["margin"].tolist() == [0.0, 1.5] and "attention_mask" not in batch


def test_default_budget_is_the_longest_unit():
    # packing_max_tokens=None: rows no wider than the longest unit (6 tokens), so nothing is wider
    # than the padded batch; here no two units fit together and each keeps a row.
    batch = PairwiseCollator(PAD, packing=True)(EXAMPLES)
    assert batch["input_ids"].tolist() == [
        [5, 6, 7, 9, 9, 2],
        [5, 6, 7, 8, 2, 0],
        [4, 10, 11, 12, 2, 0],
        [4, 2, 0, 0, 0, 0],
    ]
    assert batch["completion_rows"].tolist() == [[2], [0], [1], [3]]


def test_packing_shared_units_into_rows_of_a_token_budget():
    batch = PairwiseCollator(PAD, share_prompt=True, packing=True, packing_max_tokens=8)(EXAMPLES)
    # Units [5 6 7][8 2][9 9 2] (8 tokens) and [4][10 11 12 2][2] (6): 14 > 8, so two rows.
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 2, 9, 9, 2], [4, 10, 11, 12, 2, 2, 0, 0]]
    assert batch["completion_rows"].tolist() == [[0, 2], [1, 3]]
    one_row = PairwiseCollator(PAD, share_prompt=True, packing=True, packing_max_tokens=14)(EXAMPLES)
    assert one_row["input_ids"].shape == (1, 14) and one_row["segment_ids"][0, 8:].tolist() == [0, 1, 1, 1, 1, 2]
    assert torch.equal(one_row["completion_mask"], batch["completion_mask"])


def test_first_fit_by_decreasing_length():
    # Units of 6, 2, 5, 3 tokens into rows of 8: [6, 2] and [5, 3] (the longest first, each where it fits).
    prompts = [[3] * 5, [4], [5] * 4, [6] * 2]
    completions = [[[7]], [[8]], [[9]], [[10]]]
    batch = pack_shared_rows(prompts, completions, [[0], [1], [2], [3]], PAD, None, packing=True, max_tokens=8)
    assert batch["input_ids"].shape == (2, 8) and padding_share(batch) == 0.0
    assert batch["completion_rows"].tolist() == [[0], [1], [2], [3]]
    # Rows of 5: the 6-token unit, longer than the budget, gets a row of its own; then [5] and [3, 2].
    rows = pack_shared_rows(prompts, completions, [[0], [1], [2], [3]], PAD, None, packing=True, max_tokens=5)
    assert [int((row >= 0).sum()) for row in rows["segment_ids"]] == [6, 5, 5]
    assert rows["completion_rows"].tolist() == [[0], [2], [3], [1]]  # units in order of appearance


def test_units_need_a_prompt_and_a_completion():
    with pytest.raises(ValueError, match="unit 1 .*prompt token and a completion token"):
        pack_shared_rows([[5], []], [[[6]], [[7]]], [[0], [1]], PAD, None, packing=True)
    with pytest.raises(ValueError, match="packing_max_tokens"):
        PairwiseCollator(PAD, packing_max_tokens=16)


def test_padding_share_is_near_zero():
    examples = random_pairs(8, seed=3)
    unpacked = PairwiseCollator(PAD)(examples)
    packed = PairwiseCollator(PAD, packing=True, packing_max_tokens=1000)(examples)
    budget = PairwiseCollator(PAD, packing=True, packing_max_tokens=64)(examples)
    # 166 real tokens; unpacked: 16 rows of 15 = 240 positions, 74 of them padding (31 %).
    assert int(unpacked["attention_mask"].sum()) == 166 and unpacked["input_ids"].shape == (16, 15)
    assert padding_share(unpacked) == pytest.approx(74 / 240)
    assert int((packed["segment_ids"] >= 0).sum()) == 166  # the same tokens, none lost
    assert padding_share(packed) == 0.0  # one row of exactly the real tokens
    # Rows of 64: 64 + 62 + 40 = 166 real tokens; only the last row is part-full: 26 / 192 padding.
    assert [int((row >= 0).sum()) for row in budget["segment_ids"]] == [64, 62, 40]
    assert padding_share(budget) == pytest.approx(26 / 192)


# ------------------------------------------------------------------------- mask


def test_block_mask_keeps_units_apart():
    # Two units [p][c] [p p][c c] in one row, then padding: the second unit sees nothing of the first.
    segment_ids = torch.tensor([[0, 1, 0, 0, 1, 1, -1]])
    visible = shared_prefix_mask(segment_ids, torch.bool)[0, 0]
    assert visible.int().tolist() == [
        [1, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0],
        [0, 0, 1, 0, 0, 0, 0],
        [0, 0, 1, 1, 0, 0, 0],
        [0, 0, 1, 1, 1, 0, 0],
        [0, 0, 1, 1, 1, 1, 0],
        [0, 0, 0, 0, 0, 0, 1],  # padding sees only itself
    ]
    additive = shared_prefix_mask(segment_ids, torch.float32)[0, 0]
    assert torch.equal(additive == 0, visible)


# ------------------------------------------------------------------------- values and gradients


def assert_same(model, unpacked_batch, packed_batch):
    plain = run_unpacked(model, unpacked_batch, per_token=True, logsumsq=True)
    packed = run_packed(model, packed_batch, per_token=True, logsumsq=True)
    assert torch.equal(packed.n_tokens, plain.n_tokens)
    torch.testing.assert_close(packed.sum, plain.sum, atol=TOL, rtol=0)
    torch.testing.assert_close(packed.per_token, plain.per_token, atol=TOL, rtol=0)
    torch.testing.assert_close(packed.logsumsq, plain.logsumsq, atol=TOL, rtol=0)

    g = torch.Generator().manual_seed(1)
    w_sum, w_tok = torch.randn(plain.sum.shape, generator=g), torch.randn(plain.per_token.shape, generator=g)
    params = [p for p in model.parameters() if p.requires_grad]
    g_plain = torch.autograd.grad(objective(plain, w_sum, w_tok), params, allow_unused=True)
    g_packed = torch.autograd.grad(objective(packed, w_sum, w_tok), params, allow_unused=True)
    for a, b in zip(g_plain, g_packed):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(b, a, atol=TOL, rtol=0)


@pytest.mark.parametrize("max_tokens", [None, 24])
@pytest.mark.parametrize("share", [False, True])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_values_and_gradients_match_unpacked_rows(attn, share, max_tokens):
    model = tiny(attn)
    examples = random_pairs(5, seed=2)
    packed = PairwiseCollator(PAD, share_prompt=share, packing=True, packing_max_tokens=max_tokens)(examples)
    if max_tokens is not None:
        assert packed["input_ids"].shape[0] > 1  # several rows, several units in some
    assert_same(model, PairwiseCollator(PAD)(examples), packed)


def test_float64_is_exact_to_rounding():
    """In float64 the packed and unpacked rows agree to ~1e-12: the packing computes the same function."""
    model = tiny("sdpa", torch.float64)
    examples = random_pairs(6, seed=5)
    plain = run_unpacked(model, PairwiseCollator(PAD)(examples), per_token=True)
    packed = run_packed(model, PairwiseCollator(PAD, packing=True, packing_max_tokens=1000)(examples), per_token=True)
    torch.testing.assert_close(packed.per_token, plain.per_token, atol=1e-10, rtol=0)


def test_position_ids_alone_delimit_units(monkeypatch):
    """The flash-attention path on CPU: all units in one row, no mask, only position_ids.

    flash-attention needs a GPU; here sdpa stands in for it, taking the engine's flash-attention
    inputs (``_is_flash`` patched to say yes): given no attention mask, transformers builds the
    causal mask of packed sequences from where ``position_ids`` restart, as the flash-attention
    varlen kernels take them. Checks the engine's one-row flattening and indexing, not the kernel.
    """
    model = tiny("sdpa")
    seen = []
    monkeypatch.setattr(logps_module, "_is_flash", lambda impl: True)
    model.register_forward_pre_hook(lambda module, args, kwargs: seen.append(sorted(kwargs)), with_kwargs=True)
    examples = random_pairs(5, seed=4)
    packed = PairwiseCollator(PAD, packing=True, packing_max_tokens=20)(examples)
    assert packed["input_ids"].shape[0] > 1  # flattened into one row by the engine
    assert_same(model, PairwiseCollator(PAD)(examples), packed)
    assert ["input_ids", "position_ids", "use_cache"] in seen  # the packed pass and probe: no mask


# ------------------------------------------------------------------------- errors and the probe


def test_flash_attention_refuses_shared_prompts():
    model = tiny("sdpa")
    model.model.config._attn_implementation = "flash_attention_2"
    packed = PairwiseCollator(PAD, share_prompt=True, packing=True)(random_pairs(2))
    with pytest.raises(NotImplementedError, match="share_prompt.*flash_attention_2.*packing alone works"):
        run_packed(model, packed)


def test_other_attention_implementations_are_refused():
    model = tiny("sdpa")
    model.model.config._attn_implementation = "flex_attention"
    packed = PairwiseCollator(PAD, packing=True)(random_pairs(2))
    with pytest.raises(NotImplementedError, match="packing.*'flex_attention'"):
        run_packed(model, packed)


def test_models_without_position_ids_are_refused(monkeypatch):
    model = tiny("sdpa")

    def forward(input_ids=None, attention_mask=None, **kwargs):  # no position_ids parameter
        raise AssertionError("not reached")

    monkeypatch.setattr(model, "forward", forward)
    assert "position_ids" not in inspect.signature(model.forward).parameters
    with pytest.raises(NotImplementedError, match="position_ids"):
        run_packed(model, PairwiseCollator(PAD, packing=True)(random_pairs(2)))


def test_probe_catches_a_mask_that_lets_units_see_each_other(monkeypatch):
    model = tiny("eager")
    packed = PairwiseCollator(PAD, packing=True, packing_max_tokens=1000)(random_pairs(2, seed=3))

    def without_units(segment_ids, dtype):  # wrong: causal over the whole row, units not kept apart
        n = segment_ids.shape[1]
        visible = torch.ones(n, n, dtype=torch.bool).tril().expand(segment_ids.shape[0], 1, n, n)
        return torch.zeros(visible.shape, dtype=dtype).masked_fill_(~visible, torch.finfo(dtype).min)

    monkeypatch.setattr(logps_module, "shared_prefix_mask", without_units)
    with pytest.raises(NotImplementedError, match="packing.*different next-token distributions"):
        run_packed(model, packed)


def test_layouts_the_engine_cannot_read_are_refused():
    model = tiny("sdpa")
    packed = PairwiseCollator(PAD, packing=True, packing_max_tokens=64)(EXAMPLES)
    bad = dict(packed, position_ids=torch.arange(packed["input_ids"].shape[1])[None])  # no restart per unit
    with pytest.raises(ValueError, match="position_ids"):
        run_packed(model, bad)
    bad = dict(packed, completion_rows=packed["completion_rows"][:3])  # 4 units in the row
    with pytest.raises(ValueError, match="U = 4"):
        run_packed(model, bad)


# ------------------------------------------------------------------------- config and trainer


def test_config_checks_packing(pref_args):
    with pytest.raises(ConfigError, match="packing_max_tokens is set but packing is false"):
        pref_args(packing_max_tokens=64)
    with pytest.raises(ConfigError, match="packing.*'unpaired'"):
        pref_args(loss="kto", packing=True)


@pytest.mark.parametrize(
    ("share", "max_tokens", "precompute"), [(False, 1000, False), (True, 80, False), (False, 40, True)]
)
def test_dpo_steps_match_with_and_without_packing(
    share, max_tokens, precompute, tokenizer, pref_args, make_pairs, tmp_path
):
    """2 DPO + WPO steps (sums, per-token log-probs and logsumsq, policy and reference, the reference
    scored in each step or precomputed), sdpa."""
    from prefkit.train.trainer import PreferenceTrainer

    def train(packing: bool):
        model = build_tiny_llama(
            vocab_size=len(tokenizer), hidden_size=16, num_layers=2, intermediate_size=32, attn_implementation="sdpa"
        )
        args = pref_args(
            output_dir=str(tmp_path / f"packing-{packing}"),
            max_steps=2,
            per_device_train_batch_size=3,
            loss=["dpo", "wpo"],
            share_prompt=share and packing,
            packing=packing,
            packing_max_tokens=max_tokens if packing else None,
            precompute_ref_logps=precompute,
        )
        trainer = PreferenceTrainer(model, args, train_dataset=make_pairs(6), processing_class=tokenizer)
        batch = next(iter(trainer.get_train_dataloader()))
        rows.append(batch["input_ids"].shape[0])
        trainer.train()
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        return losses, dict(model.named_parameters())

    rows = []

    losses_off, params_off = train(False)
    losses_on, params_on = train(True)
    # 3 pairs: 6 padded rows unpacked; packed, one row (a budget of 1000), or 2+ rows of a small budget.
    assert rows[0] == 6 and (rows[1] == 1 if max_tokens == 1000 else rows[1] > 1)
    assert len(losses_on) == 2
    assert losses_on == pytest.approx(losses_off, abs=TOL, rel=0)
    for name, value in params_off.items():
        torch.testing.assert_close(params_on[name], value, atol=TOL, rtol=0, msg=name)
