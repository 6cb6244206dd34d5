"""Conversions between kinds: ranked -> pairwise, rated -> pairwise, pairwise -> unpaired."""

import pytest

from prefkit.data import (
    PairwiseRecord,
    RankedRecord,
    RatedRecord,
    UnpairedRecord,
    convert_records,
    pairwise_to_unpaired,
    ranked_to_pairwise,
    rated_to_pairwise,
)


def pairs(records):
    return [(p.chosen, p.rejected) for p in records]


def test_ranked_all_and_adjacent_from_ranking():
    rec = RankedRecord("p", ["a", "b", "c", "d"], ranking=[2, 0, 3, 1], user_id="u", id="q1")
    all_pairs = ranked_to_pairwise([rec])
    assert pairs(all_pairs) == [("c", "a"), ("c", "d"), ("c", "b"), ("a", "d"), ("a", "b"), ("d", "b")]
    assert all(p.user_id == "u" and p.margin is None and p.prompt == "p" for p in all_pairs)
    assert all_pairs[0].id == "q1:2>0"
    assert pairs(ranked_to_pairwise([rec], mode="adjacent")) == [("c", "a"), ("a", "d"), ("d", "b")]
    # Curry-DPO's pairs: the best against each of the others
    assert pairs(ranked_to_pairwise([rec], mode="best")) == [("c", "a"), ("c", "d"), ("c", "b")]


def test_ranked_from_scores_with_ties():
    rec = RankedRecord("p", ["a", "b", "c", "d"], scores=[1.0, 3.0, 1.0, 0.5])
    all_pairs = ranked_to_pairwise([rec])
    assert pairs(all_pairs) == [("b", "a"), ("b", "c"), ("b", "d"), ("a", "d"), ("c", "d")]  # a~c: no pair
    assert [p.margin for p in all_pairs] == [2.0, 2.0, 2.5, 0.5, 0.5]
    assert (all_pairs[0].chosen_score, all_pairs[0].rejected_score) == (3.0, 1.0)
    # adjacent levels: {b} -> {a, c} -> {d}
    assert pairs(ranked_to_pairwise([rec], mode="adjacent")) == [
        ("b", "a"),
        ("b", "c"),
        ("a", "d"),
        ("c", "d"),
    ]
    assert ranked_to_pairwise([RankedRecord("p", ["a", "b"], scores=[1.0, 1.0])]) == []


def test_ranked_skips_identical_completions_and_checks_input():
    rec = RankedRecord("p", ["same", "same ", "other"], ranking=[0, 1, 2])
    assert pairs(ranked_to_pairwise([rec])) == [("same", "other"), ("same ", "other")]
    with pytest.raises(ValueError, match="mode must be"):
        ranked_to_pairwise([rec], mode="worst")
    with pytest.raises(ValueError, match="ranked record 1: ranking .* is not a permutation"):
        ranked_to_pairwise([RankedRecord("p", ["a", "b"], ranking=[0, 0])])
    with pytest.raises(TypeError, match="record 1 is a RatedRecord"):
        ranked_to_pairwise([RatedRecord("p", "c", {"x": 1.0})])


RATED = [
    RatedRecord("p", "a", {"help": 4.0, "safe": 1.0}, user_id="u1", id="1"),
    RatedRecord("p", "b", {"help": 2.0, "safe": 5.0}, user_id="u1", id="2"),
    RatedRecord("q", "c", {"help": 1.0, "safe": 1.0}, user_id="u2", id="3"),
    RatedRecord("p", "d", {"help": 3.5, "safe": 1.0}, user_id="u2", id="4"),
]


def test_rated_by_attribute_groups_by_prompt():
    out = rated_to_pairwise(RATED, attribute="help")
    assert pairs(out) == [("a", "b"), ("a", "d"), ("d", "b")]
    assert [p.margin for p in out] == [2.0, 0.5, 1.5]
    assert (out[0].chosen_score, out[0].rejected_score) == (4.0, 2.0)
    assert [p.user_id for p in out] == ["u1", None, None]
    assert [p.id for p in out] == ["1>2", "1>4", "4>2"]


def test_rated_weighted_sum_and_min_gap():
    out = rated_to_pairwise(RATED, weights={"help": 1.0, "safe": 0.5})  # a 4.5, b 4.5, d 4.0
    assert pairs(out) == [("a", "d"), ("b", "d")]
    assert [p.margin for p in out] == [0.5, 0.5]
    assert rated_to_pairwise(RATED, attribute="help", min_gap=1.0) == [
        PairwiseRecord("p", "a", "b", user_id="u1", margin=2.0, chosen_score=4.0, rejected_score=2.0, id="1>2"),
        PairwiseRecord("p", "d", "b", margin=1.5, chosen_score=3.5, rejected_score=2.0, id="4>2"),
    ]


def test_rated_by_user_and_single_rating_default():
    assert pairs(rated_to_pairwise(RATED, attribute="help", by_user=True)) == [("a", "b")]
    single = [RatedRecord("p", "x", {"score": 1.0}), RatedRecord("p", "y", {"score": 2.0})]
    assert pairs(rated_to_pairwise(single)) == [("y", "x")]


def test_rated_errors():
    with pytest.raises(ValueError, match="rated record 1: the record has several ratings"):
        rated_to_pairwise(RATED)
    with pytest.raises(ValueError, match=r"rated record 1: rating 'honest' missing; the record has \['help', 'safe'\]"):
        rated_to_pairwise(RATED, attribute="honest")
    with pytest.raises(ValueError, match="either attribute or weights"):
        rated_to_pairwise(RATED, attribute="help", weights={"help": 1.0})
    with pytest.raises(ValueError, match="min_gap"):
        rated_to_pairwise(RATED, attribute="help", min_gap=-1)


def test_pairwise_to_unpaired():
    out = pairwise_to_unpaired([PairwiseRecord("p", "good", "bad", user_id="u", weight=0.5, margin=2.0, id="7")])
    assert out == [
        UnpairedRecord("p", "good", True, user_id="u", weight=0.5, id="7:chosen"),
        UnpairedRecord("p", "bad", False, user_id="u", weight=0.5, id="7:rejected"),
    ]


def test_convert_records_dispatch_and_refusals():
    ranked = [RankedRecord("p", ["a", "b"], ranking=[1, 0])]
    assert pairs(convert_records(ranked, "pairwise", mode="adjacent")) == [("b", "a")]
    assert convert_records(ranked, None) == ranked
    assert convert_records(ranked, "ranked") == ranked
    assert len(convert_records(RATED, "pairwise", attribute="help", min_gap=1.0)) == 2
    assert len(convert_records([PairwiseRecord("p", "a", "b")], "unpaired")) == 2
    with pytest.raises(ValueError, match="no conversion from ranked to unpaired"):
        convert_records(ranked, "unpaired")
    with pytest.raises(ValueError, match="option.* min_gap do not apply to ranked -> pairwise"):
        convert_records(ranked, "pairwise", min_gap=0.5)
    with pytest.raises(ValueError, match="attribute do not apply to a format-only conversion"):
        convert_records(ranked, None, attribute="x")


def test_reward_augmented_pairs_condition_each_side_on_its_score():
    from prefkit.data.convert import reward_augmented_pairs, reward_conditioned_prompt

    pair = PairwiseRecord("Tell a joke.", "good joke", "bad joke", chosen_score=8.0, rejected_score=3.5, id="j")
    a, b = reward_augmented_pairs([pair])
    assert a.prompt == "Write a response that would be rated 8.\n\nTell a joke."
    assert (a.chosen, a.rejected, a.id) == ("good joke", "bad joke", "j:w")
    # conditioned on the worse score, the worse response is the right one
    assert b.prompt == "Write a response that would be rated 3.5.\n\nTell a joke."
    assert (b.chosen, b.rejected, b.chosen_score, b.rejected_score, b.id) == ("bad joke", "good joke", 3.5, 8.0, "j:l")
    assert a.margin == b.margin == 4.5
    # equal scores: only the first pair (the reversed one would contradict it)
    assert len(reward_augmented_pairs([PairwiseRecord("q", "a", "b", chosen_score=1.0, rejected_score=1.0)])) == 1
    # chat prompts get a system message, joined to an existing one
    chat = reward_conditioned_prompt([{"role": "user", "content": "hi"}], 10)
    assert chat[0] == {"role": "system", "content": "Write a response that would be rated 10."}
    joined = reward_conditioned_prompt([{"role": "system", "content": "Be brief."}], 2, "Target {score}")
    assert joined == [{"role": "system", "content": "Target 2\n\nBe brief."}]
    with pytest.raises(ValueError, match="record 1: reward-augmented pairs need chosen_score"):
        reward_augmented_pairs([PairwiseRecord("q", "a", "b")])
    with pytest.raises(ValueError, match="must contain"):
        reward_conditioned_prompt("q", 1.0, "no placeholder")


def test_convert_records_reward_augmented_after_ranked_to_pairwise():
    rec = RankedRecord("p", ["a", "b", "c"], scores=[3.0, 1.0, 2.0])
    out = convert_records([rec], "pairwise", mode="best", reward_augmented=True)
    assert [(p.prompt.split("\n")[0], p.chosen, p.rejected) for p in out] == [
        ("Write a response that would be rated 3.", "a", "c"),
        ("Write a response that would be rated 2.", "c", "a"),
        ("Write a response that would be rated 3.", "a", "b"),
        ("Write a response that would be rated 1.", "b", "a"),
    ]
    with pytest.raises(ValueError, match="reward_augmented do not apply to unpaired records"):
        convert_records([PairwiseRecord("q", "a", "b")], "unpaired", reward_augmented=True)
