"""Apply / Export in a real ComfyUI on the tiny FLUX: sampling changes, the incoming MODEL does not, the
exported standard LoRA through stock LoraLoaderModelOnly equals Apply, stacking and negative strength work,
and a LoMD that does not fit fails with a node error naming layer and shapes."""

from __future__ import annotations

import json
import uuid

import torch

from tests.comfyui.graphs import apply, export_graph, loaders, probe, probe_output, sampler, saved_latent
from tests.comfyui.harness import node

# Apply adds strength * scale * (Up @ Mid) @ Down in float32; the exported LoRA folds Up @ Mid in float64
# and ComfyUI adds (alpha / rank) * lora_up @ lora_down in float32: the same weights up to float32 rounding.
ATOL = 1e-5


def _tag(name: str) -> str:
    return f"{name}_{uuid.uuid4().hex[:8]}"


def test_apply_changes_sampling_and_leaves_the_input_model_alone(comfy, comfy_base):
    before = _tag("base_before")
    first = comfy.run({**loaders(), "p": probe(["unet", 0], before)})
    assert first.status == "success", first.messages
    after, patched = _tag("base_after"), _tag("patched")
    graph = {
        **loaders(),
        "apply": apply(["unet", 0], 1.0),
        **sampler("with", ["apply", 0]),
        **sampler("without", ["unet", 0]),
        "p_patched": probe(["apply", 0], patched),
        "p_base": probe(["unet", 0], after, after=["apply", 0]),  # runs after Apply
    }
    result = comfy.run(graph)
    assert result.status == "success", result.error
    with_id = saved_latent(comfy_base, result, "with_save")
    without = saved_latent(comfy_base, result, "without_save")
    assert with_id.shape == without.shape == (1, 16, 8, 8)
    assert (with_id - without).abs().max() > 1e-3  # the identity changes what is sampled
    base_before, base_after = probe_output(comfy_base, before), probe_output(comfy_base, after)
    assert torch.equal(base_before, base_after)  # the incoming MODEL is unchanged after Apply ran
    assert (probe_output(comfy_base, patched) - base_before).abs().max() > 1e-3


def test_exported_lora_through_stock_loader_equals_apply(comfy, comfy_base):
    name = _tag("exported")
    export = comfy.run(export_graph(name, 1.0, "fp32"))
    assert export.status == "success", export.error
    assert (comfy_base / "models" / "loras" / f"{name}.safetensors").is_file()
    t_apply, t_lora, t_base = _tag("apply"), _tag("lora"), _tag("base")
    result = comfy.run(
        {
            **loaders(),
            "apply": apply(["unet", 0], 0.8),
            "lora": node(
                "LoraLoaderModelOnly", model=["unet", 0], lora_name=f"{name}.safetensors", strength_model=0.8
            ),
            "p_apply": probe(["apply", 0], t_apply),
            "p_lora": probe(["lora", 0], t_lora),
            "p_base": probe(["unet", 0], t_base),
        }
    )
    assert result.status == "success", result.error
    out_apply, out_lora = probe_output(comfy_base, t_apply), probe_output(comfy_base, t_lora)
    assert (out_apply - probe_output(comfy_base, t_base)).abs().max() > 1e-3
    assert torch.allclose(out_apply, out_lora, atol=ATOL, rtol=ATOL), (out_apply - out_lora).abs().max()
    # exporting again under the same name is refused (no silent overwrite)
    again = comfy.run(export_graph(name, 0.5, "bf16"))
    assert again.status == "error" and "already exists" in again.error["exception_message"]
    # the error report lists the node's inputs as text: one short line per LoMD/identity, never tensors
    shown = again.error["current_inputs"]
    assert shown["lomd"][0].startswith("LoMD(20 layers, rank_down 4, ") and len(shown["lomd"][0]) < 300, shown
    assert shown["identity"][0].startswith("MetaLoRA identity(") and len(shown["identity"][0]) < 300, shown
    assert "tensor(" not in json.dumps(shown)


def test_stacking_and_negative_strength(comfy, comfy_base):
    t_half, t_one, t_cancel, t_base = _tag("half2"), _tag("one"), _tag("cancel"), _tag("base")
    result = comfy.run(
        {
            **loaders(),
            "a1": apply(["unet", 0], 0.5),
            "a2": apply(["a1", 0], 0.5),
            "one": apply(["unet", 0], 1.0),
            "plus": apply(["unet", 0], 1.0),
            "minus": apply(["plus", 0], -1.0),
            "p_half": probe(["a2", 0], t_half),
            "p_one": probe(["one", 0], t_one),
            "p_cancel": probe(["minus", 0], t_cancel),
            "p_base": probe(["unet", 0], t_base),
        }
    )
    assert result.status == "success", result.error
    half2, one = probe_output(comfy_base, t_half), probe_output(comfy_base, t_one)
    cancel, base = probe_output(comfy_base, t_cancel), probe_output(comfy_base, t_base)
    assert (one - base).abs().max() > 1e-3
    assert torch.allclose(half2, one, atol=ATOL, rtol=ATOL)
    assert torch.allclose(cancel, base, atol=ATOL, rtol=ATOL)


def test_lomd_that_does_not_fit_is_a_clear_node_error(comfy):
    graph = {
        **loaders(lomd="lomd_misfit.safetensors", identity="identity_misfit.safetensors"),
        "apply": apply(["unet", 0], 1.0),
        "p": probe(["apply", 0], _tag("never")),
    }
    result = comfy.run(graph)
    assert result.status == "error"
    err = result.error
    assert err["node_type"] == "MetaLoRAApply"
    message = err["exception_message"]
    assert "double_blocks.0.img_attn.qkv" in message or "layer '" in message
    assert "(4, 256)" in message and "128)" in message, message  # LoMD Down shape and the model's shape


def test_apply_on_fp8_weights(comfy, comfy_base):
    """ComfyUI stores the weights in fp8 and patches in its intermediate dtype: Apply still works there, and
    the patched model matches the float32 patched model to fp8 rounding rather than the unpatched one."""
    t32, t8, t8_base = _tag("f32"), _tag("fp8"), _tag("fp8_base")
    graph = {
        **loaders(),
        "unet8": node("UNETLoader", unet_name="tiny_flux.safetensors", weight_dtype="fp8_e4m3fn"),
        "a32": apply(["unet", 0], 1.0),
        "a8": apply(["unet8", 0], 1.0),
        "p32": probe(["a32", 0], t32),
        "p8": probe(["a8", 0], t8),
        "p8_base": probe(["unet8", 0], t8_base, after=["a8", 0]),
    }
    result = comfy.run(graph)
    assert result.status == "success", result.error
    out32, out8, base8 = (probe_output(comfy_base, t) for t in (t32, t8, t8_base))
    assert (out8 - base8).abs().max() > 1e-3
    assert (out8 - out32).abs().max() < (base8 - out32).abs().max()
