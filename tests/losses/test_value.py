"""PPO's critic-side objectives against hand-computed values: GAE, whitening, the clipped value loss."""

import pytest
import torch

from prefkit.losses.value import gae, value_loss, whiten


def test_gae_by_hand():
    # one row: prompt at 0-1, completion at 2-4, padding at 5
    mask = torch.tensor([[0, 0, 1, 1, 1, 0]], dtype=torch.float32)
    rewards = torch.tensor([[9.0, 9.0, 0.1, -0.2, 1.0, 9.0]])  # prompt and padding entries are ignored
    values = torch.tensor([[5.0, 5.0, 0.5, 0.4, 0.3, 5.0]])
    gamma, lam = 0.9, 0.8
    d4 = 1.0 + gamma * 0.0 - 0.3
    d3 = -0.2 + gamma * 0.3 - 0.4
    d2 = 0.1 + gamma * 0.4 - 0.5
    a4 = d4
    a3 = d3 + gamma * lam * a4
    a2 = d2 + gamma * lam * a3
    adv, ret = gae(rewards, values, mask, gamma=gamma, lam=lam)
    assert adv[0].tolist() == pytest.approx([0, 0, a2, a3, a4, 0])
    assert ret[0].tolist() == pytest.approx([0, 0, a2 + 0.5, a3 + 0.4, a4 + 0.3, 0])


def test_gae_limits():
    """lam = 1, gamma = 1: A_t = (sum of rewards from t on) - V_t (Monte-Carlo); lam = 0: the one-step TD error."""
    mask = torch.ones(2, 4)
    g = torch.Generator().manual_seed(0)
    rewards, values = torch.randn(2, 4, generator=g), torch.randn(2, 4, generator=g)
    mc, _ = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    tail = rewards.flip(1).cumsum(1).flip(1)
    assert torch.allclose(mc, tail - values, atol=1e-6)
    td, _ = gae(rewards, values, mask, gamma=1.0, lam=0.0)
    next_values = torch.cat([values[:, 1:], torch.zeros(2, 1)], dim=1)
    assert torch.allclose(td, rewards + next_values - values, atol=1e-6)


def test_whiten_by_hand():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    out = whiten(x, mask, eps=0.0)
    assert out[0].tolist() == pytest.approx([-1.0, 0.0, 1.0, 0.0])  # mean 2, unbiased sd 1
    assert whiten(x, mask, shift_mean=False, eps=0.0)[0].tolist() == pytest.approx([1.0, 2.0, 3.0, 0.0])


def test_value_loss_by_hand():
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    old = torch.tensor([[0.0, 0.0, 0.0]])
    returns = torch.tensor([[1.0, -1.0, 7.0]])
    values = torch.tensor([[0.5, 0.1, 3.0]])
    # token 0: unclipped (0.5-1)^2 = 0.25, clipped value 0.2 -> (0.2-1)^2 = 0.64: max 0.64
    # token 1: unclipped (0.1+1)^2 = 1.21, clipped value 0.1 (inside) -> 1.21
    assert value_loss(values, old, returns, mask, clip=0.2).item() == pytest.approx(0.5 * (0.64 + 1.21) / 2)
    assert value_loss(values, old, returns, mask, clip=None).item() == pytest.approx(0.5 * (0.25 + 1.21) / 2)
