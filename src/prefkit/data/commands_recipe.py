"""``prefkit data recipe NAME IN OUT``: build a set from public data by a recipe (docs/recipes.md).

    prefkit data recipe hh-two-groups harmless-base-test.jsonl.gz hh_two_groups.jsonl \\
        --users-per-group 10 --shares 0.5,0.5 --seed 0

``hh-two-groups`` (`prefkit.data.recipes.hh_two_groups`): HH-RLHF pairs as a personalised set of two user
groups, ``harmless`` (the human label) and ``longer`` (the longer response), user ids ``group:NAME/K``.
"""

from __future__ import annotations

import argparse
import sys

from prefkit.data.loaders import write_records
from prefkit.data.recipes import format_stats, hh_two_groups, parse_shares
from prefkit.data.records import DataError

RECIPES = ("hh-two-groups",)


def configure(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``prefkit data recipe``."""
    parser.add_argument("recipe", choices=RECIPES, help="hh-two-groups: HH-RLHF pairs as two user groups")
    parser.add_argument("input", metavar="IN", help="HH-RLHF pairs {chosen, rejected} (.jsonl, .jsonl.gz, ...)")
    parser.add_argument("output", metavar="OUT", help="pairwise file to write (.jsonl, .jsonl.gz, .json, ...)")
    parser.add_argument("--users-per-group", type=int, default=10, help="users of each group (default 10)")
    parser.add_argument("--shares", default="0.5,0.5", help="share of the pairs of harmless,longer (default 0.5,0.5)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the assignment of pairs to users")


def run(args: argparse.Namespace) -> int:
    """Build and write the set; 0 on success, 1 on bad data, 2 on bad options."""
    try:
        built = hh_two_groups(
            args.input, users_per_group=args.users_per_group, shares=parse_shares(args.shares), seed=args.seed
        )
        write_records(built.records, args.output)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_stats(built.stats))
    print(f"wrote {len(built.records)} pairwise records to {args.output}")
    return 0
