"""The ``prefkit data validate|stats|convert`` commands, run through ``prefkit.cli.main``.

The full CLI imports every subcommand module; so that these tests do not depend on the other
packages being written, the `cli` fixture assembles ``prefkit.cli`` with the data commands only
(the same `build_parser`/`main` code path). `test_full_cli_has_data_commands` checks the real
assembly and skips while another subcommand module is still missing.
"""

import json
import os

import pytest

import prefkit.cli
from prefkit.data import RankedRecord, RatedRecord, UnpairedRecord, load_records, write_records
from prefkit.models.tiny import build_byte_tokenizer


@pytest.fixture
def cli(monkeypatch):
    data_commands = [c for c in prefkit.cli.COMMANDS if c[0][0] == "data"]
    assert {c[0][1] for c in data_commands} == {"validate", "stats", "convert", "recipe"}
    monkeypatch.setattr(prefkit.cli, "COMMANDS", data_commands)
    return prefkit.cli.main


def jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


GOOD = [
    {"prompt": "Hello", "chosen": "Hi!", "rejected": "Go away.", "user_id": "u1", "weight": 1.0},
    {"prompt": "Add 2+2", "chosen": "4", "rejected": "22", "user_id": "u2", "weight": 3.0},
    {"prompt": "Hello", "chosen": "Hey", "rejected": "...", "user_id": "u1", "weight": 2.0},
]


def test_full_cli_has_data_commands(capsys):
    try:
        parser = prefkit.cli.build_parser()
    except ModuleNotFoundError as exc:
        pytest.skip(f"another subcommand module is not written yet: {exc}")
    args = parser.parse_args(["data", "validate", "x.jsonl", "--kind", "pairwise"])
    assert args.file == "x.jsonl" and args.kind == "pairwise"


# ---- validate -----------------------------------------------------------------------------------
def test_validate_good_file(cli, tmp_path, capsys):
    path = jsonl(tmp_path / "good.jsonl", GOOD)
    assert cli(["data", "validate", path]) == 0
    assert capsys.readouterr().out.strip() == f"{path}: all 3 rows are valid pairwise records"


def test_validate_prints_every_bad_row_and_writes_nothing(cli, tmp_path, capsys):
    rows = GOOD + [
        {"prompt": "", "chosen": "a", "rejected": "b"},
        {"prompt": "p", "chosen": "same", "rejected": "same", "weight": -2},
        {"prompt": "p", "chosen": "a", "rejected": "b", "margin": "big"},
    ]
    path = jsonl(tmp_path / "bad.jsonl", rows)
    (tmp_path / "bad.jsonl").open("a").write("{oops\n")
    before = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    assert cli(["data", "validate", path]) == 1
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[:-1] == [
        f"{path}:4: field 'prompt': expected non-empty text, got ''",
        f"{path}:5: field 'rejected': expected a text different from 'chosen', got 'the same text'",
        f"{path}:5: field 'weight': expected a number >= 0, got -2",
        f"{path}:6: field 'margin': expected a finite number, got 'big'",
        f"{path}:7: expected one JSON object per line "
        "(invalid JSON: Expecting property name enclosed in double quotes at column 2)",
    ]
    assert lines[-1] == f"{path}: 4 of 7 rows are bad (5 problems); kind pairwise"
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == before


def test_validate_with_map_and_kind(cli, tmp_path, capsys):
    path = jsonl(tmp_path / "m.jsonl", [{"q": "p", "a": "x", "good": 1}, {"q": "p", "a": "y", "good": "no"}])
    assert cli(["data", "validate", path, "--map", "prompt=q", "completion=a", "--map", "label=good"]) == 1
    out = capsys.readouterr().out
    assert f"{path}:2: field 'label': expected a boolean" in out and "1 of 2 rows are bad" in out
    assert cli(["data", "validate", path, "--map", "prompt=q,completion=a", "--kind", "rated"]) == 1
    out = capsys.readouterr().out
    assert "field 'ratings': expected a column 'ratings'" in out and "could not be checked" in out


def test_validate_file_level_problems(cli, tmp_path, capsys):
    assert cli(["data", "validate", str(tmp_path / "missing.jsonl")]) == 1
    assert "no such path" in capsys.readouterr().out
    assert cli(["data", "validate", "x.jsonl", "--map", "chosen"]) == 2
    assert "expected target=source" in capsys.readouterr().err


# ---- stats --------------------------------------------------------------------------------------
def test_stats_counts_and_byte_token_lengths(cli, tmp_path, capsys):
    path = jsonl(tmp_path / "s.jsonl", GOOD)
    assert cli(["data", "stats", path, "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert (stats["kind"], stats["rows"], stats["prompts"], stats["users"]) == ("pairwise", 3, 2, 2)
    assert stats["numbers"]["weight"] == {"n": 3, "mean": 2.0, "min": 1.0, "max": 3.0}
    assert stats["fields"] == {"user_id": 3, "weight": 3}
    prompt = stats["tokens"]["prompt"]  # byte lengths 5, 7, 5
    assert (prompt["p50"], prompt["max"], prompt["n"]) == (5.0, 7, 3)
    assert prompt["p90"] == pytest.approx(6.6)
    assert stats["tokens"]["rejected"]["max"] == len("Go away.")
    assert cli(["data", "stats", path]) == 0
    text = capsys.readouterr().out
    assert "kind: pairwise   rows: 3" in text and "users: 2 distinct" in text and "prompt" in text and "p99" in text


def test_stats_chat_records_use_the_chat_template_and_a_tokenizer_path(cli, tmp_path, capsys):
    user = {"role": "user", "content": "hi"}
    rows = [
        {"prompt": [user], "completion": [{"role": "assistant", "content": "hello"}], "label": True},
        {"prompt": [user], "completion": [{"role": "assistant", "content": "no"}], "label": 0},
    ]
    path = jsonl(tmp_path / "c.jsonl", rows)
    build_byte_tokenizer().save_pretrained(tmp_path / "tok")
    assert cli(["data", "stats", path, "--json", "--tokenizer", str(tmp_path / "tok")]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["labels"] == {"true": 1, "false": 1} and stats["text_format"] == {"plain": 0, "chat": 2}
    assert stats["tokenizer"] == str(tmp_path / "tok")
    # "<|user|>\nhi</s>\n<|assistant|>\n" = 9 + 2 + 1 (</s>) + 1 + 14 bytes/tokens; completion "hello</s>\n"
    assert stats["tokens"]["prompt"]["max"] == 27
    assert stats["tokens"]["completion"]["max"] == 7


def test_stats_kind_specific_counts(cli, tmp_path, capsys):
    path = tmp_path / "r.jsonl"
    write_records(
        [
            RankedRecord("p", ["a", "bb", "ccc"], scores=[1.0, 2.0, 0.0]),
            RankedRecord("q", ["x", "y"], ranking=[1, 0]),
        ],
        path,
    )
    assert cli(["data", "stats", str(path), "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["ranked_by"] == {"ranking": 1, "scores": 1}
    assert stats["completions_per_row"] == {"n": 2, "mean": 2.5, "min": 2.0, "max": 3.0}
    assert stats["tokens"]["completions"]["n"] == 5


def test_stats_bad_file_and_bad_tokenizer(cli, tmp_path, capsys):
    path = jsonl(tmp_path / "b.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "a"}])
    assert cli(["data", "stats", path]) == 1
    assert "expected a text different from 'chosen'" in capsys.readouterr().err
    good = jsonl(tmp_path / "g.jsonl", GOOD)
    assert cli(["data", "stats", good, "--tokenizer", str(tmp_path / "no-such-tokenizer")]) == 1
    assert "cannot load tokenizer" in capsys.readouterr().err


# ---- convert ------------------------------------------------------------------------------------
def test_convert_ranked_jsonl_to_pairwise_parquet(cli, tmp_path, capsys):
    src = tmp_path / "ranked.jsonl"
    write_records([RankedRecord("p", ["a", "b", "c"], ranking=[2, 0, 1], id="q")], src)
    out = tmp_path / "pairs.parquet"
    assert cli(["data", "convert", str(src), str(out), "--to", "pairwise", "--mode", "adjacent"]) == 0
    assert capsys.readouterr().out.strip() == f"wrote 2 pairwise records to {out} (from 1 ranked records in {src})"
    assert [(r.chosen, r.rejected, r.id) for r in load_records(str(out))] == [
        ("c", "a", "q:2>0"),
        ("a", "b", "q:0>1"),
    ]


def test_convert_scored_lists_to_reward_augmented_pairs(cli, tmp_path, capsys):
    src = tmp_path / "ranked.jsonl"
    write_records([RankedRecord("p", ["a", "b"], scores=[2.0, 1.0], id="q")], src)
    out = tmp_path / "pairs.jsonl"
    assert cli(["data", "convert", str(src), str(out), "--to", "pairwise", "--reward-augmented"]) == 0
    pairs = load_records(str(out))
    assert [(r.prompt, r.chosen, r.rejected) for r in pairs] == [
        ("Write a response that would be rated 2.\n\np", "a", "b"),
        ("Write a response that would be rated 1.\n\np", "b", "a"),
    ]
    capsys.readouterr()
    assert cli(["data", "convert", str(src), str(out), "--reward-augmented"]) == 2
    assert "reward_augmented do not apply to ranked records" in capsys.readouterr().err


def test_convert_rated_with_weights_and_min_gap(cli, tmp_path, capsys):
    src = tmp_path / "rated.csv"
    write_records(
        [
            RatedRecord("p", "a", {"h": 4.0, "s": 0.0}),
            RatedRecord("p", "b", {"h": 1.0, "s": 2.0}),
            RatedRecord("p", "c", {"h": 3.0, "s": 0.0}),
        ],
        src,
    )
    out = tmp_path / "pairs.jsonl"
    assert (
        cli(
            [
                "data",
                "convert",
                str(src),
                str(out),
                "--to",
                "pairwise",
                "--weights",
                "h=1,s=0.5",
                "--min-gap",
                "0.5",
            ]
        )
        == 0
    )
    capsys.readouterr()  # scores a 4, b 2, c 3
    assert [(r.chosen, r.rejected, r.margin) for r in load_records(str(out))] == [
        ("a", "b", 2.0),
        ("a", "c", 1.0),
        ("c", "b", 1.0),
    ]
    assert (
        cli(
            [
                "data",
                "convert",
                str(src),
                str(out),
                "--to",
                "pairwise",
                "--weights",
                "h=1,s=0.5",
                "--min-gap",
                "1",
            ]
        )
        == 0
    )
    assert [(r.chosen, r.rejected) for r in load_records(str(out))] == [("a", "b")]  # a gap must exceed --min-gap
    assert cli(["data", "convert", str(src), str(out), "--to", "pairwise", "--weights", "h=x"]) == 2
    assert "bad weight 'h=x'" in capsys.readouterr().err
    assert (
        cli(
            [
                "data",
                "convert",
                str(src),
                str(tmp_path / "none.jsonl"),
                "--to",
                "pairwise",
                "--attribute",
                "h",
                "--min-gap",
                "10",
            ]
        )
        == 1
    )
    assert "produced no records" in capsys.readouterr().err and not (tmp_path / "none.jsonl").exists()


def test_convert_pairwise_to_unpaired_csv_and_format_only(cli, tmp_path, capsys):
    src = jsonl(tmp_path / "p.jsonl", GOOD)
    out = tmp_path / "u.csv"
    assert cli(["data", "convert", src, str(out), "--to", "unpaired"]) == 0
    records = load_records(str(out))
    assert len(records) == 6 and records[0] == UnpairedRecord("Hello", "Hi!", True, user_id="u1", weight=1.0)
    same = tmp_path / "p.json.gz"
    assert cli(["data", "convert", src, str(same)]) == 0
    assert load_records(str(same)) == load_records(src)
    capsys.readouterr()
    assert cli(["data", "convert", src, str(tmp_path / "x.jsonl"), "--mode", "adjacent"]) == 2
    assert "mode do not apply to a format-only conversion" in capsys.readouterr().err


def test_convert_refuses_bad_input_and_writes_nothing(cli, tmp_path, capsys):
    src = jsonl(tmp_path / "bad.jsonl", GOOD + [{"prompt": "p", "chosen": "a"}])
    out = tmp_path / "out.jsonl"
    assert cli(["data", "convert", src, str(out), "--to", "unpaired"]) == 1
    err = capsys.readouterr().err
    assert f"{src}:4: field 'rejected'" in err and "prefkit data validate" in err
    assert not out.exists()
    assert cli(["data", "convert", src, str(out), "--to", "unpaired", "--kind", "ranked"]) == 1
    assert not out.exists() and sorted(os.listdir(tmp_path)) == ["bad.jsonl"]
