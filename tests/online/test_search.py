"""Search with process rewards: aggregation, majority vote, best-of-N candidates, step-level beam search and
MCTS return the tokens they generated; Monte-Carlo step labels (per step and by binary search)."""

import math

import pytest
import torch

from prefkit.data.records import StepwiseRecord
from prefkit.models.tiny import build_byte_tokenizer, build_tiny_llama
from prefkit.online import search
from prefkit.online.rollouts import HFRollouts
from prefkit.online.search import (
    aggregate_steps,
    majority_vote,
    prm_mcts,
    prm_scores,
    sample_candidates,
    split_steps,
    step_beam_search,
)
from prefkit.online.step_labels import monte_carlo_step_labels


class WordScorer:
    """A stand-in PRM: logit +3 for a step holding "ok", -3 otherwise."""

    def __init__(self):
        self.calls = 0

    def score(self, records, progress=False):
        self.calls += 1
        return [[3.0 if "ok" in step else -3.0 for step in r.completions] for r in records]


@pytest.fixture(scope="module")
def tok():
    return build_byte_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(0)
    return build_tiny_llama(vocab_size=len(tok), seed=0).eval()


@pytest.fixture
def counted(monkeypatch):
    """Counts the completion tokens every rollout call in the search module returns."""
    seen = {"tokens": 0, "calls": 0}
    original = HFRollouts.generate

    def generate(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        seen["tokens"] += sum(len(r.completion_ids) for r in out)
        seen["calls"] += 1
        return out

    monkeypatch.setattr(HFRollouts, "generate", generate)
    return seen


def test_aggregations_by_hand():
    p = [0.9, 0.5, 0.8]
    assert aggregate_steps(p, "min") == 0.5
    assert aggregate_steps(p, "last") == 0.8
    assert aggregate_steps(p, "product") == pytest.approx(0.36)
    assert aggregate_steps(p, "mean") == pytest.approx(2.2 / 3)
    assert aggregate_steps([], "min") == 0.0
    with pytest.raises(ValueError, match="how: expected one of min, product, last, mean"):
        aggregate_steps(p, "max")


def test_majority_vote_and_split_steps():
    assert majority_vote(["5", None, "3", "5", "3"]) == 0  # 5 and 3 tie at 2: the first sampled of them wins
    assert majority_vote([None, "7", "2", "2"]) == 2
    assert majority_vote([None, None]) == 0
    assert split_steps("a ; b ;  ; c", " ;") == ["a", "b", "c"]


def test_prm_scores_aggregate_each_candidate():
    texts = [["ok ; ok", "ok ; no", ""]]
    scores = prm_scores(WordScorer(), ["q"], texts, lambda t: split_steps(t, ";"), "min")[0]
    high, low = 1 / (1 + math.exp(-3)), 1 / (1 + math.exp(3))
    assert scores == pytest.approx([high, low, 0.0])
    assert prm_scores(WordScorer(), ["q"], texts, lambda t: split_steps(t, ";"), "last")[0][1] == pytest.approx(low)


def test_sample_candidates_count_their_tokens(model, tok, counted):
    out = sample_candidates(model, tok, ["ab", "cd"], 3, max_new_tokens=5, seed=1)
    assert [len(c.texts) for c in out] == [3, 3]
    assert sum(c.tokens for c in out) == counted["tokens"]
    again = sample_candidates(model, tok, ["ab", "cd"], 3, max_new_tokens=5, seed=1)
    assert [c.token_ids for c in again] == [c.token_ids for c in out]  # seeded


def test_beam_search_reports_the_tokens_it_generated(model, tok, counted):
    results = step_beam_search(
        model, tok, WordScorer(), ["ab", "cd"], separator=";", beam_width=2, expansions=2, max_steps=3, step_tokens=4
    )
    assert len(results) == 2
    assert sum(r.tokens for r in results) == counted["tokens"] > 0
    for r in results:
        assert 0 < r.explored <= 2 + 2 * 2 * 2  # depth 1: one beam x 2; later depths: <= 2 beams x 2
    again = step_beam_search(
        model, tok, WordScorer(), ["ab", "cd"], separator=";", beam_width=2, expansions=2, max_steps=3, step_tokens=4
    )
    assert [r.text for r in again] == [r.text for r in results]


def test_mcts_reports_the_tokens_it_generated(model, tok, counted):
    results = prm_mcts(model, tok, WordScorer(), ["ab"], separator=";", simulations=4, expansions=2, step_tokens=4)
    assert results[0].tokens == counted["tokens"] > 0
    assert results[0].explored <= 4 * 2 and counted["calls"] <= 4


def test_search_on_a_policy_that_knows_the_steps(tok):
    """A policy whose every step is "ok;" or "no;": beam search guided by the stand-in PRM keeps "ok" steps."""

    # built from the tiny model by biasing its output layer towards the bytes of "o", "k", "n", ";"
    lm = build_tiny_llama(vocab_size=len(tok), seed=1)
    ids = {c: tok(c, add_special_tokens=False)["input_ids"][0] for c in "okn;"}
    with torch.no_grad():
        lm.lm_head.weight.zero_()
        bias = torch.full((len(tok),), -30.0)
        for c in "okn;":
            bias[ids[c]] = 0.0
        lm.lm_head.bias = torch.nn.Parameter(bias)
    lm.eval()
    results = step_beam_search(
        lm, tok, WordScorer(), ["q"], separator=";", beam_width=2, expansions=8, max_steps=2, step_tokens=3
    )
    # among 8 sampled 1-3 byte steps over {o, k, n, ;} some contain "ok": the kept beam does
    assert "ok" in search.split_steps(results[0].text, ";")[0]


def test_monte_carlo_labels_per_step_and_by_binary_search(model, tok, counted):
    records = [
        StepwiseRecord(prompt="q", completions=["ok", "ok", "no", "ok"], labels=[True] * 4),
        StepwiseRecord(prompt="r", completions=["ok", "ok"], labels=[False, False]),
    ]
    verifier = lambda prompt, text: "no;" not in text  # noqa: E731  (random continuations never write "no;")
    soft = monte_carlo_step_labels(model, tok, records, verifier, separator=";", rollouts=3, max_new_tokens=3)
    assert [r.labels for r in soft.records] == [[1.0, 1.0, 0.0, 0.0], [1.0, 1.0]]
    assert soft.rollouts == 6 * 3 and soft.tokens == counted["tokens"]
    hard = monte_carlo_step_labels(
        model, tok, records, verifier, separator=";", rollouts=3, mode="hard", max_new_tokens=3
    )
    assert [r.labels for r in hard.records] == [[True, True, False, False], [True, True]]
    counted["tokens"] = 0
    binary = monte_carlo_step_labels(
        model, tok, records, verifier, separator=";", rollouts=3, mode="binary_search", max_new_tokens=3
    )
    assert binary.records[0].completions == ["ok", "ok", "no"] and binary.records[0].labels == [True, True, False]
    assert binary.records[1].labels == [True, True]
    # prefixes estimated: record 0 (4 steps) at step 2 (fails), then 1 (succeeds); record 1 at step 1: 3 x 3
    assert binary.rollouts == 3 * 3 < soft.rollouts
    assert binary.tokens == counted["tokens"]
    with pytest.raises(ValueError, match="mode: expected soft, hard or binary_search"):
        monte_carlo_step_labels(model, tok, records, verifier, separator=";", mode="omega")


def test_mcts_tree_gives_step_pairs(model, tok):
    class LengthScorer:  # steps of different lengths get different values
        def score(self, records, progress=False):
            return [[len(step) - 2.0 for step in r.completions] for r in records]

    (result,) = prm_mcts(model, tok, LengthScorer(), ["ab"], separator=";", simulations=6, expansions=3, step_tokens=4)
    assert result.pairs
    for pair in result.pairs:
        assert pair.margin > 0 and pair.prompt.startswith("ab") and pair.chosen != pair.rejected
