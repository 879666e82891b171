"""MetaLoRATrainIdentity.execute in this process, under inference mode as ComfyUI runs nodes.

A stand-in PromptServer records the ``metalora.train_progress`` events and can press Cancel at a given
step; the VAE is a fixed linear 8x8 patch encoder (the node only calls ``vae.encode``). The server tests
(tests/comfyui) run the same node in a real ComfyUI.
"""

from __future__ import annotations

import sys
import types

import pytest
import torch

from metalora_core.adapter import AdapterShape
from metalora_core.dev.random_assets import random_lomd
from metalora_core.formats import IdentityAdapter
from tests.comfyui.train.helpers import TRAIN_SETTINGS
from tests.comfyui.workflows import PERSONALIZE


class PatchVAE:
    """(N, H, W, 3) in [0, 1] -> (N, 16, H/8, W/8): a fixed random linear map of each 8x8 patch."""

    def __init__(self) -> None:
        self.proj = torch.randn(16, 3 * 64, generator=torch.Generator().manual_seed(0)) / 14

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        n, h, w, _ = pixels.shape
        patches = pixels.movedim(-1, 1).unfold(2, 8, 8).unfold(3, 8, 8)  # n, 3, h/8, w/8, 8, 8
        patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(n, h // 8, w // 8, 3 * 64)
        return (patches @ self.proj.T).permute(0, 3, 1, 2)


class FakeServer:
    def __init__(self, comfy, cancel_at: int | None = None) -> None:
        self.events: list[tuple[str, dict]] = []
        self.comfy, self.cancel_at = comfy, cancel_at

    def send_sync(self, event: str, data: dict) -> None:
        self.events.append((event, data))
        if self.cancel_at is not None and data["step"] == self.cancel_at:
            self.comfy.model_management.interrupt_current_processing(True)  # the Cancel button


@pytest.fixture
def server(monkeypatch, comfy):
    fake = FakeServer(comfy)
    module = types.ModuleType("server")
    module.PromptServer = types.SimpleNamespace(instance=fake)
    monkeypatch.setitem(sys.modules, "server", module)
    return fake


@pytest.fixture(scope="module")
def node(comfy, pack):
    pack("comfy_folders.model_folders").register_model_folders()  # as the pack's entry point does on start-up
    return pack("train_identity").MetaLoRATrainIdentity


@pytest.fixture(scope="module")
def flux32(load, tiny_bfl):
    return load(tiny_bfl, torch.float32)


@pytest.fixture(scope="module")
def inputs(tiny_bfl):
    g = torch.Generator().manual_seed(3)
    with torch.inference_mode():
        positive = [[torch.randn(1, 8, 64, generator=g), {"pooled_output": torch.randn(1, 32, generator=g)}]]
        image = torch.rand(1, 300, 220, 3, generator=g)
    return {
        "vae": PatchVAE(),
        "positive": positive,
        "image": image,
        "lomd": random_lomd(tiny_bfl, AdapterShape(4, 8), "attn_mlp", seed=1),
    }


def _run(node, model, inputs, steps=3, **overrides):
    settings = {**TRAIN_SETTINGS, "steps": steps, **overrides}
    with torch.inference_mode():  # how ComfyUI's executor calls every node
        return node.execute(model=model, **inputs, **settings)


def _snapshot(patcher):
    return repr(patcher.model_options), {k: v.clone() for k, v in patcher.model.state_dict().items()}


def _unchanged(patcher, before) -> bool:
    options, weights = before
    now = patcher.model.state_dict()
    return repr(patcher.model_options) == options and all(torch.equal(now[k], v) for k, v in weights.items())


def test_trains_an_identity_and_reports_progress(comfy, node, flux32, inputs, server):
    before = _snapshot(flux32)
    out = _run(node, flux32, inputs)
    adapter, losses = out.args
    assert isinstance(adapter, IdentityAdapter) and adapter.shape.rank_mid == 8
    assert max(float(u.abs().max()) for u in adapter.ups.values()) > 0  # Up moved off zero
    assert adapter.training["steps_done"] == 3 and adapter.training["trainer"] == "comfyui"
    w, h = adapter.training["view_size"]
    assert w < h and w * h <= 256 * 256 and w % 64 == h % 64 == 0  # the portrait photo's bucket
    assert list(losses) == ["loss"] and len(losses["loss"]) == 3
    assert [e for e, _ in server.events] == ["metalora.train_progress"] * 3
    assert [d["step"] for _, d in server.events] == [1, 2, 3]
    assert set(server.events[0][1]) == {"node", "step", "total", "loss", "lr", "eta_s"}
    assert [d["loss"] for _, d in server.events] == losses["loss"]
    assert _unchanged(flux32, before) and not comfy.model_management.in_training


def test_same_seed_same_identity(node, flux32, inputs, server):
    a = _run(node, flux32, inputs, steps=2).args[0]
    b = _run(node, flux32, inputs, steps=2).args[0]
    assert all(torch.equal(a.ups[k], b.ups[k]) for k in a.ups)


def test_cancel_stops_before_the_next_step(comfy, node, flux32, inputs, server):
    server.cancel_at = 2
    before = _snapshot(flux32)
    with pytest.raises(comfy.model_management.InterruptProcessingException):
        _run(node, flux32, inputs, steps=50)
    assert [d["step"] for _, d in server.events] == [1, 2]  # stopped within one step of the press
    assert not comfy.model_management.processing_interrupted()  # the flag is consumed, as ComfyUI expects
    assert _unchanged(flux32, before) and not comfy.model_management.in_training


@pytest.mark.parametrize(
    "override, match",
    [
        ({"image": torch.rand(2, 64, 64, 3)}, "ONE photo"),
        ({"positive": [[torch.randn(1, 8, 4096), {}]]}, "DualCLIPLoader"),
    ],
)
def test_bad_inputs_are_named(node, flux32, inputs, server, override, match):
    from metalora_core.errors import MetaLoRAError

    with pytest.raises(MetaLoRAError, match=match):
        _run(node, flux32, {**inputs, **override})


def test_example_workflow_matches_the_node(node):
    """The example's Train Identity widgets are the node's widget inputs, in order, at their defaults (with the
    front end's control_after_generate value right after each input that declares one)."""
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[3] / "example_workflows" / f"{PERSONALIZE}.json"
    workflow = json.loads(path.read_text())
    (train,) = [n for n in workflow["nodes"] if n["type"] == "MetaLoRATrainIdentity"]
    schema = node.define_schema()
    widgets = [i for i in schema.inputs if i.get_io_type() in ("INT", "FLOAT", "BOOLEAN", "COMBO")]
    expected = []
    for i in widgets:
        expected.append(i.default)
        if getattr(i, "control_after_generate", None):
            expected.append(str(i.control_after_generate.value))
    assert "fixed" in expected  # the seed keeps its value between runs (a new seed would retrain)
    assert expected == train["widgets_values"]
    sockets = {i.id for i in schema.inputs} - {i.id for i in widgets}
    linked = {i["name"] for i in train["inputs"] if i["link"] is not None}
    assert sockets <= linked  # every socket input is wired
    assert path.with_suffix(".jpg").stat().st_size < 50_000
