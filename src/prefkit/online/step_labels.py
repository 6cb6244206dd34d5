"""Step labels without annotators: Monte-Carlo estimation with the rollout engine and an outcome verifier.

Math-Shepherd (Wang et al. 2024, "Math-Shepherd: Verify and Reinforce LLMs Step-by-step without Human
Annotations"): from the prefix that ends with step ``k``, the policy completes the solution ``N`` times; the
share of completions a verifier accepts is the soft label of step ``k`` (the chance of reaching the right
answer from there); the hard label says whether any completion does. OmegaPRM (Luo et al. 2024, "Improve
Mathematical Reasoning in Language Models by Automated Process Supervision") finds the first step from which
no completion succeeds by binary search over the prefixes, with about ``log2(steps)`` prefix estimates instead
of one per step; the steps before it are labelled correct, it is labelled wrong, and the steps after it are
left out (as a ProcessBench label would leave them).

Both assume that once a step is wrong every later prefix fails as well; binary search relies on it, the
per-step estimate does not.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from prefkit.data.records import StepwiseRecord
from prefkit.online.rollouts import HFRollouts, SamplingSettings

__all__ = ["MonteCarloLabels", "monte_carlo_step_labels"]


@dataclass
class MonteCarloLabels:
    """The labelled records and what labelling cost: ``rollouts`` completions and ``tokens`` generated."""

    records: list[StepwiseRecord]
    rollouts: int
    tokens: int


def monte_carlo_step_labels(
    model,
    tokenizer,
    records: Sequence[StepwiseRecord],
    verifier: Callable[[str, str], bool],
    *,
    separator: str,
    rollouts: int = 8,
    mode: str = "soft",
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    seed: int = 0,
    batch_size: int = 64,
) -> MonteCarloLabels:
    """Label every step of ``records`` (their own labels are ignored) by completing its prefix ``rollouts``
    times with ``model`` and asking ``verifier(prompt, solution text)``.

    ``mode``: ``"soft"`` (the share of accepted completions), ``"hard"`` (1 when any is accepted; Math-Shepherd's
    HE) or ``"binary_search"`` (OmegaPRM: hard labels up to the first failing step, later steps dropped). The
    prefix of step ``k`` is the prompt's tokens followed by ``steps[:k]`` each ended by ``separator``, as
    `prefkit.data.tokenize.tokenize_stepwise` writes them; a solution is the decoded prefix and completion."""
    if mode not in ("soft", "hard", "binary_search"):
        raise ValueError(f"mode: expected soft, hard or binary_search, got {mode!r}")
    if rollouts < 1:
        raise ValueError(f"rollouts: expected a positive integer, got {rollouts}")
    from prefkit.data.tokenize import tokenize_prompt

    engine = HFRollouts(model, tokenizer, batch_size=batch_size)
    settings = SamplingSettings(n=rollouts, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
    prompt_ids = [tokenize_prompt(r.prompt, tokenizer) for r in records]
    step_ids = [
        [list(tokenizer(step + separator, add_special_tokens=False)["input_ids"]) for step in r.completions]
        for r in records
    ]
    used = {"rollouts": 0, "tokens": 0}

    def estimate(queries: list[tuple[int, int]]) -> list[float]:
        """Share of accepted completions from the prefix ending with step k of record i, per (i, k)."""
        if not queries:
            return []
        prefixes = [prompt_ids[i] + [t for ids in step_ids[i][: k + 1] for t in ids] for i, k in queries]
        room = settings
        if engine.max_context is not None:  # completions end where the model's context does
            budget = min(max_new_tokens, engine.max_context - max(map(len, prefixes)))
            if budget < 1:
                raise ValueError(f"a prefix of {max(map(len, prefixes))} tokens fills the model's context")
            room = dataclasses.replace(settings, max_new_tokens=budget)
        out = engine.generate(prefixes, room, prompt_seeds=[i * 1009 + k for i, k in queries])
        used["rollouts"] += len(out)
        used["tokens"] += sum(len(r.completion_ids) for r in out)
        shares = []
        for q, (i, k) in enumerate(queries):
            prefix = [t for ids in step_ids[i][: k + 1] for t in ids]
            texts = [
                tokenizer.decode(prefix + r.completion_ids, skip_special_tokens=True)
                for r in out[q * rollouts : (q + 1) * rollouts]
            ]
            wins = sum(bool(verifier(records[i].prompt, text)) for text in texts)
            shares.append(wins / rollouts)
        return shares

    if mode != "binary_search":
        queries = [(i, k) for i, r in enumerate(records) for k in range(len(r.completions))]
        values = dict(zip(queries, estimate(queries)))
        labeled = []
        for i, r in enumerate(records):
            soft = [values[(i, k)] for k in range(len(r.completions))]
            labels = soft if mode == "soft" else [v > 0 for v in soft]
            labeled.append(StepwiseRecord(prompt=r.prompt, completions=list(r.completions), labels=labels, id=r.id))
        return MonteCarloLabels(labeled, used["rollouts"], used["tokens"])

    # binary search: lo = steps known good (a prefix succeeds), hi = the first step known to fail (n: none yet)
    bounds = {i: [0, len(r.completions)] for i, r in enumerate(records)}
    known_fail = {i: False for i in bounds}
    while True:
        queries = [(i, (lo + hi) // 2) for i, (lo, hi) in bounds.items() if lo < hi]
        if not queries:
            break
        for (i, mid), share in zip(queries, estimate(queries)):
            if share > 0:
                bounds[i][0] = mid + 1
            else:
                bounds[i][1], known_fail[i] = mid, True
    labeled = []
    for i, r in enumerate(records):
        first = bounds[i][1]
        if known_fail[i]:
            steps, labels = list(r.completions[: first + 1]), [True] * first + [False]
        else:
            steps, labels = list(r.completions), [True] * len(r.completions)
        labeled.append(StepwiseRecord(prompt=r.prompt, completions=steps, labels=labels, id=r.id))
    return MonteCarloLabels(labeled, used["rollouts"], used["tokens"])
