"""`prefkit eval judge`: a causal LM as a pairwise judge, verdicts from next-token log-probs, both orders."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from prefkit.cli import main
from prefkit.data.records import PairwiseRecord
from prefkit.eval.judge import TEMPLATES, JudgeTemplate, judge_metrics, judge_pairs, load_template
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


def test_a_verdict_is_the_log_prob_of_one_label_minus_the_other():
    torch.manual_seed(0)
    tok = load_tokenizer("tiny")
    model = load_policy("tiny", vocab_size=len(tok))
    record = PairwiseRecord("Say hi.", "Hi there!", "No.")
    (v,) = judge_pairs(model, tok, [record], progress=False)
    prompt = TEMPLATES["plain"].text.format(prompt="Say hi.", a="No.", b="Hi there!")  # the second order
    ids = tok(prompt)["input_ids"]
    logps = []
    for label in (" A", " B"):
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
