"""``prefkit eval judge``: a causal LM as a pairwise judge on preference pairs (`prefkit.eval.judge`).

    prefkit eval judge --model tiny --data examples/data/pairs_tiny.jsonl --output runs/judge
    prefkit eval judge --model ../shared/data/tinyllamas/stories260K.bin --data pairs.jsonl [--template chat|FILE]

Each pair is judged in both orders; the verdict is the log-probability of " A" minus " B" after the judge prompt
(no sampling). Writes results.json (accuracy, order-averaged and both-orders accuracy, position bias, consistency,
per subset), scores.jsonl (the two verdicts of each pair) and report.md to --output.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from prefkit.data.commands_validate import add_label_arguments
from prefkit.data.records import KINDS
from prefkit.eval.commands import eval_set_from_args


def configure(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``prefkit eval judge``."""
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = __doc__.split("\n\n", 1)[1]
    parser.add_argument("--model", required=True, help="causal LM: folder, Hub id, llama2.c .bin, or tiny")
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder or Hub id (default: --model's)")
    parser.add_argument(
        "--template", default="plain", help="judge prompt: plain (base models), chat (chat template), or a YAML file"
    )
    parser.add_argument("--data", action="append", required=True, metavar="[NAME=]FILE", help="pairwise file(s)")
    parser.add_argument("--kind", choices=KINDS, default=None, help="record kind (default: detected)")
    parser.add_argument("--map", nargs="+", action="extend", default=None, metavar="TARGET=SOURCE")
    parser.add_argument("--layout", default=None, help="public layout of the file (hh, llmbar, hhh)")
    parser.add_argument("--split", default=None, help="split of a dataset folder or Hub dataset")
    parser.add_argument("--subset-column", default="subset", help="column naming each row's subset")
    add_label_arguments(parser)
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per batch (default 8)")
    parser.add_argument("--max-prompt-length", type=int, default=None, help="cut judge prompts to this many tokens")
    parser.add_argument("--dtype", default="float32", help="float32, bfloat16, float16 or auto")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--output", default="eval-judge", help="output folder (default: eval-judge)")


def run(args: argparse.Namespace) -> int:
    """Judge the pairs and write the report; 2 on bad input (one line on stderr)."""
    try:
        return _run(args)
    except (ValueError, OSError) as err:  # DataError is a ValueError
        print(f"error: {err}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    from prefkit.eval.judge import judge_metrics, judge_pairs, load_template

    template = load_template(args.template)
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")
    eval_set = eval_set_from_args(args)
    if eval_set.mode != "pairs":
        raise ValueError(f"prefkit eval judge judges pairs; these records are a {eval_set.mode} evaluation")
    import torch

    from prefkit.models.loading import load_policy, load_tokenizer

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = load_tokenizer(args.tokenizer or args.model)
    model = load_policy(args.model, dtype=args.dtype, vocab_size=len(tokenizer) if args.model == "tiny" else None)
    model.to(device)
    verdicts = judge_pairs(
        model,
        tokenizer,
        eval_set.records,
        template,
        batch_size=args.batch_size,
        max_prompt_length=args.max_prompt_length,
        progress=not args.no_progress,
    )
    ties = [bool(r.tie) for r in eval_set.records]
    metrics = judge_metrics(verdicts, ties)
    subsets = {}
    for name in dict.fromkeys(eval_set.subsets):
        rows = [i for i, s in enumerate(eval_set.subsets) if s == name]
        subsets[name] = judge_metrics(verdicts[rows], [ties[i] for i in rows])
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    results = {
        "model": args.model,
        "template": args.template,
        "labels": list(template.labels),
        "sources": eval_set.sources,
        "n_records": len(eval_set),
        "ties": sum(ties),
        "metrics": metrics,
        "subsets": subsets,
    }
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    with open(out / "scores.jsonl", "w", encoding="utf-8") as fh:
        for i, record in enumerate(eval_set.records):
            row = {"id": record.id, "subset": eval_set.subsets[i], "chosen_first": float(verdicts[i, 0])}
            row.update(chosen_second=float(verdicts[i, 1]), tie=ties[i])
            fh.write(json.dumps(row) + "\n")
    (out / "report.md").write_text(_report(results))
    for key in ("accuracy", "order_averaged_accuracy", "pair_accuracy", "position_bias", "consistency"):
        if key in metrics:
            print(f"{key.replace('_', ' ')}: {metrics[key]:.4f}")
    print(f"wrote {out / 'report.md'} (and results.json, scores.jsonl) in {out}")
    return 0


def _report(r: dict) -> str:
    m = r["metrics"]
    lines = [
        f"# Judge evaluation: `{r['model']}`",
        "",
        f"{r['n_records']} pairs ({r['ties']} ties left out) from "
        + ", ".join(f"`{s['source']}`" for s in r["sources"])
        + f"; template `{r['template']}`, verdict = log p({r['labels'][0]!r}) - log p({r['labels'][1]!r}) after "
        "the prompt, each pair judged in both orders.",
        "",
        "| metric | value |",
        "|---|---|",
    ]
    names = {
        "accuracy": "accuracy (of the 2N verdicts)",
        "order_averaged_accuracy": "order-averaged accuracy",
        "pair_accuracy": "right in both orders",
        "position_bias": "position bias (share picking A; 0.5 = none)",
        "consistency": "consistency (same pick in both orders)",
    }
    lines += [f"| {label} | {m[key]:.4f} |" for key, label in names.items() if key in m]
    if len(r["subsets"]) > 1:
        lines += ["", "| subset | n | accuracy | position bias | consistency |", "|---|---|---|---|---|"]
        for name, s in r["subsets"].items():
            if s.get("n"):
                lines.append(
                    f"| {name} | {s['n']} | {s['accuracy']:.4f} | {s['position_bias']:.4f} | {s['consistency']:.4f} |"
                )
    return "\n".join(lines) + "\n"
