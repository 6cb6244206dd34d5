"""Marked sections of a Markdown results file, shared by the benchmark scripts.

A section is the text from ``<!-- MARKER -->`` to ``<!-- /MARKER -->`` (markers included), e.g.
``<!-- rm_real:tiny -->`` ... ``<!-- /rm_real:tiny -->``. A script regenerates its own section
and leaves the rest of the file alone.
"""

from __future__ import annotations

import re
from pathlib import Path


def section(marker: str, body: str) -> str:
    """``body`` wrapped in the opening and closing ``marker`` comments."""
    return f"<!-- {marker} -->\n{body.strip(chr(10))}\n<!-- /{marker} -->"


def write_section(path: Path, marker: str, text: str) -> None:
    """Replace the section marked ``marker`` in ``path`` with ``text`` (which carries the markers), or
    append it; a missing file is created with a title."""
    old = path.read_text() if path.exists() else "# Benchmark results\n"
    m = re.escape(marker)
    pattern = re.compile(rf"<!-- {m} -->.*?<!-- /{m} -->", re.DOTALL)
    if pattern.search(old):
        new = pattern.sub(lambda _: text, old)
    else:
        new = old.rstrip("\n") + "\n\n" + text + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(new)
