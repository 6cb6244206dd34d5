"""``prefkit lab draw OUT``: save a dataset drawn from a lab world, labelled by simulated annotators.

The file is an ordinary prefkit feedback file (`prefkit.lab.save_dataset`), so any command trains on it.
"""

from __future__ import annotations

import argparse
import sys

from prefkit.data import KINDS
from prefkit.lab.commands import WORLDS_HELP
from prefkit.lab.world import PRESETS

# Which options each record kind accepts.
_TEMPERATURE_KINDS = ("pairwise", "unpaired", "ranked")
_FLIP_KINDS = ("pairwise", "unpaired")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("output", metavar="OUT", help="output file: .jsonl, .jsonl.gz, .json, .csv or .parquet")
    parser.add_argument(
        "--world",
        default="default",
        choices=list(PRESETS),
        help=WORLDS_HELP,
    )
    parser.add_argument("--kind", default="pairwise", choices=list(KINDS), help="record kind (default: pairwise)")
    parser.add_argument("-n", type=int, default=1000, help="number of records (default: 1000)")
    parser.add_argument(
        "--annotator",
        choices=["bt", "argmax"],
        default=None,
        help="pairwise only: bt (Bradley-Terry, a preferred with probability sigmoid(logit / T)) or argmax "
        "(the higher true preference logit wins) (default: bt)",
    )
    parser.add_argument(
        "--temperature",
        type=float,
        default=None,
        help="the annotator's temperature: bt (pairwise, default 1), thumbs (unpaired, default 0: a hard "
        "threshold at reward 0) or Plackett-Luce (ranked, default 1; 0 sorts by reward)",
    )
    parser.add_argument(
        "--flip", type=float, default=0.0, help="pairwise/unpaired: flip each label with this probability (default: 0)"
    )
    parser.add_argument(
        "--groups",
        action="store_true",
        help="draw each record's user from the world's groups (user_id group:<name>/<k>); not for stepwise",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the world and the draw (default: 0)")


def build_annotator(kind: str, annotator: str | None, temperature: float | None, flip: float, groups: bool):
    """The annotator the options describe; ValueError naming the option that does not fit ``kind``."""
    from prefkit.lab import Argmax, BradleyTerry, Flip, GroupMix, PlackettLuce, Thumbs, default_annotator

    if annotator is not None and kind != "pairwise":
        raise ValueError(f"--annotator applies to pairwise records, not {kind}")
    if temperature is not None and (kind not in _TEMPERATURE_KINDS or annotator == "argmax"):
        raise ValueError("--temperature applies to bt (pairwise), unpaired and ranked records")
    if flip and kind not in _FLIP_KINDS:
        raise ValueError(f"--flip applies to pairwise and unpaired records, not {kind}")
    if groups and kind == "stepwise":
        raise ValueError("--groups does not apply to stepwise records (they carry no user_id)")
    if kind == "pairwise":
        base = Argmax() if annotator == "argmax" else BradleyTerry(1.0 if temperature is None else temperature)
    elif kind == "unpaired":
        base = Thumbs(0.0, 0.0 if temperature is None else temperature)
    elif kind == "ranked":
        base = PlackettLuce(1.0 if temperature is None else temperature)
    else:
        base = default_annotator(kind)
    if flip:
        base = Flip(base, flip)
    return GroupMix(base) if groups else base


def run(args: argparse.Namespace) -> int:
    from prefkit.lab import draw_dataset, make_world, save_dataset

    try:
        if args.n < 1:
            raise ValueError(f"-n must be at least 1, got {args.n}")
        annotator = build_annotator(args.kind, args.annotator, args.temperature, args.flip, args.groups)
        world = make_world(args.world, args.seed)
        records = draw_dataset(world, args.kind, args.n, annotator, seed=args.seed)
        path = save_dataset(records, args.output)
    except ValueError as err:
        print(f"prefkit lab draw: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {len(records)} {args.kind} records from world {args.world!r} (seed {args.seed}) to {path}")
    return 0
