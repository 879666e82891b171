"""Block replacements that route Meta-LoRA heads into ComfyUI's FLUX through its own patch API.

``ModelPatcher.set_model_patch_replace(fn, "dit", "double_block" | "single_block", i)`` makes
``Flux.forward_orig`` call ``fn(args, {"original_block": ...})`` instead of block ``i``. Our ``fn`` runs the
out-of-place forward of :mod:`.blocks` (optionally under non-reentrant activation checkpointing). The
replacement lives in a patcher clone's ``model_options`` only: the model object is never edited, and
dropping the clone drops the patch.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

import torch
import torch.utils.checkpoint
from torch import nn

from .blocks import Head, double_block_forward, single_block_forward

_NAME = re.compile(r"(double_blocks|single_blocks)\.(\d+)\.(.+)")
KIND = {"double_blocks": "double_block", "single_blocks": "single_block"}


def group_heads(heads: Mapping[str, Head]) -> dict[tuple[str, int], dict[str, Head]]:
    """``{("double_block", i): {"img_attn.qkv": head, ...}}`` from heads keyed by canonical target name.

    Keys may also be ModuleDict-safe (``double_blocks__0__img_attn__qkv``, see ``inject.head_key``).
    """
    grouped: dict[tuple[str, int], dict[str, Head]] = {}
    for key, head in heads.items():
        name = key.replace("__", ".")
        m = _NAME.fullmatch(name)
        if m is None:
            raise ValueError(f"'{name}' is not a FLUX block layer (double_blocks.N.* / single_blocks.N.*)")
        grouped.setdefault((KIND[m.group(1)], int(m.group(2))), {})[m.group(3)] = head
    return grouped


class BlockReplacement:
    """The callable ComfyUI invokes in place of one block; heads and checkpointing are read per call."""

    def __init__(
        self,
        blocks: nn.ModuleList,
        kind: str,
        index: int,
        heads: Mapping[str, Head],
        checkpointing: Callable[[], bool],
    ) -> None:
        self.blocks = blocks
        self.kind = kind
        self.index = index
        self.heads = dict(heads)
        self.checkpointing = checkpointing

    def _run(self, fn: Callable, *tensors):
        if self.checkpointing() and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(fn, *tensors, use_reentrant=False)
        return fn(*tensors)

    def __call__(self, args: dict, extra: dict) -> dict:
        block = self.blocks[self.index]
        mask, options = args.get("attn_mask"), args.get("transformer_options")
        if self.kind == "double_block":

            def double(img, txt, vec, pe):
                return double_block_forward(block, img, txt, vec, pe, self.heads, mask, options)

            img, txt = self._run(double, args["img"], args["txt"], args["vec"], args["pe"])
            return {"img": img, "txt": txt}

        def single(x, vec, pe):
            return single_block_forward(block, x, vec, pe, self.heads, mask, options)

        return {"img": self._run(single, args["img"], args["vec"], args["pe"])}


def replacements(
    diffusion_model: nn.Module, heads: Mapping[str, Head], checkpointing: Callable[[], bool]
) -> dict[tuple[str, int], BlockReplacement]:
    """One replacement for EVERY block (headless ones too: gradients flow through them, so they must be
    out of place and checkpointable as well)."""
    grouped = group_heads(heads)
    out: dict[tuple[str, int], BlockReplacement] = {}
    for kind, blocks in (
        ("double_block", diffusion_model.double_blocks),
        ("single_block", diffusion_model.single_blocks),
    ):
        for i in range(len(blocks)):
            out[(kind, i)] = BlockReplacement(blocks, kind, i, grouped.pop((kind, i), {}), checkpointing)
    if grouped:
        kind, index = next(iter(grouped))
        raise ValueError(f"the model has no {kind} {index}; the LoMD targets a larger FLUX")
    return out
