"""Attach Meta-LoRA bypass heads to a diffusers FLUX transformer (and take them off again).

One :class:`IdentityHead` per canonical target; each diffusers piece of a fused layer gets a
:class:`BypassLinear` reading its row slice of the shared head.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import replace

import torch
from torch import nn

from .adapter import BypassLinear, IdentityHead
from .errors import MetaLoRAError
from .formats import SOURCE_KEY, IdentityAdapter, LoMD, check_identity_fits, check_lomd_fits, check_pair
from .model_files import fused_shapes
from .models import family_of
from .targets import FluxDims, diffusers_pieces


def _parent(model: nn.Module, dotted: str) -> tuple[nn.Module, str]:
    parent_name, _, child = dotted.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def make_heads(
    dims: FluxDims,
    lomd: LoMD,
    adapter: IdentityAdapter | None = None,
    targets: list[str] | None = None,
    rank_mid: int | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    dropout: float = 0.0,
    force: bool = False,
) -> nn.ModuleDict:
    """One :class:`IdentityHead` per canonical target, keyed by :func:`head_key`.

    Without ``adapter`` the heads start fresh (random Mid, zero Up), ready for personalization; their Mid
    rank is ``rank_mid`` or the LoMD's default. ``rank_down`` and ``alpha`` always come from the LoMD.
    """
    shapes = fused_shapes(dims)
    check_lomd_fits(lomd, shapes)
    if adapter is not None:
        check_pair(lomd, adapter, force=force)
        check_identity_fits(adapter, shapes)
    shape = (
        adapter.shape
        if adapter is not None
        else replace(lomd.shape, rank_mid=rank_mid or lomd.shape.rank_mid)
    )
    names = targets if targets is not None else (adapter.targets if adapter is not None else lomd.targets)
    heads = nn.ModuleDict()
    for name in names:
        if name not in lomd.downs:
            raise MetaLoRAError(f"layer '{name}' has no Down in LoMD {lomd.source}")
        heads[head_key(name)] = IdentityHead(
            lomd.downs[name].to(device=device, dtype=dtype),
            shapes[name][0],
            shape.rank_mid,
            shape.scale,
            mid_init=None if adapter is None else adapter.mids[name].to(device, dtype),
            up_init=None if adapter is None else adapter.ups[name].to(device, dtype),
            dropout=dropout,
        ).to(device)
    return heads


def head_key(name: str) -> str:
    """ModuleDict keys cannot hold dots: ``double_blocks.0.img_attn.qkv`` -> ``double_blocks__0__img_attn__qkv``."""
    return name.replace(".", "__")


def head_name(key: str) -> str:
    return key.replace("__", ".")


def attach_to_diffusers(model: nn.Module, dims: FluxDims, heads: Mapping[str, IdentityHead]) -> None:
    """Wrap each diffusers piece of every head's target with a :class:`BypassLinear` (row slice if split)."""
    for key, head in heads.items():
        for module_name, rows in diffusers_pieces(head_name(key), dims):
            parent, child = _parent(model, module_name)
            base = getattr(parent, child)
            if isinstance(base, BypassLinear):
                raise MetaLoRAError(f"'{module_name}' already carries a Meta-LoRA adapter; detach it first")
            setattr(parent, child, BypassLinear(base, head, rows))


def attach_heads(
    model: nn.Module, dims: FluxDims, lomd: LoMD, adapter: IdentityAdapter | None = None, **kwargs
) -> nn.ModuleDict:
    """:func:`make_heads` on the model's device, then :func:`attach_to_diffusers`; returns the heads."""
    kwargs.setdefault("device", next(model.parameters()).device)
    heads = make_heads(dims, lomd, adapter, **kwargs)
    attach_to_diffusers(model, dims, heads)
    return heads


def bypass_layers(model: nn.Module) -> Iterator[tuple[str, BypassLinear]]:
    for name, module in model.named_modules():
        if isinstance(module, BypassLinear):
            yield name, module


def detach_heads(model: nn.Module) -> int:
    """Put every original layer back; returns how many were unwrapped."""
    wrapped = list(bypass_layers(model))
    for name, module in wrapped:
        parent, child = _parent(model, name)
        setattr(parent, child, module.base)
        module.head.clear_memo()  # the last forward's shared product is not kept alive by detached heads
    return len(wrapped)


def set_strength(model: nn.Module, strength: float) -> None:
    for _, module in bypass_layers(model):
        module.strength = strength


def heads_to_adapter(
    heads: nn.ModuleDict, lomd: LoMD, dims: FluxDims, training: dict[str, object] | None = None
) -> IdentityAdapter:
    """Snapshot trained heads as an :class:`IdentityAdapter` (float32, CPU)."""
    mids = {head_name(key): h.mid.detach().float().cpu().clone() for key, h in heads.items()}
    ups = {head_name(key): h.up.detach().float().cpu().clone() for key, h in heads.items()}
    rank_mid = next(iter(mids.values())).shape[0]
    shape = replace(lomd.shape, rank_mid=rank_mid)
    meta = {SOURCE_KEY: lomd.origin}  # an identity says whether its LoMD had a prior (seeded = none)
    return IdentityAdapter(
        mids, ups, shape, lomd.fingerprint, dict(training or {}), family_of(dims).name, dims.hidden, meta
    )


@contextmanager
def attached(model: nn.Module, dims: FluxDims, lomd: LoMD, adapter: IdentityAdapter | None = None, **kwargs):
    """Context manager: heads attached inside, the model exactly as before outside (also on error)."""
    heads = attach_heads(model, dims, lomd, adapter, **kwargs)
    try:
        yield heads
    finally:
        detach_heads(model)
