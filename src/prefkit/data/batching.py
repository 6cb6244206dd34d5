"""Length-sorted, gradient-free batched inference over many items (scoring, feature extraction).

Items are grouped into batches longest first, so each batch pads little and a batch that does not
fit in memory fails at once; each batch's output is written back at its items' positions.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

__all__ = ["batches_by_length", "left_pad", "module_device", "run_batched", "stepwise_batches", "steps_by_row"]


def batches_by_length(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Item indices in batches of ``batch_size``, longest items first (a too-large batch fails at
    once, and items of similar length share a batch)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def left_pad(rows: Sequence[list[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """``(ids, attention_mask)`` ``[N, max_len]`` with each row right-aligned (generation reads the last column)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
        mask[i, width - len(row) :] = 1
    return ids, mask


def module_device(module: nn.Module) -> torch.device:
    """The device of ``module``'s first parameter (CPU for a module without parameters)."""
    param = next(module.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def run_batched(
    fn: Callable[..., Tensor],
    batches: list[list[int]],
    n_items: int,
    desc: str,
    progress: bool = True,
) -> Tensor:
    """Call ``fn(batch_indices) -> [b, ...]`` for every batch (no grad, progress bar) and return the
    outputs ``[n_items, ...]`` in item order (float32, on the CPU)."""
    out: Tensor | None = None
    with torch.no_grad():
        for idx in tqdm(batches, desc=desc, unit="batch", disable=not progress):
            values = fn(idx).detach().float().cpu()
            if out is None:
                out = values.new_zeros((n_items, *values.shape[1:]))
            out[torch.tensor(idx)] = values
    if out is None:
        raise ValueError("nothing to score")
    return out


def stepwise_batches(
    records: Sequence[Any],
    tokenizer,
    *,
    step_separator: str,
    batch_size: int,
    max_length: int | None = None,
    prompt_separator: bool = True,
    progress: bool = False,
    desc: str = "Scoring steps",
) -> Iterator[tuple[list[int], dict[str, Any]]]:
    """Stepwise records tokenized (`prefkit.data.tokenize.tokenize_stepwise`) and collated
    (`prefkit.data.collators.StepCollator`) ``batch_size`` at a time, longest first: yields ``(indices, batch)``,
    ``indices`` the batch rows' positions in ``records``. A record whose first step does not fit in ``max_length``
    is left out (it gets no step scores)."""
    from prefkit.data.collators import StepCollator
    from prefkit.data.tokenize import OverlongPromptError, tokenize_stepwise

    examples, owners = [], []
    for i, record in enumerate(records):
        try:
            example = tokenize_stepwise(
                record,
                tokenizer,
                max_length=max_length,
                step_separator=step_separator,
                prompt_separator=prompt_separator,
            )
        except OverlongPromptError:
            continue
        examples.append(example)
        owners.append(i)
    collate = StepCollator(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
    lengths = [len(e["prompt_input_ids"]) + sum(map(len, e["steps_input_ids"])) for e in examples]
    for idx in tqdm(batches_by_length(lengths, batch_size), desc=desc, unit="batch", disable=not progress):
        yield [owners[k] for k in idx], collate([examples[k] for k in idx])


def steps_by_row(values: Sequence[float], rows: Sequence[int], n_rows: int) -> list[list[float]]:
    """Per-step ``values`` (in a `StepCollator` batch's step order) grouped into one list per batch row
    (``rows``: each step's row, the batch's ``step_example``)."""
    out: list[list[float]] = [[] for _ in range(n_rows)]
    for value, row in zip(values, rows):
        out[row].append(value)
    return out
