"""Feedback records: one dataclass per kind of feedback (DESIGN.md §1).

Text fields hold either a plain string or a list of chat messages
``[{"role": "user" | "assistant" | "system", "content": str}, ...]``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar, Union

Message = dict[str, str]
Text = Union[str, list[Message]]


class DataError(ValueError):
    """A bad record: names the file, the 1-based row, the field and what was expected."""

    def __init__(self, file: str | None, row: int | None, field: str | None, expected: str, got: Any = None):
        self.file, self.row, self.field, self.expected, self.got = file, row, field, expected, got
        where = f"{file or '<data>'}:{row if row is not None else '?'}"
        what = f"field {field!r}: " if field else ""
        tail = "" if got is None else f", got {_short(got)}"
        super().__init__(f"{where}: {what}expected {expected}{tail}")


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass
class PairwiseRecord:
    prompt: Text
    chosen: Text
    rejected: Text
    user_id: str | None = None
    margin: float | None = None
    weight: float | None = None
    chosen_score: float | None = None
    rejected_score: float | None = None
    id: str | None = None
    kind: ClassVar[str] = "pairwise"


@dataclass
class UnpairedRecord:
    prompt: Text
    completion: Text
    label: bool
    user_id: str | None = None
    weight: float | None = None
    id: str | None = None
    kind: ClassVar[str] = "unpaired"


@dataclass
class RatedRecord:
    prompt: Text
    completion: Text
    ratings: dict[str, float]
    user_id: str | None = None
    id: str | None = None
    kind: ClassVar[str] = "rated"


@dataclass
class RankedRecord:
    """``ranking`` lists completion indices best first; alternatively ``scores`` (higher is better)."""

    prompt: Text
    completions: list[Text]
    ranking: list[int] | None = None
    scores: list[float] | None = None
    user_id: str | None = None
    id: str | None = None
    kind: ClassVar[str] = "ranked"


@dataclass
class StepwiseRecord:
    prompt: Text
    completions: list[Text]
    labels: list[Union[bool, float]]
    id: str | None = None
    kind: ClassVar[str] = "stepwise"


Record = Union[PairwiseRecord, UnpairedRecord, RatedRecord, RankedRecord, StepwiseRecord]

RECORD_TYPES: dict[str, type] = {
    cls.kind: cls for cls in (PairwiseRecord, UnpairedRecord, RatedRecord, RankedRecord, StepwiseRecord)
}


def required_fields(kind: str) -> list[str]:
    """Fields without a default, in declaration order."""
    from dataclasses import MISSING

    return [f.name for f in fields(RECORD_TYPES[kind]) if f.default is MISSING]


def record_to_dict(record: Record, drop_none: bool = True) -> dict[str, Any]:
    """A plain dict of the record's fields (what the file writers store)."""
    out = asdict(record)
    return {k: v for k, v in out.items() if not (drop_none and v is None)}
