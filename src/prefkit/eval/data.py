"""Evaluation data: records from one or more sources, each record with its subset.

A subset names a slice that gets its own accuracy (RewardBench's ``alpacaeval-easy``, LLMBar's
``Natural``, ...). A record's subset is, first found: the row's ``subset`` column (or the column
named by ``subset_column``); for the ``hhh`` layout the HHH category that `prefkit.data.formats.hhh_row`
keeps in front of the id (``"harmless/12"`` -> ``harmless``); the name given with the source
(``natural=path.json``); else ``"all"``.

The evaluation mode follows from the records and the layout:

======================  ===========================================================================
``pairs``               pairwise records (HH-RLHF, LLMBar, HHH, RewardBench-1, any prefkit pairs file)
``best_of_n``           ranked records from the ``rewardbench2`` layout: one best completion among N (its Ties
                        subset: several correct completions, scored by RewardBench 2's Ties rule)
``grid``                ranked records from the ``rmbench`` layout: chosen and rejected in S styles; each
                        record's RM-Bench domain is its row's ``domain``, else the name given with its
                        source, else its file's name (``chat_filtered.json`` -> chat)
``lists``               any other ranked records: ranking accuracy of the scores against the truth
======================  ===========================================================================
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from prefkit.data.formats import LAYOUT_KINDS
from prefkit.data.loaders import first_error_with_summary, prepare_rows, validate_command
from prefkit.data.records import DataError, PairwiseRecord, RankedRecord, record_from_dict, same_text
from prefkit.data.validate import validate_rows
from prefkit.eval.metrics import rmbench_domain

MODES = ("pairs", "best_of_n", "grid", "lists")
_LAYOUT_MODES = {"rewardbench2": "best_of_n", "rmbench": "grid"}
# The layouts of reward-model evaluation (stepwise layouts are `prefkit eval prm`'s).
RM_LAYOUTS = tuple(name for name, kind in LAYOUT_KINDS.items() if kind in ("pairwise", "ranked"))


@dataclass
class EvalSet:
    """Records of one evaluation mode with one subset name each (``subsets[i]`` for ``records[i]``).

    ``best`` (best_of_n): index of the one best completion of each record, or for a record of RewardBench 2's
    Ties subset (`is_ties_subset`) None (its first ``n_correct[i]`` completions are all correct). ``domains``
    (grid): each record's RM-Bench domain (chat, math, code, safety) or None. ``response_sources`` (pairs): the
    model that wrote each response, ``(chosen's, rejected's)``, when the rows say (`response_sources`).
    ``sources``: one ``{"name", "source", "n"}`` per loaded source.
    """

    mode: str
    records: list[PairwiseRecord] | list[RankedRecord]
    subsets: list[str]
    sources: list[dict[str, Any]] = field(default_factory=list)
    best: list[int | None] | None = None
    n_correct: list[int] | None = None
    domains: list[str | None] | None = None
    response_sources: list[tuple[Any, Any]] | None = None

    def __len__(self) -> int:
        return len(self.records)


def true_scores(record: RankedRecord) -> list[float]:
    """A ranked record's order as numbers, higher is better: its ``scores``, or minus each
    completion's position in ``ranking``."""
    if record.scores is not None:
        return [float(s) for s in record.scores]
    position = {index: place for place, index in enumerate(record.ranking)}
    return [-float(position[i]) for i in range(len(record.completions))]


def split_grid(record: RankedRecord) -> tuple[list, list]:
    """``(chosen styles, rejected styles)`` of a record from the ``rmbench`` layout (scored 1 / 0)."""
    scores = true_scores(record)
    chosen = [c for c, s in zip(record.completions, scores) if s == 1.0]
    rejected = [c for c, s in zip(record.completions, scores) if s == 0.0]
    return chosen, rejected


def _subset(row: dict, name: str | None, layout: str | None, subset_column: str) -> str:
    value = row.get(subset_column)
    if value is not None:
        return str(value)
    if layout == "hhh" and isinstance(row.get("id"), str) and "/" in row["id"]:
        return row["id"].split("/", 1)[0]
    return name or "all"


SOURCE_COLUMNS = ("chosen_model", "rejected_model")  # RewardBench's names for who wrote each response


def response_sources(row: dict, columns: tuple[str, str] | None) -> tuple[Any, Any]:
    """``(source of chosen, source of rejected)`` of a pairwise row: ``columns`` (first, second; for a labelled
    pair the first and second response's, oriented by its label) or RewardBench's chosen_model / rejected_model."""
    first, second = columns or SOURCE_COLUMNS
    pair = (row.get(first), row.get(second))
    return pair[::-1] if row.get("label_outcome") == "second" else pair


def is_ties_subset(subset: str) -> bool:
    """RewardBench 2's Ties subset (any case), scored by its own rule."""
    return subset.lower() == "ties"


def load_source(source: Any, name: str | None, options: dict, subset_column: str = "subset"):
    """One source through the loading pipeline (``options``: `prepare_rows`'s kind, column map, split, layout)
    and validation: ``(kind, file, records, subsets, rows)`` with ``rows`` the ``(row number, row)`` pairs; the
    first bad row raises `DataError`."""
    prepared = prepare_rows(source, **options)
    if prepared.kind == "pairwise":  # the same response twice is a tie row here, scored by the tie policy
        for _, row in prepared.rows:
            a, b = row.get("chosen"), row.get("rejected")
            if a is not None and b is not None and not row.get("tie") and same_text(a, b):
                row["tie"] = True
    errors = list(prepared.errors) + validate_rows(prepared.rows, prepared.kind, prepared.file)
    if errors:
        errors.sort(key=lambda e: e.row or 0)
        raise first_error_with_summary(errors, validate_command(source, **options))
    records = [record_from_dict(prepared.kind, row, prepared.file, n) for n, row in prepared.rows]
    subsets = [_subset(row, name, options.get("layout"), subset_column) for _, row in prepared.rows]
    return prepared.kind, prepared.file, records, subsets, list(prepared.rows)


def _mode(kind: str, layout: str | None, file: str) -> str:
    if kind == "pairwise":
        return "pairs"
    if kind == "ranked":
        return _LAYOUT_MODES.get(layout, "lists")
    raise DataError(
        file,
        None,
        None,
        f"pairwise or ranked records to evaluate a reward model on (got {kind} records); convert them "
        "with `prefkit data convert` or pass --kind / --layout",
    )


def _best_index(record: RankedRecord, file: str, row: int, subset: str) -> tuple[int | None, int]:
    """``(index of the one best completion or None for a Ties row, number of correct completions)``."""
    scores = true_scores(record)
    top = [i for i, s in enumerate(scores) if s == max(scores)]
    if is_ties_subset(subset):
        kind, _, number = str(record.id or "").partition(":")
        if kind not in ("ref", "tied") or not number.isdigit():
            raise DataError(
                file, row, "id", "'ref:<number>' or 'tied:<number>' (RewardBench 2's Ties subset)", record.id
            )
        if top != list(range(len(top))) or len(top) == len(scores) or (kind == "tied" and len(top) < 2):
            raise DataError(
                file,
                row,
                "chosen",
                f"the correct answers of a {kind}: row of the Ties subset ({'at least 2' if kind == 'tied' else '1'}), "
                "and at least one rejected answer",
                f"{len(top)} chosen of {len(scores)}",
            )
        return None, len(top)
    if len(top) != 1:
        raise DataError(
            file,
            row,
            "chosen",
            "exactly one chosen (best) response for best-of-N accuracy (only RewardBench 2's Ties subset, scored "
            "by its own rule, has several correct answers: its rows need subset Ties and ids ref:<k> / tied:<k>)",
            f"{len(top)} responses tied at the top",
        )
    return top[0], 1


def _check_grid(record: RankedRecord, file: str, row: int, n_styles: int | None) -> int:
    chosen, rejected = split_grid(record)
    if len(chosen) != len(rejected) or len(chosen) + len(rejected) != len(record.completions):
        raise DataError(file, row, "scores", "chosen styles scored 1 and as many rejected styles scored 0", None)
    if n_styles is not None and len(chosen) != n_styles:
        raise DataError(file, row, "chosen", f"{n_styles} styles, like the rows before", f"{len(chosen)}")
    return len(chosen)


def load_eval_set(
    sources: Sequence[tuple[str | None, Any]],
    *,
    kind: str | None = None,
    layout: str | None = None,
    column_map: dict[str, str] | None = None,
    split: str | None = None,
    subset_column: str = "subset",
    labels=None,
    source_columns: tuple[str, str] | None = None,
) -> EvalSet:
    """Load ``(name or None, source)`` pairs into one `EvalSet`.

    Each source goes through `prefkit.data.loaders.prepare_rows` (layout, column map, kind detection,
    HH-RLHF prompt splitting) and validation; a bad row raises `DataError` naming file, row and field.
    All sources must give the same evaluation mode (see the module docstring). ``labels``: a `LabelSpec` for
    pairs stored as two responses and a label. A pair whose two responses are the same text is a tie row.
    ``source_columns``: the two columns naming the model of each response (default: chosen_model, rejected_model
    when the rows have them); a named column missing from a row is an error naming it.
    """
    if not sources:
        raise ValueError("no evaluation data given")
    options = {"kind": kind or LAYOUT_KINDS.get(layout), "column_map": column_map, "split": split, "layout": layout}
    if labels is not None:  # pairs stored as two responses and a label (`prefkit.data.labels.LabelSpec`)
        options["labels"] = labels
    mode = None
    records: list = []
    subsets: list[str] = []
    described: list[dict[str, Any]] = []
    best: list[int | None] = []
    n_correct: list[int] = []
    domains: list[str | None] = []
    pair_sources: list[tuple[Any, Any]] = []
    n_styles = None
    for name, source in sources:
        source_kind, file, recs, subs, rows = load_source(source, name, options, subset_column)
        source_mode = _mode(source_kind, layout, file)
        if mode is not None and source_mode != mode:
            raise ValueError(f"{file} gives {source_mode} records but the sources before it give {mode}")
        mode = source_mode
        for record, (row, values), subset in zip(recs, rows, subs):
            if mode == "best_of_n":
                index, correct = _best_index(record, file, row, subset)
                best.append(index)
                n_correct.append(correct)
            elif mode == "pairs":
                if source_columns is not None:
                    for column in source_columns:
                        if values.get(column) is None:
                            raise DataError(file, row, column, "the model that wrote a response (--sources)", None)
                pair_sources.append(response_sources(values, source_columns))
            elif mode == "grid":
                n_styles = _check_grid(record, file, row, n_styles)
                candidates = (values.get("domain"), name, file)
                domains.append(next((d for d in map(rmbench_domain, candidates) if d), None))
        records.extend(recs)
        subsets.extend(subs)
        described.append({"name": name, "source": file, "n": len(recs)})
    if not records:
        raise ValueError(f"no records in {', '.join(d['source'] for d in described)}")
    bon = mode == "best_of_n"
    grid = mode == "grid"
    return EvalSet(
        mode,
        records,
        subsets,
        described,
        best if bon else None,
        n_correct if bon else None,
        domains if grid else None,
        pair_sources if mode == "pairs" and any(a is not None or b is not None for a, b in pair_sources) else None,
    )
