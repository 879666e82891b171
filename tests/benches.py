"""Load a script of bench/ as a module (the benches are scripts, not a package), for their smoke tests."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

BENCH = Path(__file__).resolve().parents[1] / "bench"


def load_bench(name: str, alias: str | None = None) -> ModuleType:
    """``bench/<name>.py`` imported fresh under ``alias`` (default ``<name>_bench``)."""
    spec = importlib.util.spec_from_file_location(alias or f"{name}_bench", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
