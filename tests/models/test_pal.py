"""PAL on planted prototype worlds: recovered user weights, held-out accuracy, few-shot fitting of
unseen users, save/load."""

import itertools

import pytest
import torch
import torch.nn.functional as F

from prefkit.models.embeddings import EmbeddedPairs
from prefkit.models.pal import PAL


def planted_weights(n_users, k, generator):
    """Every third user at a vertex (one-hot), the others uniform random mixtures."""
    rows = []
    for u in range(n_users):
        if u % 3 == 0:
            rows.append(F.one_hot(torch.tensor((u // 3) % k), k).float())
        else:
            e = torch.rand(k, generator=generator)
            rows.append(e / e.sum())
    return torch.stack(rows)


def true_reward(variant, prototypes, x, weights, scale=4.0):
    if variant == "mixture":
        return scale * ((x @ prototypes.T) * weights).sum(-1)
    return -scale * (x - weights @ prototypes).pow(2).sum(-1)


def sample_pairs(variant, prototypes, weights, per_user, generator, first_user=0):
    """Random items in R^6 labelled by Bradley-Terry with each user's true reward."""
    n_users, dim = weights.shape[0], prototypes.shape[1]
    users = [f"u{first_user + u:03d}" for u in range(n_users)]
    user_index = torch.arange(n_users).repeat_interleave(per_user)
    a, b = (
        torch.randn(len(user_index), dim, generator=generator),
        torch.randn(len(user_index), dim, generator=generator),
    )
    w = weights[user_index]
    p_a = torch.sigmoid(true_reward(variant, prototypes, a, w) - true_reward(variant, prototypes, b, w))
    a_first = (torch.rand(len(user_index), generator=generator) < p_a)[:, None]
    return EmbeddedPairs(torch.where(a_first, a, b), torch.where(a_first, b, a), user_index, users)


def world(variant, k, n_users, per_user, seed=0):
    g = torch.Generator().manual_seed(seed)
    prototypes = torch.randn(k, 6, generator=g)
    if variant == "mixture":
        prototypes = F.normalize(prototypes, dim=-1)
    weights = planted_weights(n_users, k, g)
    train = sample_pairs(variant, prototypes, weights, per_user, g)
    test = sample_pairs(variant, prototypes, weights, per_user, g)
    return train, test, weights, prototypes, g


def matched_error(true, estimate):
    """Mean absolute error of the weights under the best relabelling of the prototypes."""
    k = true.shape[1]
    return min(float((true - estimate[:, list(p)]).abs().mean()) for p in itertools.permutations(range(k)))


def accuracy(logits):
    return float((logits > 0).float().mean())


@pytest.mark.parametrize(("variant", "k"), [("ideal_point", 3), ("mixture", 2)])
def test_planted_user_weights_are_recovered(variant, k):
    train, test, weights, _, _ = world(variant, k, n_users=45, per_user=40)
    torch.manual_seed(0)
    model = PAL(6, k, variant=variant)
    history = model.fit(train, epochs=200, lr=0.03, batch_size=400)
    assert history[-1] < history[0]
    estimate = model.user_weights().detach()
    assert torch.allclose(estimate.sum(-1), torch.ones(45))  # on the simplex
    # measured: ideal_point k=3 0.11, mixture k=2 0.10; uniform weights would be 0.26 and 0.27
    assert matched_error(weights, estimate) < 0.15
    with torch.no_grad():
        held_out = accuracy(model.pair_logits(test))
        oracle = accuracy(true_reward_logits(variant, train, test, weights))
    assert held_out > oracle - 0.05


def true_reward_logits(variant, train, test, weights):
    g = torch.Generator().manual_seed(0)  # the same prototypes as world(..., seed=0)
    prototypes = torch.randn(weights.shape[1], 6, generator=g)
    if variant == "mixture":
        prototypes = F.normalize(prototypes, dim=-1)
    w = weights[test.user_index]
    return true_reward(variant, prototypes, test.chosen, w) - true_reward(variant, prototypes, test.rejected, w)


def test_few_shot_fitting_of_unseen_users_beats_the_population_prior():
    train, _, _, prototypes, g = world("ideal_point", 2, n_users=30, per_user=40)
    torch.manual_seed(0)
    model = PAL(6, 2, variant="ideal_point")
    model.fit(train, epochs=150, lr=0.03, batch_size=400)
    # unseen users at the two vertices: the population's mean weights sit between them
    unseen = F.one_hot(torch.arange(12) % 2, 2).float()
    shots = sample_pairs("ideal_point", prototypes, unseen, 8, g, first_user=100)
    held_out = sample_pairs("ideal_point", prototypes, unseen, 60, g, first_user=100)
    prior = model.mean_weights()
    results = {n: [] for n in (0, 1, 2, 4, 8)}
    for u, user in enumerate(held_out.users):
        test = held_out.of_users([user])
        with torch.no_grad():
            results[0].append(accuracy(model.pair_logits(test, prior)))
        for n in (1, 2, 4, 8):
            weights = model.fit_new_user(shots.of_users([user]).subset(range(n)), steps=50)
            with torch.no_grad():
                results[n].append(accuracy(model.pair_logits(test, weights)))
    mean = {n: sum(v) / len(v) for n, v in results.items()}
    # measured: k=0 0.836, k=1 0.871, k=2 0.897, k=4 0.922, k=8 0.947
    few_shot = [mean[n] for n in (1, 2, 4, 8)]
    assert all(value > mean[0] for value in few_shot), mean
    assert sum(few_shot) / 4 > mean[0] + 0.04, mean
    assert mean[8] > mean[0] + 0.08, mean
    assert torch.equal(model.mean_weights(), prior)  # the prototypes and seen users stayed frozen


def test_fit_new_user_can_add_the_user_and_save_load_round_trips(tmp_path):
    train, test, _, _, _ = world("mixture", 2, n_users=9, per_user=10)
    model = PAL(6, 2, variant="mixture", pref_dim=4, hidden_size=8)
    model.fit(train, epochs=5)
    newcomer = test.of_users(["u000"])
    weights = model.fit_new_user(newcomer, steps=5, user="new")
    assert model.users[-1] == "new" and torch.allclose(model.user_weights(["new"])[0], weights)
    with pytest.raises(ValueError, match="already one of the model's users"):
        model.fit_new_user(newcomer, steps=1, user="new")
    model.save_pretrained(str(tmp_path / "pal"))
    loaded = PAL.from_pretrained(str(tmp_path / "pal"))
    assert loaded.users == model.users and loaded.variant == "mixture"
    with torch.no_grad():
        torch.testing.assert_close(loaded.pair_logits(test), model.pair_logits(test))


@torch.no_grad()
def test_rewards_follow_the_formulas_by_hand():
    model = PAL(2, 2, variant="ideal_point")
    model.prototypes.copy_(torch.tensor([[0.0, 0.0], [2.0, 0.0]]))
    x = torch.tensor([[1.0, 1.0]])
    # ideal point at (1, 0) for weights (0.5, 0.5): r = -||(1,1) - (1,0)||^2 = -1 (scale exp(0) = 1)
    assert float(model.reward(x, torch.tensor([0.5, 0.5]))) == pytest.approx(-1.0)
    # at the vertices: -||(1,1)||^2 = -2 and -||(-1,1)||^2 = -2
    assert model.prototype_rewards(x).tolist() == [[-2.0, -2.0]]
    model = PAL(2, 2, variant="mixture")
    model.prototypes.copy_(torch.tensor([[1.0, 0.0], [0.0, 3.0]]))
    # 0.25 * <(1,0),(1,1)> + 0.75 * <(0,3),(1,1)> = 0.25 + 2.25 = 2.5
    assert float(model.reward(x, torch.tensor([0.25, 0.75]))) == pytest.approx(2.5)


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="variant must be one of"):
        PAL(4, 2, variant="angle")
    with pytest.raises(ValueError, match="hidden_size needs pref_dim"):
        PAL(4, 2, hidden_size=8)
    pairs = EmbeddedPairs(torch.zeros(2, 4), torch.ones(2, 4), torch.tensor([0, -1]), ["a"])
    with pytest.raises(ValueError, match="1 of 2 pairs have no user_id"):
        PAL(4, 2).fit(pairs, epochs=1)
    with pytest.raises(ValueError, match="size 4, the model's dim is 3"):
        PAL(3, 2).fit(pairs, epochs=1)
    with pytest.raises(ValueError, match="fit it first"):
        PAL(4, 2).mean_weights()
