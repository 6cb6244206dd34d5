"""Recipes: public preference data turned into the sets a method needs (docs/recipes.md).

`hh_two_groups`: Anthropic HH-RLHF pairs (``{chosen, rejected}``, two whole ``"\\n\\nHuman: ...\\n\\nAssistant:
..."`` dialogues) as a personalised pairwise set of two user groups that disagree on part of the pairs,
the construction PAL (Chen et al. 2024, arXiv:2406.08469) used on Reddit TL;DR, adapted:

- users of group ``harmless`` keep the human label;
- users of group ``longer`` prefer the longer of the two final assistant responses (characters of the
  response with surrounding whitespace stripped); a pair whose two responses are equally long has no
  ``longer`` label and is dropped for both groups, so both groups see the same pool of pairs.

Each kept pair goes to one user: the pairs are shuffled with ``seed``, the first ``round(share * n)``
go to the first group and the rest to the second, and within a group the users take turns
(``users_per_group`` users, ``user_id = "group:NAME/K"``, the lab's convention, so ``groups: lab`` and
``prefkit eval rm --groups lab`` read the group from the id). A pair is *contested* when the two groups
label it differently (the longer response is the one the human rejected): on those pairs a single pooled
reward must be wrong for one group or the other.
"""

from __future__ import annotations

import os
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefkit.data.loaders import load_records
from prefkit.data.records import PairwiseRecord

__all__ = ["HH_GROUPS", "TwoGroupSet", "format_stats", "hh_two_groups", "parse_shares", "response_length"]

HH_GROUPS = ("harmless", "longer")


@dataclass
class TwoGroupSet:
    """What `hh_two_groups` returns.

    Attributes:
        records: the personalised pairs, in the source's row order, each with ``user_id`` and ``id``.
        contested: ``[len(records)]``, whether the two groups label that pair differently.
        stats: counts for the report: ``rows`` (read), ``ties`` (dropped), ``pairs`` (kept),
            ``contested`` and ``contested_share`` (over the kept pairs), and ``per_group``:
            ``{group: {"users", "pairs", "contested", "flipped"}}`` where ``flipped`` counts the group's
            pairs whose label differs from the human one.
    """

    records: list[PairwiseRecord]
    contested: list[bool]
    stats: dict[str, Any] = field(default_factory=dict)


def response_length(text: Any) -> int:
    """Length of a response for the ``longer`` group: characters with surrounding whitespace stripped
    (chat messages: the stripped contents added up)."""
    if isinstance(text, str):
        return len(text.strip())
    return sum(len(str(m.get("content", "")).strip()) for m in text)


def parse_shares(text: str) -> tuple[float, float]:
    """``"0.8,0.2"`` -> ``(0.8, 0.2)``: the share of pairs of ``harmless`` and ``longer``."""
    try:
        shares = tuple(float(part) for part in text.split(","))
    except ValueError:
        raise ValueError(f"shares {text!r}: expected two numbers, e.g. 0.5,0.5") from None
    return _check_shares(shares)


def _check_shares(shares: Sequence[float]) -> tuple[float, float]:
    if len(shares) != len(HH_GROUPS):
        raise ValueError(f"shares: expected {len(HH_GROUPS)} numbers ({', '.join(HH_GROUPS)}), got {list(shares)}")
    if any(not 0.0 < s < 1.0 for s in shares) or abs(sum(shares) - 1.0) > 1e-6:
        raise ValueError(f"shares: expected two numbers in (0, 1) that add up to 1, got {list(shares)}")
    return float(shares[0]), float(shares[1])


def hh_two_groups(
    source: str | os.PathLike | Sequence[dict],
    *,
    users_per_group: int = 10,
    shares: Sequence[float] = (0.5, 0.5),
    seed: int = 0,
) -> TwoGroupSet:
    """Build the two-group personalised set from HH-RLHF rows (a file or in-memory rows).

    Every row must be an HH-RLHF pair: ``chosen`` and ``rejected`` dialogues that share the prompt up to
    the last ``\\n\\nAssistant:`` (split by `prefkit.data.formats.hh_row`); a bad row raises `DataError`
    naming the file, the 1-based row and the field. Records get ``id`` = the row's own id, else
    ``"{file name}/{row}"``. Raises ``ValueError`` for bad settings, or when a group would have fewer
    pairs than users.
    """
    shares = _check_shares(shares)
    if users_per_group < 1:
        raise ValueError(f"users_per_group must be >= 1, got {users_per_group}")
    name = Path(source).name if isinstance(source, (str, os.PathLike)) else "rows"
    rows = load_records(source, kind="pairwise", layout="hh")
    kept = [i for i, r in enumerate(rows) if response_length(r.chosen) != response_length(r.rejected)]
    n_first = round(shares[0] * len(kept))
    for group, n in zip(HH_GROUPS, (n_first, len(kept) - n_first)):
        if n < users_per_group:
            raise ValueError(
                f"{name}: group {group!r} gets {n} of the {len(kept)} pairs without a length tie, fewer than "
                f"users_per_group={users_per_group}; lower users_per_group or change shares"
            )
    order = kept[:]
    random.Random(seed).shuffle(order)
    owner = {}
    for position, i in enumerate(order):
        group = 0 if position < n_first else 1
        turn = position if group == 0 else position - n_first
        owner[i] = (HH_GROUPS[group], turn % users_per_group)

    records, contested, groups = [], [], []
    for i in kept:
        record, group, user = rows[i], *owner[i]
        chosen_longer = response_length(record.chosen) > response_length(record.rejected)
        swap = group == "longer" and not chosen_longer
        records.append(
            PairwiseRecord(
                prompt=record.prompt,
                chosen=record.rejected if swap else record.chosen,
                rejected=record.chosen if swap else record.rejected,
                user_id=f"group:{group}/{user}",
                id=record.id or f"{name}/{i + 1}",
            )
        )
        contested.append(not chosen_longer)
        groups.append(group)
    return TwoGroupSet(records, contested, _stats(len(rows), groups, contested, users_per_group))


def _stats(n_rows: int, groups: list[str], contested: list[bool], users: int) -> dict[str, Any]:
    per_group = {g: {"users": users, "pairs": 0, "contested": 0, "flipped": 0} for g in HH_GROUPS}
    for group, flag in zip(groups, contested):
        entry = per_group[group]
        entry["pairs"] += 1
        entry["contested"] += int(flag)
    per_group["longer"]["flipped"] = per_group["longer"]["contested"]
    return {
        "rows": n_rows,
        "ties": n_rows - len(groups),
        "pairs": len(groups),
        "contested": sum(contested),
        "contested_share": sum(contested) / len(groups),
        "per_group": per_group,
    }


def format_stats(stats: dict[str, Any]) -> str:
    """A few lines describing `TwoGroupSet.stats` for the command line."""
    lines = [
        f"{stats['rows']} rows read, {stats['ties']} dropped (responses of equal length), {stats['pairs']} pairs kept",
        f"contested (the groups disagree): {stats['contested']} of {stats['pairs']} = {stats['contested_share']:.3f}",
    ]
    for group, entry in stats["per_group"].items():
        lines.append(
            f"  {group}: {entry['users']} users, {entry['pairs']} pairs, {entry['contested']} contested, "
            f"{entry['flipped']} labels differ from the human one"
        )
    return "\n".join(lines)
