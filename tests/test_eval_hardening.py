"""`prefkit eval rm` on awkward input: strict JSON, the length baseline before and after truncation, a
warning when the data is the model's training file, a mistyped model folder named at once."""

import json
import math
from pathlib import Path

import pytest
import transformers

from prefkit.cli import main
from prefkit.eval.report import strict_json

transformers.logging.set_verbosity_error()

REPO = Path(__file__).resolve().parents[1]
PAIRS = REPO / "examples" / "data" / "pairs_tiny.jsonl"


@pytest.fixture(scope="module")
def rm_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rm")
    cfg = tmp / "rm.yaml"
    cfg.write_text(
        "model: tiny\ntiny_hidden_size: 32\ntiny_num_heads: 2\ntiny_intermediate_size: 64\n"
        f"train_file: {PAIRS}\nloss: bt\nmax_length: 128\nmax_prompt_length: 48\noutput_dir: {tmp / 'rm'}\n"
        "max_steps: 2\nper_device_train_batch_size: 8\nlearning_rate: 1.0e-3\nsave_strategy: 'no'\n"
        "use_cpu: true\ndisable_tqdm: true\nreport_to: none\n"
    )
    assert main(["train", str(cfg)]) == 0
    return tmp / "rm"


def test_results_json_is_strict_and_names_both_length_baselines(rm_dir, tmp_path, capsys):
    out = tmp_path / "eval"
    args = ["eval", "rm", "--model", str(rm_dir), "--data", str(PAIRS), "--output", str(out), "--no-progress"]
    assert main([*args, "--max-length", "24", "--max-prompt-length", "8"]) == 0
    captured = capsys.readouterr()
    assert "is the file" in captured.err and "training accuracy, not a held-out measure" in captured.err
    assert "baseline: longer response wins (lengths after truncation)" in captured.out
    assert "baseline: longer response wins (full texts)" in captured.out
    text = (out / "results.json").read_text()
    results = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
    bias = results["metrics"]["length_bias"]
    assert results["n_truncated"] > 0
    # truncated to 24 - 8 = 16 tokens at most, many responses tie; the full texts do not
    assert bias["n_equal"] > 0 and bias["longer_wins_accuracy_full_text"] != bias["longer_wins_accuracy"]
    for line in (out / "scores.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))


def test_strict_json_replaces_non_finite_numbers_with_null_and_a_reason():
    nulls: dict[str, str] = {}
    out = strict_json({"a": {"pearson": math.nan}, "b": [1.0, math.inf], "c": "x"}, nulls)
    assert out == {"a": {"pearson": None}, "b": [1.0, None], "c": "x"}
    assert set(nulls) == {"a.pearson", "b[1]"} and "NaN" in nulls["a.pearson"] and "inf" in nulls["b[1]"]


def test_a_mistyped_model_folder_is_named_at_once(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "rm_tiny").mkdir(parents=True)
    assert main(["eval", "rm", "--model", "runs/rm_tinyy", "--data", str(PAIRS)]) == 2
    err = capsys.readouterr().err
    assert "--model: expected an existing folder or a Hub model id, got 'runs/rm_tinyy'" in err
    assert "did you mean 'runs/rm_tiny'?" in err and err.count("\n") == 1
