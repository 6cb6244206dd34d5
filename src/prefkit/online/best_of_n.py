"""Best-of-N sampling: draw N completions, keep the one a scorer likes best.

`best_of_n` is the plain online feature: sample ``n`` completions of each prompt from a policy and return
the best one by a reward function.

`best_of_n_kl` is the KL divergence between the best-of-N policy and the policy it samples from,
``log N - (N - 1) / N`` (the analytic form used by Stiennon et al. 2020, "Learning to summarize from human
feedback", arXiv:2009.01325, and Gao, Schulman, Hilton 2023, "Scaling Laws for Reward Model
Overoptimization", arXiv:2210.10760; exact for continuous scores, an upper bound in general).

`best_of_n_expectation` estimates what best-of-N achieves for every N from ONE pool of ``M >= N``
samples per prompt, without drawing N-subsets at random (Gao et al. 2023, appendix; Nakano et al. 2021):
sort the pool by the selection score; the i-th smallest of M (1-based) is the maximum of a uniformly
random N-subset with probability ``C(i - 1, N - 1) / C(M, N)``, so the unbiased estimate of the expected
value of the selected sample is ``sum_i C(i - 1, N - 1) / C(M, N) * value_(i)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch import nn

from prefkit.data.judge_prompts import round_robin_scores
from prefkit.online.sampling import Completion, sample_completions

__all__ = [
    "BestOfN",
    "best_of_n",
    "best_of_n_expectation",
    "best_of_n_kl",
    "best_of_n_weights",
    "majority_vote_accuracy",
    "pass_at_n",
    "round_robin_scores",
]


def best_of_n_kl(n: int) -> float:
    """``KL(best-of-n || base) = log n - (n - 1) / n`` nats (0 for n = 1; ``log 2 - 1/2`` for n = 2).

    Stiennon et al. (2020), "Learning to summarize from human feedback", arXiv:2009.01325 (appendix);
    Gao, Schulman, Hilton (2023), "Scaling Laws for Reward Model Overoptimization", arXiv:2210.10760.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    return math.log(n) - (n - 1) / n


def _log_comb(n: int, k: int) -> float:
    return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)


def best_of_n_weights(m: int, n: int) -> np.ndarray:
    """``[m]`` probabilities that the i-th smallest (i = 1..m) of ``m`` pooled samples is the largest of a
    uniformly random ``n``-subset: ``C(i - 1, n - 1) / C(m, n)``, computed in log space; they sum to 1."""
    if not 1 <= n <= m:
        raise ValueError(f"need 1 <= n <= m (pool size), got n={n}, m={m}")
    log_total = _log_comb(m, n)
    return np.array([math.exp(_log_comb(i - 1, n - 1) - log_total) if i >= n else 0.0 for i in range(1, m + 1)])


def _tie_averaged(weights: np.ndarray, sorted_scores: np.ndarray) -> np.ndarray:
    """Each run of equal scores shares the total weight of its positions equally."""
    out = weights.copy()
    _, starts, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    for start, count in zip(starts, counts):
        if count > 1:
            out[start : start + count] = weights[start : start + count].mean()
    return out


def best_of_n_expectation(select_scores, values, n: int) -> float:
    """Unbiased estimate of E[value of the best-of-``n`` sample], averaged over prompts.

    ``select_scores`` and ``values`` are ``[P, M]`` arrays (P prompts, a pool of M >= n samples each):
    best-of-n draws n of a prompt's M samples without replacement and keeps the one with the highest
    select score; the estimate is exact in expectation over those draws (see the module docstring).
    Ties: the selected sample is drawn uniformly among the tied best, so tied samples share their
    positions' weights equally (their values are averaged). Returns the mean over the P prompts.
    """
    scores = np.asarray(select_scores, dtype=np.float64)
    vals = np.asarray(values, dtype=np.float64)
    if scores.ndim != 2 or scores.shape != vals.shape:
        raise ValueError(
            f"select_scores and values must be [P, M] arrays of one shape, got {scores.shape} and {vals.shape}"
        )
    if np.isnan(scores).any() or np.isnan(vals).any():
        raise ValueError("select_scores and values must not contain NaN")
    weights = best_of_n_weights(scores.shape[1], n)
    per_prompt = []
    for s, v in zip(scores, vals):
        order = np.argsort(s, kind="stable")
        per_prompt.append(float(np.dot(_tie_averaged(weights, s[order]), v[order])))
    return float(np.mean(per_prompt))


def pass_at_n(correct, n: int) -> float:
    """Unbiased pass@n from a pool of ``M >= n`` graded samples per problem (Chen et al. 2021, "Evaluating
    Large Language Models Trained on Code", arXiv:2107.03374): ``1 - C(M - c, n) / C(M, n)`` with ``c`` right
    samples, averaged over problems. ``correct``: ``[P, M]`` of 0 / 1. The accuracy of an oracle picker."""
    grid = np.asarray(correct, dtype=np.float64)
    if grid.ndim != 2 or not 1 <= n <= grid.shape[1]:
        raise ValueError(f"correct must be [P, M] with 1 <= n <= M, got shape {grid.shape} and n={n}")
    m = grid.shape[1]
    values = []
    for row in grid:
        c = int(round(row.sum()))
        values.append(1.0 if m - c < n else 1.0 - math.comb(m - c, n) / math.comb(m, n))
    return float(np.mean(values))


def majority_vote_accuracy(
    answers: Sequence[Sequence[Any]], correct, n: int, *, draws: int = 200, seed: int = 0
) -> float:
    """Accuracy of majority vote (self-consistency; Wang et al. 2023, arXiv:2203.11171) over ``n`` samples drawn
    without replacement from each problem's pool: ``answers[p][j]`` the final answer of sample ``j`` (None: no
    answer), ``correct`` ``[P, M]``. Exact (one draw) when ``n == M``; otherwise the mean over ``draws`` random
    subsets per problem, seeded. Ties go to the first sampled of the tied answers
    (`prefkit.online.search.majority_vote`)."""
    from prefkit.online.search import majority_vote

    grid = np.asarray(correct, dtype=np.float64)
    if grid.ndim != 2 or len(answers) != grid.shape[0] or not 1 <= n <= grid.shape[1]:
        raise ValueError(f"answers and correct must be [P, M] with 1 <= n <= M, got {grid.shape} and n={n}")
    m = grid.shape[1]
    rng = np.random.default_rng(seed)
    hits = []
    for row, answer_row in zip(grid, answers):
        for _ in range(1 if n == m else draws):
            pick = np.arange(m) if n == m else rng.choice(m, size=n, replace=False)
            hits.append(row[pick[majority_vote([answer_row[j] for j in pick])]])
    return float(np.mean(hits))


@dataclass
class BestOfN:
    """The best of ``candidates`` (all ``n`` samples of ``prompt``) by ``scores``: ``best`` with ``best_score``."""

    prompt: Any
    best: Completion
    best_score: float
    candidates: list[Completion]
    scores: list[float]


def best_of_n(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[Any],
    n: int,
    score_fn: Callable[[list[tuple[Any, str]]], Sequence[float]] | None = None,
    *,
    judge: Callable | None = None,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    seed: int = 0,
    batch_size: int = 64,
    progress: bool = True,
) -> list[BestOfN]:
    """Sample ``n`` completions of each prompt (`sample_completions`) and keep the best by ``score_fn``.

    ``score_fn`` maps a list of ``(prompt, completion text)`` items to one score each (e.g.
    ``lambda items: prefkit.lab.evaluate.score_responses(rm, tokenizer, items)``); or, instead, ``judge`` is a
    pairwise judge (``(prompts, first, second) -> [P(first preferred)]``: a generative judge,
    `prefkit.eval.judge.LMJudge`, or the lab's annotators) and each completion scores its `round_robin_scores`.
    On a tie the first sampled of the tied completions wins. Returns one `BestOfN` per prompt, in order.
    """
    if (score_fn is None) == (judge is None):
        raise ValueError("best_of_n needs exactly one of score_fn (a score per completion) and judge (pairwise)")
    samples = sample_completions(
        model,
        tokenizer,
        prompts,
        n=n,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        seed=seed,
        batch_size=batch_size,
        progress=progress,
        desc=f"sampling best-of-{n}",
    )
    if judge is not None:
        groups = [[c.text for c in samples[i * n : (i + 1) * n]] for i in range(len(prompts))]
        scores = np.asarray(sum(round_robin_scores(judge, prompts, groups), []), dtype=np.float64)
    else:
        scores = np.asarray(score_fn([(c.prompt, c.text) for c in samples]), dtype=np.float64)
    if scores.shape != (len(samples),):
        raise ValueError(
            f"score_fn returned shape {scores.shape} for {len(samples)} completions; expected one score each"
        )
    out = []
    for i, prompt in enumerate(prompts):
        group, group_scores = samples[i * n : (i + 1) * n], scores[i * n : (i + 1) * n]
        best = int(np.argmax(group_scores))
        out.append(BestOfN(prompt, group[best], float(group_scores[best]), group, group_scores.tolist()))
    return out
