"""Evaluation layouts (RewardBench 2, RM-Bench, HH), subsets, section maps and --data parsing."""

from pathlib import Path

import pytest

from prefkit.data import DataError, load_records
from prefkit.data.formats import hh_row, rewardbench2_row, rmbench_row
from prefkit.eval.commands import load_section_map, parse_data_argument
from prefkit.eval.data import load_eval_set, split_grid

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def test_rewardbench2_row_is_a_ranked_row():
    row = {"prompt": "p", "chosen": ["c"], "rejected": ["r1", "r2", "r3"], "subset": "Math", "id": 7}
    assert rewardbench2_row(row, "f", 1) == {
        "prompt": "p",
        "completions": ["c", "r1", "r2", "r3"],
        "scores": [1.0, 0.0, 0.0, 0.0],
        "subset": "Math",
        "id": 7,
    }
    with pytest.raises(DataError, match="f:2: field 'rejected'"):
        rewardbench2_row({"prompt": "p", "chosen": ["c"], "rejected": "r"}, "f", 2)


def test_rmbench_row_keeps_style_order_and_domain():
    row = {"prompt": "p", "chosen": ["c1", "c2", "c3"], "rejected": ["r1", "r2", "r3"], "domain": "code"}
    out = rmbench_row(row, "f", 1)
    assert out["completions"] == ["c1", "c2", "c3", "r1", "r2", "r3"] and out["subset"] == "code"
    (record,) = load_records([row], layout="rmbench")
    assert split_grid(record) == (["c1", "c2", "c3"], ["r1", "r2", "r3"])
    with pytest.raises(DataError, match="as many rejected styles"):
        rmbench_row(dict(row, rejected=["r1"]), "f", 1)


def test_hh_layout_checks_the_shape():
    row = {"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "\n\nHuman: hi\n\nAssistant: go away"}
    assert hh_row(row) == {"prompt": "\n\nHuman: hi\n\nAssistant:", "chosen": "hello", "rejected": "go away"}
    with pytest.raises(DataError, match="field 'chosen'.*HH layout"):
        hh_row({"chosen": "hello", "rejected": "bye"}, "f.jsonl", 4)


def test_subsets_from_column_then_name_then_all():
    rows = [
        {"prompt": "p", "chosen": "a", "rejected": "b", "subset": "s1"},
        {"prompt": "p", "chosen": "a", "rejected": "c"},
    ]
    eval_set = load_eval_set([("named", rows), (None, rows[1:])])
    assert eval_set.mode == "pairs" and eval_set.subsets == ["s1", "named", "all"]
    assert [s["n"] for s in eval_set.sources] == [2, 1]


def test_best_of_n_needs_one_best_and_modes_must_agree():
    tied = [{"prompt": "p", "chosen": ["a", "b"], "rejected": ["c"]}]
    with pytest.raises(DataError, match="exactly one chosen"):
        load_eval_set([(None, tied)], layout="rewardbench2")
    # the Ties subset takes several correct answers, under ids ref:<k> / tied:<k>
    ties = [dict(tied[0], subset="Ties", id="tied:3")]
    assert load_eval_set([(None, ties)], layout="rewardbench2").n_correct == [2]
    with pytest.raises(DataError, match=r":1: field 'id'.*'ref:<number>' or 'tied:<number>'"):
        load_eval_set([(None, [dict(ties[0], id="t3")])], layout="rewardbench2")
    with pytest.raises(DataError, match=r"field 'chosen'.*at least 2.*1 chosen of 2"):
        load_eval_set([(None, [dict(ties[0], chosen=["a"], rejected=["c"])])], layout="rewardbench2")
    with pytest.raises(DataError, match=r"field 'num_correct'.*number of chosen responses \(2"):
        load_eval_set([(None, [dict(ties[0], num_correct=3)])], layout="rewardbench2")
    pairs = [{"prompt": "p", "chosen": "a", "rejected": "b"}]
    lists = [{"prompt": "p", "completions": ["a", "b"], "ranking": [1, 0]}]
    with pytest.raises(ValueError, match="gives lists records but the sources before it give pairs"):
        load_eval_set([(None, pairs), (None, lists)])
    with pytest.raises(DataError, match="pairwise or ranked"):
        load_eval_set([(None, [{"prompt": "p", "completion": "a", "label": True}])])


def test_section_map(tmp_path):
    path = tmp_path / "sections.yaml"
    path.write_text(
        "sections:\n  Chat: [a, b]\n  Prior Sets: {subsets: [c], average: mean, weight: 0.5}\ncounts: {a: 984}\n"
    )
    sections, counts = load_section_map(path)
    assert sections == {
        "Chat": {"subsets": ["a", "b"]},
        "Prior Sets": {"subsets": ["c"], "average": "mean", "weight": 0.5},
    }
    assert counts == {"a": 984.0}
    path.write_text("sections:\n  Chat: {subsets: [a], average: median}\n")
    with pytest.raises(ValueError, match="section 'Chat'"):
        load_section_map(path)


def test_parse_data_argument(tmp_path):
    assert parse_data_argument("natural=a/b.json") == ("natural", "a/b.json")
    assert parse_data_argument("a/b.json") == (None, "a/b.json")
    odd = tmp_path / "x=y.jsonl"
    odd.write_text("")
    assert parse_data_argument(str(odd)) == (None, str(odd))


@pytest.mark.skipif(not (SHARED / "hhh").is_dir(), reason="../shared/data not present")
def test_hhh_subsets_come_from_the_source_column():
    eval_set = load_eval_set([(None, str(SHARED / "hhh/hhh_alignment_eval.json"))], layout="hhh")
    assert sorted(set(eval_set.subsets)) == ["harmless", "helpful", "honest", "other"] and len(eval_set) == 221


def test_every_layout_has_a_record_kind():
    from prefkit.data.formats import LAYOUTS
    from prefkit.eval.data import LAYOUT_KINDS

    assert set(LAYOUT_KINDS) == set(LAYOUTS)
