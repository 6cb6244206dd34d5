"""`prefkit lab study ...` and `prefkit lab draw ...` through prefkit.cli.main."""

import pytest

from prefkit.cli import main
from prefkit.data import load_records
from prefkit.lab import studies


@pytest.mark.parametrize(
    "argv", [["lab", "study", "--help"], ["lab", "study", "overopt", "--help"], ["lab", "draw", "--help"]]
)
def test_help(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 0
    assert "usage: prefkit lab" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["lab", "study", "losses", "--losses", "dpo,dpoo"], "unknown loss 'dpoo'. Did you mean 'dpo'?"),
        (["lab", "study", "noise", "--losses", "kto"], "loss 'kto' is unpaired"),
        (["lab", "study", "noise", "--rates", "0,0.6"], "--rates must be one or more flip rates in [0, 0.5)"),
        (["lab", "study", "losses", "--steps", "0"], "--steps must be at least 1, got 0"),
        (["lab", "study", "overopt", "--pool", "8", "--n-max", "16"], "--n-max (16) must be <= --pool (8)"),
        (["lab", "study"], "name a study: losses, noise, overopt"),
    ],
)
def test_study_errors(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_unknown_world_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["lab", "study", "losses", "--world", "nowhere"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'nowhere'" in capsys.readouterr().err


def test_study_arguments_reach_the_study(monkeypatch, tmp_path):
    calls = {}
    monkeypatch.setattr(studies, "noise_study", lambda *a, **k: calls.update(args=a, kwargs=k))
    argv = [
        "lab",
        "study",
        "noise",
        "--rates",
        "0,0.25",
        "--seeds",
        "3",
        "--losses",
        "dpo,robust_dpo",
        "--steps",
        "7",
        "--kl-budgets",
        "1,3",
        "--output-dir",
        str(tmp_path),
        "--quiet",
    ]
    assert main(argv) == 0
    assert calls["args"] == ("default", [0.0, 0.25], ["dpo", "robust_dpo"], [3])
    assert calls["kwargs"]["steps"] == 7 and calls["kwargs"]["progress"] is False
    assert calls["kwargs"]["output_dir"] == str(tmp_path) and calls["kwargs"]["annotator"] == "bt"
    assert calls["kwargs"]["kl_budgets"] == [1.0, 3.0] and calls["kwargs"]["eval_every"] == 10


def test_draw_writes_a_loadable_file(tmp_path, capsys):
    out = tmp_path / "pairs.jsonl"
    argv = [
        "lab",
        "draw",
        "--world",
        "groups",
        "-n",
        "12",
        "--annotator",
        "argmax",
        "--flip",
        "0.2",
        "--groups",
        "--seed",
        "3",
        str(out),
    ]
    assert main(argv) == 0
    assert "wrote 12 pairwise records" in capsys.readouterr().out
    records = load_records(out)
    assert len(records) == 12 and all(r.user_id.startswith("group:") for r in records)
    # equal arguments give equal files
    again = tmp_path / "again.jsonl"
    assert main(argv[:-1] + [str(again)]) == 0
    assert again.read_text() == out.read_text()


def test_draw_other_kinds_and_errors(tmp_path, capsys):
    assert main(["lab", "draw", "--kind", "ranked", "-n", "3", "--temperature", "0", str(tmp_path / "r.jsonl")]) == 0
    assert len(load_records(tmp_path / "r.jsonl")) == 3
    assert main(["lab", "draw", "--kind", "rated", "--flip", "0.1", str(tmp_path / "x.jsonl")]) == 2
    assert "--flip applies to pairwise and unpaired records, not rated" in capsys.readouterr().err
    assert main(["lab", "draw", "--annotator", "argmax", "--temperature", "2", str(tmp_path / "x.jsonl")]) == 2
    assert "--temperature applies to bt" in capsys.readouterr().err
    assert main(["lab", "draw", "--flip", "1.5", str(tmp_path / "x.jsonl")]) == 2
    assert "eps must be in [0, 1]" in capsys.readouterr().err
