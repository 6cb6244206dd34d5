"""The speed benchmarks run end to end at their smoke sizes, their correctness gates included (slow: about
two minutes; the figures themselves come from the full runs recorded in benchmarks/RESULTS.md)."""

import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.mark.slow
@pytest.mark.parametrize("script", ["dpo_speed.py", "grpo_speed.py", "online_dpo_speed.py"])
def test_benchmark_smoke(script):
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), "--smoke"], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "LOSS GATE FAILED" not in proc.stdout and "loss at step" in proc.stdout
