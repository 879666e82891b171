"""Nothing the pack imports reaches for the network: albumentations' update check is switched off first."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
GUARD = """
import socket
tried = []
def refuse(self, address, *args):
    tried.append(address)
    raise OSError("no network in this test")
socket.socket.connect = refuse
"""


def _connections(code: str) -> int:
    env = {k: v for k, v in os.environ.items() if k != "NO_ALBUMENTATIONS_UPDATE"}
    out = subprocess.run(
        [sys.executable, "-c", GUARD + code + "\nprint('TRIED', len(tried))"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    return int(out.stdout.strip().splitlines()[-1].split()[-1])


def test_the_guard_sees_albumentations_own_update_check():
    assert _connections("import albumentations") >= 1  # without the switch it asks PyPI at import


def test_the_augmentation_pipeline_imports_albumentations_offline():
    code = (
        "from metalora_core.training.data import AugmentConfig, photometric\nphotometric(AugmentConfig(), 0)"
    )
    assert _connections(code) == 0
