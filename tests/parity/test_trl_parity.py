"""Parity with TRL 1.16: prefkit's first-step loss and logged metrics equal TRL's.

For every objective TRL also implements (its DPO ``loss_type``s and options, KTO, CPO/SimPO,
ORPO), the same tiny model, data and settings go through TRL's trainer (``trl_harness``) and
through prefkit's own pipeline (``tokenize_records`` -> collator -> ``completion_logps`` ->
registered loss / ``combine_losses``), and the batch loss and the logged metrics must agree within
1e-4 relative (1e-6 absolute floor). Where prefkit deliberately differs from TRL (and documents it
in the loss docstring), the test reproduces TRL's number through the documented transformation and
*asserts* the difference on the plain value, so a change on either side is noticed. The full
mapping and the known differences are in ``docs/parity.md``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from trl_harness import (
    PAIRS,
    build_models,
    build_tokenizer,
    trl_cpo,
    trl_dpo,
    trl_kto,
    trl_orpo,
    unpaired_records,
)

from prefkit.data.collators import PairwiseCollator, UnpairedCollator
from prefkit.data.records import PairwiseRecord, UnpairedRecord
from prefkit.data.tokenize import tokenize_records
from prefkit.losses import PairLogps, UnpairedLogps
from prefkit.losses.combine import combine_losses
from prefkit.losses.unpaired import kto_kl_estimate
from prefkit.train.logps import completion_logps

RTOL = 1e-4
ATOL = 1e-6
BETA = 0.3

REWARD_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")


def assert_close(actual: float, expected: float, what: str) -> None:
    actual, expected = float(actual), float(expected)
    tol = max(RTOL * abs(expected), ATOL)
    assert abs(actual - expected) <= tol, (
        f"{what}: prefkit {actual!r} vs TRL {expected!r} (|diff| {abs(actual - expected):.3g} > tol {tol:.3g})"
    )


def assert_differs(actual: float, expected: float, what: str) -> None:
    """A documented known difference: the plain prefkit value must NOT equal TRL's."""
    actual, expected = float(actual), float(expected)
    tol = max(RTOL * abs(expected), ATOL)
    assert abs(actual - expected) > tol, (
        f"{what}: documented as differing from TRL, but prefkit {actual!r} == TRL {expected!r}; "
        "if prefkit now matches TRL, update the docstring, this test and docs/parity.md"
    )


# ------------------------------------------------------------------------------------------------
# shared fixtures: one tokenizer, one (policy, reference) pair, one dataset, TRL runs cached per config


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture(scope="module")
def tok_nobos():
    return build_tokenizer(bos=False)


@pytest.fixture(scope="module")
def models(tok):
    return build_models(len(tok))


@pytest.fixture(scope="module")
def trl_runs(models, tok, tok_nobos, tmp_path_factory):
    """Lazily built, cached TRL runs: ``trl_runs(kind, **config)`` -> ``TrlRun``."""
    policy, ref = models
    cache: dict[Any, Any] = {}
    workdir = str(tmp_path_factory.mktemp("trl"))

    def run(kind: str, swap: bool = False, **config):
        key = (kind, swap, repr(sorted(config.items())))
        if key not in cache:
            pol, rf = (ref, policy) if swap else (policy, ref)
            if kind == "dpo":
                cache[key] = trl_dpo(pol, rf, tok, PAIRS, workdir, **config)
            elif kind == "kto":
                cache[key] = trl_kto(pol, rf, tok, unpaired_records(), workdir, **config)
            elif kind == "cpo":
                cache[key] = trl_cpo(pol, tok_nobos, PAIRS, workdir, **config)
            elif kind == "orpo":
                cache[key] = trl_orpo(pol, tok_nobos, PAIRS, workdir, **config)
            else:
                raise ValueError(kind)
        return cache[key]

    return run


def _logps(model, batch, **kw):
    """Loss values only: no gradients needed (the end-to-end tests below cover the training path)."""
    with torch.no_grad():
        return completion_logps(model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"], **kw)


@dataclass
class PairSide:
    examples: list[dict[str, Any]]
    batch: dict[str, torch.Tensor]
    logps: PairLogps  # full batch with per-token tensors
    policy_sum: torch.Tensor  # [2B]
    ref_sum: torch.Tensor  # [2B]


@pytest.fixture(scope="module")
def pk_pairs(models, tok):
    """prefkit side for the pairwise losses: tokenize, collate, score policy and reference."""
    policy, ref = models
    records = [PairwiseRecord(**row) for row in PAIRS]
    dataset, _ = tokenize_records(records, tok, progress=False)
    examples = [dataset[i] for i in range(len(dataset))]
    batch = PairwiseCollator(pad_token_id=tok.pad_token_id)(examples)
    pi = _logps(policy, batch, per_token=True, logsumsq=True)
    rf = _logps(ref, batch, per_token=True)
    n = len(examples)
    mask = batch["completion_mask"].to(pi.sum.dtype)
    b = PairLogps(
        policy_chosen=pi.sum[:n],
        policy_rejected=pi.sum[n:],
        chosen_len=pi.n_tokens[:n],
        rejected_len=pi.n_tokens[n:],
        ref_chosen=rf.sum[:n],
        ref_rejected=rf.sum[n:],
        policy_chosen_tokens=pi.per_token[:n],
        policy_rejected_tokens=pi.per_token[n:],
        ref_chosen_tokens=rf.per_token[:n],
        ref_rejected_tokens=rf.per_token[n:],
        chosen_mask=mask[:n],
        rejected_mask=mask[n:],
        chosen_logsumsq=pi.logsumsq[:n],
        rejected_logsumsq=pi.logsumsq[n:],
    )
    return PairSide(examples, batch, b, pi.sum, rf.sum)


def _reference_free(b: PairLogps) -> PairLogps:
    return PairLogps(
        policy_chosen=b.policy_chosen,
        policy_rejected=b.policy_rejected,
        chosen_len=b.chosen_len,
        rejected_len=b.rejected_len,
    )


def _token_weighted(values: torch.Tensor, lengths: torch.Tensor) -> float:
    """TRL's batch token-mean, rebuilt from per-sequence means (sft/cpo/orpo docstrings)."""
    return float((values * lengths).sum() / lengths.sum())


def _reduce(out, names, weights, b: PairLogps) -> float:
    """Reduce a ``combine_losses`` output the way TRL reduces: each component's batch mean, except
    ``sft``, whose TRL counterpart is a token mean over the batch (documented in ``sft``)."""
    total = 0.0
    for name, w in zip(names, weights):
        comp = out.metrics[f"loss/{name}"]
        red = _token_weighted(comp, b.chosen_len) if name == "sft" else float(comp.mean())
        total += w * red
    return total


# ------------------------------------------------------------------------------------------------
# data: token ids and batches identical to TRL's


def test_pairwise_token_ids_match_trl(trl_runs, pk_pairs):
    trl = trl_runs("dpo", beta=BETA)
    for i, (ours, theirs) in enumerate(zip(pk_pairs.examples, trl.examples)):
        assert ours["prompt_input_ids"] == theirs["prompt_ids"], f"row {i} prompt"
        assert ours["chosen_input_ids"] == theirs["chosen_ids"], f"row {i} chosen"
        assert ours["rejected_input_ids"] == theirs["rejected_ids"], f"row {i} rejected"
    for key in ("input_ids", "attention_mask", "completion_mask"):
        assert torch.equal(pk_pairs.batch[key].long(), trl.batch[key].long()), key


def test_legacy_trainers_see_the_same_tokens(trl_runs):
    """CPO/ORPO (legacy tokenization) with a BOS-less tokenizer build the same sequences as DPO."""
    dpo = trl_runs("dpo", beta=BETA)
    cpo = trl_runs("cpo", beta=BETA)
    for i, (d, c) in enumerate(zip(dpo.examples, cpo.examples)):
        assert c["chosen_input_ids"] == d["prompt_ids"] + d["chosen_ids"], f"row {i}"
        assert c["rejected_input_ids"] == d["prompt_ids"] + d["rejected_ids"], f"row {i}"
        assert c["chosen_labels"][len(d["prompt_ids"]) :] == d["chosen_ids"], f"row {i}"


def test_logps_match_trl(trl_runs, pk_pairs):
    """``completion_logps`` sums equal TRL's fused-LM-head sums, per sequence, policy and reference."""
    trl = trl_runs("dpo", beta=BETA)
    trl_pi = trl.policy_outputs[0]["log_probs"].sum(dim=1)
    trl_ref = trl.ref_outputs[0]["log_probs"].sum(dim=1)
    for i in range(trl_pi.shape[0]):
        assert_close(pk_pairs.policy_sum[i], trl_pi[i], f"policy logp row {i}")
        assert_close(pk_pairs.ref_sum[i], trl_ref[i], f"reference logp row {i}")
    n = len(PAIRS)
    assert_close(pk_pairs.policy_sum[:n].mean(), trl.metrics["logps/chosen"], "logps/chosen")
    assert_close(pk_pairs.policy_sum[n:].mean(), trl.metrics["logps/rejected"], "logps/rejected")


# ------------------------------------------------------------------------------------------------
# DPOTrainer loss types


@dataclass(frozen=True)
class DpoCase:
    id: str
    trl: dict[str, Any]
    names: tuple[str, ...]
    params: dict[str, Any]
    weights: tuple[float, ...] | None = None
    rewards: bool = True  # does the first prefkit loss log the pairwise reward metrics?
    logps: bool = True  # are TRL's logps/* the plain summed log-probs?


EPS_CDPO = 0.2
DPO_CASES = [
    DpoCase("dpo", {"loss_type": ["sigmoid"], "beta": BETA}, ("dpo",), {"beta": BETA}),
    DpoCase("hinge", {"loss_type": ["hinge"], "beta": BETA}, ("hinge",), {"beta": BETA}),
    DpoCase("ipo", {"loss_type": ["ipo"], "beta": BETA}, ("ipo",), {"beta": BETA}),
    DpoCase(
        "exo",
        {"loss_type": ["exo_pair"], "beta": BETA, "label_smoothing": 1e-2},
        ("exo",),
        {"beta": BETA, "label_smoothing": 1e-2},
    ),
    DpoCase("nca", {"loss_type": ["nca_pair"], "beta": BETA}, ("nca",), {"beta": BETA}),
    DpoCase(
        "robust_dpo",
        {"loss_type": ["robust"], "beta": BETA, "label_smoothing": 0.15},
        ("robust_dpo",),
        {"beta": BETA, "label_smoothing": 0.15},
    ),
    DpoCase(  # TRL 1.16 has no cDPO; the docstring's exact combination of two TRL losses
        "cdpo",
        {
            "loss_type": ["sigmoid", "robust"],
            "loss_weights": [2 * (1 - EPS_CDPO), -(1 - 2 * EPS_CDPO)],
            "beta": BETA,
            "label_smoothing": EPS_CDPO,
        },
        ("cdpo",),
        {"beta": BETA, "label_smoothing": EPS_CDPO},
    ),
    DpoCase("bco_pair", {"loss_type": ["bco_pair"], "beta": BETA}, ("bco_pair",), {"beta": BETA}),
    DpoCase("sppo_hard", {"loss_type": ["sppo_hard"], "beta": BETA}, ("sppo_hard",), {"beta": BETA}),
    DpoCase(  # TRL's "aot" is the paired form = prefkit's aot_pair
        "aot_pair",
        {"loss_type": ["aot"], "beta": BETA, "label_smoothing": 0.1},
        ("aot_pair",),
        {"beta": BETA, "label_smoothing": 0.1},
    ),
    DpoCase(  # TRL's "aot_unpaired" = prefkit's aot (the paper's headline, unpaired form)
        "aot",
        {"loss_type": ["aot_unpaired"], "beta": BETA, "label_smoothing": 0.1},
        ("aot",),
        {"beta": BETA, "label_smoothing": 0.1},
    ),
    DpoCase("apo_zero", {"loss_type": ["apo_zero"], "beta": BETA}, ("apo_zero",), {"beta": BETA}),
    DpoCase("apo_down", {"loss_type": ["apo_down"], "beta": BETA}, ("apo_down",), {"beta": BETA}),
    DpoCase(
        "discopop",
        {"loss_type": ["discopop"], "beta": BETA, "discopop_tau": 0.1},
        ("discopop",),
        {"beta": BETA, "tau": 0.1},
    ),
    DpoCase(
        "length_normalized_dpo",
        {"loss_type": ["sigmoid_norm"], "beta": 3.0},
        ("length_normalized_dpo",),
        {"beta": 3.0},
    ),
    DpoCase("sft", {"loss_type": ["sft"], "beta": BETA}, ("sft",), {}, rewards=False),
    DpoCase(
        "f_dpo-forward_kl",
        {"loss_type": ["sigmoid"], "beta": BETA, "f_divergence_type": "forward_kl"},
        ("f_dpo",),
        {"beta": BETA, "divergence": "forward_kl"},
    ),
    DpoCase(
        "f_dpo-js_divergence",
        {"loss_type": ["sigmoid"], "beta": BETA, "f_divergence_type": "js_divergence"},
        ("f_dpo",),
        {"beta": BETA, "divergence": "js_divergence"},
    ),
    DpoCase(  # opposite parameterisation: prefkit alpha = 1 - TRL f_alpha_divergence_coef
        "f_dpo-alpha_divergence",
        {
            "loss_type": ["sigmoid"],
            "beta": BETA,
            "f_divergence_type": "alpha_divergence",
            "f_alpha_divergence_coef": 0.7,
        },
        ("f_dpo",),
        {"beta": BETA, "divergence": "alpha_divergence", "alpha": 0.3},
    ),
    DpoCase(  # TRL logs logps/* of the LD-weighted log-probs
        "ld_dpo",
        {"loss_type": ["sigmoid"], "beta": BETA, "ld_alpha": 0.4},
        ("ld_dpo",),
        {"beta": BETA, "alpha": 0.4},
        logps=False,
    ),
    DpoCase("wpo", {"loss_type": ["sigmoid"], "beta": BETA, "use_weighting": True}, ("wpo",), {"beta": BETA}),
    DpoCase(  # RPO
        "dpo+sft",
        {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 0.5], "beta": BETA},
        ("dpo", "sft"),
        {"beta": BETA},
        weights=(1.0, 0.5),
    ),
    DpoCase(  # MPO-style three-way mix
        "dpo+bco_pair+sft",
        {"loss_type": ["sigmoid", "bco_pair", "sft"], "loss_weights": [0.8, 0.2, 1.0], "beta": BETA},
        ("dpo", "bco_pair", "sft"),
        {"beta": BETA},
        weights=(0.8, 0.2, 1.0),
    ),
]


@pytest.mark.parametrize("case", DPO_CASES, ids=[c.id for c in DPO_CASES])
def test_dpo_trainer_parity(case: DpoCase, trl_runs, pk_pairs):
    trl = trl_runs("dpo", **case.trl)
    b = pk_pairs.logps
    weights = case.weights or (1.0,) * len(case.names)
    out = combine_losses(b, list(case.names), list(weights), case.params)
    assert_close(_reduce(out, case.names, weights, b), trl.loss, f"{case.id}: loss")
    if case.rewards:
        for key in REWARD_METRICS:
            assert_close(out.metrics[key].mean(), trl.metrics[key], f"{case.id}: {key}")
    if case.logps:
        assert_close(b.policy_chosen.mean(), trl.metrics["logps/chosen"], f"{case.id}: logps/chosen")
        assert_close(b.policy_rejected.mean(), trl.metrics["logps/rejected"], f"{case.id}: logps/rejected")


def test_sft_plain_mean_is_a_documented_difference(trl_runs, pk_pairs):
    """``sft`` is a per-sequence mean (documented); TRL's ``sft`` is a token mean over the batch.
    With completions of different lengths the plain batch mean must differ from TRL's value."""
    trl = trl_runs("dpo", loss_type=["sft"], beta=BETA)
    out = combine_losses(pk_pairs.logps, ["sft"])
    assert len(set(pk_pairs.logps.chosen_len.tolist())) > 1
    assert_differs(out.loss.mean(), trl.loss, "sft: plain mean of per-sequence NLL")
    assert_close(_token_weighted(out.loss, pk_pairs.logps.chosen_len), trl.loss, "sft: token-weighted")


def test_ld_dpo_rewards_use_weighted_logps(trl_runs, pk_pairs):
    """TRL's logps/* under ``ld_alpha`` are the LD-weighted sums; rebuild them from per-token logps."""
    alpha = 0.4
    trl = trl_runs("dpo", loss_type=["sigmoid"], beta=BETA, ld_alpha=alpha)
    b = pk_pairs.logps
    shared = torch.minimum(b.chosen_mask.sum(1), b.rejected_mask.sum(1))

    def weighted(tokens, mask):
        pos = torch.cumsum(mask, dim=1)
        head = (pos <= shared[:, None]).to(tokens.dtype) * mask
        return (tokens * head).sum(1) + alpha * (tokens * (mask - head)).sum(1)

    assert_close(weighted(b.policy_chosen_tokens, b.chosen_mask).mean(), trl.metrics["logps/chosen"], "logps/chosen")
    assert_close(
        weighted(b.policy_rejected_tokens, b.rejected_mask).mean(),
        trl.metrics["logps/rejected"],
        "logps/rejected",
    )


def test_length_dpo_has_no_trl_counterpart(trl_runs, pk_pairs):
    """R-DPO (``length_dpo``) is not in TRL 1.16. Check it against the paper's formula applied to
    TRL's own log-probs, and that ``alpha=0`` is TRL's ``sigmoid``."""
    alpha = 0.02
    trl = trl_runs("dpo", loss_type=["sigmoid"], beta=BETA)
    n = len(PAIRS)
    lp = trl.policy_outputs[0]["log_probs"].sum(1)
    rp = trl.ref_outputs[0]["log_probs"].sum(1)
    lens = trl.batch["completion_mask"].sum(1).to(lp.dtype)
    h = (lp[:n] - rp[:n]) - (lp[n:] - rp[n:])
    paper = -torch.nn.functional.logsigmoid(BETA * h + alpha * (lens[:n] - lens[n:])).mean()
    out = combine_losses(pk_pairs.logps, ["length_dpo"], params={"beta": BETA, "alpha": alpha})
    assert_close(out.loss.mean(), paper, "length_dpo vs paper form on TRL's log-probs")
    out0 = combine_losses(pk_pairs.logps, ["length_dpo"], params={"beta": BETA, "alpha": 0.0})
    assert_close(out0.loss.mean(), trl.loss, "length_dpo(alpha=0) vs TRL sigmoid")


# ------------------------------------------------------------------------------------------------
# KTO


@dataclass
class UnpairedSide:
    examples: list[dict[str, Any]]
    batch: dict[str, torch.Tensor]
    logps: dict[str, torch.Tensor]  # "a"/"b": logps under policy-model / ref-model on the main rows
    kl: dict[str, torch.Tensor]  # same on the collator's kl rows (prompt i, completion (i - 1) % B, as TRL)
    label: torch.Tensor
    length: torch.Tensor


@pytest.fixture(scope="module")
def pk_unpaired(models, tok):
    policy, ref = models
    records = [UnpairedRecord(**row) for row in unpaired_records()]
    dataset, _ = tokenize_records(records, tok, progress=False)
    examples = [dataset[i] for i in range(len(dataset))]
    batch = UnpairedCollator(pad_token_id=tok.pad_token_id)(examples)
    kl_batch = {key: batch[f"kl_{key}"] for key in ("input_ids", "attention_mask", "completion_mask")}
    main, kl = {}, {}
    for name, model in (("a", policy), ("b", ref)):
        main[name] = _logps(model, batch).sum
        kl[name] = _logps(model, kl_batch).sum
    length = _logps(ref, batch).n_tokens
    return UnpairedSide(examples, batch, main, kl, batch["label"].bool(), length)


def test_unpaired_token_ids_match_trl(trl_runs, pk_unpaired):
    trl = trl_runs("kto", beta=BETA)
    for i, (ours, theirs) in enumerate(zip(pk_unpaired.examples, trl.examples)):
        assert ours["prompt_input_ids"] == theirs["prompt_ids"], f"row {i} prompt"
        assert ours["completion_input_ids"] == theirs["completion_ids"], f"row {i} completion"
        assert bool(ours["label"]) == bool(theirs["label"]), f"row {i} label"
    for key in ("input_ids", "attention_mask", "completion_mask"):
        assert torch.equal(pk_unpaired.batch[key].long(), trl.batch[key].long()), key


KTO_CASES = [
    # policy = perturbed copy: TRL's KL estimate is negative and clamps to z0 = 0
    pytest.param(False, {"beta": BETA, "desirable_weight": 1.2, "undesirable_weight": 0.8}, id="kto-z0_clamped"),
    # roles swapped: z0 > 0, so the KL path is exercised
    pytest.param(True, {"beta": BETA, "desirable_weight": 1.2, "undesirable_weight": 0.8}, id="kto-z0_positive"),
]


def _kto_batch(side: UnpairedSide, swap: bool) -> UnpairedLogps:
    """z0 from prefkit's own KL rows (``UnpairedCollator``), as ``PreferenceTrainer`` computes it."""
    pol, ref = ("b", "a") if swap else ("a", "b")
    z0 = kto_kl_estimate(side.kl[pol], side.kl[ref])
    return UnpairedLogps(
        policy=side.logps[pol], ref=side.logps[ref], label=side.label, length=side.length, ref_point=z0
    )


@pytest.mark.parametrize("swap, config", KTO_CASES)
def test_kto_parity(swap, config, trl_runs, pk_unpaired):
    trl = trl_runs("kto", swap=swap, **config)
    b = _kto_batch(pk_unpaired, swap)
    params = {k: config[k] for k in ("beta", "desirable_weight", "undesirable_weight")}
    out = combine_losses(b, ["kto"], params=params)
    assert_close(b.ref_point, trl.metrics["kl"], "kl (z0)")
    if swap:
        assert float(b.ref_point) > 0.01, "this case must exercise a positive z0"
    else:
        assert float(b.ref_point) == 0.0
    assert_close(out.loss.mean(), trl.loss, "kto: loss")
    rewards, label = out.metrics["rewards"], b.label
    assert_close(rewards[label].mean(), trl.metrics["rewards/chosen"], "rewards/chosen")
    assert_close(rewards[~label].mean(), trl.metrics["rewards/rejected"], "rewards/rejected")
    assert_close(rewards[label].mean() - rewards[~label].mean(), trl.metrics["rewards/margins"], "rewards/margins")
    assert_close(b.policy[label].mean(), trl.metrics["logps/chosen"], "logps/chosen")
    assert_close(b.policy[~label].mean(), trl.metrics["logps/rejected"], "logps/rejected")


def test_apo_zero_unpaired_is_kto_without_reference_point(trl_runs, pk_unpaired):
    """TRL's ``KTOConfig(loss_type="apo_zero_unpaired")`` has no KL term: chosen ``1 - sigma(beta r)``,
    rejected ``sigma(beta r)``. That is prefkit's ``kto`` with ``ref_point = 0`` (for the rejected term,
    ``1 - sigma(beta * (0 - r)) = sigma(beta r)``). Run on the swapped models, where KTO's own z0 is
    positive, so the two would differ if the reference point were not dropped."""
    config = {"beta": BETA, "desirable_weight": 1.2, "undesirable_weight": 0.8}
    trl = trl_runs("kto", swap=True, loss_type="apo_zero_unpaired", **config)
    side = pk_unpaired
    b = UnpairedLogps(
        policy=side.logps["b"],
        ref=side.logps["a"],
        label=side.label,
        length=side.length,
        ref_point=torch.tensor(0.0),
    )
    out = combine_losses(b, ["kto"], params=config)
    assert_close(out.loss.mean(), trl.loss, "apo_zero_unpaired: loss")
    rewards = out.metrics["rewards"]
    assert_close(rewards[b.label].mean(), trl.metrics["rewards/chosen"], "rewards/chosen")
    assert_close(rewards[~b.label].mean(), trl.metrics["rewards/rejected"], "rewards/rejected")
    with_z0 = _kto_batch(side, True)
    assert float(with_z0.ref_point) > 0.01
    assert_differs(combine_losses(with_z0, ["kto"], params=config).loss.mean(), trl.loss, "kto with z0 > 0")


def test_kto_kl_rows_match_trl(trl_runs, pk_unpaired):
    """prefkit's ``UnpairedCollator`` builds TRL 1.16's KL rows (prompt ``i`` + the completion of
    example ``(i - 1) % B``, docs/architecture.md §3), so z0 from prefkit's own rows is TRL's ``kl``,
    and the KTO loss agrees on the swapped models, where z0 > 0."""
    side = pk_unpaired
    ex = side.examples
    n = len(ex)
    config = {"beta": BETA, "desirable_weight": 1.2, "undesirable_weight": 0.8}
    trl = trl_runs("kto", swap=True, **config)
    for key in ("input_ids", "attention_mask", "completion_mask"):
        ours, theirs = side.batch[f"kl_{key}"].long(), trl.batch[f"KL_{key}"].long()
        assert ours.shape == theirs.shape, f"kl_{key}: shape {tuple(ours.shape)} vs TRL {tuple(theirs.shape)}"
        for i in range(n):
            assert ours[i].tolist() == theirs[i].tolist(), f"kl_{key} row {i}"
    for i in range(n):  # and that pairing is (i - 1) % B, not merely some pairing both happen to share
        want = ex[i]["prompt_input_ids"] + ex[(i - 1) % n]["completion_input_ids"]
        assert side.batch["kl_input_ids"][i, : len(want)].tolist() == want, f"kl row {i}"
    b = _kto_batch(side, True)
    assert float(b.ref_point) > 0.01, "this case must exercise a positive z0"
    assert_close(b.ref_point, trl.metrics["kl"], "kto z0 from prefkit's own kl rows")
    out = combine_losses(b, ["kto"], params=config)
    assert_close(out.loss.mean(), trl.loss, "kto loss with z0 from prefkit's own kl rows")


# ------------------------------------------------------------------------------------------------
# CPO / SimPO (trl.experimental.cpo)


def _cpo_nll_token_mean(out, b: PairLogps, name: str = "cpo") -> float:
    key = "nll_loss" if name == "cpo" else f"{name}/nll_loss"
    return _token_weighted(out.metrics[key], b.chosen_len)


CPO_ALPHA = 0.5


def test_cpo_sigmoid_parity(trl_runs, pk_pairs):
    """CPO = cpo; TRL's NLL is a batch token mean, rebuilt as the ``cpo`` docstring prescribes."""
    cfg = {"loss_type": "sigmoid", "beta": BETA, "cpo_alpha": CPO_ALPHA, "label_smoothing": 0.1}
    trl = trl_runs("cpo", **cfg)
    b = _reference_free(pk_pairs.logps)
    out = combine_losses(b, ["cpo"], params={"beta": BETA, "cpo_alpha": CPO_ALPHA, "label_smoothing": 0.1})
    nll = out.metrics["nll_loss"]
    trl_form = float((out.loss - CPO_ALPHA * nll).mean()) + CPO_ALPHA * _token_weighted(nll, b.chosen_len)
    assert_close(trl_form, trl.loss, "cpo: loss (TRL reduction)")
    assert_differs(out.loss.mean(), trl.loss, "cpo: plain mean (per-sequence NLL)")
    assert_close(_token_weighted(nll, b.chosen_len), trl.metrics["nll_loss"], "cpo: nll_loss")
    for key in REWARD_METRICS:
        assert_close(out.metrics[key].mean(), trl.metrics[key], f"cpo: {key}")
    assert_close(b.policy_chosen.mean(), trl.metrics["logps/chosen"], "cpo: logps/chosen")
    assert_close(b.policy_rejected.mean(), trl.metrics["logps/rejected"], "cpo: logps/rejected")


def test_simpo_parity(trl_runs, pk_pairs):
    """SimPO = CPOTrainer(loss_type="simpo", cpo_alpha=0); prefkit takes gamma as gamma / beta."""
    beta, gamma = 2.5, 1.5
    trl = trl_runs("cpo", loss_type="simpo", beta=beta, simpo_gamma=gamma, cpo_alpha=0.0, label_smoothing=0.05)
    b = _reference_free(pk_pairs.logps)
    params = {"beta": beta, "gamma_beta_ratio": gamma / beta, "label_smoothing": 0.05}
    out = combine_losses(b, ["simpo"], params=params)
    assert_close(out.loss.mean(), trl.loss, "simpo: loss")
    for key in REWARD_METRICS:
        assert_close(out.metrics[key].mean(), trl.metrics[key], f"simpo: {key}")
    assert_close((b.policy_chosen / b.chosen_len).mean(), trl.metrics["logps/chosen"], "simpo: logps/chosen")
    assert_close((b.policy_rejected / b.rejected_len).mean(), trl.metrics["logps/rejected"], "simpo: logps/rejected")


def test_cpo_simpo_parity(trl_runs, pk_pairs):
    """CPO-SimPO (TRL's simpo with cpo_alpha > 0) = simpo + cpo_alpha * sft, sft token-weighted."""
    beta, gamma = 2.5, 1.5
    trl = trl_runs("cpo", loss_type="simpo", beta=beta, simpo_gamma=gamma, cpo_alpha=CPO_ALPHA)
    b = _reference_free(pk_pairs.logps)
    names, weights = ["simpo", "sft"], [1.0, CPO_ALPHA]
    out = combine_losses(b, names, weights, {"simpo": {"beta": beta, "gamma_beta_ratio": gamma / beta}})
    assert_close(_reduce(out, names, weights, b), trl.loss, "cpo-simpo: loss")
    assert_close(_token_weighted(out.metrics["loss/sft"], b.chosen_len), trl.metrics["nll_loss"], "nll_loss")


@pytest.mark.parametrize("loss_type", ["hinge", "ipo"])
def test_cpo_hinge_ipo_by_composition(loss_type, trl_runs, pk_pairs):
    """TRL's CPO ``hinge`` / ``ipo`` have no registered prefkit loss of their own; they are prefkit's
    ``hinge`` / ``ipo`` with a zero reference (CPO drops the reference) plus ``cpo_alpha * sft``."""
    trl = trl_runs("cpo", loss_type=loss_type, beta=BETA, cpo_alpha=CPO_ALPHA)
    full = pk_pairs.logps
    zero = torch.zeros_like(full.policy_chosen)
    b = PairLogps(
        policy_chosen=full.policy_chosen,
        policy_rejected=full.policy_rejected,
        chosen_len=full.chosen_len,
        rejected_len=full.rejected_len,
        ref_chosen=zero,
        ref_rejected=zero,
    )
    names, weights = [loss_type, "sft"], [1.0, CPO_ALPHA]
    out = combine_losses(b, names, weights, {loss_type: {"beta": BETA}})
    assert_close(_reduce(out, names, weights, b), trl.loss, f"cpo-{loss_type}: loss")


# ------------------------------------------------------------------------------------------------
# ORPO (trl.experimental.orpo)


def test_orpo_parity(trl_runs, pk_pairs):
    """Odds-ratio term, rewards and log-odds metrics equal TRL's. The NLL term is a documented
    difference (TRL: prompt + chosen tokens, batch token mean; prefkit: the paper's response-only
    NLL, per sequence): it is checked against the paper form computed from TRL's own logits, and
    TRL's total is rebuilt from prefkit's odds-ratio term plus TRL's own NLL."""
    beta = 0.25
    trl = trl_runs("orpo", beta=beta)
    b = _reference_free(pk_pairs.logps)
    out = combine_losses(b, ["orpo"], params={"beta": beta})
    m = out.metrics
    for key in REWARD_METRICS + ("log_odds_ratio", "log_odds_chosen"):
        assert_close(m[key].mean(), trl.metrics[key], f"orpo: {key}")
    assert_close((b.policy_chosen / b.chosen_len).mean(), trl.metrics["logps/chosen"], "orpo: logps/chosen")
    # odds-ratio part of the loss + TRL's NLL = TRL's total
    assert_close(float((out.loss - m["nll_loss"]).mean()) + trl.metrics["nll_loss"], trl.loss, "orpo: loss")
    assert_close((out.loss - m["nll_loss"]).mean(), -beta * m["log_odds_ratio"].mean(), "orpo: OR term")

    # NLL: the paper form (response tokens only, per-sequence mean) from TRL's own logits
    logits = trl.policy_outputs[0]["logits"]
    ids = trl.batch["chosen_input_ids"]
    labels = trl.batch["chosen_labels"]
    n = ids.shape[0]
    logp = torch.log_softmax(logits[:n, :-1].float(), -1)
    tgt = labels[:, 1:]
    mask = tgt != -100
    tok_lp = logp.gather(-1, tgt.clamp(min=0)[..., None])[..., 0] * mask
    paper_nll = -(tok_lp.sum(1) / mask.sum(1)).mean()
    assert_close(m["nll_loss"].mean(), paper_nll, "orpo: nll_loss vs paper form on TRL's logits")
    # TRL's own NLL (prompt + chosen tokens) from the same logits: a known, asserted difference
    full_mask = trl.batch["chosen_attention_mask"][:, 1:].bool()
    full_lp = logp.gather(-1, ids[:, 1:, None])[..., 0]
    trl_nll = -(full_lp * full_mask).sum() / full_mask.sum()
    assert_close(trl_nll, trl.metrics["nll_loss"], "orpo: TRL nll_loss reproduced from its logits")
    assert_differs(m["nll_loss"].mean(), trl.metrics["nll_loss"], "orpo: nll_loss")
    assert_differs(out.loss.mean(), trl.loss, "orpo: plain loss")


# TRL objectives with no prefkit counterpart. Each entry is asserted to still be absent from prefkit's
# registry (where it has a name), so adding one without a parity test fails here.
NOT_IN_PREFKIT = {
    "cpo:alphapo": "AlphaPO (CPOConfig(alpha != 0) / loss_type='alphapo'): no prefkit loss",
    "dpo:f_divergence+non-sigmoid": (
        "f_divergence_type != reverse_kl with hinge/ipo/exo_pair/robust/discopop/sigmoid_norm/sft: "
        "prefkit's f_dpo only has the sigmoid (DPO) form"
    ),
}


def _trl_choices(config_cls, name: str) -> list[str]:
    meta = config_cls.__dataclass_fields__[name].metadata
    if "choices" in meta:
        return list(meta["choices"])
    return re.findall(r"'(\w+)'", meta["help"])


def test_every_trl_objective_is_covered():
    """Guard: read TRL's own lists of objectives; each is covered above or listed in NOT_IN_PREFKIT."""
    from trl import DPOConfig, KTOConfig
    from trl.experimental.cpo import CPOConfig

    from prefkit.losses import list_losses

    covered_dpo = {t for c in DPO_CASES for t in c.trl["loss_type"]}
    assert set(_trl_choices(DPOConfig, "loss_type")) <= covered_dpo, sorted(
        set(_trl_choices(DPOConfig, "loss_type")) - covered_dpo
    )
    f_divs = set(re.findall(r"`(\w+)`", DPOConfig.__dataclass_fields__["f_divergence_type"].metadata["help"]))
    covered_f = {c.trl.get("f_divergence_type", "reverse_kl") for c in DPO_CASES}
    assert f_divs <= covered_f, sorted(f_divs - covered_f)
    assert set(_trl_choices(KTOConfig, "loss_type")) == {"kto", "apo_zero_unpaired"}  # both tested above
    covered_cpo = {"sigmoid", "hinge", "ipo", "simpo"}
    assert set(_trl_choices(CPOConfig, "loss_type")) == covered_cpo | {"alphapo"}
    registered = {s.name for s in list_losses()}
    assert "alphapo" not in registered, "prefkit now has AlphaPO: add a parity test and update NOT_IN_PREFKIT"


# ------------------------------------------------------------------------------------------------
# End to end: PreferenceTrainer's logged first step equals TRL's trainer's

PAIR_E2E_METRICS = ("loss", "grad_norm", *REWARD_METRICS, "logps/chosen", "logps/rejected")
KTO_E2E_METRICS = (
    "loss",
    "grad_norm",
    "kl",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
)
KTO_PARAMS = {"beta": BETA, "desirable_weight": 1.2, "undesirable_weight": 0.8}

E2E_CASES = [
    # (TRL trainer, TRL config, prefkit loss, prefkit loss_params, metrics compared)
    pytest.param("dpo", {"loss_type": ["sigmoid"], "beta": BETA}, "dpo", {"beta": BETA}, PAIR_E2E_METRICS, id="dpo"),
    pytest.param("dpo", {"loss_type": ["ipo"], "beta": BETA}, "ipo", {"beta": BETA}, PAIR_E2E_METRICS, id="ipo"),
    pytest.param(
        "dpo",
        {"loss_type": ["sigmoid"], "beta": BETA, "use_weighting": True},
        "wpo",
        {"beta": BETA},
        PAIR_E2E_METRICS,
        id="wpo",
    ),
    # logps/* are a documented difference here (TRL logs LD-weighted ones); see test_trainer_ld_dpo_logps_metric
    pytest.param(
        "dpo",
        {"loss_type": ["sigmoid"], "beta": BETA, "ld_alpha": 0.4},
        "ld_dpo",
        {"beta": BETA, "alpha": 0.4},
        ("loss", "grad_norm", *REWARD_METRICS),
        id="ld_dpo",
    ),
    # perturbed policy: z0 clamps to 0 on this data (test_kto_parity covers z0 > 0 on the same KL rows)
    pytest.param("kto", KTO_PARAMS, "kto", KTO_PARAMS, KTO_E2E_METRICS, id="kto"),
]


def _first_step_logs(kind, trl_config, loss, loss_params, models, tok, tmp_path):
    """``(prefkit_log, trl_log)``: the first ``log_history`` entry of each trainer after one step."""
    import copy

    from trl_harness import trl_train_first_step

    from prefkit.train.config import PreferenceConfig
    from prefkit.train.trainer import PreferenceTrainer

    policy, ref = models
    rows = PAIRS if kind == "dpo" else unpaired_records()
    records = [PairwiseRecord(**r) for r in rows] if kind == "dpo" else [UnpairedRecord(**r) for r in rows]
    trl_log = trl_train_first_step(
        kind, policy, ref, tok, rows, str(tmp_path / "trl"), learning_rate=1e-9, **trl_config
    )
    args = PreferenceConfig(
        output_dir=str(tmp_path / "prefkit"),
        loss=loss,
        loss_params=loss_params,
        max_steps=1,
        logging_steps=1,
        per_device_train_batch_size=len(rows),
        learning_rate=1e-9,
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
        report_to="none",
        train_sampling_strategy="sequential",
        seed=0,
    )
    trainer = PreferenceTrainer(
        copy.deepcopy(policy),
        args=args,
        train_dataset=records,
        processing_class=copy.deepcopy(tok),
        ref_model=copy.deepcopy(ref),
    )
    trainer.train()
    return trainer.state.log_history[0], trl_log


@pytest.mark.parametrize("kind, trl_config, loss, loss_params, metrics", E2E_CASES)
def test_trainer_first_step_matches_trl(kind, trl_config, loss, loss_params, metrics, models, tok, tmp_path):
    """``PreferenceTrainer.train()`` for one step (max_steps=1, logging_steps=1, one batch of all rows,
    sequential sampling) logs the same loss, gradient norm and metrics as TRL's trainer."""
    ours, trl_log = _first_step_logs(kind, trl_config, loss, loss_params, models, tok, tmp_path)
    for key in metrics:
        assert key in ours, f"prefkit did not log {key!r} (logged: {sorted(ours)})"
        assert_close(ours[key], trl_log[key], f"{loss}: logged {key}")
    if kind == "kto":
        assert ours["kl"] == 0.0


def test_trainer_ld_dpo_logps_metric(models, tok, tmp_path, pk_pairs):
    """Documented difference (``ld_dpo`` docstring, docs/parity.md): with ``ld_alpha`` TRL logs
    ``logps/chosen|rejected`` of the LD-weighted log-probs; ``PreferenceTrainer`` always logs the plain
    summed completion log-probs, whatever the loss. Loss, gradients and rewards agree (E2E_CASES)."""
    ours, trl_log = _first_step_logs(
        "dpo",
        {"loss_type": ["sigmoid"], "beta": BETA, "ld_alpha": 0.4},
        "ld_dpo",
        {"beta": BETA, "alpha": 0.4},
        models,
        tok,
        tmp_path,
    )
    # the plain sums, computed independently: completion_logps of the policy on the same collated batch
    n = len(pk_pairs.examples)
    plain = {"logps/chosen": pk_pairs.policy_sum[:n].mean(), "logps/rejected": pk_pairs.policy_sum[n:].mean()}
    for key in ("logps/chosen", "logps/rejected"):
        assert_close(ours[key], plain[key], f"ld_dpo: logged {key} vs plain summed log-prob")
        assert_differs(ours[key], trl_log[key], f"ld_dpo: logged {key} vs TRL's LD-weighted value")
