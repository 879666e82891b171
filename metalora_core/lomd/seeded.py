"""A seeded LoMD: an orthonormal random Down per target, built from the model's shapes alone.

It holds no meta-learned prior: an identity trained on it behaves like a rank-``rank_down`` LoRA whose down
projection is frozen at random. It exists so the pack runs with FLUX alone, and it says so in its metadata
(``lomd_source = seeded``), which every identity trained on it copies.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping

import torch

from ..adapter import AdapterShape
from ..errors import MetaLoRAError
from ..formats import PROVENANCE_KEY, SOURCE_KEY, LoMD
from ..models import family_of, family_of_targets
from ..models.qwen_image import QwenImageDims
from ..targets import DEFAULT_PRESET, FluxDims, resolve_targets

# FLUX.1 [dev] / [schnell] sizes, so a seeded LoMD needs no 24 GB checkpoint on disk (`--model FLUX`).
# hidden, mlp_hidden, double blocks, single blocks, latent channels, T5 width, CLIP width, guidance, out
FLUX1_DIMS = FluxDims(3072, 12288, 19, 38, 16, 4096, 768, True, 16)
# Qwen-Image's sizes (`--model qwen-image`): hidden, MLP, 60 blocks, latent channels, Qwen2.5-VL width, out
QWEN_IMAGE_DIMS = QwenImageDims(3072, 12288, 60, 16, 3584, 16)
KNOWN_MODELS: dict[str, FluxDims | QwenImageDims] = {
    "qwen-image": QWEN_IMAGE_DIMS,
    "qwen_image": QWEN_IMAGE_DIMS,
    "qwenimage": QWEN_IMAGE_DIMS,
    "flux": FLUX1_DIMS,
    "flux1": FLUX1_DIMS,
    "flux.1": FLUX1_DIMS,
    "flux1-dev": FLUX1_DIMS,
    "flux.1-dev": FLUX1_DIMS,
    "flux1-schnell": FLUX1_DIMS,
    "flux.1-schnell": FLUX1_DIMS,
}


def known_dims(name: str) -> FluxDims | QwenImageDims | None:
    """Sizes of a model named on the command line (``FLUX``, ``flux1-dev``, ``qwen-image``), or None for a path."""
    return KNOWN_MODELS.get(name.strip().lower())


def seeded_down(name: str, in_features: int, rank_down: int, seed: int) -> torch.Tensor:
    """``rank_down x in`` with orthonormal rows, a function of (seed, layer name, width) only.

    Seeding per layer (not one stream over all layers) keeps a layer's Down the same whatever the preset or
    the order of targets, so a seeded ``attn`` LoMD is exactly a subset of a seeded ``attn_mlp`` one.
    """
    if rank_down > in_features:
        raise MetaLoRAError(f"rank_down {rank_down} exceeds the input size {in_features} of layer '{name}'")
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
    q, r = torch.linalg.qr(torch.randn(in_features, rank_down, generator=g, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r)).where(torch.diagonal(r) != 0, torch.ones(()))  # unique QR
    return q.T.contiguous().float()


def seeded_lomd_for_shapes(
    shapes: Mapping[str, tuple[int, int]],
    shape: AdapterShape,
    seed: int = 0,
    hidden: int | None = None,
) -> LoMD:
    """A seeded LoMD for explicit ``{canonical target: (out, in)}`` shapes (e.g. read from a loaded MODEL)."""
    downs = {name: seeded_down(name, in_f, shape.rank_down, seed) for name, (_, in_f) in shapes.items()}
    if not downs:
        raise MetaLoRAError("no target layers to build a seeded LoMD for")
    meta = {
        SOURCE_KEY: "seeded",
        PROVENANCE_KEY: json.dumps({"seed": seed, "prior": "none (orthonormal random Down)"}),
    }
    return LoMD(downs, shape, family_of_targets(downs).name, hidden, meta)


def seeded_lomd(
    dims: FluxDims | QwenImageDims,
    shape: AdapterShape | None = None,
    preset: str = DEFAULT_PRESET,
    seed: int = 0,
) -> LoMD:
    """A seeded LoMD for a model of these sizes and a target preset (or list of layer names/patterns)."""
    family_of(dims)  # an unknown kind of sizes fails here, by name
    shapes = {t.name: (t.out_features, t.in_features) for t in resolve_targets(dims, preset)}
    return seeded_lomd_for_shapes(shapes, shape or AdapterShape(), seed, dims.hidden)
