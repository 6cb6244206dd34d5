"""``prefkit data convert IN OUT``: convert between feedback kinds and file formats.

``--to pairwise|unpaired`` picks the conversion (ranked -> pairwise, rated -> pairwise,
pairwise -> unpaired; see `prefkit.data.convert`); without ``--to`` the kind is kept and only the
file format changes. ``--to judge`` turns preference pairs into pairs that train a generative judge on its
verdicts (`judge_training_pairs`: the judge prompt of ``--template`` in both orders, the right label chosen,
``--rationale COLUMN`` after it). OUT's extension decides the format. The input is validated first; nothing is
written when it has a bad row or when the conversion yields no records.
"""

from __future__ import annotations

import argparse
import math
import sys

from prefkit.data.commands_validate import add_source_arguments, column_map_from_args, labels_from_args
from prefkit.data.convert import convert_records, judge_training_pairs
from prefkit.data.loaders import load_records, write_records
from prefkit.data.records import DataError


def parse_weights(text: str) -> dict[str, float]:
    """Parse ``"a=1,b=0.5"`` into ``{"a": 1.0, "b": 0.5}``; ``ValueError`` on bad entries."""
    weights: dict[str, float] = {}
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        name, sep, value = item.partition("=")
        try:
            number = float(value)
        except ValueError:
            number = math.nan
        if not sep or not name.strip() or not math.isfinite(number):
            raise ValueError(f"bad weight {item!r}: expected attribute=number, e.g. helpfulness=1,honesty=0.5")
        weights[name.strip()] = number
    if not weights:
        raise ValueError("--weights is empty: expected attribute=number[,attribute=number...]")
    return weights


def configure(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``prefkit data convert``."""
    parser.add_argument("input", metavar="IN", help="feedback file, datasets folder or Hub name")
    parser.add_argument(
        "output", metavar="OUT", help="file to write: .jsonl, .jsonl.gz, .json, .json.gz, .csv or .parquet"
    )
    parser.add_argument(
        "--to",
        choices=("pairwise", "unpaired", "judge"),
        default=None,
        help="target kind (default: keep the kind); judge: pairs that train a generative judge on verdicts",
    )
    parser.add_argument(
        "--template", default=None, help="--to judge: judge prompt, plain (default), chat, or a YAML file"
    )
    parser.add_argument("--rationale", default=None, metavar="COLUMN", help="--to judge: a column of rationales")
    parser.add_argument(
        "--mode",
        choices=("all", "adjacent", "best"),
        default="all",
        help="ranked -> pairwise: all pairs, adjacent ranks only, or the best against each other (Curry-DPO)",
    )
    parser.add_argument("--attribute", default=None, help="rated -> pairwise: the rating to compare")
    parser.add_argument(
        "--weights",
        default=None,
        metavar="A=W,...",
        help="rated -> pairwise: compare weighted sums of ratings",
    )
    parser.add_argument(
        "--min-gap",
        type=float,
        default=0.0,
        help="rated -> pairwise: pair only if scores differ by more than this",
    )
    parser.add_argument(
        "--reward-augmented",
        action="store_true",
        help="scored pairs -> two pairs each whose prompt names a target score (reward-augmented DPO, Zhang et al. "
        "2024): x|r_w: chosen > rejected and x|r_l: rejected > chosen",
    )
    add_source_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """Load, convert and write; 0 on success, 1 on bad data, 2 on bad options."""
    try:
        column_map = column_map_from_args(args)
        labels = labels_from_args(args)
        weights = parse_weights(args.weights) if args.weights is not None else None
        template = _judge_template(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        records = load_records(
            args.input, kind=args.kind, column_map=column_map, split=args.split, layout=args.layout, labels=labels
        )
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    judge = args.to == "judge"
    try:
        converted = convert_records(
            records,
            "pairwise" if judge else args.to,
            mode=args.mode,
            attribute=args.attribute,
            weights=weights,
            min_gap=args.min_gap,
            reward_augmented=args.reward_augmented,
        )
    except (TypeError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2 if "do not apply" in str(exc) or "no conversion" in str(exc) else 1
    note = ""
    if judge:
        try:
            rationales = _rationales(args, column_map, labels, len(converted)) if args.rationale else None
        except DataError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        converted, ties = judge_training_pairs(converted, template, rationales)
        note = f"; {ties} tie rows left out (a two-label judge has no tie verdict)" if ties else ""
    if not converted:
        print(
            f"error: the conversion produced no records from {len(records)} input records "
            "(all ties, or --min-gap too large?); nothing written",
            file=sys.stderr,
        )
        return 1
    try:
        write_records(converted, args.output)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    source_kind = type(records[0]).kind
    target_kind = type(converted[0]).kind
    print(
        f"wrote {len(converted)} {target_kind} records to {args.output} "
        f"(from {len(records)} {source_kind} records in {args.input}{note})"
    )
    return 0


def _judge_template(args: argparse.Namespace):
    """The judge template of ``--to judge`` (checked before anything loads); its options are refused elsewhere."""
    if args.to != "judge":
        given = [name for name in ("template", "rationale") if getattr(args, name) is not None]
        if given:
            raise ValueError(f"--{' and --'.join(given)} apply to --to judge only")
        return None
    from prefkit.data.judge_prompts import load_template

    return load_template(args.template or "plain")


def _rationales(args, column_map, labels, n: int) -> list:
    """The ``--rationale`` column of the input, row by row (a pair converted from another kind has none)."""
    from prefkit.data.loaders import prepare_rows

    prepared = prepare_rows(
        args.input, kind=args.kind, column_map=column_map, split=args.split, layout=args.layout, labels=labels
    )
    rows = [row for _, row in prepared.rows]
    if len(rows) != n:
        raise ValueError(f"--rationale needs pairwise input (one pair per row); {len(rows)} rows gave {n} pairs")
    missing = [k for k, row in prepared.rows if args.rationale not in row]
    if len(missing) == len(rows):
        raise DataError(prepared.file, missing[0], args.rationale, "a rationale column (--rationale)", None)
    return [row.get(args.rationale) for row in rows]
