"""Exports and patch tensors read back by code that is not ours, with ``alpha != rank_down`` (scale 0.5), so a
dropped or doubled scale shows (the shared fixture's scale is 1, where it cannot).

- kohya export -> diffusers' own kohya FLUX converter (``FluxPipeline.lora_state_dict``) -> diffusers'
  ``load_lora_adapter``: the model's output equals our bypass adapter's. This pins the kohya key names, the
  ``lora_up``/``lora_down`` roles and the alpha rule. diffusers' converter hard-codes FLUX.1's width for
  ``single_blocks.*.linear1``, so at the tiny width the adapter covers the double blocks (every layer type
  there, fused qkv included).
- What MetaLoRAApply hands ComfyUI (``patch_plan.patch_tensors``) carries the same scale.
"""

from __future__ import annotations

import pytest
import torch

from metalora_core.adapter import AdapterShape
from metalora_core.dev.random_assets import random_adapter, random_lomd
from metalora_core.dev.tiny_flux import example_inputs
from metalora_core.formats import export_lora
from metalora_core.inject import attached, set_strength
from metalora_core.model_files import load_diffusers_model
from metalora_core.safeio import load_tensors
from tests.pack_import import pack_module

SHAPE = AdapterShape(4, 8, alpha=2.0)  # scale = alpha / rank_down = 0.5
DOUBLE = r"double_blocks\.\d+\.(img|txt)_(attn\.qkv|attn\.proj|mlp\.0|mlp\.2|mod\.lin)"


@pytest.fixture(scope="module")
def pair(assets):
    lomd = random_lomd(assets["bfl"], SHAPE, DOUBLE, seed=3)
    adapter = random_adapter(lomd, assets["bfl"], seed=4, up_std=0.05)
    assert adapter.shape.scale == 0.5 and any(t.endswith("qkv") for t in adapter.targets)
    return lomd, adapter


def _forward(model, inputs):
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0]


def test_kohya_export_read_by_diffusers_kohya_converter_equals_our_adapter(assets, pair, tmp_path):
    from diffusers.pipelines.flux.pipeline_flux import FluxPipeline

    lomd, adapter = pair
    model, dims = load_diffusers_model(assets["bfl"], dtype=torch.float32)
    inputs = example_inputs(dims, seed=9)
    base = _forward(model, inputs)
    path = export_lora(tmp_path / "kohya.safetensors", lomd, adapter, dims, "kohya", strength=0.7)
    tensors, _ = load_tensors(path)
    converted = FluxPipeline.lora_state_dict(tensors)
    converted = converted[0] if isinstance(converted, tuple) else converted
    assert converted and all(k.startswith("transformer.") for k in converted)
    model.load_lora_adapter(converted, prefix="transformer", adapter_name="kohya")
    theirs = _forward(model, inputs)
    model.delete_adapters("kohya")
    with attached(model, dims, lomd, adapter):
        set_strength(model, 0.7)  # the export's strength: y + 0.7 * head(x)
        ours = _forward(model, inputs)
    assert (ours - base).abs().max() > 1e-3
    assert (theirs - ours).abs().max().item() < 1e-5


def test_patch_tensors_carry_the_adapter_scale_into_comfyuis_weight_patch(pair, assets):
    """MetaLoRAApply's per-weight tuples, applied the way ComfyUI's weight adapter does (patch_math), give
    ``W + strength * scale * Up @ Mid @ Down`` for every target (float64)."""
    plan, pm = pack_module("comfy_model.patch_plan"), pack_module("comfy_model.patch_math")
    lomd, adapter = pair
    patches = plan.patch_tensors(lomd, adapter)
    assert set(patches) == {f"diffusion_model.{n}.weight" for n in adapter.targets}
    bfl, _ = load_tensors(assets["bfl"])
    for name in adapter.targets:
        down, mid, up, scale = patches[f"diffusion_model.{name}.weight"]
        weight = bfl[f"{name}.weight"].double()
        got = pm.add_identity_delta(weight.clone(), down, mid, up, 0.9 * scale, None, torch.float64)
        product = adapter.ups[name].double() @ adapter.mids[name].double() @ lomd.downs[name].double()
        torch.testing.assert_close(got, weight + 0.9 * 0.5 * product, rtol=1e-12, atol=1e-12)
