"""`prefkit demo`: one preference-learning story end to end in a lab world with a known true reward.

1. Draw the world (`prefkit.lab.make_world`) and its reference policy: a tiny Llama pre-trained on the
   world's base distribution (about 12 s the first time, then loaded from the cache).
2. Collect preference pairs on fresh base-distribution responses from simulated Bradley-Terry annotators
   (from a mix of the user groups in a world with several), plus held-out pairs.
3. Train a policy from the reference with DPO (or any pairwise loss) against the frozen reference, tracing
   its true reward and KL as it trains, and a Bradley-Terry reward model on the reference's backbone.
4. Measure against the ground truth: the policy's mean true reward (gain over the reference, per group),
   KL to the reference, win rate; implicit-reward and reward-model accuracy on held-out pairs, both against
   the annotators' labels and against the true preferences.
5. Write ``OUTPUT_DIR/report.md`` with PNG plots (training curves, true reward against KL) and
   ``results.json``, and say what to run next.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from prefkit.lab.world import PRESETS

DEFAULTS = {
    "world": "default",
    "loss": "dpo",
    "steps": 200,
    "seed": 0,
    "beta": 0.1,
    "batch_size": 32,
    "learning_rate": 5e-4,
    "heldout_pairs": 500,
    "samples_per_prompt": 16,
}


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--world",
        default=DEFAULTS["world"],
        choices=list(PRESETS),
        help="the lab world: "
        + "; ".join(f"{k}: {v[1]}" for k, v in PRESETS.items()).replace("%", "%%")
        + " (default: default)",
    )
    parser.add_argument(
        "--loss",
        default=DEFAULTS["loss"],
        help="a pairwise loss, e.g. dpo, ipo, robust_dpo, simpo (`prefkit losses`; default: dpo)",
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=DEFAULTS["steps"],
        help="optimizer steps of the policy and of the reward model; each sees fresh pairs, "
        f"steps x {DEFAULTS['batch_size']} in all (default: {DEFAULTS['steps']})",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=DEFAULTS["seed"],
        help="seed of the world, the reference policy, the data and training (default: 0)",
    )
    parser.add_argument(
        "--beta", type=float, default=DEFAULTS["beta"], help="the loss's beta, where it takes one (default: 0.1)"
    )
    parser.add_argument(
        "--learning-rate",
        type=float,
        default=DEFAULTS["learning_rate"],
        help=f"learning rate of both trainings (default: {DEFAULTS['learning_rate']})",
    )
    parser.add_argument(
        "--output-dir", default="runs/demo", help="where the report, data and models go (default: runs/demo)"
    )
    parser.add_argument(
        "--cache-dir",
        default=None,
        help="where reference policies are cached (default: $PREFKIT_CACHE/lab or ~/.cache/prefkit/lab)",
    )
    parser.add_argument(
        "--quiet", action="store_true", help="no progress bars or messages; the report is still written"
    )


def _check(loss: str, steps: int, beta: float, world: str) -> str | None:
    """The first problem with the arguments, or None."""
    from prefkit.losses import get_loss

    if world not in PRESETS:
        return f"unknown world {world!r}; expected one of {', '.join(PRESETS)}"
    try:
        kind = get_loss(loss).kind
    except KeyError as err:
        return str(err.args[0])
    if kind != "pairwise":
        return f"--loss {loss} is {kind}; the demo trains on pairs and needs a pairwise loss (`prefkit losses`)"
    if steps < 1:
        return f"--steps must be at least 1, got {steps}"
    if not beta > 0:
        return f"--beta must be > 0, got {beta}"
    return None


def _loss_params(loss: str, beta: float) -> dict[str, Any]:
    from prefkit.losses import get_loss

    return {"beta": beta} if "beta" in get_loss(loss).hyperparameters else {}


def _annotator(world):
    """The demo's annotators and a description of them."""
    from prefkit.lab import BradleyTerry, GroupMix

    if len(world.groups) > 1:
        return GroupMix(BradleyTerry(1.0)), "Bradley-Terry annotators (temperature 1) drawn from the user groups"
    return BradleyTerry(1.0), "Bradley-Terry annotators (temperature 1)"


def _label_accuracy(score, records) -> float:
    """Share of held-out records whose chosen response scores above the rejected one (ties: one half)."""
    items = [(r.prompt, r.chosen) for r in records] + [(r.prompt, r.rejected) for r in records]
    s = score(items)
    a, b = s[: len(records)], s[len(records) :]
    return float(np.mean(np.where(a == b, 0.5, (a > b).astype(float))))


def _fmt(x: float | None, digits: int = 3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def run_demo(
    output_dir: str | Path = "runs/demo",
    *,
    world: str = DEFAULTS["world"],
    loss: str = DEFAULTS["loss"],
    steps: int = DEFAULTS["steps"],
    seed: int = DEFAULTS["seed"],
    beta: float = DEFAULTS["beta"],
    learning_rate: float = DEFAULTS["learning_rate"],
    batch_size: int = DEFAULTS["batch_size"],
    heldout_pairs: int = DEFAULTS["heldout_pairs"],
    samples_per_prompt: int = DEFAULTS["samples_per_prompt"],
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the demo and return its results (also written to ``output_dir/results.json``)."""
    from prefkit.eval.implicit import ImplicitReward
    from prefkit.lab import draw_dataset, make_world, save_dataset
    from prefkit.lab.evaluate import evaluate_policy, reward_model_agreement, score_responses, truth_pairs
    from prefkit.lab.plots import reward_vs_kl, training_curves
    from prefkit.lab.policy import reference_policy
    from prefkit.lab.runs import TruthCallback, train_policy, train_reward_model

    problem = _check(loss, steps, beta, world)
    if problem:
        raise ValueError(problem)
    say = print if progress else (lambda *a, **k: None)
    if not progress:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # e.g. "Writing model shards"
    start = time.perf_counter()
    timings: dict[str, float] = {}

    def lap(name: str) -> None:
        timings[name] = time.perf_counter() - start - sum(timings.values())

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)

    the_world = make_world(world, seed)
    say(f"prefkit demo: world {world!r} (seed {seed}): {PRESETS[world][1]}")
    ref = reference_policy(the_world, seed, cache_dir=cache_dir, progress=progress)
    how = f"loaded from {ref.path}" if ref.from_cache else f"pre-trained in {ref.info['seconds']:.0f} s"
    say(
        f"  reference policy: tiny Llama, {ref.info['params']:,} parameters, KL(base || reference) "
        f"{ref.info['kl_to_base']:.3f} nats ({how})"
    )

    lap("reference")
    annotator, annotators = _annotator(the_world)
    train = draw_dataset(the_world, "pairwise", steps * batch_size, annotator, seed=seed + 1)
    heldout = draw_dataset(the_world, "pairwise", heldout_pairs, annotator, seed=seed + 2)
    save_dataset(train, out / "train.jsonl")
    save_dataset(heldout, out / "heldout.jsonl")
    say(
        f"  data: {len(train)} training and {len(heldout)} held-out pairs labelled by {annotators} "
        f"-> {out}/train.jsonl, heldout.jsonl"
    )

    settings = dict(
        steps=steps,
        batch_size=batch_size,
        learning_rate=learning_rate,
        seed=seed,
        progress=progress,
        logging_steps=max(1, steps // 20),
        eval_every=max(1, steps // 5),
    )
    truth = TruthCallback(the_world, ref.tokenizer, ref.model, every=max(1, steps // 5), seed=seed)
    lap("data")
    say(f"\n[1/3] training the policy with {loss} ({steps} steps; true reward and KL traced every {truth.every})")
    params = _loss_params(loss, beta)
    policy_trainer = train_policy(
        ref,
        train,
        output_dir=out / "policy",
        loss=loss,
        loss_params=params,
        eval_records=heldout,
        callbacks=[truth],
        **settings,
    )
    policy_trainer.save_model(str(out / "policy"))
    policy_eval_metrics = policy_trainer.evaluate()

    lap("policy")
    say(f"\n[2/3] training a Bradley-Terry reward model on the same pairs ({steps} steps)")
    rm_trainer = train_reward_model(ref, train, output_dir=out / "reward_model", eval_records=heldout, **settings)
    rm_trainer.save_model(str(out / "reward_model"))

    lap("reward_model")
    say("\n[3/3] measuring against the true reward")
    sampling = dict(n_per_prompt=samples_per_prompt, seed=seed + 3, progress=progress)
    before = evaluate_policy(the_world, ref.model, ref.tokenizer, **sampling)
    final = evaluate_policy(
        the_world,
        policy_trainer.model,
        ref.tokenizer,
        reference=ref.model,
        reference_samples=before.samples,
        **sampling,
    )
    pairs = truth_pairs(the_world, heldout_pairs, seed=seed + 4)
    implicit = ImplicitReward(policy_trainer.model, ref.model, beta=params.get("beta", 1.0))

    def implicit_score(items):
        return score_responses(implicit, ref.tokenizer, items, progress=progress)

    def rm_score(items):
        return score_responses(rm_trainer.model, ref.tokenizer, items, progress=progress)

    results = {
        "world": world,
        "seed": seed,
        "loss": loss,
        "loss_params": params,
        "steps": steps,
        "train_pairs": len(train),
        "heldout_pairs": len(heldout),
        "reference": {"info": ref.info, "path": str(ref.path) if ref.path else None, **before.to_dict()},
        "policy": final.to_dict(),
        "true_reward_gain": final.mean_reward - before.mean_reward,
        "true_reward_gain_se": math.hypot(final.reward_se, before.reward_se),
        "implicit_reward": {
            "heldout_label_accuracy": _label_accuracy(implicit_score, heldout),
            "trainer_eval_accuracy": policy_eval_metrics.get("eval_rewards/accuracies"),
            **reward_model_agreement(the_world, implicit_score, pairs),
        },
        "reward_model": {
            "heldout_label_accuracy": _label_accuracy(rm_score, heldout),
            **reward_model_agreement(the_world, rm_score, pairs),
        },
        "trace": truth.history,
    }
    plots = {
        "training_curves": training_curves(
            {f"policy ({loss})": policy_trainer.state.log_history, "reward model (bt)": rm_trainer.state.log_history},
            ["loss", "rewards/accuracies", "rewards/margins"],
            out / "training_curves.png",
            per_run=["rewards/margins"],  # implicit-reward margins and reward-model margins are on other scales
            ylabels={
                f"rewards/margins|policy ({loss})": "implicit margin, β·Δ log-ratio",
                "rewards/margins|reward model (bt)": "r(chosen) − r(rejected)",
            },
        ),
        "reward_vs_kl": reward_vs_kl(
            {
                f"{loss} during training": {
                    "kl": [h["kl"] for h in truth.history],
                    "reward": [h["mean_reward"] for h in truth.history],
                    "reward_se": [h["reward_se"] for h in truth.history],
                    "labels": [f"step {h['step']}" for h in truth.history],
                }
            },
            out / "reward_vs_kl.png",
            reference_reward=before.mean_reward,
        ),
    }
    lap("evaluation")
    results["timings"] = timings
    results["seconds"] = time.perf_counter() - start
    results["plots"] = {k: p.name for k, p in plots.items()}
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    report = write_report(results, the_world, before, final, out)
    _summary(say, results, report)
    return results


def _examples(before, final, n: int = 4) -> list[str]:
    rows = ["| prompt | reference sample | policy sample |", "|---|---|---|"]
    seen = set()
    for a, b in zip(before.samples, final.samples):
        if a.prompt in seen:
            continue
        seen.add(a.prompt)
        rows.append(f"| {a.prompt} | {a.text} | {b.text} |")
        if len(seen) == n:
            break
    return rows


def write_report(results: dict[str, Any], world, before, final, out: Path) -> Path:
    """``out/report.md``: what was run, the ground-truth results, plots, examples and files."""
    r, p, ref = results, results["policy"], results["reference"]
    imp, rm = results["implicit_reward"], results["reward_model"]
    groups = list(world.shares)
    lines = [
        f"# prefkit demo: {r['loss']} in the lab world `{r['world']}` (seed {r['seed']})",
        "",
        f"World: {PRESETS[r['world']][1]}. Its true reward is known (docs/lab.md), so every figure below is "
        "measured against the ground truth, not only against the annotators' labels.",
        "",
        f"- Reference policy: tiny Llama, {ref['info']['params']:,} parameters, pre-trained on the base "
        f"distribution; KL(base || reference) = {ref['info']['kl_to_base']:.3f} nats.",
        f"- Data: {r['train_pairs']} training pairs (one epoch), {r['heldout_pairs']} held-out pairs "
        "(`train.jsonl`, `heldout.jsonl`), labelled by simulated Bradley-Terry annotators (temperature 1).",
        f"- Policy: `{r['loss']}` {r['loss_params']}, {r['steps']} steps against the frozen reference. "
        f"Reward model: Bradley-Terry (`bt`) on the reference's backbone, {r['steps']} steps.",
        "",
        "## Policy against the true reward",
        "",
        f"Samples: {p['n_samples']} per policy, {p['n_samples'] // len(world.prompts)} per prompt.",
        "",
        "| | reference | policy |",
        "|---|---|---|",
        f"| mean true reward (population) | {_fmt(ref['mean_reward'])} ± {_fmt(ref['reward_se'])} | "
        f"{_fmt(p['mean_reward'])} ± {_fmt(p['reward_se'])} |",
        *(
            f"| true reward of group `{g}` | {_fmt(ref['group_rewards'][g])} | {_fmt(p['group_rewards'][g])} |"
            for g in (groups if len(groups) > 1 else [])
        ),
        f"| worst group | `{ref['worst_group']}` {_fmt(ref['worst_group_reward'])} | "
        f"`{p['worst_group']}` {_fmt(p['worst_group_reward'])} |",
        f"| mean length (words) | {_fmt(ref['mean_length'], 2)} | {_fmt(p['mean_length'], 2)} |",
        f"| samples ending with EOS | {_fmt(ref['finished'], 2)} | {_fmt(p['finished'], 2)} |",
        "",
        f"- **True-reward gain: {_fmt(r['true_reward_gain'])} ± {_fmt(r['true_reward_gain_se'])}** (± one SE).",
        f"- KL(policy || reference): {_fmt(p['kl'])} ± {_fmt(p['kl_se'])} nats per response (Monte Carlo on the "
        "policy's samples).",
        f"- Win rate against the reference under the true reward: {_fmt(p['win_rate'])}.",
        "",
        "![true reward against KL](reward_vs_kl.png)",
        "",
        "## Held-out accuracy",
        "",
        "| scorer | agrees with held-out labels | agrees with true preferences | correlation with true reward |",
        "|---|---|---|---|",
        f"| implicit reward of the policy, β(log π − log π_ref) | {_fmt(imp['heldout_label_accuracy'])} | "
        f"{_fmt(imp['agreement'])} | {_fmt(imp['reward_correlation'])} |",
        f"| Bradley-Terry reward model | {_fmt(rm['heldout_label_accuracy'])} | {_fmt(rm['agreement'])} | "
        f"{_fmt(rm['reward_correlation'])} |",
        "",
        "Labels come from noisy (Bradley-Terry) annotators, so even the true reward agrees with them less than 100 %; "
        f"the true-preference column uses {imp['n_pairs']} fresh pairs and the sign of the true preference logit.",
        "",
        "![training curves](training_curves.png)",
        "",
        "## Samples (first sample of a few prompts)",
        "",
        "Prompts and samples are made of the synthetic world's words (its own small vocabulary, with a known "
        "true reward), not English: read them for length and word choice, not for meaning.",
        "",
        *_examples(before, final),
        "",
        "## Files",
        "",
        "- `policy/`, `reward_model/`: the trained models, tokenizer and model card (`from_pretrained`-ready)",
        "- `train.jsonl`, `heldout.jsonl`: the preference pairs (ordinary prefkit pairwise files)",
        "- `results.json`: every figure above, plus the trace of true reward and KL during training",
        "",
        f"Run time: {r['seconds']:.0f} s.",
        "",
    ]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


def _summary(say, r: dict[str, Any], report: Path) -> None:
    p, imp, rm = r["policy"], r["implicit_reward"], r["reward_model"]
    say("")
    say(f"Summary ({r['loss']}, {r['steps']} steps, {r['seconds']:.0f} s):")
    say(
        f"  true reward   reference {r['reference']['mean_reward']:.3f} -> policy {p['mean_reward']:.3f}   "
        f"gain {r['true_reward_gain']:+.3f} ± {r['true_reward_gain_se']:.3f}"
    )
    say(f"  KL to reference {_fmt(p['kl'])} nats   win rate vs reference {_fmt(p['win_rate'])}")
    say(
        f"  held-out accuracy vs true preferences: implicit reward {_fmt(imp['agreement'])}, "
        f"reward model {_fmt(rm['agreement'])}"
    )
    say("")
    say(f"Report: {report}   (plots and results.json beside it)")
    say("Next:")
    say(f"  prefkit demo --loss robust_dpo --world {r['world']}   # another loss in the same world")
    say("  prefkit demo --world groups                          # two user groups: who does the policy serve?")
    say("  prefkit lab study losses                              # every pairwise loss on one world")
    say(f"  prefkit eval rm --model {report.parent}/reward_model --data {report.parent}/heldout.jsonl")


def run(args: argparse.Namespace) -> int:
    problem = _check(args.loss, args.steps, args.beta, args.world)
    if problem:
        print(f"prefkit demo: error: {problem}", file=sys.stderr)
        return 2
    run_demo(
        args.output_dir,
        world=args.world,
        loss=args.loss,
        steps=args.steps,
        seed=args.seed,
        beta=args.beta,
        learning_rate=args.learning_rate,
        cache_dir=args.cache_dir,
        progress=not args.quiet,
    )
    return 0
