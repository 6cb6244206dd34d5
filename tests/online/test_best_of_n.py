"""Best-of-N: the KL formula, the unbiased pool estimator (against brute force) and the sampling helper."""

import itertools
import math

import numpy as np
import pytest

from prefkit.models.tiny import build_byte_tokenizer, build_tiny_llama
from prefkit.online import best_of_n, best_of_n_expectation, best_of_n_kl, best_of_n_weights
from prefkit.online.best_of_n import round_robin_scores


def test_kl_formula():
    assert best_of_n_kl(1) == 0.0
    assert best_of_n_kl(2) == pytest.approx(math.log(2) - 0.5)  # 0.1931
    assert best_of_n_kl(4) == pytest.approx(math.log(4) - 0.75)  # 0.6363
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="positive int"):
            best_of_n_kl(bad)


def test_weights_by_hand():
    # m = 4, n = 2: C(i-1, 1) / C(4, 2) = 0, 1, 2, 3 over 6
    assert best_of_n_weights(4, 2) == pytest.approx([0, 1 / 6, 2 / 6, 3 / 6])
    # n = 1: uniform; n = m: all weight on the largest
    assert best_of_n_weights(5, 1) == pytest.approx([0.2] * 5)
    assert best_of_n_weights(5, 5) == pytest.approx([0, 0, 0, 0, 1])
    # large pools stay finite (log space) and sum to 1
    assert best_of_n_weights(512, 256).sum() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="1 <= n <= m"):
        best_of_n_weights(3, 4)


def _brute_force(scores, values, n):
    """Mean over all n-subsets of the value of the subset's best (ties: mean value of the tied best)."""
    out = []
    for subset in itertools.combinations(range(len(scores)), n):
        top = max(scores[i] for i in subset)
        out.append(np.mean([values[i] for i in subset if scores[i] == top]))
    return float(np.mean(out))


@pytest.mark.parametrize("ties", [False, True])
def test_estimator_matches_enumeration(ties):
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 3, size=(3, 6)).astype(float) if ties else rng.normal(size=(3, 6))
    values = rng.normal(size=(3, 6))
    for n in range(1, 7):
        expected = np.mean([_brute_force(s, v, n) for s, v in zip(scores, values)])
        assert best_of_n_expectation(scores, values, n) == pytest.approx(expected, abs=1e-12)


def test_estimator_edge_cases():
    scores = np.array([[0.3, 0.9, 0.1, 0.5]])
    values = np.array([[1.0, 2.0, 3.0, 8.0]])
    assert best_of_n_expectation(scores, values, 1) == pytest.approx(3.5)  # the mean of the values
    assert best_of_n_expectation(scores, values, 4) == pytest.approx(2.0)  # the value of the argmax (0.9)
    # n = 2 by hand: sorted by score the values are 3, 1, 8, 2 with weights 0, 1/6, 2/6, 3/6 -> 23/6
    assert best_of_n_expectation(scores, values, 2) == pytest.approx(23 / 6)
    # averaged over prompts: (2 + 3) / 2
    two = best_of_n_expectation(np.vstack([scores, scores]), np.vstack([values, values + 1]), 4)
    assert two == pytest.approx(2.5)
    with pytest.raises(ValueError, match=r"\[P, M\]"):
        best_of_n_expectation(scores[0], values[0], 1)
    with pytest.raises(ValueError, match="1 <= n <= m"):
        best_of_n_expectation(scores, values, 5)


def test_best_of_n_picks_the_highest_score():
    tokenizer = build_byte_tokenizer()
    model = build_tiny_llama(
        vocab_size=len(tokenizer), hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32, seed=0
    )
    # score = completion length in characters: the best is the longest candidate
    out = best_of_n(
        model, tokenizer, ["ab", "cd"], 4, lambda items: [len(t) for _, t in items], max_new_tokens=6, progress=False
    )
    assert [o.prompt for o in out] == ["ab", "cd"]
    for o in out:
        assert len(o.candidates) == 4 and len(o.scores) == 4
        assert o.best_score == max(o.scores) == len(o.best.text)
        assert o.best is o.candidates[o.scores.index(o.best_score)]
    with pytest.raises(ValueError, match="one score each"):
        best_of_n(model, tokenizer, ["ab"], 2, lambda items: [0.0], max_new_tokens=2, progress=False)


def test_pass_at_n_by_hand():
    from prefkit.online.best_of_n import pass_at_n

    correct = np.array([[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    assert pass_at_n(correct, 1) == pytest.approx((1 / 4 + 0) / 2)
    assert pass_at_n(correct, 2) == pytest.approx((1 - 3 / 6 + 0) / 2)  # 1 - C(3, 2) / C(4, 2)
    assert pass_at_n(correct, 4) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        pass_at_n(correct, 5)


def test_majority_vote_accuracy_by_hand():
    from prefkit.online.best_of_n import majority_vote_accuracy

    answers = [["5", "3", "5", None], ["1", "2", "2", "1"]]
    correct = np.array([[1.0, 0.0, 1.0, 0.0], [0.0, 1.0, 1.0, 0.0]])
    # n = M: problem 1 votes 5 (right); problem 2 ties 1 and 2 and the first sampled, "1", wins (wrong)
    assert majority_vote_accuracy(answers, correct, 4) == 0.5
    # n = 1: one random sample, so the mean accuracy of the pool (a Monte-Carlo estimate)
    assert majority_vote_accuracy(answers, correct, 1, draws=4000) == pytest.approx(0.5, abs=0.03)


def test_round_robin_scores_from_a_pairwise_judge():
    """Each completion scores its mean P(win) against the others of its prompt; each pair is asked once."""
    asked = []

    def longer_wins(prompts, first, second):
        asked.extend(zip(first, second))
        return [0.9 if len(a) > len(b) else 0.1 if len(a) < len(b) else 0.5 for a, b in zip(first, second)]

    scores = round_robin_scores(longer_wins, ["p", "q"], [["aa", "a", "aaa"], ["x", "x"]])
    # "aa": beats "a" (0.9), loses to "aaa" (0.1) -> 0.5; "a": 0.1, 0.1 -> 0.1; "aaa": 0.9, 0.9 -> 0.9
    assert scores[0] == pytest.approx([0.5, 0.1, 0.9]) and scores[1] == pytest.approx([0.5, 0.5])
    assert len(asked) == 3 + 1
    with pytest.raises(ValueError, match="2 probabilities for 4 pairs"):
        round_robin_scores(lambda p, a, b: [0.5, 0.5], ["p", "q"], [["aa", "a", "aaa"], ["x", "x"]])


def test_best_of_n_with_a_judge_keeps_the_round_robin_winner():
    tokenizer = build_byte_tokenizer()
    tiny_policy = build_tiny_llama(
        vocab_size=len(tokenizer), hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32, seed=0
    )

    def longer_wins(prompts, first, second):
        return [1.0 if len(a) > len(b) else 0.0 if len(a) < len(b) else 0.5 for a, b in zip(first, second)]

    (picked,) = best_of_n(tiny_policy, tokenizer, ["Once"], 4, judge=longer_wins, max_new_tokens=8, progress=False)
    assert len(picked.best.text) == max(len(c.text) for c in picked.candidates)
    with pytest.raises(ValueError, match="exactly one of score_fn"):
        best_of_n(tiny_policy, tokenizer, ["Once"], 2, lambda items: [0.0] * len(items), judge=longer_wins)
