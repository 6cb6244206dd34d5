"""`prefkit.data.recipes.hh_two_groups` and ``prefkit data recipe hh-two-groups`` on hand-made HH-RLHF rows."""

import gzip
import json
from collections import Counter
from pathlib import Path

import pytest

from prefkit.cli import main as prefkit_main
from prefkit.data import DataError, load_records
from prefkit.data.groups import resolve_groups
from prefkit.data.recipes import hh_two_groups, parse_shares, response_length

PROMPT = "\n\nHuman: How do I {i}?\n\nAssistant:"
# (chosen length, rejected length) of the replies, in characters; rows 3 and 8 are ties
LENGTHS = [(10, 2), (2, 10), (5, 5), (7, 3), (3, 7), (1, 9), (9, 1), (4, 4)]
CONTESTED_ROWS = {2, 5, 6}  # the human chose the shorter reply


def hh_row(i: int, chosen_len: int, rejected_len: int) -> dict:
    prompt = PROMPT.format(i=i)
    return {"chosen": f"{prompt} " + "c" * chosen_len, "rejected": f"{prompt} " + "r" * rejected_len}


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture
def small(tmp_path) -> str:
    return write_jsonl(tmp_path / "rows.jsonl", [hh_row(i, c, r) for i, (c, r) in enumerate(LENGTHS, 1)])


def many_rows(n: int) -> list[dict]:
    """``n`` rows, no ties: the chosen reply is longer in even rows, shorter in odd ones."""
    return [hh_row(i, 3 + i % 2 * 5, 6) for i in range(n)]


def test_labels_per_group_and_ties(small):
    built = hh_two_groups(small, users_per_group=1, seed=0)
    assert [r.id for r in built.records] == [f"rows.jsonl/{i}" for i in (1, 2, 4, 5, 6, 7)]  # rows 3, 8 tie
    for record, contested in zip(built.records, built.contested):
        row = int(record.id.split("/")[1])
        chosen_len, rejected_len = LENGTHS[row - 1]
        assert record.prompt == PROMPT.format(i=row)
        group = resolve_groups("lab", [record.user_id])[record.user_id]
        if group == "harmless":  # the human label
            assert (record.chosen, record.rejected) == ("c" * chosen_len, "r" * rejected_len)
        else:  # the longer reply wins
            assert group == "longer"
            assert len(record.chosen) == max(chosen_len, rejected_len)
            assert len(record.rejected) == min(chosen_len, rejected_len)
        assert contested == (row in CONTESTED_ROWS)


def test_stats_and_contested_share(small):
    stats = hh_two_groups(small, users_per_group=1, seed=0).stats
    assert (stats["rows"], stats["ties"], stats["pairs"], stats["contested"]) == (8, 2, 6, 3)
    assert stats["contested_share"] == 0.5  # 3 of the 6 kept pairs
    per_group = stats["per_group"]
    assert per_group["harmless"]["pairs"] + per_group["longer"]["pairs"] == 6
    assert per_group["harmless"]["pairs"] == 3  # round(0.5 * 6)
    assert per_group["harmless"]["contested"] + per_group["longer"]["contested"] == 3
    assert per_group["harmless"]["flipped"] == 0
    assert per_group["longer"]["flipped"] == per_group["longer"]["contested"]


def test_response_length_strips_whitespace():
    assert response_length("  abc \n") == 3
    assert response_length([{"role": "assistant", "content": " ab "}, {"role": "user", "content": "c"}]) == 3
    # replies that differ only in surrounding whitespace tie, and are dropped
    rows = [
        hh_row(0, 4, 6),
        hh_row(2, 7, 3),
        {"chosen": PROMPT.format(i=1) + " abcd", "rejected": PROMPT.format(i=1) + " wxyz  \n"},
    ]
    assert hh_two_groups(rows, users_per_group=1, shares=(0.5, 0.5)).stats["ties"] == 1


def test_assignment_reproducible_by_seed(tmp_path):
    path = write_jsonl(tmp_path / "many.jsonl", many_rows(40))
    users = [[r.user_id for r in hh_two_groups(path, users_per_group=4, seed=s).records] for s in (7, 7, 8)]
    assert users[0] == users[1]
    assert users[0] != users[2]


def test_shares_and_users_take_turns(tmp_path):
    path = write_jsonl(tmp_path / "many.jsonl", many_rows(40))
    built = hh_two_groups(path, users_per_group=5, shares=(0.75, 0.25), seed=1)
    counts = Counter(r.user_id for r in built.records)
    # 0.75 * 40 = 30 harmless pairs over 5 users (6 each), 10 longer pairs over 5 users (2 each)
    assert counts == {**{f"group:harmless/{k}": 6 for k in range(5)}, **{f"group:longer/{k}": 2 for k in range(5)}}
    assert built.stats["contested"] == 20  # the odd rows: the human chose the 3-character reply over 6
    assert sum(built.contested) == 20


def test_user_ids_read_as_lab_groups(small):
    users = sorted({r.user_id for r in hh_two_groups(small, users_per_group=2, seed=0).records})
    assert users == ["group:harmless/0", "group:harmless/1", "group:longer/0", "group:longer/1"]
    assert set(resolve_groups("lab", users).values()) == {"harmless", "longer"}


def test_bad_rows_name_file_row_and_field(tmp_path):
    rows = [hh_row(0, 4, 6), {"chosen": PROMPT.format(i=1) + " ok", "rejected": "not a dialogue"}]
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError) as err:
        hh_two_groups(path)
    assert (err.value.row, err.value.field) == (2, "rejected")
    assert "bad.jsonl" in str(err.value)
    diverged = [{"chosen": "\n\nHuman: a\n\nAssistant: x", "rejected": "\n\nHuman: b\n\nAssistant: x"}]
    with pytest.raises(DataError) as err:
        hh_two_groups(write_jsonl(tmp_path / "diverged.jsonl", diverged))
    assert (err.value.row, err.value.field) == (1, "chosen")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"shares": (1.0, 0.0)}, "add up to 1"),
        ({"shares": (0.5, 0.3)}, "add up to 1"),
        ({"shares": (0.2, 0.3, 0.5)}, "expected 2 numbers"),
        ({"users_per_group": 0}, "users_per_group must be >= 1"),
        ({"users_per_group": 4}, "group 'harmless' gets 3 of the 6 pairs"),
    ],
)
def test_bad_settings(small, kwargs, message):
    with pytest.raises(ValueError, match=message):
        hh_two_groups(small, **kwargs)


def test_parse_shares():
    assert parse_shares("0.8,0.2") == (0.8, 0.2)
    for text in ("0.5", "a,b", "0.6,0.6"):
        with pytest.raises(ValueError, match="shares"):
            parse_shares(text)


def test_cli(small, tmp_path, capsys):
    out = tmp_path / "two_groups.jsonl"
    argv = ["data", "recipe", "hh-two-groups", small, str(out), "--users-per-group", "1", "--seed", "3"]
    assert prefkit_main(argv) == 0
    printed = capsys.readouterr().out
    assert "contested (the groups disagree): 3 of 6 = 0.500" in printed
    records = load_records(str(out))
    assert len(records) == 6 and {r.user_id for r in records} == {"group:harmless/0", "group:longer/0"}
    assert [r.user_id for r in records] == [r.user_id for r in hh_two_groups(small, users_per_group=1, seed=3).records]
    assert prefkit_main(["data", "recipe", "hh-two-groups", small, str(out), "--shares", "0.9"]) == 2
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"chosen": "x", "rejected": "y"}])
    assert prefkit_main(["data", "recipe", "hh-two-groups", bad, str(out)]) == 1
    assert "bad.jsonl:1" in capsys.readouterr().err


REAL = Path(__file__).resolve().parents[3] / "shared" / "data" / "hh-rlhf" / "harmless-base-test.jsonl.gz"


@pytest.mark.skipif(not REAL.is_file(), reason="needs ../shared/data/hh-rlhf (not part of a fresh clone)")
def test_real_hh_harmless_test_split():
    built = hh_two_groups(REAL, users_per_group=10, seed=0)
    stats = built.stats
    with gzip.open(REAL, "rt") as fh:
        assert stats["rows"] == sum(1 for _ in fh) == 2312
    # 11 pairs have replies of equal length; the human chose the longer reply in 1025 of the other 2301
    assert (stats["ties"], stats["pairs"], stats["contested"]) == (11, 2301, 1276)
    assert stats["contested_share"] == pytest.approx(0.5545, abs=1e-4)
    assert {g: v["pairs"] for g, v in stats["per_group"].items()} == {"harmless": 1150, "longer": 1151}
