"""Online preference learning: sampling from a policy, best-of-N (more in later issues)."""

from prefkit.online.best_of_n import BestOfN, best_of_n, best_of_n_expectation, best_of_n_kl, best_of_n_weights
from prefkit.online.sampling import Completion, completion_log_probs, sample_completions

__all__ = [
    "BestOfN",
    "Completion",
    "best_of_n",
    "best_of_n_expectation",
    "best_of_n_kl",
    "best_of_n_weights",
    "completion_log_probs",
    "sample_completions",
]
