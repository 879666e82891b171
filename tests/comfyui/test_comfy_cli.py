"""Headless: each example workflow through comfy-cli (``comfy run --workflow <file> --wait``) against a running
server, the route docs/comfyui.md documents. comfy-cli converts the UI-format file itself (from /object_info);
its conversion must equal the front end's, the unmodified file must fail only on missing model files, and the
converted prompt with the tiny FLUX (Qwen-Image example: the tiny Qwen-Image) substituted must run to completion
through ``comfy run --wait``."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid

import pytest

from tests.comfyui.workflows import ALL, EXAMPLES, FILE_INPUTS, QWEN_IMAGE, on_tiny_model

pytestmark = pytest.mark.skipif(
    shutil.which("comfy") is None, reason="needs comfy-cli (pip install comfy-cli)"
)


def comfy_cli(comfy, home, *args: str, timeout: float = 600) -> tuple[int, dict]:
    """``comfy run ...`` against the test server; returns the exit code and comfy-cli's JSON envelope."""
    cmd = ["comfy", "--skip-prompt", "--no-enable-telemetry", "run", "--host", "127.0.0.1"]
    cmd += ["--port", str(comfy.port), *args]
    env = dict(os.environ, HOME=str(home), COMFY_NO_WATCH="1")  # its config goes to a temporary home
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    assert lines, (done.returncode, done.stdout[-2000:], done.stderr[-2000:])
    return done.returncode, json.loads(lines[-1])


def _strip(prompt: dict) -> dict:
    return {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in prompt.items()}


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    return tmp_path_factory.mktemp("comfy_cli_home")


@pytest.mark.parametrize("name", ALL)
def test_comfy_cli_converts_like_the_front_end(comfy, home, opened, name):
    rc, envelope = comfy_cli(comfy, home, "--workflow", str(EXAMPLES / f"{name}.json"), "--print-prompt")
    assert rc == 0 and envelope["ok"], envelope
    assert _strip(envelope["data"]["prompt"]) == _strip(opened["workflows"][name]["prompt"])


@pytest.mark.parametrize("name", ALL)
def test_comfy_cli_run_fails_only_on_missing_models(comfy, home, name):
    rc, envelope = comfy_cli(comfy, home, "--workflow", str(EXAMPLES / f"{name}.json"), "--wait")
    assert rc != 0 and not envelope["ok"]
    errors = envelope["error"]["details"]["errors"]
    assert errors and all(e["field"] in FILE_INPUTS for e in errors), errors


@pytest.mark.parametrize("name", ALL)
def test_comfy_cli_runs_each_workflow_on_the_tiny_flux(comfy, comfy_base, home, tmp_path, request, name):
    if name in QWEN_IMAGE:
        request.getfixturevalue("tiny_qwen_image")
    rc, envelope = comfy_cli(comfy, home, "--workflow", str(EXAMPLES / f"{name}.json"), "--print-prompt")
    assert rc == 0, envelope
    tag = uuid.uuid4().hex[:8]
    api = tmp_path / "api.json"
    api.write_text(json.dumps(on_tiny_model(envelope["data"]["prompt"], tag)))
    rc, envelope = comfy_cli(comfy, home, "--workflow", str(api), "--wait", "--timeout", "600")
    assert rc == 0 and envelope["ok"], envelope
    # an identity (workflows 1, 5, 6), LoRAs (3, 5, 6), images (1, 2, 4, 6)
    saved = list((comfy_base / "models").rglob(f"*_{tag}.safetensors"))
    saved += (comfy_base / "output").rglob(f"*_{tag}_*.png")
    assert saved, envelope
    if name in QWEN_IMAGE:  # the Qwen-Image personalize example: its identity, its LoRA and its image
        assert {p.parent.name for p in saved} >= {"metalora", "loras"} and len(saved) == 3, saved
