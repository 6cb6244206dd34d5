"""Training order from easy to hard: Curry-DPO's curriculum over preference pairs.

Pattnaik, Maheshwary, Ogueji, Yadav, Madhusudhan (2024), "Curry-DPO: Enhancing Alignment using Curriculum
Learning & Ranked Preferences", arXiv:2403.07230: from several ranked responses per prompt, pair the best one with
each of the others and train on the pairs ordered by the gap in their scores, largest (easiest) first.
``prefkit data convert --to pairwise --mode best`` makes those pairs from ranked records with scores;
``curriculum: margin`` orders any pairwise data by its margin. The order is the whole curriculum: the sampler
becomes sequential (no shuffling), so a run and its resume see the same pairs in the same order.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from prefkit.data.records import PairwiseRecord

__all__ = ["CURRICULA", "order_by_margin", "pair_margin"]

CURRICULA = ("none", "margin")


def pair_margin(record: PairwiseRecord, index: int) -> float:
    """A pair's margin: its ``margin``, else ``chosen_score - rejected_score``; an error naming the record when it
    has neither (``index`` is 0-based, the message 1-based like a file's rows)."""
    if record.margin is not None:
        return float(record.margin)
    if record.chosen_score is not None and record.rejected_score is not None:
        return float(record.chosen_score) - float(record.rejected_score)
    name = f" (id {record.id})" if record.id is not None else ""
    raise ValueError(
        f"curriculum: margin orders pairs by their margin, but training record {index + 1}{name} has neither "
        "'margin' nor 'chosen_score' and 'rejected_score' (convert ranked records with scores: prefkit data "
        "convert --to pairwise --mode best)"
    )


def order_by_margin(data: Sequence[PairwiseRecord] | Any) -> list[PairwiseRecord] | Any:
    """``data`` from the largest margin to the smallest, ties in their given order: a list of `PairwiseRecord`
    (margins from `pair_margin`) or a tokenized ``datasets.Dataset`` with a ``margin`` column."""
    if isinstance(data, (list, tuple)):
        margins = [pair_margin(r, i) if isinstance(r, PairwiseRecord) else 0.0 for i, r in enumerate(data)]
        order = sorted(range(len(data)), key=lambda i: -margins[i])
        return [data[i] for i in order]
    if "margin" not in data.column_names:
        raise ValueError(f"curriculum: margin needs a 'margin' column in the tokenized dataset ({data.column_names})")
    return data.sort("margin", reverse=True, kind="stable")
