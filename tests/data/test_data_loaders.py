"""Loaders: every source format, column maps, kind detection, CSV typing, errors, and the writer."""

import csv
import gzip
import json
import os
import shlex

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from prefkit.data import (
    DataError,
    PairwiseRecord,
    RankedRecord,
    RatedRecord,
    StepwiseRecord,
    UnpairedRecord,
    apply_column_map,
    detect_kind,
    load_records,
    parse_column_map,
    read_rows,
    write_records,
)

CHAT = [{"role": "user", "content": "Sort [3, 1]"}]
ROWS = [
    {"prompt": "2+2?", "chosen": "4", "rejected": "5", "user_id": "u1", "weight": 2.0, "note": "ignored"},
    {
        "prompt": CHAT,
        "chosen": [{"role": "assistant", "content": "[1, 3]"}],
        "rejected": [{"role": "assistant", "content": "[3, 1]"}],
        "margin": 1.5,
        "id": "r2",
    },
]
EXPECTED = [
    PairwiseRecord(prompt="2+2?", chosen="4", rejected="5", user_id="u1", weight=2.0),
    PairwiseRecord(
        prompt=CHAT,
        chosen=[{"role": "assistant", "content": "[1, 3]"}],
        rejected=[{"role": "assistant", "content": "[3, 1]"}],
        margin=1.5,
        id="r2",
    ),
]


def write_jsonl(path, rows, opener=open):
    with opener(path, "wt", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return str(path)


def write_csv(path, rows, columns):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(columns)
        for row in rows:
            w.writerow([row.get(c, "") if isinstance(row.get(c, ""), str) else json.dumps(row[c]) for c in columns])
    return str(path)


# ---- sources ------------------------------------------------------------------------------------
def test_jsonl_and_gz(tmp_path):
    assert load_records(write_jsonl(tmp_path / "a.jsonl", ROWS)) == EXPECTED
    assert load_records(write_jsonl(tmp_path / "a.jsonl.gz", ROWS, gzip.open)) == EXPECTED


def test_json_list_and_gz(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps(ROWS))
    with gzip.open(tmp_path / "b.json.gz", "wt") as f:
        json.dump(ROWS, f)
    assert load_records(str(tmp_path / "a.json")) == EXPECTED
    assert load_records(tmp_path / "b.json.gz") == EXPECTED


def test_json_that_is_not_a_list(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps({"rows": ROWS}))
    with pytest.raises(DataError, match=r"a\.json: expected a JSON list of objects"):
        load_records(str(tmp_path / "a.json"))
    (tmp_path / "b.json").write_text(json.dumps(ROWS[0]) + "\n" + json.dumps(ROWS[1]))
    with pytest.raises(DataError, match=r"name the file \.jsonl"):
        load_records(str(tmp_path / "b.json"))


def test_csv_parses_json_cells(tmp_path):
    path = write_csv(tmp_path / "a.csv", ROWS, ["prompt", "chosen", "rejected", "user_id", "weight", "margin", "id"])
    assert load_records(path) == EXPECTED


def test_parquet(tmp_path):
    pq.write_table(pa.Table.from_pylist([ROWS[1], dict(ROWS[1], id="r3")]), tmp_path / "a.parquet")
    records = load_records(str(tmp_path / "a.parquet"))
    assert records == [EXPECTED[1], PairwiseRecord(**{**EXPECTED[1].__dict__, "id": "r3"})]


def test_saved_dataset_and_dataset_dict_needs_split(tmp_path):
    ds = datasets.Dataset.from_list([ROWS[0], dict(ROWS[0], prompt="3+3?")])
    ds.save_to_disk(str(tmp_path / "single"))
    assert [r.prompt for r in load_records(str(tmp_path / "single"))] == ["2+2?", "3+3?"]
    datasets.DatasetDict({"train": ds, "test": ds.select([1])}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DataError, match=r"a split \(the dataset has splits \['train', 'test'\]\)"):
        load_records(str(tmp_path / "dd"))
    assert [r.prompt for r in load_records(str(tmp_path / "dd"), split="test")] == ["3+3?"]
    with pytest.raises(DataError, match=r"dd\[dev\]: expected a split among"):
        load_records(str(tmp_path / "dd"), split="dev")
    with pytest.raises(DataError, match="not a DatasetDict"):
        load_records(str(tmp_path / "single"), split="train")


def test_local_data_folder_goes_through_load_dataset(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    calls = []
    real = datasets.load_dataset

    def spy(name, *args, **kwargs):
        calls.append((name, kwargs.get("split")))
        return real(name, *args, **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", spy)
    folder = tmp_path / "folder"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", [ROWS[0]])
    assert load_records(str(folder), split="train") == [EXPECTED[0]]
    assert calls == [(str(folder), "train")]


def test_hub_name_calls_load_dataset_with_split(monkeypatch):
    calls = []

    def fake(name, split=None):
        calls.append((name, split))
        return datasets.Dataset.from_list([ROWS[0]])

    monkeypatch.setattr(datasets, "load_dataset", fake)
    assert load_records("someone/prefs", split="train") == [EXPECTED[0]]
    assert calls == [("someone/prefs", "train")]


def test_hub_failure_is_a_data_error(monkeypatch):
    def fail(name, split=None):
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", fail)
    with pytest.raises(
        DataError,
        match=r"someone/prefs\[train\]: expected a dataset that datasets.load_dataset can read.*offline",
    ):
        load_records("someone/prefs", split="train")


def test_in_memory_rows_and_dataset_objects():
    assert load_records([ROWS[0]]) == [EXPECTED[0]]
    assert load_records(datasets.Dataset.from_list([ROWS[0]])) == [EXPECTED[0]]
    with pytest.raises(DataError, match=r"<list of rows>:2: field 'rejected'"):
        load_records(
            [
                {"prompt": "p", "chosen": "a", "rejected": "b"},
                {"prompt": "p", "chosen": "a", "rejected": None},
            ]
        )


def test_missing_file_and_unknown_extension(tmp_path):
    with pytest.raises(DataError, match=r"nope\.jsonl: expected an existing file or folder.*got 'no such path'"):
        load_records(str(tmp_path / "nope.jsonl"))
    (tmp_path / "data.txt").write_text("x")
    with pytest.raises(
        DataError,
        match=r"data\.txt: expected a \.jsonl, \.jsonl\.gz, \.json.*got \"a file named 'data.txt'\"",
    ):
        load_records(str(tmp_path / "data.txt"))
    with pytest.raises(DataError, match="no such path"):
        load_records("./relative/missing")


def test_read_rows_numbers_lines_and_collects_bad_rows(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"a": 1}\n\n[1, 2]\n{"a": 2}\n{bad\n')
    with pytest.raises(DataError, match=r"a\.jsonl:3: expected one JSON object per line, got \[1, 2\]"):
        list(read_rows(str(path)))
    errors = []
    assert list(read_rows(str(path), errors=errors)) == [(1, {"a": 1}), (4, {"a": 2})]
    assert [e.row for e in errors] == [3, 5] and "invalid JSON" in str(errors[1])


def test_csv_cell_count_and_empty_file(tmp_path):
    path = tmp_path / "a.csv"
    path.write_text("prompt,chosen,rejected\np,a,b\np,a\n")
    with pytest.raises(DataError, match=r"a\.csv:2: expected 3 cells, one per header column, got '2 cells'"):
        list(read_rows(str(path)))
    (tmp_path / "e.csv").write_text("")
    with pytest.raises(DataError, match="a CSV header line"):
        list(read_rows(str(tmp_path / "e.csv")))


def test_not_utf8_and_not_gzip(tmp_path):
    (tmp_path / "a.jsonl").write_bytes(b'{"a": "\xff"}\n')
    with pytest.raises(DataError, match="UTF-8 text"):
        list(read_rows(str(tmp_path / "a.jsonl")))
    (tmp_path / "b.jsonl.gz").write_bytes(b"not gzip")
    with pytest.raises(DataError, match="a valid gzip file"):
        list(read_rows(str(tmp_path / "b.jsonl.gz")))


# ---- kinds and column maps ------------------------------------------------------------------------
KIND_ROWS = {
    "pairwise": {"prompt": "p", "chosen": "a", "rejected": "b"},
    "unpaired": {"prompt": "p", "completion": "c", "label": True},
    "rated": {"prompt": "p", "completion": "c", "ratings": {"x": 1}},
    "ranked": {"prompt": "p", "completions": ["a", "b"], "scores": [1, 0]},
    "stepwise": {"prompt": "p", "completions": ["s"], "labels": [1]},
}
TYPES = {
    "pairwise": PairwiseRecord,
    "unpaired": UnpairedRecord,
    "rated": RatedRecord,
    "ranked": RankedRecord,
    "stepwise": StepwiseRecord,
}


@pytest.mark.parametrize("kind", sorted(KIND_ROWS))
def test_kind_detection(kind):
    (record,) = load_records([KIND_ROWS[kind]])
    assert type(record) is TYPES[kind]


def test_ranked_detected_from_ranking_too():
    assert detect_kind(["prompt", "completions", "ranking"]) == "ranked"


def test_no_kind_matches_lists_what_is_expected():
    with pytest.raises(DataError) as info:
        load_records([{"question": "q", "response_a": "a", "response_b": "b"}])
    msg = str(info.value)
    for part in (
        "pairwise (chosen + rejected)",
        "unpaired (completion + label)",
        "ranked (completions + (ranking or scores))",
        "--map target=source",
        "columns with values are ['question', 'response_a', 'response_b']",
    ):
        assert part in msg


def test_ambiguous_kind_asks_for_kind():
    row = {"prompt": "p", "completion": "c", "label": True, "ratings": {"x": 1}}
    with pytest.raises(DataError, match="fit unpaired and rated"):
        load_records([row])
    (record,) = load_records([row], kind="rated")
    assert record == RatedRecord(prompt="p", completion="c", ratings={"x": 1.0})


def test_explicit_kind_with_absent_column_is_one_file_level_error():
    with pytest.raises(DataError) as info:
        load_records([KIND_ROWS["unpaired"]] * 3, kind="pairwise")
    assert info.value.row is None and info.value.field == "chosen" and "--map chosen=COLUMN" in str(info.value)


def test_column_map_renames_before_detection(tmp_path):
    path = write_jsonl(
        tmp_path / "a.jsonl", [{"question": "q", "response_a": "a", "response_b": "b", "chosen": "junk"}]
    )
    (record,) = load_records(path, column_map={"prompt": "question", "chosen": "response_a", "rejected": "response_b"})
    assert record == PairwiseRecord(prompt="q", chosen="a", rejected="b")


def test_column_map_swap_and_parse():
    assert apply_column_map({"chosen": "a", "rejected": "b", "x": 1}, {"chosen": "rejected", "rejected": "chosen"}) == {
        "x": 1,
        "chosen": "b",
        "rejected": "a",
    }
    assert parse_column_map(["chosen=a", "rejected = b,prompt=q"]) == {
        "chosen": "a",
        "rejected": "b",
        "prompt": "q",
    }
    with pytest.raises(ValueError, match="expected target=source"):
        parse_column_map(["chosen"])


def test_column_map_onto_missing_column_names_column_and_file(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"prompt": "q", "a": "x", "b": "y"}])
    with pytest.raises(DataError) as info:
        load_records(path, column_map={"chosen": "response_a", "rejected": "b"})
    assert info.value.field == "response_a" and info.value.file == path
    assert "a column 'response_a' to map onto 'chosen'" in str(info.value) and "['a', 'b', 'prompt']" in str(info.value)
    with pytest.raises(DataError, match="column map targets that are record fields"):
        load_records(path, column_map={"choosen": "a"})


def test_optional_fields_kept_and_unknown_ignored():
    row = dict(KIND_ROWS["unpaired"], user_id="u", weight=0.5, id=9, margin=3.0, junk=[1])
    (record,) = load_records([row])
    assert record == UnpairedRecord(prompt="p", completion="c", label=True, user_id="u", weight=0.5, id="9")


# ---- validation through the loader ----------------------------------------------------------------
def test_first_error_says_how_many_rows_are_bad_and_which_command_lists_them(tmp_path):
    rows = [
        KIND_ROWS["pairwise"],
        {"prompt": "p", "chosen": "a", "rejected": "a", "weight": -1},
        {"prompt": "", "chosen": "a", "rejected": "b"},
        {"prompt": "p", "chosen": {"text": "a"}, "rejected": "b"},
    ]
    path = write_jsonl(tmp_path / "bad data.jsonl", rows)
    with pytest.raises(DataError) as info:
        load_records(path, column_map={"prompt": "prompt"})
    err = info.value
    assert (err.row, err.field) == (2, "rejected")
    assert "1 more problem in this row, 2 other bad rows" in str(err)
    assert f"run `prefkit data validate {shlex.quote(path)} --map prompt=prompt` to list them all" in str(err)


def test_validate_false_skips_value_checks_but_not_missing_fields():
    (record,) = load_records([{"prompt": "p", "chosen": "a", "rejected": "a", "weight": -1}], validate=False)
    assert record.weight == -1.0
    with pytest.raises(DataError, match="field 'rejected'"):
        load_records([{"prompt": "p", "chosen": "a", "rejected": "b"}, {"prompt": "p", "chosen": "a"}], validate=False)


def test_csv_cells_get_json_types(tmp_path):
    path = tmp_path / "u.csv"
    path.write_text("prompt,completion,label,weight,user_id,id\np,c,true,0.5,,\np,,FALSE,,7,\np,c,1,2,u,x\n")
    records = load_records(str(path))
    assert records == [
        UnpairedRecord("p", "c", True, weight=0.5),
        UnpairedRecord("p", "", False, user_id="7"),
        UnpairedRecord("p", "c", True, user_id="u", weight=2.0, id="x"),
    ]
    path.write_text("prompt,completion,label,weight\np,c,yes,abc\n")
    with pytest.raises(DataError) as info:
        load_records(str(path))
    assert (info.value.row, info.value.field, info.value.got) == (1, "label", "yes")
    assert "1 more problem in this row" in str(info.value)


def test_csv_ranked_and_stepwise_lists(tmp_path):
    path = tmp_path / "r.csv"
    path.write_text('prompt,completions,ranking,scores\np,"[""a"", ""b""]","[1, 0]",\n')
    assert load_records(str(path)) == [RankedRecord("p", ["a", "b"], ranking=[1, 0])]


# ---- writing ------------------------------------------------------------------------------------
SAMPLES = {
    "pairwise": EXPECTED,
    "unpaired": [UnpairedRecord("p", "c", True, weight=1.5), UnpairedRecord("p", "", False, user_id="u")],
    "rated": [
        RatedRecord("p", "c", {"help": 3.0, "safe": 1.0}),
        RatedRecord("q", "d", {"help": 2.0}, id="7"),
    ],
    "ranked": [
        RankedRecord("p", ["a", "b", "c"], ranking=[2, 0, 1]),
        RankedRecord("p", ["a", "b"], scores=[0.5, 0.5]),
    ],
    "stepwise": [StepwiseRecord("p", ["s1", "s2"], [True, False]), StepwiseRecord("q", ["s"], [0.25])],
}


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz", ".json", ".json.gz", ".csv", ".parquet"])
@pytest.mark.parametrize("kind", sorted(SAMPLES))
def test_write_then_load_round_trips(tmp_path, kind, suffix):
    records = SAMPLES[kind]
    if suffix == ".parquet" and kind == "pairwise":
        records = [records[1], records[1]]  # a Parquet column has one type: all chat or all plain
    path = write_records(records, tmp_path / f"out{suffix}")
    assert load_records(str(path), kind=kind) == records
    assert load_records(str(path)) == records  # the kind is detectable from what was written
    assert [p.name for p in tmp_path.iterdir()] == [f"out{suffix}"]  # no temp file left behind


def test_written_jsonl_is_plain_json_without_nones(tmp_path):
    path = write_records([UnpairedRecord("p", "c", True)], tmp_path / "a.jsonl")
    assert path.read_text() == '{"prompt": "p", "completion": "c", "label": true}\n'


def test_write_is_atomic_and_refuses_bad_input(tmp_path):
    target = tmp_path / "keep.csv"
    target.write_text("original")
    with pytest.raises(ValueError, match="would read back as JSON"):
        write_records([PairwiseRecord("[1, 2]", "a", "b")], target)
    assert target.read_text() == "original" and sorted(os.listdir(tmp_path)) == ["keep.csv"]
    with pytest.raises(ValueError, match="one kind"):
        write_records([SAMPLES["rated"][0], SAMPLES["ranked"][0]], tmp_path / "x.jsonl")
    with pytest.raises(ValueError, match="no records"):
        write_records([], tmp_path / "x.jsonl")
    with pytest.raises(ValueError, match=r"\.parquet name"):
        write_records(SAMPLES["rated"], tmp_path / "x.txt")
    with pytest.raises(ValueError, match="one type across records"):
        write_records(EXPECTED, tmp_path / "x.parquet")


def test_write_replaces_existing_file(tmp_path):
    path = tmp_path / "a.jsonl"
    write_records(SAMPLES["rated"], path)
    write_records(SAMPLES["rated"][:1], path)
    assert load_records(str(path)) == SAMPLES["rated"][:1]


def test_responses_stored_as_booleans_or_numbers_are_read_as_their_text(tmp_path):
    """A benchmark that stores an answer as 42 or a verdict as true loads, the response being that text; prompts
    and other fields are untouched."""
    path = tmp_path / "scalars.jsonl"
    rows = [
        {"prompt": "What is 6 x 7?", "chosen": 42, "rejected": 41.5, "margin": 1},
        {"prompt": "Is the sky blue?", "chosen": True, "rejected": False},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    a, b = load_records(str(path))
    assert (a.chosen, a.rejected, a.margin) == ("42", "41.5", 1.0)
    assert (b.chosen, b.rejected) == ("true", "false")
    ranked = tmp_path / "ranked.jsonl"
    ranked.write_text(json.dumps({"prompt": "q", "completions": [1, 2, "three"], "ranking": [2, 0, 1]}) + "\n")
    (r,) = load_records(str(ranked))
    assert r.completions == ["1", "2", "three"]
