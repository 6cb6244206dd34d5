"""Listwise against pairwise on the same ranked lists (`prefkit lab study lists`).

The question of LiPO (Liu et al. 2024) and of the listwise objectives it compares: given K ranked responses per
prompt, is a listwise loss better than DPO on pairs cut from the lists? Every method sees the same lists in the
same number of steps; only the loss and how a list becomes training examples differ:

- ``pl_dpo``, ``pro``, ``lipo``: the lists as they are (`ListPreferenceTrainer`);
- ``dpo_all_pairs``: DPO on all K(K-1)/2 pairs of each list (LiPO's pairwise baseline);
- ``dpo_best_pairs``: DPO on the best response against each other one (Curry-DPO's pairs, K-1 per list).

Lists come from the world's Plackett-Luce annotator (a ranking, no scores: ``lipo``'s labels are then each
response's share of the list it beats, ``pro`` runs without its dynamic temperature). Measured against the true
reward: gain over the reference, KL, agreement of the implicit reward with the true preferences, and the true reward
at matched KL (each run's (KL, reward) path read at ``kl_budgets``, as the noise study does); mean ± standard error
over seeds (each its own lists and training seed).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from prefkit.lab.studies import (
    OWN_BETA,
    _add_matched_kl,
    _at_kl,
    _check_positive,
    _check_seeds,
    _ending,
    _fmt,
    _matched_kl_table,
    _over_seeds,
    _pm,
    _reference_eval,
    _run_figures,
    _setup,
    _train_and_evaluate,
    _truth_path,
    _write,
)

__all__ = ["METHODS", "list_study"]

# method -> (loss, how a ranked list becomes training examples: None = as a list, or ranked_to_pairwise's mode)
METHODS: dict[str, tuple[str, str | None]] = {
    "pl_dpo": ("pl_dpo", None),
    "pro": ("pro", None),
    "lipo": ("lipo", None),
    "dpo_all_pairs": ("dpo", "all"),
    "dpo_best_pairs": ("dpo", "best"),
}


def list_study(
    world: str = "default",
    methods: Sequence[str] = tuple(METHODS),
    seeds: Sequence[int] = (0, 1, 2),
    *,
    k: int = 4,
    lists_per_step: int = 8,
    steps: int = 200,
    learning_rate: float = 5e-4,
    beta: float = 0.1,
    seed: int = 0,
    heldout_pairs: int = 500,
    samples_per_prompt: int = 16,
    kl_budgets: Sequence[float] = (0.5, 1.0, 2.0),
    eval_every: int = 10,
    output_dir: str | Path = "runs/lab/lists",
    spec=None,
    cache_dir=None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train each method in ``methods`` (`METHODS`) once per seed on ``steps * lists_per_step`` ranked lists of
    ``k`` responses (data seed ``seed + 1 + 100 s``), ``lists_per_step`` lists per step (the pair methods: all the
    pairs those lists give per step), and measure it against the true reward. Losses taking DPO's beta share
    ``beta``; ``pro`` keeps its defaults (reference-free, no beta)."""
    from prefkit.data.convert import ranked_to_pairwise
    from prefkit.lab import draw_dataset
    from prefkit.lab.evaluate import truth_pairs
    from prefkit.lab.plots import labelled_scatter

    unknown = [m for m in methods if m not in METHODS]
    if not methods or unknown:
        raise ValueError(f"unknown method(s) {unknown}; expected some of {', '.join(METHODS)}")
    _check_positive(
        k=k,
        lists_per_step=lists_per_step,
        steps=steps,
        heldout_pairs=heldout_pairs,
        samples_per_prompt=samples_per_prompt,
    )
    if k < 2:
        raise ValueError(f"k must be at least 2, got {k}")
    seeds = _check_seeds(seeds)
    start = time.perf_counter()
    setup = _setup(world, seed, output_dir, spec, cache_dir, progress, "listwise against pairwise")
    say = setup.say
    n_lists = steps * lists_per_step
    lists = {s: draw_dataset(setup.world, "ranked", n_lists, seed=seed + 1 + 100 * s, k=k) for s in seeds}
    pairs = truth_pairs(setup.world, heldout_pairs, seed=seed + 2)
    before = _reference_eval(setup, samples_per_prompt, seed + 3)
    path_start = _reference_eval(setup, 8, seed + 4)  # step 0 of every run's (KL, true reward) path
    say(f"  {n_lists} lists of {k} per seed, seeds {seeds}; reference true reward {before.mean_reward:.3f}")
    per_list = {None: 1, "all": k * (k - 1) // 2, "best": k - 1}
    rows = []
    for i, method in enumerate(methods, 1):
        loss, mode = METHODS[method]
        params = {} if loss in OWN_BETA or loss == "pro" else {"beta": beta}
        runs = []
        for s in seeds:
            records = lists[s] if mode is None else ranked_to_pairwise(lists[s], mode=mode)
            truth = _truth_path(setup, eval_every, seed + 4, path_start)
            ev, agreement, seconds = _train_and_evaluate(
                setup,
                records,
                pairs,
                loss=loss,
                params=params,
                seed=s,
                steps=steps,
                batch_size=lists_per_step * per_list[mode],
                learning_rate=learning_rate,
                n_per_prompt=samples_per_prompt,
                eval_seed=seed + 3,
                callbacks=[truth],
            )
            path = truth.path()
            runs.append(
                {
                    **_run_figures(s, ev, agreement, seconds),
                    "examples": len(records),
                    "at_kl": _at_kl(path, kl_budgets),
                    "path": path,
                }
            )
        row = {"method": method, "loss": loss, "params": params, **_over_seeds(runs, before), "runs": runs}
        _add_matched_kl(row, runs, kl_budgets)
        rows.append(row)
        say(
            f"  [{i}/{len(methods)}] {method}: gain {row['gain']:+.3f} ± {row['gain_se']:.3f}, KL {row['kl']:.2f}, "
            f"agreement {row['agreement']:.3f}"
        )
    results = {
        "study": "lists",
        "world": world,
        "seed": seed,
        "seeds": seeds,
        "k": k,
        "lists_per_step": lists_per_step,
        "steps": steps,
        "learning_rate": learning_rate,
        "beta": beta,
        "heldout_pairs": heldout_pairs,
        "samples_per_prompt": samples_per_prompt,
        "kl_budgets": list(kl_budgets),
        "eval_every": eval_every,
        "reference": {"mean_reward": before.mean_reward, "reward_se": before.reward_se},
        "rows": rows,
    }
    labelled_scatter(
        [{"x": r["kl"], "y": r["mean_reward"], "yerr": r["reward_se"], "label": r["method"]} for r in rows],
        setup.out / "reward_vs_kl.png",
        xlabel="KL(policy || reference), nats",
        ylabel="mean true reward",
        title=f"Listwise and pairwise losses on the same lists of {k}, world '{world}'",
        hline=before.mean_reward,
    )
    results["seconds"] = time.perf_counter() - start
    _write(setup.out, results, _markdown(results))
    say(f"  wrote {setup.out}/results.md, results.json, reward_vs_kl.png ({results['seconds']:.0f} s)")
    return results


def _markdown(r: dict[str, Any]) -> list[str]:
    ref = r["reference"]
    lines = [
        f"# Listwise against pairwise on the same ranked lists, lab world `{r['world']}` (world seed {r['seed']})",
        "",
        f"{r['steps'] * r['lists_per_step']} lists of {r['k']} responses per seed, ranked by the world's "
        f"Plackett-Luce annotator; every method trains {r['steps']} steps on {r['lists_per_step']} lists per step "
        f"(the pair methods on all the pairs those lists give), learning rate {r['learning_rate']}, shared beta "
        f"{r['beta']} (pro: its defaults). Mean ± standard error over the seeds {', '.join(map(str, r['seeds']))}. "
        f"Reference policy: true reward {_pm(ref['mean_reward'], ref['reward_se'])}.",
        "",
        "| method | loss | true reward | gain over reference | KL (nats) | win rate | agreement | train s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in sorted(r["rows"], key=lambda x: -x["mean_reward"]):
        lines.append(
            f"| {row['method']} | {row['loss']} | {_pm(row['mean_reward'], row['reward_se'])} | "
            f"{_pm(row['gain'], row['gain_se'])} | {_pm(row['kl'], row['kl_se'], 2)} | {_fmt(row['win_rate'])} | "
            f"{_pm(row['agreement'], row['agreement_se'])} | {_fmt(row['train_seconds'], 1)} |"
        )
    if r.get("kl_budgets"):
        lines += _matched_kl_table(r["rows"], "method", r["kl_budgets"], r["eval_every"])
    lines += [
        "",
        "Agreement: share of fresh response pairs the implicit reward log π − log π_ref orders as the true reward "
        "does. dpo_all_pairs and the listwise losses see the same labels; dpo_best_pairs uses K − 1 of each list's "
        "K(K − 1)/2 comparisons.",
    ]
    return lines + _ending("reward_vs_kl.png", "true reward against KL", _summary(r), r["seconds"])


def _summary(r: dict[str, Any]) -> list[str]:
    rows = {row["method"]: row for row in r["rows"]}
    best = max(r["rows"], key=lambda x: x["gain"])
    text = [
        f"The largest gain is {best['method']}'s ({_pm(best['gain'], best['gain_se'])} at KL {_fmt(best['kl'], 2)})."
    ]
    base = rows.get("dpo_all_pairs")
    if base is not None:
        for name in ("pl_dpo", "pro", "lipo"):
            row = rows.get(name)
            if row is None:
                continue
            diff = row["gain"] - base["gain"]
            se = (row["gain_se"] ** 2 + base["gain_se"] ** 2) ** 0.5
            verdict = "above" if diff > 2 * se else "below" if diff < -2 * se else "within two standard errors of"
            text.append(
                f"{name} is {verdict} DPO on all pairs of the same lists ({diff:+.3f} ± {se:.3f} true reward; "
                f"KL {_fmt(row['kl'], 2)} against {_fmt(base['kl'], 2)})."
            )
    if base is not None and r.get("kl_budgets"):
        b = f"{r['kl_budgets'][len(r['kl_budgets']) // 2]:g}"
        parts = []
        for name in ("pl_dpo", "pro", "lipo"):
            row = rows.get(name)
            if row is not None and row[f"n_at_kl_{b}"] and base[f"n_at_kl_{b}"]:
                diff = row[f"reward_at_kl_{b}"] - base[f"reward_at_kl_{b}"]
                se = (row[f"reward_at_kl_{b}_se"] ** 2 + base[f"reward_at_kl_{b}_se"] ** 2) ** 0.5
                parts.append(f"{name} {diff:+.3f} ± {_fmt(se)}")
        if parts:
            text.append(f"At matched KL ({b} nats), true reward minus dpo_all_pairs': " + ", ".join(parts) + ".")
    lipo, dpo = rows.get("lipo"), rows.get("dpo_all_pairs")
    if lipo is not None and dpo is not None and not lipo["gain"] > dpo["gain"] + 2 * dpo["gain_se"]:
        text.append(
            "LiPO's paper reports LiPO-lambda above DPO on pairs from the same lists; that direction does not appear "
            "clearly here (one learning rate and beta for every method, lists ranked by a Plackett-Luce annotator "
            "without graded scores, a 200k-parameter policy)."
        )
    return text
