"""Evaluate a reward model (scalar scorer, pairwise judge, or a policy's implicit reward) on an `EvalSet`.

`evaluate_reward_model` tokenizes and scores every response once, then computes the metrics of
`prefkit.eval.metrics` that the evaluation mode and the model allow. A metric that cannot be
computed is listed under ``skipped`` with the reason (a pairwise judge has no scalar rewards, so
no length correlation; no section map, so no section score; ...), never silently dropped.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from prefkit.data.scoring import TokenizedItems, judge_pairs, score_items, tokenize_items
from prefkit.eval import metrics as M
from prefkit.eval.data import EvalSet, is_ties_subset, split_grid, true_scores
from prefkit.eval.implicit import ImplicitReward

__all__ = ["EvalOptions", "Evaluation", "evaluate_reward_model", "scorer_kind"]


@dataclass
class EvalOptions:
    """How to score and what to compute.

    ``sections``/``counts``: a section map for `prefkit.eval.metrics.section_scores`.
    ``pref_prob``: the true preference probability for the idealized ranking accuracy of an
    implicit reward: a number in [0, 1] for every pair, or ``"scores"`` for
    ``sigmoid(chosen_score - rejected_score)`` of each record; None skips it.
    """

    batch_size: int = 8
    max_length: int | None = None
    max_prompt_length: int | None = None
    n_bins: int = 10
    sections: Mapping[str, Mapping[str, Any]] | None = None
    counts: Mapping[str, float] | None = None
    pref_prob: float | str | None = None
    progress: bool = True
    # (prompt ids, the record's user_id) -> prompt ids, applied after tokenization: a user-conditioned
    # policy's user tokens (`prefkit.train.user_conditioning.UserTokens.prefix`); None: no prefix.
    prompt_prefix: Callable[[list[int], str | None], list[int]] | None = None
    # how a tie row of a pairwise evaluation counts (`prefkit.eval.metrics.pair_credit`)
    tie_policy: str = "half"


@dataclass
class Evaluation:
    """``results`` (what goes to results.json) and ``items`` (one row per record, for scores.jsonl and plots)."""

    results: dict[str, Any]
    items: list[dict[str, Any]] = field(default_factory=list)


def scorer_kind(model: nn.Module) -> str:
    """``"implicit"`` (an `ImplicitReward`), ``"scalar"`` (has ``score``) or ``"judge"`` (``compare`` only)."""
    if isinstance(model, ImplicitReward):
        return "implicit"
    if callable(getattr(model, "score", None)):
        return "scalar"
    if callable(getattr(model, "compare", None)):
        return "judge"
    raise TypeError(f"{type(model).__name__} has neither score() (a reward model) nor compare() (a pairwise judge)")


class _Scorer:
    """Tokenizes and scores responses with one model, remembering lengths and truncation counts."""

    def __init__(self, model: nn.Module, tokenizer, options: EvalOptions):
        if tokenizer.pad_token_id is None:
            raise ValueError(
                f"the tokenizer ({type(tokenizer).__name__}) has no pad token; set tokenizer.pad_token "
                "(prefkit.models.loading.load_tokenizer uses the EOS token)"
            )
        self.model, self.tokenizer, self.options = model, tokenizer, options
        self.kind = scorer_kind(model)
        self.n_truncated = 0
        self.policy_logps: np.ndarray | None = None
        self.reference_logps: np.ndarray | None = None

    def tokenize(self, items: list[tuple[Any, Any]], names: list[str], users: list[str | None]) -> TokenizedItems:
        """Tokenize ``items``; with ``options.prompt_prefix``, each prompt gets its ``users[i]``'s prefix."""
        o = self.options
        tokens = tokenize_items(
            items, self.tokenizer, max_length=o.max_length, max_prompt_length=o.max_prompt_length, names=names
        )
        if o.prompt_prefix is not None:
            for example, user, name in zip(tokens.examples, users, names):
                try:
                    example["prompt_input_ids"] = o.prompt_prefix(example["prompt_input_ids"], user)
                except (KeyError, ValueError) as err:
                    raise ValueError(f"{name}: {err.args[0] if err.args else err}") from None
        self.n_truncated += tokens.n_truncated
        return tokens

    def _run(self, fn, tokens: TokenizedItems, desc: str) -> torch.Tensor:
        o = self.options
        return score_items(
            fn,
            tokens,
            model=self.model,
            pad_token_id=self.tokenizer.pad_token_id,
            batch_size=o.batch_size,
            desc=desc,
            progress=o.progress,
        )

    def rewards(self, tokens: TokenizedItems) -> np.ndarray:
        """``[N]`` scalar rewards; for an implicit reward also keeps the two log-likelihoods."""
        if self.kind == "implicit":
            both = self._run(lambda *b: torch.stack(self.model.log_likelihoods(*b), dim=1), tokens, "log-probs")
            self.policy_logps, self.reference_logps = both[:, 0].double().numpy(), both[:, 1].double().numpy()
            return self.model.beta * (self.policy_logps - self.reference_logps)
        return self._run(self.model.score, tokens, "scoring").double().numpy()

    def judge(self, first: TokenizedItems, second: TokenizedItems) -> np.ndarray:
        o = self.options
        logits = judge_pairs(
            self.model,
            first,
            second,
            pad_token_id=self.tokenizer.pad_token_id,
            batch_size=o.batch_size,
            progress=o.progress,
        )
        return logits.double().numpy()


def _names(eval_set: EvalSet, what: str) -> list[str]:
    ids = [getattr(r, "id", None) for r in eval_set.records]
    return [f"record {i + 1}{f' (id {d})' if d else ''} {what}" for i, d in enumerate(ids)]


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


# ---- pairs ----------------------------------------------------------------------------------------
def _pairs(eval_set: EvalSet, scorer: _Scorer, options: EvalOptions, out: dict, skipped: dict) -> list[dict]:
    records = eval_set.records
    users = [r.user_id for r in records]
    chosen_tokens = scorer.tokenize([(r.prompt, r.chosen) for r in records], _names(eval_set, "(chosen)"), users)
    rejected_tokens = scorer.tokenize([(r.prompt, r.rejected) for r in records], _names(eval_set, "(rejected)"), users)
    n = len(records)
    if scorer.kind == "judge":
        logits = scorer.judge(chosen_tokens, rejected_tokens)
        chosen = rejected = None
        skipped["length_bias"] = "needs scalar rewards; the model is a pairwise judge (compare only)"
    else:
        both = scorer.rewards(TokenizedItems(chosen_tokens.examples + rejected_tokens.examples, [], 0))
        chosen, rejected = both[:n], both[n:]
        logits = chosen - rejected
    ties = np.array([bool(r.tie) for r in records])
    correct, threshold = M.pair_credit(logits, ties, options.tie_policy)
    out["accuracy"] = float(correct.mean())
    out["subsets"] = M.per_subset_accuracy(correct, eval_set.subsets)
    if ties.any():
        out["ties"] = {
            "n": int(ties.sum()),
            "policy": options.tie_policy,
            "decisive_accuracy": float((logits[~ties] > 0).mean()) if (~ties).any() else float("nan"),
        }
        if threshold is not None:
            out["ties"]["threshold"] = threshold
    _sections(out, options, skipped)
    # Each decisive pair enters the reliability diagram in both orders: (sigmoid(l), 1) and (sigmoid(-l), 0).
    decisive = logits[~ties]
    probs = _sigmoid(np.concatenate([decisive, -decisive]))
    outcomes = np.concatenate([np.ones(len(decisive)), np.zeros(len(decisive))])
    out["calibration"] = M.expected_calibration_error(probs, outcomes, options.n_bins)
    len_c, len_r = chosen_tokens.response_lengths, rejected_tokens.response_lengths
    if chosen is not None:
        full_c, full_r = len_c, len_r
        if chosen_tokens.n_truncated or rejected_tokens.n_truncated:  # the baseline on the untruncated texts too
            full_c = tokenize_items([(r.prompt, r.chosen) for r in records], scorer.tokenizer).response_lengths
            full_r = tokenize_items([(r.prompt, r.rejected) for r in records], scorer.tokenizer).response_lengths
        keep = np.flatnonzero(~ties)  # the decisive pairs: a tie has no preferred length

        def pick(values):
            return np.asarray(values)[keep]

        out["length_bias"] = M.length_bias(
            chosen[keep], rejected[keep], pick(len_c), pick(len_r), pick(full_c), pick(full_r)
        )
        out["mean_reward"] = {"chosen": float(chosen.mean()), "rejected": float(rejected.mean())}
    if scorer.kind == "implicit":
        _likelihood_ranking(eval_set, scorer, options, out, skipped)
    items = []
    for i in range(n):
        row = {"subset": eval_set.subsets[i], "logit": float(logits[i]), "correct": float(correct[i])}
        if ties[i]:
            row["tie"] = True
        row.update(chosen_length=len_c[i], rejected_length=len_r[i])
        if chosen is not None:
            row.update(chosen_reward=float(chosen[i]), rejected_reward=float(rejected[i]))
        items.append(row)
    return items


def _sections(out: dict, options: EvalOptions, skipped: dict) -> None:
    if options.sections is None:
        skipped["section_score"] = "no section map given (--section-map)"
        return
    out["sections"] = M.section_scores(out["subsets"], options.sections, options.counts)


def _pref_probs(eval_set: EvalSet, pref_prob: float | str) -> np.ndarray:
    if pref_prob != "scores":
        return np.full(len(eval_set), float(pref_prob))
    probs = []
    for i, r in enumerate(eval_set.records):
        if r.chosen_score is None or r.rejected_score is None:
            raise ValueError(
                f"pref_prob='scores' needs chosen_score and rejected_score on every record; record {i + 1} "
                f"(subset {eval_set.subsets[i]}) lacks them"
            )
        probs.append(1.0 / (1.0 + math.exp(-(r.chosen_score - r.rejected_score))))
    return np.array(probs)


def _likelihood_ranking(eval_set: EvalSet, scorer: _Scorer, options: EvalOptions, out: dict, skipped: dict) -> None:
    n = len(eval_set)
    pi, ref = scorer.policy_logps, scorer.reference_logps
    observed = M.pairwise_accuracy(pi[:n], pi[n:])
    ranking = {"policy": observed, "reference": M.pairwise_accuracy(ref[:n], ref[n:])}
    if options.pref_prob is None:
        skipped["idealized_ranking_accuracy"] = "no true preference probability given (--pref-prob P or scores)"
    else:
        p = _pref_probs(eval_set, options.pref_prob)
        ideal = M.idealized_ranking_accuracy(ref[:n], ref[n:], p, scorer.model.beta)
        ranking.update(idealized=ideal, alignment_gap=M.alignment_gap(ideal, observed), pref_prob=options.pref_prob)
    out["ranking_accuracy"] = ranking


# ---- lists, best-of-N and style grids -----------------------------------------------------------------
def _flat_rewards(eval_set: EvalSet, scorer: _Scorer, groups: list[list]) -> list[np.ndarray]:
    """Score ``groups[i]`` (the responses of record i) and split the rewards back per record."""
    items, names, users = [], [], []
    for i, (record, group) in enumerate(zip(eval_set.records, groups)):
        items += [(record.prompt, c) for c in group]
        names += [f"record {i + 1} response {j + 1}" for j in range(len(group))]
        users += [getattr(record, "user_id", None)] * len(group)
    flat = scorer.rewards(scorer.tokenize(items, names, users))
    bounds = np.cumsum([0] + [len(g) for g in groups])
    return [flat[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def _best_of_n(eval_set: EvalSet, scorer: _Scorer, out: dict, skipped: dict) -> list[dict]:
    rewards = _flat_rewards(eval_set, scorer, [r.completions for r in eval_set.records])
    return best_of_n_results(eval_set, rewards, out)


def best_of_n_results(eval_set: EvalSet, rewards: list[np.ndarray], out: dict) -> list[dict]:
    """Best-of-N credit per record from each record's completion ``rewards`` (RewardBench 2), the Ties subset by
    its own rule (one score for the subset), into ``out``; returns the per-record items."""
    ties = np.array([is_ties_subset(s) for s in eval_set.subsets])
    credit = np.array(
        [math.nan if t else M.best_of_n_credit(s, b) for s, b, t in zip(rewards, eval_set.best, ties)], dtype=float
    )
    if (~ties).any():
        out["best_of_n_accuracy"] = float(credit[~ties].mean())
    out["subsets"] = {}
    for name in dict.fromkeys(eval_set.subsets):
        rows = [i for i, s in enumerate(eval_set.subsets) if s == name]
        if is_ties_subset(name):
            items = [(eval_set.records[i].id, rewards[i], eval_set.n_correct[i]) for i in rows]
            ties_score = M.rewardbench2_ties_score(items)
            out["subsets"][name] = {"accuracy": ties_score["score"], "n": len(rows), "ties_rule": ties_score}
        else:
            out["subsets"][name] = {"accuracy": float(credit[rows].mean()), "n": len(rows)}
    out["subset_mean"] = float(np.mean([s["accuracy"] for s in out["subsets"].values()]))
    present = {name.lower() for name in out["subsets"]}
    out["rewardbench2_missing"] = [name for name in M.REWARDBENCH2_SUBSETS if name.lower() not in present]
    out["n_per_record"] = sorted({len(s) for s in rewards})
    return [
        {"subset": sub, "rewards": s.tolist(), "best": b, "credit": None if t else float(c)}
        for sub, s, b, c, t in zip(eval_set.subsets, rewards, eval_set.best, credit, ties)
    ]


def _grid(eval_set: EvalSet, scorer: _Scorer, out: dict, skipped: dict) -> list[dict]:
    halves = [split_grid(r) for r in eval_set.records]
    rewards = _flat_rewards(eval_set, scorer, [c + r for c, r in halves])
    s = len(halves[0][0])
    chosen = np.stack([x[:s] for x in rewards])
    rejected = np.stack([x[s:] for x in rewards])
    out["style_grid"] = M.style_grid_accuracy(chosen, rejected)
    if all(eval_set.domains):
        out["rmbench"] = M.rmbench_scores(chosen, rejected, eval_set.domains)
    else:
        first = eval_set.domains.index(None)
        skipped["rmbench"] = (
            f"RM-Bench's score averages its domains (chat, math, code, safety); record {first + 1} has none: give it "
            "a 'domain' column, a file named after its domain (chat_filtered.json) or NAME=FILE with the domain"
        )
    subsets = np.array(eval_set.subsets)
    out["subsets"] = {}
    for name in dict.fromkeys(eval_set.subsets):
        mask = subsets == name
        out["subsets"][name] = {**M.style_grid_accuracy(chosen[mask], rejected[mask]), "n": int(mask.sum())}
        out["subsets"][name]["accuracy"] = out["subsets"][name]["total"]
    return [
        {"subset": sub, "chosen_rewards": c.tolist(), "rejected_rewards": r.tolist()}
        for sub, c, r in zip(eval_set.subsets, chosen, rejected)
    ]


def _lists(eval_set: EvalSet, scorer: _Scorer, out: dict, skipped: dict) -> list[dict]:
    rewards = _flat_rewards(eval_set, scorer, [r.completions for r in eval_set.records])
    truth = [true_scores(r) for r in eval_set.records]
    out["list_ranking"] = M.list_ranking_accuracy(rewards, truth)
    subsets = eval_set.subsets
    out["subsets"] = {}
    for name in dict.fromkeys(subsets):
        idx = [i for i, s in enumerate(subsets) if s == name]
        res = M.list_ranking_accuracy([rewards[i] for i in idx], [truth[i] for i in idx])
        out["subsets"][name] = {"accuracy": res["pair_accuracy"], "n": len(idx), **res}
    return [{"subset": s, "rewards": r.tolist(), "truth": t} for s, r, t in zip(subsets, rewards, truth)]


_LIST_MODES = {"best_of_n": _best_of_n, "grid": _grid, "lists": _lists}


def evaluate_reward_model(
    model: nn.Module, tokenizer, eval_set: EvalSet, options: EvalOptions | None = None
) -> Evaluation:
    """Score ``eval_set`` with ``model`` and compute every applicable metric.

    ``model`` implements `RewardScorer` (``score``), `PairwiseJudge` (``compare``), or is an
    `ImplicitReward`. Returns an `Evaluation`; ``results`` holds ``mode``, ``scorer``,
    ``n_records``, ``sources``, ``metrics``, ``skipped`` (metric -> reason) and ``n_truncated``.
    """
    options = options or EvalOptions()
    if options.sections is not None and eval_set.mode != "pairs":
        raise ValueError(
            f"--section-map: section scores average pairwise subset accuracies (RewardBench-style); this is a "
            f"{eval_set.mode.replace('_', '-')} evaluation, whose own score is reported instead; drop --section-map"
        )
    model.eval()
    scorer = _Scorer(model, tokenizer, options)
    out: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    if eval_set.mode == "pairs":
        items = _pairs(eval_set, scorer, options, out, skipped)
    elif scorer.kind == "judge":
        skipped[eval_set.mode] = "needs scalar rewards; the model is a pairwise judge (compare only)"
        items = []
    else:
        items = _LIST_MODES[eval_set.mode](eval_set, scorer, out, skipped)
    if scorer.kind != "implicit" and eval_set.mode == "pairs":
        skipped["ranking_accuracy"] = "likelihood ranking accuracy needs a policy and its reference (--implicit)"
    results = {
        "mode": eval_set.mode,
        "scorer": scorer.kind,
        "n_records": len(eval_set),
        "sources": eval_set.sources,
        "metrics": out,
        "skipped": skipped,
        "n_truncated": scorer.n_truncated,
    }
    if scorer.kind == "implicit":
        results["beta"] = model.beta
    return Evaluation(results, items)
