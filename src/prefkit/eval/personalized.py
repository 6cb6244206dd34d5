"""Evaluate a personalized reward head (docs/personalized.md, "Command line").

    prefkit eval rm --model RUN_DIR --data pairs.jsonl [--groups lab|GROUPS.yaml] [--shots 1,2,4,8]

``RUN_DIR`` is what ``prefkit train`` wrote for a ``personalized:`` config (`prefkit.train.personalized`).
The pairs (with a ``user_id`` each) are embedded with the run's backbone and split by user:

- **seen users** (users the head was trained on): pairwise accuracy per user, per group, over all
  pairs, the mean over users, the worst user and the worst group;
- **unseen users**: for each draw, each user's pairs are shuffled; the first ``k`` are given to the
  model (PAL: `fit_new_user`; VPL: the encoder's context; MiCRo: `adapt` of the router; mixture of BT:
  the posterior over groups ``pi_g prod_i sigma(r_g(c_i) - r_g(r_i))``), and accuracy is measured on the
  user's pairs after the first ``max(shots)`` (the same query pairs for every ``k``). ``k = 0`` is the
  prior (PAL's mean weights, VPL's ``z = 0``, MiCRo's unadapted router, the largest group's head).

Accuracies of a group (or of "all") are pooled over its pairs; ``user_mean`` averages users. Groups
come from ``--groups``: ``lab`` reads the lab's user ids ``group:NAME/K``, a file maps user ids to groups
(JSON or YAML mapping). Writes ``results.json``, ``report.md`` and ``accuracy_vs_k.png`` to ``--output``.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from prefkit.data.groups import LAB_USER, resolve_groups  # noqa: F401 - re-exported
from prefkit.models.embeddings import EmbeddedPairs
from prefkit.models.mixture import worst_group

__all__ = [
    "MODEL_TYPES",
    "PersonalizedModel",
    "add_arguments",
    "evaluate_pairs",
    "is_personalized_model",
    "resolve_groups",
    "run",
    "write_evaluation",
]

MODEL_TYPES = {"prefkit_mixture_bt": "mixture_bt", "prefkit_pal": "pal", "prefkit_vpl": "vpl", "prefkit_micro": "micro"}


def _model_type(folder: str | Path) -> str | None:
    try:
        return json.loads((Path(folder) / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None


def is_personalized_model(folder: str | Path) -> bool:
    """Whether ``folder`` holds a personalized head (its ``config.json`` has one of `MODEL_TYPES`)."""
    return _model_type(folder) in MODEL_TYPES


# ------------------------------------------------------------------------------------------
# The model, per method
# ------------------------------------------------------------------------------------------


class PersonalizedModel:
    """A fitted head with what evaluating it needs: the run config (method hyper-parameters, backbone),
    the seen users and, for VPL, each seen user's latent.

    `seen_correct`: ``[N]`` bool, each row (of a seen user) ranked right by that user's reward.
    `few_shot_correct`: ``[Q]`` bool, the ``query`` rows ranked right for one unseen user given the
    ``context`` rows (their labelled pairs; None: no pairs, the prior).
    """

    def __init__(self, config, head, users: Sequence[str], extra: Mapping[str, Any]):
        self.config, self.head, self.users, self.extra = config, head, list(users), dict(extra)
        self.method = config.method

    @classmethod
    def load(cls, folder: str | Path) -> PersonalizedModel:
        from prefkit.train.personalized import CONFIG_FILE, USERS_FILE, load_personalized_config

        folder = Path(folder)
        method = MODEL_TYPES.get(_model_type(folder))
        if method is None:
            raise ValueError(f"{folder} holds no personalized head (config.json model_type: {_model_type(folder)!r})")
        for name in (CONFIG_FILE, USERS_FILE):
            if not (folder / name).is_file():
                raise ValueError(f"{folder}: no {name}; a personalized run folder is written by `prefkit train`")
        config = load_personalized_config(folder / CONFIG_FILE)
        info = json.loads((folder / USERS_FILE).read_text())
        return cls(config, _head_class(method).from_pretrained(str(folder)), info.pop("users"), info)

    def seen_correct(self, pairs: EmbeddedPairs) -> torch.Tensor:
        with torch.no_grad():
            if self.method == "mixture_bt":
                return self.head.pair_correct(pairs)
            if self.method == "pal":
                return self.head.pair_logits(pairs) > 0
            if self.method == "vpl":
                z = torch.tensor([self.extra["user_latents"][pairs.users[i]] for i in pairs.user_index.tolist()])
                return self.head.reward(pairs.chosen.float(), z) > self.head.reward(pairs.rejected.float(), z)
            return self._micro_prob(self.head, pairs, self._micro_features(pairs, seen=True)) > 0.5

    def few_shot_correct(self, context: EmbeddedPairs | None, query: EmbeddedPairs) -> torch.Tensor:
        p = self.config.params
        if self.method == "mixture_bt":
            with torch.no_grad():
                log_posterior = self.head.mixing_weights.log()
                if context is not None:
                    log_posterior = log_posterior + F.logsigmoid(self.head.pair_logits(context)).sum(0)
                return self.head.pair_logits(query)[:, int(log_posterior.argmax())] > 0
        if self.method == "pal":
            weights = (
                self.head.mean_weights()
                if context is None
                else self.head.fit_new_user(context, p.new_user_steps, lr=p.new_user_lr)
            )
            with torch.no_grad():
                return self.head.pair_logits(query, weights) > 0
        if self.method == "vpl":
            if context is None:
                with torch.no_grad():
                    z = torch.zeros(self.head.latent_dim)
                    return self.head.reward(query.chosen.float(), z) > self.head.reward(query.rejected.float(), z)
            return self.head.predict(context, query) > 0.5
        model = self.head
        if context is not None:
            features = self._micro_features(context, seen=False)
            model = model.adapt(context, user_features=features, steps=p.adapt_steps, lr=p.adapt_lr)
        with torch.no_grad():
            return self._micro_prob(model, query, self._micro_features(query, seen=False)) > 0.5

    def _micro_features(self, pairs: EmbeddedPairs, seen: bool) -> torch.Tensor | None:
        """``[len(pairs.users), U]`` one-hot seen-user ids (zeros for unseen users), or None without user context."""
        if not self.config.params.user_context:
            return None
        features = torch.zeros(len(pairs.users), len(self.users))
        if seen:
            position = {u: i for i, u in enumerate(self.users)}
            for row, user in enumerate(pairs.users):
                if user in position:
                    features[row, position[user]] = 1.0
        return features

    @staticmethod
    def _micro_prob(model, pairs: EmbeddedPairs, features) -> torch.Tensor:
        with torch.no_grad():
            return model.prob(pairs.chosen.float(), pairs.rejected.float(), model.router_context(pairs, features))


def _head_class(method: str):
    from prefkit.models.micro import MiCRo
    from prefkit.models.mixture import MixtureBT
    from prefkit.models.pal import PAL
    from prefkit.models.vpl import VPL

    return {"mixture_bt": MixtureBT, "pal": PAL, "vpl": VPL, "micro": MiCRo}[method]


# ------------------------------------------------------------------------------------------
# Groups and summaries
# ------------------------------------------------------------------------------------------


def summarize(counts: Mapping[str, tuple[int, int]], groups: Mapping[str, str] | None) -> dict[str, Any]:
    """Accuracy from ``{user: (correct, total)}``: pooled over pairs (``accuracy``), the mean over users
    (``user_mean``), per user, the worst user, and with ``groups`` per group (pooled) and the worst group."""
    per_user = {u: {"pairs": t, "accuracy": c / t} for u, (c, t) in sorted(counts.items())}
    correct, total = sum(c for c, _ in counts.values()), sum(t for _, t in counts.values())
    user, value = worst_group({u: v["accuracy"] for u, v in per_user.items()})
    out: dict[str, Any] = {
        "users": len(per_user),
        "pairs": total,
        "accuracy": correct / total,
        "user_mean": sum(v["accuracy"] for v in per_user.values()) / len(per_user),
        "worst_user": {"user": user, "accuracy": value},
        "per_user": per_user,
    }
    if groups is not None:
        pooled: dict[str, list[int]] = {}
        for u, (c, t) in counts.items():
            entry = pooled.setdefault(groups[u], [0, 0, 0])
            entry[0], entry[1], entry[2] = entry[0] + c, entry[1] + t, entry[2] + 1
        out["per_group"] = {g: {"users": n, "pairs": t, "accuracy": c / t} for g, (c, t, n) in sorted(pooled.items())}
        group, value = worst_group({g: v["accuracy"] for g, v in out["per_group"].items()})
        out["worst_group"] = {"group": group, "accuracy": value}
    return out


def _rows_by_user(pairs: EmbeddedPairs) -> dict[str, list[int]]:
    rows: dict[str, list[int]] = {}
    for i, u in enumerate(pairs.user_index.tolist()):
        if u >= 0:
            rows.setdefault(pairs.users[u], []).append(i)
    return rows


def evaluate_pairs(
    model: PersonalizedModel,
    pairs: EmbeddedPairs,
    groups: Mapping[str, str] | None,
    shots: Sequence[int] = (1, 2, 4, 8),
    draws: int = 3,
    seed: int = 0,
) -> dict[str, Any]:
    """Seen-user and few-shot unseen-user accuracy of ``model`` on ``pairs`` (see the module docstring)."""
    rows = _rows_by_user(pairs)
    if not rows:
        raise ValueError("none of the pairs has a user_id; a personalized evaluation needs one on each pair")
    seen_users = set(model.users)
    results: dict[str, Any] = {
        "method": model.method,
        "pairs": len(pairs),
        "pairs_without_user": int((pairs.user_index < 0).sum()),
        "seen": None,
        "unseen": None,
    }
    seen_rows = [i for u, r in rows.items() if u in seen_users for i in r]
    if seen_rows:
        subset = pairs.subset(seen_rows)
        correct = model.seen_correct(subset)
        counts: dict[str, list[int]] = {}
        for ok, u in zip(correct.tolist(), subset.user_index.tolist()):
            entry = counts.setdefault(subset.users[u], [0, 0])
            entry[0], entry[1] = entry[0] + int(ok), entry[1] + 1
        results["seen"] = summarize({u: (c, t) for u, (c, t) in counts.items()}, groups)
    unseen = {u: r for u, r in rows.items() if u not in seen_users}
    if unseen:
        results["unseen"] = _few_shot(model, pairs, unseen, groups, sorted(set(shots)), draws, seed)
    return results


def _few_shot(model, pairs, rows_of: Mapping[str, list[int]], groups, shots, draws: int, seed: int) -> dict:
    max_k = max(shots)
    usable = {u: r for u, r in rows_of.items() if len(r) > max_k}
    skipped = {u: len(r) for u, r in rows_of.items() if len(r) <= max_k}
    out: dict[str, Any] = {"shots": [0, *shots], "draws": draws, "query": f"pairs after the first {max_k}"}
    out["skipped_users"] = skipped
    if not usable:
        return out
    counts = {k: {u: [0, 0] for u in usable} for k in out["shots"]}
    for draw in range(draws):
        for user, user_rows in sorted(usable.items()):
            order = list(user_rows)
            random.Random(f"{seed}-{draw}-{user}").shuffle(order)
            query = pairs.subset(order[max_k:])
            for k in out["shots"]:
                context = pairs.subset(order[:k]) if k else None
                correct = model.few_shot_correct(context, query)
                counts[k][user][0] += int(correct.sum())
                counts[k][user][1] += len(query)
    out["by_k"] = {str(k): summarize({u: tuple(v) for u, v in c.items()}, groups) for k, c in counts.items()}
    return out


# ------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------


def _seen_table(seen: Mapping[str, Any]) -> list[list[str]]:
    rows = [[g, str(v["users"]), str(v["pairs"]), f"{v['accuracy']:.3f}"] for g, v in seen.get("per_group", {}).items()]
    return [*rows, ["all", str(seen["users"]), str(seen["pairs"]), f"{seen['accuracy']:.3f}"]]


def _unseen_table(unseen: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    first = unseen["by_k"][str(unseen["shots"][0])]
    group_names = list(first.get("per_group", {}))
    header = ["k", "all", "user mean", *group_names, *(["worst group"] if group_names else [])]
    rows = []
    for k in unseen["shots"]:
        s = unseen["by_k"][str(k)]
        row = [str(k), f"{s['accuracy']:.3f}", f"{s['user_mean']:.3f}"]
        row += [f"{s['per_group'][g]['accuracy']:.3f}" for g in group_names]
        if group_names:
            row.append(f"{s['worst_group']['group']} {s['worst_group']['accuracy']:.3f}")
        rows.append(row)
    return header, rows


def _text_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in [header, *rows]]


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(r) + " |" for r in rows)]


def _sections(results: Mapping[str, Any], table: Callable) -> list[str]:
    lines = []
    seen, unseen = results["seen"], results["unseen"]
    if seen:
        lines += [f"Seen users: {seen['users']} users, {seen['pairs']} pairs", ""]
        lines += table(["group", "users", "pairs", "accuracy"], _seen_table(seen))
        tail = f"mean over users {seen['user_mean']:.3f}; worst user {seen['worst_user']['user']} "
        tail += f"{seen['worst_user']['accuracy']:.3f}"
        if "worst_group" in seen:
            tail += f"; worst group {seen['worst_group']['group']} {seen['worst_group']['accuracy']:.3f}"
        lines += ["", tail, ""]
    if unseen and "by_k" in unseen:
        n_users = unseen["by_k"]["0"]["users"]
        lines += [
            f"Unseen users: accuracy given k of their pairs ({n_users} users, {unseen['draws']} draws; "
            f"queried on their {unseen['query']})",
            "",
            *table(*_unseen_table(unseen)),
            "",
        ]
    if unseen and unseen["skipped_users"]:
        lines += [f"Unseen users with too few pairs for k = {unseen['shots'][-1]} (skipped): {unseen['skipped_users']}"]
    if not seen and not (unseen and "by_k" in unseen):
        lines += ["No user could be evaluated."]
    return lines


def plot_accuracy_vs_k(results: Mapping[str, Any], path: Path) -> Path:
    """Unseen users' accuracy against k (all pairs, and each group), the seen users' accuracy dashed."""
    from prefkit.eval.plots import _save, plt

    unseen = results["unseen"]
    fig, ax = plt.subplots(figsize=(6, 4))
    ks = unseen["shots"]
    ax.plot(ks, [unseen["by_k"][str(k)]["accuracy"] for k in ks], "o-", color="black", label="unseen: all")
    for group in unseen["by_k"]["0"].get("per_group", {}):
        values = [unseen["by_k"][str(k)]["per_group"][group]["accuracy"] for k in ks]
        ax.plot(ks, values, "o--", label=f"unseen: {group}")
    if results["seen"]:
        ax.axhline(results["seen"]["accuracy"], color="gray", linestyle=":", label="seen users")
    ax.set(xlabel="k (labelled pairs of the user)", ylabel="pairwise accuracy", ylim=(0, 1.02), xticks=ks)
    ax.set_title(f"{results['method']}: few-shot accuracy of unseen users")
    ax.legend(fontsize=8)
    return _save(fig, path)


def write_evaluation(results: Mapping[str, Any], folder: str | Path, say: Callable[[str], None] = print) -> Path:
    """Write ``results.json``, ``report.md`` (and ``accuracy_vs_k.png`` when unseen users were evaluated)
    into ``folder``, print the tables with ``say``; returns report.md's path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    for line in _sections(results, _text_table):
        say(line)
    md = [f"# Personalized evaluation: {results['method']}", ""]
    md += [f"Model: `{results.get('model', '')}`; data: {', '.join(f'`{d}`' for d in results.get('data', []))}."]
    md += [f"{results['pairs']} pairs, {results['pairs_without_user']} without a user_id (not evaluated).", ""]
    md += _sections(results, _md_table)
    if results["unseen"] and "by_k" in results["unseen"]:
        plot_accuracy_vs_k(results, folder / "accuracy_vs_k.png")
        md += ["", "![accuracy vs k](accuracy_vs_k.png)"]
    if results["seen"]:
        md += ["", "## Seen users", ""]
        md += _md_table(
            ["user", "pairs", "accuracy"],
            [[u, str(v["pairs"]), f"{v['accuracy']:.3f}"] for u, v in results["seen"]["per_user"].items()],
        )
    report = folder / "report.md"
    report.write_text("\n".join(md) + "\n")
    return report


# ------------------------------------------------------------------------------------------
# `prefkit eval rm` on a personalized run folder
# ------------------------------------------------------------------------------------------

_NOT_FOR_PERSONALIZED = ("implicit", "ref", "beta", "layout", "section_map", "pref_prob", "tokenizer", "max_length")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``prefkit eval rm`` for a personalized run folder (``--model RUN_DIR``)."""
    group = parser.add_argument_group("personalized heads (--model is a personalized run folder)")
    group.add_argument(
        "--groups",
        default=None,
        metavar="lab|FILE",
        help="user groups for the per-group table: 'lab' (user ids group:NAME/K) or a JSON/YAML user_id -> group file",
    )
    group.add_argument("--shots", default=None, metavar="K,K,...", help="unseen users' k (default: the run's, 1,2,4,8)")
    group.add_argument("--shot-draws", type=int, default=None, help="draws of each unseen user's k pairs (default 3)")
    group.add_argument("--embedding-cache", default=None, help="embedding cache root (default: OUTPUT/embeddings)")


def options_given(args: argparse.Namespace) -> bool:
    """Whether any personalized-only option was given."""
    return any(getattr(args, name, None) is not None for name in ("groups", "shots", "shot_draws", "embedding_cache"))


def _check_options(args: argparse.Namespace) -> None:
    if not is_personalized_model(args.model):
        raise ValueError(
            f"--groups, --shots, --shot-draws and --embedding-cache apply to personalized run folders; {args.model} "
            "holds no personalized head"
        )
    bad = [name for name in _NOT_FOR_PERSONALIZED if getattr(args, name, None) not in (None, False)]
    if args.kind not in (None, "pairwise"):
        bad.append("kind")
    if bad:
        names = ", ".join("--" + b.replace("_", "-") for b in bad)
        raise ValueError(
            f"{names}: not for a personalized head (it reads pairwise records and embeds them as its run's config says)"
        )


def _shots(value: str | None, default: Sequence[int]) -> list[int]:
    if value is None:
        return list(default)
    try:
        shots = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        shots = []
    if not shots or min(shots) < 1:
        raise ValueError(f"--shots must be a comma-separated list of ints >= 1, got {value!r}")
    return shots


def evaluate_run(args: argparse.Namespace, say: Callable[[str], None] = print) -> Path:
    """Load the run folder ``args.model`` and the ``--data`` files, evaluate, write the report."""
    from prefkit.data.loaders import load_records, parse_column_map
    from prefkit.eval.commands import parse_data_argument
    from prefkit.train.personalized import embed_records, load_backbone

    _check_options(args)
    model = PersonalizedModel.load(args.model)
    config = model.config
    config.embed_batch_size, config.progress = args.batch_size, not args.no_progress
    files = [parse_data_argument(v)[1] for v in args.data]
    column_map = parse_column_map(args.map) if args.map else None
    records = [r for f in files for r in load_records(f, kind="pairwise", column_map=column_map, split=args.split)]
    backbone_model, tokenizer = load_backbone(config)
    if args.device:
        backbone_model = backbone_model.to(args.device)
    cache = Path(args.embedding_cache or Path(args.output) / "embeddings")
    pairs = embed_records(records, (backbone_model, tokenizer), config, "+".join(files), cache)
    groups = resolve_groups(args.groups, pairs.users) if args.groups else None
    shots = _shots(args.shots, config.shots)
    draws = args.shot_draws if args.shot_draws is not None else config.shot_draws
    if draws < 1:
        raise ValueError(f"--shot-draws must be >= 1, got {draws}")
    results = evaluate_pairs(model, pairs, groups, shots, draws, config.seed)
    results.update(model=str(args.model), data=files, groups=args.groups)
    return write_evaluation(results, args.output, say)


def run(args: argparse.Namespace) -> int:
    """``prefkit eval rm`` on a personalized run folder; 2 on bad input (message on stderr)."""
    try:
        report = evaluate_run(args)
    except (ValueError, OSError, KeyError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    plot = ", accuracy_vs_k.png" if (report.parent / "accuracy_vs_k.png").exists() else ""
    print(f"wrote {report} (and results.json{plot}) in {report.parent}")
    return 0


# ------------------------------------------------------------------------------------------
# Train, then evaluate (`prefkit train` with a personalized: config)
# ------------------------------------------------------------------------------------------
def evaluate_fitted_head(config, head, users: Sequence[str], extra: Mapping[str, Any], eval_pairs, out: Path, say):
    """Per-user / per-group / k-shot accuracy of a freshly fitted head on ``eval_pairs``, written to
    ``out/eval`` (what `train_personalized` calls as its ``evaluate``)."""
    model = PersonalizedModel(config, head, users, extra)
    groups = resolve_groups(config.groups, eval_pairs.users) if config.groups else None
    evaluation = evaluate_pairs(model, eval_pairs, groups, config.shots, config.shot_draws, config.seed)
    write_evaluation(evaluation, Path(out) / "eval", say)
    return evaluation


def train_and_evaluate(config, say: Callable[[str], None] = print, resume: str | bool | None = None):
    """`prefkit.train.personalized.train_personalized`, then the held-out evaluation (`evaluate_fitted_head`)."""
    from prefkit.train.personalized import train_personalized

    return train_personalized(config, say=say, resume=resume, evaluate=evaluate_fitted_head)


def run_personalized(config_path: str, overrides: Sequence[str], resume=None) -> int:
    """The ``prefkit train`` entry for a ``personalized:`` config; exit status (2: bad config or data)."""
    from prefkit.data.records import DataError
    from prefkit.train.checkpointing import TrainingStoppedError
    from prefkit.train.personalized import CONFIG_FILE, load_personalized_config, main_process
    from prefkit.train.settings import ConfigError

    try:
        config = load_personalized_config(config_path, overrides)
        run = train_and_evaluate(config, resume=resume)
    except (ConfigError, DataError, FileNotFoundError, KeyError, ValueError) as err:
        print(f"prefkit train: error: {err}", file=sys.stderr)
        return 2
    except (FloatingPointError, TrainingStoppedError) as err:
        print(f"prefkit train: stopped: {err}", file=sys.stderr)
        return 1
    if not main_process():
        return 0
    print(f"\nDone. Output in {run.output_dir}/")
    print("  config.json, model.safetensors  the head (from_pretrained); users.json: the seen users")
    print(f"  {CONFIG_FILE}  the resolved config (prefkit train it to re-run)")
    print("  metrics.jsonl  the fit's history; README.md  the model card")
    if run.evaluation is not None:
        print("  eval/          report.md, results.json, accuracy_vs_k.png")
    return 0
