"""Mixture of Bradley-Terry by EM (MaxMin-RLHF): planted user groups are recovered, the EM
objective never decreases, MaxMin reporting helpers, save/load."""

import math

import pytest
import torch
import torch.nn.functional as F

from prefkit.models.embeddings import EmbeddedPairs
from prefkit.models.mixture import MixtureBT, group_accuracy, maxmin_weights, spherical_kmeans, worst_group


def planted(truths, n_users, pairs_per_user=30, noise_scale=None, seed=0):
    """Users of ``len(truths)`` groups; group g's reward is ``truths[g] . x``. Labels follow the
    true reward (separable) or, with ``noise_scale``, Bradley-Terry with that reward scale."""
    g = torch.Generator().manual_seed(seed)
    dim = truths.shape[1]
    groups = [k for k, n in enumerate(n_users) for _ in range(n)]
    users = [f"g{k}-u{j:02d}" for k, n in enumerate(n_users) for j in range(n)]  # sorted, grouped
    user_index = torch.arange(len(users)).repeat_interleave(pairs_per_user)
    group = torch.tensor(groups)[user_index]
    a = torch.randn(len(user_index), dim, generator=g)
    b = torch.randn(len(user_index), dim, generator=g)
    margin = ((a - b) * truths[group]).sum(-1)
    if noise_scale is None:
        a_first = margin > 0
    else:
        a_first = torch.rand(len(user_index), generator=g) < torch.sigmoid(noise_scale * margin)
    a_first = a_first[:, None]
    pairs = EmbeddedPairs(torch.where(a_first, a, b), torch.where(a_first, b, a), user_index, users, group=group)
    return pairs, torch.tensor(groups)


def opposite_groups(n_users=(14, 6), seed=0):
    direction = F.normalize(torch.randn(8, generator=torch.Generator().manual_seed(seed)), dim=0)
    return planted(torch.stack([direction, -direction]), n_users, seed=seed)


def matched(predicted, true):
    """Fraction of users in their planted group, under the better of the two group labellings."""
    return max(float((predicted == true).float().mean()), float((predicted == 1 - true).float().mean()))


def assert_non_decreasing(history, tol=1e-5):
    assert all(b >= a - tol for a, b in zip(history, history[1:])), history


def test_em_recovers_two_opposite_groups_of_unequal_size():
    pairs, true_group = opposite_groups()  # 70 % / 30 % of the users
    model = MixtureBT(8, 2)
    history = model.fit(pairs, iters=30)
    assert_non_decreasing(history)
    predicted = model.predict_group(pairs.users)
    assert matched(predicted, true_group) == 1.0
    # groups are named by the model's labels: map planted group -> fitted group for the report
    fitted_group = predicted[pairs.user_index]
    per_group = group_accuracy(model.pair_correct(pairs), fitted_group)
    assert min(per_group.values()) > 0.9, per_group
    assert sorted(model.mixing_weights.tolist()) == pytest.approx([0.3, 0.7], abs=1e-4)
    # a single pooled Bradley-Terry model serves the majority and fails the minority
    pooled = MixtureBT(8, 1)
    pooled.fit(pairs, iters=5)
    pooled_per_group = group_accuracy(pooled.pair_correct(pairs), pairs.group)
    assert worst_group(pooled_per_group)[1] < 0.2 < 0.9 < pooled_per_group[0], pooled_per_group


def test_em_objective_never_decreases_on_noisy_overlapping_groups_with_mlp_heads():
    g = torch.Generator().manual_seed(1)
    truths = F.normalize(torch.randn(3, 6, generator=g), dim=-1)
    pairs, true_group = planted(truths, (8, 8, 8), pairs_per_user=25, noise_scale=3.0, seed=1)
    model = MixtureBT(6, 3, hidden_size=8)
    history = model.fit(pairs, iters=15, m_steps=10)
    assert len(history) > 3  # EM had work to do
    assert_non_decreasing(history)
    assert torch.allclose(model.responsibilities.sum(-1), torch.ones(24))
    assert model.mixing_weights.sum().item() == pytest.approx(1.0)


def test_e_step_responsibilities_by_hand():
    # one-dimensional embeddings, heads r_0(x) = x and r_1(x) = -x, pi = (0.5, 0.5)
    model = MixtureBT(1, 2)
    model.users = ["a", "b"]
    with torch.no_grad():
        model.heads[0].weight.fill_(1.0)
        model.heads[1].weight.fill_(-1.0)
    # user a: one pair, chosen 1 vs rejected 0 -> logits (+1, -1);
    # gamma_a0 = sigma(1) / (sigma(1) + sigma(-1)) = sigma(1) = 0.7311
    # user b: two pairs, chosen 0 vs rejected 1 -> logits (-1, +1) twice;
    # gamma_b0 = sigma(-1)^2 / (sigma(-1)^2 + sigma(1)^2) = 0.0723 / (0.0723 + 0.5344) = 0.1192
    pairs = EmbeddedPairs(
        torch.tensor([[1.0], [0.0], [0.0]]), torch.tensor([[0.0], [1.0], [1.0]]), torch.tensor([0, 1, 1]), ["a", "b"]
    )
    rows = torch.tensor([0, 1, 1])
    objective = model._e_step(pairs, rows, torch.tensor([True, True]), l2=0.0)
    s = torch.sigmoid(torch.tensor(1.0)).item()
    expected = torch.tensor([[s, 1 - s], [(1 - s) ** 2 / ((1 - s) ** 2 + s**2), s**2 / ((1 - s) ** 2 + s**2)]])
    torch.testing.assert_close(model.responsibilities, expected)
    assert model.responsibilities[1, 0].item() == pytest.approx(0.1192, abs=1e-4)
    # J = (log(0.5 s + 0.5 (1 - s)) + log(0.5 (1-s)^2 + 0.5 s^2)) / 3 = (log 0.5 + log 0.3033) / 3
    assert objective == pytest.approx((math.log(0.5) + math.log(0.5 * ((1 - s) ** 2 + s**2))) / 3, abs=1e-6)
    assert model.predict_group(["b", "a"]).tolist() == [1, 0]


def test_maxmin_helpers():
    rewards = torch.tensor([0.2, -0.5, 0.1])
    assert maxmin_weights(rewards).tolist() == [0.0, 1.0, 0.0]
    soft = maxmin_weights(rewards, temperature=1.0)
    # softmax(-r): exp(-0.2), exp(0.5), exp(-0.1) normalised
    expected = torch.tensor([math.exp(-0.2), math.exp(0.5), math.exp(-0.1)])
    torch.testing.assert_close(soft, expected / expected.sum())
    assert maxmin_weights(rewards, temperature=1e-3).argmax().item() == 1
    assert worst_group({0: 0.9, 1: 0.4, 2: 0.7}) == (1, 0.4)
    correct = torch.tensor([True, False, True, True, False])
    assert group_accuracy(correct, torch.tensor([0, 0, 1, 1, -1])) == {0: 0.5, 1: 1.0}
    with pytest.raises(ValueError, match="temperature"):
        maxmin_weights(rewards, temperature=-1.0)
    with pytest.raises(ValueError, match="no groups"):
        worst_group({})


def test_spherical_kmeans_separates_opposite_directions():
    x = F.normalize(torch.tensor([[1.0, 0.1], [1.0, -0.1], [-1.0, 0.2], [-1.0, 0.0]]), dim=-1)
    labels = spherical_kmeans(x, 2, seed=0)
    assert labels[0] == labels[1] and labels[2] == labels[3] and labels[0] != labels[2]


def test_save_load_round_trip_and_unknown_users(tmp_path):
    pairs, _ = opposite_groups(n_users=(3, 3))
    model = MixtureBT(8, 2, hidden_size=4)
    model.fit(pairs, iters=3)
    model.save_pretrained(str(tmp_path / "mix"))
    loaded = MixtureBT.from_pretrained(str(tmp_path / "mix"))
    assert loaded.users == model.users
    torch.testing.assert_close(loaded.responsibilities, model.responsibilities)
    with torch.no_grad():
        torch.testing.assert_close(loaded.pair_logits(pairs), model.pair_logits(pairs))
        torch.testing.assert_close(
            loaded.user_reward(pairs.chosen[:2], ["g0-u00"] * 2), model.user_reward(pairs.chosen[:2], ["g0-u00"] * 2)
        )
    with pytest.raises(KeyError, match="unknown to the model"):
        model.predict_group(["nobody"])
    from prefkit.models.pal import PAL

    with pytest.raises(ValueError, match="holds a 'prefkit_mixture_bt' model"):
        PAL.from_pretrained(str(tmp_path / "mix"))


def test_bad_input_is_refused():
    pairs = EmbeddedPairs(torch.zeros(2, 4), torch.ones(2, 4), torch.tensor([0, -1]), ["a"])
    with pytest.raises(ValueError, match="1 of 2 pairs have no user_id"):
        MixtureBT(4, 2).fit(pairs)
    with pytest.raises(ValueError, match="size 4, the model's dim is 3"):
        MixtureBT(3, 2).fit(pairs)
    with pytest.raises(ValueError, match="l2 >= 0"):
        MixtureBT(4, 2).fit(pairs.subset([0]), l2=-1.0)
