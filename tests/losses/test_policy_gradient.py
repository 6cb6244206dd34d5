"""Policy-gradient losses (kind ``policy``): values by hand, and TRL 1.16 GRPOTrainer's loss on the same tensors."""

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from prefkit.losses import get_loss, list_losses
from prefkit.losses.policy_gradient import PolicyLogps, kl_estimate

# Two completions: 2 and 3 tokens (T = 3).
LOGPS = [[-1.0, -0.5, 0.0], [-0.2, -2.0, -1.0]]
OLD = [[-1.1, -0.2, 0.0], [-0.2, -2.5, -0.9]]
REF = [[-0.9, -0.7, 0.0], [-0.4, -1.8, -1.2]]
MASK = [[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]]
ADV = [1.5, -0.5]


def batch(grad: bool = False, **kw) -> PolicyLogps:
    return PolicyLogps(
        logps=torch.tensor(LOGPS, dtype=torch.float64, requires_grad=grad),
        old_logps=torch.tensor(OLD, dtype=torch.float64),
        ref_logps=torch.tensor(REF, dtype=torch.float64),
        advantages=torch.tensor(ADV, dtype=torch.float64),
        mask=torch.tensor(MASK, dtype=torch.float64),
        **kw,
    )


def clipped(lr: float, a: float, lo: float, hi: float) -> float:
    r = math.exp(lr)
    return -min(r * a, min(max(r, 1 - lo), 1 + hi) * a)


def k3(logp: float, ref: float) -> float:
    d = ref - logp
    return math.exp(d) - d - 1


def per_token(lo: float, hi: float, beta: float = 0.0) -> list[list[float]]:
    out = []
    for i in range(2):
        row = []
        for t in range(3):
            v = clipped(LOGPS[i][t] - OLD[i][t], ADV[i], lo, hi) + beta * k3(LOGPS[i][t], REF[i][t])
            row.append(v * MASK[i][t])
        out.append(row)
    return out


def test_grpo_is_the_mean_of_per_sequence_means():
    tokens = per_token(0.2, 0.05, beta=0.04)
    expected = [sum(tokens[0]) / 2, sum(tokens[1]) / 3]
    out = get_loss("grpo")(batch(), epsilon_high=0.05, beta=0.04)
    assert out.loss.tolist() == pytest.approx(expected, rel=1e-12)
    # completion 0 (A > 0): token 0's ratio e^0.1 > 1.05 is clipped; token 1's e^-0.3 < 0.8 is not (A > 0 keeps
    # r A, the smaller). Completion 1 (A < 0): e^0.5 > 1.05 keeps r A, e^-0.1 > 0.8: nothing clipped.
    assert out.metrics["clip_fraction"].tolist() == pytest.approx([0.5, 0.0])


def test_dapo_bnpo_cispo_are_token_level_means_over_the_batch():
    n_tokens = 5.0
    tokens = per_token(0.2, 0.28)
    dapo = get_loss("dapo")(batch()).loss
    assert dapo.mean().item() == pytest.approx((sum(tokens[0]) + sum(tokens[1])) / n_tokens, rel=1e-12)
    assert dapo.tolist() == pytest.approx([sum(tokens[0]) * 2 / n_tokens, sum(tokens[1]) * 2 / n_tokens], rel=1e-12)
    tokens = per_token(0.2, 0.2)
    bnpo = get_loss("bnpo")(batch()).loss
    assert bnpo.mean().item() == pytest.approx((sum(tokens[0]) + sum(tokens[1])) / n_tokens, rel=1e-12)
    cispo_tokens = [
        -min(math.exp(LOGPS[i][t] - OLD[i][t]), 1.2) * ADV[i] * LOGPS[i][t] * MASK[i][t]
        for i in range(2)
        for t in range(3)
    ]
    cispo = get_loss("cispo")(batch(), epsilon_high=1.2).loss
    assert cispo.mean().item() == pytest.approx(sum(cispo_tokens) / n_tokens, rel=1e-12)


def test_dr_grpo_divides_by_a_constant():
    tokens = per_token(0.2, 0.2)
    out = get_loss("dr_grpo")(batch(max_completion_length=8)).loss
    assert out.tolist() == pytest.approx([sum(tokens[0]) / 8, sum(tokens[1]) / 8], rel=1e-12)


def test_gspo_uses_one_length_normalised_ratio_per_sequence():
    expected = []
    for i, n in ((0, 2), (1, 3)):
        s = sum((LOGPS[i][t] - OLD[i][t]) * MASK[i][t] for t in range(3)) / n
        expected.append(clipped(s, ADV[i], 0.1, 0.1))
    out = get_loss("gspo")(batch(), epsilon_low=0.1, epsilon_high=0.1).loss
    assert out.tolist() == pytest.approx(expected, rel=1e-12)


def test_on_policy_gradient_is_minus_advantage_times_score():
    """With old = logps.detach() every ratio is 1: the GRPO gradient of token t is -A_i / |y_i|."""
    b = batch(grad=True)
    b.old_logps = None
    get_loss("grpo")(b).loss.mean().backward()
    expected = torch.tensor([[-1.5 / 2 / 2, -1.5 / 2 / 2, 0.0], [0.5 / 3 / 2] * 3], dtype=torch.float64)
    assert torch.allclose(b.logps.grad, expected, rtol=1e-12)


def test_kl_estimators_by_hand():
    logp, ref = torch.tensor([-1.0]), torch.tensor([-1.5])
    d = -0.5
    assert kl_estimate(logp, ref, "k1").item() == pytest.approx(-d)
    assert kl_estimate(logp, ref, "k2").item() == pytest.approx(d * d / 2)
    assert kl_estimate(logp, ref, "k3").item() == pytest.approx(math.exp(d) - d - 1)
    with pytest.raises(ValueError, match="unknown KL estimator"):
        kl_estimate(logp, ref, "k4")


def test_beta_needs_the_reference():
    b = batch()
    b.ref_logps = None
    with pytest.raises(ValueError, match="needs the reference"):
        get_loss("grpo")(b, beta=0.1)


# ---- TRL 1.16 GRPOTrainer._compute_loss on the same tensors -------------------------------------------
def trl_loss(loss_type: str, b: PolicyLogps, *, epsilon: float, epsilon_high: float, beta: float, level="token"):
    """TRL's own loss code, run on a stand-in for the trainer that returns ``b.logps`` as the model's
    per-token log-probs (no model, no generation)."""
    trl_grpo = pytest.importorskip("trl.trainer.grpo_trainer")
    fake = SimpleNamespace(
        loss_type=loss_type,
        epsilon_low=epsilon,
        epsilon_high=epsilon_high,
        beta=beta,
        importance_sampling_level=level,
        top_entropy_quantile=1.0,
        off_policy_mask_threshold=None,
        use_vllm=False,
        vllm_importance_sampling_correction=False,
        aux_loss_enabled=False,
        _entropy_bonus_enabled=False,
        current_gradient_accumulation_steps=1,
        max_completion_length=b.max_completion_length or b.logps.shape[1],
        model=SimpleNamespace(training=True),
        args=SimpleNamespace(delta=None, use_bias_correction_kl=False, steps_per_generation=1),
        accelerator=SimpleNamespace(
            num_processes=1, gather=lambda x: x, reduce=lambda x, reduction="sum": x, sync_gradients=True
        ),
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _get_per_token_logps_and_entropies=lambda *a, **k: (b.logps, torch.zeros_like(b.logps), None),
    )
    n = b.logps.shape[1]
    inputs = {
        "prompt_ids": torch.zeros(2, 1, dtype=torch.long),
        "prompt_mask": torch.ones(2, 1, dtype=torch.long),
        "completion_ids": torch.zeros(2, n, dtype=torch.long),
        "completion_mask": b.mask,
        "advantages": b.advantages,
        "old_per_token_logps": b.old_logps,
        "ref_per_token_logps": b.ref_logps,
        "num_items_in_batch": b.mask.sum(),
    }
    return trl_grpo.GRPOTrainer._compute_loss(fake, None, inputs)


PARITY = [
    ("grpo", "grpo", {"epsilon_low": 0.2, "epsilon_high": 0.2, "beta": 0.04}, "token"),
    ("grpo", "grpo", {"epsilon_low": 0.1, "epsilon_high": 0.3, "beta": 0.0}, "token"),
    ("dapo", "dapo", {"epsilon_low": 0.2, "epsilon_high": 0.28, "beta": 0.0}, "token"),
    ("dapo", "dapo", {"epsilon_low": 0.2, "epsilon_high": 0.28, "beta": 0.1}, "token"),
    ("bnpo", "bnpo", {"epsilon_low": 0.2, "epsilon_high": 0.2, "beta": 0.04}, "token"),
    ("dr_grpo", "dr_grpo", {"epsilon_low": 0.2, "epsilon_high": 0.2, "beta": 0.04}, "token"),
    ("gspo", "grpo", {"epsilon_low": 0.1, "epsilon_high": 0.1, "beta": 0.0}, "sequence"),
    ("gspo", "grpo", {"epsilon_low": 0.3, "epsilon_high": 0.4, "beta": 0.04}, "sequence"),
    ("cispo", "cispo", {"epsilon_high": 1.2, "beta": 0.0}, "token"),
    ("cispo", "cispo", {"epsilon_high": 5.0, "beta": 0.04}, "token"),
]


@pytest.mark.parametrize(("ours", "theirs", "params", "level"), PARITY)
def test_same_loss_and_gradient_as_trl(ours, theirs, params, level):
    mine_b, trl_b = batch(grad=True, max_completion_length=4), batch(grad=True, max_completion_length=4)
    mine = get_loss(ours)(mine_b, **params).loss.mean()
    trl = trl_loss(
        theirs,
        trl_b,
        epsilon=params.get("epsilon_low", 0.2),
        epsilon_high=params["epsilon_high"],
        beta=params["beta"],
        level=level,
    )
    assert mine.item() == pytest.approx(trl.item(), rel=1e-10, abs=1e-12)
    mine.backward()
    trl.backward()
    assert torch.allclose(mine_b.logps.grad, trl_b.logps.grad, rtol=1e-9, atol=1e-12)


def test_every_policy_loss_is_checked_against_trl():
    assert {s.name for s in list_losses("policy")} == {p[0] for p in PARITY}
