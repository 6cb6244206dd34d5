"""ListPreferenceTrainer: `prefkit train` with a listwise loss on ranked records."""

import json

from prefkit.cli import main


def test_prefkit_train_trains_a_listwise_loss(tmp_path, monkeypatch, capsys):
    """`prefkit train` with a loss of kind list (pl_dpo) trains the policy on ranked records and saves it; a tied
    ranking is refused naming file, row and field."""
    from pathlib import Path

    monkeypatch.chdir(Path(__file__).resolve().parents[2])
    out = tmp_path / "pl"
    assert (
        main(["train", "examples/pl_dpo_tiny.yaml", f"output_dir={out}", "max_steps=4", "eval_steps=2", "save_steps=2"])
        == 0
    )
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any(any(k.endswith("rewards/margins") for k in m) for m in metrics) and (out / "model.safetensors").is_file()
    tied = tmp_path / "tied.jsonl"
    tied.write_text(json.dumps({"prompt": "q", "completions": ["a", "b", "c"], "scores": [1.0, 1.0, 2.0]}) + "\n")
    capsys.readouterr()
    code = main(
        ["train", "examples/pl_dpo_tiny.yaml", f"train_file={tied}", "eval_fraction=0", f"output_dir={tmp_path / 't'}"]
    )
    assert code != 0 and "tied.jsonl:1: field 'scores'" in capsys.readouterr().err


def test_prefkit_train_trains_pro_and_lipo_and_lipo_takes_ties(tmp_path, monkeypatch, capsys):
    """The same ranked file trains PRO (reference-free, with the scores as dynamic temperatures) and LiPO-lambda
    (the scores as graded labels); a list with tied scores is refused for PRO (one strict order) and trains with
    LiPO, whose tied pairs carry no weight."""
    from pathlib import Path

    monkeypatch.chdir(Path(__file__).resolve().parents[2])
    base = ["train", "examples/pl_dpo_tiny.yaml", "max_steps=2", "eval_steps=2", "save_steps=2"]
    for loss in ("pro", "lipo"):
        out = tmp_path / loss
        assert main([*base, f"loss={loss}", "loss_params={}", f"output_dir={out}"]) == 0
        metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert any("rewards/accuracies" in k for m in metrics for k in m), metrics
    tied = tmp_path / "tied.jsonl"
    tied.write_text(
        "".join(
            json.dumps({"prompt": f"q{i}", "completions": ["a", "b", "c"], "scores": [1.0, 1.0, 2.0]}) + "\n"
            for i in range(4)
        )
    )
    over = [f"train_file={tied}", "eval_fraction=0", "eval_strategy=no", "loss_params={}"]
    capsys.readouterr()
    assert main([*base, *over, "loss=pro", f"output_dir={tmp_path / 'tp'}"]) != 0
    assert "tied.jsonl:1: field 'scores'" in capsys.readouterr().err
    assert main([*base, *over, "loss=lipo", f"output_dir={tmp_path / 'tl'}"]) == 0
