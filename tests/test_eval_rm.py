"""evaluate_reward_model with a reward model whose scores are known: reward = response length in tokens."""

import math

import pytest
import torch
from torch import nn

from prefkit.eval.data import load_eval_set
from prefkit.eval.rm import EvalOptions, evaluate_reward_model

OPTIONS = EvalOptions(batch_size=3, progress=False)


class LengthReward(nn.Module):
    """Reward = number of response tokens (byte tokenizer: one per ASCII character, plus EOS)."""

    def __init__(self):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))

    def score(self, input_ids, attention_mask, completion_mask=None):
        return completion_mask.sum(1).float()


class LengthJudge(nn.Module):
    """The same preferences as a pairwise judge only (no score method), like a GPM."""

    def __init__(self):
        super().__init__()
        self.rm = LengthReward()

    def compare(self, ids_a, mask_a, ids_b, mask_b, completion_mask_a=None, completion_mask_b=None):
        return self.rm.score(ids_a, mask_a, completion_mask_a) - self.rm.score(ids_b, mask_b, completion_mask_b)


PAIRS = [
    {"prompt": "q", "chosen": "aaaa", "rejected": "aa", "subset": "x"},  # 5 vs 3 tokens: right, chosen longer
    {"prompt": "q", "chosen": "a", "rejected": "aaa", "subset": "y"},  # 2 vs 4: wrong, chosen shorter
    {"prompt": "q", "chosen": "aa", "rejected": "bb", "subset": "y"},  # 3 vs 3: tie, wrong, equal length
    {"prompt": "q", "chosen": "aaaaa", "rejected": "a", "subset": "x"},  # 6 vs 2: right, chosen longer
]


def _sigmoid(x):
    return 1 / (1 + math.exp(-x))


def test_pairs_metrics_by_hand(tokenizer):
    sections = {"all": {"subsets": ["x", "y"]}}
    ev = evaluate_reward_model(
        LengthReward(), tokenizer, load_eval_set([(None, PAIRS)]), EvalOptions(progress=False, sections=sections)
    )
    m = ev.results["metrics"]
    assert m["accuracy"] == 0.5
    assert m["subsets"] == {"x": {"accuracy": 1.0, "n": 2}, "y": {"accuracy": 0.0, "n": 2}}
    assert m["sections"]["score"] == 0.5  # (2 * 1.0 + 2 * 0.0) / 4
    lb = m["length_bias"]
    assert lb["pearson"] == pytest.approx(1.0) and lb["spearman"] == pytest.approx(1.0)
    assert (lb["accuracy_chosen_longer"], lb["accuracy_chosen_shorter"], lb["longer_wins_accuracy"]) == (1.0, 0.0, 0.5)
    # logits 2, -2, 0, 4 enter in both orders. Bins [.1,.2) and [.8,.9) each get sigmoid(2) with
    # outcome 1 and with outcome 0 (accuracy 0.5), the 0.5 bin is exact, and sigmoid(4) / 1 - sigmoid(4)
    # sit alone in the end bins: ECE = (4 * (sigmoid(2) - 0.5) + 2 * (1 - sigmoid(4))) / 8
    assert m["calibration"]["ece"] == pytest.approx((4 * (_sigmoid(2) - 0.5) + 2 * (1 - _sigmoid(4))) / 8)
    assert ev.items[0] == {
        "subset": "x",
        "logit": 2.0,
        "correct": True,
        "chosen_length": 5,
        "rejected_length": 3,
        "chosen_reward": 5.0,
        "rejected_reward": 3.0,
    }
    assert "ranking_accuracy" in ev.results["skipped"]


def test_judge_gets_pairwise_metrics_and_skips_scalar_ones(tokenizer):
    ev = evaluate_reward_model(LengthJudge(), tokenizer, load_eval_set([(None, PAIRS)]), OPTIONS)
    assert ev.results["scorer"] == "judge" and ev.results["metrics"]["accuracy"] == 0.5
    assert "length_bias" not in ev.results["metrics"] and "judge" in ev.results["skipped"]["length_bias"]
    rows = [{"prompt": "q", "chosen": ["aaaa"], "rejected": ["a", "a", "a"]}]
    ev = evaluate_reward_model(LengthJudge(), tokenizer, load_eval_set([(None, rows)], layout="rewardbench2"), OPTIONS)
    assert ev.results["metrics"] == {} and "best_of_n" in ev.results["skipped"]


def test_best_of_4_with_ties(tokenizer):
    rows = [
        {"prompt": "q", "chosen": ["aaa"], "rejected": ["a", "bbb", "aa"], "subset": "s"},  # tie at the top: 1/2
        {"prompt": "q", "chosen": ["aaaa"], "rejected": ["a", "a", "a"], "subset": "t"},  # alone at the top: 1
    ]
    ev = evaluate_reward_model(LengthReward(), tokenizer, load_eval_set([(None, rows)], layout="rewardbench2"), OPTIONS)
    m = ev.results["metrics"]
    assert m["best_of_n_accuracy"] == 0.75 and m["subset_mean"] == 0.75 and m["n_per_record"] == [4]
    assert m["subsets"]["s"] == {"accuracy": 0.5, "n": 1}
    assert ev.items[0]["rewards"] == [4.0, 2.0, 4.0, 3.0]


def test_rewardbench2_ties_subset_by_its_own_rule(tokenizer):
    # reward = characters + 1; Ties rows: ids ref:<k> / tied:<k>, the chosen responses are the correct answers
    rows = [
        {"id": "ref:1", "subset": "Ties", "prompt": "q", "chosen": ["aaaaa"], "rejected": ["a", "aa"]},  # 6 vs 2,3
        {"id": "tied:1", "subset": "Ties", "prompt": "q", "chosen": ["aaa", "aaaaa"], "rejected": ["a", "aa"]},
        {"id": "m", "subset": "Math", "prompt": "q", "chosen": ["aaaa"], "rejected": ["a", "a", "a"]},
    ]
    eval_set = load_eval_set([(None, rows)], layout="rewardbench2")
    assert eval_set.best == [None, None, 0] and eval_set.n_correct == [1, 2, 1]
    m = evaluate_reward_model(LengthReward(), tokenizer, eval_set, OPTIONS).results["metrics"]
    # ref: gap 6 - 3 = 3 (accurate); tied: correct 4, 6 (spread 2), gap 4 - 3 = 1 (accurate, 1 > 2 no);
    # min(3, 1) > 2 no; margin tanh(1 / 2 - 1). Score = 0.3 + 0.3 + 0 + 0 + 0.01 tanh(-0.5)
    ties = m["subsets"]["Ties"]
    assert ties["accuracy"] == pytest.approx(0.6 + 0.01 * math.tanh(-0.5)) and ties["n"] == 2
    assert m["best_of_n_accuracy"] == 1.0  # the Math row only: Ties rows have no per-row credit
    assert m["subset_mean"] == pytest.approx((ties["accuracy"] + 1.0) / 2)
    assert m["rewardbench2_missing"] == ["Factuality", "Precise IF", "Safety", "Focus"]


def test_rmbench_overall_is_the_mean_of_domains_from_file_names(tokenizer, tmp_path):
    import json

    # reward = characters + 1. chat: the chosen always longer -> every cell right (score 1); safety (refuse and
    # response files are one domain): chosen always shorter -> 0. Overall 0.5, though 1 of 3 records is right.
    chat = [{"prompt": "q", "chosen": ["aa", "aaa", "aaaa"], "rejected": ["a", "a", "a"], "subset": "alpacaeval"}]
    safe = [{"prompt": "q", "chosen": ["a", "a", "a"], "rejected": ["aa", "aaa", "aaaa"]}]
    files = []
    for name, rows in (
        ("chat_filtered.json", chat),
        ("safety-refuse_filtered.json", safe),
        ("safety-response_x.json", safe),
    ):
        files.append(tmp_path / name)
        files[-1].write_text(json.dumps(rows))
    eval_set = load_eval_set([(None, f) for f in files], layout="rmbench")
    assert eval_set.domains == ["chat", "safety", "safety"] and eval_set.subsets[0] == "alpacaeval"
    m = evaluate_reward_model(LengthReward(), tokenizer, eval_set, OPTIONS).results["metrics"]
    assert m["rmbench"]["score"] == 0.5 and m["rmbench"]["domains"]["safety"]["n"] == 2
    assert m["style_grid"]["total"] == pytest.approx(1 / 3) and m["rmbench"]["missing"] == ["math", "code"]
    # the name given with a source is a domain too; without any, the RM-Bench score is skipped with the reason
    assert load_eval_set([("code", safe)], layout="rmbench").domains == ["code"]
    ev = evaluate_reward_model(LengthReward(), tokenizer, load_eval_set([(None, safe)], layout="rmbench"), OPTIONS)
    assert "rmbench" not in ev.results["metrics"] and "record 1 has none" in ev.results["skipped"]["rmbench"]


def test_style_grid(tokenizer):
    rows = [{"prompt": "q", "chosen": ["a", "aa", "aaa"], "rejected": ["bb", "bb", "bb"], "domain": "chat"}]
    ev = evaluate_reward_model(LengthReward(), tokenizer, load_eval_set([(None, rows)], layout="rmbench"), OPTIONS)
    grid = ev.results["metrics"]["style_grid"]
    # chosen 2, 3, 4 tokens vs rejected 3, 3, 3: rows [0,0,0] [0,0,0] (ties) [1,1,1]
    assert grid["matrix"] == [[0.0] * 3, [0.0] * 3, [1.0] * 3]
    assert (grid["hard"], grid["normal"], grid["easy"]) == (0.0, pytest.approx(1 / 3), pytest.approx(2 / 3))
    assert ev.results["metrics"]["subsets"]["chat"]["n"] == 1


def test_lists(tokenizer):
    rows = [{"prompt": "q", "completions": ["aaa", "a", "aa"], "ranking": [0, 2, 1]}]  # lengths agree with the truth
    ev = evaluate_reward_model(LengthReward(), tokenizer, load_eval_set([(None, rows)]), OPTIONS)
    assert ev.results["mode"] == "lists"
    assert ev.results["metrics"]["list_ranking"] == {
        "pair_accuracy": 1.0,
        "top1_accuracy": 1.0,
        "n_pairs": 3,
        "n_lists": 1,
    }


def test_pref_prob_from_scores_needs_scores(tokenizer):
    from prefkit.eval.rm import _pref_probs

    records = load_eval_set([(None, [dict(PAIRS[0], chosen_score=2.0, rejected_score=0.0)])])
    assert _pref_probs(records, "scores")[0] == pytest.approx(_sigmoid(2.0))
    with pytest.raises(ValueError, match="record 1"):
        _pref_probs(load_eval_set([(None, [PAIRS[0]])]), "scores")
