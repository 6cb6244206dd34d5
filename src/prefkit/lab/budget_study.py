"""``prefkit lab study budget``: online against offline preference learning at the same label budget.

Tajwar et al. 2024 ("Preference Fine-Tuning of LLMs Should Leverage Suboptimal, On-Policy Data") and Song
et al. 2024 ("The Importance of Online Data") argue that labels on the policy's own samples are worth more
than labels on a fixed dataset. Here, on the preference world ``default``, every method gets ``budget``
annotator calls:

- ``offline_dpo``: ``budget`` pairs sampled once from the reference (two responses to a random prompt),
  labelled by the lab's Bradley-Terry annotator (temperature 1), DPO for 2 epochs;
- ``iterative_dpo``: 3 rounds of ``budget / 3`` such pairs, each round sampled from the current policy
  (`prefkit.online.iterative`);
- ``online_dpo``: `OnlinePreferenceTrainer`, two samples per prompt and one annotator call per prompt per
  step, ``budget / 8`` steps of 8 prompts;
- ``grpo``: `OnlineTrainer` on an annotator's noisy ratings (the true reward plus logistic noise of scale 1,
  one call per completion), G = 4, ``budget / 16`` steps of 4 prompts.

All use DPO's beta 0.1 where they have one and the same learning rate. The final policy's mean true reward
and KL to the reference (16 samples of every prompt) are reported, mean ± SE over seeds.

The coverage case (``coverage=True``): the offline pairs are drawn from the reference *conditioned on not
using the world's good words* (rejection sampling), so the offline data never shows the high-reward
region; online methods sample from their own policy and can find it.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from prefkit.lab.online_study import _args, _se, _train_online, world_evaluator

__all__ = ["METHODS", "budget_study"]

METHODS = ("offline_dpo", "iterative_dpo", "online_dpo", "grpo")


def _offline_pairs(world, reference, n: int, seed: int, coverage: bool):
    """``n`` Bradley-Terry-labelled pairs of reference samples; with ``coverage`` the samples use no good word."""
    from prefkit.data.records import PairwiseRecord
    from prefkit.lab.annotators import BradleyTerry
    from prefkit.lab.world import GOOD_WORDS
    from prefkit.online.sampling import sample_completions

    rng = np.random.default_rng([seed, 31])
    prompts = rng.choice(list(world.prompts), size=n).tolist()
    pool: dict[str, list[str]] = {p: [] for p in dict.fromkeys(prompts)}  # ordered: runs repeat exactly
    need = {p: 2 * prompts.count(p) for p in pool}
    draw = 0
    while any(len(pool[p]) < need[p] for p in pool):
        draw += 1
        wanted = [p for p in pool if len(pool[p]) < need[p]]
        samples = sample_completions(
            reference.model,
            reference.tokenizer,
            wanted,
            n=64,
            max_new_tokens=3 * world.max_len,
            seed=seed * 1000 + draw,
            progress=False,
        )
        for c in samples:
            if coverage and any(w in GOOD_WORDS for w in c.text.split()):
                continue
            if len(pool[c.prompt]) < need[c.prompt]:
                pool[c.prompt].append(c.text)
        if draw > 200:
            raise RuntimeError("could not draw enough reference samples without good words")
    annotator = BradleyTerry(1.0)
    records = []
    for i, p in enumerate(prompts):
        a, b = pool[p].pop(), pool[p].pop()
        first = annotator.prefer(world, p, a, b, rng)
        chosen, rejected = (a, b) if first else (b, a)
        records.append(PairwiseRecord(prompt=p, chosen=chosen, rejected=rejected, id=f"offline-{i}"))
    return records


@dataclass
class _Setting:
    """What every method's run shares."""

    world: Any
    reference: Any
    evaluate: Any
    true_scores: Any
    judge: Any
    budget: int
    learning_rate: float
    max_new: int


def _offline_dpo(c: _Setting, seed: int, tmp: str, pairs) -> dict[str, float]:
    from prefkit.lab.runs import train_policy
    from prefkit.lab.studies import _trainable

    trainer = train_policy(
        _trainable(c.reference),
        pairs,
        output_dir=tmp,
        loss="dpo",
        loss_params={"beta": 0.1},
        steps=2 * math.ceil(c.budget / 8),
        batch_size=8,
        learning_rate=c.learning_rate,
        seed=seed,
        progress=False,
    )
    return c.evaluate(trainer.accelerator.unwrap_model(trainer.model), 1)


def _iterative_dpo(c: _Setting, seed: int, tmp: str, pairs=None) -> dict[str, float]:
    from transformers import AutoModelForCausalLM

    from prefkit.lab.studies import _trainable
    from prefkit.online.iterative import IterativeSettings, iterative_dpo
    from prefkit.online.rewards import CombinedReward
    from prefkit.online.rollouts import SamplingSettings

    prompts = np.random.default_rng([seed, 33]).choice(list(c.world.prompts), size=c.budget).tolist()
    training = dict(
        loss="dpo",
        loss_params={"beta": 0.1},
        num_train_epochs=2,
        per_device_train_batch_size=8,
        learning_rate=c.learning_rate,
        lr_scheduler_type="constant",
        logging_steps=50,
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        seed=seed,
        report_to="none",
    )

    def true_reward(prompts_, completions, **fields):
        return [float(x) for x in c.true_scores(list(zip(prompts_, completions)))]

    iterative_dpo(
        _trainable(c.reference).model,
        c.reference.tokenizer,
        [{"prompt": p} for p in prompts],
        settings=IterativeSettings(rounds=3, sampling=SamplingSettings(n=2, max_new_tokens=c.max_new, seed=seed)),
        training=training,
        rewards=CombinedReward([("true", true_reward, 1.0)]),
        judge=c.judge,
        output_dir=Path(tmp) / "it",
        load_policy=AutoModelForCausalLM.from_pretrained,
        say=lambda *a: None,
    )
    return c.evaluate(AutoModelForCausalLM.from_pretrained(Path(tmp) / "it" / "round_3" / "model"), 1)


def _online(c: _Setting, seed: int, tmp: str, pairs=None, *, dpo: bool) -> dict[str, float]:
    """Online DPO (two samples per prompt, one judge call each) or GRPO (G = 4 noisy ratings)."""
    from prefkit.online.preference import OnlinePreferenceArguments, OnlinePreferenceTrainer
    from prefkit.online.rewards import CombinedReward

    k, per_step = (2, 8) if dpo else (4, 4)
    steps = c.budget // per_step if dpo else c.budget // (k * per_step)
    rng = np.random.default_rng([seed, 35])
    records = [{"prompt": p} for p in rng.choice(list(c.world.prompts), size=steps * per_step).tolist()]
    noise = np.random.default_rng([seed, 37])

    def rating(prompts_, completions, **fields):
        true = c.true_scores(list(zip(prompts_, completions)))
        return [float(t + noise.logistic(0.0, 1.0)) for t in true]

    method = (
        {"args_class": OnlinePreferenceArguments, "loss": "dpo", "loss_params": {"beta": 0.1}}
        if dpo
        else {"loss": "grpo", "advantage": "grpo"}
    )
    args = _args(
        tmp,
        steps=steps,
        prompts=per_step,
        generations=k,
        max_new_tokens=c.max_new,
        lr=c.learning_rate,
        seed=seed,
        **method,
    )

    def judged(*a, **kw):
        return OnlinePreferenceTrainer(*a, judge=c.judge, **kw)

    points = _train_online(
        c.reference,
        records,
        CombinedReward([("rating", rating, 1.0)]),
        args,
        c.evaluate,
        steps,
        trainer_class=judged if dpo else None,
    )
    return points[-1]


RUNNERS = {
    "offline_dpo": _offline_dpo,
    "iterative_dpo": _iterative_dpo,
    "online_dpo": lambda c, seed, tmp, pairs=None: _online(c, seed, tmp, dpo=True),
    "grpo": lambda c, seed, tmp, pairs=None: _online(c, seed, tmp, dpo=False),
}


def budget_study(
    *,
    methods: Sequence[str] = METHODS,
    budget: int = 384,
    seeds: Sequence[int] = (0, 1, 2),
    coverage: Sequence[bool] = (False, True),
    learning_rate: float = 5e-4,
    output_dir: str | Path = "runs/lab/budget",
    cache_dir=None,
    progress: bool = True,
    world_spec=None,
) -> dict[str, Any]:
    """The study (module docstring); writes ``results.json`` and ``results.md``."""
    from prefkit.lab.policy import ReferenceSpec, reference_policy
    from prefkit.lab.rewards import lab_judge
    from prefkit.lab.world import make_world

    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; expected some of {', '.join(METHODS)}")
    if budget < 48:
        raise ValueError(f"budget must be at least 48 annotator calls, got {budget}")
    if not seeds:
        raise ValueError("name at least one seed")
    start = time.perf_counter()
    say = print if progress else (lambda *a, **k: None)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    world = make_world("default", 0)
    reference = reference_policy(world, 0, spec=world_spec or ReferenceSpec(), cache_dir=cache_dir, progress=progress)

    def true_scores(items):
        return np.array([world.true_reward(p, t) for p, t in items])

    evaluate = world_evaluator(world, reference, true_scores)
    setting = _Setting(
        world,
        reference,
        evaluate,
        true_scores,
        lab_judge("default", temperature=1.0),
        budget,
        learning_rate,
        3 * world.max_len,
    )
    base = evaluate(reference.model, 0)
    runs = []
    for cover in coverage:
        for seed in seeds:
            pairs = _offline_pairs(world, reference, budget, seed, cover) if "offline_dpo" in methods else None
            for name in methods:
                if cover and name != "offline_dpo" and False in coverage:
                    continue  # the online methods never see the offline data: the same runs as without coverage
                t0 = time.perf_counter()
                with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()):
                    final = RUNNERS[name](setting, seed, tmp, pairs)
                runs.append(
                    {
                        "method": name,
                        "coverage": cover,
                        "seed": seed,
                        "true": final["true"],
                        "kl": final["kl"],
                        "seconds": time.perf_counter() - t0,
                    }
                )
                say(
                    f"  coverage {cover}, seed {seed}, {name}: true reward {final['true']:.3f}, KL {final['kl']:.2f} "
                    f"({runs[-1]['seconds']:.0f} s)"
                )
    results = {
        "study": "budget",
        "methods": list(methods),
        "budget": budget,
        "seeds": list(seeds),
        "coverage": list(coverage),
        "learning_rate": learning_rate,
        "reference": base,
        "runs": runs,
        "seconds": time.perf_counter() - start,
    }
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text("\n".join(_markdown(results)) + "\n")
    say(f"  wrote {out}/results.md, results.json ({results['seconds']:.0f} s)")
    return results


def _markdown(r: dict[str, Any]) -> list[str]:
    ref = r["reference"]
    lines = [
        "# Online against offline preference learning at one label budget (lab world `default`)",
        "",
        f"{r['budget']} annotator calls per method; learning rate {r['learning_rate']:g}; seeds {r['seeds']}. "
        f"Reference: true reward {ref['true']:.3f}. Mean ± SE over seeds of the final policy's true reward and "
        "KL to the reference (16 samples of every prompt). In the coverage case only the offline pairs change "
        "(reference samples without the good words); the online methods' runs are those of the first table.",
        "",
        "| method | offline data | true reward | KL (nats) |",
        "|---|---|---|---|",
    ]
    for cover in r["coverage"]:
        for name in r["methods"]:
            these = [x for x in r["runs"] if x["method"] == name and x["coverage"] == cover]
            if not these:
                continue
            t, k = [x["true"] for x in these], [x["kl"] for x in these]
            label = "good words removed" if cover else "reference samples"
            lines.append(f"| {name} | {label} | {np.mean(t):.3f} ± {_se(t):.3f} | {np.mean(k):.2f} ± {_se(k):.2f} |")
    lines += ["", f"{r['seconds']:.0f} s in all."]
    return lines
