"""``prefkit data stats FILE``: counts per field and token-length percentiles of a feedback file.

Token lengths use ``--tokenizer`` (a local path or Hub name for ``AutoTokenizer``) or, by default,
prefkit's byte tokenizer (one token per UTF-8 byte, no download). Chat-message texts are rendered
with the tokenizer's chat template: the prompt with ``add_generation_prompt=True``, a completion as
the rendered whole conversation minus the rendered prompt (what `prefkit.data.tokenize` scores).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

from prefkit.data.commands_validate import add_source_arguments, column_map_from_args, labels_from_args
from prefkit.data.loaders import load_records
from prefkit.data.records import DataError, Record, is_messages, record_to_dict, text_key

BYTE_TOKENIZER_NAME = "prefkit byte tokenizer (1 token per UTF-8 byte)"
_NUMBER_FIELDS = ("weight", "margin", "chosen_score", "rejected_score")


def _summary(values: Sequence[float]) -> dict[str, float]:
    arr = np.asarray(values, dtype=float)
    return {"n": int(arr.size), "mean": float(arr.mean()), "min": float(arr.min()), "max": float(arr.max())}


def _length_summary(lengths: Sequence[int]) -> dict[str, float]:
    arr = np.asarray(lengths, dtype=float)
    p50, p90, p99 = np.percentile(arr, [50, 90, 99])
    return {
        "n": int(arr.size),
        "mean": float(arr.mean()),
        "p50": float(p50),
        "p90": float(p90),
        "p99": float(p99),
        "max": int(arr.max()),
    }


def _completion_fields(record: Record) -> list[tuple[str, Any]]:
    """(stats field name, completion text) for every completion of a record."""
    kind = type(record).kind
    if kind == "pairwise":
        return [("chosen", record.chosen), ("rejected", record.rejected)]
    if kind in ("unpaired", "rated"):
        return [("completion", record.completion)]
    name = "completions" if kind == "ranked" else "steps"
    return [(name, c) for c in record.completions]


def _render_prompt(prompt: Any, tokenizer: Any) -> str:
    """The prompt as the tokenizer will see it (chat: rendered with the generation prompt)."""
    if not is_messages(prompt):
        return prompt
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the records hold chat messages but the tokenizer has no chat template")
    return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)


def _render_completion(prompt: Any, completion: Any, tokenizer: Any) -> str:
    """A completion as the text that follows the rendered prompt."""
    if not is_messages(prompt):
        if is_messages(completion):
            raise ValueError("a plain-text prompt with a chat-message completion cannot be rendered")
        return completion
    prompt_text = _render_prompt(prompt, tokenizer)
    full = tokenizer.apply_chat_template(list(prompt) + list(completion), tokenize=False)
    if not full.startswith(prompt_text):
        raise ValueError(
            "the chat template does not render the prompt (with add_generation_prompt=True) as a prefix "
            "of the whole conversation, so the completion's tokens are not defined"
        )
    return full[len(prompt_text) :]


def _token_lengths(texts: list[str], tokenizer: Any, batch: int = 512) -> list[int]:
    lengths: list[int] = []
    for start in range(0, len(texts), batch):
        encoded = tokenizer(texts[start : start + batch], add_special_tokens=False)["input_ids"]
        lengths.extend(len(ids) for ids in encoded)
    return lengths


def compute_stats(
    records: Sequence[Record], tokenizer: Any = None, tokenizer_name: str | None = None
) -> dict[str, Any]:
    """Counts and token-length percentiles of records of one kind, as a JSON-ready dict.

    Keys: ``kind``, ``rows``, ``prompts`` (distinct), ``text_format`` (plain/chat counts),
    ``fields`` (rows holding each optional field), ``users`` (distinct ``user_id`` when any),
    ``numbers`` (n/mean/min/max of weight, margin, scores), kind-specific counts (``labels``,
    ``ratings``, ``ranked_by``, ``completions_per_row``, ``step_labels``), ``tokenizer`` and
    ``tokens``: per text field, n/mean/p50/p90/p99/max token counts (no special tokens added).
    ``tokenizer=None`` uses prefkit's byte tokenizer.
    """
    records = list(records)
    if not records:
        raise ValueError("no records to describe")
    kinds = {type(r).kind for r in records}
    if len(kinds) != 1:
        raise ValueError(f"records of several kinds {sorted(kinds)}")
    kind = kinds.pop()
    if tokenizer is None:
        from prefkit.data.byte_tokenizer import build_byte_tokenizer

        tokenizer, tokenizer_name = build_byte_tokenizer(), BYTE_TOKENIZER_NAME
    rows = [record_to_dict(r) for r in records]
    stats: dict[str, Any] = {"kind": kind, "rows": len(records)}
    stats["prompts"] = len({text_key(r.prompt) for r in records})
    n_chat = sum(1 for r in records if is_messages(r.prompt))
    stats["text_format"] = {"plain": len(records) - n_chat, "chat": n_chat}
    optional = ("user_id", "id", "weight", "margin", "chosen_score", "rejected_score", "ranking", "scores")
    stats["fields"] = {
        name: sum(1 for row in rows if name in row) for name in optional if any(name in row for row in rows)
    }
    users = {row["user_id"] for row in rows if "user_id" in row}
    if users:
        stats["users"] = len(users)
    numbers = {
        name: _summary([row[name] for row in rows if name in row])
        for name in _NUMBER_FIELDS
        if any(name in row for row in rows)
    }
    if numbers:
        stats["numbers"] = numbers

    if kind == "unpaired":
        positives = sum(1 for r in records if r.label)
        stats["labels"] = {"true": positives, "false": len(records) - positives}
    elif kind == "rated":
        attributes: dict[str, list[float]] = {}
        for r in records:
            for name, value in r.ratings.items():
                attributes.setdefault(name, []).append(value)
        stats["ratings"] = {name: _summary(values) for name, values in sorted(attributes.items())}
    elif kind in ("ranked", "stepwise"):
        stats["completions_per_row"] = _summary([len(r.completions) for r in records])
        if kind == "ranked":
            stats["ranked_by"] = {
                "ranking": sum(1 for r in records if r.ranking is not None),
                "scores": sum(1 for r in records if r.scores is not None),
            }
        else:
            labels = [float(x) for r in records for x in r.labels]
            stats["step_labels"] = {
                "n": len(labels),
                "mean": float(np.mean(labels)),
                "positive": sum(1 for x in labels if x > 0.5),
            }

    texts: dict[str, list[str]] = {"prompt": []}
    for r in records:
        texts["prompt"].append(_render_prompt(r.prompt, tokenizer))
        for name, completion in _completion_fields(r):
            texts.setdefault(name, []).append(_render_completion(r.prompt, completion, tokenizer))
    stats["tokenizer"] = tokenizer_name or getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__
    stats["tokens"] = {
        name: _length_summary(_token_lengths(values, tokenizer)) for name, values in texts.items() if values
    }
    return stats


def _fmt(value: float) -> str:
    return f"{value:.4g}" if isinstance(value, float) and not value.is_integer() else str(int(value))


def _spread(s: dict[str, float]) -> str:
    return f"mean {_fmt(s['mean'])}   min {_fmt(s['min'])}   max {_fmt(s['max'])}"


def format_stats(stats: dict[str, Any], file: str | None = None) -> str:
    """The stats dict as a short human-readable report."""
    lines = []
    if file:
        lines.append(f"file: {file}")
    fmt = stats["text_format"]
    lines.append(
        f"kind: {stats['kind']}   rows: {stats['rows']}   distinct prompts: {stats['prompts']}   "
        f"plain text: {fmt['plain']}   chat: {fmt['chat']}"
    )
    if "users" in stats:
        lines.append(f"users: {stats['users']} distinct ({stats['fields']['user_id']} rows with user_id)")
    if stats.get("fields"):
        lines.append(
            "optional fields (rows holding them): " + ", ".join(f"{k} {v}" for k, v in stats["fields"].items())
        )
    for name, s in stats.get("numbers", {}).items():
        lines.append(f"{name}: n {s['n']}   mean {_fmt(s['mean'])}   min {_fmt(s['min'])}   max {_fmt(s['max'])}")
    if "labels" in stats:
        lines.append(f"labels: {stats['labels']['true']} true, {stats['labels']['false']} false")
    for name, s in stats.get("ratings", {}).items():
        lines.append(f"rating {name}: n {s['n']}   {_spread(s)}")
    if "completions_per_row" in stats:
        lines.append(f"completions per row: {_spread(stats['completions_per_row'])}")
    if "ranked_by" in stats:
        by = stats["ranked_by"]
        lines.append(f"ordered by: ranking {by['ranking']} rows, scores {by['scores']} rows")
    if "step_labels" in stats:
        s = stats["step_labels"]
        lines.append(f"step labels: {s['n']}   mean {_fmt(s['mean'])}   positive (> 0.5) {s['positive']}")
    lines.append(f"token lengths ({stats['tokenizer']}):")
    header = f"  {'field':<12}{'n':>8}{'mean':>10}{'p50':>8}{'p90':>8}{'p99':>8}{'max':>8}"
    lines.append(header)
    for name, s in stats["tokens"].items():
        percentiles = f"{s['p50']:>8.0f}{s['p90']:>8.0f}{s['p99']:>8.0f}"
        lines.append(f"  {name:<12}{s['n']:>8}{s['mean']:>10.1f}{percentiles}{s['max']:>8}")
    return "\n".join(lines)


def configure(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``prefkit data stats``."""
    parser.add_argument("file", help="feedback file, datasets folder or Hub name")
    add_source_arguments(parser)
    parser.add_argument(
        "--tokenizer",
        default=None,
        metavar="PATH_OR_NAME",
        help="tokenizer for token lengths (AutoTokenizer.from_pretrained); default: prefkit's byte tokenizer",
    )
    parser.add_argument("--json", action="store_true", help="print the statistics as one JSON object")


def run(args: argparse.Namespace) -> int:
    """Load (and validate) the file, print its statistics; 1 on bad data."""
    try:
        column_map = column_map_from_args(args)
        labels = labels_from_args(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        records = load_records(
            args.file, kind=args.kind, column_map=column_map, split=args.split, layout=args.layout, labels=labels
        )
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if not records:
        print(f"error: {args.file}: no records", file=sys.stderr)
        return 1
    tokenizer, name = None, None
    if args.tokenizer:
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
        except (OSError, ValueError) as exc:
            print(f"error: cannot load tokenizer {args.tokenizer!r}: {exc}", file=sys.stderr)
            return 1
        name = args.tokenizer
    try:
        stats = compute_stats(records, tokenizer, name)
    except ValueError as exc:
        print(f"error: {args.file}: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({"file": args.file, **stats}, indent=1))
    else:
        print(format_stats(stats, args.file))
    return 0
