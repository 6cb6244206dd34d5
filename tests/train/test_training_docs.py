"""docs/training.md lists every config key, with the current help strings."""

import dataclasses
import re
from pathlib import Path

from prefkit.train.config import SECTIONS, config_reference_markdown

DOC = Path(__file__).resolve().parents[2] / "docs" / "training.md"


def _block(text, group):
    match = re.search(rf"<!-- keys:{group} -->\n(.*?)\n<!-- /keys:{group} -->", text, re.DOTALL)
    assert match, f"docs/training.md has no keys:{group} block"
    return match.group(1)


def test_prefkit_key_tables_are_current():
    text = DOC.read_text()
    for group in ("model", "data", "loss"):
        assert _block(text, group) == config_reference_markdown(group), (
            f"run `python -m prefkit.train.config docs/training.md` to refresh the {group} table"
        )


def test_every_key_is_documented():
    text = DOC.read_text()
    for _, cls in SECTIONS:
        for f in dataclasses.fields(cls):
            if f.init:
                assert f"| `{f.name}` |" in text, f.name
