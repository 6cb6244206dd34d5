"""Listwise losses by hand: SPPO's squared loss on win probabilities, Plackett-Luce DPO (DPO's appendix A.3)."""

import math

import pytest
import torch

from prefkit.losses import ListLogps, PairLogps, get_loss


def _batch(win):
    policy = torch.tensor([[-1.0, -2.0, -3.0]], requires_grad=True)
    ref = torch.tensor([[-1.5, -2.0, -2.0]])
    return ListLogps(
        policy=policy,
        ranking=torch.tensor([[0, 1, 2]]),
        length=torch.ones(1, 3),
        ref=ref,
        win_prob=torch.tensor([win]),
    ), policy


def test_sppo_by_hand():
    b, policy = _batch([0.9, 0.5, 0.1])
    out = get_loss("sppo")(b, beta=0.5)
    # log-ratios 0.5, 0, -1; targets (P - 1/2) / beta = 0.8, 0, -0.8
    expected = ((0.5 - 0.8) ** 2 + 0.0 + (-1.0 + 0.8) ** 2) / 3
    assert out.loss.item() == pytest.approx(expected)
    out.loss.sum().backward()
    # d/d policy_k of mean_k (lr_k - t_k)^2 = 2 (lr_k - t_k) / 3
    assert policy.grad[0].tolist() == pytest.approx([2 * (0.5 - 0.8) / 3, 0.0, 2 * (-1.0 + 0.8) / 3])


def test_sppo_with_hard_probabilities_on_two_samples_is_sppo_hard():
    """P in {0, 1} on a pair: the mean of the two squares is half of `sppo_hard`'s sum."""
    from prefkit.losses import PairLogps

    lst = ListLogps(
        policy=torch.tensor([[-1.0, -3.0]]),
        ranking=torch.tensor([[0, 1]]),
        length=torch.ones(1, 2),
        ref=torch.tensor([[-1.2, -2.5]]),
        win_prob=torch.tensor([[1.0, 0.0]]),
    )
    pair = PairLogps(
        policy_chosen=torch.tensor([-1.0]),
        policy_rejected=torch.tensor([-3.0]),
        chosen_len=torch.ones(1),
        rejected_len=torch.ones(1),
        ref_chosen=torch.tensor([-1.2]),
        ref_rejected=torch.tensor([-2.5]),
    )
    hard = get_loss("sppo_hard")(pair, beta=0.1).loss
    assert get_loss("sppo")(lst, beta=0.1).loss.item() == pytest.approx(hard.item() / 2)


def test_sppo_names_what_it_lacks():
    b, _ = _batch([0.5, 0.5, 0.5])
    b.win_prob = None
    with pytest.raises(ValueError, match="win_prob"):
        get_loss("sppo")(b)


def _lse(*xs):
    return math.log(sum(math.exp(x) for x in xs))


def test_pl_dpo_by_hand():
    policy = torch.tensor([[-1.0, -2.0, -3.0]], requires_grad=True)
    b = ListLogps(policy=policy, ranking=torch.tensor([[0, 2, 1]]), length=torch.ones(1, 3), ref=torch.zeros(1, 3))
    out = get_loss("pl_dpo")(b, beta=1.0)
    r = [-1.0, -3.0, -2.0]  # rewards in ranked order
    expected = (_lse(*r) - r[0]) + (_lse(r[1], r[2]) - r[1])
    assert out.loss.item() == pytest.approx(expected)
    out.loss.sum().backward()
    # d/dr of sum_k [lse_{j>=k} r_j - r_k]: softmax shares minus one for each ranked position
    p1 = [math.exp(x - _lse(*r)) for x in r]
    p2 = [0.0, math.exp(r[1] - _lse(r[1], r[2])), math.exp(r[2] - _lse(r[1], r[2]))]
    by_rank = [p1[i] + p2[i] - (1 if i < 2 else 0) for i in range(3)]
    grad = [by_rank[0], by_rank[2], by_rank[1]]  # back to completion order (ranking 0, 2, 1)
    assert policy.grad[0].tolist() == pytest.approx(grad)
    assert out.metrics["rewards/best"].item() == -1.0 and out.metrics["rewards/worst"].item() == -2.0
    assert out.metrics["rewards/accuracies"].item() == 1.0


def test_pl_dpo_on_two_items_is_dpo_and_skips_absent_completions():
    pol = torch.tensor([[-4.0, -6.0, 0.0]])
    ref = torch.tensor([[-5.0, -5.0, 0.0]])
    b = ListLogps(policy=pol, ranking=torch.tensor([[1, 0, -1]]), length=torch.ones(1, 3), ref=ref)
    pair = PairLogps(
        policy_chosen=pol[:, 1],
        policy_rejected=pol[:, 0],
        chosen_len=torch.ones(1),
        rejected_len=torch.ones(1),
        ref_chosen=ref[:, 1],
        ref_rejected=ref[:, 0],
    )
    assert get_loss("pl_dpo")(b, beta=0.3).loss.item() == pytest.approx(get_loss("dpo")(pair, beta=0.3).loss.item())


def test_pl_dpo_refuses_ties_and_a_missing_reference():
    levels = torch.tensor([[0, 0, 1]])
    b = ListLogps(torch.zeros(1, 3), torch.tensor([[0, 1, 2]]), torch.ones(1, 3), ref=torch.zeros(1, 3), levels=levels)
    with pytest.raises(ValueError, match="strict ranking"):
        get_loss("pl_dpo")(b)
    with pytest.raises(ValueError, match="needs the reference"):
        get_loss("pl_dpo")(ListLogps(torch.zeros(1, 2), torch.tensor([[0, 1]]), torch.ones(1, 2)))


# ------------------------------------------------------------------------------------------
# PRO (Song et al.)


def _pro_batch(scores=None, levels=None):
    # completions 0, 1, 2 ranked 2 > 0 > 1; summed log-probs and lengths give means s = [-1, -2, -0.5]
    policy = torch.tensor([[-2.0, -6.0, -2.0]], requires_grad=True)
    length = torch.tensor([[2.0, 3.0, 4.0]])
    return ListLogps(
        policy=policy,
        ranking=torch.tensor([[2, 0, 1]]),
        length=length,
        scores=None if scores is None else torch.tensor([scores]),
        levels=levels,
    ), policy


def test_pro_without_scores_is_the_plackett_luce_likelihood_plus_sft_by_hand():
    b, policy = _pro_batch()
    out = get_loss("pro")(b, sft_weight=0.05)
    s = [-0.5, -1.0, -2.0]  # ranked order
    rank = (_lse(*s) - s[0]) + (_lse(s[1], s[2]) - s[1])
    expected = rank + 0.05 * (3 - 1) ** 2 * (-s[0])
    assert out.loss.item() == pytest.approx(expected)
    assert out.metrics["rank_loss"].item() == pytest.approx(rank)
    out.loss.sum().backward()
    # d/ds: softmax shares minus one per ranked position; the SFT term adds -0.2 to the best; d s / d policy = 1/len
    p1 = [math.exp(x - _lse(*s)) for x in s]
    p2 = [0.0] + [math.exp(x - _lse(s[1], s[2])) for x in s[1:]]
    ds = [p1[0] - 1 - 0.2, p1[1] + p2[1] - 1, p1[2] + p2[2]]
    grad = [ds[1] / 2, ds[2] / 3, ds[0] / 4]  # back to completion order 0, 1, 2
    assert policy.grad[0].tolist() == pytest.approx(grad)


def test_pro_dynamic_temperature_by_hand():
    b, _ = _pro_batch(scores=[2.0, 0.5, 3.0])  # ranked order r = [3, 2, 0.5]
    out = get_loss("pro")(b, sft_weight=0.0)
    s, r = [-0.5, -1.0, -2.0], [3.0, 2.0, 0.5]
    t01, t02, t12 = r[0] - r[1], r[0] - r[2], r[1] - r[2]
    first = _lse(s[0] * max(t01, t02), s[1] * t01, s[2] * t02) - s[0] * max(t01, t02)
    second = _lse(s[1] * t12, s[2] * t12) - s[1] * t12
    assert out.loss.item() == pytest.approx(first + second)
    # switched off, the scores are ignored
    plain = get_loss("pro")(b, sft_weight=0.0, dynamic_temperature=False).loss.item()
    assert plain == pytest.approx((_lse(*s) - s[0]) + (_lse(s[1], s[2]) - s[1]))


def test_pro_on_two_items_is_a_logistic_loss_scaled_by_the_reward_gap():
    b = ListLogps(
        policy=torch.tensor([[-3.0, -1.0]]),
        ranking=torch.tensor([[0, 1]]),
        length=torch.ones(1, 2),
        scores=torch.tensor([[1.5, -0.5]]),
    )
    expected = -math.log(1 / (1 + math.exp(-2.0 * (-3.0 + 1.0))))
    assert get_loss("pro")(b, sft_weight=0.0).loss.item() == pytest.approx(expected)


def test_pro_refuses_ties_disagreeing_scores_and_partial_scores():
    b, _ = _pro_batch(levels=torch.tensor([[0, 1, 0]]))
    with pytest.raises(ValueError, match="strict ranking"):
        get_loss("pro")(b)
    b, _ = _pro_batch(scores=[2.0, 3.0, 4.0])  # completion 1 ranked last but scores above completion 0
    with pytest.raises(ValueError, match="disagree"):
        get_loss("pro")(b)
    b, _ = _pro_batch(scores=[2.0, float("nan"), 3.0])
    with pytest.raises(ValueError, match="some of its completions"):
        get_loss("pro")(b)


# ------------------------------------------------------------------------------------------
# LiPO-lambda (Liu et al.)


def _lambda_loss_by_hand(s, psi):
    """sum over psi_i > psi_j of |G_i - G_j| |1/log2(1 + tau_i) - 1/log2(1 + tau_j)| * -log sigma(s_i - s_j)."""
    order = sorted(range(len(s)), key=lambda i: -s[i])
    tau = {i: pos + 1 for pos, i in enumerate(order)}
    total, grads = 0.0, [0.0] * len(s)
    for i in range(len(s)):
        for j in range(len(s)):
            if psi[i] > psi[j]:
                w = abs((2 ** psi[i] - 1) - (2 ** psi[j] - 1)) * abs(
                    1 / math.log2(1 + tau[i]) - 1 / math.log2(1 + tau[j])
                )
                total += w * math.log1p(math.exp(-(s[i] - s[j])))
                g = w * (1 / (1 + math.exp(s[i] - s[j])))  # d/ds_i of -log sigma(s_i - s_j) is -g / w * w
                grads[i] -= g
                grads[j] += g
    return total, grads


def test_lipo_with_graded_scores_by_hand():
    policy = torch.tensor([[-1.0, -3.0, -2.0, -4.0]], requires_grad=True)
    ref = torch.tensor([[-2.0, -2.0, -2.0, -2.0]])
    scores = [0.9, 0.2, 0.6, 0.2]  # ranking 0 > 2 > {1, 3}
    b = ListLogps(
        policy=policy,
        ranking=torch.tensor([[0, 2, 1, 3]]),
        length=torch.ones(1, 4),
        ref=ref,
        levels=torch.tensor([[0, 2, 1, 2]]),
        scores=torch.tensor([scores]),
    )
    beta = 0.5
    out = get_loss("lipo")(b, beta=beta)
    s = [beta * (p - r) for p, r in zip([-1.0, -3.0, -2.0, -4.0], [-2.0] * 4)]
    expected, grad_s = _lambda_loss_by_hand(s, scores)
    assert out.loss.item() == pytest.approx(expected)
    out.loss.sum().backward()
    assert policy.grad[0].tolist() == pytest.approx([beta * g for g in grad_s])
    # the tied pair (1, 3) adds nothing; the policy orders all 5 labelled pairs right
    assert out.metrics["rewards/accuracies"].item() == pytest.approx(1.0)


def test_lipo_without_scores_labels_each_completion_by_the_share_it_beats():
    policy = torch.tensor([[-3.0, -1.0, -2.0]])
    b = ListLogps(
        policy=policy,
        ranking=torch.tensor([[0, 1, 2]]),
        length=torch.ones(1, 3),
        ref=torch.zeros(1, 3),
        levels=torch.tensor([[0, 1, 1]]),  # 0 best, 1 and 2 tied
    )
    s = [-0.3, -0.1, -0.2]
    psi = [1.0, 0.25, 0.25]  # beats both; each of the tied ones beats nothing and ties one
    expected, _ = _lambda_loss_by_hand(s, psi)
    assert get_loss("lipo")(b, beta=0.1).loss.item() == pytest.approx(expected)


def test_lipo_on_two_items_is_dpo_times_the_ndcg_gap():
    pol, ref = torch.tensor([[-4.0, -6.0]]), torch.tensor([[-5.0, -5.0]])
    b = ListLogps(policy=pol, ranking=torch.tensor([[1, 0]]), length=torch.ones(1, 2), ref=ref)
    pair = PairLogps(
        policy_chosen=pol[:, 1],
        policy_rejected=pol[:, 0],
        chosen_len=torch.ones(1),
        rejected_len=torch.ones(1),
        ref_chosen=ref[:, 1],
        ref_rejected=ref[:, 0],
    )
    dpo = get_loss("dpo")(pair, beta=0.3).loss.item()
    assert get_loss("lipo")(b, beta=0.3).loss.item() == pytest.approx((1 - 1 / math.log2(3)) * dpo)


def test_lipo_skips_absent_completions_and_needs_a_reference():
    b = ListLogps(
        policy=torch.tensor([[-1.0, -2.0, 99.0]]),
        ranking=torch.tensor([[0, 1, -1]]),
        length=torch.ones(1, 3),
        ref=torch.zeros(1, 3),
    )
    s = [-0.1, -0.2]
    expected, _ = _lambda_loss_by_hand(s, [1.0, 0.0])
    assert get_loss("lipo")(b, beta=0.1).loss.item() == pytest.approx(expected)
    with pytest.raises(ValueError, match="needs the reference"):
        get_loss("lipo")(ListLogps(torch.zeros(1, 2), torch.tensor([[0, 1]]), torch.ones(1, 2)))


def test_pro_with_scores_is_finite_with_gradients_on_padded_lists():
    policy = torch.tensor([[-2.0, -6.0, 5.0], [-1.0, -3.0, -2.0]], requires_grad=True)
    b = ListLogps(
        policy=policy,
        ranking=torch.tensor([[1, 0, -1], [0, 2, 1]]),
        length=torch.ones(2, 3),
        scores=torch.tensor([[0.5, 1.0, float("nan")], [3.0, 1.0, 2.0]]),
    )
    out = get_loss("pro")(b)
    out.loss.sum().backward()
    assert torch.isfinite(out.loss).all() and torch.isfinite(policy.grad).all()
    assert policy.grad[0, 2].item() == 0.0  # the absent completion gets no gradient
    # the two-item list: -log sigma((r_1 - r_0) (s_1 - s_0)) + 0.05 * 1 * (-s_1)
    z = 0.5 * (-6.0 + 2.0)
    assert out.loss[0].item() == pytest.approx(math.log1p(math.exp(-z)) + 0.05 * 6.0)
