"""What evaluation and training expect of a reward model (DESIGN.md §4).

Two roles, as protocols so any object with these methods qualifies:

- a `RewardScorer` gives each tokenized (prompt + response) sequence one scalar reward;
- a `PairwiseJudge` gives, for two sequences with the same prompt, the logit that the first is
  preferred. Every scorer is a judge (logit = r_a - r_b); a general preference model (GPM) is a
  judge but not a scorer, since its preferences may be cyclic.

Batches are right-padded ``input_ids`` / ``attention_mask`` ``[N, T]`` long tensors, with an
optional ``completion_mask`` (1 on response tokens, the layout of `prefkit.data.collators`):
sequence classifiers ignore it, an implicit reward (beta * log pi/ref of the response) needs it.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from torch import Tensor


@runtime_checkable
class RewardScorer(Protocol):
    def score(self, input_ids: Tensor, attention_mask: Tensor, completion_mask: Tensor | None = None) -> Tensor:
        """``[N]`` float rewards, one per sequence."""
        ...


@runtime_checkable
class PairwiseJudge(Protocol):
    def compare(
        self,
        input_ids_a: Tensor,
        attention_mask_a: Tensor,
        input_ids_b: Tensor,
        attention_mask_b: Tensor,
        completion_mask_a: Tensor | None = None,
        completion_mask_b: Tensor | None = None,
    ) -> Tensor:
        """``[N]`` logits that sequence ``a[i]`` is preferred to ``b[i]`` (0 = indifferent)."""
        ...
