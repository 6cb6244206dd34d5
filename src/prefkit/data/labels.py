"""Pairs stored as two responses and a label (or several annotators' labels): which one is better.

Many public judge and reward benchmarks keep a pair as ``response_a``, ``response_b`` and a label (``1`` / ``2``,
``0`` / ``1``, ``"A>B"`` / ``"B>A"``, ``"model_a"``, a tie value, or one label per annotator). Renaming the two
response columns onto ``chosen`` / ``rejected`` would silently put the worse response first whenever the second one
is better; a `LabelSpec` instead reads the label and orients each pair:

- ``responses``: the two response columns, first and second;
- ``columns``: one label column, or several (one per annotator: the outcome most of them give wins; a split top
  count is a tie);
- ``first`` / ``second`` / ``tie``: the label values (compared as text, surrounding whitespace ignored, so ``1``
  and ``"1"`` match) that mean "the first is better", "the second is better", "neither".

A tied pair is kept: ``chosen`` = the first response, ``rejected`` = the second, ``tie = True``; an evaluation
scores it under a tie policy (`prefkit eval rm --tie-policy`), training refuses it (a tie carries no preference).
Two responses with the same text are a tie too. A label value that is none of the declared ones is an error naming
the file, row and column.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

from prefkit.data.records import DataError, same_text, scalar_as_text

__all__ = ["LABEL_LIKE_COLUMNS", "LabelSpec", "parse_label_spec"]

# Columns whose name says they hold a preference label: mapping two response columns onto chosen/rejected while
# one of these is in the file is refused (say how to read the label instead).
LABEL_LIKE_COLUMNS = frozenset(
    {"label", "labels", "winner", "preference", "preferred", "choice", "better", "human_preference", "verdict"}
)


def _texts(values: Any) -> tuple[str, ...]:
    return tuple(str(v).strip() for v in values)


@dataclass(frozen=True)
class LabelSpec:
    """How to orient a two-response row by its label(s); see the module docstring."""

    responses: tuple[str, str]
    columns: tuple[str, ...]
    first: tuple[str, ...]
    second: tuple[str, ...]
    tie: tuple[str, ...] = ()

    def __post_init__(self):
        if len(self.responses) != 2 or self.responses[0] == self.responses[1]:
            raise ValueError(f"responses: two different response columns, got {list(self.responses)}")
        if not self.columns:
            raise ValueError("columns: at least one label column")
        if not self.first or not self.second:
            raise ValueError("first and second: the label values meaning 'first is better' and 'second is better'")
        values = [*self.first, *self.second, *self.tie]
        clash = sorted({v for v in values if values.count(v) > 1})
        if clash:
            raise ValueError(f"label value(s) {clash} mean more than one outcome")

    def outcome(self, row: dict, file: str | None, row_number: int | None) -> str:
        """``"first"``, ``"second"`` or ``"tie"`` for one row (the majority over the label columns)."""
        meaning = {**dict.fromkeys(self.first, "first"), **dict.fromkeys(self.second, "second")}
        meaning.update(dict.fromkeys(self.tie, "tie"))
        votes = []
        for column in self.columns:
            value = row.get(column)
            if value is None or (isinstance(value, str) and not value.strip()):
                continue
            text = str(value).strip()
            if text not in meaning:
                raise DataError(
                    file,
                    row_number,
                    column,
                    f"a label: {', '.join(self.first)} (first better), {', '.join(self.second)} (second better)"
                    + (f" or {', '.join(self.tie)} (tie)" if self.tie else ""),
                    value,
                )
            votes.append(meaning[text])
        if not votes:
            raise DataError(file, row_number, self.columns[0], "a label in at least one label column", None)
        (top, n), *rest = Counter(votes).most_common()
        return "tie" if rest and rest[0][1] == n else top

    def apply(self, row: dict, file: str | None, row_number: int | None) -> dict:
        """The row as a pairwise row: ``chosen`` / ``rejected`` set by the label, ``tie`` for a tie, and
        ``label_outcome`` (first, second or tie) so that columns about each response can be oriented alike."""
        a_name, b_name = self.responses
        for name in (a_name, b_name):
            if row.get(name) is None:
                raise DataError(file, row_number, name, "a response (one of the two --responses columns)", None)
        a, b = scalar_as_text(row[a_name]), scalar_as_text(row[b_name])
        outcome = self.outcome(row, file, row_number)
        if same_text(a, b):
            outcome = "tie"  # the same answer twice: no preference, whatever the label says
        out = {k: v for k, v in row.items() if k not in (a_name, b_name)}
        chosen, rejected = (b, a) if outcome == "second" else (a, b)
        out.update(chosen=chosen, rejected=rejected, label_outcome=outcome)
        if outcome == "tie":
            out["tie"] = True
        return out


def parse_label_spec(responses: str, label: str, first: str, second: str, tie: str | None = None) -> LabelSpec:
    """A `LabelSpec` from the command line's comma-separated texts (``--responses a,b --label winner
    --first-better model_a --second-better model_b --tie tie,both``)."""

    def items(text: str | None) -> tuple[str, ...]:
        return tuple(t.strip() for t in (text or "").split(",") if t.strip())

    response_columns = items(responses)
    if len(response_columns) != 2:
        raise ValueError(f"--responses: two comma-separated columns (first,second), got {responses!r}")
    return LabelSpec(response_columns, items(label), _texts(items(first)), _texts(items(second)), _texts(items(tie)))
