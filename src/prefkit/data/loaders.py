"""Reading and writing feedback files.

`load_records` is the one entry point: it reads rows from a file, a `datasets` dataset or a Hub
dataset (`read_rows`), applies a layout adapter and a column map, detects the kind of feedback
(`detect_kind`), splits implicit prompts (HH-RLHF dialogues, chat conversations), validates every
row and returns records. `write_records` writes records back, atomically.

Supported sources:

========================  ==========================================================
``*.jsonl``, ``*.jsonl.gz``  one JSON object per line (row = line number; blank lines skipped)
``*.json``, ``*.json.gz``    one JSON list of objects (row = position in the list)
``*.csv``                    header + rows; cells holding a JSON list/dict are parsed
``*.parquet``                any Parquet file
a folder                     a ``save_to_disk`` dataset (a DatasetDict needs ``split``), otherwise
                             ``datasets.load_dataset(folder, split=split)``
``owner/name``               a Hub dataset: ``datasets.load_dataset(name, split=split)``
a list of dicts, a           in-memory rows
``datasets.Dataset``
========================  ==========================================================
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
import re
import shlex
import sys
import uuid
import zlib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefkit.data.formats import layout_adapter, layout_kind, split_implicit_prompt
from prefkit.data.labels import LABEL_LIKE_COLUMNS, LabelSpec
from prefkit.data.records import (
    KINDS,
    DataError,
    Record,
    all_field_names,
    record_fields,
    record_from_dict,
    record_to_dict,
    scalar_as_text,
)
from prefkit.data.validate import validate_rows

# file name ending -> reader format
SUFFIXES: dict[str, str] = {
    ".jsonl.gz": "jsonl",
    ".jsonl": "jsonl",
    ".json.gz": "json",
    ".json": "json",
    ".csv": "csv",
    ".parquet": "parquet",
}
SUPPORTED_SOURCES = (
    "a .jsonl, .jsonl.gz, .json, .json.gz, .csv or .parquet file, a datasets folder "
    "(save_to_disk or data files), or a Hub dataset name"
)

# kind -> (fields that must all be present, fields of which one must be present)
KIND_SIGNATURES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "pairwise": (("chosen", "rejected"), ()),
    "unpaired": (("completion", "label"), ()),
    "rated": (("completion", "ratings"), ()),
    "ranked": (("completions",), ("ranking", "scores")),
    "stepwise": (("completions", "labels"), ()),
}

HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def file_format(path: str | os.PathLike) -> str | None:
    """The reader format (``jsonl``, ``json``, ``csv``, ``parquet``) for a file name, or None."""
    name = str(path).lower()
    for suffix, fmt in SUFFIXES.items():
        if name.endswith(suffix):
            return fmt
    return None


def source_label(source: Any, split: str | None = None) -> str:
    """How errors name a source: the path or Hub name as given, plus ``[split]`` when one is used."""
    if isinstance(source, (str, os.PathLike)):
        label = str(source)
    elif isinstance(source, list):
        label = "<list of rows>"
    else:
        label = f"<{type(source).__name__}>"
    return f"{label}[{split}]" if split else label


# ---- reading rows -------------------------------------------------------------------------------
def read_rows(
    source: Any, split: str | None = None, errors: list[DataError] | None = None
) -> Iterator[tuple[int, dict]]:
    """Yield ``(row_number, row_dict)`` for every row of ``source`` (1-based numbers).

    Rows are returned as read: no column map, kind detection or validation. CSV cells that hold a
    JSON list or object are parsed; other CSV cells stay strings. A row that cannot be read (bad
    JSON, not an object, wrong number of CSV cells) raises `DataError`, or, when ``errors`` is a
    list, is appended to it and skipped. Problems with the source itself always raise.
    """
    label = source_label(source, split)
    if isinstance(source, list):
        if split is not None:
            raise DataError(label, None, None, "no split for a list of rows", split)
        yield from _read_list(source, label, errors)
        return
    if not isinstance(source, (str, os.PathLike)):
        yield from _read_dataset_object(source, split, label, errors)
        return
    path = Path(source)
    if path.is_dir():
        yield from _read_folder(path, split, label, errors)
        return
    fmt = file_format(path)
    if path.is_file():
        if fmt is None:
            raise DataError(label, None, None, SUPPORTED_SOURCES, f"a file named {path.name!r}")
        if split is not None:
            raise DataError(label, None, None, f"no split for a {fmt} file (splits belong to datasets)", split)
        reader = {"jsonl": _read_jsonl, "json": _read_json, "csv": _read_csv, "parquet": _read_parquet}[fmt]
        yield from reader(path, label, errors)
        return
    text = str(source)
    if fmt is not None or not HUB_NAME.match(text) or text.startswith("."):
        raise DataError(label, None, None, f"an existing file or folder ({SUPPORTED_SOURCES})", "no such path")
    yield from _read_hub(text, split, label, errors)


def _row_problem(err: DataError, errors: list[DataError] | None) -> None:
    if errors is None:
        raise err
    errors.append(err)


def _read_list(rows: list, label: str, errors: list[DataError] | None) -> Iterator[tuple[int, dict]]:
    for n, row in enumerate(rows, start=1):
        if not isinstance(row, dict):
            _row_problem(DataError(label, n, None, "a dict per row", row), errors)
            continue
        yield n, dict(row)


def _open_text(path: Path):
    if str(path).lower().endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8-sig")
    return open(path, encoding="utf-8-sig")


def _open_binary(path: Path):
    if str(path).lower().endswith(".gz"):
        return gzip.open(path, "rb")
    return open(path, "rb")


def _undecodable_line(path: Path) -> tuple[int, int] | None:
    """``(line, column)`` (1-based) of the first bytes of ``path`` that are not UTF-8, or None."""
    try:
        with _open_binary(path) as handle:
            for n, raw in enumerate(handle, start=1):
                try:
                    raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    return n, exc.start + 1
    except (OSError, EOFError, zlib.error):
        return None
    return None


@contextmanager
def _decode_guard(label: str, path: Path | None = None, rows_are_lines: bool = True):
    """Turn decoding problems of a whole file into one `DataError` naming the row (or line) where
    the bytes stop being UTF-8, or the gzip stream breaks."""
    try:
        yield
    except UnicodeDecodeError as exc:
        where = _undecodable_line(path) if path is not None else None
        if where is None:
            raise DataError(label, None, None, "UTF-8 text", "undecodable bytes", hint=str(exc)) from exc
        line, column = where
        if rows_are_lines:
            raise DataError(label, line, None, "UTF-8 text", f"bytes that are not UTF-8 at column {column}") from None
        raise DataError(
            label, None, None, "UTF-8 text", f"bytes that are not UTF-8 at line {line}, column {column}"
        ) from None
    except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
        raise DataError(
            label, None, None, "a valid gzip file", "a corrupt or truncated gzip stream", hint=str(exc)
        ) from None
    except RecursionError:
        raise DataError(label, None, None, "JSON nested at most a few hundred levels deep", "deeper nesting") from None


def _read_jsonl(path: Path, label: str, errors: list[DataError] | None) -> Iterator[tuple[int, dict]]:
    with _decode_guard(label, path), _open_binary(path) as handle:
        for n, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                _row_problem(
                    DataError(label, n, None, "UTF-8 text", f"bytes that are not UTF-8 at column {exc.start + 1}"),
                    errors,
                )
                continue
            if n == 1:
                line = line.removeprefix("\ufeff")  # a byte-order mark, as CSV readers accept it
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                _row_problem(
                    DataError(
                        label,
                        n,
                        None,
                        f"one JSON object per line (invalid JSON: {exc.msg} at column {exc.colno})",
                    ),
                    errors,
                )
                continue
            except RecursionError:
                _row_problem(
                    DataError(label, n, None, "JSON nested at most a few hundred levels deep", "deeper nesting"), errors
                )
                continue
            if not isinstance(row, dict):
                _row_problem(DataError(label, n, None, "one JSON object per line", row), errors)
                continue
            yield n, row


def _read_json(path: Path, label: str, errors: list[DataError] | None) -> Iterator[tuple[int, dict]]:
    with _decode_guard(label, path, rows_are_lines=False), _open_text(path) as handle:
        try:
            data = json.load(handle)
        except json.JSONDecodeError as exc:
            raise DataError(
                label,
                None,
                None,
                f"a JSON list of objects (invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}; "
                "for one object per line name the file .jsonl)",
            ) from None
    if not isinstance(data, list):
        raise DataError(label, None, None, "a JSON list of objects (one per row)", f"a JSON {type(data).__name__}")
    for n, row in enumerate(data, start=1):
        if not isinstance(row, dict):
            _row_problem(DataError(label, n, None, "a JSON object per list item", row), errors)
            continue
        yield n, row


def parse_csv_cell(cell: str) -> Any:
    """A CSV cell's value: a JSON list or object when the cell holds one, else the string itself."""
    stripped = cell.strip()
    if stripped[:1] in ("[", "{"):
        try:
            value = json.loads(stripped)
        except json.JSONDecodeError:
            return cell
        if isinstance(value, (list, dict)):
            return value
    return cell


def _read_csv(path: Path, label: str, errors: list[DataError] | None) -> Iterator[tuple[int, dict]]:
    old_limit = csv.field_size_limit()
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # long dialogues exceed the 128 KiB default
    try:
        with _decode_guard(label, path, rows_are_lines=False), open(path, encoding="utf-8-sig", newline="") as handle:
            reader = csv.reader(handle)
            try:
                header = next(reader)
            except StopIteration:
                raise DataError(label, None, None, "a CSV header line naming the columns", "an empty file") from None
            duplicates = sorted({c for c in header if header.count(c) > 1})
            if duplicates:
                raise DataError(label, None, None, "distinct column names in the CSV header", duplicates)
            for n, cells in enumerate(reader, start=1):
                if not cells:
                    continue
                if len(cells) != len(header):
                    _row_problem(
                        DataError(
                            label,
                            n,
                            None,
                            f"{len(header)} cells, one per header column",
                            f"{len(cells)} cells",
                        ),
                        errors,
                    )
                    continue
                yield n, {name: parse_csv_cell(cell) for name, cell in zip(header, cells)}
    except csv.Error as exc:
        raise DataError(label, None, None, "a well-formed CSV file", hint=str(exc)) from exc
    finally:
        csv.field_size_limit(old_limit)


def _read_parquet(path: Path, label: str, errors: list[DataError] | None) -> Iterator[tuple[int, dict]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(label, None, None, "a valid Parquet file", hint=str(exc)) from exc
    n = 0
    for batch in parquet.iter_batches(batch_size=1024):
        for row in batch.to_pylist():
            n += 1
            yield n, row


def _is_saved_dataset(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (
        (path / "state.json").is_file() and (path / "dataset_info.json").is_file()
    )


def _read_folder(
    path: Path, split: str | None, label: str, errors: list[DataError] | None
) -> Iterator[tuple[int, dict]]:
    if not _is_saved_dataset(path) and not any(
        p.is_file() and (file_format(p) is not None or p.suffix in (".arrow", ".txt")) for p in path.rglob("*")
    ):
        raise DataError(
            label,
            None,
            None,
            f"a datasets folder (save_to_disk) or a folder holding data files ({', '.join(SUFFIXES)})",
            "a folder with no data files",
        )
    if _is_saved_dataset(path):
        import datasets

        dataset = datasets.load_from_disk(str(path))
        yield from _read_dataset_object(dataset, split, label, errors)
        return
    yield from _read_hub(str(path), split, label, errors)


def _read_hub(name: str, split: str | None, label: str, errors: list[DataError] | None) -> Iterator[tuple[int, dict]]:
    import datasets

    try:
        dataset = datasets.load_dataset(name, split=split)
    except Exception as exc:  # the Hub / builder errors are many; keep their message
        raise DataError(
            label,
            None,
            None,
            f"a dataset that datasets.load_dataset can read (it is not a local file or folder either; "
            f"sources are {SUPPORTED_SOURCES})",
            hint=f"datasets.load_dataset({name!r}, split={split!r}) failed with {type(exc).__name__}: {exc}",
        ) from exc
    yield from _read_dataset_object(dataset, None, label, errors)


def _read_dataset_object(
    dataset: Any, split: str | None, label: str, errors: list[DataError] | None
) -> Iterator[tuple[int, dict]]:
    import datasets

    if isinstance(dataset, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        names = list(dataset)
        if split is None:
            raise DataError(label, None, None, f"a split (the dataset has splits {names})", "none")
        if split not in dataset:
            raise DataError(label, None, None, f"a split among {names}", split)
        dataset = dataset[split]
    elif split is not None and isinstance(dataset, (datasets.Dataset, datasets.IterableDataset)):
        raise DataError(label, None, None, "no split (this is a single dataset, not a DatasetDict)", split)
    if not isinstance(dataset, (datasets.Dataset, datasets.IterableDataset)):
        raise DataError(label, None, None, SUPPORTED_SOURCES, f"a {type(dataset).__name__}")
    for n, row in enumerate(dataset, start=1):
        yield n, dict(row)


# ---- column maps and kinds ----------------------------------------------------------------------
def parse_column_map(items: Iterable[str]) -> dict[str, str]:
    """Parse ``["target=source", ...]`` (as the ``--map`` option takes) into a column map.

    Each item may also hold several comma-separated pairs. Raises ``ValueError`` on a bad item.
    """
    out: dict[str, str] = {}
    for item in items:
        for pair in item.split(","):
            pair = pair.strip()
            if not pair:
                continue
            target, sep, source = pair.partition("=")
            if not sep or not target.strip() or not source.strip():
                raise ValueError(f"bad column map entry {pair!r}: expected target=source, e.g. chosen=response_a")
            out[target.strip()] = source.strip()
    return out


def apply_column_map(row: dict, column_map: dict[str, str] | None) -> dict:
    """Rename columns of one row: ``column_map`` is ``{target: source}``.

    Renaming is simultaneous (``{"chosen": "rejected", "rejected": "chosen"}`` swaps); a column
    named like a target but not mapped is replaced; a source column absent from this row leaves
    its target absent.
    """
    if not column_map:
        return row
    sources, targets = set(column_map.values()), set(column_map)
    out = {k: v for k, v in row.items() if k not in sources and k not in targets}
    for target, source in column_map.items():
        if source in row:
            out[target] = row[source]
    return out


def _describe_signature(kind: str) -> str:
    all_of, one_of = KIND_SIGNATURES[kind]
    text = " + ".join(all_of)
    if one_of:
        text += " + (" + " or ".join(one_of) + ")"
    return f"{kind} ({text})"


def detect_kind(columns: Iterable[str], file: str | None = None) -> str:
    """The record kind whose fields are present among ``columns``; `DataError` when none or
    several match (the message lists what each kind needs)."""
    present = set(columns)
    matches = [
        kind
        for kind, (all_of, one_of) in KIND_SIGNATURES.items()
        if set(all_of) <= present and (not one_of or present & set(one_of))
    ]
    if len(matches) == 1:
        return matches[0]
    expected = "; ".join(_describe_signature(k) for k in KIND_SIGNATURES)
    found = f"the columns with values are {sorted(present)}"
    if not matches:
        raise DataError(
            file,
            None,
            None,
            f"the fields of one kind of feedback: {expected}; {found}. Rename columns with a column "
            "map (--map target=source) or pass the kind",
        )
    raise DataError(
        file,
        None,
        None,
        f"the fields of exactly one kind of feedback ({expected}); {found}, which fit "
        f"{' and '.join(matches)}: pass the kind (--kind) to choose",
    )


# ---- CSV cell types -------------------------------------------------------------------------------
_NUMBER_FIELDS = ("weight", "margin", "chosen_score", "rejected_score")
_OPTIONAL_NON_TEXT = (
    "user_id",
    "id",
    "ranking",
    "scores",
    "ratings",
    "labels",
    "completions",
) + _NUMBER_FIELDS
_BOOL_WORDS = {"true": True, "false": False, "1": True, "0": False}


def coerce_csv_row(row: dict) -> dict:
    """Give a mapped CSV row the types JSON would have: empty cells of non-text fields become
    absent, numbers in ``weight``/``margin``/``*_score`` become floats, ``label`` words
    ``true``/``false``/``1``/``0`` (any case) become bools. Unparseable cells stay strings, so
    validation reports them. Text fields are left alone (an empty cell is an empty text)."""
    out = dict(row)
    for name in _OPTIONAL_NON_TEXT + ("label",):
        value = out.get(name)
        if isinstance(value, str) and not value.strip():
            out[name] = None
    for name in _NUMBER_FIELDS:
        value = out.get(name)
        if isinstance(value, str):
            try:
                out[name] = float(value)
            except ValueError:
                pass  # left as text: validation reports "a finite number, got '...'"
    label = out.get("label")
    if isinstance(label, str) and label.strip().lower() in _BOOL_WORDS:
        out["label"] = _BOOL_WORDS[label.strip().lower()]
    return out


# ---- the loading pipeline -----------------------------------------------------------------------
@dataclass
class PreparedRows:
    """Rows ready for validation: read, adapted, mapped, typed and prompt-split.

    ``rows`` holds ``(row_number, row)`` for the rows that got this far; ``errors`` one
    `DataError` for each row that did not (unreadable, layout mismatch, failed prompt split).
    ``n_rows`` counts both.
    """

    file: str
    kind: str
    rows: list[tuple[int, dict]] = field(default_factory=list)
    errors: list[DataError] = field(default_factory=list)
    n_rows: int = 0


def prepare_rows(
    source: Any,
    kind: str | None = None,
    column_map: dict[str, str] | None = None,
    split: str | None = None,
    layout: str | None = None,
    labels: LabelSpec | None = None,
) -> PreparedRows:
    """Run the loading pipeline up to (not including) validation; see `load_records`.

    Problems of the whole source (missing file, unknown format, a column map onto a missing
    column, an undetectable kind, a required column absent from every row) raise `DataError`;
    problems of single rows are collected in the result's ``errors``.
    """
    if kind is not None and kind not in KINDS:
        raise ValueError(f"unknown record kind {kind!r}; expected one of {', '.join(KINDS)}")
    adapter = layout_adapter(layout) if layout is not None else None
    if adapter is not None and kind is None:
        kind = layout_kind(layout)
    label = source_label(source, split)
    errors: list[DataError] = []
    raw = list(read_rows(source, split=split, errors=errors))
    n_rows = len(raw) + len(errors)

    if adapter is not None:
        raw = _adapt(raw, adapter, label, errors)
    columns: set[str] = set()
    for _, row in raw:
        columns.update(row)
    if labels is not None:
        missing = [c for c in (*labels.responses, *labels.columns) if raw and c not in columns]
        if missing:
            raise DataError(label, None, missing[0], f"a column {missing[0]!r}; the columns are {sorted(columns)}")
        raw = _adapt(raw, labels.apply, label, errors)
        kind = kind or "pairwise"
        columns = {c for _, row in raw for c in row}
    elif column_map and {"chosen", "rejected"} <= set(column_map):
        _refuse_unlabelled_orientation(column_map, columns, label)
    if column_map:
        known = all_field_names()
        for target, source_column in column_map.items():
            if target not in known:
                raise DataError(
                    label,
                    None,
                    None,
                    f"column map targets that are record fields ({', '.join(sorted(known))})",
                    target,
                )
            if raw and source_column not in columns:
                raise DataError(
                    label,
                    None,
                    source_column,
                    f"a column {source_column!r} to map onto {target!r}; the columns are {sorted(columns)}",
                    "no such column",
                )
        raw = [(n, apply_column_map(row, column_map)) for n, row in raw]

    present: set[str] = set()
    for _, row in raw:
        present.update(k for k, v in row.items() if v is not None)
    if kind is None:
        if not raw and errors:
            # Every row failed to read or adapt: the first row's own problem says more than "no rows".
            errors.sort(key=lambda e: e.row or 0)
            more = f"; {len(errors) - 1} more bad row(s)" if len(errors) > 1 else ""
            raise errors[0].with_hint(f"no row of {label} could be read{more}")
        if not raw:
            raise DataError(
                label,
                None,
                None,
                "at least one readable row to detect the kind from (or pass the kind)",
                "none",
            )
        kind = detect_kind(present, label)
    if raw:
        _check_required_columns(kind, present, label)

    is_csv = isinstance(source, (str, os.PathLike)) and file_format(source) == "csv" and Path(source).is_file()
    prepared: list[tuple[int, dict]] = []
    for n, row in raw:
        if is_csv:
            row = coerce_csv_row(row)
        row = _scalar_responses_as_text(row)
        if kind == "pairwise":
            try:
                row = split_implicit_prompt(row, label, n)
            except DataError as err:
                errors.append(err)
                continue
        prepared.append((n, row))
    errors.sort(key=lambda e: e.row or 0)
    return PreparedRows(file=label, kind=kind, rows=prepared, errors=errors, n_rows=n_rows)


def _adapt(raw: list, fn, label: str, errors: list[DataError]) -> list:
    """``(n, fn(row, label, n))`` for each row; a row ``fn`` refuses goes to ``errors``."""
    out = []
    for n, row in raw:
        try:
            out.append((n, fn(row, label, n)))
        except DataError as err:
            errors.append(err)
    return out


def _refuse_unlabelled_orientation(column_map: dict[str, str], columns: set[str], label: str) -> None:
    """Renaming two response columns onto chosen / rejected says the first is always better; when the file also
    holds a label column, that is the label's job: refuse and say how to read it."""
    found = sorted(c for c in columns if c.lower() in LABEL_LIKE_COLUMNS and c not in column_map.values())
    if found:
        a, b = column_map["chosen"], column_map["rejected"]
        raise DataError(
            label,
            None,
            found[0],
            f"no label column when --map puts {a!r} first and {b!r} second (a rename takes the first as the "
            f"better one in every row); read the label instead: --responses {a},{b} --label {found[0]} "
            "--first-better VALUES --second-better VALUES [--tie VALUES]",
            f"a column {found[0]!r}",
        )


RESPONSE_FIELDS = ("chosen", "rejected", "completion")


def _scalar_responses_as_text(row: dict) -> dict:
    """Responses stored as booleans or numbers (a benchmark's answer ``42``, a yes/no ``true``) become their text;
    prompts, labels and scores are left alone."""
    changed = {k: scalar_as_text(row[k]) for k in RESPONSE_FIELDS if k in row and row[k] is not None}
    completions = row.get("completions")
    if isinstance(completions, list):
        changed["completions"] = [scalar_as_text(c) for c in completions]
    return {**row, **changed} if changed else row


def _check_required_columns(kind: str, present: set[str], label: str) -> None:
    """A required field with no value in any row is a file-level problem (one error, not one per row)."""
    all_of, one_of = KIND_SIGNATURES[kind]
    needed = list(all_of) + ([] if kind == "pairwise" else ["prompt"])  # a pair may hold its prompt
    found = f"no row has a value for it; the columns with values are {sorted(present)}"
    for name in needed:
        if name not in present:
            raise DataError(
                label,
                None,
                name,
                f"a column {name!r} (required for {kind} records; map one with --map {name}=COLUMN); {found}",
            )
    if one_of and not present & set(one_of):
        raise DataError(
            label,
            None,
            one_of[0],
            f"a column {' or '.join(repr(f) for f in one_of)} (required for {kind} records); {found}",
        )


def validate_command(
    source: Any,
    kind: str | None = None,
    column_map: dict[str, str] | None = None,
    split: str | None = None,
    layout: str | None = None,
    labels: LabelSpec | None = None,
) -> str | None:
    """The ``prefkit data validate`` command line that checks the same source the same way
    (None for in-memory sources)."""
    if not isinstance(source, (str, os.PathLike)):
        return None
    parts = ["prefkit", "data", "validate", shlex.quote(str(source))]
    if kind:
        parts += ["--kind", kind]
    if split:
        parts += ["--split", shlex.quote(split)]
    if layout:
        parts += ["--layout", layout]
    for target, source_column in (column_map or {}).items():
        parts += ["--map", shlex.quote(f"{target}={source_column}")]
    if labels is not None:
        for flag, values in (
            ("--responses", labels.responses),
            ("--label", labels.columns),
            ("--first-better", labels.first),
            ("--second-better", labels.second),
            ("--tie", labels.tie),
        ):
            if values:
                parts += [flag, shlex.quote(",".join(values))]
    return " ".join(parts)


def first_error_with_summary(errors: list[DataError], command: str | None) -> DataError:
    """The first of ``errors`` with a hint saying how many other rows are bad and how to list them."""
    first = errors[0]
    other_rows = len({e.row for e in errors if e.row != first.row})
    same_row = sum(1 for e in errors if e.row == first.row) - 1
    parts = [f"{other_rows or 'no'} other bad row{'s' if other_rows != 1 else ''}"]
    if same_row:
        parts.insert(0, f"{same_row} more problem{'s' if same_row != 1 else ''} in this row")
    how = f"run `{command}` to list them all" if command else "call prefkit.data.validate_source() to list them all"
    return first.with_hint(f"{', '.join(parts)}; {how}")


def load_records(
    source: Any,
    kind: str | None = None,
    column_map: dict[str, str] | None = None,
    split: str | None = None,
    validate: bool = True,
    layout: str | None = None,
    labels: LabelSpec | None = None,
) -> list[Record]:
    """Load feedback records from a file, a folder, a Hub dataset or in-memory rows.

    Steps: read the rows (`read_rows`); apply ``layout`` (``"llmbar"``, ``"hhh"``; see
    `prefkit.data.formats.LAYOUTS`, and ``joined:SEP``); rename columns with ``column_map`` (``{target: source}``,
    e.g. ``{"chosen": "response_a"}``); detect the kind from the fields present unless ``kind`` is
    given; for pairwise rows without a prompt, split an HH-RLHF dialogue or chat conversation
    into prompt and completions; validate every row (``validate=True``); build the records.
    Columns that are not fields of the kind are ignored. ``labels`` (`prefkit.data.labels.LabelSpec`): pairs
    stored as two responses and a label, oriented by the label before the column map.

    Raises `DataError` on the first bad row; its message says how many other rows are bad and
    which ``prefkit data validate`` command lists them all. With ``validate=False`` values are not
    checked, but unreadable rows and missing required fields still raise.
    """
    prepared = prepare_rows(source, kind=kind, column_map=column_map, split=split, layout=layout, labels=labels)
    errors = list(prepared.errors)
    if validate:
        errors.extend(validate_rows(prepared.rows, prepared.kind, prepared.file))
        errors.sort(key=lambda e: e.row or 0)
    if errors:
        raise first_error_with_summary(errors, validate_command(source, kind, column_map, split, layout, labels))
    return [record_from_dict(prepared.kind, row, prepared.file, n) for n, row in prepared.rows]


# ---- validation of a whole source -----------------------------------------------------------------
@dataclass
class ValidationReport:
    """The result of `validate_source`: the file's kind, how many rows, and every problem.

    ``kind`` is ``None`` when it could not be determined (then ``errors`` holds the file-level
    problem). Row-less errors (``row is None``) are file-level.
    """

    file: str
    kind: str | None
    n_rows: int
    errors: list[DataError] = field(default_factory=list)

    @property
    def bad_rows(self) -> list[int]:
        """The 1-based numbers of the rows with at least one problem, in order."""
        return sorted({e.row for e in self.errors if e.row is not None})

    @property
    def ok(self) -> bool:
        """True when there is no problem at all."""
        return not self.errors


def validate_source(
    source: Any,
    kind: str | None = None,
    column_map: dict[str, str] | None = None,
    split: str | None = None,
    layout: str | None = None,
    labels: LabelSpec | None = None,
) -> ValidationReport:
    """Read a file (or any source `load_records` accepts) and collect every problem in it.

    File-level problems (missing file, unknown format, a column map onto a missing column, an
    undetectable kind) end the check early and are reported as one row-less error.
    """
    try:
        prepared = prepare_rows(source, kind=kind, column_map=column_map, split=split, layout=layout, labels=labels)
    except DataError as err:
        return ValidationReport(file=err.file or source_label(source, split), kind=None, n_rows=0, errors=[err])
    errors = list(prepared.errors)
    errors.extend(validate_rows(prepared.rows, prepared.kind, prepared.file))
    errors.sort(key=lambda e: e.row if e.row is not None else 0)
    return ValidationReport(file=prepared.file, kind=prepared.kind, n_rows=prepared.n_rows, errors=errors)


# ---- writing ------------------------------------------------------------------------------------
def _csv_cell(value: Any, where: str) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        if not isinstance(parse_csv_cell(value), str):
            raise ValueError(
                f"{where}: the text {value[:40]!r} would read back as JSON from a CSV cell; "
                "write .jsonl or .parquet instead"
            )
        return value
    return json.dumps(value, ensure_ascii=False, allow_nan=False)


def write_records(records: Iterable[Record], path: str | os.PathLike) -> Path:
    """Write records of one kind to ``path``; the extension picks the format (.jsonl, .jsonl.gz,
    .json, .json.gz, .csv, .parquet). ``None`` fields are left out (empty cells in CSV, nulls in
    Parquet). The file is written to a temporary name beside ``path`` and moved into place, so a
    reader never sees half a file. Returns the path."""
    records = list(records)
    path = Path(path)
    fmt = file_format(path)
    if fmt is None:
        raise ValueError(f"cannot write {path}: expected a .jsonl, .jsonl.gz, .json, .json.gz, .csv or .parquet name")
    if not records:
        raise ValueError(f"cannot write {path}: no records (an empty file has no detectable kind)")
    kinds = {getattr(type(r), "kind", None) for r in records}
    if len(kinds) != 1 or None in kinds:
        raise ValueError(f"cannot write {path}: records must all be of one kind, got {sorted(map(str, kinds))}")
    kind = kinds.pop()
    rows = [record_to_dict(r) for r in records]
    columns = [name for name in record_fields(kind) if any(name in row for row in rows)]

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        if fmt in ("jsonl", "json"):
            with open(tmp, "wb") as raw:
                if path.name.lower().endswith(".gz"):
                    with gzip.GzipFile(filename=path.name[:-3], mode="wb", fileobj=raw, mtime=0) as gz:
                        _write_json_text(gz, rows, fmt)
                else:
                    _write_json_text(raw, rows, fmt)
        elif fmt == "csv":
            with open(tmp, "w", encoding="utf-8", newline="") as handle:
                writer = csv.writer(handle)
                writer.writerow(columns)
                for i, row in enumerate(rows, start=1):
                    writer.writerow([_csv_cell(row.get(c), f"record {i} field {c!r}") for c in columns])
        else:
            import pyarrow as pa
            import pyarrow.parquet as pq

            try:
                table = pa.Table.from_pylist([{c: row.get(c) for c in columns} for row in rows])
            except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
                raise ValueError(
                    f"cannot write {path} as Parquet: each column needs one type across records "
                    f"(e.g. all plain-text prompts or all chat messages): {exc}"
                ) from exc
            pq.write_table(table, tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def _write_json_text(binary, rows: list[dict], fmt: str) -> None:
    text = io.TextIOWrapper(binary, encoding="utf-8", newline="\n")
    try:
        if fmt == "jsonl":
            for row in rows:
                text.write(json.dumps(row, ensure_ascii=False, allow_nan=False) + "\n")
        else:
            json.dump(rows, text, ensure_ascii=False, allow_nan=False, indent=1)
            text.write("\n")
        text.flush()
    finally:
        text.detach()
