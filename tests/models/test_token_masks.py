"""SparsePO's learned token masks and MaPO's activation masks (prefkit.models.token_masks)."""

import pytest
import torch

from prefkit.models.token_masks import SparseTokenMask, activation_mask


def test_activation_mask_by_hand():
    # one layer, H = 2: per-token means 1, 3, 2 on the 3 completion tokens (the 4th is padding)
    h = torch.tensor([[[0.0, 2.0], [2.0, 4.0], [1.0, 3.0], [50.0, 50.0]]])
    mask = torch.tensor([[1, 1, 1, 0]])
    out = activation_mask([h], mask)
    # z-normalised (mean 2, unbiased sd 1): -1, 1, 0; rescaled to [0, 1]: 0, 1, 0.5; padding 0
    assert out.tolist() == [[0.0, 1.0, 0.5, 0.0]]
    # two layers are averaged; a flat layer weighs every completion token 1
    flat = torch.ones(1, 4, 2)
    assert activation_mask([h, flat], mask).tolist() == [[0.5, 1.0, 0.75, 0.0]]


def test_sparse_token_mask_shapes_common_and_independent():
    torch.manual_seed(0)
    states = [torch.randn(7, 16) for _ in range(3)]
    common = SparseTokenMask(16, 3, dropout=0.0).eval()
    reward, kl = common(states)
    assert reward.shape == (7,) and (reward >= 0).all() and reward is kl
    # linear layers start as transformers starts them: normal(0, 0.02), zero biases
    assert common.reward.per_layer[0].bias.abs().max() == 0 and common.reward.mixer.weight.std() < 0.1
    indp = SparseTokenMask(16, 3, independent=True, dropout=0.0).eval()
    with torch.no_grad():  # a positive mixer, so that both masks are non-zero here
        indp.reward.mixer.weight.fill_(1.0)
        indp.kl.mixer.weight.fill_(1.0)
    reward, kl = indp(states)
    assert not torch.equal(reward, kl) and (kl >= 0).all()
    # gradients reach the mask's parameters
    reward.sum().backward()
    assert indp.reward.per_layer[0].weight.grad is not None
    with pytest.raises(ValueError, match="reads 3 layers"):
        indp(states[:2])
