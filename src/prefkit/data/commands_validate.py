"""``prefkit data validate FILE``: report every bad row of a feedback file; never writes.

Prints one line per problem (``FILE:ROW: field 'F': expected ..., got ...``) and a summary line;
exits 1 when there is any problem, 0 otherwise. Also holds the source options shared by the
``prefkit data`` commands (``--kind``, ``--map``, ``--split``, ``--layout``).
"""

from __future__ import annotations

import argparse
import sys

from prefkit.data.loaders import parse_column_map, validate_source
from prefkit.data.records import KINDS


def add_source_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options that say how to read a source: --kind, --map, --split, --layout."""
    parser.add_argument(
        "--kind", choices=KINDS, default=None, help="kind of feedback (default: detected from the columns)"
    )
    parser.add_argument(
        "--map",
        nargs="+",
        action="extend",
        default=None,
        metavar="TARGET=SOURCE",
        help="rename columns before kind detection, e.g. --map chosen=response_a rejected=response_b",
    )
    parser.add_argument("--split", default=None, help="split of a dataset folder or Hub dataset (e.g. train)")
    parser.add_argument(
        "--layout",
        default=None,
        metavar="LAYOUT",
        help="a public dataset layout to adapt: llmbar {input, output_1, output_2, label}, "
        "hhh {source, chosen_instruction, rejected_instruction}, hh, rewardbench2, rmbench; stepwise: "
        "prmbench, processbench, math_shepherd, prm800k, joined (steps in one text split at blank lines; "
        "joined:SEP for another separator)",
    )
    add_label_arguments(parser)


def add_label_arguments(parser: argparse.ArgumentParser) -> None:
    """Options that orient pairs stored as two responses and a label (`prefkit.data.labels`)."""
    parser.add_argument(
        "--responses", default=None, metavar="A,B", help="the two response columns of a labelled pair, first,second"
    )
    parser.add_argument(
        "--label",
        default=None,
        metavar="COLUMN[,COLUMN...]",
        help="the label column (several: one per annotator, the majority outcome wins; a split vote is a tie)",
    )
    parser.add_argument("--first-better", default=None, metavar="V[,V...]", help="label values: the first is better")
    parser.add_argument("--second-better", default=None, metavar="V[,V...]", help="label values: the second is better")
    parser.add_argument("--tie", default=None, metavar="V[,V...]", help="label values: a tie (kept as a tie row)")


def labels_from_args(args: argparse.Namespace):
    """The label options as a `LabelSpec` (None when not given); ``ValueError`` naming the option on bad ones."""
    from prefkit.data.labels import parse_label_spec

    given = [getattr(args, k, None) for k in ("responses", "label", "first_better", "second_better", "tie")]
    if not any(given):
        return None
    for flag, value in zip(("--responses", "--label", "--first-better", "--second-better"), given):
        if not value:
            raise ValueError(
                f"{flag} is needed with the other label options (--responses, --label, --first-better, "
                "--second-better, [--tie])"
            )
    return parse_label_spec(args.responses, args.label, args.first_better, args.second_better, args.tie)


def column_map_from_args(args: argparse.Namespace) -> dict[str, str] | None:
    """The ``--map`` option as a column map (None when not given); ``ValueError`` on bad entries."""
    return parse_column_map(args.map) if args.map else None


def configure(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``prefkit data validate``."""
    parser.add_argument(
        "file", help="feedback file (.jsonl[.gz], .json[.gz], .csv, .parquet), datasets folder or Hub name"
    )
    add_source_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """Check the file, print every problem and a summary; 1 if anything is wrong, else 0."""
    try:
        column_map = column_map_from_args(args)
        labels = labels_from_args(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    report = validate_source(
        args.file, kind=args.kind, column_map=column_map, split=args.split, layout=args.layout, labels=labels
    )
    for error in report.errors:
        print(error)
    if report.kind is None:
        print(f"{report.file}: could not be checked (see the problem above)")
        return 1
    n_bad = len(report.bad_rows)
    if report.ok:
        print(f"{report.file}: all {report.n_rows} rows are valid {report.kind} records")
        return 0
    problems = len(report.errors)
    print(
        f"{report.file}: {n_bad} of {report.n_rows} rows are bad "
        f"({problems} problem{'s' if problems != 1 else ''}); kind {report.kind}"
    )
    return 1
