"""Ground-truth evaluation in a lab world: policies by the true reward of their samples, reward models by
their agreement with the true preferences.

Policy (`evaluate_policy`), from ``n_per_prompt`` samples of every prompt of the world
(`World.prompts`), drawn with `prefkit.online.sample_completions` (ancestral sampling, temperature 1):

- ``mean_reward``: the mean population true reward ``r(x, y)`` of the samples (with its standard
  error), and ``group_rewards[g]`` the mean of ``r_g``; ``worst_group`` is the group with the lowest.
- ``kl``: KL(pi || pi_ref) per response, the Monte-Carlo mean of ``log pi(y|x) - log pi_ref(y|x)``
  over the policy's own samples (computed from the sampled token ids), with its standard error.
- ``win_rate``: the share of (policy sample, reference sample) pairs for the same prompt in which the
  policy's has the higher population true reward (a tie counts one half).

Reward model (`reward_model_agreement`): on pairs of distinct base-distribution responses to the same
prompt (`truth_pairs`), the share of pairs in which the model orders the two as the true preference
does (``sign(s_a - s_b) == sign(logit(x, a, b))``, a tied score counts one half; pairs with a zero
true logit are left out), for the population and for each group; plus the Pearson correlation of the
scores with the population true reward.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from prefkit.lab.datasets import distinct_responses
from prefkit.lab.world import World
from prefkit.online.sampling import Completion, completion_log_probs, sample_completions

__all__ = [
    "PolicyEval",
    "evaluate_policy",
    "reward_model_agreement",
    "score_responses",
    "truth_pairs",
]


@dataclass
class PolicyEval:
    """Ground-truth figures of one policy (see the module docstring); ``samples`` are its completions."""

    mean_reward: float
    reward_se: float
    group_rewards: dict[str, float]
    worst_group: str
    worst_group_reward: float
    mean_length: float
    finished: float
    n_samples: int
    kl: float | None = None
    kl_se: float | None = None
    win_rate: float | None = None
    samples: list[Completion] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """The figures (not the samples), JSON-ready."""
        out = asdict(self)
        out.pop("samples")
        return out


def _se(values: np.ndarray) -> float:
    return float(values.std(ddof=1) / np.sqrt(len(values))) if len(values) > 1 else float("nan")


def _win_rate(world: World, policy: Sequence[Completion], reference: Sequence[Completion]) -> float:
    wins = []
    for a, b in zip(policy, reference):
        ra, rb = world.true_reward(a.prompt, a.text), world.true_reward(b.prompt, b.text)
        wins.append(1.0 if ra > rb else 0.5 if ra == rb else 0.0)
    return float(np.mean(wins))


def evaluate_policy(
    world: World,
    policy: nn.Module,
    tokenizer,
    *,
    reference: nn.Module | None = None,
    reference_samples: Sequence[Completion] | None = None,
    n_per_prompt: int = 16,
    prompts: Sequence[str] | None = None,
    seed: int = 0,
    max_new_tokens: int | None = None,
    batch_size: int = 128,
    progress: bool = True,
) -> PolicyEval:
    """Sample ``policy`` on ``prompts`` (default: all of ``world.prompts``) and score the samples with
    the true reward; with a ``reference``, also KL to it and the win rate against its samples (drawn
    with the same seed, or ``reference_samples`` given from an earlier call with the same prompts,
    ``n_per_prompt`` and seed: ``evaluate_policy(world, reference, ...).samples``).
    ``max_new_tokens`` defaults to ``3 * world.max_len``."""
    prompts = list(world.prompts if prompts is None else prompts)
    if not prompts:
        raise ValueError("no prompts to evaluate on")
    max_new = 3 * world.max_len if max_new_tokens is None else max_new_tokens
    options = dict(n=n_per_prompt, max_new_tokens=max_new, seed=seed, batch_size=batch_size, progress=progress)
    samples = sample_completions(policy, tokenizer, prompts, desc="sampling the policy", **options)
    rewards = np.array([world.true_reward(c.prompt, c.text) for c in samples])
    groups = {g: float(np.mean([world.true_reward(c.prompt, c.text, g) for c in samples])) for g in world.shares}
    worst = min(groups, key=groups.get)
    result = PolicyEval(
        mean_reward=float(rewards.mean()),
        reward_se=_se(rewards),
        group_rewards=groups,
        worst_group=worst,
        worst_group_reward=groups[worst],
        mean_length=float(np.mean([len(c.text.split()) for c in samples])),
        finished=float(np.mean([c.finished for c in samples])),
        n_samples=len(samples),
        samples=samples,
    )
    if reference is not None:
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        scoring = dict(batch_size=batch_size, progress=progress)
        log_ratio = (
            completion_log_probs(policy, samples, pad, desc="log-probs (policy)", **scoring)
            - completion_log_probs(reference, samples, pad, desc="log-probs (reference)", **scoring)
        ).numpy()
        result.kl, result.kl_se = float(log_ratio.mean()), _se(log_ratio)
        ref_samples = reference_samples
        if ref_samples is None:
            ref_samples = sample_completions(reference, tokenizer, prompts, desc="sampling the reference", **options)
        elif [c.prompt for c in ref_samples] != [c.prompt for c in samples]:
            raise ValueError("reference_samples must be drawn for the same prompts and n_per_prompt as this call")
        result.win_rate = _win_rate(world, samples, ref_samples)
    return result


def truth_pairs(world: World, n: int, seed: int = 0) -> list[tuple[str, str, str]]:
    """``n`` triples ``(prompt, a, b)``: a base-distribution prompt and two distinct responses to it."""
    rng = np.random.default_rng([seed, 11])
    return [(p, *distinct_responses(world, p, 2, rng)) for p in world.sample_prompts(n, rng)]


def score_responses(
    model: nn.Module, tokenizer, items: Sequence[tuple[str, str]], *, batch_size: int = 64, progress: bool = True
) -> np.ndarray:
    """``[N]`` reward-model scores of ``(prompt, response)`` items (tokenized as training tokenizes them)."""
    from prefkit.data.scoring import score_items, tokenize_items
    from prefkit.train.reward_trainer import model_scores

    tokenized = tokenize_items(items, tokenizer)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            scores = score_items(
                lambda *batch: model_scores(model, *batch),
                tokenized,
                model=model,
                pad_token_id=tokenizer.pad_token_id,
                batch_size=batch_size,
                desc="scoring",
                progress=progress,
            )
    finally:
        model.train(was_training)
    return scores.numpy().astype(np.float64)


def _agreement(world: World, pairs, scores_a: np.ndarray, scores_b: np.ndarray, group: str | None) -> float:
    credit = []
    for (prompt, a, b), sa, sb in zip(pairs, scores_a, scores_b):
        truth = world.preference_logit(prompt, a, b, group)
        if truth == 0:
            continue
        credit.append(0.5 if sa == sb else float((sa > sb) == (truth > 0)))
    return float(np.mean(credit)) if credit else float("nan")


def reward_model_agreement(
    world: World,
    score: Callable[[list[tuple[str, str]]], np.ndarray],
    pairs: Sequence[tuple[str, str, str]],
) -> dict[str, Any]:
    """Agreement of a reward model with the true preferences on ``pairs`` (see `truth_pairs`).

    ``score`` maps a list of ``(prompt, response)`` items to their scores, e.g.
    ``lambda items: score_responses(model, tokenizer, items)``. Returns ``{"agreement",
    "group_agreement": {group: ...}, "reward_correlation", "n_pairs"}``.
    """
    if not pairs:
        raise ValueError("no pairs to evaluate on")
    pairs = list(pairs)
    scores = np.asarray(score([(p, a) for p, a, _ in pairs] + [(p, b) for p, _, b in pairs]), dtype=np.float64)
    if scores.shape != (2 * len(pairs),):
        raise ValueError(f"score returned shape {scores.shape} for {2 * len(pairs)} items; expected one score each")
    scores_a, scores_b = scores[: len(pairs)], scores[len(pairs) :]
    truth = np.array([world.true_reward(p, a) for p, a, _ in pairs] + [world.true_reward(p, b) for p, _, b in pairs])
    correlation = float(np.corrcoef(scores, truth)[0, 1]) if scores.std() > 0 and truth.std() > 0 else float("nan")
    return {
        "agreement": _agreement(world, pairs, scores_a, scores_b, None),
        "group_agreement": {g: _agreement(world, pairs, scores_a, scores_b, g) for g in world.shares},
        "reward_correlation": correlation,
        "n_pairs": len(pairs),
    }
