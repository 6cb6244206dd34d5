"""simpo, cpo, orpo: closed forms (computed with `math`), gradient signs, limiting cases."""

import decimal
import math

import pytest
import torch

from prefkit.losses import PairLogps, get_loss, list_losses
from prefkit.losses.reference_free import log1m_exp

# two pairs: summed log-probs and token counts
PW, PL = [-6.0, -1.5], [-8.0, -0.9]
LW, LL = [3.0, 2.0], [4.0, 1.0]


def batch(pw=PW, pl=PL, lw=LW, ll=LL, dtype=torch.float64, grad=False):
    t = lambda x: torch.tensor(x, dtype=dtype, requires_grad=grad)
    return PairLogps(policy_chosen=t(pw), policy_rejected=t(pl), chosen_len=t(lw), rejected_len=t(ll))


def log_sigmoid(z):
    return -math.log1p(math.exp(-z)) if z > 0 else z - math.log1p(math.exp(z))


def close(tensor, expected, rel=1e-12):
    assert tensor.tolist() == pytest.approx(expected, rel=rel, abs=1e-15)


def grads(name, **kw):
    b = batch(grad=True)
    get_loss(name)(b, **kw).loss.sum().backward()
    return b.policy_chosen.grad, b.policy_rejected.grad


# ---------------------------------------------------------------- registry entries


@pytest.mark.parametrize("name", ["simpo", "cpo", "orpo"])
def test_registered_reference_free_pairwise(name):
    spec = get_loss(name)
    assert spec.kind == "pairwise" and not spec.needs_reference and not spec.needs_tokens
    assert spec in list_losses("pairwise")


def test_published_defaults():
    assert get_loss("simpo").hyperparameters == {"beta": 2.0, "gamma_beta_ratio": 0.5, "label_smoothing": 0.0}
    assert get_loss("cpo").hyperparameters == {"beta": 0.1, "cpo_alpha": 1.0, "label_smoothing": 0.0}
    assert get_loss("orpo").hyperparameters == {"beta": 0.1}


# ---------------------------------------------------------------- simpo


def test_simpo_closed_form_and_rewards():
    beta, ratio = 2.0, 0.5
    out = get_loss("simpo")(batch(), beta=beta, gamma_beta_ratio=ratio)
    expected, rw, rl = [], [], []
    for pw, pl, lw, ll in zip(PW, PL, LW, LL):
        z = beta * pw / lw - beta * pl / ll - beta * ratio
        expected.append(-log_sigmoid(z))
        rw.append(beta * pw / lw)
        rl.append(beta * pl / ll)
    close(out.loss, expected)
    close(out.metrics["rewards/chosen"], rw)
    close(out.metrics["rewards/rejected"], rl)
    close(out.metrics["rewards/margins"], [a - c for a, c in zip(rw, rl)])
    assert out.metrics["rewards/accuracies"].tolist() == [float(a > c) for a, c in zip(rw, rl)]


def test_simpo_label_smoothing_closed_form():
    beta, ratio, eps = 2.5, 0.3, 0.1
    out = get_loss("simpo")(batch(), beta=beta, gamma_beta_ratio=ratio, label_smoothing=eps)
    expected = []
    for pw, pl, lw, ll in zip(PW, PL, LW, LL):
        z = beta * (pw / lw - pl / ll - ratio)
        expected.append(-(1 - eps) * log_sigmoid(z) - eps * log_sigmoid(-z))
    close(out.loss, expected)


def test_simpo_gradient_signs():
    gw, gl = grads("simpo")
    assert (gw < 0).all() and (gl > 0).all()


def test_simpo_without_margin_equal_lengths_is_reference_free_dpo():
    # gamma = 0 and |y_w| = |y_l| = L: -log sigmoid(beta/L * (pi_w - pi_l)), i.e. DPO with
    # beta' = beta / L and a zero reference
    L, beta = 4.0, 2.0
    b = batch(lw=[L, L], ll=[L, L])
    out = get_loss("simpo")(b, beta=beta, gamma_beta_ratio=0.0)
    close(out.loss, [-log_sigmoid(beta / L * (pw - pl)) for pw, pl in zip(PW, PL)])
    if "dpo" in {s.name for s in list_losses()}:
        zero = torch.zeros(2, dtype=torch.float64)
        b.ref_chosen, b.ref_rejected = zero, zero
        close(out.loss, get_loss("dpo")(b, beta=beta / L).loss.tolist())


def test_simpo_rejects_bad_hyperparameters():
    with pytest.raises(ValueError, match="beta"):
        get_loss("simpo")(batch(), beta=0.0)
    with pytest.raises(ValueError, match="label_smoothing"):
        get_loss("simpo")(batch(), label_smoothing=0.5)


# ---------------------------------------------------------------- cpo


def test_cpo_closed_form_and_metrics():
    beta, alpha = 0.1, 1.0
    out = get_loss("cpo")(batch(), beta=beta, cpo_alpha=alpha)
    expected = [-log_sigmoid(beta * (pw - pl)) + alpha * (-pw / lw) for pw, pl, lw in zip(PW, PL, LW)]
    close(out.loss, expected)
    close(out.metrics["rewards/chosen"], [beta * pw for pw in PW])  # summed log-probs, like TRL
    close(out.metrics["rewards/rejected"], [beta * pl for pl in PL])
    close(out.metrics["nll_loss"], [-pw / lw for pw, lw in zip(PW, LW)])


def test_cpo_label_smoothing_closed_form():
    beta, eps = 0.5, 0.2
    out = get_loss("cpo")(batch(), beta=beta, cpo_alpha=0.0, label_smoothing=eps)
    expected = []
    for pw, pl in zip(PW, PL):
        z = beta * (pw - pl)
        expected.append(-(1 - eps) * log_sigmoid(z) - eps * log_sigmoid(-z))
    close(out.loss, expected)


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_cpo_gradient_signs(alpha):
    gw, gl = grads("cpo", cpo_alpha=alpha)
    assert (gw < 0).all() and (gl > 0).all()


def test_cpo_alpha_zero_is_its_preference_term():
    b = batch()
    out = get_loss("cpo")(b, beta=0.3, cpo_alpha=0.0)
    close(out.loss, [-log_sigmoid(0.3 * (pw - pl)) for pw, pl in zip(PW, PL)])
    full = get_loss("cpo")(b, beta=0.3, cpo_alpha=2.0)
    close(full.loss - out.loss, [2.0 * nll for nll in out.metrics["nll_loss"].tolist()])


# ---------------------------------------------------------------- orpo


def log_odds(avg):
    return avg - math.log(-math.expm1(avg))


def test_orpo_closed_form_and_metrics():
    beta = 0.1
    out = get_loss("orpo")(batch(), beta=beta)
    loss, ratio, lo = [], [], []
    for pw, pl, lw, ll in zip(PW, PL, LW, LL):
        aw, al = pw / lw, pl / ll
        d = log_odds(aw) - log_odds(al)
        loss.append(-aw - beta * log_sigmoid(d))
        ratio.append(log_sigmoid(d))
        lo.append(d)
    close(out.loss, loss, rel=1e-10)
    close(out.metrics["log_odds_ratio"], ratio, rel=1e-10)
    close(out.metrics["log_odds_chosen"], lo, rel=1e-10)
    close(out.metrics["nll_loss"], [-pw / lw for pw, lw in zip(PW, LW)])
    close(out.metrics["rewards/chosen"], [beta * pw / lw for pw, lw in zip(PW, LW)])
    close(out.metrics["rewards/rejected"], [beta * pl / ll for pl, ll in zip(PL, LL)])


def test_orpo_gradient_signs():
    gw, gl = grads("orpo", beta=0.5)
    assert (gw < 0).all() and (gl > 0).all()


def test_orpo_beta_zero_is_sft():
    b = batch()
    close(get_loss("orpo")(b, beta=0.0).loss, get_loss("sft")(b).loss.tolist())


@pytest.mark.parametrize("x", [-1e-12, -1e-6, -0.01, -0.5, -math.log(2), -0.7, -3.0, -40.0, -800.0])
def test_log1m_exp_matches_high_precision(x):
    with decimal.localcontext() as ctx:
        ctx.prec = 60
        expected = float((1 - decimal.Decimal(x).exp()).ln())
    got = log1m_exp(torch.tensor([x], dtype=torch.float64)).item()
    assert got == pytest.approx(expected, rel=1e-12, abs=1e-300)


def test_orpo_is_finite_at_extreme_average_logps():
    # average log-probs at 0 (probability 1), just below 0, and very negative
    b = batch(
        pw=[0.0, -1e-9, -400.0],
        pl=[-30.0, -0.2, -0.0],
        lw=[1.0, 1.0, 1.0],
        ll=[1.0, 1.0, 1.0],
        dtype=torch.float32,
        grad=True,
    )
    out = get_loss("orpo")(b)
    assert torch.isfinite(out.loss).all()
    out.loss.sum().backward()
    assert torch.isfinite(b.policy_chosen.grad).all() and torch.isfinite(b.policy_rejected.grad).all()


def test_orpo_upcasts_half_precision():
    b = batch(dtype=torch.bfloat16)
    out = get_loss("orpo")(b)
    assert out.loss.dtype == torch.float32
    ref = get_loss("orpo")(batch(dtype=torch.float32)).loss
    assert torch.allclose(out.loss, ref, rtol=2e-2)
