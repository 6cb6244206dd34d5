"""``prefkit lab study rlhf``: PPO against GRPO against online DPO, optimising a proxy reward model.

On the preference world ``default`` (true reward known), ``proxies`` Bradley-Terry reward models are each
learned from ``proxy_pairs`` Bradley-Terry pairs of their own draw (as the ``overopt`` study's proxy). Each
method trains a copy of the world's reference policy on a proxy reward — a single proxy, the mean of the
ensemble, or its minimum (the conservative ensemble of Coste et al. 2024, "Reward Model Ensembles Help
Mitigate Overoptimization", arXiv:2310.02743) — with the same prompts, completions per step, steps and
learning rate:

- ``ppo``: `PPOTrainer` (critic from the policy's backbone, GAE, per-token KL penalty 0.05, 2 samples per
  prompt);
- ``grpo``: `OnlineTrainer` with the ``grpo`` loss and group-normalised advantages (G = 4, no KL term);
- ``online_dpo``: `OnlinePreferenceTrainer` with ``dpo`` (beta 0.1) on the best and worst of 4 samples.

Every ``eval_every`` steps the policy's samples are scored by the true reward and by the proxy it trains on,
and its KL to the reference is estimated: true and proxy reward against KL, the RL form of Gao et al.'s
over-optimisation curve, mean ± SE over seeds.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from prefkit.lab.online_study import _args, _se, _train_online, proxy_reward_model, world_evaluator

__all__ = ["METHODS", "PROXIES", "rlhf_study"]

METHODS = ("ppo", "grpo", "online_dpo")
PROXIES = ("single", "mean", "min")


def _method(name: str) -> tuple[Any, Any, dict[str, Any], int]:
    """``(arguments class, trainer class, method settings, samples per prompt)``."""
    from prefkit.online.ppo import PPOArguments, PPOTrainer
    from prefkit.online.preference import OnlinePreferenceArguments, OnlinePreferenceTrainer
    from prefkit.online.trainer import OnlineArguments, OnlineTrainer

    if name == "ppo":
        return PPOArguments, PPOTrainer, {"kl_reward_coef": 0.05}, 2
    if name == "grpo":
        return OnlineArguments, OnlineTrainer, {"loss": "grpo", "advantage": "grpo"}, 4
    if name == "online_dpo":
        return OnlinePreferenceArguments, OnlinePreferenceTrainer, {"loss": "dpo", "loss_params": {"beta": 0.1}}, 4
    raise ValueError(f"unknown method {name!r}; expected one of {', '.join(METHODS)}")


def _combine(scorers, how: str):
    if how == "single":
        return scorers[0]

    def combined(items):
        stacked = np.stack([s(items) for s in scorers])
        return stacked.mean(0) if how == "mean" else stacked.min(0)

    return combined


def rlhf_study(
    *,
    methods: Sequence[str] = METHODS,
    proxies: Sequence[str] = PROXIES,
    seeds: Sequence[int] = (0, 1, 2),
    steps: int = 40,
    completions_per_step: int = 16,
    learning_rate: float = 3e-4,
    eval_every: int = 10,
    proxy_pairs: int = 300,
    ensemble: int = 3,
    output_dir: str | Path = "runs/lab/rlhf",
    cache_dir=None,
    progress: bool = True,
    world_spec=None,
) -> dict[str, Any]:
    """The study (module docstring); writes ``results.json``, ``results.md`` and ``rlhf.png``."""
    from prefkit.lab.evaluate import reward_model_agreement, truth_pairs
    from prefkit.lab.policy import ReferenceSpec, reference_policy
    from prefkit.lab.world import make_world
    from prefkit.online.rewards import CombinedReward

    for name in methods:
        _method(name)
    unknown = [p for p in proxies if p not in PROXIES]
    if unknown:
        raise ValueError(f"unknown proxy kind(s) {unknown}; expected some of {', '.join(PROXIES)}")
    if not seeds:
        raise ValueError("name at least one seed")
    start = time.perf_counter()
    say = print if progress else (lambda *a, **k: None)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    world = make_world("default", 0)
    reference = reference_policy(world, 0, spec=world_spec or ReferenceSpec(), cache_dir=cache_dir, progress=progress)
    scorers = [proxy_reward_model(world, reference, proxy_pairs, seed=1 + i) for i in range(ensemble)]
    heldout = truth_pairs(world, 500, seed=99)
    agreements = {how: reward_model_agreement(world, _combine(scorers, how), heldout)["agreement"] for how in PROXIES}
    say(
        "rlhf study: proxy agreement with the true preferences "
        + ", ".join(f"{k} {v:.3f}" for k, v in agreements.items())
    )
    runs = []
    for how in proxies:
        proxy = _combine(scorers, how)
        evaluate = world_evaluator(world, reference, proxy)

        def reward(prompts, completions, _proxy=proxy, **fields):
            return [float(x) for x in _proxy(list(zip(prompts, completions)))]

        for seed in seeds:
            for name in methods:
                args_class, trainer_class, settings, k = _method(name)
                prompts = max(1, completions_per_step // k)
                rng = np.random.default_rng([seed, 21])
                train = [{"prompt": p} for p in rng.choice(list(world.prompts), size=steps * prompts).tolist()]
                t0 = time.perf_counter()
                with tempfile.TemporaryDirectory() as tmp:
                    args = _args(
                        tmp,
                        steps=steps,
                        prompts=prompts,
                        generations=k,
                        max_new_tokens=3 * world.max_len,
                        lr=learning_rate,
                        seed=seed,
                        args_class=args_class,
                        **settings,
                    )
                    points = _train_online(
                        reference,
                        train,
                        CombinedReward([("proxy", reward, 1.0)]),
                        args,
                        evaluate,
                        eval_every,
                        trainer_class=trainer_class,
                    )
                runs.append(
                    {"method": name, "proxy": how, "seed": seed, "points": points, "seconds": time.perf_counter() - t0}
                )
                last = points[-1]
                say(
                    f"  {how} proxy, seed {seed}, {name}: true {points[0]['true']:.3f} -> {last['true']:.3f}, proxy "
                    f"{points[0]['proxy']:.3f} -> {last['proxy']:.3f}, KL {last['kl']:.2f} "
                    f"({runs[-1]['seconds']:.0f} s)"
                )
    results = {
        "study": "rlhf",
        "methods": list(methods),
        "proxies": list(proxies),
        "seeds": list(seeds),
        "steps": steps,
        "completions_per_step": completions_per_step,
        "learning_rate": learning_rate,
        "proxy_pairs": proxy_pairs,
        "ensemble": ensemble,
        "agreement": agreements,
        "runs": runs,
        "seconds": time.perf_counter() - start,
    }
    _plot(results, out)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text("\n".join(_markdown(results)) + "\n")
    say(f"  wrote {out}/results.md, results.json, rlhf.png ({results['seconds']:.0f} s)")
    return results


def _mean_curve(runs: list[dict], metric: str) -> tuple[np.ndarray, np.ndarray]:
    values = np.array([[p[metric] for p in r["points"]] for r in runs])
    se = np.array([_se(values[:, i]) for i in range(values.shape[1])])
    return values.mean(0), np.nan_to_num(se)


def _plot(r: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(r["proxies"]), figsize=(5.2 * len(r["proxies"]), 4.2), squeeze=False)
    for ax, how in zip(axes[0], r["proxies"]):
        for name in r["methods"]:
            these = [x for x in r["runs"] if x["proxy"] == how and x["method"] == name]
            kl, _ = _mean_curve(these, "kl")
            true, se = _mean_curve(these, "true")
            line = ax.plot(kl, true, marker=".", label=f"{name}: true")[0]
            ax.fill_between(kl, true - se, true + se, color=line.get_color(), alpha=0.15)
            proxy, _ = _mean_curve(these, "proxy")
            ax.plot(kl, proxy, "--", color=line.get_color(), label=f"{name}: proxy")
        ax.set(xlabel="KL(policy || reference), nats", ylabel="mean reward", title=f"{how} proxy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "rlhf.png", dpi=110)
    plt.close(fig)


def _markdown(r: dict[str, Any]) -> list[str]:
    lines = [
        "# PPO, GRPO and online DPO on a proxy reward model (lab world `default`)",
        "",
        f"Proxies: {r['ensemble']} Bradley-Terry reward models, each from {r['proxy_pairs']} pairs of its own; "
        "agreement with the true preferences on 500 fresh pairs: "
        + ", ".join(f"{k} {v:.3f}" for k, v in r["agreement"].items())
        + f". Each run: {r['steps']} steps of {r['completions_per_step']} completions, learning rate "
        f"{r['learning_rate']:g}; seeds {r['seeds']}. Mean ± SE over seeds at the last evaluation.",
        "",
        "| proxy | method | KL (nats) | true reward | proxy reward | true-reward peak (step) |",
        "|---|---|---|---|---|---|",
    ]
    summary = []
    for how in r["proxies"]:
        for name in r["methods"]:
            these = [x for x in r["runs"] if x["proxy"] == how and x["method"] == name]
            kl, kl_se = _mean_curve(these, "kl")
            true, true_se = _mean_curve(these, "true")
            proxy, proxy_se = _mean_curve(these, "proxy")
            steps = [p["step"] for p in these[0]["points"]]
            peak = int(true.argmax())
            lines.append(
                f"| {how} | {name} | {kl[-1]:.2f} ± {kl_se[-1]:.2f} | {true[-1]:.3f} ± {true_se[-1]:.3f} | "
                f"{proxy[-1]:.3f} ± {proxy_se[-1]:.3f} | {true[peak]:.3f} ({steps[peak]}) |"
            )
            if peak < len(true) - 1 and true[-1] < true[peak] - 2 * max(true_se[-1], 1e-9):
                summary.append(
                    f"{name} on the {how} proxy: the true reward peaks at step {steps[peak]} and falls after."
                )
    lines += ["", "![true (solid) and proxy (dashed) reward against KL, per proxy](rlhf.png)", ""]
    if summary:
        lines += ["Over-optimisation seen: " + " ".join(summary)]
    else:
        lines += [
            "No method's true reward turns down (by more than two standard errors) within this budget: the "
            "over-optimisation Gao et al. describe does not appear here, so whether the ensembles mitigate it "
            "cannot be judged from these runs."
        ]
    lines += ["", f"{r['seconds']:.0f} s in all."]
    return lines
