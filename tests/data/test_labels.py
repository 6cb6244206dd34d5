"""Pairs stored as two responses and a label: oriented by the label, ties kept, a plain rename refused."""

import json
import shutil
from pathlib import Path

import pytest

from prefkit.cli import main
from prefkit.data import load_records
from prefkit.data.labels import LabelSpec, parse_label_spec
from prefkit.data.records import DataError

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "data" / "labelled_pairs_tiny.jsonl"


def spec(columns=("winner",)):
    return LabelSpec(("response_a", "response_b"), columns, ("model_a",), ("model_b",), ("tie",))


def test_one_label_column_orients_each_pair_and_keeps_ties():
    records = load_records(str(EXAMPLE), labels=spec())
    got = [(r.id, r.chosen, r.rejected, bool(r.tie)) for r in records]
    assert got == [
        ("lab-0", "Paris.", "Lyon.", False),
        ("lab-1", "Red.", "Green is a mix.", False),  # the second response was better: it is chosen
        ("lab-2", "Hello!", "Hi there!", True),
        ("lab-3", "4", "4", True),  # the same answer twice (one stored as a number) is a tie whatever the label
        ("lab-4", "It depends on the definition.", "No idea.", False),
    ]


def test_several_label_columns_take_the_majority_and_a_split_vote_is_a_tie():
    records = load_records(str(EXAMPLE), labels=spec(("winner", "judge_2", "judge_3")))
    by_id = {r.id: r for r in records}
    assert (by_id["lab-0"].chosen, by_id["lab-0"].tie) == ("Paris.", None)  # model_a 2 : 1
    assert by_id["lab-2"].tie  # tie 2 : model_a 1
    assert by_id["lab-4"].tie and by_id["lab-4"].chosen == "It depends on the definition."  # 1 : 1 : 1


def test_label_values_are_matched_as_text_and_unknown_ones_are_named(tmp_path):
    path = tmp_path / "numeric.jsonl"
    rows = [{"prompt": "q", "a": "x", "b": "y", "pref": 2}, {"prompt": "q", "a": "x", "b": "y", "pref": 3}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    numeric = parse_label_spec("a,b", "pref", "1", "2")
    with pytest.raises(DataError) as info:
        load_records(str(path), labels=numeric)
    assert (info.value.row, info.value.field) == (2, "pref")
    assert "1 (first better), 2 (second better)" in str(info.value)
    (record,) = load_records([rows[0]], labels=numeric)
    assert (record.chosen, record.rejected) == ("y", "x")
    with pytest.raises(ValueError, match="mean more than one outcome"):
        parse_label_spec("a,b", "pref", "1", "1")
    with pytest.raises(ValueError, match="--responses: two"):
        parse_label_spec("a", "pref", "1", "2")


def test_renaming_two_responses_onto_chosen_and_rejected_beside_a_label_column_is_refused():
    with pytest.raises(DataError, match="no label column when --map puts 'response_a' first") as info:
        load_records(str(EXAMPLE), column_map={"chosen": "response_a", "rejected": "response_b"})
    assert "--label winner" in str(info.value)


def test_the_command_line_reads_labels_and_training_refuses_ties(tmp_path, capsys, monkeypatch):
    flags = ["--responses", "response_a,response_b", "--label", "winner"]
    flags += ["--first-better", "model_a", "--second-better", "model_b", "--tie", "tie"]
    assert main(["data", "validate", str(EXAMPLE), *flags]) == 0
    assert "all 5 rows are valid pairwise records" in capsys.readouterr().out
    assert main(["data", "validate", str(EXAMPLE), "--responses", "response_a,response_b"]) == 2
    assert "--label is needed" in capsys.readouterr().err
    out = tmp_path / "pairs.jsonl"
    assert main(["data", "convert", str(EXAMPLE), str(out), *flags]) == 0
    monkeypatch.chdir(Path(__file__).resolve().parents[2])
    shutil.copy(out, tmp_path / "train.jsonl")
    capsys.readouterr()
    code = main(
        ["train", "examples/dpo_tiny.yaml", f"train_file={tmp_path / 'train.jsonl'}", "eval_fraction=0",
         f"output_dir={tmp_path / 'run'}"]
    )  # fmt: skip
    assert code != 0 and "train.jsonl:3: field 'tie'" in capsys.readouterr().err
