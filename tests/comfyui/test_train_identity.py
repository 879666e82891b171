"""Train Identity in a real ComfyUI on the tiny FLUX: a graph trains, applies and samples (and the result
differs from the unpatched model's), the loss reaches ComfyUI's own Plot Loss Graph, progress events reach
the front-end, and /interrupt stops training within a step, leaving the model unpatched and no file behind.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid

import pytest
import torch

from tests.comfyui.graphs import TINY_COND, loaders, probe, probe_output, sampler, saved_latent
from tests.comfyui.harness import node
from tests.comfyui.train.helpers import TRAIN_SETTINGS


def _tag(name: str) -> str:
    return f"{name}_{uuid.uuid4().hex[:8]}"


def train(steps: int, resolution: int = 256, seed: int = 0) -> dict:
    """Test VAE + conditioning + a photo from input/ -> MetaLoRATrainIdentity (node id "train")."""
    return {
        "vae": node("MetaLoRATestVAE", seed=0),
        "cond": node("MetaLoRATestConditioning", seed=1, tokens=8, **TINY_COND),
        "photo": node("LoadImage", image="face_a.png"),
        "train": node(
            "MetaLoRATrainIdentity",
            model=["unet", 0],
            vae=["vae", 0],
            positive=["cond", 0],
            image=["photo", 0],
            lomd=["lomd", 0],
            **{**TRAIN_SETTINGS, "steps": steps, "seed": seed, "resolution": resolution},
        ),
    }


class EventListener:
    """Collects the server's websocket messages (ComfyUI broadcasts ``send_sync`` events to every client)."""

    def __init__(self, url: str, client_id: str) -> None:
        import aiohttp  # ComfyUI's own dependency, so present in the interpreter that runs ComfyUI

        self.aiohttp = aiohttp
        self.ws_url = url.replace("http://", "ws://") + f"/ws?clientId={client_id}"
        self.messages: list[dict] = []
        self.ready = threading.Event()
        self._stop = False
        self._thread = threading.Thread(target=lambda: asyncio.run(self._listen()), daemon=True)

    async def _listen(self) -> None:
        async with self.aiohttp.ClientSession() as session, session.ws_connect(self.ws_url) as ws:
            self.ready.set()
            while not self._stop:
                try:
                    msg = await ws.receive(timeout=0.2)
                except asyncio.TimeoutError:
                    continue
                if msg.type == self.aiohttp.WSMsgType.TEXT:
                    self.messages.append(json.loads(msg.data))
                elif msg.type in (self.aiohttp.WSMsgType.CLOSED, self.aiohttp.WSMsgType.ERROR):
                    return

    def __enter__(self) -> EventListener:
        self._thread.start()
        assert self.ready.wait(30), "could not open ComfyUI's websocket"
        return self

    def __exit__(self, *exc) -> None:
        self._stop = True
        self._thread.join(10)

    def progress(self, prompt_node: str = "train") -> list[dict]:
        return [
            m["data"]
            for m in list(self.messages)
            if m.get("type") == "metalora.train_progress" and m["data"].get("node") == prompt_node
        ]


def _files(folder) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


def test_registered_with_tooltips(comfy):
    info = comfy.object_info("MetaLoRATrainIdentity")["MetaLoRATrainIdentity"]
    assert info["category"] == "MetaLoRA/training" and len(info["description"]) > 40
    assert info["output"] == ["METALORA_IDENTITY", "LOSS_MAP"]
    for section in ("required", "optional"):
        for name, spec in info["input"].get(section, {}).items():
            assert spec[1].get("tooltip"), name
    assert info["input"]["required"]["steps"][1]["default"] == 375


def test_graph_trains_applies_and_samples(comfy, comfy_base):
    pytest.importorskip("aiohttp")
    before, after = _tag("train_base_before"), _tag("train_base_after")
    first = comfy.run({**loaders(), "p": probe(["unet", 0], before)})
    assert first.status == "success", first.error
    graph = {
        **loaders(),
        **train(steps=3),
        "loss_graph": node("LossGraphNode", loss=["train", 1], filename_prefix="metalora_loss"),
        "apply": node(
            "MetaLoRAApply", model=["unet", 0], lomd=["lomd", 0], identity=["train", 0], strength=1.0
        ),
        **sampler("trained", ["apply", 0]),
        **sampler("plain", ["unet", 0]),
        "p_after": probe(["unet", 0], after, after=["apply", 0]),
    }
    with EventListener(comfy.url, comfy.client_id) as events:
        result = comfy.run(graph)
        time.sleep(0.5)  # let the last websocket messages arrive
    assert result.status == "success", (result.error, comfy.log_tail())
    trained = saved_latent(comfy_base, result, "trained_save")
    plain = saved_latent(comfy_base, result, "plain_save")
    assert trained.shape == plain.shape == (1, 16, 8, 8)
    assert (trained - plain).abs().max() > 1e-4  # the trained identity changes what is sampled
    assert result.outputs["loss_graph"]["images"]  # ComfyUI's own loss graph read our LOSS_MAP
    progress = events.progress()
    assert [p["step"] for p in progress] == [1, 2, 3] and all(p["total"] == 3 for p in progress)
    assert all(set(p) == {"node", "step", "total", "loss", "lr", "eta_s"} for p in progress)
    assert torch.equal(probe_output(comfy_base, before), probe_output(comfy_base, after))  # MODEL untouched


def test_interrupt_stops_within_a_step_and_leaves_nothing(comfy, comfy_base):
    pytest.importorskip("aiohttp")
    before, after = _tag("intr_base_before"), _tag("intr_base_after")
    assert comfy.run({**loaders(), "p": probe(["unet", 0], before)}).status == "success"
    files_before = _files(comfy_base / "output")
    graph = {
        **loaders(),
        **train(steps=5000, resolution=512, seed=1),
        "loss_graph": node("LossGraphNode", loss=["train", 1], filename_prefix="metalora_interrupted"),
    }
    with EventListener(comfy.url, comfy.client_id) as events:
        prompt_id = comfy.queue(graph)
        deadline = time.monotonic() + 300
        while not any(p["step"] >= 2 for p in events.progress()) and time.monotonic() < deadline:
            time.sleep(0.05)
        seen = max((p["step"] for p in events.progress()), default=0)
        assert seen >= 2, comfy.log_tail()
        comfy.interrupt()
        result = comfy.wait(prompt_id, timeout=300)
        time.sleep(0.5)
    assert result.interrupted and result.status == "error", result.messages
    last = max(p["step"] for p in events.progress())
    # The step running when /interrupt arrives finishes; the next one never starts. One more event may
    # have been in flight between reading `seen` and posting /interrupt.
    assert last <= seen + 2, (seen, last)
    assert last < 5000
    probe_graph = {**loaders(), "p": probe(["unet", 0], after)}
    assert comfy.run(probe_graph).status == "success"
    assert torch.equal(probe_output(comfy_base, before), probe_output(comfy_base, after))  # unpatched
    new_files = _files(comfy_base / "output") - files_before
    assert all(f.startswith("metalora_probe/") for f in new_files), new_files  # training wrote nothing
