"""bench/meta_train.py runs end to end (a few steps, as users run it) and ends with its ratio line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
def test_meta_bench_runs_tiny():
    root = Path(__file__).resolve().parents[2]
    args = ["--identities", "4", "--images", "2", "--steps", "2", "--batch", "2"]
    done = subprocess.run(
        [sys.executable, str(root / "bench" / "meta_train.py"), *args],
        capture_output=True,
        text=True,
        cwd=root,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.strip().splitlines()
    assert [line.split(" |")[0] for line in lines if line.startswith("| 1 ") or line.startswith("| 2 ")] == [
        "| 1",
        "| 2",
    ]
    name, value = lines[-1].rsplit(" ", 1)
    assert name == "ratio scaling_efficiency" and float(value) > 0
