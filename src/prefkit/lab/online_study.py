"""``prefkit lab study online``: the GRPO family on a verifiable world, and RL over-optimisation of a proxy.

Part 1, methods (`prefkit.lab.reasoning.ArithmeticWorld`): GRPO, Dr. GRPO, DAPO, RLOO and REINFORCE++
train the imperfect arithmetic reference policy on the final-answer reward with `OnlineTrainer`, the same
prompts, G and learning rate for each, over several seeds. Every ``eval_every`` steps the policy is sampled
(temperature 1, fixed seed) on held-out problems: accuracy against the number of completions generated so
far, with the share of steps that are correct. What each method is here:

- ``grpo``: ``grpo`` loss (per-sequence mean), group-normalised advantages (Shao et al. 2024);
- ``dr_grpo``: ``dr_grpo`` loss (constant normaliser), advantages without the std (Liu et al. 2025);
- ``dapo``: ``dapo`` loss (token-level mean, clip range 0.2 / 0.28), group-normalised advantages, dynamic
  sampling (groups with equal rewards leave the loss; Yu et al. 2025);
- ``rloo``: leave-one-out advantages (Ahmadian et al. 2024) with the ``grpo`` loss;
- ``reinforce_pp``: batch-normalised advantages and the KL to the reference as a reward term with
  coefficient 0.01 (Hu 2025) with the ``grpo`` loss.

Part 2, over-optimisation (the preference world ``default``): GRPO trained on (a) the world's true reward and
(b) a proxy reward model learned from few Bradley-Terry pairs (as in ``prefkit lab study overopt``); every
``eval_every`` steps, the true and the proxy reward of the policy's samples and its KL to the reference
(Monte-Carlo, summed over the completion) — the RL form of Gao et al.'s curve.
"""

from __future__ import annotations

import contextlib
import io
import math
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["METHODS", "online_study"]

METHODS: dict[str, dict[str, Any]] = {
    "grpo": {"loss": "grpo", "advantage": "grpo"},
    "dr_grpo": {"loss": "dr_grpo", "advantage": "dr_grpo"},
    "dapo": {
        "loss": "dapo",
        "loss_params": {"epsilon_low": 0.2, "epsilon_high": 0.28},
        "advantage": "grpo",
        "dynamic_sampling": True,
    },
    "rloo": {"loss": "grpo", "advantage": "rloo"},
    "reinforce_pp": {"loss": "grpo", "advantage": "reinforce_pp", "kl_reward_coef": 0.01},
}


def _se(values: Sequence[float]) -> float:
    values = np.asarray(values, dtype=float)
    return float(values.std(ddof=1) / math.sqrt(len(values))) if len(values) > 1 else float("nan")


def _args(
    output_dir: str,
    *,
    steps: int,
    prompts: int,
    generations: int,
    max_new_tokens: int,
    lr: float,
    seed: int,
    args_class=None,
    **method,
):
    from prefkit.online.trainer import OnlineArguments

    return (args_class or OnlineArguments)(
        output_dir=output_dir,
        max_steps=steps,
        per_device_train_batch_size=prompts,
        num_generations=generations,
        max_new_tokens=max_new_tokens,
        learning_rate=lr,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        dataloader_pin_memory=False,
        seed=seed,
        data_seed=seed,
        **method,
    )


def _evaluator(every: int, evaluate: Callable[[Any, int], dict[str, float]]):
    """A callback that evaluates the policy before training and every ``every`` steps; ``points`` holds the
    results, each with its ``step``."""
    from transformers import TrainerCallback

    class Every(TrainerCallback):
        points: list[dict[str, float]] = []

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            self.points = [{"step": 0, **evaluate(model, 0)}]

        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step % every == 0 or state.global_step == state.max_steps:
                self.points.append({"step": state.global_step, **evaluate(model, state.global_step)})

    return Every()


def _train_online(reference, records, rewards, args, evaluate, every: int, ref_model=None, trainer_class=None):
    """Train a copy of the reference with ``trainer_class`` (default `OnlineTrainer`); the evaluation points."""
    import copy

    from prefkit.online.trainer import OnlineTrainer

    model = copy.deepcopy(reference.model).requires_grad_(True)
    callback = _evaluator(every, evaluate)
    with contextlib.redirect_stdout(io.StringIO()):
        trainer = (trainer_class or OnlineTrainer)(
            model,
            args,
            train_dataset=records,
            processing_class=reference.tokenizer,
            rewards=rewards,
            ref_model=ref_model,
            callbacks=[callback],
        )
        trainer.train()
    return callback.points


# ----- part 1: the methods on the arithmetic world -----


def _arithmetic_eval(world, tokenizer, problems: list[str], n: int, seed: int):
    from prefkit.online.rollouts import HFRollouts, SamplingSettings

    ids = [list(tokenizer(p)["input_ids"]) for p in problems]

    def evaluate(model, step: int) -> dict[str, float]:
        out = HFRollouts(model, tokenizer, batch_size=512).generate(
            ids, SamplingSettings(n=n, max_new_tokens=world.max_len + 1, seed=seed)
        )
        texts = [(problems[r.prompt_index], r.text) for r in out]
        steps = [label for p, t in texts for label in world.step_labels(p, t)]
        return {
            "accuracy": float(np.mean([world.is_correct(p, t) for p, t in texts])),
            "step_accuracy": float(np.mean(steps)) if steps else 0.0,
        }

    return evaluate


def methods_part(
    methods: Sequence[str],
    seeds: Sequence[int],
    *,
    steps: int,
    prompts: int,
    generations: int,
    learning_rate: float,
    eval_every: int,
    eval_problems: int,
    cache_dir,
    say,
    progress: bool,
    spec=None,
) -> dict[str, Any]:
    from prefkit.lab.reasoning import ARITHMETIC_SPEC, ArithmeticWorld, arithmetic_reference
    from prefkit.online.rewards import CombinedReward

    world = ArithmeticWorld()
    reference = arithmetic_reference(world, 0, spec=spec or ARITHMETIC_SPEC, cache_dir=cache_dir, progress=progress)
    info = reference.info
    say(
        f"  arithmetic reference: {info['params']:,} parameters, greedy accuracy {info['greedy_accuracy']:.3f} "
        f"(its noisy pre-training solutions: {info['data_accuracy']:.3f})"
    )
    problems = world.sample_problems(eval_problems, np.random.default_rng(999))
    evaluate = _arithmetic_eval(world, reference.tokenizer, problems, 4, seed=4242)
    rewards = CombinedReward([("answer", world.reward, 1.0)])
    runs = []
    for seed in seeds:
        train = [{"prompt": p} for p in world.sample_problems(steps * prompts, np.random.default_rng([seed, 5]))]
        for name in methods:
            start = time.perf_counter()
            with tempfile.TemporaryDirectory() as tmp:
                args = _args(
                    tmp,
                    steps=steps,
                    prompts=prompts,
                    generations=generations,
                    max_new_tokens=world.max_len + 1,
                    lr=learning_rate,
                    seed=seed,
                    **METHODS[name],
                )
                points = _train_online(reference, train, rewards, args, evaluate, eval_every)
            runs.append({"method": name, "seed": seed, "points": points, "seconds": time.perf_counter() - start})
            say(
                f"  seed {seed} {name}: accuracy {points[0]['accuracy']:.3f} -> {points[-1]['accuracy']:.3f} "
                f"({runs[-1]['seconds']:.0f} s)"
            )
    return {"reference": info, "runs": runs, "eval_problems": eval_problems, "samples_per_problem": 4}


# ----- part 2: true against proxy reward on the preference world -----


def proxy_reward_model(world, reference, pairs: int, seed: int):
    """A Bradley-Terry reward model on the reference's backbone from ``pairs`` Bradley-Terry (temperature 1)
    pairs drawn with ``seed`` (100 steps of 32, as the ``overopt`` study's proxy); its scorer,
    ``items -> [N] scores`` of ``(prompt, response)`` items."""
    from prefkit.lab import BradleyTerry, draw_dataset
    from prefkit.lab.evaluate import score_responses
    from prefkit.lab.runs import train_reward_model
    from prefkit.lab.studies import _trainable

    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()):
        data = draw_dataset(world, "pairwise", pairs, BradleyTerry(1.0), seed=seed)
        rm = train_reward_model(
            _trainable(reference),
            data,
            output_dir=tmp,
            steps=100,
            batch_size=32,
            learning_rate=1e-3,
            seed=0,
            progress=False,
        ).model

    def scores(items):
        return score_responses(rm, reference.tokenizer, items, batch_size=256, progress=False)

    return scores


def world_evaluator(world, reference, proxy_scores):
    """``evaluate(model, step)``: 16 samples (seed 777) of every prompt of ``world``; their mean true reward,
    mean proxy reward and the KL to the reference (the mean summed log-ratio)."""
    from prefkit.online.sampling import completion_log_probs, sample_completions

    tok = reference.tokenizer
    pad = tok.pad_token_id

    def evaluate(model, step: int) -> dict[str, float]:
        samples = sample_completions(
            model, tok, list(world.prompts), n=16, max_new_tokens=3 * world.max_len, seed=777, progress=False
        )
        items = [(c.prompt, c.text) for c in samples]
        log_ratio = completion_log_probs(model, samples, pad, progress=False) - completion_log_probs(
            reference.model, samples, pad, progress=False
        )
        return {
            "true": float(np.mean([world.true_reward(p, t) for p, t in items])),
            "proxy": float(np.mean(proxy_scores(items))),
            "kl": float(log_ratio.mean()),
        }

    return evaluate


def overopt_part(
    seeds: Sequence[int],
    *,
    steps: int,
    prompts: int,
    generations: int,
    learning_rate: float,
    eval_every: int,
    proxy_pairs: int,
    cache_dir,
    say,
    progress: bool,
    spec=None,
) -> dict[str, Any]:
    from prefkit.lab.evaluate import reward_model_agreement, truth_pairs
    from prefkit.lab.policy import ReferenceSpec, reference_policy
    from prefkit.lab.world import make_world
    from prefkit.online.rewards import CombinedReward

    world = make_world("default", 0)
    reference = reference_policy(world, 0, spec=spec or ReferenceSpec(), cache_dir=cache_dir, progress=progress)
    proxy_scores = proxy_reward_model(world, reference, proxy_pairs, seed=1)

    agreement = reward_model_agreement(world, proxy_scores, truth_pairs(world, 500, seed=2))["agreement"]
    say(f"  proxy reward model: {proxy_pairs} pairs, agreement with the true preferences {agreement:.3f}")
    evaluate = world_evaluator(world, reference, proxy_scores)

    def true_reward(prompts_, completions, **fields):
        return [world.true_reward(p, c) for p, c in zip(prompts_, completions)]

    def proxy_reward(prompts_, completions, **fields):
        return [float(x) for x in proxy_scores(list(zip(prompts_, completions)))]

    runs = []
    for seed in seeds:
        rng = np.random.default_rng([seed, 9])
        train = [{"prompt": p} for p in rng.choice(list(world.prompts), size=steps * prompts).tolist()]
        for target, fn in (("true", true_reward), ("proxy", proxy_reward)):
            start = time.perf_counter()
            with tempfile.TemporaryDirectory() as tmp:
                args = _args(
                    tmp,
                    steps=steps,
                    prompts=prompts,
                    generations=generations,
                    max_new_tokens=3 * world.max_len,
                    lr=learning_rate,
                    seed=seed,
                    loss="grpo",
                    advantage="grpo",
                )
                points = _train_online(
                    reference, train, CombinedReward([(target, fn, 1.0)]), args, evaluate, eval_every
                )
            runs.append({"trained_on": target, "seed": seed, "points": points, "seconds": time.perf_counter() - start})
            last = points[-1]
            say(
                f"  seed {seed} GRPO on the {target} reward: true {points[0]['true']:.3f} -> {last['true']:.3f}, "
                f"proxy {points[0]['proxy']:.3f} -> {last['proxy']:.3f}, KL {last['kl']:.2f} "
                f"({runs[-1]['seconds']:.0f} s)"
            )
    return {"proxy_pairs": proxy_pairs, "proxy_agreement": agreement, "runs": runs}


# ----- summaries, plots, report -----


def _curves(runs: list[dict], key_of: str, names: Sequence[str], metric: str) -> dict[str, dict[str, list[float]]]:
    """Per name: the evaluation steps and mean / SE of ``metric`` over seeds."""
    out = {}
    for name in names:
        these = [r["points"] for r in runs if r[key_of] == name]
        steps = [p["step"] for p in these[0]]
        values = np.array([[p[metric] for p in pts] for pts in these])
        out[name] = {
            "step": steps,
            "mean": values.mean(0).tolist(),
            "se": [_se(values[:, i]) for i in range(values.shape[1])],
        }
    return out


def _plot(results: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = results["methods"]
    per_step = results["prompts"] * results["generations"]
    fig, axes = plt.subplots(1, 3 if "overopt" in results else 2, figsize=(15, 4.2), squeeze=False)
    for ax, metric, label in (
        (axes[0][0], "accuracy", "answer accuracy (held-out, T = 1)"),
        (axes[0][1], "step_accuracy", "share of correct steps"),
    ):
        for name, c in _curves(m["runs"], "method", results["method_names"], metric).items():
            x = np.array(c["step"]) * per_step
            y, se = np.array(c["mean"]), np.nan_to_num(np.array(c["se"]))
            ax.plot(x, y, marker=".", label=name)
            ax.fill_between(x, y - se, y + se, alpha=0.2)
        ax.set(xlabel="completions generated", ylabel=label, title=f"arithmetic world: {label}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if "overopt" in results:
        ax = axes[0][2]
        o = results["overopt"]
        for target, style in (("true", "-"), ("proxy", "--")):
            these = [r["points"] for r in o["runs"] if r["trained_on"] == target]
            kl = np.array([[p["kl"] for p in pts] for pts in these]).mean(0)
            for metric, color in (("true", "tab:green"), ("proxy", "tab:orange")):
                y = np.array([[p[metric] for p in pts] for pts in these]).mean(0)
                ax.plot(kl, y, style, marker=".", color=color, label=f"{metric} reward, trained on {target}")
        ax.set(xlabel="KL(policy || reference), nats", ylabel="mean reward", title="GRPO on a proxy RM: true vs proxy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "online.png", dpi=110)
    plt.close(fig)


def _markdown(r: dict[str, Any]) -> list[str]:
    m = r["methods"]
    per_step = r["prompts"] * r["generations"]
    ref = m["reference"]
    acc = _curves(m["runs"], "method", r["method_names"], "accuracy")
    steps_acc = _curves(m["runs"], "method", r["method_names"], "step_accuracy")
    lines = [
        "# Online RL in the lab",
        "",
        "## The GRPO family on the arithmetic world",
        "",
        f"Reference: {ref['params']:,} parameters, pre-trained on noisy solutions (greedy accuracy "
        f"{ref['greedy_accuracy']:.3f}; the pre-training solutions are right {ref['data_accuracy']:.3f} of the time). "
        f"Each method trains {r['steps']} steps of {r['prompts']} problems x G = {r['generations']} completions "
        f"(learning rate {r['learning_rate']:g}, AdamW, constant), seeds {r['seeds']}; accuracy: "
        f"{m['samples_per_problem']} samples (temperature 1) of each of {m['eval_problems']} held-out problems. "
        "Mean ± standard error over seeds.",
        "",
        "| method | accuracy at start | accuracy at the end | correct steps at the end | completions generated |",
        "|---|---|---|---|---|",
    ]
    for name in r["method_names"]:
        a, s = acc[name], steps_acc[name]
        lines.append(
            f"| {name} | {a['mean'][0]:.3f} | {a['mean'][-1]:.3f} ± {a['se'][-1]:.3f} | "
            f"{s['mean'][-1]:.3f} ± {s['se'][-1]:.3f} | {a['step'][-1] * per_step:,} |"
        )
    best = max(r["method_names"], key=lambda n: acc[n]["mean"][-1])
    worst = min(r["method_names"], key=lambda n: acc[n]["mean"][-1])
    gap = acc[best]["mean"][-1] - acc[worst]["mean"][-1]
    noise = 2 * math.hypot(acc[best]["se"][-1] or 0.0, acc[worst]["se"][-1] or 0.0)
    lines += [
        "",
        f"Best at the end: {best}; worst: {worst}; their gap ({gap:.3f}) is "
        + ("larger" if gap > noise else "not larger")
        + f" than two standard errors of the difference ({noise:.3f}).",
    ]
    if "overopt" in r:
        o = r["overopt"]
        lines += [
            "",
            "## True against proxy reward (RL over-optimisation)",
            "",
            f"World `default`; proxy: a Bradley-Terry reward model on the reference's backbone from {o['proxy_pairs']} "
            f"pairs (agreement with the true preferences {o['proxy_agreement']:.3f}). GRPO (beta 0) on the true reward "
            "and on the proxy; every evaluation samples 16 completions of every prompt. Means over seeds "
            f"{r['seeds']}.",
            "",
            "| trained on | step | KL (nats) | true reward | proxy reward |",
            "|---|---|---|---|---|",
        ]
        for target in ("true", "proxy"):
            these = [x["points"] for x in o["runs"] if x["trained_on"] == target]
            for i, point in enumerate(these[0]):
                vals = {k: np.mean([pts[i][k] for pts in these]) for k in ("kl", "true", "proxy")}
                ses = {k: _se([pts[i][k] for pts in these]) for k in ("kl", "true", "proxy")}
                lines.append(
                    f"| {target} | {point['step']} | {vals['kl']:.2f} ± {ses['kl']:.2f} | "
                    f"{vals['true']:.3f} ± {ses['true']:.3f} | {vals['proxy']:.3f} ± {ses['proxy']:.3f} |"
                )
        proxy_runs = [x["points"] for x in o["runs"] if x["trained_on"] == "proxy"]
        true_curve = np.mean([[p["true"] for p in pts] for pts in proxy_runs], axis=0)
        peak = int(true_curve.argmax())
        if peak < len(true_curve) - 1 and true_curve[-1] < true_curve[peak]:
            lines += [
                "",
                f"Trained on the proxy, the true reward peaks at step {proxy_runs[0][peak]['step']} "
                f"({true_curve[peak]:.3f}) and then falls to {true_curve[-1]:.3f} while the proxy reward keeps "
                "its course: over-optimisation, as Gao et al. describe.",
            ]
        else:
            lines += [
                "",
                "Trained on the proxy, the true reward did not turn down within this KL: the over-optimisation peak "
                "Gao et al. report does not appear at this budget.",
            ]
    lines += ["", "![accuracy against completions; true and proxy reward against KL](online.png)", ""]
    lines.append(f"{r['seconds']:.0f} s in all.")
    return lines


def online_study(
    *,
    methods: Sequence[str] = tuple(METHODS),
    seeds: Sequence[int] = (0, 1, 2),
    steps: int = 60,
    prompts: int = 8,
    generations: int = 8,
    learning_rate: float = 1e-4,
    eval_every: int = 10,
    eval_problems: int = 128,
    overopt: bool = True,
    overopt_steps: int = 60,
    overopt_learning_rate: float = 3e-4,
    proxy_pairs: int = 300,
    output_dir: str | Path = "runs/lab/online",
    cache_dir=None,
    progress: bool = True,
    arithmetic_spec=None,
    world_spec=None,
) -> dict[str, Any]:
    """Both parts (module docstring); writes ``results.json``, ``results.md`` and ``online.png`` into
    ``output_dir``; returns the results. ``arithmetic_spec`` / ``world_spec``: `ReferenceSpec` of the two
    reference policies (None: their defaults; tests pass smaller ones)."""
    import json

    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; expected some of {', '.join(METHODS)}")
    for key, value in (("steps", steps), ("prompts", prompts), ("eval_every", eval_every)):
        if value < 1:
            raise ValueError(f"{key} must be at least 1, got {value}")
    if generations < 2:
        raise ValueError(f"generations must be at least 2 (group advantages), got {generations}")
    if not seeds:
        raise ValueError("name at least one seed")
    start = time.perf_counter()
    say = print if progress else (lambda *a, **k: None)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    say(f"online study: {', '.join(methods)} on the arithmetic world, seeds {list(seeds)}")
    common = dict(
        prompts=prompts, generations=generations, eval_every=eval_every, cache_dir=cache_dir, say=say, progress=progress
    )
    results: dict[str, Any] = {
        "study": "online",
        "method_names": list(methods),
        "seeds": list(seeds),
        "steps": steps,
        "prompts": prompts,
        "generations": generations,
        "learning_rate": learning_rate,
        "methods": methods_part(
            methods,
            seeds,
            steps=steps,
            learning_rate=learning_rate,
            eval_problems=eval_problems,
            spec=arithmetic_spec,
            **common,
        ),
    }
    if overopt:
        say("online study: GRPO on the true reward and on a proxy reward model, world 'default'")
        results["overopt"] = overopt_part(
            seeds,
            steps=overopt_steps,
            learning_rate=overopt_learning_rate,
            proxy_pairs=proxy_pairs,
            spec=world_spec,
            **common,
        )
    results["seconds"] = time.perf_counter() - start
    _plot(results, out)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text("\n".join(_markdown(results)) + "\n")
    say(f"  wrote {out}/results.md, results.json, online.png ({results['seconds']:.0f} s)")
    return results
