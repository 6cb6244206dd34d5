"""Online preference learning: sampling from a policy (more in later issues)."""

from prefkit.online.sampling import Completion, completion_log_probs, sample_completions

__all__ = ["Completion", "completion_log_probs", "sample_completions"]
