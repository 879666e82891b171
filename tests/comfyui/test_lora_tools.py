"""LoRA tool nodes in a real ComfyUI, each output read back by the stock LoraLoaderModelOnly: difference ==
B at +1 and A at -1, rescale by -1 == the LoRA at -1, merge == both loaded, extraction from a tiny FLUX
pair == the fine-tuned checkpoint, resize runs and reports its per-layer error."""

from __future__ import annotations

import uuid

import torch
from safetensors import safe_open

from metalora_core.adapter import AdapterShape
from metalora_core.dev.random_assets import random_adapter, random_lomd
from metalora_core.dev.tiny_flux import TINY_DIMS
from metalora_core.formats import export_lora
from metalora_core.safeio import save_tensors
from tests.comfyui.graphs import probe, probe_output
from tests.comfyui.harness import node

ATOL = 2e-5
STYLE = "style_lora.safetensors"


def _tag(name: str) -> str:
    return f"{name}_{uuid.uuid4().hex[:8]}"


def _out(**kw) -> dict:
    return {"format": "kohya", "dtype": "fp32", "overwrite": False, **kw}


def _lora(model: list, name, strength: float) -> dict:
    return node("LoraLoaderModelOnly", model=model, lora_name=name, strength_model=strength)


def _unet(name: str = "tiny_flux.safetensors") -> dict:
    return node("UNETLoader", unet_name=name, weight_dtype="default")


def _probes(comfy, comfy_base, graph: dict, models: dict) -> dict:
    tags = {k: _tag(k) for k in models}
    result = comfy.run({**graph, **{f"p_{k}": probe(m, tags[k]) for k, m in models.items()}})
    assert result.status == "success", result.error
    return {k: probe_output(comfy_base, t) for k, t in tags.items()}


def _a_lora(comfy_base) -> str:
    flux = comfy_base / "models" / "diffusion_models" / "tiny_flux.safetensors"
    lomd = random_lomd(flux, AdapterShape(4, 8), "attn_mlp", seed=11)
    name = f"{_tag('a')}.safetensors"
    export_lora(
        comfy_base / "models" / "loras" / name,
        lomd,
        random_adapter(lomd, flux, seed=12, up_std=0.2),
        TINY_DIMS,
    )
    return name


def test_difference_rescale_and_merge_equal_the_stock_loader_stacks(comfy, comfy_base):
    a = _a_lora(comfy_base)
    diff, neg, both = _tag("diff"), _tag("neg"), _tag("both")
    tools = {
        "diff": node(
            "MetaLoRALoraDifference", lora_a=a, lora_b=STYLE, rank=0, energy=0.0, **_out(filename=diff)
        ),
        "neg": node("MetaLoRALoraRescale", lora=STYLE, factor=-1.0, **_out(filename=neg, format="diffusers")),
        "both": node(
            "MetaLoRALoraMerge",
            lora_1=a,
            weight_1=0.5,
            lora_2=STYLE,
            weight_2=2.0,
            lora_3="(none)",
            weight_3=1.0,
            rank=0,
            energy=0.0,
            **_out(filename=both),
        ),
    }
    result = comfy.run(tools)
    assert result.status == "success", result.error
    graph = {
        "unet": _unet(),
        "b": _lora(["unet", 0], STYLE, 1.0),
        "b_minus_a": _lora(["b", 0], a, -1.0),
        "diff": _lora(["unet", 0], f"{diff}.safetensors", 1.0),
        "b_neg": _lora(["unet", 0], STYLE, -1.0),
        "neg": _lora(["unet", 0], f"{neg}.safetensors", 1.0),
        "a_half": _lora(["unet", 0], a, 0.5),
        "a_half_b2": _lora(["a_half", 0], STYLE, 2.0),
        "both": _lora(["unet", 0], f"{both}.safetensors", 1.0),
    }
    pairs = {"b_minus_a": "diff", "b_neg": "neg", "a_half_b2": "both"}
    out = _probes(
        comfy, comfy_base, graph, {k: [k, 0] for p in pairs.items() for k in p} | {"unet": ["unet", 0]}
    )
    for ref, got in pairs.items():
        assert (out[ref] - out["unet"]).abs().max() > 1e-3, ref
        assert torch.allclose(out[got], out[ref], atol=ATOL, rtol=ATOL), (
            got,
            (out[got] - out[ref]).abs().max(),
        )


def test_extract_from_a_tiny_flux_pair_gives_the_fine_tuned_model(comfy, comfy_base):
    folder = comfy_base / "models" / "diffusion_models"
    with safe_open(str(folder / "tiny_flux.safetensors"), "pt") as fh:
        sd = {k: fh.get_tensor(k) for k in fh.keys()}
    g = torch.Generator().manual_seed(3)
    for name in ("double_blocks.0.img_attn.qkv.weight", "single_blocks.1.linear2.weight"):
        w = sd[name]
        sd[name] = w + 0.05 * torch.randn(w.shape[0], 2, generator=g) @ torch.randn(
            2, w.shape[1], generator=g
        )
    tuned = f"{_tag('tuned')}.safetensors"
    save_tensors(folder / tuned, sd, {})
    lora, small = _tag("extracted"), _tag("small")
    result = comfy.run(
        {
            "x": node(
                "MetaLoRALoraExtract",
                base_model="tiny_flux.safetensors",
                tuned_model=tuned,
                rank=2,
                energy=0.0,
                layers="all_linear",
                **_out(filename=lora),
            ),
            "r": node("MetaLoRALoraResize", lora=STYLE, rank=2, energy=0.0, **_out(filename=small)),
        }
    )
    assert result.status == "success", result.error
    text = " ".join(result.outputs["r"]["text"])
    assert "max relative error" in text and '"rank_out": 2' in text
    assert "2 layers" in " ".join(result.outputs["x"]["text"])
    out = _probes(
        comfy,
        comfy_base,
        {"unet": _unet(), "tuned": _unet(tuned), "lora": _lora(["unet", 0], f"{lora}.safetensors", 1.0)},
        {"unet": ["unet", 0], "tuned": ["tuned", 0], "lora": ["lora", 0]},
    )
    assert (out["tuned"] - out["unet"]).abs().max() > 1e-3
    assert torch.allclose(out["lora"], out["tuned"], atol=1e-4, rtol=1e-4), (
        (out["lora"] - out["tuned"]).abs().max()
    )


def test_an_existing_output_is_not_overwritten(comfy):
    name = _tag("twice")
    graph = {"r": node("MetaLoRALoraRescale", lora=STYLE, factor=1.0, **_out(filename=name))}
    assert comfy.run(graph).status == "success"
    again = comfy.run({"r2": node("MetaLoRALoraRescale", lora=STYLE, factor=2.0, **_out(filename=name))})
    assert again.status == "error" and "already exists" in again.error["exception_message"]
