"""Explicit conversions between kinds of feedback (never applied silently).

* `ranked_to_pairwise`: a ranking (or scores) over K completions -> preference pairs.
* `rated_to_pairwise`: rated completions of the same prompt -> pairs by one attribute or a
  weighted sum of attributes, with the score gap as the margin.
* `pairwise_to_unpaired`: each pair -> a desirable and an undesirable example (KTO-style).
* `joint_pairs`: thumbs-up/down feedback -> joint pairs across prompts (JPO).
* `reward_augmented_pairs`: scored pairs -> pairs whose prompt names a target score (reward-augmented DPO).
* `judge_training_pairs`: preference pairs -> pairs that teach a generative judge its verdicts.
* `convert_records`: the dispatcher behind ``prefkit data convert --to``.

Pairs whose two completions render to the same text (after stripping surrounding whitespace)
carry no preference and are never produced.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from itertools import combinations
from typing import Any

from prefkit.data.records import (
    PairwiseRecord,
    RankedRecord,
    RatedRecord,
    Record,
    StepwiseRecord,
    UnpairedRecord,
    same_text,
    text_key,
)


def _expect(records: Iterable[Record], cls: type, function: str) -> list:
    records = list(records)
    for i, record in enumerate(records, start=1):
        if not isinstance(record, cls):
            raise TypeError(f"{function} expects {cls.__name__} records; record {i} is a {type(record).__name__}")
    return records


def _pair_id(record_id: str | None, better: int, worse: int) -> str | None:
    return None if record_id is None else f"{record_id}:{better}>{worse}"


def ranked_levels(record: RankedRecord) -> list[list[int]]:
    """Completion indices grouped best level first.

    From ``ranking`` (when given) every level has one index; from ``scores`` completions with
    equal scores share a level (ties), levels ordered by descending score.
    """
    n = len(record.completions)
    if record.ranking is not None:
        if sorted(record.ranking) != list(range(n)):
            raise ValueError(f"ranking {record.ranking!r} is not a permutation of 0..{n - 1}")
        return [[i] for i in record.ranking]
    if record.scores is None:
        raise ValueError("a ranked record needs a ranking or scores")
    if len(record.scores) != n:
        raise ValueError(f"{len(record.scores)} scores for {n} completions")
    levels: dict[float, list[int]] = {}
    for i, score in enumerate(record.scores):
        levels.setdefault(float(score), []).append(i)
    return [levels[s] for s in sorted(levels, reverse=True)]


def ranked_to_pairwise(records: Iterable[RankedRecord], mode: str = "all") -> list[PairwiseRecord]:
    """Turn ranked records into pairwise records.

    ``mode="all"``: every pair of completions at different levels (K(K-1)/2 pairs for a strict
    ranking). ``mode="adjacent"``: only pairs from neighbouring levels (K-1 pairs for a strict
    ranking; with tied scores, every member of one level against every member of the next).
    ``mode="best"``: the best level against every other one (K-1 pairs; Curry-DPO's pairs, which
    ``curriculum: margin`` then orders from the largest score gap to the smallest).
    Levels come from ``ranking`` when present, else from ``scores`` (descending; equal scores
    make no pair). With scores, ``chosen_score``/``rejected_score`` are set and ``margin`` is
    their difference. ``user_id`` is kept; ``id`` becomes ``"{id}:{better}>{worse}"`` (indices
    into ``completions``).
    """
    if mode not in ("all", "adjacent", "best"):
        raise ValueError(f"mode must be 'all', 'adjacent' or 'best', got {mode!r}")
    out: list[PairwiseRecord] = []
    for index, record in enumerate(_expect(records, RankedRecord, "ranked_to_pairwise"), start=1):
        try:
            levels = ranked_levels(record)
        except ValueError as exc:
            raise ValueError(f"ranked record {index}: {exc}") from None
        use_scores = record.ranking is None
        if mode == "all":
            level_pairs = [(a, b) for a, b in combinations(range(len(levels)), 2)]
        elif mode == "best":
            level_pairs = [(0, b) for b in range(1, len(levels))]
        else:
            level_pairs = [(a, a + 1) for a in range(len(levels) - 1)]
        for a, b in level_pairs:
            for better in levels[a]:
                for worse in levels[b]:
                    chosen, rejected = record.completions[better], record.completions[worse]
                    if same_text(chosen, rejected):
                        continue
                    pair = PairwiseRecord(
                        prompt=record.prompt,
                        chosen=chosen,
                        rejected=rejected,
                        user_id=record.user_id,
                        id=_pair_id(record.id, better, worse),
                    )
                    if use_scores:
                        pair.chosen_score = float(record.scores[better])
                        pair.rejected_score = float(record.scores[worse])
                        pair.margin = pair.chosen_score - pair.rejected_score
                    out.append(pair)
    return out


def rated_score(record: RatedRecord, attribute: str | None = None, weights: dict[str, float] | None = None) -> float:
    """The scalar score of a rated record: ``ratings[attribute]``, or ``sum(w * ratings[a])`` over
    ``weights`` (attributes missing from ``weights`` count 0). With neither, the record must have
    exactly one rating."""
    if attribute is not None and weights is not None:
        raise ValueError("pass either attribute or weights, not both")
    ratings = record.ratings
    if weights is not None:
        if not weights:
            raise ValueError("weights is empty")
        missing = [a for a in weights if a not in ratings]
        if missing:
            raise KeyError(f"rating(s) {missing} missing; the record has {sorted(ratings)}")
        return float(sum(float(w) * float(ratings[a]) for a, w in weights.items()))
    if attribute is None:
        if len(ratings) != 1:
            raise ValueError(
                f"the record has several ratings {sorted(ratings)}; choose one with attribute= "
                "or combine them with weights="
            )
        attribute = next(iter(ratings))
    if attribute not in ratings:
        raise KeyError(f"rating {attribute!r} missing; the record has {sorted(ratings)}")
    return float(ratings[attribute])


def rated_to_pairwise(
    records: Iterable[RatedRecord],
    attribute: str | None = None,
    weights: dict[str, float] | None = None,
    min_gap: float = 0.0,
    by_user: bool = False,
) -> list[PairwiseRecord]:
    """Pair rated completions of the same prompt.

    Records are grouped by prompt (exact text or messages; with ``by_user=True`` by prompt and
    ``user_id``, so only one annotator's ratings are compared). Within a group every two records
    whose scores (see `rated_score`: one ``attribute`` or a ``weights`` sum; with neither, the
    single rating each record has) differ by more than ``min_gap`` make a pair: the higher score
    is chosen, ``margin`` is the gap and ``chosen_score``/``rejected_score`` the scores.
    ``user_id`` is kept when both records share it; ``id`` becomes ``"{chosen_id}>{rejected_id}"``
    when both have ids. Groups keep the order in which their prompts first appear.
    """
    if not (isinstance(min_gap, (int, float)) and math.isfinite(min_gap) and min_gap >= 0):
        raise ValueError(f"min_gap must be a finite number >= 0, got {min_gap!r}")
    records = _expect(records, RatedRecord, "rated_to_pairwise")
    groups: dict[Any, list[tuple[RatedRecord, float]]] = {}
    for index, record in enumerate(records, start=1):
        try:
            score = rated_score(record, attribute, weights)
        except (KeyError, ValueError) as exc:
            message = exc.args[0] if exc.args else str(exc)
            raise ValueError(f"rated record {index}: {message}") from None
        if not math.isfinite(score):
            raise ValueError(f"rated record {index}: score {score} is not finite")
        key = (text_key(record.prompt), record.user_id if by_user else None)
        groups.setdefault(key, []).append((record, score))
    out: list[PairwiseRecord] = []
    for members in groups.values():
        for (a, score_a), (b, score_b) in combinations(members, 2):
            gap = abs(score_a - score_b)
            if not gap > min_gap:
                continue
            (win, s_win), (lose, s_lose) = (
                ((a, score_a), (b, score_b)) if score_a > score_b else ((b, score_b), (a, score_a))
            )
            if same_text(win.completion, lose.completion):
                continue
            out.append(
                PairwiseRecord(
                    prompt=win.prompt,
                    chosen=win.completion,
                    rejected=lose.completion,
                    user_id=win.user_id if win.user_id == lose.user_id else None,
                    margin=gap,
                    chosen_score=s_win,
                    rejected_score=s_lose,
                    id=f"{win.id}>{lose.id}" if win.id is not None and lose.id is not None else None,
                )
            )
    return out


def pairwise_to_unpaired(records: Iterable[PairwiseRecord]) -> list[UnpairedRecord]:
    """Each pair becomes two unpaired records: ``chosen`` with ``label=True`` then ``rejected``
    with ``label=False``, same prompt, ``user_id`` and ``weight``; ``id`` becomes
    ``"{id}:chosen"`` / ``"{id}:rejected"``. Margins and scores are dropped (unpaired records have
    none)."""
    out: list[UnpairedRecord] = []
    for record in _expect(records, PairwiseRecord, "pairwise_to_unpaired"):
        for completion, label, suffix in (
            (record.chosen, True, "chosen"),
            (record.rejected, False, "rejected"),
        ):
            out.append(
                UnpairedRecord(
                    prompt=record.prompt,
                    completion=completion,
                    label=label,
                    user_id=record.user_id,
                    weight=record.weight,
                    id=None if record.id is None else f"{record.id}:{suffix}",
                )
            )
    return out


def joint_pairs(records: Iterable[UnpairedRecord], *, seed: int = 0) -> list[PairwiseRecord]:
    """Joint preference pairs (JPO, Bansal et al. 2024) from thumbs-up/down feedback: each desirable ``(x, y)``
    is paired with an undesirable ``(x', y')`` of another prompt, "y to x is better than y' to x'" (the pair's
    ``rejected_prompt`` is ``x'``). Matching: the undesirable examples shuffled with ``seed`` and taken in turn,
    skipping those of the same prompt, until one side runs out (each example in at most one pair). Weights
    multiply; ``user_id`` is kept when both agree; ids ``"{good}~{bad}"``."""
    import random

    records = _expect(records, UnpairedRecord, "joint_pairs")
    good = [r for r in records if r.label]
    bad = [r for r in records if not r.label]
    random.Random(seed).shuffle(bad)
    out: list[PairwiseRecord] = []
    for g in good:
        for j, b in enumerate(bad):
            if text_key(b.prompt) == text_key(g.prompt):
                continue
            bad.pop(j)
            weight = None if g.weight is None and b.weight is None else (g.weight or 1.0) * (b.weight or 1.0)
            out.append(
                PairwiseRecord(
                    prompt=g.prompt,
                    chosen=g.completion,
                    rejected=b.completion,
                    rejected_prompt=b.prompt,
                    user_id=g.user_id if g.user_id == b.user_id else None,
                    weight=weight,
                    id=None if g.id is None or b.id is None else f"{g.id}~{b.id}",
                )
            )
            break
    return out


DEFAULT_SCORE_INSTRUCTION = "Write a response that would be rated {score}."


def reward_conditioned_prompt(prompt: Any, score: float, instruction: str = DEFAULT_SCORE_INSTRUCTION) -> Any:
    """``prompt`` asking for a response of quality ``score``: a plain prompt gets ``instruction`` (with ``{score}``
    filled in, ``:g`` format) as its first line; a chat prompt gets it as a system message (joined to an existing
    first system message). Train on `reward_augmented_pairs` and generate with the best score of the data."""
    if "{score}" not in instruction:
        raise ValueError(f"instruction must contain {{score}}, got {instruction!r}")
    line = instruction.format(score=f"{float(score):g}")
    if isinstance(prompt, str):
        return f"{line}\n\n{prompt}"
    messages = [dict(m) for m in prompt]
    if messages and messages[0].get("role") == "system":
        messages[0]["content"] = f"{line}\n\n{messages[0]['content']}"
        return messages
    return [{"role": "system", "content": line}, *messages]


def reward_augmented_pairs(
    records: Iterable[PairwiseRecord], *, instruction: str = DEFAULT_SCORE_INSTRUCTION
) -> list[PairwiseRecord]:
    """Reward-augmented preference data (Zhang et al. 2024, "Reward-Augmented Data Enhances Direct Preference
    Alignment of LLMs", arXiv:2410.08067): each scored pair ``(x, y_w, y_l, r_w, r_l)`` becomes two pairs,
    ``(x | r_w): y_w > y_l`` and ``(x | r_l): y_l > y_w``, where ``x | r`` is `reward_conditioned_prompt`. The
    policy learns what each quality level looks like instead of only "better than", and is then prompted with the
    highest score. A pair with equal scores gives only its first pair (the second would contradict it). Scores
    come from ``chosen_score`` / ``rejected_score`` (a judge's or reward model's, e.g. from ``prefkit data
    convert --to pairwise`` on scored ranked or rated records); a pair without them is an error. ``margin``
    becomes ``r_w - r_l`` on both; ids get ``:w`` / ``:l``."""
    out: list[PairwiseRecord] = []
    for i, r in enumerate(_expect(records, PairwiseRecord, "reward_augmented_pairs"), start=1):
        if r.chosen_score is None or r.rejected_score is None:
            raise ValueError(f"record {i}: reward-augmented pairs need chosen_score and rejected_score")
        cw, cl = float(r.chosen_score), float(r.rejected_score)
        sides = [(cw, r.chosen, r.rejected, cw, cl, "w")]
        if cl != cw:
            sides.append((cl, r.rejected, r.chosen, cl, cw, "l"))
        for target, chosen, rejected, s_chosen, s_rejected, tag in sides:
            out.append(
                PairwiseRecord(
                    prompt=reward_conditioned_prompt(r.prompt, target, instruction),
                    chosen=chosen,
                    rejected=rejected,
                    user_id=r.user_id,
                    margin=abs(cw - cl),
                    weight=r.weight,
                    chosen_score=s_chosen,
                    rejected_score=s_rejected,
                    id=None if r.id is None else f"{r.id}:{tag}",
                )
            )
    return out


CONVERSIONS: dict[tuple[str, str], str] = {
    ("ranked", "pairwise"): "ranked_to_pairwise",
    ("rated", "pairwise"): "rated_to_pairwise",
    ("pairwise", "unpaired"): "pairwise_to_unpaired",
    ("unpaired", "pairwise"): "joint_pairs",
}


def step_preference_pairs(
    records: Iterable[StepwiseRecord], *, separator: str = "\n", prompt_separator: str | None = None
) -> list[PairwiseRecord]:
    """Step-DPO pairs (Lai et al. 2024) mined from stepwise records of the same prompt.

    Wherever two solutions of one prompt share their first ``k`` steps, all correct, and then one continues with
    a correct step and the other with a wrong one (a label > 0.5 is correct), the pair is: prompt = the problem,
    ``prompt_separator`` (default ``separator``), then the ``k`` shared steps each followed by ``separator``;
    chosen = the correct step, rejected = the wrong one. Each distinct (prefix, chosen, rejected) once, in the
    order the solutions come; ids ``step-{n}``."""
    from collections import defaultdict

    records = _expect(records, StepwiseRecord, "step_preference_pairs")
    before = separator if prompt_separator is None else prompt_separator
    # (prompt, prefix of correct steps) -> next steps seen after it, correct and wrong, in order
    nexts: dict[tuple, dict[bool, list[str]]] = defaultdict(lambda: {True: [], False: []})
    for r in records:
        if not isinstance(r.prompt, str):
            raise ValueError("step_preference_pairs needs plain-text prompts")
        for k, (step, label) in enumerate(zip(r.completions, r.labels)):
            good = float(label) > 0.5
            seen = nexts[(r.prompt, tuple(r.completions[:k]))][good]
            if step not in seen:
                seen.append(step)
            if not good:
                break  # later steps follow a wrong one: no correct prefix
    pairs = []
    for (prompt, prefix), steps in nexts.items():
        text = prompt + before + "".join(step + separator for step in prefix)
        for chosen in steps[True]:
            for rejected in steps[False]:
                pairs.append(PairwiseRecord(prompt=text, chosen=chosen, rejected=rejected, id=f"step-{len(pairs)}"))
    return pairs


def judge_training_pairs(
    records: Iterable[PairwiseRecord], template: Any, rationales: Sequence[str | None] | None = None
) -> tuple[list[PairwiseRecord], int]:
    """Preference pairs as training pairs for a generative judge: ``(pairs, number of tie rows left out)``.

    Each pair ``(x, y_w, y_l)`` gives two rows, one per order, whose prompt is the judge prompt of ``template``
    (a `prefkit.data.judge_prompts.JudgeTemplate`) showing ``y_w`` as A then as B; ``chosen`` is the right label
    (the first label when ``y_w`` is A), ``rejected`` the other, each followed by the pair's rationale on a new line
    when ``rationales[i]`` is given (the verdict first, so the label's log-probability still reads the verdict).
    Train on ``chosen`` with ``loss: sft`` (supervised on verdicts) or any pairwise loss; the right label is also
    what the online ``verdict`` reward checks (RL on verdicts). Both orders teach the verdict, not the position.
    A tie row (neither response better) has no right label among two and is left out."""
    from prefkit.data.judge_prompts import judge_prompt

    records = _expect(records, PairwiseRecord, "judge_training_pairs")
    if rationales is not None and len(rationales) != len(records):
        raise ValueError(f"{len(rationales)} rationales for {len(records)} pairs")
    first, second = template.labels
    out: list[PairwiseRecord] = []
    ties = 0
    for i, record in enumerate(records):
        if record.tie:
            ties += 1
            continue
        why = rationales[i] if rationales is not None else None
        tail = f"\n{str(why).strip()}" if why is not None and str(why).strip() else ""
        base = record.id if record.id is not None else f"pair-{i}"
        for order, (a, b, right, wrong) in enumerate(
            ((record.chosen, record.rejected, first, second), (record.rejected, record.chosen, second, first))
        ):
            out.append(
                PairwiseRecord(
                    prompt=judge_prompt(template, record.prompt, a, b),
                    chosen=right + tail,
                    rejected=wrong + tail,
                    user_id=record.user_id,
                    id=f"{base}-{'chosen-first' if order == 0 else 'chosen-second'}",
                )
            )
    return out, ties


def convert_records(
    records: Sequence[Record],
    to: str | None,
    *,
    mode: str = "all",
    attribute: str | None = None,
    weights: dict[str, float] | None = None,
    min_gap: float = 0.0,
    reward_augmented: bool = False,
) -> list[Record]:
    """Convert records of one kind to kind ``to`` with the matching function above; ``reward_augmented`` then
    turns the (scored) pairs into `reward_augmented_pairs`.

    ``to=None`` or the records' own kind returns them unchanged (a file-format conversion).
    Options that do not apply to the conversion are refused rather than ignored.
    """
    records = list(records)
    kinds = {type(r).kind for r in records}
    if len(kinds) > 1:
        raise ValueError(f"records of several kinds {sorted(kinds)}; convert one kind at a time")
    source = kinds.pop() if kinds else None
    given = {
        "mode": mode != "all",
        "attribute": attribute is not None,
        "weights": weights is not None,
        "min_gap": min_gap != 0.0,
    }
    identity = to is None or source is None or to == source
    if identity:
        allowed: set[str] = set()
    elif (source, to) in CONVERSIONS:
        allowed = {
            "ranked": {"mode"},
            "rated": {"attribute", "weights", "min_gap"},
            "pairwise": set(),
            "unpaired": set(),
        }[source]
    else:
        supported = ", ".join(f"{a} -> {b}" for a, b in CONVERSIONS)
        raise ValueError(f"no conversion from {source} to {to}; supported: {supported}")
    given["reward_augmented"] = reward_augmented
    if (to or source) == "pairwise":
        allowed.add("reward_augmented")
    unused = [name for name, was_given in given.items() if was_given and name not in allowed]
    if unused:
        what = "a format-only conversion" if identity else f"{source} -> {to}"
        if unused == ["reward_augmented"]:
            what = f"{to or source} records (it makes pairs)"
        raise ValueError(f"option(s) {', '.join(unused)} do not apply to {what}")
    if identity:
        converted = records
    elif source == "ranked":
        converted = ranked_to_pairwise(records, mode=mode)
    elif source == "rated":
        converted = rated_to_pairwise(records, attribute=attribute, weights=weights, min_gap=min_gap)
    elif source == "unpaired":
        converted = joint_pairs(records)
    else:
        converted = pairwise_to_unpaired(records)
    return reward_augmented_pairs(converted) if reward_augmented else converted
