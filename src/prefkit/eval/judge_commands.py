"""``prefkit eval judge``: a causal LM as a pairwise judge on preference pairs (`prefkit.eval.judge`).

    prefkit eval judge --model tiny --data examples/data/pairs_tiny.jsonl --output runs/judge
    prefkit eval judge --model ../shared/data/tinyllamas/stories260K.bin --data pairs.jsonl [--template chat|FILE]
    prefkit eval judge --model M --data pairs.jsonl --verdict generate [--parser 'Winner: (A|B)'] --self M_NAME
    prefkit eval judge --model M --layout rewardbench2 --data rb2.jsonl     # best-of-N by round-robin win rates

Each pair is judged in both orders; the verdict is the log-probability of " A" minus " B" after the judge prompt
(no sampling), or with --verdict generate the label read from the judge's greedy text. Writes results.json
(accuracy, order-averaged and both-orders accuracy, position bias, consistency, verdict rate, per subset, section
scores, self-preference), scores.jsonl (the two verdicts of each pair, and the texts) and report.md to --output.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from prefkit.data.commands_validate import add_label_arguments
from prefkit.data.records import KINDS
from prefkit.eval.commands import eval_set_from_args, load_section_map
from prefkit.eval.metrics import TIE_POLICIES
from prefkit.eval.report import strict_json


def configure(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``prefkit eval judge``."""
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = __doc__.split("\n\n", 1)[1]
    parser.add_argument("--model", required=True, help="causal LM: folder, Hub id, llama2.c .bin, or tiny")
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder or Hub id (default: --model's)")
    parser.add_argument(
        "--template", default="plain", help="judge prompt: plain (base models), chat (chat template), or a YAML file"
    )
    parser.add_argument(
        "--verdict",
        choices=("logprob", "generate"),
        default="logprob",
        help="logprob: log p(label A) - log p(label B), no sampling (default); generate: greedy text, then a parser",
    )
    parser.add_argument("--max-new-tokens", type=int, default=32, help="--verdict generate: tokens to write (32)")
    parser.add_argument(
        "--parser",
        default=None,
        metavar="REGEX",
        help="--verdict generate: a regular expression whose first group is a label (default: [[A]], "
        "'The better answer is A', 'Verdict: A', a label first, ...)",
    )
    parser.add_argument(
        "--self",
        dest="self_name",
        default=None,
        metavar="NAME",
        help="the judge's own model name in the source columns: report its self-preference",
    )
    parser.add_argument(
        "--sources",
        default=None,
        metavar="FIRST,SECOND",
        help="columns naming the model of each response (default: chosen_model,rejected_model when present)",
    )
    parser.add_argument(
        "--tie-policy",
        choices=TIE_POLICIES,
        default=None,
        help="score tie rows on the order-averaged verdict (as prefkit eval rm) instead of leaving them out",
    )
    parser.add_argument(
        "--section-map", default=None, metavar="YAML|NAME", help="section scores over subsets (e.g. rewardbench)"
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
    from prefkit.eval.judge import load_template

    template = load_template(args.template)
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if args.verdict != "generate" and (args.parser is not None or args.max_new_tokens != 32):
        raise ValueError("--parser and --max-new-tokens read generated verdicts: add --verdict generate")
    if args.parser is not None:
        _check_parser(args.parser)
    sections = load_section_map(args.section_map) if args.section_map else None
    eval_set = eval_set_from_args(args)
    if eval_set.mode == "best_of_n":
        return _best_of_n(args, eval_set, template)
    if eval_set.mode != "pairs":
        raise ValueError(
            f"prefkit eval judge judges pairs and best-of-N lists (--layout rewardbench2); these records are a "
            f"{eval_set.mode.replace('_', '-')} evaluation"
        )
    if args.self_name is not None and eval_set.response_sources is None:
        raise ValueError(
            "--self: the rows do not say which model wrote each response (chosen_model / rejected_model columns, "
            "or name them with --sources FIRST,SECOND)"
        )
    model, tokenizer = _load(args)
    verdicts, texts = _verdicts(args, model, tokenizer, eval_set.records, template)
    results = judge_results(verdicts, eval_set, args.tie_policy, sections, args.self_name)
    results = {
        "model": args.model,
        "template": args.template,
        "labels": list(template.labels),
        "verdict": args.verdict,
        "sources": eval_set.sources,
        "n_records": len(eval_set),
        **results,
    }
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(strict_json(results, {}), indent=2) + "\n")
    with open(out / "scores.jsonl", "w", encoding="utf-8") as fh:
        for i, record in enumerate(eval_set.records):
            row = {"id": record.id, "subset": eval_set.subsets[i], "chosen_first": float(verdicts[i, 0])}
            row.update(chosen_second=float(verdicts[i, 1]), tie=bool(record.tie))
            if texts is not None:
                row.update(text_chosen_first=texts[i][0], text_chosen_second=texts[i][1])
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    (out / "report.md").write_text(_report(results))
    metrics = results["metrics"]
    for key in ("accuracy", "order_averaged_accuracy", "pair_accuracy", "position_bias", "consistency"):
        if key in metrics:
            print(f"{key.replace('_', ' ')}: {metrics[key]:.4f}")
    if args.verdict == "generate":
        print(f"verdict rate: {metrics.get('verdict_rate', float('nan')):.4f}")
    if "self_preference" in results:
        print(f"self-preference: {results['self_preference']['self_preference']:+.4f}")
    print(f"wrote {out / 'report.md'} (and results.json, scores.jsonl) in {out}")
    return 0


def _load(args: argparse.Namespace):
    import torch

    from prefkit.models.loading import load_policy, load_tokenizer

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = load_tokenizer(args.tokenizer or args.model)
    model = load_policy(args.model, dtype=args.dtype, vocab_size=len(tokenizer) if args.model == "tiny" else None)
    return model.to(device), tokenizer


def _best_of_n(args: argparse.Namespace, eval_set, template) -> int:
    """RewardBench 2 with a judge: every two completions of a prompt compared (log-prob verdicts, both orders), each
    completion scored by its mean win probability, then RewardBench 2's best-of-N credit and Ties rule."""
    pair_only = {"--verdict generate": args.verdict != "logprob", "--self": args.self_name is not None}
    pair_only.update({"--tie-policy": args.tie_policy is not None, "--section-map": args.section_map is not None})
    given = [name for name, on in pair_only.items() if on]
    if given:
        raise ValueError(f"{', '.join(given)}: for pairs; a best-of-N list is scored by log-prob win rates")
    from prefkit.eval.judge import LMJudge, win_rates
    from prefkit.eval.rm import best_of_n_results

    model, tokenizer = _load(args)
    options = {"batch_size": args.batch_size, "max_prompt_length": args.max_prompt_length}
    judge = LMJudge(model, tokenizer, template, **options, progress=not args.no_progress)
    scores = win_rates(judge, [r.prompt for r in eval_set.records], [r.completions for r in eval_set.records])
    metrics: dict = {}
    items = best_of_n_results(eval_set, scores, metrics)
    results = {
        "model": args.model,
        "template": args.template,
        "labels": list(template.labels),
        "mode": "best_of_n",
        "scores": "each completion's mean win probability against the others, sigmoid((v_1 - v_2) / 2)",
        "sources": eval_set.sources,
        "n_records": len(eval_set),
        "metrics": metrics,
    }
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(strict_json(results, {}), indent=2) + "\n")
    with open(out / "scores.jsonl", "w", encoding="utf-8") as fh:
        for item in items:
            fh.write(json.dumps(item) + "\n")
    lines = [
        f"# Judge evaluation (best-of-N): `{args.model}`",
        "",
        f"{len(eval_set)} lists; every two completions of a prompt judged in both orders, each completion scored by "
        "its mean win probability; RewardBench 2's best-of-N credit and Ties rule.",
        "",
        "| subset | n | score |",
        "|---|---|---|",
    ]
    lines += [f"| {name} | {v['n']} | {v['accuracy']:.4f} |" for name, v in metrics["subsets"].items()]
    lines += ["", f"Mean over subsets: {metrics['subset_mean']:.4f}"]
    if metrics["rewardbench2_missing"]:
        lines[-1] += f" (RewardBench 2 subsets missing: {', '.join(metrics['rewardbench2_missing'])})"
    (out / "report.md").write_text("\n".join(lines) + "\n")
    print(f"best-of-N: mean over subsets {metrics['subset_mean']:.4f}")
    print(f"wrote {out / 'report.md'} (and results.json, scores.jsonl) in {out}")
    return 0


def _check_parser(pattern: str) -> None:
    import re

    try:
        compiled = re.compile(pattern)
    except re.error as err:
        raise ValueError(f"--parser {pattern!r}: not a regular expression ({err})") from None
    if compiled.groups < 1:
        raise ValueError(f"--parser {pattern!r}: needs a group around the label, e.g. 'Winner: (A|B)'")


def _verdicts(args, model, tokenizer, records, template):
    from prefkit.eval.judge import generate_verdicts, judge_pairs

    common = {"batch_size": args.batch_size, "max_prompt_length": args.max_prompt_length}
    common["progress"] = not args.no_progress
    if args.verdict == "generate":
        extra = {"max_new_tokens": args.max_new_tokens, "pattern": args.parser}
        return generate_verdicts(model, tokenizer, records, template, **extra, **common)
    return judge_pairs(model, tokenizer, records, template, **common), None


def judge_results(verdicts, eval_set, tie_policy=None, sections=None, self_name=None) -> dict:
    """The metrics of `prefkit.eval.judge` overall and per subset; with ``tie_policy`` every row (ties included)
    also gets `pair_credit` on the order-averaged verdict, and with ``sections`` the section scores over it."""
    import numpy as np

    from prefkit.eval import metrics as M
    from prefkit.eval.judge import judge_metrics, self_preference

    ties = np.array([bool(r.tie) for r in eval_set.records])
    out: dict = {"ties": int(ties.sum()), "metrics": judge_metrics(verdicts, ties), "subsets": {}}
    for name in dict.fromkeys(eval_set.subsets):
        rows = [i for i, s in enumerate(eval_set.subsets) if s == name]
        out["subsets"][name] = judge_metrics(verdicts[rows], ties[rows])
    if tie_policy is not None or sections is not None:
        credit, threshold = M.pair_credit(verdicts[:, 0] - verdicts[:, 1], ties, tie_policy or "half")
        per_subset = M.per_subset_accuracy(credit, eval_set.subsets)
        out["credit"] = {"policy": tie_policy or "half", "accuracy": float(credit.mean()), "subsets": per_subset}
        if threshold is not None:
            out["credit"]["threshold"] = threshold
        if sections is not None:
            out["sections"] = M.section_scores(per_subset, *sections)
    if self_name is not None:
        found = self_preference(
            verdicts[~ties], [s for s, t in zip(eval_set.response_sources, ties) if not t], self_name
        )
        if found is None:
            raise ValueError(f"--self {self_name}: no pair has exactly one response by {self_name}")
        out["self_preference"] = found
    return out


def _report(r: dict) -> str:
    m = r["metrics"]
    lines = [
        f"# Judge evaluation: `{r['model']}`",
        "",
        f"{r['n_records']} pairs ({r['ties']} ties left out) from "
        + ", ".join(f"`{s['source']}`" for s in r["sources"])
        + f"; template `{r['template']}`, "
        + (
            f"verdict = log p({r['labels'][0]!r}) - log p({r['labels'][1]!r}) after the prompt"
            if r["verdict"] == "logprob"
            else "verdict = the label parsed from the judge's greedy text (none found: wrong)"
        )
        + ", each pair judged in both orders.",
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
        "verdict_rate": "verdict rate (verdicts naming a label)",
    }
    lines += [f"| {label} | {m[key]:.4f} |" for key, label in names.items() if key in m]
    if len(r["subsets"]) > 1:
        lines += ["", "| subset | n | accuracy | position bias | consistency |", "|---|---|---|---|---|"]
        for name, s in r["subsets"].items():
            if s.get("n"):
                lines.append(
                    f"| {name} | {s['n']} | {s['accuracy']:.4f} | {s['position_bias']:.4f} | {s['consistency']:.4f} |"
                )
    if "credit" in r:
        c = r["credit"]
        lines += [
            "",
            f"Order-averaged verdicts with tie rows scored by the `{c['policy']}` policy: {c['accuracy']:.4f}",
        ]
    if "sections" in r:
        weighting = r["sections"]["weighting"]
        lines += ["", "| section | accuracy | subsets weighted by |", "|---|---|---|"]
        lines += [f"| {n} | {v:.4f} | {weighting[n]} |" for n, v in r["sections"]["sections"].items()]
        if r["sections"]["score"] is not None:
            lines.append(f"| **score** | {r['sections']['score']:.4f} |")
    if "self_preference" in r:
        sp = r["self_preference"]
        lines += [
            "",
            f"Self-preference on {sp['n']} pairs with one response of its own: picks its own {sp['own_pick_rate']:.4f} "
            f"of the time, its own is the better one in {sp['own_chosen_rate']:.4f}: self-preference "
            f"{sp['self_preference']:+.4f}.",
        ]
    return "\n".join(lines) + "\n"
