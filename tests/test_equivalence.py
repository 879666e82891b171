"""Whole-model equivalences on the tiny FLUX: fused (BFL) vs sliced (diffusers) adapters, and our exports
loaded by diffusers' own LoRA code."""

from __future__ import annotations

import torch

from metalora_core.adapter import merge_into
from metalora_core.dev.tiny_flux import example_inputs
from metalora_core.formats import export_lora, fold_identity, load_identity, load_lomd
from metalora_core.inject import attached, detach_heads
from metalora_core.model_files import load_diffusers_model
from metalora_core.safeio import load_tensors
from metalora_core.targets import bfl_to_diffusers


def _forward(model, inputs):
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0]


def test_fused_bfl_adapter_equals_sliced_diffusers_adapters(assets):
    """Merging the fused delta into BFL weights, then converting, equals bypass adapters on the split layers."""
    lomd, adapter = load_lomd(assets["lomd"]), load_identity(assets["adapter"])
    model, dims = load_diffusers_model(assets["bfl"], dtype=torch.float64)
    inputs = example_inputs(dims, dtype=torch.float64, seed=5)
    base = _forward(model, inputs)
    with attached(model, dims, lomd, adapter, dtype=torch.float64):
        sliced = _forward(model, inputs)
    assert torch.equal(_forward(model, inputs), base), "detaching must restore the model exactly"

    bfl, _ = load_tensors(assets["bfl"])
    bfl = {k: v.double() for k, v in bfl.items()}
    for name, (up, down) in fold_identity(lomd, adapter).items():
        merge_into(bfl[f"{name}.weight"], up @ down)
    merged_model, _ = load_diffusers_model(assets["bfl"], dtype=torch.float64)
    merged_model.load_state_dict(bfl_to_diffusers(bfl))
    merged = _forward(merged_model, inputs)

    assert (sliced - base).abs().max() > 1e-3, "the adapter must visibly change the output"
    assert (sliced - merged).abs().max().item() < 1e-10


def test_diffusers_export_loads_with_diffusers_lora_loader(assets, tmp_path):
    """diffusers' own ``load_lora_adapter`` on our diffusers-format export == our bypass adapter."""
    lomd, adapter = load_lomd(assets["lomd"]), load_identity(assets["adapter"])
    model, dims = load_diffusers_model(assets["bfl"], dtype=torch.float32)
    inputs = example_inputs(dims, seed=6)
    base = _forward(model, inputs)
    with attached(model, dims, lomd, adapter):
        ours = _forward(model, inputs)
    path = export_lora(tmp_path / "identity_diffusers.safetensors", lomd, adapter, dims, "diffusers")
    tensors, _ = load_tensors(path)
    model.load_lora_adapter(tensors, prefix="transformer", adapter_name="identity")
    theirs = _forward(model, inputs)
    # float32 end to end: the only difference is summation order inside the LoRA matmuls
    assert (ours - base).abs().max() > 1e-3
    assert (theirs - ours).abs().max().item() < 1e-5


def test_kohya_export_reconstructs_delta_with_alpha_rule(assets, tmp_path):
    """What kohya / ComfyUI compute (alpha / rank * up @ down) equals the three-layer delta, in float64."""
    lomd, adapter = load_lomd(assets["lomd"]), load_identity(assets["adapter"])
    _, dims = load_diffusers_model(assets["bfl"])
    path = export_lora(
        tmp_path / "k.safetensors", lomd, adapter, dims, "kohya", strength=0.8, dtype=torch.float64
    )
    tensors, meta = load_tensors(path)
    assert meta["format"] == "lora.kohya"
    for name in adapter.targets:
        prefix = "lora_unet_" + name.replace(".", "_")
        up, down = tensors[f"{prefix}.lora_up.weight"], tensors[f"{prefix}.lora_down.weight"]
        alpha = tensors[f"{prefix}.alpha"].item()
        expected = (
            0.8
            * adapter.shape.scale
            * adapter.ups[name].double()
            @ adapter.mids[name].double()
            @ lomd.downs[name].double()
        )
        assert ((alpha / down.shape[0]) * up @ down - expected).abs().max().item() < 1e-12


def test_detach_after_error_leaves_model_unpatched(assets):
    lomd, adapter = load_lomd(assets["lomd"]), load_identity(assets["adapter"])
    model, dims = load_diffusers_model(assets["bfl"])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        with attached(model, dims, lomd, adapter):
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    assert detach_heads(model) == 0
    after = model.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)
