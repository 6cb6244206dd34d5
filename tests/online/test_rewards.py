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


def test_a_reward_file_with_a_dataclass_loads(tmp_path):
    """A ``file.py:function`` reward is imported as a module would be (registered before it runs), so a file
    that defines a dataclass, which looks its module up while being defined, loads."""
    path = tmp_path / "my_reward.py"
    path.write_text(
        "import dataclasses\n\n@dataclasses.dataclass\nclass Cfg:\n    bonus: float = 0.25\n\n"
        "def score(prompts, completions, **fields):\n    return [Cfg().bonus for _ in completions]\n"
    )
    fn = build_reward("callable", function=f"{path}:score")
    assert fn(["p"], ["c"]) == [0.25]


def test_the_lab_reward_is_registered_by_entry_point():
    """`prefkit.online` builds the lab's true reward by name without importing the lab (entry point group
    prefkit.rewards): the arithmetic answer and a preference world's true reward."""
    from prefkit.lab.world import make_world

    arithmetic = build_reward("lab", world="arithmetic")
    assert arithmetic(["start 3 add 4 sub 2"] * 2, ["3 add 4 is 7 ; 7 sub 2 is 5 ; answer 5", "answer 6"]) == [1, 0]
    world = make_world("default", 0)
    true = build_reward("lab", world="default")
    prompt = world.prompts[0]
    assert true([prompt], ["clear helpful sun"]) == [world.true_reward(prompt, "clear helpful sun")]
    with pytest.raises(RewardError, match="reward 'lab': unknown lab world 'nope'"):
        build_reward("lab", world="nope")


def test_a_reward_model_scores_completions(tmp_path):
    """reward_model: a saved one-label classifier scores (prompt, completion) as the trainer's scorer does."""
    import torch

    from prefkit.data.scoring import score_items, tokenize_items
    from prefkit.models.reward import build_reward_model, load_reward_model
    from prefkit.models.tiny import build_byte_tokenizer
    from prefkit.train.reward_trainer import model_scores

    tok = build_byte_tokenizer()
    model = build_reward_model("tiny", vocab_size=len(tok), pad_token_id=tok.pad_token_id)
    model.save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")
    fn = build_reward("reward_model", model=str(tmp_path / "rm"), device="cpu")
    got = fn(["Q: hi", "Q: hi"], ["hello there", "go away"])
    rm = load_reward_model(str(tmp_path / "rm"))
    items = tokenize_items([("Q: hi", "hello there"), ("Q: hi", "go away")], tok)
    with torch.no_grad():
        want = score_items(lambda *b: model_scores(rm, *b), items, model=rm, pad_token_id=tok.pad_token_id)
    assert got == pytest.approx(want.tolist(), abs=1e-5) and got[0] != got[1]
    with pytest.raises(RewardError, match="weights need a multi-objective model"):
        build_reward("reward_model", model=str(tmp_path / "rm"), weights={"helpful": 1.0}, device="cpu")
    with pytest.raises(RewardError, match="reward 'reward_model': cannot load"):
        build_reward("reward_model", model=str(tmp_path / "missing"), device="cpu")


def test_a_reward_model_of_the_wrong_kind_is_one_clear_error(tmp_path, tiny_model, tokenizer):
    """A causal LM (no classification head) named as the reward model: refused with the reason, not scored
    with a random head."""
    tiny_model.save_pretrained(tmp_path / "policy")
    tokenizer.save_pretrained(tmp_path / "policy")
    with pytest.raises(RewardError, match=r"^reward 'reward_model': cannot load .*this is not a reward model"):
        build_reward("reward_model", model=str(tmp_path / "policy"), device="cpu")
