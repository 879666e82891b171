"""The front-end extension: syntax of every js file and its pure chart / badge logic, under node."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from tests.nodes.conftest import REPO

NODE = shutil.which("node")
pytestmark = pytest.mark.skipif(NODE is None, reason="node (JavaScript runtime) is not installed")


@pytest.mark.parametrize("name", ["metalora.js", "metalora_chart.js"])
def test_js_syntax(name):
    subprocess.run([NODE, "--check", str(REPO / "js" / name)], check=True)


def test_chart_and_badge_logic():
    out = subprocess.run(
        [NODE, str(REPO / "tests" / "nodes" / "js_chart_check.mjs")], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert "js ok" in out.stdout


def test_icon_is_svg():
    assert (REPO / "js" / "icon.svg").read_text().lstrip().startswith("<svg")
