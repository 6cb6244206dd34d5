"""`prefkit eval rm` end to end on tiny models saved to tmp_path."""

import json
from pathlib import Path

import pytest
import transformers

from prefkit.cli import main
from prefkit.models.loading import TinySpec, load_tokenizer
from prefkit.models.reward import build_reward_model
from prefkit.models.tiny import save_tiny_model

transformers.logging.set_verbosity_error()

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SIZES = dict(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)
PAIRS = [
    {"prompt": "Name a colour.", "chosen": "Blue.", "rejected": "Seven.", "subset": "easy"},
    {"prompt": "2 + 2 =", "chosen": "4", "rejected": "5, I think, or maybe 22.", "subset": "math"},
    {"prompt": "Say hi.", "chosen": "Hi there!", "rejected": "No.", "subset": "easy"},
    {"prompt": "Capital of France?", "chosen": "Paris.", "rejected": "Lyon, probably.", "subset": "facts"},
]


@pytest.fixture(scope="module")
def reward_model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("rm")
    build_reward_model("tiny", tiny=TinySpec(**SIZES)).save_pretrained(path)
    load_tokenizer("tiny").save_pretrained(path)
    return path


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_eval_rm_writes_results_report_and_plots(tmp_path, reward_model_dir, capsys):
    data = _jsonl(tmp_path / "pairs.jsonl", PAIRS)
    sections = tmp_path / "sections.yaml"
    sections.write_text("sections:\n  Chat: [easy, facts]\n  Reasoning: [math]\n")
    out = tmp_path / "out"
    argv = ["eval", "rm", "--model", str(reward_model_dir), "--data", str(data), "--section-map", str(sections)]
    assert main(argv + ["--batch-size", "3", "--output", str(out), "--no-progress"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["mode"] == "pairs" and results["scorer"] == "scalar" and results["n_records"] == 4
    m = results["metrics"]
    assert m["accuracy"] in (0.0, 0.25, 0.5, 0.75, 1.0)
    assert sorted(m["subsets"]) == ["easy", "facts", "math"] and m["subsets"]["easy"]["n"] == 2
    assert set(m["sections"]["sections"]) == {"Chat", "Reasoning"}
    assert sum(b["count"] for b in m["calibration"]["bins"]) == 8  # 4 pairs in both orders
    assert results["plots"] == {
        "reliability diagram": "reliability.png",
        "reward vs length": "reward_vs_length.png",
        "accuracy per subset": "subsets.png",
    }
    for name in results["plots"].values():
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    report = (out / "report.md").read_text()
    assert "| pairwise accuracy (ties wrong) |" in report and "![reliability diagram](reliability.png)" in report
    scores = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    assert len(scores) == 4 and all(s["correct"] == (s["chosen_reward"] > s["rejected_reward"]) for s in scores)
    assert "wrote" in capsys.readouterr().out


def test_eval_rm_implicit_reward_of_a_policy(tmp_path, capsys):
    policy = save_tiny_model(tmp_path / "policy", seed=0, **SIZES)
    data = _jsonl(tmp_path / "pairs.jsonl", PAIRS)
    out = tmp_path / "out"
    argv = ["eval", "rm", "--model", str(policy), "--implicit", "--ref", str(policy), "--beta", "0.1"]
    assert main(argv + ["--data", str(data), "--pref-prob", "1.0", "--output", str(out), "--no-progress"]) == 0
    results = json.loads((out / "results.json").read_text())
    m = results["metrics"]
    # policy == reference: every implicit reward is 0, so every pair is a tie (wrong)
    assert results["scorer"] == "implicit" and results["beta"] == 0.1 and m["accuracy"] == 0.0
    ranking = m["ranking_accuracy"]
    assert ranking["policy"] == ranking["reference"]
    # p = 1: the ideal policy ranks every pair right, so the gap is 1 - observed
    assert ranking["idealized"] == 1.0 and ranking["alignment_gap"] == pytest.approx(1.0 - ranking["policy"])


def test_eval_rm_rewardbench2_and_rmbench_layouts(tmp_path, reward_model_dir):
    rb2 = _jsonl(
        tmp_path / "rb2.jsonl", [{"prompt": "q", "chosen": ["a"], "rejected": ["b", "c", "d"], "subset": "Math"}]
    )
    assert (
        main(
            ["eval", "rm", "--model", str(reward_model_dir), "--layout", "rewardbench2", "--data", str(rb2)]
            + ["--output", str(tmp_path / "o1"), "--no-progress"]
        )
        == 0
    )
    m = json.loads((tmp_path / "o1" / "results.json").read_text())["metrics"]
    assert m["best_of_n_accuracy"] in (0.0, 0.25, 1 / 3, 0.5, 1.0) and m["n_per_record"] == [4]
    rows = [{"prompt": "q", "chosen": ["a", "aa", "aaa"], "rejected": ["b", "bb", "bbb"], "domain": "chat"}]
    rm = _jsonl(tmp_path / "rm.jsonl", rows)
    assert (
        main(
            ["eval", "rm", "--model", str(reward_model_dir), "--layout", "rmbench", "--data", str(rm)]
            + ["--output", str(tmp_path / "o2"), "--no-progress"]
        )
        == 0
    )
    results = json.loads((tmp_path / "o2" / "results.json").read_text())
    assert len(results["metrics"]["style_grid"]["matrix"]) == 3 and "style grid" in results["plots"]


def test_eval_rm_errors_are_clear(tmp_path, reward_model_dir, capsys):
    base = ["eval", "rm", "--model", str(reward_model_dir), "--output", str(tmp_path / "o"), "--no-progress"]
    assert main(base + ["--data", str(tmp_path / "missing.jsonl")]) == 2
    assert "missing.jsonl" in capsys.readouterr().err
    data = _jsonl(tmp_path / "pairs.jsonl", PAIRS)
    assert main(base + ["--data", str(data), "--layout", "llmbar"]) == 2
    assert "pairs.jsonl:1: field 'input'" in capsys.readouterr().err
    assert main(base + ["--data", str(data), "--implicit"]) == 2
    assert "--implicit needs --ref" in capsys.readouterr().err
    assert main(["eval", "rm", "--model", str(tmp_path / "no_model"), "--data", str(data), "--no-progress"]) == 2


@pytest.mark.skipif(not (SHARED / "llmbar").is_dir(), reason="../shared/data/llmbar not present")
def test_llmbar_natural_with_a_tiny_model(tmp_path, reward_model_dir):
    natural = SHARED / "llmbar/Dataset/LLMBar/Natural/dataset.json"
    argv = ["eval", "rm", "--model", str(reward_model_dir), "--layout", "llmbar", "--data", f"natural={natural}"]
    argv += ["--max-length", "128", "--max-prompt-length", "64", "--batch-size", "32", "--no-progress"]
    assert main(argv + ["--output", str(tmp_path / "o")]) == 0
    results = json.loads((tmp_path / "o" / "results.json").read_text())
    assert results["n_records"] == 100 and results["metrics"]["subsets"]["natural"]["n"] == 100


REPO = Path(__file__).resolve().parents[1]


def test_readme_train_then_eval_flow(tmp_path, monkeypatch):
    # README "Evaluate a reward model": prefkit train examples/rm_tiny.yaml, then prefkit eval rm on its output.
    monkeypatch.chdir(REPO)
    out, report = tmp_path / "rm_tiny", tmp_path / "rm_tiny" / "eval"
    assert main(["train", "examples/rm_tiny.yaml", f"output_dir={out}", "max_steps=4", "disable_tqdm=true"]) == 0
    data = "examples/data/pairs_tiny.jsonl"
    assert main(["eval", "rm", "--model", str(out), "--data", data, "--output", str(report), "--no-progress"]) == 0
    results = json.loads((report / "results.json").read_text())
    assert (report / "report.md").is_file() and list(report.glob("*.png"))
    assert results["scorer"] == "scalar" and results["n_records"] == 48
    assert 0.0 <= results["metrics"]["accuracy"] <= 1.0


def test_eval_rm_reads_labelled_pairs_and_scores_ties_by_the_tie_policy(tmp_path, reward_model_dir):
    """The labelled example file (two responses and a label) evaluates without conversion; its tie rows (one
    labelled a tie, one with the same answer twice) are kept and scored by the chosen policy."""
    example = Path(__file__).resolve().parents[1] / "examples" / "data" / "labelled_pairs_tiny.jsonl"
    flags = ["--responses", "response_a,response_b", "--label", "winner", "--first-better", "model_a"]
    flags += ["--second-better", "model_b", "--tie", "tie"]
    results = {}
    for policy in ("half", "wrong", "threshold"):
        out = tmp_path / policy
        argv = ["eval", "rm", "--model", str(reward_model_dir), "--data", str(example), *flags]
        assert main([*argv, "--tie-policy", policy, "--output", str(out), "--no-progress"]) == 0
        results[policy] = json.loads((out / "results.json").read_text())["metrics"]
    half, wrong, thr = results["half"], results["wrong"], results["threshold"]
    assert half["ties"]["n"] == 2 and half["ties"]["policy"] == "half"
    decisive = half["ties"]["decisive_accuracy"]  # 3 decisive pairs
    assert half["accuracy"] == pytest.approx((3 * decisive + 2 * 0.5) / 5)
    assert wrong["accuracy"] == pytest.approx(3 * decisive / 5)
    assert thr["ties"]["threshold"] >= 0 and thr["accuracy"] >= max(wrong["accuracy"], 2 / 5)
    scores = [json.loads(line) for line in (tmp_path / "half" / "scores.jsonl").read_text().splitlines()]
    assert [s.get("tie", False) for s in scores] == [False, False, True, True, False]


def test_a_section_map_that_cannot_apply_says_so(tmp_path, reward_model_dir, capsys):
    rows = [{"prompt": "q", "chosen": ["a"], "rejected": ["b", "c", "d"], "subset": "math"}]
    data = _jsonl(tmp_path / "rb2.jsonl", rows)
    argv = ["eval", "rm", "--model", str(reward_model_dir), "--data", str(data), "--layout", "rewardbench2"]
    assert main([*argv, "--section-map", "rewardbench", "--output", str(tmp_path / "o"), "--no-progress"]) == 2
    assert "--section-map: section scores average pairwise subset accuracies" in capsys.readouterr().err


def test_eval_rm_on_the_benchmark_example_files(tmp_path, reward_model_dir):
    """examples/data/rmbench/*_filtered.json (RM-Bench's files, domain in the file name only) and
    rewardbench2_tiny.jsonl (with a Ties prompt) give the benchmarks' own overall scores with no extra flags."""
    examples = REPO / "examples" / "data"
    base = ["eval", "rm", "--model", str(reward_model_dir), "--no-progress", "--output"]
    files = ["--data", str(examples / "rmbench" / "chat_filtered.json")]
    files += ["--data", str(examples / "rmbench" / "safety-refuse_filtered.json")]
    assert main(base + [str(tmp_path / "rmb"), "--layout", "rmbench"] + files) == 0
    results = json.loads((tmp_path / "rmb" / "results.json").read_text())
    rmb = results["metrics"]["rmbench"]
    assert list(rmb["domains"]) == ["chat", "safety"] and rmb["missing"] == ["math", "code"]
    assert rmb["score"] == pytest.approx((rmb["domains"]["chat"]["score"] + rmb["domains"]["safety"]["score"]) / 2)
    assert "RM-Bench score" in (tmp_path / "rmb" / "report.md").read_text()
    rb2 = ["--layout", "rewardbench2", "--data", str(examples / "rewardbench2_tiny.jsonl")]
    assert main(base + [str(tmp_path / "rb2")] + rb2) == 0
    m = json.loads((tmp_path / "rb2" / "results.json").read_text())["metrics"]
    assert m["subsets"]["Ties"]["n"] == 2 and "ties_rule" in m["subsets"]["Ties"]
    assert m["rewardbench2_missing"] == ["Precise IF"]
    assert m["subset_mean"] == pytest.approx(sum(s["accuracy"] for s in m["subsets"].values()) / 5)
