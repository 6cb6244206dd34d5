"""Test-time search with process and outcome rewards; every search reports the tokens it generated.

- `aggregate_steps`: one score for a solution from its step probabilities: ``min`` (the weakest step; Lightman
  et al. 2023), ``product`` (the chance every step is right), ``last`` (Wang et al. 2024, Math-Shepherd's
  choice for a PRM trained on Monte-Carlo labels, which estimate reaching the right answer) or ``mean``.
- `sample_candidates` draws ``n`` solutions per prompt with the rollout engine and counts their tokens;
  `prm_scores` scores them with any `prefkit.models.process.StepScorer`; `majority_vote` picks the most
  common final answer (self-consistency, Wang et al. 2023) as the baseline a reward model has to beat.
- `step_beam_search`: step-level beam search guided by a PRM: each of ``beam_width`` partial solutions is
  extended by ``expansions`` sampled next steps (generation stops at the step separator), every extension is
  scored by the PRM and the best ``beam_width`` unfinished ones go on; finished solutions compete at the end
  (Snell et al. 2024, "Scaling LLM test-time compute optimally ..."; Yu et al. 2023, OVM).
- `prm_mcts`: Monte-Carlo tree search over steps with the PRM as value (rStar-Math style, Guan et al. 2025):
  UCT selection, children initialised with the PRM's probability of their last step, terminal solutions
  valued by an outcome function (a verifier in training, the PRM's own aggregate at test time), values
  backed up as running means. Its tree also gives step preference pairs (MCTS-DPO, Xie et al. 2024): at each
  node, the best-valued visited child against the worst, for the ``step_dpo`` loss.

Tokens: the completion tokens the policy generated (prompts and re-fed prefixes are not counted), so methods
are compared at equal generation compute.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

from prefkit.data.records import StepwiseRecord
from prefkit.online.rollouts import HFRollouts, SamplingSettings

__all__ = [
    "AGGREGATIONS",
    "Candidates",
    "SearchResult",
    "aggregate_probabilities",
    "aggregate_steps",
    "majority_vote",
    "prm_mcts",
    "prm_scores",
    "sample_candidates",
    "split_steps",
    "step_probabilities",
    "step_beam_search",
]

AGGREGATIONS = ("min", "product", "last", "mean")


def aggregate_steps(probabilities: Sequence[float], how: str = "min") -> float:
    """One score from a solution's step probabilities (see the module docstring); 0.0 for no steps."""
    if how not in AGGREGATIONS:
        raise ValueError(f"how: expected one of {', '.join(AGGREGATIONS)}, got {how!r}")
    p = list(probabilities)
    if not p:
        return 0.0
    if how == "min":
        return min(p)
    if how == "last":
        return p[-1]
    if how == "mean":
        return sum(p) / len(p)
    return math.prod(p)


def split_steps(text: str, separator: str) -> list[str]:
    """The steps of a solution text: the pieces between separators, stripped, empty ones dropped."""
    return [piece.strip() for piece in text.split(separator.strip() or separator) if piece.strip()]


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


@dataclass
class Candidates:
    """``n`` sampled solutions of one prompt: texts, token ids and generated token counts."""

    prompt: str
    texts: list[str]
    token_ids: list[list[int]]

    @property
    def tokens(self) -> int:
        return sum(len(ids) for ids in self.token_ids)


def _prompt_ids(tokenizer, prompts: Sequence[Any]) -> list[list[int]]:
    from prefkit.data.tokenize import tokenize_prompt

    return [tokenize_prompt(p, tokenizer) for p in prompts]


def sample_candidates(
    model,
    tokenizer,
    prompts: Sequence[str],
    n: int,
    *,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    seed: int = 0,
    batch_size: int = 64,
) -> list[Candidates]:
    """``n`` solutions per prompt from ``model`` (seeded per prompt and sample: the same call gives the same
    samples, and sample ``k`` of a prompt does not depend on ``n`` or on the other prompts)."""
    settings = SamplingSettings(n=n, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
    out = HFRollouts(model, tokenizer, batch_size=batch_size).generate(_prompt_ids(tokenizer, prompts), settings)
    groups = [out[i * n : (i + 1) * n] for i in range(len(prompts))]
    return [
        Candidates(prompt, [r.text for r in group], [list(r.completion_ids) for r in group])
        for prompt, group in zip(prompts, groups)
    ]


def prm_scores(
    scorer,
    prompts: Sequence[str],
    texts: Sequence[Sequence[str]],
    steps_of: Callable[[str], list[str]],
    how: str = "min",
) -> list[list[float]]:
    """Per prompt, one aggregated PRM probability per solution text (``steps_of`` splits a text into steps;
    a text without steps scores 0)."""
    return aggregate_probabilities(step_probabilities(scorer, prompts, texts, steps_of), how)


def step_probabilities(
    scorer, prompts: Sequence[str], texts: Sequence[Sequence[str]], steps_of: Callable[[str], list[str]]
) -> list[list[list[float]]]:
    """Per prompt and solution text, the scorer's probability of each of its steps (one scoring pass; aggregate
    them with `aggregate_probabilities` as many ways as needed)."""
    records, owners = [], []
    for i, (prompt, row) in enumerate(zip(prompts, texts)):
        for j, text in enumerate(row):
            steps = steps_of(text)
            if steps:
                records.append(StepwiseRecord(prompt=prompt, completions=steps, labels=[True] * len(steps)))
                owners.append((i, j))
    out: list[list[list[float]]] = [[[] for _ in row] for row in texts]
    for (i, j), logits in zip(owners, scorer.score(records) if records else []):
        out[i][j] = [_sigmoid(z) for z in logits]
    return out


def aggregate_probabilities(probabilities: Sequence[Sequence[Sequence[float]]], how: str = "min") -> list[list[float]]:
    """`aggregate_steps` of every solution of `step_probabilities`' output."""
    return [[aggregate_steps(p, how) for p in row] for row in probabilities]


def majority_vote(answers: Sequence[Hashable | None]) -> int:
    """Index of the first solution whose final answer is the most common one (None answers do not vote;
    0 when no solution has an answer)."""
    counts = Counter(a for a in answers if a is not None)
    if not counts:
        return 0
    top = max(counts.values())
    winners = {a for a, c in counts.items() if c == top}
    return next(i for i, a in enumerate(answers) if a in winners)


@dataclass
class SearchResult:
    """What a search returns for one prompt: the chosen solution, its score, and the tokens generated."""

    prompt: str
    text: str
    score: float
    tokens: int
    finished: bool = True
    explored: int = 0  # partial or whole solutions scored
    pairs: list = field(default_factory=list)  # prm_mcts: step preference pairs from its tree


@dataclass
class _Path:
    ids: list[int]
    score: float = 0.0
    done: bool = False


def _step_settings(expansions: int, step_tokens: int, temperature: float, seed: int, separator: str):
    """Sampling of ``expansions`` next steps, each ending at ``separator`` (or after ``step_tokens`` tokens)."""
    return SamplingSettings(
        n=expansions, max_new_tokens=step_tokens, temperature=temperature, seed=seed, stop=(separator,)
    )


def _extend(
    rollouts: HFRollouts,
    prompt_ids: list[int],
    paths: list[_Path],
    settings: SamplingSettings,
    seed_base: int,
) -> tuple[list[_Path], int]:
    """Sample ``settings.n`` next steps of every path (generation stops at the separator); the new paths and
    the tokens generated."""
    prefixes = [prompt_ids + p.ids for p in paths]
    if rollouts.max_context is not None:  # a step ends where the model's context does
        budget = min(settings.max_new_tokens, rollouts.max_context - max(map(len, prefixes)))
        if budget < 1:
            return [_Path(p.ids, done=True) for p in paths], 0
        settings = dataclasses.replace(settings, max_new_tokens=budget)
    out = rollouts.generate(prefixes, settings, prompt_seeds=[seed_base + k for k in range(len(paths))])
    new = []
    for r, parent in zip(out, [p for p in paths for _ in range(settings.n)]):
        new.append(_Path(parent.ids + list(r.completion_ids), done=r.finish_reason != "stop"))
    return new, sum(len(r.completion_ids) for r in out)


def _score_paths(scorer, prompt: str, paths: list[_Path], tokenizer, steps_of, how: str) -> None:
    texts = [tokenizer.decode(p.ids, skip_special_tokens=True) for p in paths]
    for p, s in zip(paths, prm_scores(scorer, [prompt], [texts], steps_of, how)[0]):
        p.score = s


def step_beam_search(
    model,
    tokenizer,
    scorer,
    prompts: Sequence[str],
    *,
    separator: str,
    steps_of: Callable[[str], list[str]] | None = None,
    beam_width: int = 4,
    expansions: int = 4,
    max_steps: int = 8,
    step_tokens: int = 32,
    how: str = "last",
    temperature: float = 1.0,
    seed: int = 0,
    batch_size: int = 64,
) -> list[SearchResult]:
    """Step-level beam search guided by a PRM (see the module docstring). A step ends where the generated text
    ends with ``separator`` (kept); a solution is finished at EOS or when a step runs past ``step_tokens``.
    Extensions are ranked by ``aggregate_steps(..., how)`` of their step probabilities."""
    for name, value in (("beam_width", beam_width), ("expansions", expansions), ("max_steps", max_steps)):
        if value < 1:
            raise ValueError(f"{name}: expected a positive integer, got {value}")
    steps_of = steps_of or (lambda text: split_steps(text, separator))
    rollouts = HFRollouts(model, tokenizer, batch_size=batch_size)
    results = []
    settings = _step_settings(expansions, step_tokens, temperature, seed, separator)
    for i, (prompt, ids) in enumerate(zip(prompts, _prompt_ids(tokenizer, prompts))):
        beams, done, tokens, explored = [_Path([])], [], 0, 0
        for depth in range(max_steps):
            new, used = _extend(rollouts, ids, beams, settings, seed_base=(i * max_steps + depth) * 1_000_003)
            tokens += used
            _score_paths(scorer, prompt, new, tokenizer, steps_of, how)
            explored += len(new)
            done += [p for p in new if p.done]
            beams = sorted((p for p in new if not p.done), key=lambda p: -p.score)[:beam_width]
            if not beams:
                break
        pool = done or beams
        best = max(pool, key=lambda p: p.score)
        text = tokenizer.decode(best.ids, skip_special_tokens=True)
        results.append(SearchResult(prompt, text, best.score, tokens, finished=bool(done), explored=explored))
    return results


@dataclass
class _Node:
    ids: list[int]
    prior: float
    done: bool
    parent: _Node | None = None
    children: list[_Node] = field(default_factory=list)
    visits: int = 0
    value: float = 0.0  # running mean of backed-up values

    def uct(self, c: float) -> float:
        if self.visits == 0:
            return self.prior + c * math.sqrt(math.log(self.parent.visits + 1) + 1)
        return self.value + c * math.sqrt(math.log(self.parent.visits + 1) / self.visits)


def prm_mcts(
    model,
    tokenizer,
    scorer,
    prompts: Sequence[str],
    *,
    separator: str,
    outcome: Callable[[str, str], float] | None = None,
    steps_of: Callable[[str], list[str]] | None = None,
    simulations: int = 16,
    expansions: int = 4,
    max_steps: int = 8,
    step_tokens: int = 32,
    exploration: float = 1.0,
    how: str = "min",
    temperature: float = 1.0,
    seed: int = 0,
    batch_size: int = 64,
) -> list[SearchResult]:
    """Monte-Carlo tree search over steps with a PRM as value (see the module docstring).

    Each simulation selects a leaf by UCT (``value + exploration * sqrt(log N_parent / N)``; an unvisited
    child counts with its prior, the PRM probability of its last step), expands it with ``expansions``
    sampled next steps, and backs up the value of the best new child: its ``outcome(prompt, text)`` when it
    is a finished solution (default: the PRM aggregate ``how`` of its steps), else its prior. The answer is
    the finished solution with the highest mean value (ties: more visits); without one, the best leaf."""
    if simulations < 1 or expansions < 1:
        raise ValueError(f"simulations and expansions must be positive, got {simulations}, {expansions}")
    steps_of = steps_of or (lambda text: split_steps(text, separator))
    rollouts = HFRollouts(model, tokenizer, batch_size=batch_size)
    results = []
    settings = _step_settings(expansions, step_tokens, temperature, seed, separator)
    for i, (prompt, ids) in enumerate(zip(prompts, _prompt_ids(tokenizer, prompts))):
        root = _Node([], prior=1.0, done=False)
        tokens, explored, finished = 0, 0, []
        for sim in range(simulations):
            node = root
            while node.children:
                node = max(node.children, key=lambda c: c.uct(exploration))
            if node.done or len(steps_of(tokenizer.decode(node.ids, skip_special_tokens=True))) >= max_steps:
                value = node.value if node.visits else node.prior
            else:
                new, used = _extend(
                    rollouts, ids, [_Path(node.ids)], settings, seed_base=(i * simulations + sim) * 1_000_003
                )
                tokens += used
                explored += len(new)
                _score_paths(scorer, prompt, new, tokenizer, steps_of, "last")
                for p in new:
                    child = _Node(p.ids, prior=p.score, done=p.done, parent=node)
                    if p.done:
                        text = tokenizer.decode(p.ids, skip_special_tokens=True)
                        child.prior = (
                            outcome(prompt, text) if outcome else _path_aggregate(scorer, prompt, text, steps_of, how)
                        )
                        finished.append(child)
                    node.children.append(child)
                value = max(c.prior for c in node.children)
            while node is not None:  # back up
                node.visits += 1
                node.value += (value - node.value) / node.visits
                node = node.parent
        if finished:
            best = max(finished, key=lambda c: (c.value if c.visits else c.prior, c.visits))
        else:
            best = _best_leaf(root)
        score = best.value if best.visits else best.prior
        text = tokenizer.decode(best.ids, skip_special_tokens=True)
        pairs = _tree_pairs(root, prompt, tokenizer, len(ids))
        results.append(SearchResult(prompt, text, score, tokens, finished=best.done, explored=explored, pairs=pairs))
    return results


def _tree_pairs(root: _Node, prompt: str, tokenizer, n_prompt: int) -> list:
    """MCTS-DPO pairs (Xie et al. 2024): at every node with at least two visited children, the child with the
    highest mean value against the one with the lowest (a strict difference), as one step after the node's
    prefix. The pair's prompt is the problem followed by the decoded prefix."""
    from prefkit.data.records import PairwiseRecord

    pairs, stack = [], [root]
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        visited = [c for c in node.children if c.visits]
        if len(visited) < 2:
            continue
        hi, lo = max(visited, key=lambda c: c.value), min(visited, key=lambda c: c.value)
        if hi.value <= lo.value:
            continue
        prefix = tokenizer.decode(node.ids, skip_special_tokens=True)

        def step(child: _Node) -> str:
            return tokenizer.decode(child.ids[len(node.ids) :], skip_special_tokens=True)

        pairs.append(
            PairwiseRecord(
                prompt=(prompt + " " + prefix).rstrip(), chosen=step(hi), rejected=step(lo), margin=hi.value - lo.value
            )
        )
    return pairs


def _path_aggregate(scorer, prompt: str, text: str, steps_of, how: str) -> float:
    return prm_scores(scorer, [prompt], [[text]], steps_of, how)[0][0]


def _best_leaf(root: _Node) -> _Node:
    node = root
    while node.children:
        node = max(node.children, key=lambda c: (c.visits, c.value))
    return node
