"""A meta-train process killed with SIGKILL resumes from its last checkpoint and ends exactly where an
uninterrupted run ends."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from metalora_core.cli.main import main
from metalora_core.formats import load_lomd
from metalora_core.safeio import load_tensors


@pytest.mark.slow
def test_resume_after_sigkill(meta_assets, tmp_path):
    args = ["meta-train", "--flux", str(meta_assets["flux"]), "--vae", str(meta_assets["vae"])]
    args += ["--conditioning", str(meta_assets["cond"]), "--data", str(meta_assets["data"])]
    args += [
        "--resolution",
        "128",
        "--max-aspect-error",
        "0.5",
        "--identities-per-batch",
        "2",
        "--lr",
        "3e-3",
    ]
    args += ["--warmup", "1", "--rank-mid", "4", "--cache-dir", str(tmp_path / "cache"), "--quiet"]
    killed = tmp_path / "killed.safetensors"
    ckpt = killed.with_suffix(".ckpt.safetensors")
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join(
            filter(None, [str(Path(__file__).parents[2]), os.environ.get("PYTHONPATH")])
        ),
    }
    cmd = [sys.executable, "-m", "metalora_core", *args, "--out", str(killed), "--steps", "500"]
    proc = subprocess.Popen([*cmd, "--checkpoint-every", "2"], env=env, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 180
        while not ckpt.is_file() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert ckpt.is_file(), proc.stderr.read().decode()[-2000:] if proc.poll() is not None else "timeout"
        time.sleep(1.0)  # let it train on past the first checkpoint
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL and not killed.exists()
    step = int(load_tensors(ckpt)[1]["step"])
    assert step >= 2 and step % 2 == 0
    total = step + 2
    resumed, straight = tmp_path / "resumed.safetensors", tmp_path / "straight.safetensors"
    assert main([*args, "--out", str(resumed), "--steps", str(total), "--resume", str(ckpt)]) == 0
    assert main([*args, "--out", str(straight), "--steps", str(total)]) == 0
    a, b = load_lomd(resumed), load_lomd(straight)
    for n in a.downs:
        assert torch.equal(a.downs[n], b.downs[n]), n
