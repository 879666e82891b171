"""bench/train_step.py runs end to end (at a tiny width here) and ends with its ratio line."""

from __future__ import annotations

import importlib.util
from pathlib import Path


def test_bench_runs_tiny(capsys):
    path = Path(__file__).resolve().parents[2] / "bench" / "train_step.py"
    spec = importlib.util.spec_from_file_location("train_step_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--hidden", "128", "--image-tokens", "16", "--text-tokens", "8", "--iters", "1"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert sum(line.startswith("| (") for line in lines) == 4
    name, value = lines[-1].rsplit(" ", 1)
    assert name == "ratio meta_over_floor" and float(value) > 0
