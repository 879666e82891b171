"""Composition nodes in a real ComfyUI: an identity and a LoRA file under Merge, Switch and Composite, each
sampled by the stock KSampler; every strategy runs, changes the image, and the three differ."""

from __future__ import annotations

import itertools

from tests.comfyui.graphs import loaders, sampler, saved_latent
from tests.comfyui.harness import node


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
