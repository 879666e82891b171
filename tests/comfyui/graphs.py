"""API-format graph pieces for the tiny FLUX in the test base folder (shared by the tests/comfyui modules)."""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import load_file

from tests.comfyui.harness import node

TINY_COND = {"context_dim": 64, "pooled_dim": 32}


def loaders(
    unet: str = "tiny_flux.safetensors",
    lomd: str = "lomd.safetensors",
    identity: str = "identity.safetensors",
) -> dict:
    """Nodes "unet", "lomd", "identity" (ids are strings; link as ["unet", 0])."""
    return {
        "unet": node("UNETLoader", unet_name=unet, weight_dtype="default"),
        "lomd": node("MetaLoRALoadLoMD", lomd_name=lomd),
        "identity": node("MetaLoRALoadIdentity", identity_name=identity),
    }


def apply(model: list, strength: float, lomd: str = "lomd", identity: str = "identity") -> dict:
    return node("MetaLoRAApply", model=model, lomd=[lomd, 0], identity=[identity, 0], strength=strength)


def export_graph(filename: str, strength: float, dtype: str, lomd: str = "lomd.safetensors") -> dict:
    """Load LoMD + identity -> Export LoRA (never overwriting)."""
    return {
        "lomd": node("MetaLoRALoadLoMD", lomd_name=lomd),
        "identity": node("MetaLoRALoadIdentity", identity_name="identity.safetensors"),
        "export": node(
            "MetaLoRAExportLoRA",
            lomd=["lomd", 0],
            identity=["identity", 0],
            filename=filename,
            strength=strength,
            dtype=dtype,
            overwrite=False,
        ),
    }


def probe(model: list, tag: str, after: list | None = None) -> dict:
    inputs = {"model": model, "tag": tag, "seed": 0, **TINY_COND}
    if after is not None:
        inputs["after"] = after
    return node("MetaLoRATestProbe", **inputs)


def sampler(prefix: str, model: list, seed: int = 7) -> dict:
    """Conditioning -> FluxGuidance -> EmptySD3LatentImage -> KSampler (2 steps) -> SaveLatent, ids prefixed."""
    return {
        f"{prefix}_cond": node("MetaLoRATestConditioning", seed=0, tokens=8, **TINY_COND),
        f"{prefix}_guid": node("FluxGuidance", conditioning=[f"{prefix}_cond", 0], guidance=3.5),
        f"{prefix}_latent": node("EmptySD3LatentImage", width=64, height=64, batch_size=1),
        f"{prefix}_ks": node(
            "KSampler",
            model=model,
            seed=seed,
            steps=2,
            cfg=1.0,
            sampler_name="euler",
            scheduler="simple",
            positive=[f"{prefix}_guid", 0],
            negative=[f"{prefix}_guid", 0],
            latent_image=[f"{prefix}_latent", 0],
            denoise=1.0,
        ),
        f"{prefix}_save": node(
            "SaveLatent", samples=[f"{prefix}_ks", 0], filename_prefix=f"latents/{prefix}"
        ),
    }


def probe_output(base: Path, tag: str):
    return load_file(str(base / "output" / "metalora_probe" / f"{tag}.safetensors"))["out"]


def saved_latent(base: Path, result, node_id: str):
    entry = result.outputs[node_id]["latents"][0]
    return load_file(str(base / "output" / entry["subfolder"] / entry["filename"]))["latent_tensor"]
