"""Record helpers: DataError formatting, field lists, record construction, text rendering."""

import pickle

import pytest

from prefkit.data import DataError, PairwiseRecord, RatedRecord, UnpairedRecord, record_from_dict, render_text
from prefkit.data.records import optional_fields, record_fields, required_fields, text_key


def test_data_error_message_names_file_row_field_expected_and_got():
    err = DataError("train.jsonl", 3, "weight", "a number >= 0", -1.0)
    assert str(err) == "train.jsonl:3: field 'weight': expected a number >= 0, got -1.0"
    assert (err.file, err.row, err.field, err.expected, err.got) == (
        "train.jsonl",
        3,
        "weight",
        "a number >= 0",
        -1.0,
    )


def test_data_error_without_row_or_field_and_with_hint():
    err = DataError("x.csv", None, None, "a .jsonl file", hint="see docs")
    assert str(err) == "x.csv: expected a .jsonl file; see docs"
    hinted = DataError("f", 2, "prompt", "text").with_hint("3 other bad rows")
    assert str(hinted) == "f:2: field 'prompt': expected text; 3 other bad rows"
    assert hinted.row == 2 and hinted.field == "prompt"


def test_data_error_pickles_with_its_fields():
    err = DataError("f.jsonl", 7, "label", "a boolean", "yes", hint="h")
    back = pickle.loads(pickle.dumps(err))
    assert str(back) == str(err) and back.row == 7 and back.got == "yes"


def test_field_lists_per_kind():
    assert required_fields("pairwise") == ["prompt", "chosen", "rejected"]
    assert "ranking" in optional_fields("ranked") and "scores" in optional_fields("ranked")
    assert record_fields("unpaired")[:3] == ["prompt", "completion", "label"]
    with pytest.raises(ValueError, match="unknown record kind 'pairs'"):
        required_fields("pairs")


def test_record_from_dict_normalises_types_and_ignores_unknown_keys():
    rec = record_from_dict(
        "unpaired", {"prompt": "p", "completion": "c", "label": 1, "user_id": 42, "weight": 2, "extra": "x"}
    )
    assert rec == UnpairedRecord(prompt="p", completion="c", label=True, user_id="42", weight=2.0)
    assert isinstance(rec.label, bool) and isinstance(rec.weight, float)
    rated = record_from_dict("rated", {"prompt": "p", "completion": "c", "ratings": {"a": 1, "b": None}})
    assert rated == RatedRecord(prompt="p", completion="c", ratings={"a": 1.0})


def test_record_from_dict_missing_required_field_is_a_data_error():
    with pytest.raises(DataError) as info:
        record_from_dict("pairwise", {"prompt": "p", "chosen": "a"}, file="f.jsonl", row_number=4)
    assert info.value.field == "rejected" and info.value.row == 4 and "f.jsonl:4" in str(info.value)


def test_render_text_and_text_key():
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    assert render_text("plain") == "plain"
    assert render_text(messages) == "user: hi\nassistant: yo"
    assert text_key(messages) == text_key([dict(m) for m in messages])
    assert text_key("a") != text_key(["a"])
    assert PairwiseRecord("p", "a", "b").kind == "pairwise"
