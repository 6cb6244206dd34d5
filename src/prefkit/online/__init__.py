"""Online preference learning: sampling from a policy, best-of-N, reward functions (the online trainer
is to come)."""

from prefkit.online.best_of_n import BestOfN, best_of_n, best_of_n_expectation, best_of_n_kl, best_of_n_weights
from prefkit.online.rewards import CombinedReward, RewardError, build_reward
from prefkit.online.rollouts import HFRollouts, Rollout, SamplingSettings
from prefkit.online.sampling import Completion, completion_log_probs, sample_completions, sample_for_user

__all__ = [
    "BestOfN",
    "CombinedReward",
    "Completion",
    "HFRollouts",
    "Rollout",
    "SamplingSettings",
    "RewardError",
    "best_of_n",
    "best_of_n_expectation",
    "best_of_n_kl",
    "best_of_n_weights",
    "build_reward",
    "completion_log_probs",
    "sample_completions",
    "sample_for_user",
]
