"""Composition nodes in a real ComfyUI: an identity and a LoRA file under Merge, Switch and Composite, each
sampled by the stock KSampler; every strategy runs, changes the image, and the three differ."""

from __future__ import annotations

import itertools
import json

import numpy as np
from PIL import Image

from tests.comfyui.graphs import TINY_COND, loaders, sampler, saved_latent
from tests.comfyui.harness import node
from tests.comfyui.workflows import COMPOSE, EXAMPLES


def _adapters() -> dict:
    return {
        "a_id": node(
            "MetaLoRAAdapterIdentity", lomd=["lomd", 0], identity=["identity", 0], strength=1.0, weight=2.0
        ),
        "a_lora": node(
            "MetaLoRAAdapterLoRA",
            lora_name="style_lora.safetensors",
            strength=1.0,
            weight=1.0,
            adapters=["a_id", 0],
        ),
    }


def test_each_strategy_runs_and_they_differ(comfy, comfy_base):
    composed = {
        "merge": node("MetaLoRAComposeMerge", model=["unet", 0], adapters=["a_lora", 0]),
        "switch": node("MetaLoRAComposeSwitch", model=["unet", 0], adapters=["a_lora", 0], every=1),
        "composite": node("MetaLoRAComposeComposite", model=["unet", 0], adapters=["a_lora", 0]),
    }
    graph = {**loaders(), **_adapters(), **composed, **sampler("base", ["unet", 0])}
    for name in composed:
        graph.update(sampler(name, [name, 0]))
    result = comfy.run(graph)
    assert result.status == "success", result.error
    latents = {name: saved_latent(comfy_base, result, f"{name}_save") for name in ("base", *composed)}
    for a, b in itertools.combinations(latents, 2):
        assert (latents[a] - latents[b]).abs().max() > 1e-3, (a, b)


def test_bypass_strategies_on_fp8_weights(comfy, comfy_base):
    """Weights stored in fp8: the bypass path never reads them, so Composite and Switch still apply the
    adapters, and land nearer the float32 composition than the fp8 base model does."""
    unet8 = node("UNETLoader", unet_name="tiny_flux.safetensors", weight_dtype="fp8_e4m3fn")
    graph = {**loaders(), "unet8": unet8, **_adapters()}
    for name, kind in (("composite", "MetaLoRAComposeComposite"), ("switch", "MetaLoRAComposeSwitch")):
        extra = {"every": 1} if name == "switch" else {}
        graph[name] = node(kind, model=["unet", 0], adapters=["a_lora", 0], **extra)
        graph[f"{name}8"] = node(kind, model=["unet8", 0], adapters=["a_lora", 0], **extra)
        graph.update(sampler(name, [name, 0]))
        graph.update(sampler(f"{name}8", [f"{name}8", 0]))
    graph.update(sampler("base8", ["unet8", 0]))
    result = comfy.run(graph)
    assert result.status == "success", result.error
    base8 = saved_latent(comfy_base, result, "base8_save")
    for name in ("composite", "switch"):
        full, fp8 = (saved_latent(comfy_base, result, f"{n}_save") for n in (name, f"{name}8"))
        assert (fp8 - base8).abs().max() > 1e-3, name
        assert (fp8 - full).abs().max() < (base8 - full).abs().max(), name


def test_an_empty_composite_weight_sum_is_a_node_error(comfy):
    adapters = _adapters()
    adapters["a_id"]["inputs"]["weight"] = 0.0
    adapters["a_lora"]["inputs"]["weight"] = 0.0
    graph = {
        **loaders(),
        **adapters,
        "composite": node("MetaLoRAComposeComposite", model=["unet", 0], adapters=["a_lora", 0]),
        **sampler("c", ["composite", 0]),
    }
    result = comfy.run(graph)
    assert result.status == "error"
    assert result.error["node_type"] == "MetaLoRAComposeComposite"
    assert "sum to 0" in result.error["exception_message"]


WORKFLOW = EXAMPLES / f"{COMPOSE}.json"
WIDGETS = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
TINY_SWAPS = {
    "UNETLoader": {"unet_name": "tiny_flux.safetensors"},
    "MetaLoRALoadLoMD": {"lomd_name": "lomd.safetensors"},
    # the example makes its LoMD with Seeded LoMD: an identity trained on that one
    "MetaLoRALoadIdentity": {"identity_name": "identity_seeded.safetensors"},
    "MetaLoRAAdapterLoRA": {"lora_name": "style_lora.safetensors"},
    "KSampler": {"steps": 2},
    "EmptySD3LatentImage": {"width": 64, "height": 64},
}


def _api_prompt(workflow: dict, info: dict) -> dict:
    """The workflow as an API prompt, widget values matched to input names by /object_info's order (a seed's
    control_after_generate value skipped); checks the value count and every link's type on the way."""
    links = {lk[0]: lk for lk in workflow["links"]}
    prompt = {}
    for n in workflow["nodes"]:
        if n["type"] in ("Note", "MarkdownNote") or n.get("mode", 0) != 0:
            continue  # notes, and muted nodes (the front end leaves those out of the prompt too)
        spec = info[n["type"]]
        order = spec["input_order"]["required"] + spec["input_order"].get("optional", [])
        specs = {**spec["input"]["required"], **spec["input"].get("optional", {})}
        linked = {i["name"]: links[i["link"]] for i in n["inputs"] if i.get("link") is not None}
        inputs = {name: [str(lk[1]), lk[2]] for name, lk in linked.items()}
        for name, lk in linked.items():
            assert specs[name][0] == lk[5], f"node {n['id']} input {name}: {lk[5]} linked to {specs[name][0]}"
        values = list(n["widgets_values"])
        for name in order:
            kind = specs[name][0]
            if name in linked or not (isinstance(kind, list) or kind in WIDGETS):
                continue
            assert values, f"node {n['id']} ({n['type']}): no widget value for {name}"
            inputs[name] = values.pop(0)
            if name == "seed":
                assert values.pop(0) == "fixed", "the example keeps its seed fixed"
        assert not values, f"node {n['id']} ({n['type']}): {len(values)} widget values left over"
        prompt[str(n["id"])] = {"class_type": n["type"], "inputs": inputs}
    return prompt


def _on_tiny_flux(prompt: dict) -> dict:
    out = {}
    for node_id, entry in prompt.items():
        kind, inputs = entry["class_type"], dict(entry["inputs"])
        if kind == "DualCLIPLoader":
            continue
        if kind == "CLIPTextEncode":
            out[node_id] = node("MetaLoRATestConditioning", seed=int(node_id), tokens=8, **TINY_COND)
        elif kind == "VAELoader":
            out[node_id] = node("MetaLoRATestVAE", seed=0)
        else:
            if kind == "SaveImage":
                inputs["filename_prefix"] = f"compose_example/{node_id}"
            out[node_id] = node(kind, **{**inputs, **TINY_SWAPS.get(kind, {})})
    return out


def test_the_example_workflow_runs_and_its_three_images_differ(comfy, comfy_base):
    workflow = json.loads(WORKFLOW.read_text())
    boxes = [
        (n["pos"][0], n["pos"][1] - 30, n["pos"][0] + n["size"][0], n["pos"][1] + n["size"][1])
        for n in workflow["nodes"]
    ]
    for i, a in enumerate(boxes):  # readable: no node (title bar included) overlaps another
        for b in boxes[i + 1 :]:
            assert not (a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]), (a, b)
    prompt = _on_tiny_flux(_api_prompt(workflow, comfy.object_info()))
    assert {e["class_type"] for e in prompt.values()} >= {
        "MetaLoRAComposeMerge",
        "MetaLoRAComposeSwitch",
        "MetaLoRAComposeComposite",
    }
    result = comfy.run(prompt)
    assert result.status == "success", result.error
    images = []
    for node_id, entry in prompt.items():
        if entry["class_type"] == "SaveImage":
            saved = result.outputs[node_id]["images"][0]
            path = comfy_base / "output" / saved["subfolder"] / saved["filename"]
            images.append(np.asarray(Image.open(path), dtype=np.float32))
    assert len(images) == 3
    for a, b in itertools.combinations(images, 2):
        assert np.abs(a - b).max() > 0
