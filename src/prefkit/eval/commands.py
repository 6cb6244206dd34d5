"""``prefkit eval rm``: evaluate a reward model (or a policy's implicit reward) on preference data.

    prefkit eval rm --model RM_DIR --data pairs.jsonl --output eval/
    prefkit eval rm --model RM_DIR --layout llmbar --data natural=Natural/dataset.json \\
        --data neighbor=Adversarial/Neighbor/dataset.json
    prefkit eval rm --model DPO_DIR --implicit --ref SFT_DIR --beta 0.1 --data pairs.jsonl --pref-prob 0.9

Writes results.json, scores.jsonl, PNG plots and report.md to ``--output`` (docs/evaluation.md).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import yaml

from prefkit.data.commands_validate import add_label_arguments, labels_from_args
from prefkit.data.loaders import parse_column_map
from prefkit.data.records import KINDS
from prefkit.eval.data import RM_LAYOUTS
from prefkit.eval.metrics import SECTION_MAPS, TIE_POLICIES

SECTION_AVERAGES = ("count", "mean")


def configure(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``prefkit eval rm``."""
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = __doc__.split("\n\n", 1)[1]
    model = parser.add_argument_group("model")
    model.add_argument("--model", required=True, help="reward model folder or Hub id ('tiny': a random tiny one)")
    model.add_argument(
        "--implicit",
        action="store_true",
        help="--model is a policy: score beta*log(pi/ref) (a user-conditioned policy: its users' tokens go first)",
    )
    model.add_argument("--ref", default=None, help="the reference model of --implicit (folder, Hub id or 'tiny')")
    model.add_argument("--beta", type=float, default=None, help="beta of the loss the policy was trained with")
    model.add_argument("--tokenizer", default=None, help="tokenizer folder or Hub id (default: --model's)")
    model.add_argument("--dtype", default="float32", help="float32, bfloat16, float16 or auto")
    model.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    model.add_argument("--trust-remote-code", action="store_true", help="allow custom model code from the Hub")
    data = parser.add_argument_group("data")
    data.add_argument(
        "--data",
        action="append",
        required=True,
        metavar="[NAME=]FILE",
        help="evaluation file; repeat for several. NAME is the subset of rows that have no 'subset' column",
    )
    data.add_argument(
        "--layout",
        choices=sorted(RM_LAYOUTS),
        default=None,
        help="public layout: hh (HH-RLHF dialogues), llmbar, hhh, rewardbench2 (best-of-N), rmbench (style grid)",
    )
    data.add_argument("--kind", choices=KINDS, default=None, help="record kind (default: detected from the columns)")
    data.add_argument("--map", nargs="+", action="extend", default=None, metavar="TARGET=SOURCE", help="rename columns")
    data.add_argument("--split", default=None, help="split of a dataset folder or Hub dataset")
    data.add_argument("--subset-column", default="subset", help="column naming each row's subset (default: subset)")
    add_label_arguments(data)
    metrics = parser.add_argument_group("metrics")
    metrics.add_argument(
        "--section-map",
        default=None,
        metavar="YAML|NAME",
        help="sections of subsets for a section score: a YAML file, or rewardbench (RewardBench's sections, each "
        "subset weighted by the benchmark's fixed example counts)",
    )
    metrics.add_argument(
        "--pref-prob",
        default=None,
        metavar="P|scores",
        help="true preference probability for the idealized ranking accuracy (--implicit): a number in [0, 1] "
        "or 'scores' for sigmoid(chosen_score - rejected_score) of each record",
    )
    metrics.add_argument("--bins", type=int, default=10, help="calibration bins (default 10)")
    metrics.add_argument(
        "--tie-policy",
        choices=TIE_POLICIES,
        default="half",
        help="how a tie row (labelled a tie, or the same response twice) counts: half (half credit, default), "
        "wrong (no credit), threshold (a predicted tie, |reward gap| <= t, is right; t chosen on the data)",
    )
    run_group = parser.add_argument_group("scoring")
    run_group.add_argument("--max-length", type=int, default=None, help="cut prompt + response to this many tokens")
    run_group.add_argument("--max-prompt-length", type=int, default=None, help="cut prompts to this many tokens")
    run_group.add_argument("--batch-size", type=int, default=8, help="responses per batch (default 8)")
    run_group.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--output", default="eval-rm", help="output folder (default: eval-rm)")
    from prefkit.eval import personalized  # --- personalized heads: prefkit.eval.personalized ---

    personalized.add_arguments(parser)


def parse_data_argument(value: str) -> tuple[str | None, str]:
    """``"name=path"`` -> ``(name, path)``; a bare path, or an existing file whose name holds '=',
    -> ``(None, path)``."""
    name, sep, path = value.partition("=")
    if not sep or os.path.exists(value) or not name or os.sep in name:
        return None, value
    if not path:
        raise ValueError(f"--data {value!r}: no file after '{name}='")
    return name, path


def eval_set_from_args(args: argparse.Namespace):
    """The `EvalSet` the data options of ``prefkit eval rm`` / ``judge`` name (--data, --layout, --kind, --map,
    --split, --subset-column and the label options)."""
    from prefkit.eval.data import load_eval_set

    return load_eval_set(
        [parse_data_argument(v) for v in args.data],
        labels=labels_from_args(args),
        kind=args.kind,
        layout=args.layout,
        column_map=parse_column_map(args.map) if args.map else None,
        split=args.split,
        subset_column=args.subset_column,
        source_columns=_source_columns(getattr(args, "sources", None)),
    )


def _source_columns(value: str | None) -> tuple[str, str] | None:
    if value is None:
        return None
    columns = tuple(c.strip() for c in value.split(","))
    if len(columns) != 2 or not all(columns) or columns[0] == columns[1]:
        raise ValueError(f"--sources {value}: expected two different column names, FIRST,SECOND")
    return columns


def load_section_map(path: str | Path) -> tuple[dict[str, dict[str, Any]], dict[str, float]]:
    """Read a section map YAML: ``{sections: {NAME: [subsets] | {subsets, average, weight}}, counts: {subset: n}}``,
    or a built-in one by name (``rewardbench``: RewardBench's sections and fixed per-subset counts)."""
    if str(path) in SECTION_MAPS:
        sections, counts = SECTION_MAPS[str(path)]
        return {k: dict(v) for k, v in sections.items()}, dict(counts)
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--section-map {path}: no such file (or a built-in map: {', '.join(SECTION_MAPS)})")
    doc = yaml.safe_load(path.read_text())
    if not isinstance(doc, dict) or not isinstance(doc.get("sections"), dict) or set(doc) - {"sections", "counts"}:
        raise ValueError(f"{path}: expected a mapping with 'sections' (and optionally 'counts'), got {doc!r}")
    sections = {}
    for name, spec in doc["sections"].items():
        spec = {"subsets": spec} if isinstance(spec, list) else spec
        ok = (
            isinstance(spec, dict)
            and not set(spec) - {"subsets", "average", "weight"}
            and isinstance(spec.get("subsets"), list)
            and spec.get("average", "count") in SECTION_AVERAGES
            and isinstance(spec.get("weight", 1), (int, float))
            and spec.get("weight", 1) >= 0
        )
        if not ok:
            raise ValueError(
                f"{path}: section {name!r}: expected a list of subsets or {{subsets: [...], average: count|mean, "
                f"weight: number >= 0}}, got {spec!r}"
            )
        sections[str(name)] = {**spec, "subsets": [str(s) for s in spec["subsets"]]}
    counts = doc.get("counts") or {}
    if not isinstance(counts, dict) or not all(isinstance(v, (int, float)) and v > 0 for v in counts.values()):
        raise ValueError(f"{path}: 'counts' must map subset names to positive numbers, got {counts!r}")
    return sections, {str(k): float(v) for k, v in counts.items()}


def _pref_prob(value: str | None) -> float | str | None:
    if value is None or value == "scores":
        return value
    try:
        p = float(value)
    except ValueError:
        p = -1.0
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"--pref-prob must be a number in [0, 1] or 'scores', got {value!r}")
    return p


def _load_model(args: argparse.Namespace, device: str):
    """``(model, tokenizer, prompt_prefix)``; ``prompt_prefix`` is set for a user-conditioned policy
    (`prefkit.train.user_conditioning`: its folder has ``users.json``) scored by its implicit reward."""
    from prefkit.models.loading import load_policy, load_reference, load_tokenizer

    tokenizer = load_tokenizer(args.tokenizer or args.model, trust_remote_code=args.trust_remote_code)
    prompt_prefix = None
    if args.implicit:
        if args.ref is None or args.beta is None:
            raise ValueError("--implicit needs --ref (the reference model) and --beta (the loss's beta)")
        from prefkit.eval.implicit import ImplicitReward

        kwargs = {"dtype": args.dtype, "trust_remote_code": args.trust_remote_code}
        policy, reference = load_policy(args.model, **kwargs), load_reference(args.ref, **kwargs)
        prompt_prefix = _user_prefix(args.model, tokenizer, reference)
        model = ImplicitReward(policy, reference, args.beta)
    else:
        if args.ref is not None or args.beta is not None:
            raise ValueError("--ref and --beta go with --implicit (scoring a policy by its implicit reward)")
        from prefkit.models.reward import load_reward_model

        model = load_reward_model(args.model, dtype=args.dtype, trust_remote_code=args.trust_remote_code)
    return model.to(device), tokenizer, prompt_prefix


def _user_prefix(folder: str, tokenizer, reference):
    """For a user-conditioned policy in ``folder``: each prompt gets its record's user tokens, and the
    reference gets the user rows at its neutral start (as in training); None for any other policy."""
    from prefkit.train.user_conditioning import USERS_FILE, init_reference_rows, load_user_tokens

    if not (Path(folder) / USERS_FILE).is_file():
        return None
    tokens = load_user_tokens(folder, tokenizer)
    init_reference_rows(reference, tokens)
    return lambda prompt_ids, user_id: tokens.prefix(prompt_ids, user_id, tokenizer.bos_token_id)


def training_data_warnings(model: str, data: list[str]) -> list[str]:
    """A warning for each ``data`` file that the model in folder ``model`` was trained on (its config.yaml's
    train_file): accuracy there is training accuracy, not held-out."""
    import yaml

    config = Path(model) / "config.yaml"
    if not config.is_file():
        return []
    try:
        saved = yaml.safe_load(config.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, OSError, UnicodeDecodeError):
        return []
    train_file = saved.get("train_file") if isinstance(saved, dict) else None
    if not isinstance(train_file, str) or not Path(train_file).exists():
        return []
    out = []
    for path in data:
        if Path(path).exists() and Path(path).resolve() == Path(train_file).resolve():
            held = saved.get("eval_fraction")
            note = f" (eval_fraction {held} of it was held out; the rest was trained on)" if held else ""
            out.append(
                f"{path} is the file {model} was trained on (train_file in {config}){note}: its accuracy here is "
                "training accuracy, not a held-out measure"
            )
    return out


def evaluate_from_args(args: argparse.Namespace) -> Path:
    """Load the data and the model named by ``args``, evaluate, write the report; returns report.md's path."""
    import torch

    from prefkit.eval.report import write_report
    from prefkit.eval.rm import EvalOptions, evaluate_reward_model

    sections, counts = load_section_map(args.section_map) if args.section_map else (None, None)
    options = EvalOptions(
        batch_size=args.batch_size,
        max_length=args.max_length,
        max_prompt_length=args.max_prompt_length,
        n_bins=args.bins,
        sections=sections,
        counts=counts,
        pref_prob=_pref_prob(args.pref_prob),
        progress=not args.no_progress,
        tie_policy=args.tie_policy,
    )
    eval_set = eval_set_from_args(args)
    for warning in training_data_warnings(args.model, [parse_data_argument(v)[1] for v in args.data]):
        print(f"warning: {warning}", file=sys.stderr)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer, options.prompt_prefix = _load_model(args, device)
    evaluation = evaluate_reward_model(model, tokenizer, eval_set, options)
    extra = {"model": args.model, "reference": args.ref, "tokenizer": args.tokenizer or args.model, "device": device}
    settings = {k: getattr(args, k) for k in ("layout", "max_length", "max_prompt_length", "batch_size", "bins")}
    return write_report(evaluation, args.output, **extra, settings=settings)


def run(args: argparse.Namespace) -> int:
    """Evaluate and print where the report is; 2 on bad input (message on stderr)."""
    from prefkit.train.settings import ConfigError, check_model_path

    try:  # a mistyped local folder is named at once, not after a minute of Hub retries
        for flag, value in (("--model", args.model), ("--ref", args.ref), ("--tokenizer", args.tokenizer)):
            check_model_path(flag, value)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from prefkit.eval import personalized  # --- personalized heads: prefkit.eval.personalized ---

    if personalized.is_personalized_model(args.model) or personalized.options_given(args):
        return personalized.run(args)
    try:
        report = evaluate_from_args(args)
    except (ValueError, OSError) as err:  # DataError, OverlongPromptError, ChatTemplateError are ValueErrors
        print(f"error: {err}", file=sys.stderr)
        return 2
    from prefkit.eval.report import headline

    results = json.loads((report.parent / "results.json").read_text())
    for name, value in headline(results):
        print(f"{name}: {value:.4f}" if isinstance(value, float) else f"{name}: {value}")
    print(f"wrote {report} (and results.json, scores.jsonl, plots) in {report.parent}")
    return 0
