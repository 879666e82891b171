"""Qwen-Image in the graph: ComfyUI's ``QwenImageTransformerBlock`` with Meta-LoRA heads, and its backend.

ComfyUI's Qwen-Image block (comfy/ldm/qwen_image/model.py) is already out of place, but heads must enter its
linears. :func:`qwen_block_forward` repeats ``QwenImageTransformerBlock.forward`` and ``Attention.forward``
op for op (the text-to-image path: no ``timestep_zero_index``), calling the block's own submodules
(``block.attn.to_q(x)``, ``block.attn.norm_q``, ...), never reading their weights, so ComfyUI's weight
casting, fp8 / GGUF layers and low-VRAM offloading keep working. Every canonical Qwen-Image target is exactly
one linear (``transformer_blocks.3.attn.to_q``): no fused layers, no slicing. With no heads the output equals
ComfyUI's block bit for bit in float64 (tests/comfyui/train/test_qwen_image.py).

The replacement is registered as ComfyUI's ``("double_block", i)`` patch, whose ``args`` carry no text
attention mask: training conditioning has no padding mask (one prompt, every token real; the Train Identity
node trims the trailing padding a mask would hide, see ``glue.text_conditioning``).

:class:`ComfyQwenImageBackend` feeds ComfyUI's ``QwenImageTransformer2DModel`` as KSampler does: latents
``(B, 16, 1, H, W)`` (one frame; the protocol's ``(B, 16, H, W)`` gets the frame axis in and out), the flow
time ``t = sigma`` (the model embeds ``1000 t``), the text features; no pooled vector, no guidance.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import comfy.ldm.qwen_image.model as qwen_model
import comfy.model_base
import torch
from torch import nn

from ...metalora_core.adapter import IdentityHead
from ...metalora_core.errors import MetaLoRAError
from ...metalora_core.models.qwen_image import BLOCKS, QwenImageDims, split_name
from ...metalora_core.training.protocol import TextConditioning
from ..comfy_model.model_shapes import logical_shape
from .base import ComfyBackend, unsupported_model
from .blocks import Head, _linear
from .patches import BlockReplacement

LABEL = "Qwen-Image"


def check_qwen_image(model_patcher) -> nn.Module:
    """The transformer of a (text-to-image) Qwen-Image patcher, or a clear error for any other model."""
    base = getattr(model_patcher, "model", None)
    dm = getattr(base, "diffusion_model", None)
    name = type(base).__name__
    if not isinstance(base, comfy.model_base.QwenImage):
        raise unsupported_model(model_patcher)
    if type(base) is not comfy.model_base.QwenImage or type(dm) is not qwen_model.QwenImageTransformer2DModel:
        raise MetaLoRAError(
            f"MODEL input: '{name}' ({type(dm).__name__}) is built on Qwen-Image but has another "
            "transformer; Meta-LoRA supports Qwen-Image itself"
        )
    if dm.default_ref_method == "index_timestep_zero" or dm.time_text_embed.use_additional_t_cond:
        raise MetaLoRAError(
            "MODEL input: this is a Qwen-Image edit / layered variant (Qwen-Image-Edit-2511 or "
            "Qwen-Image-Layered); Meta-LoRA trains the text-to-image Qwen-Image (qwen_image)"
        )
    if dm.patch_size != 2 or dm.in_channels != 64:
        raise MetaLoRAError(
            f"MODEL input: Qwen-Image with {dm.in_channels} input channels is not Qwen-Image (64)"
        )
    return dm


def qwen_image_dims(diffusion_model: nn.Module) -> QwenImageDims:
    """Qwen-Image sizes of a loaded ComfyUI ``QwenImageTransformer2DModel`` (logical shapes: GGUF too)."""
    block = diffusion_model.transformer_blocks[0]
    return QwenImageDims(
        hidden=diffusion_model.inner_dim,
        mlp_hidden=logical_shape(block.img_mlp.net[0].proj.weight)[0],
        depth=len(diffusion_model.transformer_blocks),
        in_channels=diffusion_model.in_channels // 4,
        context_dim=logical_shape(diffusion_model.txt_norm.weight)[0],
        out_channels=diffusion_model.out_channels,
        head_dim=block.attn.dim_head,
    )


# --- the block ------------------------------------------------------------------------------------------


def _modulation(mod: nn.Module, temb: torch.Tensor, head: Head | None) -> torch.Tensor:
    """``img_mod`` / ``txt_mod`` (SiLU, Linear) with a head on the linear (``<stream>_mod.1``)."""
    return _linear(mod[1], mod[0](temb), head)


def _modulate(x: torch.Tensor, mod_params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``QwenImageTransformerBlock._modulate`` without a ``timestep_zero_index``: (modulated x, gate)."""
    shift, scale, gate = torch.chunk(mod_params, 3, dim=-1)
    return torch.addcmul(shift.unsqueeze(1), x, 1 + scale.unsqueeze(1)), gate.unsqueeze(1)


def _feed_forward(ff: nn.Module, x: torch.Tensor, heads: Mapping[str, Head], prefix: str) -> torch.Tensor:
    """``FeedForward.forward`` (GELU-tanh projection, dropout, linear) with heads on its two linears."""
    gelu, dropout, out = ff.net
    h = _linear(gelu.proj, x, heads.get(f"{prefix}.net.0.proj"))
    h = dropout(nn.functional.gelu(h, approximate=gelu.approximate))
    return _linear(out, h, heads.get(f"{prefix}.net.2"))


def _joint_attention(
    attn: nn.Module,
    img: torch.Tensor,
    txt: torch.Tensor,
    mask: torch.Tensor | None,
    pe: torch.Tensor,
    heads: Mapping[str, Head],
    transformer_options: dict,
) -> tuple[torch.Tensor, torch.Tensor]:
    """ComfyUI Qwen-Image ``Attention.forward`` with heads on its eight projections (keys ``attn.<name>``)."""
    batch, seq_img, seq_txt = img.shape[0], img.shape[1], txt.shape[1]
    patches = transformer_options.get("patches", {})
    extra_options = transformer_options.copy()

    def project(name: str, x: torch.Tensor) -> torch.Tensor:
        y = _linear(getattr(attn, name), x, heads.get(f"attn.{name}"))
        return y.view(batch, x.shape[1], attn.heads, -1).transpose(1, 2)

    img_q, img_k = project("to_q", img).contiguous(), project("to_k", img).contiguous()
    img_v = project("to_v", img)
    txt_q, txt_k = project("add_q_proj", txt).contiguous(), project("add_k_proj", txt).contiguous()
    txt_v = project("add_v_proj", txt)
    img_q, img_k = attn.norm_q(img_q), attn.norm_k(img_k)
    txt_q, txt_k = attn.norm_added_q(txt_q), attn.norm_added_k(txt_k)

    q = torch.cat([txt_q, img_q], dim=2)
    k = torch.cat([txt_k, img_k], dim=2)
    v = torch.cat([txt_v, img_v], dim=2)
    attn_mask = None
    if mask is not None:  # a fresh tensor filled in place, as ComfyUI builds it (no gradient reaches it)
        attn_mask = torch.zeros((batch, 1, seq_txt + seq_img), dtype=img.dtype, device=img.device)
        attn_mask[:, 0, :seq_txt] = mask
    extra_options["img_slice"] = [txt_q.shape[2], q.shape[2]]
    for p in patches.get("attn1_patch", []):
        out = p(q, k, v, pe=pe, attn_mask=mask, extra_options=extra_options)
        q, k, v, pe = out.get("q", q), out.get("k", k), out.get("v", v), out.get("pe", pe)
        mask = out.get("attn_mask", mask)  # as in ComfyUI: read back, but the mask built above is used

    q, k = qwen_model.apply_rope1(q, pe), qwen_model.apply_rope1(k, pe)
    joint = qwen_model.optimized_attention_masked(
        q, k, v, attn.heads, attn_mask, transformer_options=transformer_options, skip_reshape=True
    )
    img_out = attn.to_out[1](_linear(attn.to_out[0], joint[:, seq_txt:, :], heads.get("attn.to_out.0")))
    txt_out = _linear(attn.to_add_out, joint[:, :seq_txt, :], heads.get("attn.to_add_out"))
    return img_out, txt_out


def qwen_block_forward(
    block: nn.Module,
    img: torch.Tensor,
    txt: torch.Tensor,
    temb: torch.Tensor,
    pe: torch.Tensor,
    heads: Mapping[str, Head] | None = None,
    mask: torch.Tensor | None = None,
    transformer_options: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``QwenImageTransformerBlock.forward`` with heads keyed by layer (``attn.to_q``, ``img_mod.1``, ...);
    returns ``(img, txt)`` (ComfyUI's block returns them the other way round)."""
    heads = heads or {}
    transformer_options = transformer_options or {}
    img_mod1, img_mod2 = _modulation(block.img_mod, temb, heads.get("img_mod.1")).chunk(2, dim=-1)
    txt_mod1, txt_mod2 = _modulation(block.txt_mod, temb, heads.get("txt_mod.1")).chunk(2, dim=-1)

    img_modulated, img_gate1 = _modulate(block.img_norm1(img), img_mod1)
    txt_modulated, txt_gate1 = _modulate(block.txt_norm1(txt), txt_mod1)
    img_attn, txt_attn = _joint_attention(
        block.attn, img_modulated, txt_modulated, mask, pe, heads, transformer_options
    )
    img = torch.addcmul(img, img_gate1, img_attn)
    txt = txt + txt_gate1 * txt_attn

    img_modulated2, img_gate2 = _modulate(block.img_norm2(img), img_mod2)
    img = torch.addcmul(img, img_gate2, _feed_forward(block.img_mlp, img_modulated2, heads, "img_mlp"))
    txt_modulated2, txt_gate2 = _modulate(block.txt_norm2(txt), txt_mod2)
    txt = torch.addcmul(txt, txt_gate2, _feed_forward(block.txt_mlp, txt_modulated2, heads, "txt_mlp"))
    return img, txt


# --- routing heads into ComfyUI's patch API -------------------------------------------------------------


def group_heads(heads: Mapping[str, Head]) -> dict[int, dict[str, Head]]:
    """``{block index: {"attn.to_q": head, ...}}`` from heads keyed by canonical (or ModuleDict-safe) name."""
    grouped: dict[int, dict[str, Head]] = {}
    for key, head in heads.items():
        index, layer = split_name(key.replace("__", "."))
        grouped.setdefault(index, {})[layer] = head
    return grouped


class QwenBlockReplacement(BlockReplacement):
    """ComfyUI's ``("double_block", i)`` replacement for Qwen-Image block ``i``: ``args`` holds ``img``,
    ``txt``, ``vec`` (the timestep embedding), ``pe`` and ``transformer_options``; no attention mask."""

    def __call__(self, args: dict, extra: dict) -> dict:
        block, options = self.blocks[self.index], args.get("transformer_options")

        def forward(img, txt, temb, pe):
            return qwen_block_forward(block, img, txt, temb, pe, self.heads, None, options)

        img, txt = self._run(forward, args["img"], args["txt"], args["vec"], args["pe"])
        return {"img": img, "txt": txt}


def qwen_replacements(
    diffusion_model: nn.Module, heads: Mapping[str, Head], checkpointing: Callable[[], bool]
) -> dict[tuple[str, int], QwenBlockReplacement]:
    """One replacement for EVERY block (headless ones too: gradients flow through them, so they must be
    checkpointable as well)."""
    grouped = group_heads(heads)
    blocks = diffusion_model.transformer_blocks
    beyond = sorted(set(grouped) - set(range(len(blocks))))
    if beyond:
        raise MetaLoRAError(
            f"the model has no {BLOCKS}.{beyond[0]} ({len(blocks)} blocks); the LoMD targets a larger {LABEL}"
        )
    return {
        ("double_block", i): QwenBlockReplacement(
            blocks, "double_block", i, grouped.get(i, {}), checkpointing
        )
        for i in range(len(blocks))
    }


class ComfyQwenImageBackend(ComfyBackend):
    """The protocol on a ComfyUI Qwen-Image (text-to-image)."""

    label = LABEL
    diffusion_model_of = staticmethod(check_qwen_image)
    dims_of = staticmethod(qwen_image_dims)

    def block_replacements(
        self, heads: Mapping[str, IdentityHead], checkpointing: Callable[[], bool]
    ) -> dict[tuple[str, int], QwenBlockReplacement]:
        return qwen_replacements(self.diffusion_model, heads, checkpointing)

    def velocity(
        self, x_t: torch.Tensor, t: torch.Tensor, cond: TextConditioning, guidance: float | None
    ) -> torch.Tensor:
        """``guidance`` is ignored: Qwen-Image has no guidance embedder (CFG is the sampler's)."""
        b = x_t.shape[0]
        context, _ = cond.batch(b, self.device, self.dtype)
        t, options = self.forward_options(t, b)
        out = self.diffusion_model(
            x_t.to(self.device, self.dtype).unsqueeze(2), t, context=context, transformer_options=options
        )
        return out.squeeze(2)
