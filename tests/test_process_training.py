"""Process reward models: the trainer learns planted step labels, saves and loads with its separator, and
`prefkit eval prm` reports on it; bad input is one line and exit 2."""

import json
import random

import pytest
import transformers

from prefkit.cli import main
from prefkit.data.records import StepwiseRecord
from prefkit.eval.process import evaluate_steps
from prefkit.models.loading import TinySpec
from prefkit.models.process import PRMScorer, build_process_reward_model, load_process_reward_model
from prefkit.train.process import ProcessRewardTrainer

transformers.logging.set_verbosity_error()

SMALL = TinySpec(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)


def _planted(n: int, seed: int) -> list[StepwiseRecord]:
    """Solutions of 1-4 steps; a step is wrong exactly when it says "no"."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        labels = [rng.random() < 0.6 for _ in range(rng.randint(1, 4))]
        steps = [f"{rng.choice(['we add', 'so', 'then'])} {'ok' if y else 'no'}" for y in labels]
        out.append(StepwiseRecord(prompt=f"Q{i}", completions=steps, labels=labels, id=f"s{i}"))
    return out


def test_trainer_learns_planted_step_labels_and_the_model_reloads(tokenizer, pref_args, tmp_path):
    model = build_process_reward_model("tiny", tiny=SMALL, vocab_size=len(tokenizer), step_separator=" |")
    args = pref_args(
        loss="prm_bce", step_separator=" |", max_steps=60, learning_rate=3e-3, per_device_train_batch_size=8
    )
    trainer = ProcessRewardTrainer(model, args, train_dataset=_planted(96, 0), processing_class=tokenizer)
    trainer.train()
    trainer.save_model(str(tmp_path / "prm"))
    tokenizer.save_pretrained(str(tmp_path / "prm"))
    loaded = load_process_reward_model(str(tmp_path / "prm"))
    held = _planted(40, 1)
    logits = PRMScorer(loaded, tokenizer, batch_size=7).score(held)
    assert [len(row) for row in logits] == [len(r.labels) for r in held]
    results = evaluate_steps(held, ["all"] * len(held), logits)
    assert results["step_auroc"] > 0.95
    assert results["prmbench"]["prmscore"] > 0.9
    assert results["processbench"]["f1"] > 0.9
    # scoring in a batch equals scoring alone (padding does not move a step's score)
    alone = PRMScorer(loaded, tokenizer, batch_size=1).score(held[:3])
    for a, b in zip(alone, logits[:3]):
        assert a == pytest.approx(b, abs=1e-5)


def test_separator_mismatch_and_record_kind_are_refused(tokenizer, pref_args):
    model = build_process_reward_model("tiny", tiny=SMALL, vocab_size=len(tokenizer), step_separator=" |")
    with pytest.raises(ValueError, match="step_separator is '\\\\n', but the model was built with ' \\|'"):
        ProcessRewardTrainer(model, pref_args(loss="prm_bce"), train_dataset=_planted(4, 0), processing_class=tokenizer)
    with pytest.raises(ValueError, match="trains losses of kind process"):
        ProcessRewardTrainer(
            model, pref_args(loss="bt", step_separator=" |"), train_dataset=[], processing_class=tokenizer
        )


def test_prefkit_train_and_eval_prm(tmp_path, monkeypatch, capsys):
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(repo)
    out = tmp_path / "prm"
    assert (
        main(["train", "examples/prm_tiny.yaml", f"output_dir={out}", "max_steps=4", "eval_steps=2", "save_steps=2"])
        == 0
    )
    assert json.loads((out / "config.json").read_text())["prefkit_step_separator"] == " ;\n"
    report = tmp_path / "eval"
    code = main(
        [
            "eval",
            "prm",
            "--model",
            str(out),
            "--data",
            "examples/data/steps_prmbench.jsonl",
            "--layout",
            "prmbench",
            "--output",
            str(report),
            "--no-progress",
        ]
    )
    assert code == 0
    results = json.loads((report / "results.json").read_text())
    assert set(results["prmbench"]["classes"]) == {"counterfactual", "circular", "multi_solutions"}
    assert results["n_steps"] == 8 and results["n_wrong_steps"] == 3
    lines = (report / "scores.jsonl").read_text().splitlines()
    assert [json.loads(line)["first_error"] for line in lines] == [1, 1, -1]
    assert (report / "report.md").is_file() and (report / "step_scores.png").is_file()
    capsys.readouterr()
    assert (
        main(
            [
                "eval",
                "prm",
                "--model",
                str(out),
                "--data",
                "examples/data/steps_tiny.jsonl",
                "--threshold",
                "2",
                "--output",
                str(report),
            ]
        )
        == 2
    )
    assert "--threshold: expected a probability in [0, 1] or 'auto', got '2'" in capsys.readouterr().err
    assert (
        main(["eval", "prm", "--model", str(out), "--data", "examples/data/pairs_tiny.jsonl", "--output", str(report)])
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "field 'completions'" in err
    assert (
        main(
            ["eval", "prm", "--model", "examples", "--data", "examples/data/steps_tiny.jsonl", "--output", str(report)]
        )
        == 2
    )


def test_eval_prm_scores_an_implicit_prm(tmp_path, monkeypatch, capsys):
    from pathlib import Path

    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    out = tmp_path / "implicit"
    args = ["eval", "prm", "--model", "tiny", "--implicit", "--ref", "tiny", "--beta", "0.1", "--separator", " ;"]
    assert main([*args, "--data", "examples/data/steps_tiny.jsonl", "--output", str(out), "--no-progress"]) == 0
    rows = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    # the policy is its reference: every step reward is 0, probability 1/2
    assert rows and all(p == pytest.approx(0.5) for row in rows for p in row["probabilities"])
    assert json.loads((out / "results.json").read_text())["implicit"] is True
    capsys.readouterr()
    assert main(["eval", "prm", "--model", "tiny", "--implicit", "--data", "x.jsonl", "--output", str(out)]) == 2
    assert "--implicit needs --ref" in capsys.readouterr().err
    assert main(["eval", "prm", "--model", "tiny", "--beta", "0.1", "--data", "x.jsonl", "--output", str(out)]) == 2
