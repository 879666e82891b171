"""GGUF-quantized FLUX through city96's ComfyUI-GGUF (``UnetLoaderGGUF``): Train, Apply and sample.

ComfyUI-GGUF keeps quantized weights as packed bytes (a Q8_0 weight with 128 inputs is 136 bytes wide, Q4_0
72) and the real shape in ``tensor_shape``; Apply must check the LoMD against that logical shape. The plain
branch sampled from the same loader output must not change when the patched branch runs beside it.
"""

from __future__ import annotations

import uuid

import pytest
import torch

from tests.comfyui.gguf_files import TYPES
from tests.comfyui.graphs import loaders, sampler, saved_latent
from tests.comfyui.harness import gguf_nodes_path, node
from tests.comfyui.test_train_identity import train

pytestmark = pytest.mark.skipif(
    gguf_nodes_path() is None,
    reason="COMFYUI_GGUF_PATH is not set: the GGUF tests need city96's ComfyUI-GGUF checkout",
)


def _gguf(qtype: str) -> dict:
    return {"unet": node("UnetLoaderGGUF", unet_name=f"tiny_flux-{qtype}.gguf")}


@pytest.mark.parametrize("qtype", TYPES)
def test_train_apply_and_sample_on_gguf(comfy, comfy_base, qtype):
    tag = uuid.uuid4().hex[:8]
    plain_only = comfy.run({**_gguf(qtype), **sampler(f"plain_{tag}", ["unet", 0])})
    assert plain_only.status == "success", plain_only.error
    graph = {
        **loaders(),
        **_gguf(qtype),  # replaces the safetensors "unet"
        **train(steps=2),
        "apply": node(
            "MetaLoRAApply", model=["unet", 0], lomd=["lomd", 0], identity=["train", 0], strength=1.0
        ),
        "apply_file": node(  # an identity from a file too: the fit check reads GGUF's logical shapes
            "MetaLoRAApply", model=["unet", 0], lomd=["lomd", 0], identity=["identity", 0], strength=1.0
        ),
        **sampler(f"trained_{tag}", ["apply", 0]),
        **sampler(f"file_{tag}", ["apply_file", 0]),
        **sampler(f"plain2_{tag}", ["unet", 0], seed=8),
        **sampler(f"plain_{tag}", ["unet", 0]),
    }
    comfy.free_memory()  # run the plain branch again for real, beside the patched ones
    result = comfy.run(graph)
    assert result.status == "success", (result.error or {}).get("exception_message")
    plain = saved_latent(comfy_base, plain_only, f"plain_{tag}_save")
    again = saved_latent(comfy_base, result, f"plain_{tag}_save")
    assert torch.equal(plain, again)  # the plain branch is bit-identical with the patched ones beside it
    for branch in ("trained", "file"):
        patched = saved_latent(comfy_base, result, f"{branch}_{tag}_save")
        assert torch.isfinite(patched).all() and (patched - plain).abs().max() > 1e-4, (
            branch
        )  # Apply changes it
