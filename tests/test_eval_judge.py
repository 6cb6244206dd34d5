"""`prefkit eval judge`: a causal LM as a pairwise judge, verdicts from next-token log-probs, both orders."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from prefkit.cli import main
from prefkit.data.judge_prompts import parse_verdict
from prefkit.data.records import PairwiseRecord
from prefkit.eval.judge import (
    JudgeTemplate,
    LMJudge,
    generate_verdicts,
    judge_metrics,
    judge_pairs,
    load_template,
    self_preference,
    win_rates,
)
from prefkit.models.loading import load_policy, load_tokenizer
from prefkit.train.logps import completion_logps

REPO = Path(__file__).resolve().parents[1]
PAIRS = REPO / "examples" / "data" / "pairs_tiny.jsonl"
STORIES = REPO.parent / "shared" / "data" / "tinyllamas" / "stories260K.bin"


def test_judge_metrics_by_hand():
    # verdicts: (chosen as A, chosen as B); > 0 picks A
    v = [[2.0, -1.0], [1.0, 0.5], [-0.5, -0.2], [0.3, 1.0]]
    m = judge_metrics(v)
    # right: (T, T), (T, F), (F, T), (T, F) -> 5 of 8 verdicts; both orders right only for the first pair
    assert m["accuracy"] == pytest.approx(5 / 8) and m["pair_accuracy"] == pytest.approx(1 / 4)
    # v1 - v2 = 3, 0.5, -0.3, -0.7 -> 2 of 4
    assert m["order_averaged_accuracy"] == pytest.approx(0.5)
    # picks A: 2.0, 1.0, 0.3 (first order) and 0.5, 1.0 (second) -> 5 of 8
    assert m["position_bias"] == pytest.approx(5 / 8)
    # the same response both times only in pair 0 (chosen, chosen); pair 2 picks rejected, then chosen
    assert m["consistency"] == pytest.approx(1 / 4)
    assert judge_metrics(v, ties=[True, False, False, False])["n"] == 3
    with pytest.raises(ValueError, match=r"\[N, 2\]"):
        judge_metrics([1.0, 2.0])


@pytest.mark.parametrize("labels", [(" A", " B"), (" yes", " no")])
def test_a_verdict_is_the_log_prob_of_one_label_minus_the_other(labels):
    """Labels one token apart after a shared space (" A" / " B" in bytes) take the one-forward next-token path;
    longer ones (" yes" / " no") sum each label's tokens: both equal the two log-likelihoods' difference."""
    torch.manual_seed(0)
    tok = load_tokenizer("tiny")
    model = load_policy("tiny", vocab_size=len(tok))
    template = JudgeTemplate(labels=labels)
    record = PairwiseRecord("Say hi.", "Hi there!", "No.")
    (v,) = judge_pairs(model, tok, [record, PairwiseRecord("2+2?", "4", "five")], template, progress=False)[:1]
    prompt = template.text.format(prompt="Say hi.", a="No.", b="Hi there!")  # the second order
    ids = tok(prompt)["input_ids"]
    logps = []
    for label in labels:
        lab = tok(label, add_special_tokens=False)["input_ids"]
        x = torch.tensor([ids + lab])
        comp = torch.tensor([[0] * len(ids) + [1] * len(lab)])
        logps.append(completion_logps(model, x, torch.ones_like(x), comp).sum.item())
    assert v[1] == pytest.approx(logps[0] - logps[1], abs=1e-4)


def test_templates_are_checked(tmp_path):
    with pytest.raises(ValueError, match="needs \\{b\\}"):
        JudgeTemplate(text="{prompt} {a}")
    with pytest.raises(ValueError, match="two different"):
        JudgeTemplate(labels=("A", "A"))
    path = tmp_path / "t.yaml"
    path.write_text("text: 'Q: {prompt} 1: {a} 2: {b} Best:'\nlabels: [' 1', ' 2']\n")
    assert load_template(str(path)).labels == (" 1", " 2")
    with pytest.raises(ValueError, match="neither plain, chat nor a file"):
        load_template("nope")


def test_prefkit_eval_judge_on_the_tiny_model(tmp_path, capsys):
    out = tmp_path / "judge"
    assert main(["eval", "judge", "--model", "tiny", "--data", str(PAIRS), "--output", str(out), "--no-progress"]) == 0
    results = json.loads((out / "results.json").read_text())
    m = results["metrics"]
    assert m["n"] == results["n_records"] > 0 and 0 <= m["position_bias"] <= 1 and 0 <= m["consistency"] <= 1
    scores = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    right = np.mean([s["chosen_first"] > 0 for s in scores] + [s["chosen_second"] < 0 for s in scores])
    assert m["accuracy"] == pytest.approx(right)
    assert "position bias" in (out / "report.md").read_text() and "position bias" in capsys.readouterr().out
    assert main(["eval", "judge", "--model", "tiny", "--data", str(PAIRS), "--template", "nope"]) == 2
    assert "error: --template nope" in capsys.readouterr().err


@pytest.mark.skipif(not STORIES.is_file(), reason="needs ../shared/data/tinyllamas/stories260K.bin")
def test_prefkit_eval_judge_on_stories260k(tmp_path):
    out = tmp_path / "judge"
    assert (
        main(["eval", "judge", "--model", str(STORIES), "--data", str(PAIRS), "--output", str(out), "--no-progress"])
        == 0
    )
    m = json.loads((out / "results.json").read_text())["metrics"]
    # a small story model always answers "A" here: position bias is what the report is for
    assert m["position_bias"] > 0.9 and m["consistency"] < 0.1


def test_parse_verdict_default_forms_and_a_given_pattern():
    cases = {
        "[[B]]": 1,
        "I think [[ A ]] because": 0,
        "Answer A is better.": 0,
        "The better answer is B.": 1,
        "Verdict: A": 0,
        " B": 1,
        "A. It is concise": 0,
        "The winner is answer A": 0,
        "Both are fine": None,
        "Answer B is worse": None,
        "Apples are red": None,  # 'A' only as the start of a word
    }
    for text, expected in cases.items():
        assert parse_verdict(text) == expected, text
    assert parse_verdict("Choice 2", (" 1", " 2"), r"Choice (\d)") == 1
    assert parse_verdict("Choice 3", (" 1", " 2"), r"Choice (\d)") is None  # not a label
    assert parse_verdict("no choice", (" 1", " 2"), r"Choice (\d)") is None


def test_judge_metrics_with_verdicts_that_name_no_label():
    # generated verdicts: +1 = A, -1 = B, 0 = none found. Pairs: (A, B) right twice; (A, A) position;
    # (0, B) one missing; (0, 0) none
    v = [[1, -1], [1, 1], [0, -1], [0, 0]]
    m = judge_metrics(v)
    assert m["accuracy"] == pytest.approx(4 / 8)  # right: 1, 1 | 1, 0 | 0, 1 | 0, 0
    assert m["pair_accuracy"] == pytest.approx(1 / 4) and m["verdict_rate"] == pytest.approx(5 / 8)
    assert m["position_bias"] == pytest.approx(3 / 5)  # of the 5 verdicts given, 3 pick A
    assert m["consistency"] == pytest.approx(1 / 4)  # only pair 0 picks the same response twice
    assert m["order_averaged_accuracy"] == pytest.approx(2 / 4)  # v1 - v2 = 2, 0, 1, 0


def test_self_preference_by_hand():
    # judge "me"; pairs: own chosen (picked both times), own rejected (picked once), own rejected (never), no own
    v = np.array([[1.0, -1.0], [-1.0, -1.0], [1.0, -1.0], [1.0, 1.0]])
    sources = [("me", "x"), ("y", "me"), ("x", "me"), ("x", "y")]
    sp = self_preference(v, sources, "me")
    # verdicts picking "me": pair 0: 2 of 2; pair 1 (me = rejected): order 1 picks B = rejected = me, order 2
    # (chosen as B) picks B = chosen: 1 of 2; pair 2: 0 of 2 -> 3 of 6
    assert sp["n"] == 3 and sp["own_pick_rate"] == pytest.approx(0.5)
    assert sp["own_chosen_rate"] == pytest.approx(1 / 3) and sp["self_preference"] == pytest.approx(0.5 - 1 / 3)
    assert sp["accuracy_own_chosen"] == 1.0 and sp["accuracy_own_rejected"] == pytest.approx(3 / 4)
    assert self_preference(v, sources, "nobody") is None


class _WritesB(torch.nn.Module):
    """A 'judge' whose greedy text is always '[[B]]' (to test reading verdicts from text)."""

    def __init__(self, tokenizer):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.answer = tokenizer("[[B]]", add_special_tokens=False)["input_ids"]

    def generate(self, input_ids, attention_mask, max_new_tokens, **kwargs):
        new = torch.tensor(self.answer[:max_new_tokens]).expand(len(input_ids), -1)
        return torch.cat([input_ids, new], dim=1)


def test_generated_verdicts_are_parsed_in_both_orders():
    tok = load_tokenizer("tiny")
    records = [PairwiseRecord("Say hi.", "Hi there!", "No."), PairwiseRecord("2+2?", "4", "5")]
    verdicts, texts = generate_verdicts(_WritesB(tok), tok, records, progress=False)
    assert texts == [["[[B]]", "[[B]]"]] * 2 and verdicts.tolist() == [[-1.0, -1.0]] * 2
    m = judge_metrics(verdicts)
    assert m["accuracy"] == 0.5 and m["position_bias"] == 0.0 and m["verdict_rate"] == 1.0
    verdicts, _ = generate_verdicts(_WritesB(tok), tok, records, pattern=r"\[\[(A)\]\]", progress=False)
    assert verdicts.tolist() == [[0.0, 0.0]] * 2


def test_lm_judge_is_the_order_averaged_verdict_as_a_probability():
    torch.manual_seed(0)
    tok = load_tokenizer("tiny")
    model = load_policy("tiny", vocab_size=len(tok))
    judge = LMJudge(model, tok)
    p = judge(["Say hi.", "2+2?"], ["Hi there!", "4"], ["No.", "5"])
    v = judge_pairs(model, tok, [PairwiseRecord("Say hi.", "Hi there!", "No."), PairwiseRecord("2+2?", "4", "5")])
    assert p == pytest.approx((1 / (1 + np.exp(-(v[:, 0] - v[:, 1]) / 2))).tolist(), abs=1e-6)
    swapped = judge(["Say hi.", "2+2?"], ["No.", "5"], ["Hi there!", "4"])
    assert swapped == pytest.approx([1 - x for x in p], abs=1e-5)  # the same judgement, from the other side
    assert judge([], [], []) == []


def test_prefkit_eval_judge_options(tmp_path, capsys):
    rows = [
        {"prompt": "Say hi.", "chosen": "Hi there!", "rejected": "No.", "chosen_model": "me", "rejected_model": "x"},
        {"prompt": "2+2?", "chosen": "4", "rejected": "5", "chosen_model": "x", "rejected_model": "me"},
        {"prompt": "Colour?", "chosen": "Blue.", "rejected": "Blue.", "chosen_model": "x", "rejected_model": "y"},
    ]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "judge"
    base = ["eval", "judge", "--model", "tiny", "--data", str(data), "--no-progress", "--output", str(out)]
    assert main(base + ["--self", "me", "--tie-policy", "threshold"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["ties"] == 1 and results["self_preference"]["n"] == 2
    assert results["credit"]["policy"] == "threshold" and "threshold" in results["credit"]
    assert "Self-preference" in (out / "report.md").read_text()
    sections = tmp_path / "sections.yaml"
    sections.write_text("sections:\n  All: [all]\n")
    assert main(base + ["--section-map", str(sections)]) == 0
    assert "All" in json.loads((out / "results.json").read_text())["sections"]["sections"]
    capsys.readouterr()
    assert main(base + ["--parser", "(A)"]) == 2
    assert "add --verdict generate" in capsys.readouterr().err
    assert main(base + ["--verdict", "generate", "--parser", "A|B"]) == 2
    assert "needs a group" in capsys.readouterr().err
    assert main(base + ["--self", "me", "--sources", "a_model,b_model"]) == 2
    assert "field 'a_model'" in capsys.readouterr().err
    assert main(["eval", "judge", "--model", "tiny", "--data", str(PAIRS), "--self", "me"]) == 2
    assert "do not say which model wrote" in capsys.readouterr().err


def test_online_dpo_with_a_language_model_as_judge(tmp_path, monkeypatch):
    """online.judge {judge: lm, model: ...} (entry point prefkit.judges) labels online DPO's pairs with LMJudge."""
    monkeypatch.chdir(REPO)
    args = ["train", "examples/online_dpo_tiny.yaml", f"output_dir={tmp_path / 'run'}", "max_steps=1"]
    assert main(args + ["online.judge={judge: lm, model: tiny}"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["pairs"] for r in rows if r.get("split") == "train"] == [4.0]  # one judged pair per prompt
    assert main(args[:2] + [f"output_dir={tmp_path / 'bad'}", "online.judge={judge: lm, model: tiny, nope: 1}"]) == 2


def test_win_rates_score_a_list_by_round_robin():
    class Longer:  # P(first preferred) = 0.9 when it is longer, 0.1 when shorter, 0.5 when equal
        def __call__(self, prompts, first, second):
            return [0.9 if len(a) > len(b) else 0.1 if len(a) < len(b) else 0.5 for a, b in zip(first, second)]

    rates = win_rates(Longer(), ["p", "q"], [["aa", "a", "aaa"], ["x", "y"]])
    assert rates[0] == pytest.approx([0.5, 0.1, 0.9]) and rates[1] == pytest.approx([0.5, 0.5])


def test_prefkit_eval_judge_on_rewardbench2_lists(tmp_path, capsys):
    example = REPO / "examples" / "data" / "rewardbench2_tiny.jsonl"
    out = tmp_path / "rb2"
    argv = ["eval", "judge", "--model", "tiny", "--layout", "rewardbench2", "--data", str(example), "--no-progress"]
    assert main(argv + ["--output", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    m = results["metrics"]
    assert results["mode"] == "best_of_n" and m["subsets"]["Ties"]["n"] == 2 and "ties_rule" in m["subsets"]["Ties"]
    scores = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    assert len(scores[0]["rewards"]) == 4 and all(0 <= x <= 1 for s in scores for x in s["rewards"])
    capsys.readouterr()
    assert main(argv + ["--output", str(out), "--self", "me"]) == 2
    assert "--self: for pairs" in capsys.readouterr().err
