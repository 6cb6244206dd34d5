"""prefkit.eval.metrics on scores given by hand; every expected value is worked out in a comment."""

import math

import numpy as np
import pytest
import torch

from prefkit.eval.metrics import (
    alignment_gap,
    best_of_n_accuracy,
    best_of_n_credit,
    expected_calibration_error,
    idealized_ranking_accuracy,
    length_bias,
    list_ranking_accuracy,
    pairwise_accuracy,
    pearson,
    per_subset_accuracy,
    rewardbench2_ties_score,
    rmbench_domain,
    rmbench_scores,
    section_scores,
    spearman,
    style_grid_accuracy,
)


def test_pairwise_accuracy_counts_ties_as_wrong():
    # pairs: 2>1 right, 1=1 tie (wrong), 0<3 wrong, 5>-1 right -> 2/4
    assert pairwise_accuracy([2.0, 1.0, 0.0, 5.0], torch.tensor([1.0, 1.0, 3.0, -1.0])) == 0.5
    with pytest.raises(ValueError, match="same length"):
        pairwise_accuracy([1.0], [1.0, 2.0])


def test_per_subset_accuracy():
    # a: [1, 0] -> 0.5 over 2; b: [1] -> 1.0 over 1
    out = per_subset_accuracy([True, False, True], ["a", "a", "b"])
    assert out == {"a": {"accuracy": 0.5, "n": 2}, "b": {"accuracy": 1.0, "n": 1}}


def test_section_scores_count_weighted_mean_and_weights():
    subsets = {
        "a": {"accuracy": 1.0, "n": 10},
        "b": {"accuracy": 0.5, "n": 30},
        "c": {"accuracy": 0.0, "n": 5},
        "d": {"accuracy": 1.0, "n": 5},
    }
    sections = {
        "S1": {"subsets": ["a", "b", "z"]},  # count-weighted: (10*1 + 30*0.5) / 40 = 0.625; z missing
        "S2": {"subsets": ["c", "d"], "average": "mean", "weight": 0.5},  # (0 + 1) / 2 = 0.5
        "S3": {"subsets": ["y"]},  # nothing evaluated: reported, not scored
    }
    out = section_scores(subsets, sections)
    assert out["sections"] == {"S1": 0.625, "S2": 0.5}
    assert out["score"] == pytest.approx((0.625 * 1 + 0.5 * 0.5) / 1.5)  # 0.58333
    assert out["missing"] == {"S1": ["z"], "S3": ["y"]} and out["unscored"] == ["S3"]
    assert out["weighting"] == {"S1": "rows evaluated", "S2": "plain mean"}  # the report says which
    # a counted as 30 examples (RewardBench's math-prm style override): (30*1 + 30*0.5) / 60 = 0.75
    counted = section_scores(subsets, sections, counts={"a": 30})
    assert counted["sections"]["S1"] == 0.75 and counted["weighting"]["S1"] == "fixed counts, else rows evaluated"


def test_best_of_4_with_ties_shares_credit():
    # chosen first: alone at top -> 1; tied with one -> 1/2; beaten -> 0; four-way tie -> 1/4
    items = [[2, 1, 1, 1], [2, 2, 1, 0], [1, 2, 0, 0], [3, 3, 3, 3]]
    assert [best_of_n_credit(s) for s in items] == [1.0, 0.5, 0.0, 0.25]
    assert best_of_n_accuracy(items) == pytest.approx(1.75 / 4)  # 0.4375
    assert best_of_n_accuracy([[0, 5]], chosen_index=[1]) == 1.0


def test_style_grid_accuracy_orientation():
    chosen = [[3, 2, 1], [1, 1, 1]]
    rejected = [[2, 1, 0], [0, 0, 2]]
    # record 1: rows (chosen style i) vs columns (rejected style j): [1,1,1] [0,1,1] [0,0,1]
    # record 2: [1,1,0] in every row; mean: [1,1,.5] [.5,1,.5] [.5,.5,.5]
    out = style_grid_accuracy(chosen, rejected)
    assert out["matrix"] == [[1.0, 1.0, 0.5], [0.5, 1.0, 0.5], [0.5, 0.5, 0.5]]
    assert out["hard"] == pytest.approx(2 / 3)  # upper triangle (chosen plainer than rejected): 1, .5, .5
    assert out["normal"] == pytest.approx(5 / 6)  # diagonal: 1, 1, .5
    assert out["easy"] == pytest.approx(0.5)  # lower triangle: .5, .5, .5
    assert out["total"] == pytest.approx(6 / 9)


def test_list_ranking_accuracy():
    predicted = [[3, 2, 1], [1, 1, 0], [1, 2]]
    truth = [[3, 2, 1], [0, 1, 2], [5, 5]]
    # list 1: 3 pairs all agree; list 2: truth is 2>1>0, prediction 0=1>2: all 3 pairs wrong
    # (the 0-vs-1 tie counts as wrong); list 3: tied in truth, no pair. 3 / 6.
    # top-1: list 1 right (1), list 2 predicted top {0, 1} holds no best (0), list 3 top {1} is a best (1)
    out = list_ranking_accuracy(predicted, truth)
    assert out == {"pair_accuracy": 0.5, "top1_accuracy": pytest.approx(2 / 3), "n_pairs": 6, "n_lists": 3}


def test_idealized_ranking_accuracy_and_gap():
    ref_w, ref_l = [-10.0, -10.0, -10.0], [-9.0, -12.0, -9.0]
    p = [0.6, 0.5, 0.0]
    # log-ratio of the ideal policy = (ref_w - ref_l) + logit(p) / beta, logit(0.6) = ln 1.5 = 0.405
    # beta = 1:   -1 + 0.405 < 0 (wrong); 2 + 0 > 0 (right); p = 0 -> -inf (wrong)  -> 1/3
    # beta = 0.1: -1 + 4.05 > 0 (right); right; wrong                                -> 2/3
    assert idealized_ranking_accuracy(ref_w, ref_l, p, beta=1.0) == pytest.approx(1 / 3)
    assert idealized_ranking_accuracy(ref_w, ref_l, p, beta=0.1) == pytest.approx(2 / 3)
    assert idealized_ranking_accuracy(ref_w, ref_l, 1.0, beta=1.0) == 1.0  # p = 1 always ranks right
    assert alignment_gap(0.75, 0.5) == 0.25
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        idealized_ranking_accuracy(ref_w, ref_l, 1.5, beta=1.0)


def test_expected_calibration_error_by_hand():
    probs, outcomes = [0.15, 0.15, 0.85, 0.95, 1.0], [0, 1, 1, 1, 1]
    # bin [0.1,0.2): 2 items, conf 0.15, acc 0.5 -> 2/5 * 0.35 = 0.14
    # bin [0.8,0.9): 1 item, conf 0.85, acc 1  -> 1/5 * 0.15 = 0.03
    # bin [0.9,1.0]: 2 items (1.0 falls in the last bin), conf 0.975, acc 1 -> 2/5 * 0.025 = 0.01
    out = expected_calibration_error(probs, outcomes, n_bins=10)
    assert out["ece"] == pytest.approx(0.18)
    counts = [b["count"] for b in out["bins"]]
    assert counts == [0, 2, 0, 0, 0, 0, 0, 0, 1, 2] and out["n"] == 5
    assert out["bins"][1] == {"lower": 0.1, "upper": 0.2, "count": 2, "confidence": 0.15, "accuracy": 0.5}
    assert out["bins"][0]["confidence"] is None
    assert expected_calibration_error([0.5, 0.5], [0, 1], n_bins=2)["ece"] == 0.0  # conf 0.5, acc 0.5
    with pytest.raises(ValueError, match="0 or 1"):
        expected_calibration_error([0.5], [2])


def test_correlations():
    assert pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert spearman([1, 2, 3], [1, 4, 9]) == pytest.approx(1.0)
    assert pearson([1, 2, 3], [1, 4, 9]) < 1.0
    # ranks of x = [1, 2.5, 2.5, 4], of y = [1, 2, 3, 4]: sum dxdy = 4.5, sum dx^2 = 4.5, sum dy^2 = 5
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(4.5 / math.sqrt(22.5))
    assert pearson([1, 1, 1], [1, 2, 3]) is None  # constant input: undefined


def test_length_bias():
    chosen, rejected = [1.0, 2.0, 3.0, 0.0], [0.0, 3.0, 1.0, 0.0]
    len_c, len_r = [10, 5, 20, 7], [5, 10, 10, 7]
    # correct: T, F, T, F (tie). chosen shorter: pair 2 only -> 0/1; chosen longer: pairs 1, 3 -> 2/2;
    # equal: pair 4. "Longer wins" is right on pairs 1 and 3 -> 2/4.
    out = length_bias(chosen, rejected, len_c, len_r)
    assert out["accuracy_chosen_shorter"] == 0.0 and out["accuracy_chosen_longer"] == 1.0
    assert out["longer_wins_accuracy"] == 0.5
    assert (out["n_chosen_shorter"], out["n_chosen_longer"], out["n_equal"]) == (1, 2, 1)
    rewards, lengths = np.array(chosen + rejected), np.array(len_c + len_r)
    assert out["pearson"] == pytest.approx(np.corrcoef(rewards, lengths)[0, 1])
    assert out["spearman"] == pytest.approx(spearman(rewards, lengths))


def test_pair_credit_under_each_tie_policy_by_hand():
    from prefkit.eval.metrics import pair_credit

    logits = [2.0, -1.0, 0.3, 0.1, -0.2]
    ties = [False, False, False, True, True]
    half, t = pair_credit(logits, ties, "half")
    assert half.tolist() == [1, 0, 1, 0.5, 0.5] and t is None
    assert pair_credit(logits, ties, "wrong")[0].tolist() == [1, 0, 1, 0, 0]
    # threshold: t = 0.2 predicts both ties and keeps the decisive 2.0 and 0.3 right (4 of 5); t = 0 gets 2 of 5,
    # t = 0.3 loses the 0.3 pair (3 of 5)
    credit, t = pair_credit(logits, ties, "threshold")
    assert t == pytest.approx(0.2) and credit.tolist() == [1, 0, 1, 1, 1]
    with pytest.raises(ValueError, match="tie policy"):
        pair_credit(logits, ties, "coin")


def test_rewardbench_section_map_weighs_subsets_by_the_benchmarks_fixed_counts():
    """RewardBench's own rule (calculate_scores_per_section): a section's score is its subsets' accuracies
    weighted by EXAMPLE_COUNTS, whatever number of rows was evaluated; subsets not evaluated are left out."""
    from prefkit.eval.commands import load_section_map
    from prefkit.eval.metrics import section_scores

    sections, counts = load_section_map("rewardbench")
    assert set(sections) == {"Chat", "Chat Hard", "Safety", "Reasoning"} and counts["math-prm"] == 984
    subsets = {
        "alpacaeval-easy": {"accuracy": 1.0, "n": 10},
        "alpacaeval-hard": {"accuracy": 0.5, "n": 10},
        "mt-bench-easy": {"accuracy": 0.0, "n": 3},
        "math-prm": {"accuracy": 0.5, "n": 4},
        "hep-go": {"accuracy": 1.0, "n": 4},
    }
    out = section_scores(subsets, sections, counts)
    chat = (1.0 * 100 + 0.5 * 95 + 0.0 * 28) / (100 + 95 + 28)
    reasoning = (0.5 * 984 + 1.0 * 164) / (984 + 164)
    assert out["sections"]["Chat"] == pytest.approx(chat)
    assert out["sections"]["Reasoning"] == pytest.approx(reasoning)
    assert out["score"] == pytest.approx((chat + reasoning) / 2)
    assert "alpacaeval-length" in out["missing"]["Chat"] and set(out["unscored"]) == {"Chat Hard", "Safety"}
    assert out["weighting"] == {"Chat": "fixed counts", "Reasoning": "fixed counts"}


def test_rmbench_scores_average_domains_not_records():
    # RM-Bench's compute_accuracy on total_dataset.json: a 3x3 matrix per domain (chosen style i beats rejected
    # style j), hard / normal / easy = upper triangle / diagonal / lower triangle, the domain's score their mean,
    # the total the mean over domains; safety-refuse and safety-response are one domain.
    chosen = [[1, 1, 3], [0, 0, 0], [5, 5, 5], [5, 5, 5]]
    rejected = [[2, 2, 2], [1, 1, 1], [1, 1, 1], [1, 1, 1]]
    names = ["chat", "safety-refuse_filtered.json", "safety-response", "data/safety-response_filtered.json"]
    domains = [rmbench_domain(n) for n in names]
    assert domains == ["chat", "safety", "safety", "safety"]
    assert rmbench_domain("total_dataset.json") is None and rmbench_domain("Code_filtered.json") == "code"
    out = rmbench_scores(chosen, rejected, domains)
    # chat: only the markdown chosen (3) beats the rejected (2): matrix row 2 = 1 -> hard 0, normal 1/3, easy 2/3
    chat = out["domains"]["chat"]
    assert (chat["hard"], chat["normal"], chat["easy"]) == (0.0, pytest.approx(1 / 3), pytest.approx(2 / 3))
    assert chat["score"] == pytest.approx(1 / 3) and chat["n"] == 1
    # safety: 2 of 3 records right in every cell -> 2/3 everywhere
    assert out["domains"]["safety"]["score"] == pytest.approx(2 / 3) and out["domains"]["safety"]["n"] == 3
    assert out["score"] == pytest.approx(0.5)  # (1/3 + 2/3) / 2; all records pooled would give 21/36
    assert (out["hard"], out["normal"], out["easy"]) == (
        pytest.approx(1 / 3),
        pytest.approx(0.5),
        pytest.approx(2 / 3),
    )
    assert out["missing"] == ["math", "code"]
    assert style_grid_accuracy(chosen, rejected)["total"] == pytest.approx(21 / 36)
    # all four domains (the same numbers RM-Bench's own compute_accuracy gives on these scores):
    # math [1,2,3] vs [2,1,0]: 2/3 in every triangle; code [3,0,0] vs [1,1,4]: hard 1/3, normal 1/3, easy 0
    full = rmbench_scores(
        chosen + [[1, 2, 3], [3, 0, 0]], rejected + [[2, 1, 0], [1, 1, 4]], domains + ["math", "code"]
    )
    assert full["missing"] == [] and full["domains"]["code"]["score"] == pytest.approx(2 / 9)
    assert full["score"] == pytest.approx((1 / 3 + 2 / 3 + 2 / 3 + 2 / 9) / 4)  # 17/36
    assert (full["hard"], full["normal"], full["easy"]) == (
        pytest.approx(5 / 12),
        pytest.approx(0.5),
        pytest.approx(0.5),
    )


def test_rewardbench2_ties_score_by_hand():
    # process_single_model in allenai/reward-bench: 0.3 tied acc + 0.3 ref acc + 0.2 preferred + 0.2 hard + 0.01 margin
    items = [
        ("ref:1", [5, 1, 2], 1),  # worst correct 5 - best wrong 2 = 3: accurate
        ("tied:1", [4, 6, 3, 1], 2),  # correct 4, 6 (spread 2), gap 4 - 3 = 1: accurate, 1 > 2 no
        ("ref:2", [1, 2], 1),  # gap -1: wrong
        ("tied:2", [5, 5, 0], 2),  # spread 0, gap 5: accurate, 5 > 0 yes; min(-1, 5) > 0 no
        ("tied:3", [2, 1, 3], 2),  # gap -2: wrong; no ref:3, so not in the margin terms
    ]
    out = rewardbench2_ties_score(items)
    margin = (math.tanh(1 / 2 - 1) + -1.0) / 2  # prompt 2: -1 / 0 -> tanh(-inf) = -1
    assert out["ref_accuracy"] == 0.5 and out["tied_accuracy"] == pytest.approx(2 / 3)
    assert (out["correctness_preferred"], out["correctness_preferred_hard"]) == (0.5, 0.0)
    assert out["margin_score"] == pytest.approx(margin) and out["n_prompts"] == 2
    assert out["score"] == pytest.approx(0.3 * 2 / 3 + 0.3 * 0.5 + 0.2 * 0.5 + 0.01 * margin)
    # 0 / 0 (no spread, no gap) counts 0 in the margin term
    zero = rewardbench2_ties_score([("ref:1", [1, 0], 1), ("tied:1", [1, 1, 1], 2)])
    assert zero["margin_score"] == 0.0 and zero["ref_accuracy"] == 1.0 and zero["tied_accuracy"] == 0.0
    with pytest.raises(ValueError, match="'ref:<number>' or 'tied:<number>'"):
        rewardbench2_ties_score([("x1", [1, 0], 1)])
    with pytest.raises(ValueError, match="no prompt has both"):
        rewardbench2_ties_score([("ref:1", [1, 0], 1)])
