"""A Bradley-Terry reward model trained and evaluated on real human preference data, on a CPU.

    python benchmarks/rm_real.py ../shared/data                          # stories260K backbone, full run
    python benchmarks/rm_real.py ../shared/data --backbone tiny          # tiny Llama from scratch
    python benchmarks/rm_real.py ../shared/data --quick                  # ~2-minute smoke run

What it does, with prefkit's own pieces only:

1. Splits ``DATA_DIR/hh-rlhf/harmless-base-test.jsonl.gz`` (2,312 human-labelled HH-RLHF harmlessness
   pairs; the prompt is the shared dialogue prefix) into a training part and a held-out part with a
   fixed seed (`prefkit.train.commands.split_holdout`), written as prefkit pairs files.
2. Backbone ``stories260K``: Karpathy's pretrained 260K-parameter TinyStories Llama
   (``DATA_DIR/tinyllamas``), converted to a Hugging Face folder by `prefkit.models.llama2c`; the
   reward model is a ``LlamaForSequenceClassification`` on it with a new score head. Backbone
   ``tiny``: prefkit's built-in tiny Llama with random weights and its byte tokenizer.
3. Trains with ``prefkit train`` on a generated config whose loss is ``bt``.
4. Evaluates with ``prefkit eval rm`` on the held-out HH part, on LLMBar Natural and on LLMBar
   Adversarial (Neighbor, GPTInst, GPTOut, Manual): accuracy, expected calibration error, length
   bias, and the "longer response wins" baseline on the same pairs.
5. Writes a dated section for this setup into ``--results`` (replacing the previous section for the
   same setup). ``--quick`` trains a few steps on a small sample and, unless ``--results`` is given,
   writes its section into the work folder instead of ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml
from _results_md import write_section
from transformers import set_seed

from prefkit.cli import main as prefkit_main
from prefkit.data.loaders import load_records, write_records
from prefkit.data.records import render_text
from prefkit.data.tokenize import TokenizationStats, tokenize_records
from prefkit.eval.commands import parse_data_argument
from prefkit.eval.data import load_eval_set
from prefkit.eval.metrics import pairwise_accuracy
from prefkit.models.llama2c import convert_llama2c
from prefkit.models.loading import load_tokenizer
from prefkit.train.commands import split_holdout

HH_FILE = Path("hh-rlhf/harmless-base-test.jsonl.gz")
LLMBAR = Path("llmbar/Dataset/LLMBar")
ADVERSARIAL = ("Neighbor", "GPTInst", "GPTOut", "Manual")
STORIES = Path("tinyllamas/stories260K.bin"), Path("tinyllamas/tok512.bin")
BACKBONES = ("stories260K", "tiny")


@dataclass(frozen=True)
class Plan:
    """Training sizes of one run (full or quick)."""

    max_steps: int
    batch_size: int
    learning_rate: float
    n_train: int | None  # None: every training pair
    n_heldout: int | None


FULL = Plan(max_steps=300, batch_size=16, learning_rate=1e-3, n_train=None, n_heldout=None)
QUICK = Plan(max_steps=8, batch_size=8, learning_rate=1e-3, n_train=64, n_heldout=48)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data_dir", type=Path, help="the shared data folder (holds hh-rlhf/, llmbar/, tinyllamas/)")
    parser.add_argument("--backbone", choices=BACKBONES, default="stories260K")
    parser.add_argument("--train-fraction", type=float, default=0.8, help="HH pairs to train on (rest held out)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (default: 300, quick: 8)")
    parser.add_argument("--batch-size", type=int, default=None, help="pairs per step (default: 16, quick: 8)")
    parser.add_argument("--learning-rate", type=float, default=None, help="default 1e-3")
    parser.add_argument("--max-length", type=int, default=384, help="prompt + response tokens (default 384)")
    parser.add_argument("--max-prompt-length", type=int, default=128, help="prompt tokens kept, from the end (128)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split, the head and the data order")
    parser.add_argument("--work-dir", type=Path, default=Path("runs/rm_real"))
    parser.add_argument("--results", type=Path, default=None, help="default benchmarks/RESULTS.md (quick: work dir)")
    parser.add_argument("--quick", action="store_true", help="a few steps on a small sample, to check the pipeline")
    args = parser.parse_args(argv)
    if not 0.0 < args.train_fraction < 1.0:
        parser.error(f"--train-fraction must be in (0, 1), got {args.train_fraction}")
    return args


def resolve_plan(args: argparse.Namespace) -> Plan:
    base = QUICK if args.quick else FULL
    return Plan(
        max_steps=args.steps or base.max_steps,
        batch_size=args.batch_size or base.batch_size,
        learning_rate=args.learning_rate or base.learning_rate,
        n_train=base.n_train,
        n_heldout=base.n_heldout,
    )


@dataclass(frozen=True)
class Split:
    """The HH pairs files written for one run, with their sizes."""

    train_file: Path
    heldout_file: Path
    n_records: int  # in the HH file
    n_train: int
    n_heldout: int


def split_hh(data_dir: Path, args: argparse.Namespace, plan: Plan, out: Path) -> Split:
    """Split the HH file with a fixed seed and write both parts (capped by ``plan``) as pairs files."""
    records = load_records(data_dir / HH_FILE)
    train, held_out = split_holdout(records, 1.0 - args.train_fraction, args.seed)
    train, held_out = train[: plan.n_train], held_out[: plan.n_heldout]
    out.mkdir(parents=True, exist_ok=True)
    return Split(
        write_records(train, out / "train.jsonl"),
        write_records(held_out, out / "heldout.jsonl"),
        len(records),
        len(train),
        len(held_out),
    )


def prepare_backbone(data_dir: Path, backbone: str, work: Path) -> str:
    """The ``model:`` of the training config: a converted stories260K folder, or ``tiny``."""
    if backbone == "tiny":
        return "tiny"
    checkpoint, tokenizer = (data_dir / p for p in STORIES)
    return str(convert_llama2c(checkpoint, tokenizer, work / "stories260K-hf"))


def truncation(train_file: Path, tokenizer_name: str, args: argparse.Namespace) -> TokenizationStats:
    """How the length limits cut the training pairs (tokenized as training tokenizes them)."""
    tokenizer = load_tokenizer(tokenizer_name)
    _, stats = tokenize_records(
        load_records(train_file),
        tokenizer,
        max_length=args.max_length,
        max_prompt_length=args.max_prompt_length,
        progress=False,
    )
    return stats


def write_config(path: Path, model: str, train_file: Path, plan: Plan, args: argparse.Namespace, out: Path) -> Path:
    config = {
        "model": model,
        "train_file": str(train_file),
        "loss": "bt",
        "max_length": args.max_length,
        "max_prompt_length": args.max_prompt_length,
        "output_dir": str(out),
        "overwrite_output_dir": True,
        "max_steps": plan.max_steps,
        "per_device_train_batch_size": plan.batch_size,
        "learning_rate": plan.learning_rate,
        "lr_scheduler_type": "cosine",
        "warmup_steps": max(1, plan.max_steps // 20),
        "weight_decay": 0.0,
        "logging_steps": max(1, plan.max_steps // 10),
        "save_strategy": "no",
        "seed": args.seed,
        "data_seed": args.seed,
        "use_cpu": True,
        "dataloader_pin_memory": False,
        "report_to": "none",
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def run_cli(argv: list[str]) -> None:
    print("$ prefkit " + shlex.join(argv), flush=True)
    code = prefkit_main(argv)
    if code != 0:
        raise SystemExit(f"prefkit {argv[0]} {argv[1]} failed with exit code {code}")


def eval_sets(data_dir: Path, heldout_file: Path) -> dict[str, tuple[str, list[str], str | None]]:
    """Name -> (output folder, ``--data`` values, ``--layout``) of each ``prefkit eval rm`` run."""
    llmbar = data_dir / LLMBAR
    adversarial = [f"{name}={llmbar / 'Adversarial' / name / 'dataset.json'}" for name in ADVERSARIAL]
    return {
        "HH harmless (held out)": ("eval-hh", [f"hh-harmless={heldout_file}"], None),
        "LLMBar Natural": ("eval-llmbar-natural", [f"Natural={llmbar / 'Natural' / 'dataset.json'}"], "llmbar"),
        "LLMBar Adversarial": ("eval-llmbar-adversarial", adversarial, "llmbar"),
    }


def longer_wins(data: list[str], layout: str | None) -> float:
    """Accuracy of "the longer response wins" on the full, untruncated texts (characters; ties wrong)."""
    records = load_eval_set([parse_data_argument(item) for item in data], layout=layout).records
    chosen = [len(render_text(r.chosen)) for r in records]
    rejected = [len(render_text(r.rejected)) for r in records]
    return pairwise_accuracy(chosen, rejected)


def evaluate(model_dir: Path, name: str, data: list[str], layout: str | None, args, out: Path) -> dict:
    """``prefkit eval rm`` on ``data``; returns its results.json plus ``longer_wins`` (full texts)."""
    argv = ["eval", "rm", "--model", str(model_dir), "--output", str(out / name), "--no-progress"]
    argv += ["--max-length", str(args.max_length), "--max-prompt-length", str(args.max_prompt_length)]
    argv += ["--batch-size", "16"]
    if layout:
        argv += ["--layout", layout]
    for item in data:
        argv += ["--data", item]
    run_cli(argv)
    results = json.loads((out / name / "results.json").read_text())
    return {**results, "longer_wins": longer_wins(data, layout)}


def _f(value, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def results_rows(evals: dict[str, dict]) -> list[str]:
    rows = [
        "| eval set | pairs | accuracy | longer wins (baseline) | ECE | Pearson r(reward, length) "
        "| acc. when chosen shorter / longer | rows cut |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, res in evals.items():
        m = res["metrics"]
        lb = m["length_bias"]
        cut = res["n_truncated"] / (2 * res["n_records"])
        rows.append(
            f"| {name} | {res['n_records']} | {_f(m['accuracy'])} | {_f(res['longer_wins'])} "
            f"| {_f(m['calibration']['ece'])} | {_f(lb['pearson'])} "
            f"| {_f(lb['accuracy_chosen_shorter'])} / {_f(lb['accuracy_chosen_longer'])} | {cut:.0%} |"
        )
    adversarial = evals.get("LLMBar Adversarial")
    if adversarial:
        subsets = adversarial["metrics"]["subsets"]
        parts = [f"{k} {_f(v['accuracy'])} (n={v['n']})" for k, v in subsets.items()]
        rows += ["", "LLMBar Adversarial per subset: " + ", ".join(parts) + "."]
    return rows


def section_text(key: str, setup: list[str], evals: dict[str, dict]) -> str:
    lines = [f"<!-- rm_real:{key} -->", f"## Reward model on real data: {key}", ""]
    lines += setup + [""] + results_rows(evals)
    lines += [
        "",
        "Accuracy counts ties as wrong; ECE is over both orders of each pair (10 bins); lengths are response "
        'tokens as scored (after the length limits); "longer wins" prefers the response with more characters in '
        "the full text (ties wrong); "
        '"rows cut": scored (prompt, response) rows whose prompt or response was cut to the length limits.',
        f"<!-- /rm_real:{key} -->",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    plan = resolve_plan(args)
    key = args.backbone + (" (quick)" if args.quick else "")
    work = args.work_dir / (args.backbone + ("-quick" if args.quick else ""))
    results_path = args.results or (work / "RESULTS.md" if args.quick else Path("benchmarks/RESULTS.md"))
    start = time.monotonic()

    split = split_hh(args.data_dir, args, plan, work / "data")
    model = prepare_backbone(args.data_dir, args.backbone, work)
    cut = truncation(split.train_file, model, args)
    config = write_config(work / "config.yaml", model, split.train_file, plan, args, work / "rm")
    t0 = time.monotonic()
    set_seed(args.seed)  # the new score head is initialised when `prefkit train` builds the model
    run_cli(["train", str(config)])
    train_seconds = time.monotonic() - t0

    evals = {
        name: evaluate(work / "rm", folder, data, layout, args, work)
        for name, (folder, data, layout) in eval_sets(args.data_dir, split.heldout_file).items()
    }
    total = time.monotonic() - start
    backbone = (
        "stories260K (pretrained llama2.c TinyStories model, 260K parameters, 512-token vocabulary) + new score head"
        if args.backbone == "stories260K"
        else "prefkit's tiny Llama (random init, hidden 64, 2 layers, byte tokenizer)"
    )
    command = "python benchmarks/rm_real.py " + shlex.join([str(a) for a in (argv or sys.argv[1:])])
    setup = [
        f"Run {dt.date.today().isoformat()}: `{command}` ({total / 60:.1f} min on this machine, "
        f"training {train_seconds / 60:.1f} min).",
        "",
        f"- backbone: {backbone}",
        f"- training: `bt` loss on {split.n_train:,} HH-RLHF harmless-base pairs (the training part, "
        f"{args.train_fraction:.0%} of the file's {split.n_records:,} pairs, split with seed {args.seed}"
        + (", sampled down for --quick" if args.quick else "")
        + f"); {plan.max_steps} steps of {plan.batch_size} pairs, learning rate "
        f"{plan.learning_rate:g} (cosine); max length {args.max_length} tokens, prompts cut to their last "
        f"{args.max_prompt_length}: {cut.n_prompt_truncated / cut.n_records:.0%} of the training pairs had their "
        f"prompt cut, {cut.n_completion_truncated / cut.n_records:.0%} a response cut",
        f"- held out: {split.n_heldout} HH pairs from the same file; LLMBar (Natural 100, Adversarial 319) is out of "
        "distribution (instruction following, not harmlessness)",
    ]
    write_section(results_path, f"rm_real:{key}", section_text(key, setup, evals))
    print(f"wrote the '{key}' section of {results_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
