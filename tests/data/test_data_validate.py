"""Validation: every rule reports the field and what was expected; all problems are returned."""

import math

import pytest

from prefkit.data import validate_record, validate_rows, validate_source

MSG = [{"role": "user", "content": "hi"}]
REPLY = [{"role": "assistant", "content": "hello"}]


def errors_of(row, kind):
    return validate_record(row, kind, "f.jsonl", 5)


def fields_of(row, kind):
    return [e.field for e in errors_of(row, kind)]


GOOD = {
    "pairwise": {"prompt": "p", "chosen": "a", "rejected": "b", "weight": 0.5, "margin": -1, "user_id": 3},
    "unpaired": {"prompt": "p", "completion": "c", "label": False},
    "rated": {"prompt": "p", "completion": "c", "ratings": {"help": 4, "honest": 2.5}},
    "ranked": {"prompt": "p", "completions": ["a", "b", "c"], "ranking": [2, 0, 1]},
    "stepwise": {"prompt": "p", "completions": ["s1", "s2"], "labels": [True, 0.3]},
}


@pytest.mark.parametrize("kind", sorted(GOOD))
def test_good_rows_have_no_errors(kind):
    assert errors_of(GOOD[kind], kind) == []


def test_chat_messages_are_valid_text():
    row = {"prompt": MSG, "chosen": REPLY, "rejected": [{"role": "assistant", "content": "bye"}]}
    assert errors_of(row, "pairwise") == []


def test_missing_and_empty_required_fields():
    errs = errors_of({"prompt": "  ", "chosen": "a"}, "pairwise")
    assert [e.field for e in errs] == ["prompt", "rejected"]
    assert "non-empty text" in str(errs[0])
    assert "required for pairwise records" in str(errs[1]) and "nothing (missing)" in str(errs[1])
    assert str(errs[1]).startswith("f.jsonl:5: field 'rejected': expected")


def test_empty_completion_string_is_allowed_but_empty_message_list_is_not():
    assert errors_of({"prompt": "p", "chosen": "", "rejected": "no"}, "pairwise") == []
    assert fields_of({"prompt": "p", "chosen": [], "rejected": "no"}, "pairwise")[0] == "chosen"


def test_missing_prompt_in_pair_explains_implicit_prompt_layouts():
    (err,) = errors_of({"chosen": "a", "rejected": "b"}, "pairwise")
    assert err.field == "prompt" and "HH-RLHF" in err.expected and "chat-message" in err.expected


def test_wrong_types_and_bad_messages():
    row = {
        "prompt": [{"role": "robot", "content": "hi"}, {"role": "user", "content": 3}, "oops"],
        "chosen": 12,
        "rejected": "b",
    }
    errs = errors_of(row, "pairwise")
    assert [e.field for e in errs] == ["prompt[0].role", "prompt[1].content", "prompt[2]", "chosen"]
    assert "'system', 'user', 'assistant', 'tool'" in errs[0].expected
    assert errs[3].got == 12


def test_mixed_plain_and_chat_texts_in_one_record():
    errs = errors_of({"prompt": MSG, "chosen": REPLY, "rejected": "plain"}, "pairwise")
    assert [e.field for e in errs] == ["rejected"]
    assert "chat messages like 'prompt'" in errs[0].expected


def test_chosen_equal_to_rejected_after_rendering():
    assert fields_of({"prompt": "p", "chosen": "same ", "rejected": " same"}, "pairwise") == ["rejected"]
    assert fields_of({"prompt": MSG, "chosen": REPLY, "rejected": list(REPLY)}, "pairwise") == ["rejected"]


@pytest.mark.parametrize("name", ["weight", "margin", "chosen_score", "rejected_score"])
@pytest.mark.parametrize("value", [math.nan, math.inf, "1.0", True])
def test_numbers_must_be_finite_reals(name, value):
    row = dict(GOOD["pairwise"], **{name: value})
    errs = errors_of(row, "pairwise")
    assert [e.field for e in errs] == [name] and "finite number" in errs[0].expected


def test_negative_weight():
    (err,) = errors_of(dict(GOOD["unpaired"], weight=-0.1), "unpaired")
    assert err.field == "weight" and err.expected == "a number >= 0"


@pytest.mark.parametrize("label, ok", [(True, True), (0, True), (1, True), (2, False), ("true", False), (0.0, False)])
def test_label_strictness(label, ok):
    errs = errors_of(dict(GOOD["unpaired"], label=label), "unpaired")
    assert (errs == []) is ok
    if isinstance(label, str):
        assert "without quotes" in errs[0].expected


@pytest.mark.parametrize(
    "ratings, field",
    [
        ({}, "ratings"),
        ([1, 2], "ratings"),
        ({"a": "4"}, "ratings.a"),
        ({"a": math.nan}, "ratings.a"),
        ({"a": None}, "ratings"),
    ],
)
def test_ratings_must_be_nonempty_dict_of_finite_numbers(ratings, field):
    assert fields_of(dict(GOOD["rated"], ratings=ratings), "rated") == [field]


def test_ratings_null_entries_mean_not_rated():
    assert errors_of(dict(GOOD["rated"], ratings={"a": 3, "b": None}), "rated") == []


@pytest.mark.parametrize("ranking", [[0, 1], [0, 1, 1], [0, 1, 3], [0, 1, 2.0], [True, 0, 1], "012"])
def test_ranking_must_be_a_permutation(ranking):
    errs = errors_of(dict(GOOD["ranked"], ranking=ranking), "ranked")
    assert [e.field for e in errs] == ["ranking"]
    assert "permutation of 0..2" in errs[0].expected


def test_ranked_scores_length_and_count_of_completions():
    assert fields_of({"prompt": "p", "completions": ["a", "b"], "scores": [1.0]}, "ranked") == ["scores"]
    assert fields_of({"prompt": "p", "completions": ["a", "b"], "scores": [1.0, None]}, "ranked") == ["scores[1]"]
    assert fields_of({"prompt": "p", "completions": ["a"], "scores": [1.0]}, "ranked") == ["completions"]
    (err,) = errors_of({"prompt": "p", "completions": ["a", "b"]}, "ranked")
    assert err.field == "ranking" and "'scores'" in err.expected


def test_stepwise_labels_one_per_step():
    errs = errors_of({"prompt": "p", "completions": ["s1", "s2", ""], "labels": [1, "x"]}, "stepwise")
    assert [e.field for e in errs] == ["completions[2]", "labels", "labels[1]"]
    assert "3 labels" in errs[1].expected


def test_identifiers():
    assert fields_of(dict(GOOD["pairwise"], id=[1]), "pairwise") == ["id"]
    assert errors_of(dict(GOOD["pairwise"], id=7, user_id="u"), "pairwise") == []


def test_unknown_kind_is_a_value_error():
    with pytest.raises(ValueError, match="unknown record kind"):
        validate_record({}, "pairs")


def test_validate_rows_returns_all_errors_of_all_rows():
    rows = [(1, GOOD["pairwise"]), (2, {"prompt": "", "chosen": "a", "rejected": "a"}), (4, {"prompt": "p"})]
    errs = validate_rows(rows, "pairwise", "f.jsonl")
    assert [(e.row, e.field) for e in errs] == [
        (2, "prompt"),
        (2, "rejected"),
        (4, "chosen"),
        (4, "rejected"),
    ]
    plain = validate_rows([GOOD["pairwise"], {"prompt": "p", "chosen": "a"}], "pairwise")
    assert [(e.row, e.field) for e in plain] == [(2, "rejected")]


def test_validate_source_reports_every_bad_row(tmp_path):
    path = tmp_path / "f.jsonl"
    path.write_text(
        '{"prompt": "p", "chosen": "a", "rejected": "b"}\n'
        "not json\n"
        '{"prompt": "p", "chosen": "a", "rejected": "a", "weight": -1}\n'
    )
    report = validate_source(str(path))
    assert report.kind == "pairwise" and report.n_rows == 3 and not report.ok
    assert report.bad_rows == [2, 3]
    assert [(e.row, e.field) for e in report.errors] == [(2, None), (3, "rejected"), (3, "weight")]
    assert "invalid JSON" in str(report.errors[0])


def test_validate_source_file_level_problem(tmp_path):
    report = validate_source(str(tmp_path / "missing.jsonl"))
    assert report.kind is None and len(report.errors) == 1 and report.errors[0].row is None
    assert "no such path" in str(report.errors[0])
