"""bench/meta_train.py runs end to end (a few steps) and ends with its ratio line."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest


@pytest.mark.slow
def test_meta_bench_runs_tiny(capsys):
    path = Path(__file__).resolve().parents[2] / "bench" / "meta_train.py"
    spec = importlib.util.spec_from_file_location("meta_train_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--identities", "4", "--images", "2", "--steps", "2", "--batch", "2"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert sum(line.startswith("| 1 |") or line.startswith("| 2 |") for line in lines) == 2
    name, value = lines[-1].rsplit(" ", 1)
    assert name == "ratio scaling_efficiency" and float(value) > 0
