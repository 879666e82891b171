"""Out-of-place forwards of ComfyUI's FLUX double / single blocks with Meta-LoRA heads on their linears.

ComfyUI's own blocks add their residuals in place (``img += ...``); autograd through them under block
checkpointing produced wrong gradients in an experiment here (DESIGN.md decision 4). These forwards repeat
ComfyUI's ``DoubleStreamBlock.forward`` / ``SingleStreamBlock.forward`` (comfy/ldm/flux/layers.py) op for
op, but every residual add and modulation is out of place, and each targeted linear becomes
``block.<linear>(x) + head(x)``. The block's own submodules are called, never their weights read, so
ComfyUI's weight casting, fp8 / GGUF layers and low-VRAM offloading keep working. Fused layers (``qkv``,
``linear1``) stay whole, exactly as the canonical adapter targets them: no slicing.

With no heads (or zero ``Up``) the output equals ComfyUI's block bit for bit in float64; tests/comfyui
checks that against the real blocks.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

Head = Callable[[torch.Tensor], torch.Tensor]


def _attention() -> Callable[..., torch.Tensor]:
    # Imported on use so this module (and its pure helpers) load without ComfyUI.
    from comfy.ldm.flux.math import attention

    return attention


def apply_mod(
    tensor: torch.Tensor,
    m_mult: torch.Tensor,
    m_add: torch.Tensor | None = None,
    modulation_dims: list[tuple[int, int, int]] | None = None,
) -> torch.Tensor:
    """ComfyUI's ``apply_mod`` without writing into ``tensor`` (its ``modulation_dims`` branch is in place)."""
    if modulation_dims is None:
        return torch.addcmul(m_add, tensor, m_mult) if m_add is not None else tensor * m_mult
    pieces, start = [], 0
    for d0, d1, idx in sorted(modulation_dims):
        if start < d0:
            pieces.append(tensor[:, start:d0])
        part = tensor[:, d0:d1] * m_mult[:, idx : idx + 1]
        if m_add is not None:
            part = part + m_add[:, idx : idx + 1]
        pieces.append(part)
        start = d1
    if start < tensor.shape[1]:
        pieces.append(tensor[:, start:])
    return torch.cat(pieces, dim=1)


def _linear(module: nn.Module, x: torch.Tensor, head: Head | None) -> torch.Tensor:
    """``module(x)`` plus the adapter's bypass contribution, cast to the layer output's dtype (fused into
    one ``addmm`` by ``IdentityHead.add_into`` when the dtypes allow, as the standalone backend does)."""
    y = module(x)
    if head is None:
        return y
    add_into = getattr(head, "add_into", None)
    return add_into(y, x) if add_into is not None else y + head(x).to(y.dtype)


def _modulation(mod_module: nn.Module, vec: torch.Tensor, head: Head | None) -> tuple[Any, Any]:
    """ComfyUI's ``Modulation.forward`` with a head on ``lin`` (the output is a tuple of ModulationOut)."""
    if head is None:
        return mod_module(vec)
    from comfy.ldm.flux.layers import ModulationOut

    if vec.ndim == 2:
        vec = vec[:, None, :]
    out = _linear(mod_module.lin, nn.functional.silu(vec), head).chunk(mod_module.multiplier, dim=-1)
    return ModulationOut(*out[:3]), (ModulationOut(*out[3:]) if mod_module.is_double else None)


def _mlp(mlp: nn.Module, x: torch.Tensor, heads: Mapping[str, Head], prefix: str) -> torch.Tensor:
    """FLUX.1's MLP (Linear, GELU-tanh, Linear) with heads on ``<prefix>.0`` / ``<prefix>.2``."""
    h0, h2 = heads.get(f"{prefix}.0"), heads.get(f"{prefix}.2")
    if h0 is None and h2 is None:
        return mlp(x)
    if not isinstance(mlp, nn.Sequential) or len(mlp) != 3:
        raise ValueError(f"'{prefix}' is not FLUX.1's Linear-GELU-Linear MLP; Meta-LoRA cannot target it")
    return _linear(mlp[2], mlp[1](_linear(mlp[0], x, h0)), h2)


def _attn_patches(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pe: Any,
    attn_mask: Any,
    transformer_options: dict,
    extra_options: dict,
) -> tuple[torch.Tensor, Any, Any]:
    """Run attention with ComfyUI's ``attn1_patch`` / ``attn1_output_patch`` hooks, as the block does."""
    patches = transformer_options.get("patches", {})
    for p in patches.get("attn1_patch", []):
        out = p(q, k, v, pe=pe, attn_mask=attn_mask, extra_options=extra_options)
        q, k, v = out.get("q", q), out.get("k", k), out.get("v", v)
        pe, attn_mask = out.get("pe", pe), out.get("attn_mask", attn_mask)
    attn = _attention()(q, k, v, pe=pe, mask=attn_mask, transformer_options=transformer_options)
    for p in patches.get("attn1_output_patch", []):
        attn = p(attn, extra_options)
    return attn


def double_block_forward(
    block: nn.Module,
    img: torch.Tensor,
    txt: torch.Tensor,
    vec: Any,
    pe: Any,
    heads: Mapping[str, Head] | None = None,
    attn_mask: Any = None,
    transformer_options: dict | None = None,
    modulation_dims_img: list | None = None,
    modulation_dims_txt: list | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """ComfyUI ``DoubleStreamBlock.forward``, out of place, heads keyed by layer (``img_attn.qkv``, ...)."""
    heads = heads or {}
    transformer_options = transformer_options or {}
    if block.modulation:
        img_mod1, img_mod2 = _modulation(block.img_mod, vec, heads.get("img_mod.lin"))
        txt_mod1, txt_mod2 = _modulation(block.txt_mod, vec, heads.get("txt_mod.lin"))
    else:
        (img_mod1, img_mod2), (txt_mod1, txt_mod2) = vec
    extra_options = transformer_options.copy()
    nh = block.num_heads

    img_modulated = apply_mod(block.img_norm1(img), 1 + img_mod1.scale, img_mod1.shift, modulation_dims_img)
    img_qkv = _linear(block.img_attn.qkv, img_modulated, heads.get("img_attn.qkv"))
    img_q, img_k, img_v = img_qkv.view(img_qkv.shape[0], img_qkv.shape[1], 3, nh, -1).permute(2, 0, 3, 1, 4)
    img_q, img_k = block.img_attn.norm(img_q, img_k, img_v)

    txt_modulated = apply_mod(block.txt_norm1(txt), 1 + txt_mod1.scale, txt_mod1.shift, modulation_dims_txt)
    txt_qkv = _linear(block.txt_attn.qkv, txt_modulated, heads.get("txt_attn.qkv"))
    txt_q, txt_k, txt_v = txt_qkv.view(txt_qkv.shape[0], txt_qkv.shape[1], 3, nh, -1).permute(2, 0, 3, 1, 4)
    txt_q, txt_k = block.txt_attn.norm(txt_q, txt_k, txt_v)

    q = torch.cat((txt_q, img_q), dim=2)
    k = torch.cat((txt_k, img_k), dim=2)
    v = torch.cat((txt_v, img_v), dim=2)
    extra_options["img_slice"] = [txt.shape[1], q.shape[2]]
    attn = _attn_patches(q, k, v, pe, attn_mask, transformer_options, extra_options)
    txt_attn, img_attn = attn[:, : txt.shape[1]], attn[:, txt.shape[1] :]

    proj = _linear(block.img_attn.proj, img_attn, heads.get("img_attn.proj"))
    img = img + apply_mod(proj, img_mod1.gate, None, modulation_dims_img)
    mlp_in = apply_mod(block.img_norm2(img), 1 + img_mod2.scale, img_mod2.shift, modulation_dims_img)
    img = img + apply_mod(
        _mlp(block.img_mlp, mlp_in, heads, "img_mlp"), img_mod2.gate, None, modulation_dims_img
    )

    proj = _linear(block.txt_attn.proj, txt_attn, heads.get("txt_attn.proj"))
    txt = txt + apply_mod(proj, txt_mod1.gate, None, modulation_dims_txt)
    mlp_in = apply_mod(block.txt_norm2(txt), 1 + txt_mod2.scale, txt_mod2.shift, modulation_dims_txt)
    txt = txt + apply_mod(
        _mlp(block.txt_mlp, mlp_in, heads, "txt_mlp"), txt_mod2.gate, None, modulation_dims_txt
    )

    if txt.dtype == torch.float16:
        txt = torch.nan_to_num(txt, nan=0.0, posinf=65504, neginf=-65504)
    return img, txt


def single_block_forward(
    block: nn.Module,
    x: torch.Tensor,
    vec: Any,
    pe: Any,
    heads: Mapping[str, Head] | None = None,
    attn_mask: Any = None,
    transformer_options: dict | None = None,
    modulation_dims: list | None = None,
) -> torch.Tensor:
    """ComfyUI ``SingleStreamBlock.forward``, out of place, heads keyed by ``linear1`` / ``linear2`` / ``modulation.lin``."""
    heads = heads or {}
    transformer_options = transformer_options or {}
    if block.modulation:
        mod, _ = _modulation(block.modulation, vec, heads.get("modulation.lin"))
    else:
        mod = vec
    extra_options = transformer_options.copy()

    x_mod = apply_mod(block.pre_norm(x), 1 + mod.scale, mod.shift, modulation_dims)
    qkv, mlp = torch.split(
        _linear(block.linear1, x_mod, heads.get("linear1")),
        [3 * block.hidden_size, block.mlp_hidden_dim_first],
        dim=-1,
    )
    q, k, v = qkv.view(qkv.shape[0], qkv.shape[1], 3, block.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k = block.norm(q, k, v)
    attn = _attn_patches(q, k, v, pe, attn_mask, transformer_options, extra_options)

    if block.yak_mlp:
        half = block.mlp_hidden_dim_first // 2
        mlp = block.mlp_act(mlp[..., half:]) * mlp[..., :half]
    else:
        mlp = block.mlp_act(mlp)
    output = _linear(block.linear2, torch.cat((attn, mlp), 2), heads.get("linear2"))
    x = x + apply_mod(output, mod.gate, None, modulation_dims)
    if x.dtype == torch.float16:
        x = torch.nan_to_num(x, nan=0.0, posinf=65504, neginf=-65504)
    return x
