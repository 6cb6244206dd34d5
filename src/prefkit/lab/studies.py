"""Studies in a lab world, measured against the known true reward (`prefkit lab study ...`).

- `loss_comparison`: every registered pairwise loss trained from the same reference on the same pairs;
  true-reward gain, KL to the reference, win rate, implicit-reward agreement with the true preferences
  and wall time.
- `noise_study`: labels flipped at set rates; dpo against the noise-aware losses (cdpo, robust_dpo), each
  told the flip rate; mean and standard error over seeds.
- `overoptimization`: best-of-N against a proxy reward model learned from few pairs, for N = 1..256; true
  and proxy reward against KL = log N - (N - 1) / N (the curve of Gao et al. 2023).

Each study writes ``results.json``, ``results.md`` (a table and a paragraph computed from the numbers)
and PNG plots into its output folder, and returns the results as a dict. See docs/lab.md, "Studies".
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import json
import math
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from prefkit.lab.world import PRESETS, World

__all__ = [
    "NOISE_AWARE_LOSSES",
    "OWN_BETA",
    "loss_comparison",
    "noise_study",
    "overoptimization",
]

# Losses whose ``beta`` is not DPO's KL scale, so the shared beta of a comparison does not replace their
# published default: simpo and length_normalized_dpo scale a length-averaged log-prob (2.0 and 5.0),
# orpo's beta is the weight (lambda) of its odds-ratio term.
OWN_BETA = frozenset({"simpo", "length_normalized_dpo", "orpo"})
# Losses whose ``label_smoothing`` is the assumed probability that a label is flipped: the noise study
# sets it to the true flip rate. (exo's label_smoothing is a target mass for numerical stability, not a
# flip rate, so it is not here.)
NOISE_AWARE_LOSSES = frozenset({"cdpo", "robust_dpo", "lcpo", "aot", "aot_pair", "simpo", "cpo"})

Say = Callable[..., None]


# ----- shared pieces -----


@dataclasses.dataclass
class _Setup:
    world: World
    reference: Any  # LabPolicy
    out: Path
    say: Say


def _setup(world: str, seed: int, output_dir, spec, cache_dir, progress: bool, title: str) -> _Setup:
    from prefkit.lab.policy import ReferenceSpec, reference_policy
    from prefkit.lab.world import make_world

    if world not in PRESETS:
        raise ValueError(f"unknown world {world!r}; expected one of {', '.join(PRESETS)}")
    say = print if progress else (lambda *a, **k: None)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    the_world = make_world(world, seed)
    say(f"{title}: world {world!r} (seed {seed}): {PRESETS[world][1]}")
    ref = reference_policy(the_world, seed, spec=spec or ReferenceSpec(), cache_dir=cache_dir, progress=progress)
    how = f"loaded from {ref.path}" if ref.from_cache else f"pre-trained in {ref.info['seconds']:.0f} s"
    say(f"  reference policy: {ref.info['params']:,} parameters ({how})")
    return _Setup(the_world, ref, out, say)


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")


def _check_pairwise_losses(losses: Sequence[str]) -> list[str]:
    from prefkit.losses import get_loss

    if not losses:
        raise ValueError("no losses given")
    for name in losses:
        kind = get_loss(name).kind  # KeyError naming the closest loss for an unknown name
        if kind != "pairwise":
            raise ValueError(f"loss {name!r} is {kind}; the studies train on pairs and need pairwise losses")
    return list(losses)


def _trainable(reference):
    """A copy of the reference `LabPolicy` whose model takes gradients. The trainer freezes its
    ``ref_model`` in place and `train_policy` starts the policy from a deep copy of the reference, so
    one shared reference would start every later run frozen: each run gets its own copy."""
    model = copy.deepcopy(reference.model)
    model.requires_grad_(True)
    return dataclasses.replace(reference, model=model)


def _train(
    reference,
    records,
    *,
    loss: str,
    params: dict,
    steps: int,
    batch_size: int,
    learning_rate: float,
    seed: int,
    callbacks: Sequence = (),
):
    """`train_policy` in a temporary folder, without its per-step log lines; returns ``(trainer, seconds)``."""
    from prefkit.lab.runs import train_policy

    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()):
        trainer = train_policy(
            _trainable(reference),
            records,
            output_dir=tmp,
            loss=loss,
            loss_params=params,
            steps=steps,
            batch_size=batch_size,
            learning_rate=learning_rate,
            seed=seed,
            logging_steps=max(1, steps // 10),
            callbacks=callbacks,
            progress=False,
        )
    return trainer, time.perf_counter() - start


def _agreement(world: World, policy, reference, tokenizer, pairs) -> float:
    """Share of ``pairs`` the policy's log-ratio ``log pi - log ref`` orders as the true preference does."""
    from prefkit.eval.implicit import ImplicitReward
    from prefkit.lab.evaluate import reward_model_agreement, score_responses

    # beta only scales the implicit reward; 1 gives the plain log-ratio (a ranking is all that is used)
    implicit = ImplicitReward(policy, copy.deepcopy(reference), beta=1.0)
    return reward_model_agreement(
        world, lambda items: score_responses(implicit, tokenizer, items, progress=False), pairs
    )["agreement"]


def _train_and_evaluate(setup: _Setup, records, pairs, *, n_per_prompt: int, eval_seed: int, **training):
    """`_train` a copy of the reference on ``records`` (``training``: `_train`'s keywords) and measure the
    trained policy against the world's true reward. Returns ``(evaluation, agreement, seconds)``:
    `evaluate_policy` against the reference (``n_per_prompt`` samples per prompt, seed ``eval_seed``),
    the implicit reward's agreement with the true preferences on ``pairs``, and the training wall time."""
    from prefkit.lab.evaluate import evaluate_policy

    ref = setup.reference
    trainer, seconds = _train(ref, records, **training)
    ev = evaluate_policy(
        setup.world,
        trainer.model,
        ref.tokenizer,
        reference=ref.model,
        n_per_prompt=n_per_prompt,
        seed=eval_seed,
        progress=False,
    )
    return ev, _agreement(setup.world, trainer.model, ref.model, ref.tokenizer, pairs), seconds


def _se(values: Sequence[float]) -> float:
    v = np.asarray(values, dtype=np.float64)
    return float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else float("nan")


def _fmt(x: float | None, digits: int = 3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _no_minus_zero(x: float, digits: int = 3) -> float:
    """``x``, or 0.0 where it would print as ``-0.000`` (a rounding residue, e.g. a standardised mean)."""
    return 0.0 if abs(x) < 0.5 * 10**-digits else x


def _pm(x: float | None, se: float | None, digits: int = 3) -> str:
    if se is None or (isinstance(se, float) and math.isnan(se)):
        return _fmt(x, digits)
    return f"{_fmt(x, digits)} ± {_fmt(se, digits)}"


def _write(out: Path, results: dict[str, Any], markdown: list[str]) -> None:
    (out / "results.json").write_text(json.dumps(results, indent=2, default=float) + "\n")
    (out / "results.md").write_text("\n".join(markdown) + "\n")


def _ending(plot: str, alt: str, summary: list[str], seconds: float) -> list[str]:
    """The last lines of a results.md: the plot, "What this shows" (``summary``'s sentences as one
    paragraph) and the run time."""
    return [
        "",
        f"![{alt}]({plot})",
        "",
        "## What this shows",
        "",
        " ".join(summary),
        "",
        f"Run time {seconds / 60:.1f} min.",
    ]


def _beta_params(loss: str, beta: float) -> dict[str, Any]:
    """The shared ``beta`` for a loss that takes DPO's beta; published defaults otherwise."""
    from prefkit.losses import get_loss

    takes_beta = "beta" in get_loss(loss).hyperparameters and loss not in OWN_BETA
    return {"beta": beta} if takes_beta else {}


def _reference_eval(setup: _Setup, n_per_prompt: int, seed: int):
    from prefkit.lab.evaluate import evaluate_policy

    ref = setup.reference
    return evaluate_policy(setup.world, ref.model, ref.tokenizer, n_per_prompt=n_per_prompt, seed=seed, progress=False)


# ----- loss comparison -----


def loss_comparison(
    world: str = "default",
    losses: Sequence[str] | None = None,
    *,
    seeds: Sequence[int] = (0, 1, 2),
    steps: int = 200,
    batch_size: int = 32,
    learning_rate: float = 5e-4,
    beta: float = 0.1,
    seed: int = 0,
    heldout_pairs: int = 500,
    samples_per_prompt: int = 16,
    kl_budgets: Sequence[float] = (),
    eval_every: int = 10,
    output_dir: str | Path = "runs/lab/losses",
    spec=None,
    cache_dir=None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train every pairwise loss (default: all registered ones) from the world's reference policy, once per seed in
    ``seeds``, and measure each against the true reward. With ``kl_budgets``, every run is also evaluated every
    ``eval_every`` steps (8 samples per prompt) and its true reward read where its (KL, reward) path first reaches
    each budget, as the noise study reads it (matched KL; off by default, it costs an evaluation every
    ``eval_every`` steps).

    Seed ``s`` draws ``steps * batch_size`` fresh Bradley-Terry (temperature 1) pairs (data seed ``seed + 1 + 100 s``,
    shared by every loss) and trains one epoch with training seed ``s``; the reference's evaluation and the
    ``heldout_pairs`` agreement pairs are the same for every run. Hyper-parameters: each loss's published defaults,
    except that losses taking DPO's ``beta`` share ``beta`` (not those in `OWN_BETA`). Per loss: mean over seeds
    (± standard error over seeds; with one seed, over the evaluation's samples) of the true reward and its gain
    over the reference, KL to the reference, win rate against the reference's samples, agreement of the implicit
    reward ``log pi - log ref`` (with the lab reference, also for the reference-free losses) with the true
    preferences, and training wall time. A loss that fails is kept in the table with its error. ``spec`` /
    ``cache_dir``: the reference policy's `ReferenceSpec` and cache (see `prefkit.lab.policy.reference_policy`).
    """
    from prefkit.lab import BradleyTerry, draw_dataset
    from prefkit.lab.evaluate import truth_pairs
    from prefkit.lab.plots import labelled_scatter
    from prefkit.losses import list_losses

    names = _check_pairwise_losses(sorted(s.name for s in list_losses("pairwise")) if losses is None else losses)
    _check_positive(
        steps=steps, batch_size=batch_size, heldout_pairs=heldout_pairs, samples_per_prompt=samples_per_prompt
    )
    seeds = _check_seeds(seeds)
    start = time.perf_counter()
    setup = _setup(world, seed, output_dir, spec, cache_dir, progress, "loss comparison")
    say = setup.say
    # data seed seed + 1 + 100 s: seed 0 draws the pairs it always drew, and no seed meets the held-out draws below
    data = {
        s: draw_dataset(setup.world, "pairwise", steps * batch_size, BradleyTerry(1.0), seed=seed + 1 + 100 * s)
        for s in seeds
    }
    pairs = truth_pairs(setup.world, heldout_pairs, seed=seed + 2)
    before = _reference_eval(setup, samples_per_prompt, seed + 3)
    if any(not b > 0 for b in kl_budgets):
        raise ValueError(f"kl_budgets must be > 0, got {list(kl_budgets)}")
    path_start = _reference_eval(setup, 8, seed + 4) if kl_budgets else None  # step 0 of every run's path
    say(
        f"  {steps * batch_size} training pairs per seed, seeds {list(seeds)}; reference mean true reward "
        f"{before.mean_reward:.3f}; training {len(names)} losses, {steps} steps each"
    )
    fixed = dict(
        steps=steps,
        batch_size=batch_size,
        learning_rate=learning_rate,
        n_per_prompt=samples_per_prompt,
        eval_seed=seed + 3,
    )
    rows = []
    for i, name in enumerate(names, 1):
        params = _beta_params(name, beta)
        runs = []
        try:
            for s in seeds:
                truth = _truth_path(setup, eval_every, seed + 4, path_start) if kl_budgets else None
                ev, agreement, seconds = _train_and_evaluate(
                    setup, data[s], pairs, loss=name, params=params, seed=s, callbacks=[truth] if truth else [], **fixed
                )
                run = _run_figures(s, ev, agreement, seconds)
                if truth is not None:
                    run["path"] = truth.path()
                    run["at_kl"] = _at_kl(run["path"], kl_budgets)
                runs.append(run)
            row = {"loss": name, "params": params, "error": None, **_over_seeds(runs, before), "runs": runs}
            _add_matched_kl(row, runs, kl_budgets)
            say(
                f"  [{i}/{len(names)}] {name}: true reward {row['mean_reward']:.3f} (gain {row['gain']:+.3f} "
                f"± {row['gain_se']:.3f}), KL {row['kl']:.2f}, agreement {row['agreement']:.3f}"
            )
        except Exception as err:  # recorded in the table, not skipped
            row = {"loss": name, "params": params, "error": f"{type(err).__name__}: {err}"}
            say(f"  [{i}/{len(names)}] {name}: FAILED: {row['error']}")
        rows.append(row)
    results = {
        "study": "losses",
        "world": world,
        "seed": seed,
        "seeds": list(seeds),
        "steps": steps,
        "batch_size": batch_size,
        "learning_rate": learning_rate,
        "beta": beta,
        "train_pairs": steps * batch_size,
        "heldout_pairs": heldout_pairs,
        "samples_per_prompt": samples_per_prompt,
        "kl_budgets": list(kl_budgets),
        "eval_every": eval_every,
        "reference": {
            "mean_reward": before.mean_reward,
            "reward_se": before.reward_se,
            "mean_length": before.mean_length,
        },
        "rows": rows,
    }
    ok = [r for r in rows if r["error"] is None]
    log_x = _spread([r["kl"] for r in ok])
    labelled_scatter(
        [{"x": r["kl"], "y": r["mean_reward"], "yerr": r["reward_se"], "label": r["loss"]} for r in ok],
        setup.out / "reward_vs_kl.png",
        xlabel="KL(policy || reference), nats" + (" (symmetric log scale)" if log_x else ""),
        ylabel="mean true reward",
        title=f"Pairwise losses in world '{world}', {steps} steps, {len(seeds)} seed(s)",
        hline=before.mean_reward,
        log_x=log_x,
    )
    results["seconds"] = time.perf_counter() - start
    _write(setup.out, results, _losses_markdown(results))
    say(f"  wrote {setup.out}/results.md, results.json, reward_vs_kl.png ({results['seconds']:.0f} s)")
    return results


def _check_seeds(seeds: Sequence[int]) -> list[int]:
    seeds = list(seeds)
    if not seeds or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in seeds):
        raise ValueError(f"seeds must be one or more integers >= 0, got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must differ, got {seeds!r}")
    return seeds


def _over_seeds(runs: list[dict], before) -> dict[str, float]:
    """One loss's runs summarised: means over seeds and their standard errors (with one run, the standard errors of
    its evaluation's samples instead)."""
    one = len(runs) == 1

    def mean(key: str) -> float:
        return float(np.mean([r[key] for r in runs]))

    def se(key: str, sample_key: str | None = None) -> float:
        if one:
            return runs[0][sample_key] if sample_key else float("nan")
        return _se([r[key] for r in runs])

    reward_se = se("mean_reward", "reward_se")
    return {
        "mean_reward": mean("mean_reward"),
        "reward_se": reward_se,
        "gain": mean("mean_reward") - before.mean_reward,
        "gain_se": math.hypot(reward_se, before.reward_se) if one else reward_se,
        "kl": mean("kl"),
        "kl_se": se("kl", "kl_se"),
        "win_rate": mean("win_rate"),
        "mean_length": mean("mean_length"),
        "agreement": mean("agreement"),
        "agreement_se": se("agreement"),
        "train_seconds": mean("train_seconds"),
    }


def _spread(values: Sequence[float]) -> bool:
    """Whether positive values span more than two orders of magnitude (then a log axis reads better)."""
    positive = [v for v in values if v > 0]
    return len(positive) > 1 and max(positive) / min(positive) > 100


def _losses_markdown(r: dict[str, Any]) -> list[str]:
    ok = sorted((row for row in r["rows"] if row["error"] is None), key=lambda row: -row["mean_reward"])
    failed = [row for row in r["rows"] if row["error"] is not None]
    ref = r["reference"]
    seeds = r.get("seeds", [r["seed"]])
    spread = (
        f"mean ± standard error over the {len(seeds)} seeds {', '.join(map(str, seeds))} (each its own training "
        "pairs and training seed)"
        if len(seeds) > 1
        else "one seed (± one standard error over the evaluation's samples)"
    )
    lines = [
        f"# Loss comparison in the lab world `{r['world']}` (world seed {r['seed']})",
        "",
        f"Every pairwise loss trained from the same reference policy on {r['train_pairs']} fresh pairs per seed "
        f"(Bradley-Terry annotators, temperature 1; one epoch: {r['steps']} steps of {r['batch_size']}, learning "
        f"rate {r['learning_rate']}); {spread}. Hyper-parameters: each loss's published defaults; losses that take "
        f"DPO's beta share beta = {r['beta']} (simpo, length_normalized_dpo and orpo keep their own beta, which is "
        f"not a KL scale). Reference policy: mean true reward {_pm(ref['mean_reward'], ref['reward_se'])}.",
        "",
        "| loss | params | true reward | gain over reference | KL (nats) | win rate | agreement | length | train s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in ok:
        params = ", ".join(f"{k}={v}" for k, v in row["params"].items()) or "defaults"
        lines.append(
            f"| {row['loss']} | {params} | {_pm(row['mean_reward'], row['reward_se'])} | "
            f"{_pm(row['gain'], row['gain_se'])} | {_pm(row['kl'], row['kl_se'], 2)} | {_fmt(row['win_rate'])} | "
            f"{_pm(row['agreement'], row.get('agreement_se'))} | {_fmt(row['mean_length'], 2)} | "
            f"{_fmt(row['train_seconds'], 1)} |"
        )
    lines += [f"| {row['loss']} | | failed: {row['error']} | | | | | | |" for row in failed]
    lines += [
        "",
        f"True reward and KL: {r['samples_per_prompt']} samples per prompt of the world per run; "
        "win rate: share of (policy, reference) sample pairs for the same prompt won under the true reward (ties "
        f"one half); agreement: share of {r['heldout_pairs']} fresh response pairs that the implicit reward "
        "log π(y|x) − log π_ref(y|x) orders as the true preference does (the lab reference is used for the "
        "reference-free losses too, so all rows are measured the same way); train s: training wall time.",
    ]
    if r.get("kl_budgets") and ok:
        lines += _matched_kl_table(ok, "loss", r["kl_budgets"], r["eval_every"])
    return lines + _ending("reward_vs_kl.png", "true reward against KL", _losses_summary(ok, failed), r["seconds"])


def _losses_summary(ok: list[dict], failed: list[dict], far_kl: float = 20.0) -> list[str]:
    if not ok:
        return ["No loss trained successfully."]
    best, worst = ok[0], ok[-1]
    significant = [row for row in ok if row["gain"] > 2 * row["gain_se"]]
    by_agreement = max(ok, key=lambda row: row["agreement"])
    text = [
        f"{len(significant)} of {len(ok)} losses raise the true reward by more than two standard errors.",
        f"The highest true reward is {best['loss']}'s ({_pm(best['mean_reward'], best['reward_se'])}, KL "
        f"{_fmt(best['kl'], 2)} nats), the lowest {worst['loss']}'s ({_pm(worst['mean_reward'], worst['reward_se'])}, "
        f"KL {_fmt(worst['kl'], 2)}).",
    ]
    efficient = [row for row in significant if row["kl"] >= 0.5]  # below half a nat the ratio is mostly noise
    if efficient:
        top = max(efficient, key=lambda row: row["gain"] / row["kl"])
        text.append(
            f"Among those that moved at least 0.5 nats, the largest gain per nat of KL is {top['loss']}'s "
            f"({top['gain'] / top['kl']:.2f})."
        )
    far = [row["loss"] for row in ok if row["kl"] > far_kl]
    if far:
        text.append(f"{len(far)} loss(es) drift more than {far_kl:g} nats from the reference: {', '.join(far)}.")
    text.append(
        f"The implicit reward of {by_agreement['loss']} agrees best with the true preferences "
        f"({_fmt(by_agreement['agreement'])})."
    )
    if failed:
        text.append(
            f"{len(failed)} loss(es) failed to train: {', '.join(row['loss'] for row in failed)} (errors in the table)."
        )
    text.append(
        "One learning rate for all losses: a loss with a low gain here may need its own learning rate or beta, so "
        "read this as a like-for-like run, not as each loss's best."
    )
    return text


# ----- noise -----


def _noise_annotator(kind: str, rate: float):
    from prefkit.lab import Argmax, BradleyTerry, Flip

    bases = {"argmax": Argmax, "bt": lambda: BradleyTerry(1.0)}
    if kind not in bases:
        raise ValueError(f"unknown annotator {kind!r}; expected one of {', '.join(bases)}")
    return Flip(bases[kind](), eps=rate)


def noise_study(
    world: str = "default",
    rates: Sequence[float] = (0.0, 0.1, 0.2, 0.3),
    losses: Sequence[str] = ("dpo", "cdpo", "robust_dpo", "lcpo"),
    seeds: Sequence[int] = (0, 1, 2),
    *,
    annotator: str = "bt",
    kl_budgets: Sequence[float] = (0.5, 1.0, 2.0, 4.0),
    eval_every: int = 10,
    steps: int = 200,
    batch_size: int = 32,
    learning_rate: float = 5e-4,
    beta: float = 0.1,
    seed: int = 0,
    heldout_pairs: int = 500,
    samples_per_prompt: int = 8,
    output_dir: str | Path = "runs/lab/noise",
    spec=None,
    cache_dir=None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train each loss on labels flipped at each rate, once per data seed, and compare the losses **at matched KL**.

    Losses that drift further from the reference gain (or lose) true reward for that alone, so the comparison is
    the true reward each run reaches at the same KL to the reference: every run is evaluated against the world's
    true reward every ``eval_every`` steps (and at step 0), and its (KL, true reward) path is interpolated
    linearly at each of ``kl_budgets`` nats (a run that never reaches a budget has none there). The final step's
    true reward, KL and implicit-reward agreement are reported too.

    Labels: ``Flip(BradleyTerry(1.0), rate)`` (``annotator="bt"``, the default: noisy labels, as real
    annotators give) or ``Flip(Argmax(), rate)`` (``"argmax"``: noise-free labels, so the flip rate is all the
    noise; DPO then over-fits deterministic preferences and drifts far). For one data seed the pairs are the same
    at every rate and a label flipped at one rate is flipped at every higher rate (one uniform draw per pair).
    Losses in `NOISE_AWARE_LOSSES` get ``label_smoothing = rate``; all share ``beta``. The world and reference
    policy use ``seed``; data seed ``s`` draws the training pairs and seeds training. Reported per (loss, rate):
    mean ± standard error over the data seeds, and each loss's paired difference from dpo (when dpo is in
    ``losses``).
    """
    from prefkit.lab import draw_dataset
    from prefkit.lab.evaluate import truth_pairs
    from prefkit.lab.plots import metric_panels
    from prefkit.lab.runs import TruthCallback

    names = _check_pairwise_losses(list(losses))
    rates = [float(r) for r in rates]
    if not rates or any(not 0 <= r < 0.5 for r in rates):
        raise ValueError(f"flip rates must be in [0, 0.5), got {rates}")
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ValueError("no seeds given")
    budgets = [float(b) for b in kl_budgets]
    if not budgets or any(not b > 0 for b in budgets):
        raise ValueError(f"kl_budgets must be one or more KL values > 0 (nats), got {list(kl_budgets)}")
    _noise_annotator(annotator, 0.0)
    _check_positive(
        steps=steps,
        batch_size=batch_size,
        heldout_pairs=heldout_pairs,
        samples_per_prompt=samples_per_prompt,
        eval_every=eval_every,
    )
    start = time.perf_counter()
    setup = _setup(world, seed, output_dir, spec, cache_dir, progress, "noise study")
    say = setup.say
    pairs = truth_pairs(setup.world, heldout_pairs, seed=seed + 2)
    before = _reference_eval(setup, samples_per_prompt, seed + 3)
    total, done = len(names) * len(rates) * len(seeds), 0
    say(
        f"  {total} runs: losses {', '.join(names)} x flip rates {rates} x data seeds {seeds}; "
        f"{steps * batch_size} pairs each; true reward at KL {budgets} nats"
    )
    runs = []
    for s in seeds:
        for rate in rates:
            train = draw_dataset(
                setup.world, "pairwise", steps * batch_size, _noise_annotator(annotator, rate), seed=1000 * (s + 1)
            )
            for name in names:
                params = _beta_params(name, beta) | ({"label_smoothing": rate} if name in NOISE_AWARE_LOSSES else {})
                ref = setup.reference
                truth = TruthCallback(
                    setup.world, ref.tokenizer, ref.model, eval_every, n_per_prompt=samples_per_prompt, seed=seed + 3
                ).start_from(before)
                trainer, seconds = _train(
                    setup.reference,
                    train,
                    loss=name,
                    params=params,
                    steps=steps,
                    batch_size=batch_size,
                    learning_rate=learning_rate,
                    seed=s,
                    callbacks=[truth],
                )
                path = truth.path()
                final = path[-1]
                agreement = _agreement(
                    setup.world, trainer.model, setup.reference.model, setup.reference.tokenizer, pairs
                )
                run = {
                    "loss": name,
                    "rate": rate,
                    "seed": s,
                    "params": params,
                    "mean_reward": final["mean_reward"],
                    "kl": final["kl"],
                    "agreement": agreement,
                    "at_kl": {f"{b:g}": _reward_at_kl(path, b) for b in budgets},
                    "path": path,
                    "train_seconds": seconds,
                }
                runs.append(run)
                done += 1
                at = ", ".join(f"{k}: {_fmt(v)}" for k, v in run["at_kl"].items())
                say(
                    f"  [{done}/{total}] seed {s} flip {rate:g} {name}: final true reward {run['mean_reward']:.3f} "
                    f"at KL {run['kl']:.2f}; at KL budgets {at}"
                )
    table = _noise_table(runs, names, rates, budgets)
    results = {
        "study": "noise",
        "design": "matched KL",
        "world": world,
        "seed": seed,
        "seeds": seeds,
        "rates": rates,
        "losses": names,
        "annotator": annotator,
        "kl_budgets": budgets,
        "eval_every": eval_every,
        "steps": steps,
        "batch_size": batch_size,
        "learning_rate": learning_rate,
        "beta": beta,
        "train_pairs": steps * batch_size,
        "heldout_pairs": heldout_pairs,
        "samples_per_prompt": samples_per_prompt,
        "reference": {"mean_reward": before.mean_reward, "reward_se": before.reward_se},
        "table": table,
        "runs": runs,
    }
    mid = f"{budgets[len(budgets) // 2]:g}"
    panels = {
        title: {
            name: {
                "y": [table[name][i][key] for i in range(len(rates))],
                "se": [table[name][i][key + "_se"] for i in range(len(rates))],
            }
            for name in names
        }
        for title, key in (
            (f"true reward at KL = {mid} nats", f"reward_at_kl_{mid}"),
            ("true reward at the last step", "mean_reward"),
            ("KL at the last step (nats)", "kl"),
        )
    }
    metric_panels(
        rates,
        panels,
        setup.out / "noise.png",
        xlabel="flip rate",
        title=f"Label noise in world '{world}' at matched KL (mean ± SE over {len(seeds)} data seeds)",
    )
    results["seconds"] = time.perf_counter() - start
    _write(setup.out, results, _noise_markdown(results))
    say(f"  wrote {setup.out}/results.md, results.json, noise.png ({results['seconds']:.0f} s)")
    return results


def _mean_se(values: Sequence[float]) -> tuple[float, float, int]:
    """``(mean, standard error, count)`` of the values that are not NaN (runs that reached a KL budget)."""
    values = [v for v in values if not math.isnan(v)]
    return (float(np.mean(values)), _se(values), len(values)) if values else (float("nan"), float("nan"), 0)


def _reward_at_kl(path: list[dict], budget: float) -> float:
    """The true reward where a run's (KL, reward) path first reaches ``budget`` nats, linear between the two
    evaluations around it; NaN when the run never gets there."""
    for a, b in zip(path, path[1:]):
        if a["kl"] <= budget <= b["kl"] and b["kl"] > a["kl"]:
            t = (budget - a["kl"]) / (b["kl"] - a["kl"])
            return a["mean_reward"] + t * (b["mean_reward"] - a["mean_reward"])
    return float("nan")


def _run_figures(seed: int, ev, agreement: float, seconds: float) -> dict[str, Any]:
    """One run's row of figures: its `evaluate_policy` result ``ev``, implicit-reward agreement and training time."""
    return {
        "seed": seed,
        "mean_reward": ev.mean_reward,
        "reward_se": ev.reward_se,
        "kl": ev.kl,
        "kl_se": ev.kl_se,
        "win_rate": ev.win_rate,
        "mean_length": ev.mean_length,
        "agreement": agreement,
        "train_seconds": seconds,
    }


def _truth_path(setup: _Setup, eval_every: int, seed: int, start):
    """A `TruthCallback` that evaluates a run every ``eval_every`` steps (8 samples per prompt, ``seed``) from the
    reference's evaluation ``start`` (step 0 of every run's path)."""
    from prefkit.lab.runs import TruthCallback

    ref = setup.reference
    return TruthCallback(setup.world, ref.tokenizer, ref.model, eval_every, n_per_prompt=8, seed=seed).start_from(start)


def _at_kl(path: list[dict], kl_budgets: Sequence[float]) -> dict[str, float]:
    """A run's true reward at each KL budget (`_reward_at_kl`), keyed by the budget as written (``"1"``, ``"0.5"``)."""
    return {f"{b:g}": _reward_at_kl(path, b) for b in kl_budgets}


def _add_matched_kl(row: dict[str, Any], runs: list[dict], kl_budgets: Sequence[float]) -> None:
    """``reward_at_kl_B``, its standard error and ``n_at_kl_B`` (the runs that reached ``B``) into ``row``."""
    for b in kl_budgets:
        key = f"{b:g}"
        row[f"reward_at_kl_{key}"], row[f"reward_at_kl_{key}_se"], row[f"n_at_kl_{key}"] = _mean_se(
            [r["at_kl"][key] for r in runs]
        )


def _matched_kl_table(rows: list[dict], name_key: str, kl_budgets: Sequence[float], eval_every: int) -> list[str]:
    """The results.md table of each row's true reward at the KL budgets (with how many runs reached each)."""
    budgets = [f"{b:g}" for b in kl_budgets]
    lines = [
        "",
        f"**At matched KL** (every run evaluated every {eval_every} steps with 8 samples per prompt; the true "
        "reward where its (KL, reward) path first reaches each budget, linear between evaluations; runs that "
        "never get there are left out and counted):",
        "",
        f"| {name_key} | " + " | ".join(f"true reward at KL {b}" for b in budgets) + " |",
        "|---|" + "---|" * len(budgets),
    ]
    for row in rows:
        cells = []
        for b in budgets:
            cell = _pm(row[f"reward_at_kl_{b}"], row[f"reward_at_kl_{b}_se"])
            if row[f"n_at_kl_{b}"] < len(row["runs"]):
                cell += f" ({row[f'n_at_kl_{b}']}/{len(row['runs'])} runs)"
            cells.append(cell)
        lines.append(f"| {row[name_key]} | " + " | ".join(cells) + " |")
    return lines


def _noise_table(
    runs: list[dict], names: list[str], rates: list[float], budgets: Sequence[float] = ()
) -> dict[str, list[dict]]:
    """``table[loss][i]``: means and SEs over seeds at ``rates[i]`` of the final true reward, KL and agreement
    and of the true reward at each KL budget (``reward_at_kl_B``, over the seeds that reached it; ``n_at_kl_B``
    of them), plus the paired differences from dpo (``reward_minus_dpo``, ``at_kl_B_minus_dpo``)."""

    def cell(name, rate):
        return sorted((r for r in runs if r["loss"] == name and r["rate"] == rate), key=lambda r: r["seed"])

    table = {}
    for name in names:
        rows = []
        for rate in rates:
            these = cell(name, rate)
            row = {"rate": rate, "n": len(these)}
            for key in ("mean_reward", "kl", "agreement"):
                row[key], row[key + "_se"], _ = _mean_se([r[key] for r in these])
            for b in budgets:
                k = f"{b:g}"
                row[f"reward_at_kl_{k}"], row[f"reward_at_kl_{k}_se"], row[f"n_at_kl_{k}"] = _mean_se(
                    [r["at_kl"][k] for r in these]
                )
            if "dpo" in names and name != "dpo":
                dpo = cell("dpo", rate)
                diff = [a["mean_reward"] - b["mean_reward"] for a, b in zip(these, dpo)]
                row["reward_minus_dpo"], row["reward_minus_dpo_se"], _ = _mean_se(diff)
                for b in budgets:
                    k = f"{b:g}"
                    d = [a["at_kl"][k] - c["at_kl"][k] for a, c in zip(these, dpo)]
                    row[f"at_kl_{k}_minus_dpo"], row[f"at_kl_{k}_minus_dpo_se"], _ = _mean_se(d)
            rows.append(row)
        table[name] = rows
    return table


def _noise_markdown(r: dict[str, Any]) -> list[str]:
    names, rates, table = r["losses"], r["rates"], r["table"]
    budgets = [f"{b:g}" for b in r.get("kl_budgets", [])]
    label = {"argmax": "Argmax (noise-free) labels", "bt": "Bradley-Terry (temperature 1) labels"}[r["annotator"]]
    lines = [
        f"# Label noise in the lab world `{r['world']}` at matched KL (seed {r['seed']})",
        "",
        f"{label}, each flipped with probability = the flip rate; {r['train_pairs']} pairs per run (one epoch, "
        f"{r['steps']} steps of {r['batch_size']}, learning rate {r['learning_rate']}, beta {r['beta']}). "
        f"Noise-aware losses ({', '.join(n for n in names if n in NOISE_AWARE_LOSSES) or 'none here'}) are told the "
        f"flip rate as their label_smoothing. Every run is evaluated every {r.get('eval_every', '?')} steps; the "
        "true reward **at a KL budget** is read off its (KL, true reward) path by linear interpolation, so losses "
        "are compared at the same distance from the reference, not at whatever KL each drifted to. Mean ± "
        f"standard error over data seeds {r['seeds']} (pairs shared across rates and losses for one seed). "
        f"Reference policy: mean true reward {_pm(r['reference']['mean_reward'], r['reference']['reward_se'])}.",
        "",
        "| loss | " + " | ".join(f"flip {rate:g}" for rate in rates) + " |",
        "|---|" + "---|" * len(rates),
    ]

    def cells(name, key, n_key=None):
        out = []
        for c in table[name]:
            text = _pm(c[key], c[key + "_se"])
            if n_key and c[n_key] < c["n"]:
                text += f" ({c[n_key]}/{c['n']} runs)"
            out.append(text)
        return out

    for b in budgets:
        for name in names:
            lines.append(
                f"| {name}: true reward at KL {b} | "
                + " | ".join(cells(name, f"reward_at_kl_{b}", f"n_at_kl_{b}"))
                + " |"
            )
        for name in names:
            if f"at_kl_{b}_minus_dpo" in table[name][0]:
                lines.append(f"| {name} − dpo at KL {b} | " + " | ".join(cells(name, f"at_kl_{b}_minus_dpo")) + " |")
    for key, what in (
        ("mean_reward", "final true reward"),
        ("kl", "final KL"),
        ("agreement", "agreement"),
        ("reward_minus_dpo", "final true reward − dpo's"),
    ):
        for name in names:
            if key in table[name][0]:
                lines.append(f"| {name}: {what} | " + " | ".join(cells(name, key)) + " |")
    lines += [
        "",
        f"True reward and KL: {r['samples_per_prompt']} samples per prompt; a budget a run never reached counts as "
        f"missing (the count is shown); agreement: share of {r['heldout_pairs']} fresh pairs that the implicit "
        'reward log π − log π_ref orders as the true preference does; "− dpo": the paired difference on the same '
        "data seed.",
    ]
    return lines + _ending(
        "noise.png",
        "true reward at matched KL, final true reward and KL against the flip rate",
        _noise_summary(r),
        r["seconds"],
    )


def _noise_summary(r: dict[str, Any]) -> list[str]:
    names, rates, table = r["losses"], r["rates"], r["table"]
    budgets = [f"{b:g}" for b in r.get("kl_budgets", [])]
    text = []
    for name in names:
        first, last = table[name][0], table[name][-1]
        text.append(
            f"{name}: final KL {_fmt(first['kl'], 2)} at flip rate {rates[0]:g} and {_fmt(last['kl'], 2)} at "
            f"{rates[-1]:g}."
        )
    for b in budgets:
        for name in names:
            key = f"at_kl_{b}_minus_dpo"
            if key not in table[name][0]:
                continue
            cells = table[name]
            diffs = [c[key] for c in cells]
            clear = [f"{c['rate']:g}" for c in cells if abs(c[key]) > 2 * c[key + "_se"]]
            if all(math.isnan(d) for d in diffs):
                text.append(f"At KL {b}: {name} and dpo never both reached it.")
                continue
            grows = all(y > x for x, y in zip(diffs, diffs[1:]))
            text.append(
                f"At KL {b}, {name} minus dpo: "
                + ", ".join(_fmt(d) for d in diffs)
                + " over the flip rates; "
                + ("the advantage grows with every step of the flip rate" if grows else "not growing monotonically")
                + f", beyond two standard errors at {'flip rate(s) ' + ', '.join(clear) if clear else 'no rate'}."
            )
    if len(r["seeds"]) < 3:
        text.append(f"Only {len(r['seeds'])} data seed(s): the standard errors are rough.")
    return text


# ----- overoptimization -----


def _fit_gao(d: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Least-squares ``(alpha, beta)`` of Gao et al.'s best-of-N form ``y = d * (alpha - beta * d)``."""
    design = np.stack([d, -d * d], axis=1)
    (alpha, beta), *_ = np.linalg.lstsq(design, y, rcond=None)
    return float(alpha), float(beta)


def overoptimization(
    world: str = "default",
    *,
    proxy_pairs: int = 300,
    proxy_steps: int = 100,
    proxy_learning_rate: float = 1e-3,
    pool: int = 512,
    n_max: int = 256,
    prompts: Sequence[str] | None = None,
    seed: int = 0,
    heldout_pairs: int = 500,
    output_dir: str | Path = "runs/lab/overopt",
    spec=None,
    cache_dir=None,
    progress: bool = True,
) -> dict[str, Any]:
    """Best-of-N against a learned proxy reward, measured with the true reward (Gao et al. 2023).

    The proxy is a Bradley-Terry reward model on the reference's backbone trained on only ``proxy_pairs``
    Bradley-Terry (temperature 1) pairs for ``proxy_steps`` steps of 32 (many epochs), so it is imperfect:
    its agreement with the true preferences on ``heldout_pairs`` fresh pairs is reported. A pool of
    ``pool`` completions of each prompt (default: every prompt of the world) is sampled from the
    reference and scored by the proxy and the true reward. For N = 1, 2, 4, ..., ``n_max`` the unbiased
    best-of-N estimate (`prefkit.online.best_of_n_expectation`) of the true and the proxy reward of the
    sample the proxy selects is reported against KL = log N - (N - 1) / N, plus best-of-N selected by the
    true reward itself (the oracle). Both rewards are standardised against the reference's samples
    (minus the pool mean, over the pool standard deviation), so they share a scale and N = 1 is 0 for
    both; the raw true reward is reported too.
    """
    from prefkit.lab import BradleyTerry, draw_dataset
    from prefkit.lab.evaluate import reward_model_agreement, score_responses, truth_pairs
    from prefkit.lab.plots import kl_curves
    from prefkit.lab.runs import train_reward_model
    from prefkit.online import best_of_n_expectation, best_of_n_kl, sample_completions

    _check_positive(
        proxy_pairs=proxy_pairs, proxy_steps=proxy_steps, pool=pool, n_max=n_max, heldout_pairs=heldout_pairs
    )
    if n_max > pool:
        raise ValueError(f"n_max ({n_max}) must be <= pool ({pool}): best-of-N draws N of the pool's samples")
    start = time.perf_counter()
    setup = _setup(world, seed, output_dir, spec, cache_dir, progress, "overoptimization")
    ref, say, the_world = setup.reference, setup.say, setup.world
    prompts = list(the_world.prompts if prompts is None else prompts)
    if not prompts:
        raise ValueError("no prompts given")

    say(f"  training the proxy reward model on {proxy_pairs} pairs ({proxy_steps} steps)")
    train = draw_dataset(the_world, "pairwise", proxy_pairs, BradleyTerry(1.0), seed=seed + 1)
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()):
        rm = train_reward_model(
            _trainable(ref),
            train,
            output_dir=tmp,
            steps=proxy_steps,
            batch_size=32,
            learning_rate=proxy_learning_rate,
            seed=seed,
            progress=False,
        ).model

    def proxy(items):
        return score_responses(rm, ref.tokenizer, items, batch_size=256, progress=False)

    agreement = reward_model_agreement(the_world, proxy, truth_pairs(the_world, heldout_pairs, seed=seed + 2))
    say(
        f"  proxy agreement with the true preferences: {agreement['agreement']:.3f}; sampling {pool} completions "
        f"of each of {len(prompts)} prompts"
    )
    samples = sample_completions(
        ref.model,
        ref.tokenizer,
        prompts,
        n=pool,
        max_new_tokens=3 * the_world.max_len,
        seed=seed + 3,
        batch_size=512,
        progress=progress,
        desc="sampling the pool",
    )
    items = [(c.prompt, c.text) for c in samples]
    true = np.array([the_world.true_reward(p, t) for p, t in items]).reshape(len(prompts), pool)
    proxy_raw = proxy(items).reshape(len(prompts), pool)

    def standard(x):
        return (x - x.mean()) / x.std()

    true_std, proxy_std = standard(true), standard(proxy_raw)
    ns = [2**k for k in range(int(math.log2(n_max)) + 1)]
    rows = [
        {
            "n": n,
            "kl": best_of_n_kl(n),
            "true": best_of_n_expectation(proxy_raw, true_std, n),
            "proxy": best_of_n_expectation(proxy_raw, proxy_std, n),
            "true_raw": best_of_n_expectation(proxy_raw, true, n),
            "oracle": best_of_n_expectation(true, true_std, n),
        }
        for n in ns
    ]
    d = np.sqrt([row["kl"] for row in rows])
    fits = {key: _fit_gao(d, np.array([row[key] for row in rows])) for key in ("true", "proxy")}
    results = {
        "study": "overopt",
        "world": world,
        "seed": seed,
        "proxy_pairs": proxy_pairs,
        "proxy_steps": proxy_steps,
        "proxy_learning_rate": proxy_learning_rate,
        "pool": pool,
        "prompts": len(prompts),
        "n_max": n_max,
        "proxy_agreement": agreement["agreement"],
        "proxy_correlation": agreement["reward_correlation"],
        "heldout_pairs": heldout_pairs,
        "pool_true_mean": float(true.mean()),
        "pool_true_sd": float(true.std()),
        "distinct_fraction": len(set(items)) / len(items),
        "rows": rows,
        "fits": {k: {"alpha": a, "beta": b} for k, (a, b) in fits.items()},
    }
    kl_curves(
        [row["kl"] for row in rows],
        {
            "true reward (proxy-selected)": [row["true"] for row in rows],
            "proxy reward (proxy-selected)": [row["proxy"] for row in rows],
            "true reward (true-selected, oracle)": [row["oracle"] for row in rows],
        },
        setup.out / "overoptimization.png",
        ylabel="reward, in sd of the reference's samples",
        title=f"Best-of-N against a proxy RM ({proxy_pairs} pairs), world '{world}'",
        labels=[f"N={row['n']}" for row in rows],
        fits={
            "true reward (proxy-selected)": [d_ * (fits["true"][0] - fits["true"][1] * d_) for d_ in d],
            "proxy reward (proxy-selected)": [d_ * (fits["proxy"][0] - fits["proxy"][1] * d_) for d_ in d],
        },
    )
    results["seconds"] = time.perf_counter() - start
    _write(setup.out, results, _overopt_markdown(results))
    say(f"  wrote {setup.out}/results.md, results.json, overoptimization.png ({results['seconds']:.0f} s)")
    return results


def _overopt_markdown(r: dict[str, Any]) -> list[str]:
    lines = [
        f"# Best-of-N overoptimization in the lab world `{r['world']}` (seed {r['seed']})",
        "",
        f"Proxy: a Bradley-Terry reward model on the reference's backbone, trained on only {r['proxy_pairs']} "
        f"Bradley-Terry (temperature 1) pairs for {r['proxy_steps']} steps of 32; it agrees with the true "
        f"preferences on {_fmt(r['proxy_agreement'])} of {r['heldout_pairs']} fresh pairs (Pearson correlation with "
        f"the true reward {_fmt(r['proxy_correlation'])}). Pool: {r['pool']} reference samples for each of "
        f"{r['prompts']} prompts ({r['distinct_fraction']:.0%} distinct (prompt, response) pairs). Best-of-N is the "
        "unbiased estimate from the pool (no resampling noise beyond the pool's own).",
        "",
        "Rewards are standardised against the pool (the reference's samples): (r − pool mean) / pool sd, so N = 1 "
        f"is 0; the true reward's pool mean is {_fmt(r['pool_true_mean'])} and sd {_fmt(r['pool_true_sd'])} "
        "(the raw column).",
        "",
        "| N | KL = log N − (N−1)/N | sqrt(KL) | proxy reward | true reward | true reward (raw) | oracle true reward |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in r["rows"]:
        lines.append(
            f"| {row['n']} | {row['kl']:.3f} | {math.sqrt(row['kl']):.3f} | {_fmt(_no_minus_zero(row['proxy']))} | "
            f"{_fmt(_no_minus_zero(row['true']))} | {row['true_raw']:.3f} | {_fmt(_no_minus_zero(row['oracle']))} |"
        )
    fits = r["fits"]
    lines += [
        "",
        "Proxy and true reward: of the sample the proxy selects; oracle: best-of-N selected by the true reward "
        "itself (the most best-of-N can give). Fits of Gao et al.'s best-of-N form R(d) = d (α − β d), d = "
        f"sqrt(KL): proxy α = {fits['proxy']['alpha']:.3f}, β = {fits['proxy']['beta']:.3f}; true α = "
        f"{fits['true']['alpha']:.3f}, β = {fits['true']['beta']:.3f}. KL = log N − (N−1)/N is exact for "
        "continuous scores and an upper bound when the pool repeats responses.",
    ]
    return lines + _ending(
        "overoptimization.png", "true and proxy reward against KL", _overopt_summary(r), r["seconds"]
    )


def _overopt_summary(r: dict[str, Any]) -> list[str]:
    rows = r["rows"]
    peak = max(rows, key=lambda row: row["true"])
    last = rows[-1]
    proxy_rising = all(b["proxy"] >= a["proxy"] for a, b in zip(rows, rows[1:]))
    trend = "rises with every doubling of N" if proxy_rising else "does not rise monotonically"
    text = [
        f"The proxy reward of the selected sample {trend}, to {last['proxy']:.2f} sd at N = {last['n']} "
        f"(KL {last['kl']:.2f} nats).",
    ]
    if peak is last:
        text.append(
            f"The true reward rises too, to {last['true']:.2f} sd at N = {last['n']}: no overoptimization "
            "peak within this range of KL."
        )
    else:
        text.append(
            f"The true reward peaks at N = {peak['n']} (KL {peak['kl']:.2f} nats, {peak['true']:.2f} sd) and "
            f"falls to {last['true']:.2f} sd at N = {last['n']}: the proxy is overoptimized beyond that KL."
        )
    text.append(
        f"The gap between proxy and true reward at N = {last['n']} is {last['proxy'] - last['true']:.2f} sd; "
        f"selecting by the true reward would give {last['oracle']:.2f} sd."
    )
    fit = r["fits"]["true"]
    if fit["beta"] > 0:
        d_star = fit["alpha"] / (2 * fit["beta"])
        text.append(f"The fitted true-reward curve peaks at sqrt(KL) = {d_star:.2f} (KL {d_star**2:.2f} nats).")
    return text
