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
