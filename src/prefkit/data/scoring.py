"""Batched, length-sorted scoring of (prompt, response) items with a reward model or a judge.

Items are tokenized exactly as training tokenizes them (`prefkit.data.tokenize.tokenize_unpaired`:
prompt and response tokenized separately, EOS appended to the response, chat messages rendered
with the tokenizer's chat template), sorted by length so each batch pads little, right-padded into
``input_ids`` / ``attention_mask`` / ``completion_mask``, run under ``torch.no_grad`` with a tqdm
progress bar over batches, and the outputs are put back in the items' original order.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from prefkit.data.batching import batches_by_length, module_device, run_batched
from prefkit.data.collators import UnpairedCollator
from prefkit.data.records import UnpairedRecord
from prefkit.data.tokenize import OverlongPromptError, tokenize_unpaired

__all__ = ["TokenizedItems", "judge_pairs", "score_items", "tokenize_items"]


@dataclass
class TokenizedItems:
    """Tokenized items in input order: ``examples[i]`` has ``prompt_input_ids`` and
    ``completion_input_ids``; ``response_lengths[i]`` counts response tokens (EOS included);
    ``n_truncated`` items were cut by ``max_length``/``max_prompt_length``."""

    examples: list[dict[str, Any]]
    response_lengths: list[int]
    n_truncated: int

    def __len__(self) -> int:
        return len(self.examples)


def tokenize_items(
    items: Sequence[tuple[Any, Any]],
    tokenizer,
    *,
    max_length: int | None = None,
    max_prompt_length: int | None = None,
    names: Sequence[str] | None = None,
) -> TokenizedItems:
    """Tokenize ``(prompt, response)`` items (text or chat messages) for scoring.

    ``names[i]`` (e.g. ``"pairs.jsonl row 3 (chosen)"``) is used in errors. A prompt that alone
    fills ``max_length`` is an error: set ``max_prompt_length`` to cut prompts (keeping their end).
    """
    examples, lengths, truncated = [], [], 0
    for i, (prompt, response) in enumerate(items):
        record = UnpairedRecord(prompt=prompt, completion=response, label=True)
        try:
            ex = tokenize_unpaired(record, tokenizer, max_length=max_length, max_prompt_length=max_prompt_length)
        except OverlongPromptError as err:
            where = names[i] if names is not None else f"item {i}"
            raise OverlongPromptError(f"{where}: {err}") from None
        examples.append(ex)
        lengths.append(len(ex["completion_input_ids"]))
        truncated += bool(ex["truncated"])
    return TokenizedItems(examples, lengths, truncated)


def _collate(collator: UnpairedCollator, examples: Sequence[dict], device: torch.device) -> tuple[Tensor, ...]:
    batch = collator(examples)
    return tuple(batch[k].to(device) for k in ("input_ids", "attention_mask", "completion_mask"))


def _total_length(example: dict) -> int:
    return len(example["prompt_input_ids"]) + len(example["completion_input_ids"])


def score_items(
    fn: Callable[[Tensor, Tensor, Tensor], Tensor],
    items: TokenizedItems,
    *,
    model: nn.Module,
    pad_token_id: int,
    batch_size: int = 8,
    desc: str = "scoring",
    progress: bool = True,
) -> Tensor:
    """Run ``fn(input_ids, attention_mask, completion_mask)`` (e.g. ``scorer.score``) over the items
    in length-sorted batches on ``model``'s device; ``[N]`` (or ``[N, k]``) outputs in item order."""
    collator = UnpairedCollator(pad_token_id, kl_rows=False)
    device = module_device(model)
    lengths = [_total_length(ex) for ex in items.examples]

    def one(idx: list[int]) -> Tensor:
        return fn(*_collate(collator, [items.examples[i] for i in idx], device))

    return run_batched(one, batches_by_length(lengths, batch_size), len(items), desc, progress)


def judge_pairs(
    judge: nn.Module,
    first: TokenizedItems,
    second: TokenizedItems,
    *,
    pad_token_id: int,
    batch_size: int = 8,
    desc: str = "judging",
    progress: bool = True,
) -> Tensor:
    """``[N]`` logits ``judge.compare(first[i], second[i])`` that ``first[i]`` is preferred, batched
    by the longer of the two, in item order."""
    if len(first) != len(second):
        raise ValueError(f"need as many first as second items, got {len(first)} and {len(second)}")
    collator = UnpairedCollator(pad_token_id, kl_rows=False)
    device = module_device(judge)
    lengths = [max(_total_length(a), _total_length(b)) for a, b in zip(first.examples, second.examples)]

    def one(idx: list[int]) -> Tensor:
        ids_a, mask_a, comp_a = _collate(collator, [first.examples[i] for i in idx], device)
        ids_b, mask_b, comp_b = _collate(collator, [second.examples[i] for i in idx], device)
        return judge.compare(ids_a, mask_a, ids_b, mask_b, completion_mask_a=comp_a, completion_mask_b=comp_b)

    return run_batched(one, batches_by_length(lengths, batch_size), len(first), desc, progress)
