"""Feedback records: one dataclass per kind of feedback (DESIGN.md §1).

Text fields hold either a plain string or a list of chat messages
``[{"role": "system" | "user" | "assistant" | "tool", "content": str}, ...]``.

Besides the record types this module holds the small helpers every part of the data layer shares:
`DataError`, field lists per kind (`required_fields`, `optional_fields`, `record_fields`) and a
tokenizer-free text rendering (`render_text`, `text_key`) used for comparisons and grouping.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar

Message = dict[str, str]
Text = str | list[Message]


class DataError(ValueError):
    """A bad record: names the file, the 1-based row, the field and what was expected.

    ``str(err)`` reads ``FILE:ROW: field 'F': expected ..., got ...``. File-level problems (an
    unknown format, a column map naming a missing column) have ``row=None`` and read
    ``FILE: expected ...``. ``hint`` is appended after a semicolon (e.g. how many other rows are
    bad and which command lists them).
    """

    def __init__(
        self,
        file: str | None,
        row: int | None,
        field: str | None,
        expected: str,
        got: Any = None,
        hint: str | None = None,
    ):
        self.file, self.row, self.field, self.expected, self.got = file, row, field, expected, got
        self.hint = hint
        where = f"{file or '<data>'}" + (f":{row}" if row is not None else "")
        what = f"field {field!r}: " if field else ""
        tail = "" if got is None else f", got {_short(got)}"
        extra = f"; {hint}" if hint else ""
        super().__init__(f"{where}: {what}expected {expected}{tail}{extra}")

    def __reduce__(self):
        return (DataError, (self.file, self.row, self.field, self.expected, self.got, self.hint))

    def with_hint(self, hint: str) -> DataError:
        """A copy of this error with ``hint`` appended to its message (after any hint it had)."""
        combined = f"{self.hint}; {hint}" if self.hint else hint
        return DataError(self.file, self.row, self.field, self.expected, self.got, hint=combined)


class _Missing:
    """Stands for an absent value in ``DataError.got``: prints as ``nothing (missing)``."""

    def __repr__(self) -> str:
        return "nothing (missing)"


MISSING = _Missing()


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
    # a joint preference (JPO): the rejected completion answers this other prompt ("y_w to x beats y_l to x'")
    rejected_prompt: Text | None = None
    # a tie: neither response is better (kept for evaluation under a tie policy; training refuses it)
    tie: bool | None = None
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
    labels: list[bool | float]
    id: str | None = None
    kind: ClassVar[str] = "stepwise"


Record = PairwiseRecord | UnpairedRecord | RatedRecord | RankedRecord | StepwiseRecord

RECORD_TYPES: dict[str, type] = {
    cls.kind: cls for cls in (PairwiseRecord, UnpairedRecord, RatedRecord, RankedRecord, StepwiseRecord)
}


KINDS: tuple[str, ...] = tuple(RECORD_TYPES)

# Chat roles a message may carry.
KNOWN_ROLES: tuple[str, ...] = ("system", "user", "assistant", "tool")


def _record_type(kind: str) -> type:
    try:
        return RECORD_TYPES[kind]
    except KeyError:
        raise ValueError(f"unknown record kind {kind!r}; expected one of {', '.join(KINDS)}") from None


def required_fields(kind: str) -> list[str]:
    """Fields without a default, in declaration order."""
    from dataclasses import MISSING as _NO_DEFAULT

    return [f.name for f in fields(_record_type(kind)) if f.default is _NO_DEFAULT]


def optional_fields(kind: str) -> list[str]:
    """Fields with a default (``None``), in declaration order."""
    required = set(required_fields(kind))
    return [f.name for f in fields(_record_type(kind)) if f.name not in required]


def record_fields(kind: str) -> list[str]:
    """All fields of a kind's record, required first, in declaration order."""
    return [f.name for f in fields(_record_type(kind))]


def all_field_names() -> set[str]:
    """Every field name used by any record kind (the valid targets of a column map)."""
    return {name for kind in KINDS for name in record_fields(kind)}


def record_to_dict(record: Record, drop_none: bool = True) -> dict[str, Any]:
    """A plain dict of the record's fields (what the file writers store)."""
    out = asdict(record)
    return {k: v for k, v in out.items() if not (drop_none and v is None)}


def is_messages(text: Any) -> bool:
    """True when ``text`` is a list (of chat messages) rather than a plain string."""
    return isinstance(text, list)


def render_text(text: Text) -> str:
    """A canonical plain-text rendering of a text field, without any tokenizer.

    Plain strings are returned unchanged; chat messages become ``role: content`` lines. Used to
    compare texts (e.g. chosen vs rejected) and to group records by prompt, never for training.
    """
    if isinstance(text, str):
        return text
    return "\n".join(f"{m['role']}: {m['content']}" for m in text)


def same_text(a: Any, b: Any) -> bool:
    """Whether two texts render alike (`render_text`, surrounding whitespace ignored): one answer given twice.
    Values that are not texts compare unequal (validation names them)."""
    try:
        return render_text(a).strip() == render_text(b).strip()
    except (TypeError, AttributeError, KeyError):
        return False


def scalar_as_text(value: Any) -> Any:
    """A boolean or number as the text a JSON file spells it (``true``, ``42``, ``3.5``); anything else as is.
    Loaders apply it to responses: a benchmark's numeric answer or yes/no verdict is a response text."""
    from numbers import Integral, Real

    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Integral):
        return str(int(value))
    if isinstance(value, Real):
        return repr(float(value))
    return value


def text_key(text: Text) -> str:
    """A hashable key that is equal for exactly equal texts (plain or chat messages)."""
    import json

    return json.dumps(text, sort_keys=True, ensure_ascii=False)


def _as_float(value: Any) -> Any:
    from numbers import Real

    return float(value) if isinstance(value, Real) and not isinstance(value, bool) else value


def _as_identifier(value: Any) -> Any:
    from numbers import Integral

    return str(value) if isinstance(value, Integral) and not isinstance(value, bool) else value


def record_from_dict(kind: str, row: dict[str, Any], file: str | None = None, row_number: int | None = None) -> Record:
    """Build a record of ``kind`` from a row dict.

    Keeps the kind's fields (other keys are ignored; ``None`` means absent) and normalises types:
    numbers become ``float``, integer ``user_id``/``id`` become ``str``, a 0/1 ``label`` becomes a
    bool, ``None`` ratings (attribute not rated) are dropped, ranking indices become ``int``.
    It does not validate values (see `prefkit.data.validate_record`), but a missing required
    field raises `DataError`.
    """
    from numbers import Integral

    cls = _record_type(kind)
    for name in required_fields(kind):
        if row.get(name) is None:
            raise DataError(file, row_number, name, f"a value (required for {kind} records)", MISSING)
    values = {name: row[name] for name in record_fields(kind) if row.get(name) is not None}
    for name in ("weight", "margin", "chosen_score", "rejected_score"):
        if name in values:
            values[name] = _as_float(values[name])
    for name in ("user_id", "id"):
        if name in values:
            values[name] = _as_identifier(values[name])
    label = values.get("label")
    if isinstance(label, Integral) and not isinstance(label, bool) and label in (0, 1):
        values["label"] = bool(label)
    if isinstance(values.get("ratings"), dict):
        values["ratings"] = {k: _as_float(v) for k, v in values["ratings"].items() if v is not None}
    if isinstance(values.get("ranking"), list):
        values["ranking"] = [
            int(i) if isinstance(i, Integral) and not isinstance(i, bool) else i for i in values["ranking"]
        ]
    if isinstance(values.get("scores"), list):
        values["scores"] = [_as_float(s) for s in values["scores"]]
    if kind == "stepwise" and isinstance(values.get("labels"), list):
        values["labels"] = [x if isinstance(x, bool) else _as_float(x) for x in values["labels"]]
    return cls(**values)
