"""Seeded LoMD and Distill LoMD nodes in a real ComfyUI: they feed Train Identity and Apply directly, the
trained identity records where its LoMD came from, and distillation names the LoRA it skipped."""

from __future__ import annotations

import uuid

import torch

from metalora_core.dev.synthetic_loras import random_fused_lora, write_lora
from metalora_core.dev.tiny_flux import TINY_DIMS
from metalora_core.formats import load_identity, load_lomd
from tests.comfyui.graphs import apply, loaders, probe, probe_output
from tests.comfyui.harness import node
from tests.comfyui.test_train_identity import train

SAVE = {"destination": "models/metalora", "overwrite": False}


SAVE = {"destination": "models/metalora", "overwrite": False}


def _seeded(seed: int = 0) -> dict:
    return node(
        "MetaLoRASeededLoMD", model=["unet", 0], rank_down=4, rank_mid=8, targets="attn_mlp", seed=seed
    )


def _train_apply_save(name: str, lomd: str) -> dict:
    graph = train(steps=2)
    graph["train"]["inputs"]["lomd"] = [lomd, 0]
    return {
        **graph,
        "apply": node(
            "MetaLoRAApply", model=["unet", 0], lomd=[lomd, 0], identity=["train", 0], strength=1.0
        ),
        "save": node("MetaLoRASaveIdentity", identity=["train", 0], filename=name, **SAVE),
    }


def test_seeded_lomd_feeds_train_and_apply(comfy, comfy_base):
    name = f"seeded_{uuid.uuid4().hex[:8]}"
    graph = {
        "unet": node("UNETLoader", unet_name="tiny_flux.safetensors", weight_dtype="default"),
        "seeded": _seeded(),
        **_train_apply_save(name, "seeded"),
        "p_base": probe(["unet", 0], f"base_{name}"),
        "p_applied": probe(["apply", 0], f"applied_{name}"),
    }
    result = comfy.run(graph)
    assert result.status == "success", result.error
    identity = load_identity(comfy_base / "models" / "metalora" / f"{name}.safetensors")
    assert identity.lomd_origin == "seeded" and identity.metadata["lomd_source"] == "seeded"
    assert not torch.equal(
        probe_output(comfy_base, f"base_{name}"), probe_output(comfy_base, f"applied_{name}")
    )
    spec = comfy.object_info("MetaLoRASeededLoMD")["MetaLoRASeededLoMD"]
    assert spec["input"]["required"]["seed"][1]["control_after_generate"] == "fixed"
    assert "NO meta-learned prior" in spec["description"]


def test_distill_node_saves_a_lomd_that_trains(comfy, comfy_base):
    folder = comfy_base / "models" / "loras" / f"people_{uuid.uuid4().hex[:6]}"
    g = torch.Generator().manual_seed(0)
    for i in range(3):
        layers = random_fused_lora(TINY_DIMS, "attn", 2, g)
        write_lora(folder / f"p{i}.safetensors", layers, "comfyui" if i else "kohya", TINY_DIMS)
    (folder / "broken.safetensors").write_bytes(b"\x00" * 32)
    name = f"distilled_{uuid.uuid4().hex[:8]}"
    graph = {
        "unet": node("UNETLoader", unet_name="tiny_flux.safetensors", weight_dtype="default"),
        "distill": node(
            "MetaLoRADistillLoMD",
            model=["unet", 0],
            folder="(all LoRAs)",
            loras=f"{folder.name}/*",
            rank_down=4,
            rank_mid=8,
            targets="attn_mlp",
            weighting="energy",
            seed=0,
            save_as=f"{name}_lomd",
            overwrite=False,
        ),
        **_train_apply_save(name, "distill"),
        "p": probe(["apply", 0], f"distilled_{name}"),
    }
    result = comfy.run(graph)
    assert result.status == "success", result.error
    report = "\n".join(result.outputs["distill"]["text"])
    assert "from 3 of 4 LoRAs" in report and "broken.safetensors" in report
    lomd = load_lomd(comfy_base / "models" / "metalora" / f"{name}_lomd.safetensors")
    assert lomd.origin == "distilled"
    shown = comfy.run(
        {
            **loaders(lomd=f"{name}_lomd.safetensors", identity=f"{name}.safetensors"),
            "apply": apply(["unet", 0], 1.0),
            "p": probe(["apply", 0], f"loaded_{name}"),
        }
    )
    assert shown.status == "success", shown.error
    assert "distilled from person LoRAs" in "\n".join(shown.outputs["lomd"]["text"])
    identity = load_identity(comfy_base / "models" / "metalora" / f"{name}.safetensors")
    assert identity.lomd_origin == "distilled" and identity.lomd_fingerprint == lomd.fingerprint
