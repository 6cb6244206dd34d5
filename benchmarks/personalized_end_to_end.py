"""Personalized reward heads on frozen embeddings vs trained end to end with their backbone, in the lab.

    python benchmarks/personalized_end_to_end.py            # about 6 minutes on 2 cores
    python benchmarks/personalized_end_to_end.py --quick    # smoke run, about 20 seconds

1. The feedback of the pluralism study's ``groups`` section (`prefkit.lab.pluralism`, docs/lab.md): the lab
   world ``groups`` with its user groups reweighted to 80/20 (``--shares``), ``--users`` users (a quarter
   of each group unseen), each labelling ``--train-pairs + --test-pairs`` pairs with its group's true reward
   (Bradley-Terry annotators, ``--temperature``). Written to ``WORK/data/``: ``train.jsonl`` (the seen users'
   first ``--train-pairs`` pairs), ``eval.jsonl`` (the seen users' last ``--test-pairs`` and every pair of the
   unseen users) and ``groups.json`` (user -> group), as the study splits them.
2. For each method (pooled BT = mixture of BT with one component, mixture of BT with two, PAL's mixture
   variant, VPL, MiCRo) and each mode it runs what ``prefkit train`` runs for a ``personalized:`` config
   (`prefkit.eval.personalized.train_and_evaluate`; the resolved configs are kept in
   ``WORK/METHOD/MODE/personalized.yaml``): ``frozen`` fits the head on frozen embeddings of the world's
   reference policy (``model: lab:groups:SEED``), ``end_to_end`` trains the same backbone with the head
   (``end_to_end: true``). Both modes use the same backbone, ``--pooling`` and ``--backbone-layers``
   (default: all of the reference's transformer layers, mean pooling, so end to end has layers to train).
3. Reports per method and mode the seen users' held-out accuracy against each group's *true* preference
   (majority, minority, the worst group; true ties left out), on the contested pairs (where the groups'
   true preferences disagree), against the annotators' labels, the unseen users' worst group at k = 0 and
   k = 8 of their pairs (against the labels; from the run's own evaluation) and the wall time.

Writes ``results.md`` and ``results.json`` to ``--results`` (default
benchmarks/results/personalized_end_to_end); data, runs and the embedding cache go to ``--work-dir``
(default runs/personalized_end_to_end).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers

from prefkit.data.loaders import write_records
from prefkit.eval.personalized import PersonalizedModel, train_and_evaluate
from prefkit.lab import pluralism
from prefkit.lab.world import World, make_world
from prefkit.models.embeddings import embed_pairs
from prefkit.train.personalized import load_backbone, parse_personalized_config

ROOT = Path(__file__).resolve().parent
MODES = ("frozen", "end_to_end")
# The heads' settings on frozen embeddings: the pluralism study's (`prefkit.lab.pluralism`), as config keys.
METHODS: dict[str, dict[str, Any]] = {
    "pooled BT": {"method": "mixture_bt", "k": 1, "iters": 30, "m_steps": 20, "l2": 1.0e-3},
    "MixtureBT": {"method": "mixture_bt", "k": 2, "iters": 30, "m_steps": 20, "l2": 1.0e-3},
    "PAL": {"method": "pal", "k": 2, "variant": "mixture", "epochs": 150, "lr": 0.03, "batch_size": 256},
    "VPL": {
        "method": "vpl",
        "latent_dim": 4,
        "hidden": 64,
        "context_size": 8,
        "target_size": 16,
        "steps": 600,
        "beta_kl": 0.01,
        "users_per_step": 32,
        "lr": 3.0e-3,
        "log_every": 100,
    },
    "MiCRo": {
        "method": "micro",
        "k": 2,
        "mixture": "learned",
        "steps": 400,
        "lr": 0.03,
        "router_steps": 100,
        "router_lr": 0.03,
        "log_every": 100,
    },
}
SHOTS = [1, 2, 4, 8]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--seeds", default="0,1", help="seeds (each: the world, its reference policy, data and fits); tables: the mean"
    )
    parser.add_argument("--shares", default="0.8,0.2", help="group shares, in the order of the world's groups")
    parser.add_argument("--users", type=int, default=50, help="users in all (a quarter of each group unseen)")
    parser.add_argument("--train-pairs", type=int, default=100, help="training pairs per seen user")
    parser.add_argument("--test-pairs", type=int, default=50, help="held-out pairs per seen user")
    parser.add_argument("--temperature", type=float, default=0.5, help="Bradley-Terry annotators' temperature")
    parser.add_argument("--pooling", default="mean", choices=("last", "mean", "sum"))
    parser.add_argument("--backbone-layers", default="all", help="transformer layers kept: a number or 'all'")
    parser.add_argument("--epochs", type=float, default=4.0, help="end to end: passes over the training pairs")
    parser.add_argument("--batch-size", type=int, default=32, help="end to end: pairs per step")
    parser.add_argument("--head-lr", type=float, default=1e-2, help="end to end: the head's learning rate")
    parser.add_argument("--backbone-lr", type=float, default=3e-4, help="end to end: the backbone's learning rate")
    parser.add_argument(
        "--warm-start", action="store_true", help="end to end: fit each head on frozen embeddings first"
    )
    parser.add_argument(
        "--pairs-per-user",
        type=int,
        default=0,
        help="end to end, mixture_bt: batches of chunks of this many pairs of one user (--batch-size pairs in all)",
    )
    parser.add_argument("--vpl-episodes", type=int, default=8, help="end to end: VPL episodes (users) per step")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of: " + ", ".join(METHODS))
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of: " + ", ".join(MODES))
    parser.add_argument("--quick", action="store_true", help="smoke run: seed 0, 20 users, 40 + 20 pairs, one epoch")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--work-dir", default="runs/personalized_end_to_end")
    parser.add_argument("--results", default=str(ROOT / "results" / "personalized_end_to_end"))
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.users, args.train_pairs, args.test_pairs, args.epochs = "0", 20, 40, 20, 1.0
    args.seeds = [int(s) for s in args.seeds.split(",")]
    args.shares = [float(s) for s in args.shares.split(",")]
    args.layers = None if args.backbone_layers == "all" else int(args.backbone_layers)
    for option in ("methods", "modes"):
        chosen = [m.strip() for m in getattr(args, option).split(",") if m.strip()]
        valid = METHODS if option == "methods" else MODES
        unknown = [m for m in chosen if m not in valid]
        if unknown or not chosen:
            parser.error(f"--{option}: unknown or none {unknown or chosen}; choose from {', '.join(valid)}")
        setattr(args, option, chosen)
    return args


# ------------------------------------------------------------------------------------------
# Data: the pluralism study's groups feedback, as files prefkit train reads
# ------------------------------------------------------------------------------------------


@dataclass
class Feedback:
    """The written files, the world, and per held-out pair: its group index and each group's true logit."""

    seed: int
    world: World
    groups: list[str]
    train_file: Path
    eval_file: Path
    groups_file: Path
    train_pairs: int
    eval_records: list
    eval_group: torch.Tensor
    eval_truth: torch.Tensor
    seen_users: list[str]
    unseen_users: list[str]


def data_tag(args, seed: int) -> str:
    """A folder name for the data settings (the embedding cache beside the files is keyed by their path)."""
    shares = "-".join(f"{s:g}" for s in args.shares)
    return (
        f"seed{seed}_shares{shares}_users{args.users}_pairs{args.train_pairs}+{args.test_pairs}_t{args.temperature:g}"
    )


def build_feedback(args, seed: int, folder: Path) -> Feedback:
    world = pluralism.with_shares(make_world("groups", seed), args.shares)
    counts = pluralism.users_per_group(world, args.users, unseen_fraction=0.25)
    records, who = pluralism._draw_users(world, counts, args.train_pairs + args.test_pairs, args.temperature, seed)
    position: dict[str, int] = {}
    train, held = [], []
    for r in records:
        i = position[r.user_id] = position.get(r.user_id, -1) + 1
        seen = who[r.user_id][1]
        (train if seen and i < args.train_pairs else held).append(r)
    groups = [g.name for g in world.groups]
    group_of = {user: group for user, (group, _) in who.items()}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "groups.json").write_text(json.dumps(group_of, indent=1) + "\n")
    return Feedback(
        seed=seed,
        world=world,
        groups=groups,
        train_file=write_records(train, folder / "train.jsonl"),
        eval_file=write_records(held, folder / "eval.jsonl"),
        groups_file=folder / "groups.json",
        train_pairs=len(train),
        eval_records=held,
        eval_group=torch.tensor([groups.index(group_of[r.user_id]) for r in held]),
        eval_truth=pluralism._truth(world, held, groups),
        seen_users=sorted(u for u, (_, s) in who.items() if s),
        unseen_users=sorted(u for u, (_, s) in who.items() if not s),
    )


# ------------------------------------------------------------------------------------------
# Configs
# ------------------------------------------------------------------------------------------


def end_to_end_keys(method: str, args, steps: int) -> dict[str, Any]:
    """The ``personalized:`` keys that switch a method's section to end-to-end training, each setting under
    the method's own key where it has one (`prefkit.train.personalized.END_TO_END_ALIASES`). VPL and MiCRo
    count optimizer ``steps`` (``--epochs`` worth of ``--batch-size`` batches; VPL: ``--vpl-episodes`` users
    per step), the others epochs."""
    keys: dict[str, Any] = {"end_to_end": True, "backbone_lr": args.backbone_lr, "lr": args.head_lr}
    if args.warm_start:
        keys["warm_start"] = True
    if method == "vpl":
        return {**keys, "steps": steps, "users_per_step": args.vpl_episodes, "log_every": 50}
    if method == "micro":
        return {**keys, "steps": steps, "batch_size": args.batch_size, "log_every": 50}
    if method == "mixture_bt" and args.pairs_per_user:  # batches of whole chunks of users' pairs
        chunks = max(1, args.batch_size // args.pairs_per_user)
        return {**keys, "epochs": args.epochs, "batch_size": chunks, "pairs_per_user": args.pairs_per_user}
    return {**keys, "epochs": args.epochs, "batch_size": args.batch_size, "logging_steps": 50}


def run_mapping(name: str, mode: str, args, feedback: Feedback, work: Path) -> dict[str, Any]:
    """The config mapping of one run: the same backbone, pooling, data and seed in both modes."""
    section = dict(METHODS[name])
    if mode == "end_to_end":
        steps = max(1, round(args.epochs * feedback.train_pairs / args.batch_size))
        section.update(end_to_end_keys(section["method"], args, steps))
    return {
        "personalized": section,
        "model": f"lab:groups:{feedback.seed}",
        "pooling": args.pooling,
        "backbone_layers": args.layers,
        "embed_batch_size": 256,
        "embedding_cache_dir": str(feedback.train_file.parent / "embeddings"),
        "train_file": str(feedback.train_file),
        "eval_file": str(feedback.eval_file),
        "eval_fraction": 0.0,
        "groups": str(feedback.groups_file),
        "shots": SHOTS,
        "shot_draws": 1,
        "seed": feedback.seed,
        "progress": False,
        "overwrite_output_dir": True,
        "output_dir": str(work / f"seed_{feedback.seed}" / name.replace(" ", "_") / mode),
    }


# ------------------------------------------------------------------------------------------
# One run and its scores
# ------------------------------------------------------------------------------------------


def true_preference_scores(correct: torch.Tensor, group: torch.Tensor, truth: torch.Tensor, groups: list[str]):
    """`pluralism._scores` of per-pair correctness (right against the label: logit +1, wrong: -1)."""
    return pluralism._scores(correct.double() * 2 - 1, group, truth, groups)


def seen_correct(run_dir: Path, feedback: Feedback) -> tuple[torch.Tensor, torch.Tensor]:
    """``(correct, rows)``: the run's head on the held-out pairs of seen users, embedded by the run's backbone
    (end to end: the trained one it saved)."""
    model = PersonalizedModel.load(run_dir)
    backbone, tokenizer = load_backbone(model.config)
    rows = torch.tensor([r.user_id in set(model.users) for r in feedback.eval_records])
    records = [r for r, keep in zip(feedback.eval_records, rows.tolist()) if keep]
    pairs = embed_pairs(records, backbone, tokenizer, pooling=model.config.pooling, batch_size=256, progress=False)
    return model.seen_correct(pairs), rows


def run_one(name: str, mode: str, args, feedback: Feedback, work: Path, log) -> dict[str, Any]:
    mapping = run_mapping(name, mode, args, feedback, work)
    config = parse_personalized_config(mapping, source=f"{name} {mode} seed {feedback.seed}")
    start = time.perf_counter()
    run = train_and_evaluate(config, say=log)
    seconds = time.perf_counter() - start
    correct, rows = seen_correct(run.output_dir, feedback)
    scores = true_preference_scores(correct, feedback.eval_group[rows], feedback.eval_truth[rows], feedback.groups)
    by_k = run.evaluation["unseen"]["by_k"]

    def last(key: str):
        return next((row[key] for row in reversed(run.history) if key in row), None)

    return {
        **scores,
        "labels": run.evaluation["seen"]["accuracy"],
        "labels_per_group": {g: v["accuracy"] for g, v in run.evaluation["seen"]["per_group"].items()},
        "unseen_worst": {k: by_k[k]["worst_group"]["accuracy"] for k in ("0", str(SHOTS[-1]))},
        "train_accuracy": last("train_accuracy"),
        "active_units": last("active_units"),
        "seconds": seconds,
    }


# ------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------


def mean_over_seeds(trees: list) -> Any:
    """Equal-shaped result trees (one per seed) -> one tree: numbers averaged (NaN where any seed has NaN,
    None where any has None), strings kept where all seeds agree, else joined by ``/``."""
    first = trees[0]
    if isinstance(first, dict):
        return {key: mean_over_seeds([t[key] for t in trees]) for key in first}
    if any(t is None for t in trees):
        return None
    if isinstance(first, str):
        return "/".join(dict.fromkeys(trees))
    return sum(trees) / len(trees)


def _fmt(x: float | None) -> str:
    return "-" if x is None or x != x else f"{x:.3f}"


def comparison_table(results: dict[str, dict[str, dict]], groups: list[str], modes: list[str]) -> list[str]:
    """One row per method; each cell gives the ``modes`` side by side (``frozen / end to end``)."""
    majority, minority = groups
    k = str(SHOTS[-1])
    measures = {
        majority: lambda s: _fmt(s["per_group"][majority]["true"]),
        minority: lambda s: _fmt(s["per_group"][minority]["true"]),
        f"{majority}, contested": lambda s: _fmt(s["per_group"][majority]["contested"]),
        f"{minority}, contested": lambda s: _fmt(s["per_group"][minority]["contested"]),
        "worst group": lambda s: _fmt(s["worst"]),
        "labels": lambda s: _fmt(s["labels"]),
        f"unseen worst, k = 0 → {k}": lambda s: f"{_fmt(s['unseen_worst']['0'])} → {_fmt(s['unseen_worst'][k])}",
        "seconds": lambda s: f"{s['seconds']:.0f}",
    }
    lines = ["| method | " + " | ".join(measures) + " |", "|---" * (len(measures) + 1) + "|"]
    for name, by_mode in results.items():
        cells = [" / ".join(get(by_mode[m]) if m in by_mode else "-" for m in modes) for get in measures.values()]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def report(args, command: str, feedback: Feedback, results: dict, seconds: float) -> str:
    users = {g: sum(u.startswith(f"{g}/") for u in feedback.seen_users) for g in feedback.groups}
    unseen = {g: sum(u.startswith(f"{g}/") for u in feedback.unseen_users) for g in feedback.groups}
    held = {g: int((feedback.eval_group == i).sum()) for i, g in enumerate(feedback.groups)}
    e2e = (
        f"end to end: {args.epochs:g} epoch(s) of batches of {args.batch_size} pairs (VPL and MiCRo: as many optimizer "
        f"steps; VPL {args.vpl_episodes} user episodes per step), head lr {args.head_lr:g}, backbone lr "
        f"{args.backbone_lr:g}, constant schedule, AdamW"
    )
    layers = "all" if args.layers is None else args.layers
    md = [
        "# Personalized heads: frozen embeddings vs end to end with the backbone (lab world `groups`)",
        "",
        f"Command: `{command}`",
        "",
        f"Data: the pluralism study's groups feedback (`prefkit.lab.pluralism`), world `groups` at "
        f"{'/'.join(f'{s:.0%}' for s in args.shares)}, per seed: seen users "
        + ", ".join(f"{g} {n}" for g, n in users.items())
        + "; unseen users "
        + ", ".join(f"{g} {n}" for g, n in unseen.items())
        + f"; {args.train_pairs} training and {args.test_pairs} held-out pairs per seen user (Bradley-Terry labels "
        f"of the group's true reward, temperature {args.temperature:g}); "
        + ", ".join(f"{g} {n}" for g, n in held.items())
        + " held-out pairs of seen and unseen users. Backbone: the world's reference policy "
        f"(`lab:groups:SEED`), {layers} transformer layers, {args.pooling} pooling, the same in both modes. "
        f"Frozen: the pluralism study's head settings (MiCRo's router also reads the seen user's id, `prefkit "
        f"train`'s default); {e2e}. Method settings: "
        + "; ".join(f"{name} `{json.dumps(section)}`" for name, section in METHODS.items() if name in results)
        + ".",
        "",
        f"Each cell: **frozen / end to end**, the mean over seeds {', '.join(map(str, args.seeds))} (each seed: its "
        "own world, reference policy, users, pairs and fits). Seen users' held-out pairs, accuracy against each "
        "group's true preference (true ties left out); contested: the pairs where the groups' true preferences "
        "disagree; labels: against the annotators' labels (all groups); unseen users: worst group against the "
        f"labels with k = 0 and k = {SHOTS[-1]} of their pairs; seconds: training and the run's evaluation.",
        "",
        *comparison_table(results, feedback.groups, args.modes),
        "",
        "Final training accuracy (train pairs) per run: "
        + "; ".join(
            f"{name} " + " / ".join(_fmt(by_mode[m]["train_accuracy"]) for m in args.modes if m in by_mode)
            for name, by_mode in results.items()
        )
        + ".",
    ]
    if "VPL" in results:
        units = " / ".join(str(results["VPL"][m]["active_units"]) for m in args.modes if m in results["VPL"])
        md[-1] += f" VPL active latent units (of {METHODS['VPL']['latent_dim']}): {units}."
    return "\n".join([*md, "", f"Total time {seconds:.0f} s.", ""])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    log_file = open(work / "log.txt", "w")

    def log(line: str) -> None:
        log_file.write(line + "\n")
        log_file.flush()

    start = time.perf_counter()
    command = shlex.join(["python", "benchmarks/personalized_end_to_end.py", *(sys.argv[1:] if argv is None else argv)])
    per_seed: dict[int, dict[str, dict[str, Any]]] = {}
    for seed in args.seeds:
        feedback = build_feedback(args, seed, work / "data" / data_tag(args, seed))
        print(f"seed {seed}: {feedback.train_pairs} training, {len(feedback.eval_records)} held-out pairs")
        for name in args.methods:
            for mode in args.modes:
                log(f"== seed {seed}: {name} {mode}")
                row = run_one(name, mode, args, feedback, work, log)
                per_seed.setdefault(seed, {}).setdefault(name, {})[mode] = row
                per_group = ", ".join(f"{g} {v['true']:.3f}" for g, v in row["per_group"].items())
                print(
                    f"{name:>10} {mode:<10}: {per_group}; worst {row['worst']:.3f} ({row['seconds']:.0f} s)", flush=True
                )
    results = mean_over_seeds(list(per_seed.values()))
    seconds = time.perf_counter() - start
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    text = report(args, command, feedback, results, seconds)
    (out / "results.md").write_text(text)
    payload = {"command": command, "args": vars(args), "seconds": seconds, "mean": results, "per_seed": per_seed}
    (out / "results.json").write_text(json.dumps(payload, indent=1) + "\n")
    print("\n" + "\n".join(comparison_table(results, feedback.groups, args.modes)) + "\n")
    print(f"wrote {out / 'results.md'} and {out / 'results.json'}; runs and log in {work} ({seconds:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
