"""``metalora demo``: every stage of the product on an embedded default (tiny models, a packaged photo),
or on real weights when given. See :func:`run_demo` and :mod:`.report`."""

from .pipeline import DemoOptions, DemoRun, run_demo

__all__ = ["DemoOptions", "DemoRun", "run_demo"]
