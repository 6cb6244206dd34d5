"""Training a generative judge: pairs -> judge prompts with the right verdict (both orders), supervised on the
verdicts with the existing trainer, and the `verdict` reward for RL on verdicts."""

import json
from pathlib import Path

import pytest

from prefkit.cli import main
from prefkit.data.convert import judge_training_pairs
from prefkit.data.judge_prompts import TEMPLATES, JudgeTemplate
from prefkit.data.records import PairwiseRecord
from prefkit.online.rewards import RewardError, build_reward

REPO = Path(__file__).resolve().parents[1]
PAIRS = REPO / "examples" / "data" / "pairs_tiny.jsonl"


def test_judge_training_pairs_both_orders_with_rationales_and_ties():
    template = JudgeTemplate(text="Q {prompt} | A {a} | B {b} | verdict:", labels=(" A", " B"))
    records = [
        PairwiseRecord("q1", "good", "bad", id="p1"),
        PairwiseRecord("q2", "same", "same", tie=True),
        PairwiseRecord("q3", "yes", "no"),
    ]
    pairs, ties = judge_training_pairs(records, template, ["good is kind", None, "  "])
    assert ties == 1 and len(pairs) == 4
    first, second = pairs[0], pairs[1]
    assert first.prompt == "Q q1 | A good | B bad | verdict:" and first.id == "p1-chosen-first"
    assert (first.chosen, first.rejected) == (" A\ngood is kind", " B\ngood is kind")
    assert second.prompt == "Q q1 | A bad | B good | verdict:" and second.id == "p1-chosen-second"
    assert (second.chosen, second.rejected) == (" B\ngood is kind", " A\ngood is kind")
    assert (pairs[2].chosen, pairs[2].id) == (" A", "pair-2-chosen-first")  # a blank rationale adds nothing
    chat, _ = judge_training_pairs(records[:1], TEMPLATES["chat"])
    assert chat[0].prompt[0]["role"] == "user" and chat[0].chosen == "A"
    with pytest.raises(ValueError, match="2 rationales for 3 pairs"):
        judge_training_pairs(records, template, ["a", "b"])


def test_prefkit_data_convert_to_judge(tmp_path, capsys):
    rows = [
        {"prompt": "Say hi.", "chosen": "Hi!", "rejected": "No.", "why": "polite"},
        {"prompt": "2+2?", "chosen": "4", "rejected": "5", "why": "correct"},
    ]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "judge.jsonl"
    assert main(["data", "convert", str(data), str(out), "--to", "judge", "--rationale", "why"]) == 0
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert [w["chosen"] for w in written] == [" A\npolite", " B\npolite", " A\ncorrect", " B\ncorrect"]
    assert "Answer A: Hi!" in written[0]["prompt"] and "Answer A: No." in written[1]["prompt"]
    capsys.readouterr()
    assert main(["data", "convert", str(data), str(out), "--template", "chat"]) == 2
    assert "--template apply to --to judge only" in capsys.readouterr().err
    assert main(["data", "convert", str(data), str(out), "--to", "judge", "--rationale", "reason"]) == 1
    assert "field 'reason'" in capsys.readouterr().err
    assert main(["data", "convert", str(data), str(out), "--to", "judge", "--template", "nope"]) == 2


def test_the_committed_judge_pairs_are_the_conversion_of_the_tiny_pairs(tmp_path):
    out = tmp_path / "judge.jsonl"
    assert main(["data", "convert", str(PAIRS), str(out), "--to", "judge"]) == 0
    assert out.read_text() == (REPO / "examples" / "data" / "judge_pairs_tiny.jsonl").read_text()


def test_the_verdict_reward():
    reward = build_reward("verdict")
    completions = ["[[B]]", " A. Because", "I cannot say", " B", "A"]
    chosen = [" B\nrationale", " A", " A", " A", "neither"]
    assert reward(["p"] * 5, completions, chosen=chosen) == [1.0, 1.0, 0.0, 0.0, None]
    numbered = build_reward("verdict", labels=[" 1", " 2"], pattern=r"Choice (\d)")
    assert numbered(["p", "p"], ["Choice 2", "Choice 1"], chosen=[" 2", " 2"]) == [1.0, 0.0]
    with pytest.raises(RewardError, match="needs a group"):
        build_reward("verdict", pattern="A|B")
    with pytest.raises(RewardError, match="two different labels"):
        build_reward("verdict", labels=["A", " A"])
    with pytest.raises(RewardError, match="reads the field 'chosen'"):
        reward(["p"], ["A"], answer=["A"])


def test_a_judge_supervised_on_verdicts_learns_them(tmp_path, monkeypatch):
    """README flow: convert the tiny pairs, train examples/judge_sft_tiny.yaml, evaluate the judge (log-prob and
    written verdicts): the trained tiny judge picks the chosen response in every pair, in both orders."""
    monkeypatch.chdir(REPO)
    pairs, run = tmp_path / "judge_pairs.jsonl", tmp_path / "judge"
    assert main(["data", "convert", str(PAIRS), str(pairs), "--to", "judge"]) == 0
    config = ["train", "examples/judge_sft_tiny.yaml", f"train_file={pairs}", f"output_dir={run}"]
    assert main(config + ["disable_tqdm=true"]) == 0
    for verdict in ("logprob", "generate"):
        out = tmp_path / verdict
        argv = ["eval", "judge", "--model", str(run), "--data", str(PAIRS), "--output", str(out), "--no-progress"]
        assert main(argv + ["--verdict", verdict]) == 0
        m = json.loads((out / "results.json").read_text())["metrics"]
        assert m["accuracy"] == 1.0 and m["position_bias"] == 0.5 and m["verdict_rate"] == 1.0
