"""Tests of the reference-based pairwise losses in ``prefkit.losses.pairwise``.

Expected values are computed by hand with ``math`` on plain floats, never by re-running the
torch expression under test.
"""

from __future__ import annotations

import math

import pytest
import torch

from prefkit.losses import PairLogps, get_loss
from prefkit.losses import pairwise as pw

NAMES = [
    "dpo", "cdpo", "robust_dpo", "ipo", "hinge", "exo", "nca", "bco_pair", "sppo_hard", "aot",
    "aot_pair", "apo_zero", "apo_down", "discopop", "length_dpo", "length_normalized_dpo",
    "ld_dpo", "f_dpo", "wpo", "dpop", "lcpo",
]  # fmt: skip
TOKEN_LOSSES = {"ld_dpo", "wpo"}


# ------------------------------------------------------------------------------------------
# plain-float helpers


def sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def logsig(x: float) -> float:
    return -math.log1p(math.exp(-x))


def t(values, grad: bool = False) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64, requires_grad=grad)


def make(pc, pr, rc, rr, lc=None, lr=None, grad=False) -> PairLogps:
    n = len(pc)
    return PairLogps(
        policy_chosen=t(pc, grad),
        policy_rejected=t(pr, grad),
        ref_chosen=t(rc),
        ref_rejected=t(rr),
        chosen_len=t(lc if lc is not None else [1.0] * n),
        rejected_len=t(lr if lr is not None else [1.0] * n),
    )


# Three rows with distinct values. lr_w = [1, 0.5, -1], lr_l = [-1, -1, 1], h = [2, 1.5, -2].
PC, PR = [-10.0, -5.0, -20.0], [-12.0, -6.0, -18.0]
RC, RR = [-11.0, -5.5, -19.0], [-11.0, -5.0, -19.0]
LC, LR = [4.0, 10.0, 7.0], [5.0, 3.0, 7.0]
LRW = [p - r for p, r in zip(PC, RC)]
LRL = [p - r for p, r in zip(PR, RR)]
H = [w - l for w, l in zip(LRW, LRL)]


def rows() -> PairLogps:
    return make(PC, PR, RC, RR, LC, LR)


def check(name: str, expected: list[float], batch: PairLogps | None = None, **kw) -> None:
    out = get_loss(name)(batch if batch is not None else rows(), **kw)
    assert out.loss.shape == (len(expected),)
    assert out.loss.tolist() == pytest.approx(expected, rel=1e-10, abs=1e-12)


# ------------------------------------------------------------------------------------------
# token-level batch for ld_dpo / wpo
#
# row 0: chosen has 3 tokens, rejected 4 (shared length 3); row 1: chosen 5, rejected 2 (shared 2)

CM = [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
RM = [[1, 1, 1, 1, 0], [1, 1, 0, 0, 0]]
PCT = [[-1.0, -2.0, -0.5, 0, 0], [-0.3, -0.7, -1.1, -2.0, -0.4]]
PRT = [[-1.5, -0.5, -2.5, -1.0, 0], [-0.9, -1.6, 0, 0, 0]]
RCT = [[-1.2, -1.8, -0.9, 0, 0], [-0.5, -0.6, -1.0, -1.5, -0.9]]
RRT = [[-1.1, -0.8, -2.0, -1.4, 0], [-0.7, -1.9, 0, 0, 0]]
CLSS = [[-0.9, -1.1, -0.2, 0, 0], [-0.1, -0.5, -0.8, -1.2, -0.3]]  # log sum_v p_v^2
RLSS = [[-0.6, -0.4, -1.3, -0.5, 0], [-0.4, -1.0, 0, 0, 0]]


def token_batch(grad: bool = False, chosen_lss=CLSS, rejected_lss=RLSS) -> PairLogps:
    pct, prt = t(PCT, grad), t(PRT, grad)
    return PairLogps(
        policy_chosen=pct.sum(1),
        policy_rejected=prt.sum(1),
        ref_chosen=t(RCT).sum(1),
        ref_rejected=t(RRT).sum(1),
        chosen_len=t(CM).sum(1),
        rejected_len=t(RM).sum(1),
        policy_chosen_tokens=pct,
        policy_rejected_tokens=prt,
        ref_chosen_tokens=t(RCT),
        ref_rejected_tokens=t(RRT),
        chosen_mask=t(CM),
        rejected_mask=t(RM),
        chosen_logsumsq=t(chosen_lss),
        rejected_logsumsq=t(rejected_lss),
    )


def ld_sum(tokens, mask, shared, alpha) -> float:
    total, k = 0.0, 0
    for x, m in zip(tokens, mask):
        if m:
            k += 1
            total += x if k <= shared else alpha * x
    return total


# ==========================================================================================
# (a) closed-form values


def test_dpo_worked_example():
    # policy -10 / -12, reference -11 / -11, beta 0.1: loss = log(1 + exp(-0.2))
    out = get_loss("dpo")(make([-10.0], [-12.0], [-11.0], [-11.0]), beta=0.1)
    assert out.loss.item() == pytest.approx(math.log(1 + math.exp(-0.2)), rel=1e-12)


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_values(beta):
    check("dpo", [-logsig(beta * h) for h in H], beta=beta)


def test_cdpo_values():
    b, e = 0.2, 0.1
    check("cdpo", [-(1 - e) * logsig(b * h) - e * logsig(-b * h) for h in H], beta=b, label_smoothing=e)


def test_robust_dpo_values():
    b, e = 0.3, 0.2
    exp = [(-(1 - e) * logsig(b * h) + e * logsig(-b * h)) / (1 - 2 * e) for h in H]
    check("robust_dpo", exp, beta=b, label_smoothing=e)


def test_ipo_values_are_length_averaged():
    b = 0.25
    exp = [(w / lc - l / lr - 1 / (2 * b)) ** 2 for w, l, lc, lr in zip(LRW, LRL, LC, LR)]
    check("ipo", exp, beta=b)


def test_ipo_clamps_zero_length():
    batch = make([-1.0], [-2.0], [-1.5], [-1.5], [0.0], [0.0])
    check("ipo", [(0.5 - (-0.5) - 5.0) ** 2], batch, beta=0.1)


def test_hinge_values():
    # beta 0.4: 1 - 0.4 h = [0.2, 0.4, 1.8]; a fourth row beyond the margin gives 0
    check("hinge", [max(0.0, 1 - 0.4 * h) for h in H], beta=0.4)
    check("hinge", [0.0], make([0.0], [-5.0], [0.0], [0.0]), beta=0.4)


def test_exo_values():
    b, e = 0.5, 1e-3
    exp = []
    for h in H:
        qw, ql = sig(b * h), sig(-b * h)
        exp.append(qw * (math.log(qw) - math.log(1 - e)) + ql * (math.log(ql) - math.log(e)))
    check("exo", exp, beta=b, label_smoothing=e)
    assert get_loss("exo").hyperparameters["label_smoothing"] == 1e-3


def test_nca_values():
    b = 0.3
    exp = [-logsig(b * w) - 0.5 * logsig(-b * w) - 0.5 * logsig(-b * l) for w, l in zip(LRW, LRL)]
    check("nca", exp, beta=b)


@pytest.mark.parametrize("shift", [0.0, 0.05])
def test_bco_pair_values(shift):
    b = 0.3
    exp = [-logsig(b * w - shift) - logsig(-(b * l - shift)) for w, l in zip(LRW, LRL)]
    check("bco_pair", exp, beta=b, reward_shift=shift)


def test_sppo_hard_values():
    b = 0.5  # targets +-1
    check("sppo_hard", [(w - 1.0) ** 2 + (l + 1.0) ** 2 for w, l in zip(LRW, LRL)], beta=b)


def test_aot_unpaired_sorts_each_side_separately():
    b, e = 0.5, 0.1
    d = [w - l for w, l in zip(sorted(LRW), sorted(LRL))]  # [0, 1.5, 0], not h = [2, 1.5, -2]
    exp = [-(1 - e) * logsig(b * x) - e * logsig(-b * x) for x in d]
    check("aot", exp, beta=b, label_smoothing=e)


def test_aot_pair_sorts_policy_and_reference_margins():
    b = 0.5
    pm = sorted(c - r for c, r in zip(PC, PR))  # [-2, 1, 2]
    rm = sorted(c - r for c, r in zip(RC, RR))  # [-0.5, 0, 0]
    check("aot_pair", [-logsig(b * (x - y)) for x, y in zip(pm, rm)], beta=b)


def test_aot_metrics_are_per_pair_not_sorted():
    out = get_loss("aot")(rows(), beta=0.5)
    assert out.metrics["rewards/chosen"].tolist() == pytest.approx([0.5 * w for w in LRW])


def test_apo_zero_values():
    b = 0.4
    check("apo_zero", [1 - sig(b * w) + sig(b * l) for w, l in zip(LRW, LRL)], beta=b)


def test_apo_down_values():
    b = 0.4
    check("apo_down", [sig(b * w) + 1 - sig(b * h) for w, h in zip(LRW, H)], beta=b)


def test_discopop_values():
    b, tau = 0.2, 0.05
    exp = []
    for h in H:
        z = b * h
        m = sig(z / tau)
        exp.append((1 - m) * -logsig(z) + m * math.exp(-z))
    check("discopop", exp, beta=b, tau=tau)


def test_length_dpo_values():
    b, a = 0.1, 0.02
    # |y_w| - |y_l| = [-1, 7, 0]
    exp = [-logsig(b * h + a * (lc - lr)) for h, lc, lr in zip(H, LC, LR)]
    check("length_dpo", exp, beta=b, alpha=a)


def test_length_dpo_sign_favours_shorter_chosen():
    # same policy margin; the pair whose chosen answer is longer gets the smaller loss
    batch = make([-1.0, -1.0], [-2.0, -2.0], [-1.0, -1.0], [-1.0, -1.0], [20.0, 5.0], [5.0, 20.0])
    loss = get_loss("length_dpo")(batch, beta=0.1, alpha=0.01).loss
    assert loss[0] < loss[1]


def test_length_normalized_dpo_values():
    b = 2.0
    exp = [-logsig(b * (w / lc - l / lr)) for w, l, lc, lr in zip(LRW, LRL, LC, LR)]
    check("length_normalized_dpo", exp, beta=b)


@pytest.mark.parametrize(
    "divergence,alpha,fprime",
    [
        ("reverse_kl", 0.5, lambda x: x),
        ("forward_kl", 0.5, lambda x: 1 - math.exp(-x)),
        ("js_divergence", 0.5, lambda x: math.log(2 * math.exp(x) / (1 + math.exp(x)))),
        ("alpha_divergence", 0.5, lambda x: (1 - math.exp(x) ** -0.5) / 0.5),
        ("alpha_divergence", 0.3, lambda x: (1 - math.exp(x) ** -0.3) / 0.3),
    ],
)
def test_f_dpo_values(divergence, alpha, fprime):
    b = 0.5
    exp = [-logsig(b * (fprime(w) - fprime(l))) for w, l in zip(LRW, LRL)]
    check("f_dpo", exp, beta=b, divergence=divergence, alpha=alpha)
    # logged rewards stay beta * log-ratio for every divergence (as TRL logs them)
    out = get_loss("f_dpo")(rows(), beta=b, divergence=divergence, alpha=alpha)
    assert out.metrics["rewards/chosen"].tolist() == pytest.approx([b * w for w in LRW])


def test_f_dpo_alpha_divergence_stays_finite():
    batch = make([-500.0], [-1.0], [0.0], [0.0])
    for div in ("forward_kl", "alpha_divergence"):
        out = get_loss("f_dpo")(batch, divergence=div)
        assert torch.isfinite(out.loss).all()


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_ld_dpo_values(alpha):
    b = 0.5
    exp = []
    for i in range(2):
        shared = min(sum(CM[i]), sum(RM[i]))
        lw = ld_sum(PCT[i], CM[i], shared, alpha) - ld_sum(RCT[i], CM[i], shared, alpha)
        ll = ld_sum(PRT[i], RM[i], shared, alpha) - ld_sum(RRT[i], RM[i], shared, alpha)
        exp.append(-logsig(b * (lw - ll)))
    check("ld_dpo", exp, token_batch(), beta=b, alpha=alpha)


def test_ld_dpo_rewards_use_weighted_logps():
    alpha, b = 0.3, 0.5
    out = get_loss("ld_dpo")(token_batch(), beta=b, alpha=alpha)
    shared = min(sum(CM[1]), sum(RM[1]))
    lw = ld_sum(PCT[1], CM[1], shared, alpha) - ld_sum(RCT[1], CM[1], shared, alpha)
    assert out.metrics["rewards/chosen"][1].item() == pytest.approx(b * lw)


def test_wpo_values():
    b = 0.5
    exp, weights = [], []

    def w(tok, lss, m):
        return math.exp(sum((x - y) * k for x, y, k in zip(tok, lss, m)) / sum(m))

    for i in range(2):
        wc, wr = w(PCT[i], CLSS[i], CM[i]), w(PRT[i], RLSS[i], RM[i])
        lw = sum(PCT[i]) - sum(RCT[i])
        ll = sum(PRT[i]) - sum(RRT[i])
        exp.append(-logsig(b * (lw - ll)) * wc * wr)
        weights.append(wc)
    check("wpo", exp, token_batch(), beta=b)
    out = get_loss("wpo")(token_batch(), beta=b)
    assert out.metrics["wpo/chosen_weight"].tolist() == pytest.approx(weights)


# ==========================================================================================
# (b) gradient signs


# near the reference: lr_w = [0.2, -0.2, 1.0], lr_l = [-0.1, 0.2, 0.5]
G_PC, G_PR = [-10.3, -7.2, -4.0], [-11.1, -6.9, -8.5]
G_RC, G_RR = [-10.5, -7.0, -5.0], [-11.0, -7.1, -9.0]
G_LC, G_LR = [6.0, 3.0, 8.0], [4.0, 9.0, 2.0]


def grads(name, batch=None, **kw):
    batch = batch or make(G_PC, G_PR, G_RC, G_RR, G_LC, G_LR, grad=True)
    get_loss(name)(batch, **kw).loss.sum().backward()
    return batch.policy_chosen.grad, batch.policy_rejected.grad


SIGN_CASES = [
    ("dpo", {}), ("cdpo", {}), ("robust_dpo", {}), ("ipo", {}), ("hinge", {}), ("exo", {}),
    ("nca", {}), ("bco_pair", {}), ("sppo_hard", {}), ("aot", {}), ("aot_pair", {}),
    ("apo_zero", {}), ("length_dpo", {}), ("length_normalized_dpo", {}), ("dpop", {}), ("lcpo", {}),
    ("discopop", {"beta": 2.0}),  # |beta * h| >= 0.4, outside discopop's non-monotone band
    ("f_dpo", {"divergence": "reverse_kl"}), ("f_dpo", {"divergence": "forward_kl"}),
    ("f_dpo", {"divergence": "js_divergence"}), ("f_dpo", {"divergence": "alpha_divergence"}),
]  # fmt: skip


@pytest.mark.parametrize("name,kw", SIGN_CASES, ids=[f"{n}-{k}" for n, k in SIGN_CASES])
def test_raising_chosen_lowers_and_raising_rejected_raises_loss(name, kw):
    gc, gr = grads(name, **kw)
    assert (gc < 0).all(), gc
    assert (gr > 0).all(), gr


def test_token_loss_gradient_signs():
    for name, kw in (("ld_dpo", {"alpha": 0.5}), ("wpo", {})):
        batch = token_batch(grad=True)
        get_loss(name)(batch, **kw).loss.sum().backward()
        cm, rm = t(CM).bool(), t(RM).bool()
        gc, gr = batch.policy_chosen_tokens.grad, batch.policy_rejected_tokens.grad
        assert (gc[cm] < 0).all() and (gr[rm] > 0).all()
        if name == "ld_dpo":  # reads tokens through the masks only (wpo's fixture sums rows)
            assert (gc[~cm] == 0).all() and (gr[~rm] == 0).all()


def test_ld_dpo_tail_gradient_is_scaled_by_alpha():
    alpha = 0.3
    batch = token_batch(grad=True)
    get_loss("ld_dpo")(batch, alpha=alpha).loss.sum().backward()
    g = batch.policy_chosen_tokens.grad[1]  # chosen 5 tokens, shared length 2
    assert (g[2:] / g[0]).tolist() == pytest.approx([alpha] * 3)
    assert g[1].item() == pytest.approx(g[0].item())


def test_wpo_weights_are_detached():
    batch = token_batch()
    batch.policy_chosen_tokens.requires_grad_(True)
    out = get_loss("wpo")(batch)
    assert not out.loss.requires_grad  # the loss reaches the tokens only through the weights


def test_nca_chosen_gradient_reverses_past_log2():
    # r_w = beta * lr_w = 2 > log 2: NCA pushes the chosen reward back down
    gc, gr = grads("nca", make([0.0], [0.0], [-20.0], [0.0], grad=True), beta=0.1)
    assert gc.item() > 0 and gr.item() > 0


def test_sppo_hard_gradients_reverse_past_targets():
    # beta 0.1: targets lr_w = 5, lr_l = -5; here lr_w = 7, lr_l = -7
    gc, gr = grads("sppo_hard", make([7.0], [-7.0], [0.0], [0.0], grad=True), beta=0.1)
    assert gc.item() > 0 and gr.item() < 0


def test_hinge_has_no_gradient_past_margin():
    gc, gr = grads("hinge", make([1.0], [-10.0], [0.0], [0.0], grad=True), beta=0.1)
    assert gc.item() == 0 and gr.item() == 0


def test_apo_down_gradient_signs():
    # rejected: always pushed down (gradient > 0)
    # chosen near the reference with a positive margin: pushed down too (gradient > 0)
    gc, gr = grads("apo_down", make([0.2], [-5.0], [0.0], [0.0], grad=True), beta=0.1)
    assert gc.item() > 0 and gr.item() > 0
    # chosen far below the reference with a small margin: the margin term dominates
    gc, gr = grads("apo_down", make([-30.0], [-30.5], [0.0], [0.0], grad=True), beta=0.1)
    assert gc.item() < 0 and gr.item() > 0


def test_apo_zero_pushes_each_side_regardless_of_the_other():
    gc, gr = grads("apo_zero", make([-30.0], [30.0], [0.0], [0.0], grad=True), beta=0.1)
    assert gc.item() < 0 and gr.item() > 0


def test_discopop_non_monotone_band():
    # at h = 0 the gate's slope dominates: d loss / d pi_w > 0 (Lu et al. note the loss is non-convex)
    gc, gr = grads("discopop", make([0.0], [0.0], [0.0], [0.0], grad=True), beta=0.1)
    assert gc.item() > 0 and gr.item() < 0


# ==========================================================================================
# (c) reductions to base losses


def base_dpo(batch=None, beta=0.1):
    return get_loss("dpo")(batch if batch is not None else rows(), beta=beta).loss


def same(a: torch.Tensor, b: torch.Tensor, rel=1e-12) -> None:
    assert a.tolist() == pytest.approx(b.tolist(), rel=rel, abs=1e-12)


@pytest.mark.parametrize(
    "name,kw",
    [
        ("robust_dpo", {"label_smoothing": 0.0}),
        ("cdpo", {"label_smoothing": 0.0}),
        ("f_dpo", {"divergence": "reverse_kl"}),
        ("f_dpo", {"divergence": "alpha_divergence", "alpha": 0.0}),
        ("length_dpo", {"alpha": 0.0}),
        ("discopop", {"tau": 1e-9}),  # row 3 has h < 0: the gate is closed, logistic loss
    ],
)
def test_reduces_to_dpo(name, kw):
    got = get_loss(name)(rows(), beta=0.3, **kw).loss
    want = base_dpo(beta=0.3)
    if name == "discopop":
        same(got[2:], want[2:])
        same(got[:2], torch.exp(-0.3 * t(H[:2])))  # gate open: exponential loss
    else:
        same(got, want)


def test_f_dpo_small_alpha_approaches_reverse_kl():
    got = get_loss("f_dpo")(rows(), divergence="alpha_divergence", alpha=1e-4).loss
    same(got, base_dpo(), rel=1e-3)


def test_f_dpo_alpha_one_is_forward_kl():
    a = get_loss("f_dpo")(rows(), divergence="alpha_divergence", alpha=1.0).loss
    same(a, get_loss("f_dpo")(rows(), divergence="forward_kl").loss)


def test_length_dpo_equal_lengths_is_dpo():
    batch = make(PC, PR, RC, RR, [5.0, 5.0, 5.0], [5.0, 5.0, 5.0])
    same(get_loss("length_dpo")(batch, alpha=0.1).loss, base_dpo(batch))


def test_length_normalized_dpo_unit_lengths_is_dpo():
    batch = make(PC, PR, RC, RR)
    same(get_loss("length_normalized_dpo")(batch, beta=0.1).loss, base_dpo(batch))


def test_ld_dpo_alpha_one_is_dpo():
    batch = token_batch()
    same(get_loss("ld_dpo")(batch, alpha=1.0).loss, base_dpo(batch))


def test_ld_dpo_equal_lengths_is_dpo_for_any_alpha():
    batch = token_batch()
    batch.rejected_mask = batch.chosen_mask.clone()
    batch.policy_rejected_tokens = batch.policy_rejected_tokens * batch.rejected_mask
    batch.ref_rejected_tokens = batch.ref_rejected_tokens * batch.rejected_mask
    batch.policy_rejected = batch.policy_rejected_tokens.sum(1)
    batch.ref_rejected = batch.ref_rejected_tokens.sum(1)
    same(get_loss("ld_dpo")(batch, alpha=0.2).loss, base_dpo(batch))


def test_wpo_unit_weights_is_dpo():
    # log p(y_t) == log sum_v p_v^2 at every token (e.g. a uniform next-token distribution)
    batch = token_batch(chosen_lss=PCT, rejected_lss=PRT)
    out = get_loss("wpo")(batch, beta=0.2)
    same(out.loss, base_dpo(batch, beta=0.2))
    assert out.metrics["wpo/chosen_weight"].tolist() == pytest.approx([1.0, 1.0])


def test_cdpo_is_label_mixture_of_dpo():
    e = 0.15
    swapped = make(PR, PC, RR, RC)
    want = (1 - e) * base_dpo() + e * base_dpo(swapped)
    same(get_loss("cdpo")(rows(), label_smoothing=e).loss, want)


def test_cdpo_equals_trl_sigmoid_robust_combination():
    # TRL 1.16 has no smoothing on "sigmoid"; the report maps cdpo to
    # loss_type=["sigmoid", "robust"], loss_weights=[2 (1 - e), -(1 - 2 e)], label_smoothing=e
    e = 0.15
    combo = 2 * (1 - e) * base_dpo() - (1 - 2 * e) * get_loss("robust_dpo")(rows(), label_smoothing=e).loss
    same(get_loss("cdpo")(rows(), label_smoothing=e).loss, combo, rel=1e-10)


def test_robust_dpo_is_unbiased_under_flips():
    # E over a flip with probability e of the robust loss equals the clean DPO loss
    e = 0.2
    swapped = make(PR, PC, RR, RC)
    rob = get_loss("robust_dpo")
    expected = (1 - e) * rob(rows(), label_smoothing=e).loss + e * rob(swapped, label_smoothing=e).loss
    same(expected, base_dpo(), rel=1e-10)


@pytest.mark.parametrize("name", ["aot", "aot_pair"])
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_aot_single_pair_is_cdpo(name, eps):
    # with one pair, sorting is the identity and both AOT forms reduce to (c)DPO
    batch = make([-10.0], [-12.0], [-11.0], [-11.0])
    same(get_loss(name)(batch, label_smoothing=eps).loss, get_loss("cdpo")(batch, label_smoothing=eps).loss)


def test_aot_in_agreeing_order_is_dpo():
    # when pairs are already co-sorted, the unpaired AOT matches DPO pair by pair
    batch = make([-3.0, -2.0, -1.0], [-6.0, -4.0, -2.5], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0])
    same(get_loss("aot")(batch).loss, base_dpo(batch))


# ==========================================================================================
# contract: shapes, registry, validation


@pytest.mark.parametrize("name", NAMES)
def test_shapes_and_metrics(name):
    batch = token_batch() if name in TOKEN_LOSSES else make(G_PC, G_PR, G_RC, G_RR, G_LC, G_LR)
    out = get_loss(name)(batch)
    b = batch.batch_size
    assert out.loss.shape == (b,)
    assert torch.isfinite(out.loss).all()
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert key in out.metrics
    for key, value in out.metrics.items():
        assert value.shape == (b,), key
        assert not value.requires_grad, key


@pytest.mark.parametrize("name", NAMES)
def test_registry_entry(name):
    spec = get_loss(name)
    assert spec.kind == "pairwise"
    assert spec.needs_reference is True
    assert spec.needs_tokens is (name in TOKEN_LOSSES)
    assert "loss" in spec.formula
    assert "(20" in spec.citation  # a year in parentheses
    assert "arXiv:" in spec.citation or name == "cdpo"
    assert "beta" in spec.hyperparameters and spec.hyperparameters["beta"] > 0


def test_default_rewards_are_beta_logratios():
    out = get_loss("dpo")(rows(), beta=0.1)
    assert out.metrics["rewards/chosen"].tolist() == pytest.approx([0.1 * w for w in LRW])
    assert out.metrics["rewards/rejected"].tolist() == pytest.approx([0.1 * w for w in LRL])
    assert out.metrics["rewards/accuracies"].tolist() == [1.0, 1.0, 0.0]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("beta", [0.0, -0.1, float("nan"), float("inf"), "0.1", True])
def test_bad_beta_raises(name, beta):
    batch = token_batch() if name in TOKEN_LOSSES else rows()
    with pytest.raises(ValueError, match="beta"):
        get_loss(name)(batch, beta=beta)


@pytest.mark.parametrize(
    "name,kw,match",
    [
        ("robust_dpo", {"label_smoothing": 0.5}, "label_smoothing"),
        ("robust_dpo", {"label_smoothing": -0.01}, "label_smoothing"),
        ("cdpo", {"label_smoothing": 0.5}, "label_smoothing"),
        ("cdpo", {"label_smoothing": -0.1}, "label_smoothing"),
        ("exo", {"label_smoothing": 0.0}, "label_smoothing"),
        ("exo", {"label_smoothing": 0.5}, "label_smoothing"),
        ("aot", {"label_smoothing": 0.5}, "label_smoothing"),
        ("aot_pair", {"label_smoothing": -0.1}, "label_smoothing"),
        ("discopop", {"tau": 0.0}, "tau"),
        ("length_dpo", {"alpha": -0.01}, "alpha"),
        ("ld_dpo", {"alpha": 1.5}, "alpha"),
        ("ld_dpo", {"alpha": -0.1}, "alpha"),
        ("f_dpo", {"divergence": "kl"}, "divergence"),
        ("f_dpo", {"divergence": "alpha_divergence", "alpha": 1.5}, "alpha"),
        ("f_dpo", {"divergence": "alpha_divergence", "alpha": -0.5}, "alpha"),
        ("bco_pair", {"reward_shift": float("nan")}, "reward_shift"),
    ],
)
def test_bad_hyperparameters_raise(name, kw, match):
    batch = token_batch() if name in TOKEN_LOSSES else rows()
    with pytest.raises(ValueError, match=match):
        get_loss(name)(batch, **kw)


@pytest.mark.parametrize("name", NAMES)
def test_missing_reference_raises(name):
    batch = token_batch() if name in TOKEN_LOSSES else rows()
    batch.ref_chosen = None
    with pytest.raises(ValueError, match="reference"):
        get_loss(name)(batch)


@pytest.mark.parametrize("name", sorted(TOKEN_LOSSES))
def test_missing_tokens_raises(name):
    with pytest.raises(ValueError, match="per-token"):
        get_loss(name)(rows())


def test_float32_and_module_functions():
    batch = make(G_PC, G_PR, G_RC, G_RR, G_LC, G_LR)
    batch32 = PairLogps(**{k: (v.float() if torch.is_tensor(v) else v) for k, v in vars(batch).items()})
    a = pw.dpo(batch32).loss
    assert a.dtype == torch.float32
    assert a.tolist() == pytest.approx(pw.dpo(batch).loss.tolist(), rel=1e-6)


# ------------------------------------------------------------------------------------------
# DPO-Positive


def test_dpop_values_with_and_without_the_penalty():
    # rows: lr_w = [1, 0.5, -1] -> penalty max(0, -lr_w) = [0, 0, 1]; h = [2, 1.5, -2]
    beta, lam = 0.1, 50.0
    expected = [-logsig(beta * (h - lam * max(0.0, -w))) for h, w in zip(H, LRW)]
    check("dpop", expected, beta=beta, lam=lam)
    out = get_loss("dpop")(rows(), beta=beta, lam=lam)
    assert out.metrics["penalty"].tolist() == pytest.approx([0.0, 0.0, 1.0])
    # lam = 0 is DPO exactly
    check("dpop", [-logsig(beta * h) for h in H], beta=beta, lam=0.0)


def test_dpop_gradient_on_the_chosen_grows_by_lam_once_below_the_reference():
    beta, lam = 0.1, 50.0
    for lr_w, active in ((0.5, False), (-0.5, True)):
        batch = make([lr_w], [-1.0], [0.0], [0.0], grad=True)
        get_loss("dpop")(batch, beta=beta, lam=lam).loss.sum().backward()
        z = beta * (lr_w + 1.0 - lam * max(0.0, -lr_w))
        # d/dpi_w of -log sigma(z) = -(1 - sigma(z)) * dz/dpi_w, dz/dpi_w = beta * (1 + lam) when active
        dz = beta * (1.0 + lam) if active else beta
        assert batch.policy_chosen.grad.item() == pytest.approx(-(1 - sig(z)) * dz)
        assert batch.policy_rejected.grad.item() == pytest.approx((1 - sig(z)) * beta)


def test_dpop_refuses_a_negative_lam():
    with pytest.raises(ValueError, match="lam"):
        get_loss("dpop")(rows(), lam=-1.0)


# ------------------------------------------------------------------------------------------
# LCPO (EM label weights) on DPO


def test_lcpo_weights_each_label_by_its_posterior_by_hand():
    beta, eps = 0.5, 0.2
    expected, weights = [], []
    for h in H:
        z = beta * h
        w = (1 - eps) * sig(z) / ((1 - eps) * sig(z) + eps * sig(-z))  # P(label right | policy), Bayes
        weights.append(w)
        expected.append(-w * logsig(z) - (1 - w) * logsig(-z))
    check("lcpo", expected, beta=beta, label_smoothing=eps)
    out = get_loss("lcpo")(rows(), beta=beta, label_smoothing=eps)
    assert out.metrics["lcpo/label_weight"].tolist() == pytest.approx(weights)
    # a label the policy contradicts (h = -2) weighs less than one it agrees with (h = 2)
    assert weights[2] < weights[0]
    check("lcpo", [-logsig(0.5 * h) for h in H], beta=0.5, label_smoothing=0.0)  # eps = 0: dpo


def test_lcpo_gradient_is_sigma_minus_the_held_weight():
    beta, eps = 0.5, 0.2
    batch = make(G_PC, G_PR, G_RC, G_RR, grad=True)
    get_loss("lcpo")(batch, beta=beta, label_smoothing=eps).loss.sum().backward()
    for i in range(3):
        z = beta * ((G_PC[i] - G_RC[i]) - (G_PR[i] - G_RR[i]))
        w = sig(z + math.log((1 - eps) / eps))
        # d/dz [-w log s(z) - (1-w) log s(-z)] = s(z) - w, with w held fixed
        assert batch.policy_chosen.grad[i].item() == pytest.approx(beta * (sig(z) - w))
        assert batch.policy_rejected.grad[i].item() == pytest.approx(-beta * (sig(z) - w))


def test_jpo_is_dpo_on_the_pair_it_is_given():
    """JPO's joint pairs differ in the data (each completion after its own prompt), not in the formula."""
    check("jpo", [-logsig(0.3 * h) for h in H], beta=0.3)
