"""Reward functions: each by hand, GSM8K answers from the real data when it is here, and errors named."""

import json
import math
from pathlib import Path

import pytest

from prefkit.online.rewards import CombinedReward, RewardError, build_reward, extract_final_answer

GSM8K = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "gsm8k" / "test.jsonl"


def test_math_reads_gsm8k_and_boxed_answers():
    math_reward = build_reward("math")
    completions = ["She has 3 + 4 = 7 apples.\n#### 7", "so the answer is \\boxed{7}", "#### 8", "I don't know"]
    answers = ["Natalia has 7.\n#### 7"] * 4
    assert math_reward(["q"] * 4, completions, answer=answers) == [1.0, 1.0, 0.0, 0.0]
    assert math_reward(["q"], ["#### 0.5"], answer=["#### \\frac{1}{2}"]) == [1.0]
    assert math_reward(["q"], ["#### 1,234"], answer=["#### 1234"]) == [1.0]
    assert math_reward(["q"], ["#### 5"], answer=["no number here"]) == [None]  # the reference does not parse
    assert extract_final_answer("a #### 1 b #### 42 ") == "42"


@pytest.mark.skipif(not GSM8K.is_file(), reason="needs ../shared/data/gsm8k")
def test_math_on_real_gsm8k_references():
    rows = [json.loads(line) for line in GSM8K.read_text().splitlines()[:50]]
    answers = [r["answer"] for r in rows]
    finals = ["#### " + a.split("####")[-1].strip() for a in answers]
    reward = build_reward("math")
    assert reward([r["question"] for r in rows], finals, answer=answers) == [1.0] * 50
    wrong = ["#### " + str(int(a.split("####")[-1].strip().replace(",", "")) + 1) for a in answers]
    assert reward([r["question"] for r in rows], wrong, answer=answers) == [0.0] * 50


def test_exact_regex_length_bleu_by_hand():
    assert build_reward("exact_match")(["q"] * 2, [" Paris ", "paris"], answer=["Paris", "Paris"]) == [1.0, 0.0]
    assert build_reward("exact_match", ignore_case=True)(["q"], ["paris"], answer=["Paris"]) == [1.0]
    fmt = build_reward("regex", pattern=r"<think>.*</think>\s*<answer>.*</answer>", fullmatch=True)
    assert fmt(["q"] * 2, ["<think>x</think> <answer>1</answer>", "<answer>1</answer>"]) == [1.0, 0.0]
    length = build_reward("length", max_words=10, buffer_words=4)
    # free up to 6 words; 8 words: (6 - 8) / 4 = -0.5; 12 words: -1
    assert length(["q"] * 3, ["w " * 6, "w " * 8, "w " * 12]) == [0.0, -0.5, -1.0]
    from sacrebleu.metrics import BLEU

    bleu = build_reward("bleu")
    hyp, ref = "the cat sat on the mat", "the cat sat on a mat"
    expected = BLEU(effective_order=True).sentence_score(hyp, [ref]).score / 100
    assert bleu(["q"], [hyp], reference=[ref]) == [pytest.approx(expected)]
    assert bleu(["q"], [ref], reference=[ref]) == [pytest.approx(1.0)]


def always_half(prompts, completions, **fields):
    return [0.5] * len(completions)


def test_callable_and_combined_rewards():
    fn = build_reward("callable", function=f"{__name__}:always_half")
    combined = CombinedReward([("half", fn, 2.0), ("math", build_reward("math"), 1.0)])
    totals, per = combined(["q"] * 2, ["#### 7", "#### 5"], answer=["#### 7", "none"])
    assert totals == [2.0, 1.0]  # the second: math cannot score it (None), half does
    assert per == {"half": [0.5, 0.5], "math": [1.0, None]}


def broken(prompts, completions, **fields):
    raise KeyError("score")


def wrong_count(prompts, completions, **fields):
    return [1.0]


def not_finite(prompts, completions, **fields):
    return [1.0, math.nan]


@pytest.mark.parametrize(
    ("function", "message"),
    [
        ("broken", "reward 'r' raised KeyError"),
        ("wrong_count", "reward 'r' returned 1 values for 2 completions"),
        ("not_finite", "reward 'r' returned values that are not finite numbers (row 1: nan)"),
    ],
)
def test_a_failing_reward_is_named(function, message):
    combined = CombinedReward([("r", build_reward("callable", function=f"{__name__}:{function}"), 1.0)])
    with pytest.raises(RewardError, match=message.replace("(", r"\(").replace(")", r"\)")):
        combined(["q"] * 2, ["a", "b"])


def test_bad_reward_settings_are_named():
    with pytest.raises(RewardError, match="unknown reward 'maths'"):
        build_reward("maths")
    with pytest.raises(RewardError, match="needs a pattern"):
        build_reward("regex")
    with pytest.raises(RewardError, match="module:function"):
        build_reward("callable", function="nocolon")
    with pytest.raises(RewardError, match="reads the field 'answer'"):
        build_reward("math")(["q"], ["#### 1"], solution=["1"])
    with pytest.raises(RewardError, match="unexpected keyword"):
        build_reward("length", max_tokens=3)
