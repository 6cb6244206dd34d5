"""The implicit reward of a policy trained with a reference-based loss, used as a reward model.

DPO and its relatives train a policy ``pi`` against a frozen reference ``ref`` so that
``r(x, y) = beta * (log pi(y | x) - log ref(y | x))`` acts as a reward (Rafailov et al. 2023,
"Direct Preference Optimization: Your Language Model is Secretly a Reward Model"); RewardBench
scores DPO models this way. `ImplicitReward` implements `prefkit.models.base.RewardScorer` with it,
so every reward-model evaluation also runs on such a policy. `ImplicitPRM` reads the same log-ratio step by
step: process rewards without process labels.
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


class ImplicitPRM:
    """Process rewards from a policy and its reference, without step labels (Yuan et al. 2024, "Free Process
    Rewards without Process Labels", arXiv:2412.01981; PRIME, Cui et al. 2025). The reward of step ``k``:

        r_k = beta * sum over the tokens t of step k of (log pi(y_t | y_<t) - log ref(y_t | y_<t))

    and with ``cumulative=True`` the q-value ``q_k = r_1 + ... + r_k`` (the log-odds that the solution
    succeeds from there, when the policy was trained as an outcome model with ``implicit_prm_ce``). A
    `prefkit.models.process.StepScorer`: ``score(records)`` gives one value per step, read as log-odds by
    `prefkit eval prm` and the searches, so an implicit PRM is evaluated exactly like an explicit one. Steps are
    tokenized as for a PRM (`prefkit.data.tokenize.tokenize_stepwise` with ``separator``), but the prompt as the
    policy saw it (no separator after it).
    """

    def __init__(
        self,
        policy: nn.Module,
        reference: nn.Module,
        tokenizer,
        *,
        beta: float,
        separator: str = "\n",
        cumulative: bool = False,
        batch_size: int = 16,
        max_length: int | None = None,
    ):
        self.reward = ImplicitReward(policy, reference, beta)
        self.tokenizer, self.separator, self.cumulative = tokenizer, separator, cumulative
        self.batch_size, self.max_length = batch_size, max_length

    @torch.no_grad()
    def score(self, records, progress: bool = False) -> list[list[float]]:
        from prefkit.data.batching import module_device, steps_by_row, stepwise_batches

        device = module_device(self.reward.policy)
        out: list[list[float]] = [[] for _ in records]
        batches = stepwise_batches(
            records,
            self.tokenizer,
            step_separator=self.separator,
            batch_size=self.batch_size,
            max_length=self.max_length,
            prompt_separator=False,
            progress=progress,
        )
        kwargs = {"chunk_size": self.reward.chunk_size, "per_token": True}
        for owners, batch in batches:
            ids, attn, comp = (batch[k].to(device) for k in ("input_ids", "attention_mask", "completion_mask"))
            policy = completion_logps(self.reward.policy, ids, attn, comp, **kwargs).per_token
            reference = completion_logps(self.reward.reference, ids, attn, comp, **kwargs).per_token
            running = (self.reward.beta * (policy - reference)).double().cumsum(-1).cpu()
            q = running[batch["step_rows"], batch["step_positions"]].tolist()  # the sum up to each step's end
            for i, row in zip(owners, steps_by_row(q, batch["step_example"].tolist(), len(owners))):
                out[i] = row if self.cumulative else [row[0]] + [b - a for a, b in zip(row, row[1:])]
        return out
