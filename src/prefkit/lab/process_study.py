"""``prefkit lab study process``: process against outcome rewards on the verifiable arithmetic world.

The world (`prefkit.lab.reasoning.ArithmeticWorld`) knows whether every step of a solution is right, so each
reward model can be checked step by step and by the answers it picks. Per seed:

1. Training solutions: ``samples`` solutions of each of ``train_problems`` fresh problems, sampled from the
   imperfect arithmetic reference policy. A solution's steps are its operation steps and its final
   ``answer D`` (the answer step is right when the answer is).
2. Four reward models, each trained on those solutions:
   - ``prm``: a process reward model on the true step labels (``prm_bce``; the reference's backbone with a
     new per-step head);
   - ``prm_mc``: the same on Monte-Carlo labels (`prefkit.online.step_labels.monte_carlo_step_labels`:
     ``mc_rollouts`` completions from every prefix, the share that ends with the right answer; Math-Shepherd);
   - ``orm``: an outcome reward model (the same head, read once at the end of the whole solution, trained on
     whether the answer is right);
   - ``implicit``: a copy of the policy trained with ``implicit_prm_ce`` on the outcomes; its q-values
     (cumulative beta * log-ratio) are the step scores (Yuan et al. 2024).
3. Test: a pool of ``pool`` solutions of each of ``test_problems`` fresh problems. Best-of-N accuracy for
   every N (the unbiased estimate from one pool, `prefkit.online.best_of_n.best_of_n_expectation`) when the
   sample is picked by each reward model (PRMs aggregate their step probabilities by ``min``; every
   aggregation is reported for ``prm``), by majority vote over the stated answers (Monte-Carlo over random
   N-subsets), and by an oracle (pass@N). Tokens: N times the mean completion length.
4. Step-level quality of the step scorers on the test pool against the true labels: step AUROC and
   ProcessBench F1 at threshold 0.5; and how often the Monte-Carlo labels agree with the truth.
5. Search at small budgets with ``prm``: step-level beam search (beam 2, 2 expansions) and MCTS (``prm`` as
   value), accuracy and generated tokens per problem, beside best-of-N at similar tokens.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from prefkit.lab.studies import _pm as _pm_mean_se
from prefkit.lab.studies import _se

__all__ = ["SCORERS", "process_study"]

SCORERS = ("majority", "orm", "prm", "prm_mc", "implicit", "oracle")
SEPARATOR = " ;"


def world_steps(text: str) -> list[str]:
    """The steps of an arithmetic solution: its operation steps, then ``answer D`` when it states one."""
    body, marker, tail = text.partition("answer")
    steps = [s.strip() for s in body.split(";") if s.strip()]
    if marker:
        steps.append(("answer " + tail.split()[0]) if tail.split() else "answer")
    return steps


def world_labels(world, problem: str, text: str) -> list[bool]:
    """True step labels for `world_steps`: the world's per-step truth, and the answer step right when the answer is."""
    labels = list(world.step_labels(problem, text))
    if "answer" in text:
        labels.append(world.is_correct(problem, text))
    return labels


def _quiet():
    return contextlib.redirect_stdout(io.StringIO())


def _sample(model, tokenizer, problems: list[str], n: int, seed: int, max_new_tokens: int):
    from prefkit.online.search import sample_candidates

    return sample_candidates(model, tokenizer, problems, n, max_new_tokens=max_new_tokens, seed=seed, batch_size=512)


def _stepwise(world, problems: list[str], candidates) -> list:
    from prefkit.data.records import StepwiseRecord

    out = []
    for problem, cands in zip(problems, candidates):
        for text in cands.texts:
            steps = world_steps(text)
            if steps:
                out.append(StepwiseRecord(prompt=problem, completions=steps, labels=world_labels(world, problem, text)))
    return out


def _train_head(folder: str, tokenizer, records, *, steps: int, seed: int, learning_rate: float):
    """A PRM (or, on one-step records, an ORM) on the reference's backbone; returns a `PRMScorer`."""
    import transformers

    from prefkit.lab.runs import _config, _train
    from prefkit.models.process import PRMScorer, build_process_reward_model
    from prefkit.train.process import ProcessRewardTrainer

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # the load report: the LM head unused, the new head missing
    try:
        model = build_process_reward_model(
            folder, step_separator=SEPARATOR, pad_token_id=tokenizer.pad_token_id, seed=seed
        )
    finally:
        transformers.logging.set_verbosity(verbosity)
    with tempfile.TemporaryDirectory() as tmp, _quiet():
        args = _config(
            tmp,
            loss="prm_bce",
            loss_params={},
            steps=steps,
            batch_size=32,
            learning_rate=learning_rate,
            seed=seed,
            progress=False,
            eval_every=None,
            logging_steps=max(1, steps // 5),
        )
        args.step_separator = SEPARATOR
        trainer = ProcessRewardTrainer(model, args, train_dataset=list(records), processing_class=tokenizer)
        _train(trainer, False)
    return PRMScorer(trainer.model.eval(), tokenizer, batch_size=256)


def _train_implicit(reference, world, problems, candidates, *, steps: int, seed: int, learning_rate: float):
    from prefkit.data.records import UnpairedRecord
    from prefkit.eval.implicit import ImplicitPRM
    from prefkit.lab.runs import train_policy
    from prefkit.lab.studies import _trainable
    from prefkit.losses import get_loss

    records = [
        UnpairedRecord(prompt=p, completion=t, label=world.is_correct(p, t))
        for p, c in zip(problems, candidates)
        for t in c.texts
        if t.strip()
    ]
    start = _trainable(reference)  # its model becomes the run's frozen reference; the policy is a copy
    with tempfile.TemporaryDirectory() as tmp, _quiet():
        trainer = train_policy(
            start,
            records,
            output_dir=tmp,
            loss="implicit_prm_ce",
            steps=steps,
            batch_size=32,
            learning_rate=learning_rate,
            seed=seed,
            progress=False,
        )
    policy = trainer.model.eval()
    beta = get_loss("implicit_prm_ce").hyperparameters["beta"]  # train_policy trains at the loss's default
    return ImplicitPRM(
        policy, start.model, reference.tokenizer, beta=beta, separator=SEPARATOR, cumulative=True, batch_size=256
    )


def _step_quality(scorer, world, problems, candidates) -> dict[str, Any]:
    from prefkit.eval.process import evaluate_steps

    records = _stepwise(world, problems, candidates)
    results = evaluate_steps(records, ["all"] * len(records), scorer.score(records))
    return {"step_auroc": results["step_auroc"], "processbench_f1": results["processbench"]["f1"]}


def _one_seed(world, reference, folder: str, seed: int, cfg: dict[str, Any], say) -> dict[str, Any]:
    from prefkit.data.records import StepwiseRecord
    from prefkit.online.best_of_n import best_of_n_expectation, majority_vote_accuracy, pass_at_n
    from prefkit.online.search import (
        AGGREGATIONS,
        aggregate_probabilities,
        prm_mcts,
        prm_scores,
        step_beam_search,
        step_probabilities,
    )
    from prefkit.online.step_labels import monte_carlo_step_labels

    tok, model = reference.tokenizer, reference.model
    length = world.max_len + 1
    rng = np.random.default_rng([seed, 31])
    train_problems = world.sample_problems(cfg["train_problems"], rng)
    test_problems = world.sample_problems(cfg["test_problems"], rng)
    train = _sample(model, tok, train_problems, cfg["samples"], seed=1000 + seed, max_new_tokens=length)
    records = _stepwise(world, train_problems, train)
    say(f"  seed {seed}: {len(records)} training solutions; training prm, prm_mc, orm, implicit")
    steps, lr = cfg["rm_steps"], cfg["learning_rate"]
    scorers = {"prm": _train_head(folder, tok, records, steps=steps, seed=seed, learning_rate=lr)}
    verifier = lambda problem, text: world.is_correct(problem, text)  # noqa: E731
    mc = monte_carlo_step_labels(
        model,
        tok,
        records,
        verifier,
        separator=SEPARATOR,
        rollouts=cfg["mc_rollouts"],
        max_new_tokens=length,
        seed=2000 + seed,
        batch_size=512,
    )
    truth = [y for r in records for y in r.labels]
    estimate = [y for r in mc.records for y in r.labels]
    subset = records[: cfg["binary_search_solutions"]]
    binary = monte_carlo_step_labels(
        model,
        tok,
        subset,
        verifier,
        separator=SEPARATOR,
        rollouts=cfg["mc_rollouts"],
        mode="binary_search",
        max_new_tokens=length,
        seed=2000 + seed,
        batch_size=512,
    )
    binary_agree = [a == b for r, s in zip(subset, binary.records) for a, b in zip(r.labels[: len(s.labels)], s.labels)]
    per_step = [(e > 0.5) == t for r, m in zip(subset, mc.records) for e, t in zip(m.labels, r.labels)]
    labels_info = {
        "agreement": float(np.mean([(e > 0.5) == t for e, t in zip(estimate, truth)])),
        "mean_estimate_on_correct": float(np.mean([e for e, t in zip(estimate, truth) if t])),
        "mean_estimate_on_wrong": float(np.mean([e for e, t in zip(estimate, truth) if not t] or [float("nan")])),
        "rollouts": mc.rollouts,
        "binary_search_agreement": float(np.mean(binary_agree)),
        "binary_search_rollouts": binary.rollouts,
        "per_step_agreement_on_subset": float(np.mean(per_step)),
        "per_step_rollouts_on_subset": cfg["mc_rollouts"] * sum(len(r.completions) for r in subset),
        "wrong_share": float(1 - np.mean(truth)),
    }
    scorers["prm_mc"] = _train_head(folder, tok, mc.records, steps=steps, seed=seed, learning_rate=lr)
    outcome_records = [  # the whole solution as one step, labelled by its answer
        StepwiseRecord(prompt=p, completions=[" ; ".join(pieces)], labels=[world.is_correct(p, t)])
        for p, c in zip(train_problems, train)
        for t in c.texts
        if (pieces := world_steps(t))
    ]
    scorers["orm"] = _train_head(folder, tok, outcome_records, steps=steps, seed=seed, learning_rate=lr)
    scorers["implicit"] = _train_implicit(
        reference,
        world,
        train_problems,
        train,
        steps=cfg["implicit_steps"],
        seed=seed,
        learning_rate=cfg["implicit_learning_rate"],
    )

    say(f"  seed {seed}: best-of-N on {len(test_problems)} problems x {cfg['pool']} samples")
    pool = _sample(model, tok, test_problems, cfg["pool"], seed=3000 + seed, max_new_tokens=length)
    texts = [c.texts for c in pool]
    correct = np.array([[world.is_correct(p, t) for t in row] for p, row in zip(test_problems, texts)], dtype=float)
    mean_tokens = float(np.mean([len(ids) for c in pool for ids in c.token_ids]))
    whole = lambda text: [" ; ".join(world_steps(text))] if world_steps(text) else []  # noqa: E731
    prm_steps = step_probabilities(scorers["prm"], test_problems, texts, world_steps)  # scored once
    select = {
        "orm": prm_scores(scorers["orm"], test_problems, texts, whole, "last"),
        "prm": aggregate_probabilities(prm_steps, "min"),
        "prm_mc": prm_scores(scorers["prm_mc"], test_problems, texts, world_steps, "min"),
        "implicit": prm_scores(scorers["implicit"], test_problems, texts, world_steps, "min"),
    }
    ns = [n for n in cfg["ns"] if n <= cfg["pool"]]
    curves = {name: {n: best_of_n_expectation(s, correct, n) for n in ns} for name, s in select.items()}
    answers = [[world.stated_answer(t) for t in row] for row in texts]
    curves["majority"] = {n: majority_vote_accuracy(answers, correct, n, seed=seed) for n in ns}
    curves["oracle"] = {n: pass_at_n(correct, n) for n in ns}
    aggregations = {
        how: best_of_n_expectation(aggregate_probabilities(prm_steps, how), correct, ns[-1]) for how in AGGREGATIONS
    }
    quality = {name: _step_quality(scorers[name], world, test_problems, pool) for name in ("prm", "prm_mc", "implicit")}

    say(f"  seed {seed}: beam search and MCTS with prm")
    search_problems = test_problems[: cfg["search_problems"]]
    common = dict(separator=";", steps_of=world_steps, max_steps=world.max_ops + 1, step_tokens=8, seed=4000 + seed)
    with _quiet():
        beam = step_beam_search(
            model, tok, scorers["prm"], search_problems, beam_width=2, expansions=2, how="min", **common
        )
        mcts = prm_mcts(
            model, tok, scorers["prm"], search_problems, simulations=cfg["mcts_simulations"], expansions=2, **common
        )
    search = {}
    for name, results in (("beam", beam), ("mcts", mcts)):
        search[name] = {
            "accuracy": float(np.mean([world.is_correct(p, r.text) for p, r in zip(search_problems, results)])),
            "tokens": float(np.mean([r.tokens for r in results])),
        }
    return {
        "seed": seed,
        "n_train_solutions": len(records),
        "mean_tokens": mean_tokens,
        "curves": {k: {str(n): v for n, v in c.items()} for k, c in curves.items()},
        "prm_aggregations": aggregations,
        "step_quality": quality,
        "mc_labels": labels_info,
        "search": search,
        "pool_accuracy": float(correct.mean()),
    }


def _summary(runs: list[dict[str, Any]], ns: list[int]) -> dict[str, Any]:
    def stat(values):
        return {"mean": float(np.mean(values)), "se": _se(values)}

    out: dict[str, Any] = {"curves": {}, "aggregations": {}, "step_quality": {}, "search": {}, "mc_labels": {}}
    for name in SCORERS:
        out["curves"][name] = {str(n): stat([r["curves"][name][str(n)] for r in runs]) for n in ns}
    for how in runs[0]["prm_aggregations"]:
        out["aggregations"][how] = stat([r["prm_aggregations"][how] for r in runs])
    for name in runs[0]["step_quality"]:
        out["step_quality"][name] = {
            k: stat([r["step_quality"][name][k] for r in runs if r["step_quality"][name][k] is not None])
            for k in ("step_auroc", "processbench_f1")
        }
    for name in runs[0]["search"]:
        out["search"][name] = {k: stat([r["search"][name][k] for r in runs]) for k in ("accuracy", "tokens")}
    for key in runs[0]["mc_labels"]:
        out["mc_labels"][key] = stat([r["mc_labels"][key] for r in runs])
    out["mean_tokens"] = stat([r["mean_tokens"] for r in runs])
    return out


def _pm(s: dict[str, float], digits: int = 3) -> str:
    return _pm_mean_se(s["mean"], s["se"], digits)


def _reading(summary: dict[str, Any], ns: list[int]) -> list[str]:
    """Plain sentences on what the numbers show (differences beyond 2 standard errors count as a difference)."""
    big = str(ns[-1])
    c = summary["curves"]

    def compare(a: str, b: str) -> str:
        ma, mb = c[a][big]["mean"], c[b][big]["mean"]
        se = math.hypot(c[a][big]["se"], c[b][big]["se"])
        if math.isnan(se) or abs(ma - mb) <= 2 * se:
            return f"{a} and {b} are within 2 standard errors of each other at N = {big} ({ma:.3f} vs {mb:.3f})"
        return f"{a} {'beats' if ma > mb else 'trails'} {b} at N = {big} ({ma:.3f} vs {mb:.3f})"

    lines = [
        f"Best-of-N: {compare('prm', 'orm')}; {compare('prm', 'majority')}; {compare('prm', 'prm_mc')};"
        f" {compare('implicit', 'orm')}.",
    ]
    gap = {n: c["prm"][str(n)]["mean"] - c["orm"][str(n)]["mean"] for n in ns}
    if gap[ns[-1]] > gap[ns[0]] + 1e-9:
        lines.append(
            f"The PRM's lead over the ORM grows with N ({gap[ns[0]]:+.3f} at N = {ns[0]}, {gap[ns[-1]]:+.3f} at "
            f"N = {ns[-1]}), the direction Lightman et al. report."
        )
    else:
        lines.append(
            f"The PRM's lead over the ORM does not grow with N here ({gap[ns[0]]:+.3f} at N = {ns[0]}, "
            f"{gap[ns[-1]]:+.3f} at N = {ns[-1]}): the paper's direction does not appear on this world."
        )
    return lines


def _plot(summary: dict[str, Any], ns: list[int], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    tokens = summary["mean_tokens"]["mean"]
    for name in SCORERS:
        curve = summary["curves"][name]
        mean = [curve[str(n)]["mean"] for n in ns]
        se = [0 if math.isnan(curve[str(n)]["se"]) else curve[str(n)]["se"] for n in ns]
        style = ":" if name == "oracle" else "-"
        left.errorbar(ns, mean, yerr=se, marker="o", capsize=3, linestyle=style, label=name)
        if name in ("prm", "majority", "orm"):
            right.errorbar([n * tokens for n in ns], mean, yerr=se, marker="o", capsize=3, label=f"best-of-N, {name}")
    for name, marker in (("beam", "s"), ("mcts", "^")):
        s = summary["search"][name]
        right.errorbar(
            [s["tokens"]["mean"]],
            [s["accuracy"]["mean"]],
            yerr=[0 if math.isnan(s["accuracy"]["se"]) else s["accuracy"]["se"]],
            marker=marker,
            markersize=9,
            linestyle="none",
            label=f"{name} (prm)",
        )
    left.set(xscale="log", xlabel="N (samples per problem)", ylabel="accuracy of the picked answer", title="Best-of-N")
    left.set_xticks(ns, [str(n) for n in ns])
    right.set(xscale="log", xlabel="generated tokens per problem", ylabel="accuracy", title="Accuracy against tokens")
    left.legend(fontsize=8)
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "process.png", dpi=100)
    plt.close(fig)


def _markdown(results: dict[str, Any]) -> list[str]:
    ns, s = results["ns"], results["summary"]
    lines = [
        "# Process against outcome rewards (lab study `process`)",
        "",
        f"Arithmetic world, seeds {results['seeds']}; {results['train_problems']} training problems x "
        f"{results['samples']} samples from the reference; reward models trained {results['rm_steps']} steps; "
        f"test: {results['test_problems']} problems x a pool of {results['pool']}; Monte-Carlo labels from "
        f"{results['mc_rollouts']} rollouts per prefix. Mean ± SE over seeds.",
        "",
        "## Best-of-N accuracy",
        "",
        "| picked by | " + " | ".join(f"N = {n}" for n in ns) + " |",
        "|---|" + "---|" * len(ns),
    ]
    for name in SCORERS:
        lines.append(f"| {name} | " + " | ".join(_pm(s["curves"][name][str(n)]) for n in ns) + " |")
    lines += [
        "",
        f"Tokens per sample: {_pm(s['mean_tokens'], 1)} (best-of-N generates N times that per problem).",
        "",
        f"PRM aggregations at N = {ns[-1]}: " + ", ".join(f"{k} {_pm(v)}" for k, v in s["aggregations"].items()) + ".",
        "",
        "## Step-level quality on the test pool (true step labels)",
        "",
        "| step scorer | step AUROC | ProcessBench F1 (threshold 0.5) |",
        "|---|---|---|",
    ]
    for name, q in s["step_quality"].items():
        lines.append(f"| {name} | {_pm(q['step_auroc'])} | {_pm(q['processbench_f1'])} |")
    m = s["mc_labels"]
    lines += [
        "",
        f"Monte-Carlo labels against the truth: agreement (estimate > 0.5) {_pm(m['agreement'])}; mean estimate "
        f"on correct steps {_pm(m['mean_estimate_on_correct'])}, on wrong steps {_pm(m['mean_estimate_on_wrong'])}; "
        f"{_pm(m['rollouts'], 0)} rollouts. On the first {results['binary_search_solutions']} solutions, binary "
        f"search (OmegaPRM; hard labels up to the first failing prefix) agrees with the truth on "
        f"{_pm(m['binary_search_agreement'])} of the steps it labels with {_pm(m['binary_search_rollouts'], 0)} "
        f"rollouts, the per-step estimate on {_pm(m['per_step_agreement_on_subset'])} with "
        f"{_pm(m['per_step_rollouts_on_subset'], 0)}. Share of wrong steps: {_pm(m['wrong_share'])}.",
        "",
        f"## Search with the PRM ({results['search_problems']} problems)",
        "",
        "| search | generated tokens per problem | accuracy |",
        "|---|---|---|",
    ]
    for name, v in s["search"].items():
        lines.append(f"| {name} | {_pm(v['tokens'], 1)} | {_pm(v['accuracy'])} |")
    for n in ns:
        lines.append(f"| best-of-{n}, prm | {n * s['mean_tokens']['mean']:.1f} | {_pm(s['curves']['prm'][str(n)])} |")
    lines += ["", "![process study](process.png)", "", "## What this shows", "", " ".join(_reading(s, ns)), ""]
    lines.append(f"Run time {results['seconds'] / 60:.1f} min.")
    return lines


def process_study(
    *,
    seeds: Sequence[int] = (0, 1, 2),
    train_problems: int = 2048,
    samples: int = 4,
    test_problems: int = 128,
    pool: int = 16,
    ns: Sequence[int] = (1, 2, 4, 8, 16),
    mc_rollouts: int = 4,
    rm_steps: int = 3000,
    learning_rate: float = 1e-3,
    implicit_steps: int = 1000,
    implicit_learning_rate: float = 1e-4,
    binary_search_solutions: int = 1024,
    search_problems: int = 64,
    mcts_simulations: int = 6,
    output_dir: str | Path = "runs/lab/process",
    cache_dir=None,
    progress: bool = True,
    arithmetic_spec=None,
) -> dict[str, Any]:
    """The study in the module docstring; writes ``results.json``, ``results.md`` and ``process.png`` into
    ``output_dir`` and returns the results. ``arithmetic_spec``: the reference's `ReferenceSpec` (None: the
    default; tests pass a smaller one)."""
    from prefkit.lab.reasoning import ArithmeticWorld, arithmetic_reference

    for key, value in (
        ("train_problems", train_problems),
        ("samples", samples),
        ("test_problems", test_problems),
        ("pool", pool),
        ("mc_rollouts", mc_rollouts),
        ("rm_steps", rm_steps),
        ("implicit_steps", implicit_steps),
        ("search_problems", search_problems),
        ("mcts_simulations", mcts_simulations),
        ("binary_search_solutions", binary_search_solutions),
    ):
        if value < 1:
            raise ValueError(f"{key} must be at least 1, got {value}")
    if not seeds:
        raise ValueError("name at least one seed")
    ns = sorted({int(n) for n in ns if 1 <= int(n) <= pool})
    if not ns:
        raise ValueError(f"ns: expected sizes between 1 and the pool ({pool})")
    start = time.perf_counter()
    say = print if progress else (lambda *a, **k: None)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    world = ArithmeticWorld()
    kwargs = {"cache_dir": cache_dir, "progress": progress}
    if arithmetic_spec is not None:
        kwargs["spec"] = arithmetic_spec
    reference = arithmetic_reference(world, 0, **kwargs)
    cfg = dict(
        train_problems=train_problems,
        samples=samples,
        test_problems=test_problems,
        pool=pool,
        ns=ns,
        mc_rollouts=mc_rollouts,
        rm_steps=rm_steps,
        learning_rate=learning_rate,
        implicit_steps=implicit_steps,
        implicit_learning_rate=implicit_learning_rate,
        search_problems=search_problems,
        mcts_simulations=mcts_simulations,
        binary_search_solutions=binary_search_solutions,
    )
    say(f"process study: seeds {list(seeds)} on the arithmetic world")
    with tempfile.TemporaryDirectory() as tmp:
        folder = str(Path(tmp) / "reference")
        reference.model.save_pretrained(folder)
        reference.tokenizer.save_pretrained(folder)
        runs = [_one_seed(world, reference, folder, seed, cfg, say) for seed in seeds]
    results = {
        "study": "process",
        "seeds": list(seeds),
        **{k: v for k, v in cfg.items() if k != "ns"},
        "ns": ns,
        "runs": runs,
        "summary": _summary(runs, ns),
        "seconds": time.perf_counter() - start,
    }
    _plot(results["summary"], ns, out)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text("\n".join(_markdown(results)) + "\n")
    say(f"  wrote {out}/results.md, results.json, process.png ({results['seconds']:.0f} s)")
    return results
