"""Pooled vs personalised reward models on real HH-RLHF pairs split between two user groups (docs/recipes.md).

    python benchmarks/personalized_hh.py ../shared/data/hh-rlhf/harmless-base-test.jsonl.gz

1. `prefkit.data.recipes.hh_two_groups` turns the HH-RLHF pairs into a personalised set: users of group
   ``harmless`` keep the human label, users of group ``longer`` prefer the longer response (ties dropped),
   ``--users-per-group`` users each, pairs split between the groups by ``--shares`` (each value of the
   repeatable option is one setting; default 0.5,0.5 and 0.8,0.2).
2. For each setting it runs what ``prefkit train`` runs for a ``personalized:`` config
   (`prefkit.eval.personalized.train_and_evaluate`; the resolved configs are kept in the work folder,
   ``prefkit train WORK/SETTING/METHOD/personalized.yaml`` re-runs one): pooled Bradley-Terry (a mixture of
   BT with one component, i.e. one linear head for everybody), mixture of BT by EM, PAL, VPL and MiCRo, all
   on frozen embeddings of Karpathy's pretrained stories260K (``--backbone``, a llama2.c file), 20 % of each
   seen user's pairs held out and ``--unseen-per-group`` users of each group held out entirely.
3. Reports per-group accuracy on the seen users' held-out pairs (also split into contested pairs, where
   the groups disagree, and agreed ones), unseen users' accuracy given k = 0, 1, 2, 4, 8 of their pairs,
   and for reference a BT head fit on one group's pairs only (it knows the group: what the features allow)
   and the rules "longer wins" / "shorter wins".
4. A feature probe first: for each pooling and backbone depth in ``--probe`` it fits that per-group BT head
   and the pooled one, so the choice of ``--pooling`` / ``--backbone-layers`` can be checked.

Each of ``--seeds`` (default 0, 1, 2) draws its own assignment of pairs to users, split and fits; the
tables give the mean over seeds (± the standard deviation). Writes ``results.md`` and ``results.json`` to
``--results`` (default benchmarks/results/personalized_hh); the data, runs and embedding caches go to
``--work-dir`` (default runs/personalized_hh). About 7 minutes on 2 CPU cores, most of it the probe's
embedding passes through the full backbone (``--probe ''`` skips it: under a minute).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch

from prefkit.data.loaders import write_records
from prefkit.data.recipes import HH_GROUPS, TwoGroupSet, hh_two_groups, parse_shares, response_length
from prefkit.eval.personalized import PersonalizedModel, train_and_evaluate
from prefkit.models.mixture import MixtureBT
from prefkit.train.personalized import (
    embed_records,
    load_backbone,
    parse_personalized_config,
    split_users,
)

ROOT = Path(__file__).resolve().parent
METHODS: dict[str, dict[str, Any]] = {
    "pooled BT": {"method": "mixture_bt", "k": 1, "iters": 50, "m_steps": 50, "l2": 1.0e-3},
    "mixture BT (EM)": {"method": "mixture_bt", "k": 2, "iters": 50, "m_steps": 50, "l2": 1.0e-3, "n_init": 4},
    "PAL": {"method": "pal", "k": 2, "variant": "mixture", "epochs": 200, "lr": 0.03, "new_user_steps": 100},
    "VPL": {
        "method": "vpl",
        "latent_dim": 4,
        "hidden": 32,
        "context_size": 4,
        "target_size": 8,
        "steps": 600,
        "beta_kl": 0.05,
        "users_per_step": 16,
        "lr": 3.0e-3,
        "log_every": 100,
        "standardize": True,  # sum-pooled features have norms in the hundreds: without it KL starts ~3e9
    },
    "MiCRo": {"method": "micro", "k": 2, "steps": 300, "lr": 0.05, "router_steps": 200, "router_lr": 0.05},
}
SHOTS = [1, 2, 4, 8]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "data", help="HH-RLHF pairs {chosen, rejected}, e.g. ../shared/data/hh-rlhf/harmless-base-test.jsonl.gz"
    )
    parser.add_argument(
        "--backbone",
        default=None,
        help="llama2.c checkpoint (tok512.bin beside it); default: DATA's ../../tinyllamas/stories260K.bin",
    )
    parser.add_argument("--pooling", default="sum", choices=("last", "mean", "sum"))
    parser.add_argument("--backbone-layers", default="0", help="decoder layers kept: a number or 'all' (default 0)")
    parser.add_argument(
        "--shares", action="append", default=None, help="harmless,longer share of the pairs (repeatable)"
    )
    parser.add_argument("--users-per-group", type=int, default=10)
    parser.add_argument("--unseen-per-group", type=int, default=2, help="users of each group held out entirely")
    parser.add_argument("--max-length", type=int, default=512, help="prompt + response tokens (stories260K: 512)")
    parser.add_argument("--max-prompt-length", type=int, default=128, help="prompt tokens kept (its end)")
    parser.add_argument(
        "--probe",
        default="sum:0,sum:2,sum:all,mean:0,mean:2,mean:all",
        help="POOLING:LAYERS settings of the feature probe, comma-separated ('' skips it)",
    )
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of: " + ", ".join(METHODS))
    parser.add_argument(
        "--seeds", default="0,1,2", help="seeds of the assignment, split and fits; tables give the mean"
    )
    parser.add_argument("--work-dir", default="runs/personalized_hh")
    parser.add_argument("--results", default=str(ROOT / "results" / "personalized_hh"))
    args = parser.parse_args(argv)
    args.shares = [parse_shares(s) for s in (args.shares or ["0.5,0.5", "0.8,0.2"])]
    args.seeds = [int(s) for s in args.seeds.split(",")]
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")
    if args.backbone is None:
        args.backbone = str(Path(args.data).parent.parent / "tinyllamas" / "stories260K.bin")
    return args


def layers_value(text: str) -> int | None:
    return None if text == "all" else int(text)


def base_config(args, seed: int, train_file: Path, setting_dir: Path, pooling: str, layers: int | None) -> dict:
    """The top-level keys of the personalized configs (everything but the method)."""
    return {
        "model": args.backbone,
        "pooling": pooling,
        "backbone_layers": layers,
        "max_length": args.max_length,
        "max_prompt_length": args.max_prompt_length,
        "embed_batch_size": 32,
        "embedding_cache_dir": str(Path(args.work_dir) / "embeddings"),
        "train_file": str(train_file),
        "eval_fraction": 0.2,
        "unseen_users": unseen_users(args.users_per_group, args.unseen_per_group),
        "groups": "lab",
        "shots": SHOTS,
        "shot_draws": 3,
        "seed": seed,
        "progress": False,
        "overwrite_output_dir": True,
        "output_dir": str(setting_dir),
    }


def unseen_users(per_group: int, count: int) -> list[str]:
    """The last ``count`` users of each group (the assignment is random, so any are as good)."""
    return [f"group:{g}/{k}" for g in HH_GROUPS for k in range(per_group - count, per_group)]


# ------------------------------------------------------------------------------------------
# Measurements
# ------------------------------------------------------------------------------------------


def accuracy(correct: torch.Tensor, mask: torch.Tensor) -> float | None:
    return float(correct[mask].float().mean()) if bool(mask.any()) else None


def breakdown(correct: torch.Tensor, group: torch.Tensor, contested: torch.Tensor) -> dict[str, float | None]:
    """Accuracy per group, all pairs and split into contested / agreed pairs (rows of the held-out seen pairs)."""
    out: dict[str, float | None] = {}
    for g, name in enumerate(HH_GROUPS):
        mine = group == g
        out[name] = accuracy(correct, mine)
        out[f"{name} contested"] = accuracy(correct, mine & contested)
        out[f"{name} agreed"] = accuracy(correct, mine & ~contested)
    out["all"] = accuracy(correct, torch.ones_like(group, dtype=torch.bool))
    return out


def group_bt(pairs, train_mask: torch.Tensor, group: torch.Tensor, params: dict) -> list[MixtureBT]:
    """One BT head per group, fit on that group's training pairs only (it knows the group)."""
    heads = []
    for g in range(len(HH_GROUPS)):
        head = MixtureBT(pairs.dim, 1)
        head.fit(pairs.subset(train_mask & (group == g)), params["iters"], m_steps=params["m_steps"], l2=params["l2"])
        heads.append(head)
    return heads


def group_bt_correct(heads: list[MixtureBT], pairs, group: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        logits = torch.stack([h.pair_logits(pairs)[:, 0] for h in heads], dim=1)
    return logits.gather(1, group[:, None]).squeeze(1) > 0


class Setting:
    """One share setting: the built set, its file, the split and per-row group / contested flags."""

    def __init__(self, args, shares: tuple[float, float], seed: int):
        self.shares, self.seed = shares, seed
        self.name = f"shares_{shares[0]:g}_{shares[1]:g}"
        self.dir = Path(args.work_dir) / self.name / f"seed_{seed}"
        self.built: TwoGroupSet = hh_two_groups(
            args.data, users_per_group=args.users_per_group, shares=shares, seed=seed
        )
        self.file = write_records(self.built.records, self.dir / "hh_two_groups.jsonl")
        records = self.built.records
        self.group = torch.tensor([HH_GROUPS.index(r.user_id[len("group:") :].rsplit("/", 1)[0]) for r in records])
        self.contested = torch.tensor(self.built.contested)
        self.longer_chosen = torch.tensor([response_length(r.chosen) > response_length(r.rejected) for r in records])

    def config(self, args, method: dict, pooling: str, layers: int | None, out: str):
        mapping = base_config(args, self.seed, self.file, self.dir / out, pooling, layers)
        return parse_personalized_config({"personalized": dict(method), **mapping}, source=self.name)

    def masks(self, config) -> tuple[torch.Tensor, torch.Tensor]:
        """(train rows, held-out rows of seen users) as boolean masks, the split `prefkit train` makes."""
        train_rows, held_rows, unseen = split_users(self.built.records, config)
        n = len(self.built.records)
        train, held = torch.zeros(n, dtype=torch.bool), torch.zeros(n, dtype=torch.bool)
        train[train_rows] = True
        held[held_rows] = True
        held &= ~torch.tensor([r.user_id in unseen for r in self.built.records])
        return train, held

    def embed(self, config):
        return embed_records(self.built.records, load_backbone(config), config, str(self.file))


def probe(args, setting: Setting, log) -> list[dict]:
    """Per-group and pooled BT heads for each pooling / depth of ``--probe``."""
    rows = []
    for item in [s for s in args.probe.split(",") if s]:
        pooling, _, layers = item.partition(":")
        config = setting.config(args, METHODS["pooled BT"], pooling, layers_value(layers), "probe")
        start = time.time()
        pairs = setting.embed(config)
        train, held = setting.masks(config)
        params = METHODS["pooled BT"]
        heads = group_bt(pairs, train, setting.group, params)
        pooled = MixtureBT(pairs.dim, 1)
        pooled.fit(pairs.subset(train), params["iters"], m_steps=params["m_steps"], l2=params["l2"])
        test = pairs.subset(held)
        g, c = setting.group[held], setting.contested[held]
        row = {
            "pooling": pooling,
            "backbone_layers": layers,
            "group BT": breakdown(group_bt_correct(heads, test, g), g, c),
            "pooled BT": breakdown(pooled.pair_correct(test), g, c),
            "seconds": round(time.time() - start, 1),
        }
        log(f"probe {pooling}:{layers}: group BT {fmt_groups(row['group BT'])}; pooled {fmt_groups(row['pooled BT'])}")
        rows.append(row)
    return rows


def fmt_groups(acc: dict) -> str:
    return " ".join(f"{g} {acc[g]:.3f}" for g in HH_GROUPS)


def run_setting(args, setting: Setting, log) -> dict:
    layers = layers_value(args.backbone_layers)
    reference = setting.config(args, METHODS["pooled BT"], args.pooling, layers, "pooled")
    pairs = setting.embed(reference)
    train, held = setting.masks(reference)
    test = pairs.subset(held)
    g, c = setting.group[held], setting.contested[held]
    longer = setting.longer_chosen[held]
    out: dict[str, Any] = {"seen": {}, "unseen": {}, "seconds": {}}
    out["seen"]["rule: longer wins"] = breakdown(longer, g, c)
    out["seen"]["rule: shorter wins"] = breakdown(~longer, g, c)
    heads = group_bt(pairs, train, setting.group, METHODS["pooled BT"])
    out["seen"]["group BT (knows the group)"] = breakdown(group_bt_correct(heads, test, g), g, c)
    for name in args.methods:
        start = time.time()
        config = setting.config(args, METHODS[name], args.pooling, layers, name.split()[0].lower())
        run = train_and_evaluate(config, say=log)
        model = PersonalizedModel.load(run.output_dir)
        out["seen"][name] = breakdown(model.seen_correct(test), g, c)
        unseen = run.evaluation["unseen"]["by_k"]
        out["unseen"][name] = {
            k: {grp: v["per_group"][grp]["accuracy"] for grp in HH_GROUPS} for k, v in unseen.items()
        }
        out["seconds"][name] = round(time.time() - start, 1)
        log(f"== {name}: seen {fmt_groups(out['seen'][name])} ({out['seconds'][name]} s)")
    out["held_out_pairs"] = {grp: int((g == i).sum()) for i, grp in enumerate(HH_GROUPS)}
    out["held_out_contested"] = {grp: int(((g == i) & c).sum()) for i, grp in enumerate(HH_GROUPS)}
    return out


# ------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------


def mean_sd(values: list) -> Any:
    """Leaves of equal-shaped trees (dicts of floats) -> ``{"mean", "sd"}`` over the trees (None stays None)."""
    first = values[0]
    if isinstance(first, dict):
        return {key: mean_sd([v[key] for v in values]) for key in first}
    if first is None or any(v is None for v in values):
        return None
    t = torch.tensor(values, dtype=torch.float64)
    return {"mean": float(t.mean()), "sd": float(t.std(unbiased=True)) if len(values) > 1 else 0.0}


def cell(value: dict | None, sd: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value['mean']:.3f}" + (f" ± {value['sd']:.3f}" if sd else "")


def seen_table(seen: dict) -> list[str]:
    main = [*HH_GROUPS, "all"]
    split = [*(f"{g} contested" for g in HH_GROUPS), *(f"{g} agreed" for g in HH_GROUPS)]
    header = ["model", *main, *split]
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for name, acc in seen.items():
        cells = [cell(acc[h], sd=True) for h in main] + [cell(acc[h]) for h in split]
        lines.append("| " + " | ".join([name, *cells]) + " |")
    return lines


def unseen_table(unseen: dict) -> list[str]:
    ks = ["0", *map(str, SHOTS)]
    header = ["model", *(f"k = {k}" for k in ks)]
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for name, by_k in unseen.items():
        cells = [" / ".join(cell(by_k[k][g]) for g in HH_GROUPS) for k in ks]
        lines.append("| " + " | ".join([name, *cells]) + " |")
    return lines


def probe_table(rows: dict) -> list[str]:
    header = ["pooling:layers", *(f"group BT: {g}" for g in HH_GROUPS), *(f"pooled BT: {g}" for g in HH_GROUPS)]
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for item, r in rows.items():
        values = [cell(r["group BT"][g], sd=True) for g in HH_GROUPS] + [cell(r["pooled BT"][g]) for g in HH_GROUPS]
        lines.append("| " + " | ".join([item, *values]) + " |")
    return lines


def report(args, command: str, results: dict) -> str:
    seeds = ", ".join(map(str, args.seeds))
    md = [
        "# Pooled vs personalised reward models on HH-RLHF, two user groups",
        "",
        f"Command: `{command}`",
        "",
        f"Data: `{args.data}` by `prefkit.data.recipes.hh_two_groups` ({args.users_per_group} users per group; "
        f"{args.unseen_per_group} per group held out as unseen users; 20 % of each seen user's pairs held out). "
        f"Backbone: `{args.backbone}`, {args.pooling} pooling, backbone_layers {args.backbone_layers}, "
        f"max_length {args.max_length}, max_prompt_length {args.max_prompt_length}. Every number is the mean "
        f"over seeds {seeds} (each seed: its own assignment of pairs to users, split and fits); ± is the "
        "standard deviation across seeds.",
        "",
    ]
    if results["probe"]:
        md += [
            f"## Feature probe (shares {args.shares[0][0]:g}/{args.shares[0][1]:g})",
            "",
            "Held-out accuracy (seen users) of a BT head fit on one group's pairs only (group BT: what the features "
            "allow for that group) and of one head for everybody (pooled BT).",
            "",
            *probe_table(results["probe"]),
            "",
        ]
    for s in results["settings"].values():
        stats = s["stats"]
        held = ", ".join(f"{g} {n}" for g, n in s["held_out_pairs"].items())
        md += [
            f"## Shares harmless {s['shares'][0]:g} / longer {s['shares'][1]:g}",
            "",
            f"{stats['rows']} rows, {stats['ties']} length ties dropped, {stats['pairs']} pairs "
            f"(harmless {stats['per_group']['harmless']['pairs']}, longer {stats['per_group']['longer']['pairs']}); "
            f"contested share {stats['contested_share']:.3f}. Held-out pairs of seen users per seed: {held}.",
            "",
            "Seen users, held-out pairs (accuracy against each group's own labels):",
            "",
            *seen_table(s["seen"]),
            "",
            "Unseen users given k of their pairs (harmless / longer; queried on their pairs after the first 8, "
            "3 draws per seed):",
            "",
            *unseen_table(s["unseen"]),
            "",
            "Seconds per method and seed (train + evaluate): "
            + ", ".join(f"{m} {t['mean']:.1f}" for m, t in s["seconds"].items())
            + ".",
            "",
        ]
    return "\n".join(md)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    log_file = open(work / "log.txt", "w")

    def log(line: str) -> None:
        log_file.write(line + "\n")
        log_file.flush()
        if line.startswith(("==", "probe", "setting")):
            print(line, flush=True)

    start = time.time()
    command = shlex.join(["python", "benchmarks/personalized_hh.py", *(argv if argv is not None else sys.argv[1:])])
    results: dict[str, Any] = {"command": command, "probe": {}, "settings": {}, "per_seed": {}}
    probes = []
    for i, shares in enumerate(args.shares):
        runs = []
        for seed in args.seeds:
            setting = Setting(args, shares, seed)
            log(f"setting {setting.name} seed {seed}: contested share {setting.built.stats['contested_share']:.3f}")
            if i == 0 and args.probe:
                probes.append(probe(args, setting, log))
            runs.append(run_setting(args, setting, log))
        results["per_seed"][setting.name] = runs
        summary = mean_sd([{k: r[k] for k in ("seen", "unseen", "seconds")} for r in runs])
        results["settings"][setting.name] = {
            "shares": list(shares),
            "stats": setting.built.stats,
            "held_out_pairs": runs[0]["held_out_pairs"],
            **summary,
        }
    if probes:
        items = [f"{r['pooling']}:{r['backbone_layers']}" for r in probes[0]]
        results["probe"] = {
            item: mean_sd([{k: p[j][k] for k in ("group BT", "pooled BT")} for p in probes])
            for j, item in enumerate(items)
        }
    results["seconds"] = round(time.time() - start, 1)
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    text = report(args, command, results) + f"\nTotal time {results['seconds']:.0f} s.\n"
    (out / "results.md").write_text(text)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    print(text)
    print(f"wrote {out / 'results.md'} and {out / 'results.json'}; runs in {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
