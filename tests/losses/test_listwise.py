"""Listwise losses by hand: SPPO's squared loss on win probabilities."""

import pytest
import torch

from prefkit.losses import ListLogps, get_loss


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
