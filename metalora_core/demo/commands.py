"""Run ``metalora`` commands in-process for the demo, so the report's commands are the ones that ran."""

from __future__ import annotations

import io
import json
import shlex
import sys
from contextlib import redirect_stderr, redirect_stdout

from ..errors import MetaLoRAError


def cli(args: list[str], run, record: bool = True) -> dict:
    """Run a ``metalora`` command in-process; its JSON line is returned and the command recorded."""
    from ..cli.main import main

    buffer, errors = io.StringIO(), io.StringIO()
    with redirect_stdout(buffer), redirect_stderr(errors):
        code = main(args)
    for line in errors.getvalue().splitlines():  # the command's own status lines and warnings
        if line.startswith("metalora ") and "error:" not in line and not run.options.get("quiet"):
            print(f"      {line}", file=sys.stderr)
    if code != 0:
        reason = next((ln for ln in errors.getvalue().splitlines() if "error:" in ln), f"exit {code}")
        raise MetaLoRAError(f"{reason} (in `metalora {shlex.join(args)}`)")
    if record:
        run.commands.append("metalora " + shlex.join(args))
    text = buffer.getvalue().strip()
    try:  # one JSON document (possibly indented) ...
        return json.loads(text)
    except ValueError:  # ... or JSON lines among other output: the last one
        lines = [line for line in text.splitlines() if line.startswith("{")]
        return json.loads(lines[-1]) if lines else {}
