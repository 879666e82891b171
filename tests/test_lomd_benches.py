"""bench/prior.py and bench/distill_memory.py run end to end at smoke size and end with their ratio lines."""

from __future__ import annotations

import pytest

from tests.benches import load_bench as _load


@pytest.mark.slow
def test_prior_bench_quick(capsys):
    assert _load("prior").main(["--quick"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-2].startswith("ratio heldout_distilled_over_seeded ")
    name, value = lines[-1].rsplit(" ", 1)
    assert name == "ratio heldout_meta_over_seeded" and float(value) > 0
    assert any(line.startswith("lora ") for line in lines)


def test_distill_memory_bench_small(capsys):
    assert _load("distill_memory").main(["--few", "1", "--many", "3", "--rank", "2"]) == 0
    name, value = capsys.readouterr().out.strip().splitlines()[-1].rsplit(" ", 1)
    assert name == "ratio peak_rss_3_over_1" and float(value) > 0
