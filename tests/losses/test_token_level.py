"""Token-level losses by hand: TDPO1 / TDPO2 (Zeng et al. 2024) and the per-token weighting hook they share."""

import math

import pytest
import torch

from prefkit.losses import PairLogps, get_loss
from prefkit.losses.token_level import sequence_kl, token_dpo, weighted_log_ratios

# two pairs; chosen has 3 / 2 tokens, rejected 2 / 3 (T = 3)
CM = [[1, 1, 1], [1, 1, 0]]
RM = [[1, 1, 0], [1, 1, 1]]
PC = [[-1.0, -0.5, -2.0], [-0.2, -0.4, 0.0]]
RC = [[-1.2, -0.7, -1.5], [-0.3, -0.1, 0.0]]
PR = [[-2.0, -1.0, 0.0], [-0.9, -0.6, -1.1]]
RR = [[-1.5, -1.1, 0.0], [-1.0, -0.2, -0.8]]
KC = [[0.02, 0.05, 0.01], [0.03, 0.00, 0.0]]
KR = [[0.10, 0.04, 0.0], [0.06, 0.02, 0.07]]


def batch(grad=False):
    t = lambda x, g=False: torch.tensor(x, dtype=torch.float64, requires_grad=g)  # noqa: E731
    pc, pr, kc, kr = t(PC, grad), t(PR, grad), t(KC, grad), t(KR, grad)
    cm, rm = t(CM), t(RM)
    return PairLogps(
        policy_chosen=(pc * cm).sum(1),
        policy_rejected=(pr * rm).sum(1),
        chosen_len=cm.sum(1),
        rejected_len=rm.sum(1),
        ref_chosen=(t(RC) * cm).sum(1),
        ref_rejected=(t(RR) * rm).sum(1),
        policy_chosen_tokens=pc,
        policy_rejected_tokens=pr,
        ref_chosen_tokens=t(RC),
        ref_rejected_tokens=t(RR),
        chosen_mask=cm,
        rejected_mask=rm,
        chosen_kl=kc,
        rejected_kl=kr,
    )


def by_hand(i):
    lr_w = sum((p - r) * m for p, r, m in zip(PC[i], RC[i], CM[i]))
    lr_l = sum((p - r) * m for p, r, m in zip(PR[i], RR[i], RM[i]))
    kl_w = sum(k * m for k, m in zip(KC[i], CM[i]))
    kl_l = sum(k * m for k, m in zip(KR[i], RM[i]))
    return lr_w, lr_l, kl_w, kl_l


def nls(x):  # -log sigma(x)
    return math.log1p(math.exp(-x))


def test_tdpo1_and_tdpo2_by_hand():
    beta, alpha = 0.3, 0.5
    t1 = get_loss("tdpo1")(batch(), beta=beta)
    t2 = get_loss("tdpo2")(batch(), beta=beta, alpha=alpha)
    for i in range(2):
        lr_w, lr_l, kl_w, kl_l = by_hand(i)
        assert t1.loss[i].item() == pytest.approx(nls(beta * (lr_w - lr_l) - beta * (kl_l - kl_w)))
        assert t2.loss[i].item() == pytest.approx(nls(beta * (lr_w - lr_l) - alpha * beta * (kl_l - kl_w)))
        # TDPO logs beta * (log-ratio + sequential KL) as the rewards
        assert t2.metrics["rewards/chosen"][i].item() == pytest.approx(beta * (lr_w + kl_w))
        assert t2.metrics["kl/rejected"][i].item() == pytest.approx(kl_l)


def test_tdpo2_holds_the_chosen_kl_fixed_and_tdpo1_does_not():
    beta, alpha = 0.3, 0.5
    b = batch(grad=True)
    get_loss("tdpo2")(b, beta=beta, alpha=alpha).loss.sum().backward()
    assert b.chosen_kl.grad is None  # detached: no gradient reaches the chosen completion's KL
    # d/dKL_l,t of -log sigma(u) = (1 - sigma(u)) * alpha * beta on the rejected's real tokens
    for i in range(2):
        lr_w, lr_l, kl_w, kl_l = by_hand(i)
        u = beta * (lr_w - lr_l) - alpha * beta * (kl_l - kl_w)
        g = (1 - 1 / (1 + math.exp(-u))) * alpha * beta
        assert b.rejected_kl.grad[i].tolist() == pytest.approx([g * m for m in RM[i]])
    b = batch(grad=True)
    get_loss("tdpo1")(b, beta=beta).loss.sum().backward()
    assert torch.all(b.chosen_kl.grad[torch.tensor(CM).bool()] < 0)  # more chosen KL lowers the loss


def test_tdpo2_without_the_kl_term_is_dpo_and_the_hook_weights_tokens():
    b = batch()
    dpo = get_loss("dpo")(b, beta=0.2).loss
    assert torch.allclose(get_loss("tdpo2")(b, beta=0.2, alpha=0.0).loss, dpo)
    # weights 0 on every token but the first: the margin is the first tokens' log-ratios
    w = torch.zeros(2, 3, dtype=torch.float64)
    w[:, 0] = 1.0
    lr_w, lr_l = weighted_log_ratios(b, w, w)
    assert lr_w.tolist() == pytest.approx([PC[0][0] - RC[0][0], PC[1][0] - RC[1][0]])
    assert lr_l.tolist() == pytest.approx([PR[0][0] - RR[0][0], PR[1][0] - RR[1][0]])
    kl_w, kl_l = sequence_kl(b, w, 2 * w)
    assert kl_w.tolist() == pytest.approx([0.02, 0.03]) and kl_l.tolist() == pytest.approx([0.20, 0.12])
    out = token_dpo(b, beta=0.2, loss="custom", weights=(w, w))
    assert out.loss[0].item() == pytest.approx(nls(0.2 * ((PC[0][0] - RC[0][0]) - (PR[0][0] - RR[0][0]))))


def test_tdpo_names_what_the_batch_lacks():
    b = batch()
    b.chosen_kl = None
    with pytest.raises(ValueError, match="needs \\['chosen_kl'\\]"):
        get_loss("tdpo1")(b)
    with pytest.raises(ValueError, match="alpha must be >= 0"):
        get_loss("tdpo2")(batch(), alpha=-1.0)


# token masks (SparsePO's reward mask U, KL mask D) on the same two pairs
UC = [[0.0, 1.5, 0.5], [2.0, 0.0, 9.0]]  # the 9.0 sits on a padding position: ignored
UR = [[1.0, 0.0, 7.0], [0.5, 0.5, 1.0]]
DC = [[1.0, 0.0, 2.0], [0.5, 0.5, 0.0]]
DR = [[0.0, 1.0, 0.0], [1.0, 0.0, 3.0]]


def masked_batch():
    b = batch()
    t = lambda x: torch.tensor(x, dtype=torch.float64)  # noqa: E731
    b.chosen_weights, b.rejected_weights = t(UC), t(UR)
    b.chosen_kl_weights, b.rejected_kl_weights = t(DC), t(DR)
    return b


def test_sparsepo_and_mapo_by_hand():
    beta, lu, ld = 0.4, 0.01, 0.02
    out = get_loss("sparsepo")(masked_batch(), beta=beta, l1_reward=lu, l1_kl=ld)
    for i in range(2):

        def dot(x, w, m):
            return sum(a * b * c for a, b, c in zip(x, w, m))

        u = dot([p - r for p, r in zip(PC[i], RC[i])], UC[i], CM[i]) - dot(
            [p - r for p, r in zip(PR[i], RR[i])], UR[i], RM[i]
        )
        kl = dot(KC[i], DC[i], CM[i]) - dot(KR[i], DR[i], RM[i])  # KL_w - KL_l, masked
        l1 = lu * (dot([1] * 3, UC[i], CM[i]) + dot([1] * 3, UR[i], RM[i]))
        l1 += ld * (dot([1] * 3, DC[i], CM[i]) + dot([1] * 3, DR[i], RM[i]))
        assert out.loss[i].item() == pytest.approx(nls(beta * (u + kl)) + l1)
    # masks of ones and no L1: TDPO1; mapo is the same formula with the batch's masks
    ones = batch()
    ones.chosen_weights = ones.rejected_weights = ones.chosen_kl_weights = ones.rejected_kl_weights = torch.ones(2, 3)
    tdpo1 = get_loss("tdpo1")(batch(), beta=beta).loss
    assert torch.allclose(get_loss("sparsepo")(ones, beta=beta).loss, tdpo1)
    assert torch.allclose(get_loss("mapo")(ones, beta=beta).loss, tdpo1)
    # sparsity: chosen pair 0 has one zero among 3 tokens, rejected pair 0 one zero among 2 -> 2 of 5
    assert out.metrics["mask/reward_sparsity"][0].item() == pytest.approx(2 / 5)
    with pytest.raises(ValueError, match="needs \\['chosen_weights'"):
        get_loss("sparsepo")(batch(), beta=beta)
