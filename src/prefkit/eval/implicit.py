"""The implicit reward of a policy trained with a reference-based loss, used as a reward model.

DPO and its relatives train a policy ``pi`` against a frozen reference ``ref`` so that
``r(x, y) = beta * (log pi(y | x) - log ref(y | x))`` acts as a reward (Rafailov et al. 2023,
"Direct Preference Optimization: Your Language Model is Secretly a Reward Model"); RewardBench
scores DPO models this way. `ImplicitReward` implements `prefkit.models.base.RewardScorer` with it,
so every reward-model evaluation also runs on such a policy.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from prefkit.train.logps import completion_logps


class ImplicitReward(nn.Module):
    """``score = beta * (log pi(y|x) - log ref(y|x))``, summed over the response tokens.

    Args:
        policy: the trained causal LM.
        reference: the causal LM it was trained against (frozen here: eval mode, no gradients).
        beta: the loss's beta (the reward's scale; it changes no ranking).
        chunk_size: rows of the vocabulary projection at once, or "auto" (a memory budget), as in
            `prefkit.train.logps.completion_logps`.
    """

    def __init__(self, policy: nn.Module, reference: nn.Module, beta: float, chunk_size: int | str = "auto"):
        super().__init__()
        if not beta > 0:
            raise ValueError(f"beta must be > 0, got {beta!r}")
        self.policy = policy
        self.reference = reference
        self.beta = float(beta)
        self.chunk_size = chunk_size
        for module in (policy, reference):
            module.eval()
        for p in reference.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def log_likelihoods(
        self, input_ids: Tensor, attention_mask: Tensor, completion_mask: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """``([N], [N])``: summed log-likelihood of each response under the policy and the reference."""
        if completion_mask is None:
            raise ValueError(
                "ImplicitReward needs completion_mask (1 on the response tokens): the implicit reward is "
                "log pi(y|x) - log ref(y|x) over the response y only, so the batch must say where y starts"
            )
        kwargs = {"chunk_size": self.chunk_size}
        policy = completion_logps(self.policy, input_ids, attention_mask, completion_mask, **kwargs).sum
        reference = completion_logps(self.reference, input_ids, attention_mask, completion_mask, **kwargs).sum
        return policy, reference

    def score(self, input_ids: Tensor, attention_mask: Tensor, completion_mask: Tensor | None = None) -> Tensor:
        """``[N]`` implicit rewards ``beta * (log pi - log ref)`` of the responses."""
        policy, reference = self.log_likelihoods(input_ids, attention_mask, completion_mask)
        return self.beta * (policy - reference)
