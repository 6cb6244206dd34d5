"""Ground-truth evaluation of policies and reward models in a lab world."""

import numpy as np
import pytest

from prefkit.lab import make_world
from prefkit.lab.evaluate import evaluate_policy, reward_model_agreement, truth_pairs


def test_reference_against_itself(small_reference):
    world, ref = small_reference
    result = evaluate_policy(
        world, ref.model, ref.tokenizer, reference=ref.model, n_per_prompt=4, seed=0, progress=False
    )
    assert result.n_samples == 4 * len(world.prompts) == len(result.samples)
    rewards = [world.true_reward(c.prompt, c.text) for c in result.samples]
    assert result.mean_reward == pytest.approx(np.mean(rewards))
    assert result.reward_se == pytest.approx(np.std(rewards, ddof=1) / np.sqrt(len(rewards)))
    assert result.kl == pytest.approx(0.0, abs=1e-5)  # log pi - log pi = 0 on every sample
    assert result.win_rate == 0.5  # same seed, same samples: every pair ties
    assert result.group_rewards == {"all": pytest.approx(result.mean_reward)}
    assert result.worst_group == "all"
    assert 1 <= result.mean_length <= 3 * world.max_len
    assert "samples" not in result.to_dict()


def test_given_reference_samples_equal_fresh_ones(small_reference):
    world, ref = small_reference
    opts = dict(n_per_prompt=2, seed=3, progress=False)
    before = evaluate_policy(world, ref.model, ref.tokenizer, **opts)
    fresh = evaluate_policy(world, ref.model, ref.tokenizer, reference=ref.model, **opts)
    given = evaluate_policy(
        world, ref.model, ref.tokenizer, reference=ref.model, reference_samples=before.samples, **opts
    )
    assert given.win_rate == fresh.win_rate
    with pytest.raises(ValueError, match="same prompts"):
        evaluate_policy(
            world, ref.model, ref.tokenizer, reference=ref.model, reference_samples=before.samples[:-1], **opts
        )


def test_group_rewards_in_a_world_with_groups(small_reference):
    _, ref = small_reference  # same base distribution, so the same reference serves the groups world
    world = make_world("groups", 0)
    result = evaluate_policy(world, ref.model, ref.tokenizer, n_per_prompt=2, seed=0, progress=False)
    by_group = {g: np.mean([world.true_reward(c.prompt, c.text, g) for c in result.samples]) for g in world.shares}
    assert result.group_rewards == pytest.approx(by_group)
    assert result.worst_group == min(by_group, key=by_group.get)
    # the population reward is the share-weighted mean of the group rewards
    assert result.mean_reward == pytest.approx(sum(world.shares[g] * by_group[g] for g in by_group))


def test_truth_pairs_are_distinct_and_reproducible():
    world = make_world("default", 0)
    pairs = truth_pairs(world, 50, seed=1)
    assert pairs == truth_pairs(world, 50, seed=1) != truth_pairs(world, 50, seed=2)
    assert all(a != b and p in world.prompts for p, a, b in pairs)


def test_agreement_of_perfect_reversed_and_constant_scorers():
    world = make_world("default", 0)
    pairs = truth_pairs(world, 200, seed=0)

    def truth(items):
        return np.array([world.true_reward(p, r) for p, r in items])

    assert reward_model_agreement(world, truth, pairs)["agreement"] == 1.0
    assert reward_model_agreement(world, truth, pairs)["reward_correlation"] == pytest.approx(1.0)
    assert reward_model_agreement(world, lambda items: -truth(items), pairs)["agreement"] == 0.0
    assert reward_model_agreement(world, lambda items: np.zeros(len(items)), pairs)["agreement"] == 0.5
    with pytest.raises(ValueError, match="one score each"):
        reward_model_agreement(world, lambda items: np.zeros(3), pairs)


def test_the_population_reward_misranks_for_a_group():
    # In the groups world the majority's reward is not the minority's: the population reward agrees with the
    # minority's true preferences less often than with the majority's.
    world = make_world("groups", 0)
    pairs = truth_pairs(world, 400, seed=0)
    result = reward_model_agreement(world, lambda items: np.array([world.true_reward(p, r) for p, r in items]), pairs)
    assert result["group_agreement"]["minority"] < result["group_agreement"]["majority"] < 1.0
    assert result["agreement"] == 1.0
