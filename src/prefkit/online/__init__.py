"""Online preference learning: sampling from a policy, best-of-N, rollouts, reward functions and the
online trainer (docs/online.md). The ``online:`` configuration is read by `prefkit.train.online_settings`
(torch-free)."""

from prefkit.online.best_of_n import BestOfN, best_of_n, best_of_n_expectation, best_of_n_kl, best_of_n_weights
from prefkit.online.rewards import CombinedReward, RewardError, build_reward
from prefkit.online.rollouts import HFRollouts, Rollout, SamplingSettings
from prefkit.online.sampling import Completion, completion_log_probs, sample_completions, sample_for_user

__all__ = [
    "BestOfN",
    "CombinedReward",
    "Completion",
    "HFRollouts",
    "RewardError",
    "Rollout",
    "SamplingSettings",
    "best_of_n",
    "best_of_n_expectation",
    "best_of_n_kl",
    "best_of_n_weights",
    "build_reward",
    "completion_log_probs",
    "sample_completions",
    "sample_for_user",
]
