"""Test-only ComfyUI nodes (loaded ONLY by the tests/comfyui harness, never shipped as part of the pack).

ComfyUI's real text encoders and VAE have fixed FLUX.1 / Qwen-Image sizes, far too big for a test machine, so
these nodes supply what they would: conditioning tensors of a tiny model's sizes (Qwen-Image: 3584 wide, no
pooled output), tiny deterministic VAEs (FLUX's 4-D latents; Qwen-Image's Wan 2.1 5-D video latents), and a
probe that runs a MODEL's denoiser on fixed inputs and saves the output tensor (to compare models exactly).
"""

from __future__ import annotations

import os

import comfy.model_management
import folder_paths
import torch
import torch.nn.functional as F
from comfy_api.latest import ComfyExtension, io
from safetensors.torch import save_file

CATEGORY = "MetaLoRA/testing"


class TinyVAE:
    """A fixed linear 'VAE' with FLUX's latent layout (16 channels, 8x down-sampling).

    encode: 8x8 average pooling then a fixed 3 -> 16 projection; decode: 16 -> 3 then nearest up-sampling.
    Deterministic and differentiable, enough for graphs that need VAEEncode / VAEDecode."""

    latent_channels = 16
    downscale_ratio = 8
    upscale_ratio = 8

    def __init__(self, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.enc = torch.randn(16, 3, generator=g) / 3**0.5
        self.dec = torch.linalg.pinv(self.enc)  # (3, 16): decode(encode(x)) ~ pooled x

    def spacial_compression_encode(self) -> int:
        return 8

    def spacial_compression_decode(self) -> int:
        return 8

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        x = pixels[..., :3].movedim(-1, 1).float() * 2 - 1  # (B, 3, H, W) in [-1, 1]
        x = F.avg_pool2d(x, 8)
        return torch.einsum("oc,bchw->bohw", self.enc, x)

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        x = torch.einsum("co,bohw->bchw", self.dec, latent.float())
        x = F.interpolate(x, scale_factor=8, mode="nearest")
        return ((x + 1) / 2).clamp(0, 1).movedim(1, -1)


class TinyVideoVAE(TinyVAE):
    """TinyVAE with Qwen-Image's latent layout (ComfyUI's Wan 2.1 VAE): ``latent_dim`` 3, latents
    (B, 16, frames, H/8, W/8). As ComfyUI's VAE.encode does for a video VAE, a batch of N images is ONE clip whose
    frames compress four to one: (N, H, W, 3) -> (1, 16, 1 + (N - 1) // 4, H/8, W/8); decode gives
    (B, frames, H, W, 3), which VAEDecode folds into a batch of images."""

    latent_dim = 3

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        frames = super().encode(pixels)  # (N, 16, h, w)
        return frames[::4].movedim(0, 1).unsqueeze(0)

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        if latent.ndim == 4:
            latent = latent.unsqueeze(2)
        b, c, t, h, w = latent.shape
        images = super().decode(latent.movedim(2, 1).reshape(b * t, c, h, w))  # (B * T, H, W, 3)
        return images.reshape(b, t, *images.shape[1:])


def _size_inputs() -> list:
    """The tiny model's text widths (the defaults are tiny_flux's)."""
    return [
        io.Int.Input("context_dim", default=64, min=1, max=8192, tooltip="T5 width of the model."),
        io.Int.Input(
            "pooled_dim", default=32, min=0, max=8192, tooltip="CLIP pooled width (0: none, Qwen-Image)."
        ),
    ]


class MetaLoRATestConditioning(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MetaLoRATestConditioning",
            category=CATEGORY,
            description="Seeded random FLUX conditioning of a tiny model's sizes (test only).",
            inputs=[
                io.Int.Input("seed", default=0, min=0, max=2**31, tooltip="Random seed."),
                io.Int.Input("tokens", default=8, min=1, max=512, tooltip="Text tokens."),
                *_size_inputs(),
            ],
            outputs=[io.Conditioning.Output()],
        )

    @classmethod
    def execute(cls, seed, tokens, context_dim, pooled_dim):
        g = torch.Generator().manual_seed(seed)
        cond = torch.randn(1, tokens, context_dim, generator=g)
        pooled = torch.randn(1, pooled_dim, generator=g) if pooled_dim else None  # Qwen-Image: None
        return io.NodeOutput([[cond, {"pooled_output": pooled}]])


class MetaLoRATestVAE(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MetaLoRATestVAE",
            category=CATEGORY,
            description="A tiny deterministic VAE with FLUX's latent layout (test only).",
            inputs=[io.Int.Input("seed", default=0, min=0, max=2**31, tooltip="Random seed.")],
            outputs=[io.Vae.Output()],
        )

    @classmethod
    def execute(cls, seed):
        return io.NodeOutput(TinyVAE(seed))


class MetaLoRATestQwenVAE(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MetaLoRATestQwenVAE",
            category=CATEGORY,
            description="A tiny deterministic VAE with Qwen-Image's (Wan 2.1's) 5-D video latent layout (test only).",
            inputs=[io.Int.Input("seed", default=0, min=0, max=2**31, tooltip="Random seed.")],
            outputs=[io.Vae.Output()],
        )

    @classmethod
    def execute(cls, seed):
        return io.NodeOutput(TinyVideoVAE(seed))


class MetaLoRATestProbe(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MetaLoRATestProbe",
            category=CATEGORY,
            description="Runs MODEL's denoiser on fixed seeded inputs and saves the output tensor to "
            "output/metalora_probe/<tag>.safetensors (test only).",
            is_output_node=True,
            not_idempotent=True,
            inputs=[
                io.Model.Input("model", tooltip="Model to probe."),
                io.String.Input("tag", default="probe", tooltip="Output file name."),
                io.Int.Input("seed", default=0, min=0, max=2**31, tooltip="Seed of the fixed inputs."),
                *_size_inputs(),
                io.Model.Input("after", optional=True, tooltip="Any model; only orders execution after it."),
            ],
            outputs=[],
        )

    @classmethod
    def execute(cls, model, tag, seed, context_dim, pooled_dim, after=None):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(1, 16, 8, 8, generator=g)
        ctx = torch.randn(1, 8, context_dim, generator=g)
        pooled = torch.randn(1, pooled_dim, generator=g) if pooled_dim else None
        comfy.model_management.load_models_gpu([model])
        device = model.load_device
        with torch.no_grad():
            out = model.model.apply_model(
                x.to(device),
                torch.tensor([0.7], device=device),
                c_crossattn=ctx.to(device),
                y=None if pooled is None else pooled.to(device),
                guidance=torch.tensor([3.5], device=device),
            )
        folder = os.path.join(folder_paths.get_output_directory(), "metalora_probe")
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"{tag}.safetensors")
        save_file({"out": out.float().cpu().contiguous()}, path)
        return io.NodeOutput(ui={"metalora_probe": [{"file": path, "sum": float(out.float().sum())}]})


class TestNodesExtension(ComfyExtension):
    async def get_node_list(self):
        return [MetaLoRATestConditioning, MetaLoRATestVAE, MetaLoRATestQwenVAE, MetaLoRATestProbe]


async def comfy_entrypoint():
    return TestNodesExtension()
