"""Stage bookkeeping for the demo: one progress line per stage, wall and CPU seconds of each.

Why CPU seconds too: on a shared machine wall time measures the neighbours; the process's own CPU time
(all threads) says what the work itself cost.
"""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field


@dataclass
class StageTime:
    name: str
    wall_s: float
    cpu_s: float


@dataclass
class Stages:
    """``with stages.run("building tiny models"):`` prints ``[1/8] building tiny models ...`` and times it."""

    total: int
    quiet: bool = False
    times: list[StageTime] = field(default_factory=list)

    @contextmanager
    def run(self, title: str):
        index = len(self.times) + 1
        self._say(f"[{index}/{self.total}] {title} ...")
        wall, cpu = time.perf_counter(), time.process_time()
        yield
        took = StageTime(title, time.perf_counter() - wall, time.process_time() - cpu)
        self.times.append(took)
        self._say(f"[{index}/{self.total}] {title}: done in {took.wall_s:.1f} s (CPU {took.cpu_s:.1f} s)")

    def note(self, text: str) -> None:
        self._say(f"      {text}")

    def _say(self, text: str) -> None:
        if not self.quiet:
            print(f"metalora demo: {text}", file=sys.stderr, flush=True)

    def to_list(self) -> list[dict]:
        return [asdict(t) for t in self.times]
