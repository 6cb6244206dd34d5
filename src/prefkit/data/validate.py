"""Validation of feedback rows: every problem of every row, each as a `DataError`.

`validate_record` checks one row (a plain dict, after column mapping and HH-RLHF prompt
splitting) against the rules of its kind and returns all the problems it finds;
`validate_rows` does the same for many rows (`prefkit.data.loaders.validate_source` runs the whole
loading pipeline of a file and collects every problem on the way). Nothing here raises for bad data
and nothing ever writes.

Rules (docs/data.md has the full list):

* required fields present and not ``None``; the prompt and stepwise steps non-empty (not only
  whitespace); a completion (``chosen``, ``rejected``, ``completion``, an entry of ``completions``
  of a ranked record) may be the empty string: an empty reply is a legitimate answer;
* text is a ``str`` or a non-empty list of ``{"role", "content"}`` messages with a known role and
  string content; within a record all texts are plain strings or all are chat messages;
* ``chosen`` and ``rejected`` differ after rendering (surrounding whitespace ignored), unless the pair
  is joint (``rejected_prompt``: the rejected completion answers another prompt, JPO), when the same
  text may answer both;
* text is valid Unicode: no lone surrogate (``"\\ud800"`` in JSON), which no tokenizer can encode;
* numbers (``weight``, ``margin``, ``chosen_score``, ``rejected_score``, ratings, scores, step
  labels) are finite real numbers, not booleans, and finite in float32 (``|x| <= 3.4e38``: training
  computes in float32 or narrower); ``weight`` is not negative;
* ``label`` is a bool; the integers 0 and 1 are accepted (and become ``False``/``True``); strings
  are refused (CSV cells are converted before validation, see `prefkit.data.loaders`);
* ``ratings`` is a non-empty dict of attribute name -> finite number (a ``None`` value means "not
  rated" and is dropped; at least one rating must remain);
* ranked: at least 2 completions, and ``ranking`` (a permutation of ``0..n-1``, best first)
  and/or ``scores`` (one finite number per completion); the same text twice in one list must have
  the same score (and cannot be at two places of a ``ranking``);
* stepwise: at least one step and one label per step (bool or finite number);
* ``user_id`` and ``id`` are strings (integers are accepted and become strings).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from numbers import Integral, Real
from typing import Any

from prefkit.data.records import KINDS, KNOWN_ROLES, MISSING, DataError, render_text

TEXT_EXPECTED = "a string or a non-empty list of chat messages {'role', 'content'}"
FLOAT32_MAX = 3.4028234663852886e38


def surrogate_position(text: str) -> int | None:
    """The index of the first lone surrogate in ``text`` (None when it encodes as UTF-8)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        return err.start
    return None


_ROLES = ", ".join(repr(r) for r in KNOWN_ROLES)


class _RowChecker:
    """Collects the errors of one row."""

    def __init__(self, row: dict, kind: str, file: str | None, row_number: int | None):
        self.row, self.kind, self.file, self.row_number = row, kind, file, row_number
        self.errors: list[DataError] = []
        self.text_styles: dict[str, str] = {}  # field -> "plain" | "chat", for the valid texts

    def error(self, field_name: str | None, expected: str, got: Any = None) -> None:
        self.errors.append(DataError(self.file, self.row_number, field_name, expected, got))

    def get(self, name: str) -> Any:
        return self.row.get(name)

    def present(self, name: str) -> bool:
        return self.row.get(name) is not None

    # ---- required fields --------------------------------------------------------------------
    def require(self, name: str, expected: str) -> bool:
        if self.row.get(name) is None:
            self.error(name, f"{expected} (required for {self.kind} records)", MISSING)
            return False
        return True

    # ---- texts ------------------------------------------------------------------------------
    def text(self, name: str, value: Any, *, allow_empty: bool, style_key: str | None = None) -> bool:
        """Check one text value; ``name`` is what errors call it (e.g. ``completions[2]``)."""
        if isinstance(value, str):
            if not allow_empty and not value.strip():
                self.error(name, "non-empty text", value)
                return False
            if not self.unicode(name, value):
                return False
            self.text_styles[style_key or name] = "plain"
            return True
        if isinstance(value, list):
            if not value:
                self.error(name, f"{TEXT_EXPECTED}; the message list is empty", value)
                return False
            ok = True
            for i, message in enumerate(value):
                where = f"{name}[{i}]"
                if not isinstance(message, dict):
                    self.error(where, "a chat message {'role': ..., 'content': ...}", message)
                    ok = False
                    continue
                role, content = message.get("role"), message.get("content")
                if role not in KNOWN_ROLES:
                    self.error(f"{where}.role", f"one of {_ROLES}", role if role is not None else MISSING)
                    ok = False
                if not isinstance(content, str):
                    self.error(f"{where}.content", "a string", content if content is not None else MISSING)
                    ok = False
                elif not self.unicode(f"{where}.content", content):
                    ok = False
            if ok:
                self.text_styles[style_key or name] = "chat"
            return ok
        self.error(name, TEXT_EXPECTED, value)
        return False

    def unicode(self, name: str, text: str) -> bool:
        at = surrogate_position(text)
        if at is None:
            return True
        self.error(name, "valid Unicode text", f"a lone surrogate {text[at]!r} at character {at}")
        return False

    def text_field(self, name: str, *, allow_empty: bool) -> bool:
        if not self.require(name, TEXT_EXPECTED):
            return False
        return self.text(name, self.get(name), allow_empty=allow_empty)

    def text_list_field(self, name: str, *, min_len: int, allow_empty_items: bool, what: str) -> int | None:
        """Check a list of texts; returns its length when it is a list, else None."""
        if not self.require(name, f"a list of {what}"):
            return None
        value = self.get(name)
        if not isinstance(value, list):
            self.error(name, f"a list of {what}", value)
            return None
        if len(value) < min_len:
            self.error(name, f"a list of at least {min_len} {what}", value)
        styles = set()
        for i, item in enumerate(value):
            key = f"{name}[{i}]"
            if self.text(key, item, allow_empty=allow_empty_items, style_key=key):
                styles.add(self.text_styles.pop(key))
        if len(styles) == 1:
            self.text_styles[name] = styles.pop()
        elif len(styles) > 1:
            self.error(name, "all entries plain strings or all chat-message lists", "a mix of both")
        return len(value)

    def consistent_styles(self) -> None:
        """All valid texts of the record are plain strings, or all are chat messages."""
        styles = self.text_styles
        if len(set(styles.values())) <= 1:
            return
        first_name, first_style = next(iter(styles.items()))
        for name, style in styles.items():
            if style != first_style:
                want = "chat messages" if first_style == "chat" else "a plain string"
                have = "chat messages" if style == "chat" else "a plain string"
                self.error(
                    name,
                    f"{want} like {first_name!r} (a record's texts are all plain strings or all chat-message lists)",
                    have,
                )

    # ---- numbers ----------------------------------------------------------------------------
    def number(self, name: str, value: Any, *, non_negative: bool = False) -> bool:
        if isinstance(value, bool) or not isinstance(value, Real):
            self.error(name, "a finite number", value)
            return False
        if not math.isfinite(float(value)):
            self.error(name, "a finite number", value)
            return False
        if abs(float(value)) > FLOAT32_MAX:
            self.error(name, "a number finite in float32 (|x| <= 3.4e38)", value)
            return False
        if non_negative and value < 0:
            self.error(name, "a number >= 0", value)
            return False
        return True

    def optional_number(self, name: str, *, non_negative: bool = False) -> None:
        if self.present(name):
            self.number(name, self.get(name), non_negative=non_negative)

    def optional_identifier(self, name: str) -> None:
        value = self.get(name)
        if value is None:
            return
        if isinstance(value, bool) or not isinstance(value, (str, Integral)):
            self.error(name, "a string (or an integer)", value)


def _check_label(c: _RowChecker) -> None:
    expected = "a boolean (true/false; the integers 0 and 1 are accepted)"
    if not c.require("label", expected):
        return
    value = c.get("label")
    if isinstance(value, bool):
        return
    if isinstance(value, Integral) and value in (0, 1):
        return
    if isinstance(value, str):
        expected += "; in JSON write true/false without quotes"
    c.error("label", expected, value)


def _check_ratings(c: _RowChecker) -> None:
    expected = "a non-empty dict of attribute name -> number"
    if not c.require("ratings", expected):
        return
    value = c.get("ratings")
    # A null rating means "not rated" (a Parquet/datasets struct column fills absent attributes
    # with null); it is dropped, and at least one rating must remain.
    if not isinstance(value, dict) or not any(v is not None for v in value.values()):
        c.error("ratings", expected, value)
        return
    for key, number in value.items():
        if not isinstance(key, str) or not key:
            c.error("ratings", "attribute names that are non-empty strings", key)
        elif number is not None:
            c.number(f"ratings.{key}", number)


def _check_ranked_order(c: _RowChecker, n: int | None) -> None:
    has_ranking, has_scores = c.present("ranking"), c.present("scores")
    if not has_ranking and not has_scores:
        c.error(
            "ranking",
            "'ranking' (completion indices, best first) or 'scores' (one number per completion) "
            "(required for ranked records)",
            MISSING,
        )
        return
    if has_ranking:
        ranking = c.get("ranking")
        expected = "a permutation of the completion indices 0..n-1, best first"
        if n is not None:
            expected = f"a permutation of 0..{n - 1} (indices of the {n} completions, best first)"
        if (
            not isinstance(ranking, list)
            or any(isinstance(i, bool) or not isinstance(i, Integral) for i in ranking)
            or n is not None
            and sorted(int(i) for i in ranking) != list(range(n))
        ):
            c.error("ranking", expected, ranking)
    if has_scores:
        scores = c.get("scores")
        if not isinstance(scores, list):
            c.error("scores", "a list of numbers, one per completion", scores)
            return
        if n is not None and len(scores) != n:
            c.error("scores", f"{n} numbers (one per completion)", f"{len(scores)} numbers: {scores!r}")
        for i, s in enumerate(scores):
            c.number(f"scores[{i}]", s)
    _check_repeated_texts(c, n)


def _check_repeated_texts(c: _RowChecker, n: int | None) -> None:
    """The same completion text twice in one list is one answer: it cannot have two scores, or two places."""
    completions = c.get("completions")
    if n is None or not isinstance(completions, list):
        return
    first: dict[str, int] = {}
    scores, ranking = c.get("scores"), c.get("ranking")
    for i, item in enumerate(completions):
        try:
            key = render_text(item).strip()
        except (TypeError, ValueError, KeyError, AttributeError):
            return  # reported as a bad text already
        if key not in first:
            first[key] = i
            continue
        j = first[key]
        if isinstance(scores, list) and len(scores) == n and scores[i] != scores[j]:
            c.error(
                f"completions[{i}]",
                f"one score per distinct text: it repeats completions[{j}] with another score "
                f"({scores[j]!r} and {scores[i]!r})",
                "the same text twice",
            )
        elif isinstance(ranking, list) and not isinstance(scores, list):
            c.error(
                f"completions[{i}]",
                f"distinct texts in a ranking: it repeats completions[{j}], ranked at two places",
                "the same text twice",
            )


def _check_step_labels(c: _RowChecker, n: int | None) -> None:
    expected = "a list with one label (bool or number) per step"
    if not c.require("labels", expected):
        return
    labels = c.get("labels")
    if not isinstance(labels, list):
        c.error("labels", expected, labels)
        return
    if n is not None and len(labels) != n:
        c.error("labels", f"{n} labels (one per step in 'completions')", f"{len(labels)} labels")
    for i, label in enumerate(labels):
        if isinstance(label, bool):
            continue
        c.number(f"labels[{i}]", label)


def _check_distinct(c: _RowChecker, a: str, b: str) -> None:
    if a in c.text_styles and b in c.text_styles:
        if render_text(c.get(a)).strip() == render_text(c.get(b)).strip():
            c.error(b, f"a text different from {a!r}", "the same text")


def validate_record(row: dict, kind: str, file: str | None = None, row_number: int | None = None) -> list[DataError]:
    """Every problem of one row of the given kind, as `DataError`s (empty list: the row is valid).

    ``row`` is a plain dict after column mapping and prompt splitting; unknown keys are ignored.
    ``file`` and ``row_number`` (1-based) only label the errors.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown record kind {kind!r}; expected one of {', '.join(KINDS)}")
    if not isinstance(row, dict):
        return [DataError(file, row_number, None, "a row that is a JSON object / dict", row)]
    c = _RowChecker(row, kind, file, row_number)
    if kind == "pairwise" and row.get("prompt") is None and row.get("rejected_prompt") is not None:
        c.error("prompt", "a prompt: a joint pair (with rejected_prompt) names both prompts", MISSING)
    elif kind == "pairwise" and row.get("prompt") is None:
        c.error(
            "prompt",
            "a prompt, or 'chosen' and 'rejected' that contain it: both whole HH-RLHF dialogues "
            "('\\n\\nHuman: ... \\n\\nAssistant: ...') or both chat-message lists sharing the "
            "prompt turns",
            MISSING,
        )
    else:
        c.text_field("prompt", allow_empty=False)

    if kind == "pairwise":
        c.text_field("chosen", allow_empty=True)
        c.text_field("rejected", allow_empty=True)
        if row.get("tie") is not None and not isinstance(row.get("tie"), bool):
            c.error("tie", "true or false (a tie: neither response is better)", row.get("tie"))
        if row.get("rejected_prompt") is not None:  # a joint pair: the two may answer with the same text
            c.text_field("rejected_prompt", allow_empty=False)
        elif not row.get("tie"):  # a tie may hold the same text twice
            _check_distinct(c, "chosen", "rejected")
        c.optional_number("margin")
        c.optional_number("weight", non_negative=True)
        c.optional_number("chosen_score")
        c.optional_number("rejected_score")
    elif kind == "unpaired":
        c.text_field("completion", allow_empty=True)
        _check_label(c)
        c.optional_number("weight", non_negative=True)
    elif kind == "rated":
        c.text_field("completion", allow_empty=True)
        _check_ratings(c)
    elif kind == "ranked":
        n = c.text_list_field("completions", min_len=2, allow_empty_items=True, what="completions")
        _check_ranked_order(c, n)
    elif kind == "stepwise":
        n = c.text_list_field("completions", min_len=1, allow_empty_items=False, what="steps")
        _check_step_labels(c, n)

    if kind != "stepwise":
        c.optional_identifier("user_id")
    c.optional_identifier("id")
    c.consistent_styles()
    return c.errors


def validate_rows(
    rows: Iterable[tuple[int, dict]] | Iterable[dict], kind: str, file: str | None = None
) -> list[DataError]:
    """All problems of all rows, in row order.

    ``rows`` yields ``(row_number, row)`` pairs (as `prefkit.data.read_rows` does) or plain dicts,
    which are numbered from 1.
    """
    errors: list[DataError] = []
    for index, item in enumerate(rows, start=1):
        if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], int):
            row_number, row = item
        else:
            row_number, row = index, item
        errors.extend(validate_record(row, kind, file, row_number))
    return errors
