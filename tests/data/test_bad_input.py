"""Malformed data: `prefkit data validate` prints one line naming file, row and field and exits 1;
`prefkit train` on the same file exits 2 with one line. Never a traceback, never silent acceptance."""

import gzip
import json
from pathlib import Path

import pytest
import yaml

from prefkit.cli import main
from prefkit.data import load_records
from prefkit.data.formats import split_text_pair

GOOD = {"prompt": "Say hi.", "chosen": "Hi!", "rejected": "No."}


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def _cases(tmp: Path) -> dict[str, tuple[Path, str]]:
    """name -> (file, what its error line must say)."""
    cases = {}
    cases["surrogate"] = (
        _jsonl(tmp / "surrogate.jsonl", [GOOD, '{"prompt": "Hi", "chosen": "ok \\ud800", "rejected": "no"}']),
        ":2: field 'chosen': expected valid Unicode text, got \"a lone surrogate",
    )
    deep = "[" * 100000 + "]" * 100000
    cases["nested"] = (
        _jsonl(tmp / "nested.jsonl", [GOOD, '{"prompt": "a", "chosen": "b", "rejected": ' + deep + "}"]),
        ":2: expected JSON nested at most a few hundred levels deep",
    )
    body = gzip.compress(("".join(json.dumps(GOOD) + "\n" for _ in range(200))).encode())
    broken = bytearray(body)
    broken[len(broken) // 2 : len(broken) // 2 + 20] = b"\xff" * 20
    (tmp / "corrupt.jsonl.gz").write_bytes(bytes(broken))
    cases["gzip"] = (tmp / "corrupt.jsonl.gz", "expected a valid gzip file, got 'a corrupt or truncated gzip stream'")
    raw = (json.dumps(GOOD) + "\n").encode() * 2 + b'{"prompt": "x", "chosen": "caf\xe9", "rejected": "b"}\n'
    (tmp / "latin1.jsonl").write_bytes(raw)
    cases["non_utf8"] = (
        tmp / "latin1.jsonl",
        "latin1.jsonl:3: expected UTF-8 text, got 'bytes that are not UTF-8 at column 31'",
    )
    cases["ranked_duplicate"] = (
        _jsonl(tmp / "dup.jsonl", [{"prompt": "p", "completions": ["a", "b", "a"], "scores": [1.0, 0.5, 0.2]}]),
        ":1: field 'completions[2]': expected one score per distinct text: it repeats completions[0]",
    )
    cases["float32"] = (
        _jsonl(tmp / "big.jsonl", [GOOD, {**GOOD, "weight": 1e39}]),
        ":2: field 'weight': expected a number finite in float32",
    )
    (tmp / "empty_folder").mkdir()
    (tmp / "empty_folder" / "notes.md").write_text("nothing here")
    cases["empty_folder"] = (tmp / "empty_folder", "got 'a folder with no data files'")
    return cases


NAMES = ["surrogate", "nested", "gzip", "non_utf8", "ranked_duplicate", "float32", "empty_folder"]


@pytest.mark.parametrize("name", NAMES)
def test_validate_names_the_row_and_exits_1(tmp_path, capsys, name):
    path, message = _cases(tmp_path)[name]
    assert main(["data", "validate", str(path)]) == 1
    out, err = capsys.readouterr()
    assert message in out, out
    assert "Traceback" not in out + err


@pytest.mark.parametrize("name", NAMES)
def test_train_stops_with_one_line_and_exit_2(tmp_path, capsys, name):
    path, message = _cases(tmp_path)[name]
    loss = "bt" if name == "ranked_duplicate" else "dpo"
    cfg = tmp_path / "c.yaml"
    config = {"train_file": str(path), "loss": loss, "max_steps": 1, "output_dir": str(tmp_path / "run")}
    if loss == "bt":
        config["loss"] = "listmle"
    cfg.write_text(yaml.safe_dump(config))
    assert main(["train", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("prefkit train: error: ") and err.count("\n") == 1, err
    assert message in err, err


def test_tied_scores_with_listmle_are_named_before_training(tmp_path, capsys):
    path = _jsonl(
        tmp_path / "tied.jsonl",
        [
            {"prompt": "p", "completions": ["a", "b", "c"], "scores": [3.0, 2.0, 1.0]},
            {"prompt": "q", "completions": ["a", "b", "c"], "scores": [1.0, 1.0, 1.0]},
        ],
    )
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"train_file": str(path), "loss": "listmle", "output_dir": str(tmp_path / "r")}))
    assert main(["train", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "tied.jsonl:2: field 'scores': expected distinct scores: loss listmle" in err and err.count("\n") == 1
    assert main(["data", "validate", str(path)]) == 0  # ties are valid data (ranknet trains on them)


def test_a_byte_order_mark_in_jsonl_is_accepted(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + (json.dumps(GOOD) + "\n").encode() * 2)
    records = load_records(str(path))
    assert len(records) == 2 and records[0].prompt == "Say hi."
    gz = tmp_path / "bom.jsonl.gz"
    gz.write_bytes(gzip.compress(b"\xef\xbb\xbf" + (json.dumps(GOOD) + "\n").encode()))
    assert load_records(str(gz))[0].prompt == "Say hi."


def test_trl_implicit_prompt_pairs_of_plain_strings(tmp_path):
    rows = [
        {"chosen": "Q: what is 2+2? A: 4", "rejected": "Q: what is 2+2? A: 5"},
        {"chosen": "The sky is blue today.", "rejected": "The sky is green today."},
    ]
    records = load_records(rows)
    assert (records[0].prompt, records[0].chosen, records[0].rejected) == ("Q: what is 2+2? A:", " 4", " 5")
    assert (records[1].prompt, records[1].chosen, records[1].rejected) == (
        "The sky is",
        " blue today.",
        " green today.",
    )
    assert split_text_pair("a b", "a c") == ("a", " b", " c")
    with pytest.raises(Exception, match="begin with the same prompt"):
        load_records([{"chosen": "yes", "rejected": "no"}])
