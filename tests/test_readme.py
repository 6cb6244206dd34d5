"""The README's commands run as written, in order, from a copy of a fresh clone.

Every ``prefkit ...`` and ``python benchmarks/...`` line of the README's bash blocks is run (its ``# comment``
dropped) in a temporary folder holding the repository's ``examples/`` and ``benchmarks/``, with ``../shared``
beside it when this checkout has one (lines that read ``../shared/data`` are skipped otherwise). ``prefkit demo``
runs in CI on its own; the lab studies take minutes each and run under ``pytest -m slow``.
"""

import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import transformers

from prefkit.cli import main

transformers.logging.set_verbosity_error()

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
SLOW = ("prefkit lab study",)
SEPARATE = ("prefkit demo",)  # CI runs it before the tests


def readme_commands() -> list[str]:
    lines, inside = [], False
    for line in (REPO / "README.md").read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            inside = line.strip() == "```bash" and not inside
            continue
        if inside and line.startswith(("prefkit ", "python benchmarks/")):
            command = shlex.join(shlex.split(line, comments=True))
            if not command.startswith(SEPARATE):
                lines.append(command)
    return lines


@pytest.fixture(scope="module")
def clone(tmp_path_factory):
    root = tmp_path_factory.mktemp("readme")
    work = root / "prefkit"
    work.mkdir()
    shutil.copytree(REPO / "examples", work / "examples")
    shutil.copytree(REPO / "benchmarks", work / "benchmarks", ignore=shutil.ignore_patterns("results", "__pycache__"))
    if SHARED.is_dir():
        (root / "shared").symlink_to(SHARED)
    return work


def _run(command: str, clone: Path, monkeypatch) -> None:
    if "../shared/" in command and not (clone.parent / "shared").is_dir():
        pytest.skip("needs ../shared/data")
    monkeypatch.chdir(clone)
    argv = shlex.split(command, comments=True)
    if argv[0] == "python":  # a script: its own process, as a user runs it
        done = subprocess.run([sys.executable, *argv[1:]], cwd=clone, capture_output=True, text=True)
        assert done.returncode == 0, f"{command}\n{done.stderr[-2000:]}"
        return
    assert argv[0] == "prefkit"
    assert main(argv[1:]) == 0, command


def test_the_readme_lists_commands():
    commands = readme_commands()
    assert len(commands) >= 20
    assert any(c.startswith("prefkit train examples/dpo_tiny.yaml") and "--resume" in c for c in commands)


def test_readme_commands_run_in_order(clone, monkeypatch, capsys):
    ran, timings = 0, []
    for command in readme_commands():
        if command.startswith(SLOW):
            continue
        if "../shared/" in command and not (clone.parent / "shared").is_dir():
            continue
        start = time.perf_counter()
        _run(command, clone, monkeypatch)
        capsys.readouterr()
        timings.append(f"{time.perf_counter() - start:6.1f}s  {command}")
        ran += 1
    print("\n".join(timings))  # shown with pytest -s: what the README costs
    assert ran >= 15
    assert (clone / "runs" / "dpo_tiny" / "checkpoint-40").is_dir()  # the --resume line continued the run
    assert (clone / "runs" / "rm_tiny" / "eval" / "report.md").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("command", [c for c in readme_commands() if c.startswith(SLOW)])
def test_readme_lab_studies(command, tmp_path, monkeypatch):
    work = tmp_path / "prefkit"
    shutil.copytree(REPO / "examples", work / "examples")
    _run(command, work, monkeypatch)
