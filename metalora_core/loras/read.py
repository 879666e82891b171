"""Read standard LoRA files (kohya, ComfyUI, diffusers/peft) of FLUX.1 or Qwen-Image, one file and one
layer at a time.

Every layout is mapped onto canonical layer names with the key mapping of the model's family
(:mod:`metalora_core.models`). What a reader gets per layer are the exact factors: for each *piece* (one
fused layer, or one diffusers module split out of it) ``up``, ``down``, ``scale = alpha / rank`` and the
row slice of the fused weight it writes, so that ``delta_W[rows] += scale * up @ down`` exactly.

Typical use::

    lora = scan_lora(path, dims)            # header only: layout, layers, shapes checked, foreign model named
    for layer in iter_layers(lora):         # one layer's tensors in memory at a time, NaN/inf checked
        up, down = layer.factors()          # delta_W == up @ down (scale baked into up)

A bad file raises a :class:`LoraReadError` subclass naming the file and the key at fault;
:func:`scan_loras` turns those into a skip list so a batch never stops on one file.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..errors import MetaLoRAError
from ..models import FAMILIES, ModelFamily, family_named, family_of, family_placing
from ..models.family import LoraPlace
from ..targets import FluxDims, diffusers_pieces, layer_shape, split_layer_name


class LoraReadError(MetaLoRAError):
    """A LoRA file that cannot be used; ``path`` and ``reason`` are kept for skip reports."""

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}")


class ForeignLoraError(LoraReadError):
    """The file is a LoRA for another base model (SD/SDXL keys, another FLUX width or depth)."""


class DamagedLoraError(LoraReadError):
    """NaN/inf values, mismatched up/down shapes, missing halves, unreadable file."""


# (suffix, role) of the weight keys of every supported layout
_SUFFIXES = (
    (".lora_down.weight", "down"),
    (".lora_up.weight", "up"),
    (".lora_A.weight", "down"),
    (".lora_B.weight", "up"),
    (".lora.down.weight", "down"),
    (".lora.up.weight", "up"),
    (".alpha", "alpha"),
)
_WRAPPERS = ("model.diffusion_model.", "diffusion_model.", "base_model.model.", "transformer.")
_TEXT_ENCODER = re.compile(r"^(lora_te\d?_|text_encoder(_\d)?\.|te\d?\.|lora_te_text_model)")
_SD_UNET = re.compile(r"(down_blocks|up_blocks|mid_block|input_blocks|output_blocks|middle_block)")
_OTHER_ADAPTERS = ("lokr_w1", "lokr_w2", "hada_w1_a", "hada_w2_a", "dora_scale", ".oft_", "lora_mid.weight")


@dataclass(frozen=True)
class LoraPiece:
    """One up/down pair: ``delta_W[rows] += scale * up @ down`` (``rows`` None = the whole fused weight)."""

    key: str
    up: torch.Tensor
    down: torch.Tensor
    scale: float
    rows: slice | None

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    def delta(self) -> torch.Tensor:
        """The dense ``rows x in`` change (reference math; large layers should stay factored)."""
        return (self.scale * self.up) @ self.down


@dataclass(frozen=True)
class LoraLayer:
    """Every piece of one canonical layer; pieces of a split layer write disjoint row slices."""

    name: str
    out_features: int
    in_features: int
    pieces: tuple[LoraPiece, ...]

    @property
    def rank(self) -> int:
        """Rank of the stacked factors (sum over pieces; the delta's rank is at most this)."""
        return sum(p.rank for p in self.pieces)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(up, down)`` with ``up @ down == delta_W`` exactly: pieces stacked, scales baked into ``up``."""
        ref = self.pieces[0].down
        up = torch.zeros(self.out_features, self.rank, dtype=ref.dtype)
        col = 0
        for p in self.pieces:
            rows = p.rows if p.rows is not None else slice(0, self.out_features)
            up[rows, col : col + p.rank] = p.scale * p.up
            col += p.rank
        return up, torch.cat([p.down for p in self.pieces], dim=0)

    def delta(self) -> torch.Tensor:
        """The dense ``out x in`` change (reference math)."""
        up, down = self.factors()
        return up @ down

    def energy(self) -> float:
        """``||delta_W||_F^2`` from the factors (``tr((U^T U)(D D^T))`` per piece), no dense matrix."""
        total = 0.0
        for p in self.pieces:
            total += p.scale**2 * float(((p.up.T @ p.up) * (p.down @ p.down.T)).sum())
        return total


@dataclass
class _PieceKeys:
    down: str | None = None
    up: str | None = None
    alpha: str | None = None


@dataclass
class LoraFile:
    """What a header says about a LoRA file: layout, placed layers and the keys it ignored."""

    path: str
    layout: str
    metadata: dict[str, str]
    hidden: int
    mlp_hidden: int
    layers: dict[str, dict[int, _PieceKeys]]
    shapes: dict[str, tuple[int, ...]]
    splits: dict[str, bool]
    ignored: list[str] = field(default_factory=list)
    dims: object | None = None
    family: str = "flux"

    @property
    def layer_names(self) -> list[str]:
        return list(self.layers)

    def rows_of(self, name: str, piece: int) -> slice | None:
        """Row slice of the fused weight that piece ``piece`` of layer ``name`` writes (None: all rows)."""
        if not self.splits[name]:
            return None
        return diffusers_pieces(name, self._dims())[piece][1]

    def _dims(self):
        if self.dims is not None:
            return self.dims
        return family_named(self.family).dims_for_lora(self.hidden, self.mlp_hidden)

    def layer_shape(self, name: str) -> tuple[int, int]:
        return layer_shape(self._dims(), name)


def _unwrap(prefix: str) -> str:
    for wrapper in _WRAPPERS:
        if prefix.startswith(wrapper):
            return prefix[len(wrapper) :]
    return prefix


def _place(prefix: str, family: ModelFamily) -> LoraPlace | None:
    """Where one key prefix lands in ``family``'s layers (any wrapper removed first), or None."""
    if prefix.startswith(("lora_unet_", "lora_transformer_", "lycoris_")):
        return family.place_lora_prefix(prefix)
    return family.place_lora_prefix(_unwrap(prefix))


def _guess_family(meta: dict[str, str], prefixes: list[str]) -> ModelFamily:
    """A LoRA file's family when no model is given: its kohya metadata, else the family whose layers place
    keys the others cannot (plain attention keys are valid in both and default to FLUX.1)."""
    version = meta.get("ss_base_model_version", "")
    for family in FAMILIES.values():
        if version == family.lora_base_version:
            return family
    return family_placing(prefixes, lambda prefix, family: _place(prefix, family) is not None)


def _split_key(key: str) -> tuple[str, str] | None:
    for suffix, role in _SUFFIXES:
        if key.endswith(suffix):
            return key[: -len(suffix)], role
    return None


def _header(path: Path) -> tuple[dict[str, str], dict[str, tuple[int, ...]]]:
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = dict(fh.metadata() or {})
            shapes = {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise DamagedLoraError(path, f"not a readable safetensors file ({exc})") from None
    return meta, shapes


def _infer_sizes(
    path: Path, placed: dict[str, dict[int, _PieceKeys]], shapes, splits, family: ModelFamily
) -> tuple[int, int]:
    """Hidden and MLP width from the factors' shapes (the family knows which layers read which width)."""
    pieces = [
        (name, index, splits[name], shapes[keys.down][1], shapes[keys.up][0])
        for name, per_piece in placed.items()
        for index, keys in per_piece.items()
    ]
    hidden, mlp = family.lora_sizes(pieces)
    if len(hidden) > 1:
        raise DamagedLoraError(path, f"layers disagree on the model width ({sorted(hidden)}); broken shapes")
    if not hidden:
        hidden.add(shapes[next(iter(next(iter(placed.values())).values())).up][0])
    h = hidden.pop()
    return h, (mlp.pop() if len(mlp) == 1 else 4 * h)


def scan_lora(path: str | os.PathLike, dims=None) -> LoraFile:
    """Read a LoRA file's header: place every key, check every shape, name foreign or broken files.

    ``dims`` (the model's sizes) makes the width and depth checks strict; without it the sizes are read
    from the file itself. Text-encoder keys and non-weight keys (``diff``/``diff_b``) are listed in
    ``ignored``; a UNet key of SD/SDXL or any other unplaceable LoRA key rejects the whole file.
    """
    path = Path(path)
    if not path.is_file():
        raise DamagedLoraError(path, "no such file")
    meta, shapes = _header(path)
    groups: dict[str, _PieceKeys] = {}
    ignored: list[str] = []
    for key in shapes:
        if any(tag in key for tag in _OTHER_ADAPTERS):
            raise LoraReadError(
                path,
                f"key '{key}' belongs to a LoKr/LoHa/DoRA/OFT adapter; only plain LoRA (up/down) is read",
            )
        if _TEXT_ENCODER.match(key):
            ignored.append(key)
            continue
        split = _split_key(key)
        if split is None:
            ignored.append(key)
            continue
        prefix, role = split
        setattr(groups.setdefault(prefix, _PieceKeys()), role, key)
    placed: dict[str, dict[int, _PieceKeys]] = {}
    splits: dict[str, bool] = {}
    layouts: set[str] = set()
    family = family_of(dims) if dims is not None else _guess_family(meta, list(groups))
    for prefix, keys in groups.items():
        where = _place(prefix, family)
        if where is None and family.global_layers.match(_unwrap(prefix)):
            ignored += [k for k in (keys.down, keys.up, keys.alpha) if k]
            continue
        if where is None:
            guess = "an SD/SDXL UNet" if _SD_UNET.search(prefix) else f"a model other than {family.label}"
            raise ForeignLoraError(
                path, f"key '{prefix}' is not a {family.label} transformer layer; this is a LoRA for {guess}"
            )
        name, index, split, layout = where.name, where.piece, where.split, where.layout
        layouts.add(layout)
        if keys.down is None or keys.up is None:
            raise DamagedLoraError(
                path, f"'{prefix}' has {'an up' if keys.up else 'a down'} matrix without its pair"
            )
        if splits.setdefault(name, split) != split or index in placed.get(name, {}):
            raise DamagedLoraError(path, f"layer '{name}' appears twice (fused and split, or a repeated key)")
        placed.setdefault(name, {})[index] = keys
    if not placed:
        raise ForeignLoraError(
            path, f"no {family.label} transformer layer found (text-encoder-only or not a LoRA)"
        )
    for pieces in placed.values():
        for keys in pieces.values():
            ds, us = shapes[keys.down], shapes[keys.up]
            if len(ds) != 2 or len(us) != 2 or us[1] != ds[0]:
                raise DamagedLoraError(path, f"'{keys.down}' {ds} and '{keys.up}' {us} are not a LoRA pair")
            if keys.alpha is not None and len(shapes[keys.alpha]) > 1:
                raise DamagedLoraError(
                    path, f"'{keys.alpha}' should be a scalar, has shape {shapes[keys.alpha]}"
                )
    hidden, mlp = _infer_sizes(path, placed, shapes, splits, family)
    if dims is not None and (dims.hidden, dims.mlp_hidden) != (hidden, mlp):
        raise ForeignLoraError(
            path,
            f"made for a model of width {hidden} (MLP {mlp}); this model has width {dims.hidden} "
            f"(MLP {dims.mlp_hidden}). It is a LoRA for another base model",
        )
    lora = LoraFile(
        str(path),
        "+".join(sorted(layouts)),
        meta,
        hidden,
        mlp,
        placed,
        shapes,
        splits,
        ignored,
        dims,
        family.name,
    )
    for name, pieces in placed.items():
        kind, index, _ = split_layer_name(name)
        if dims is not None and index >= family.block_count(dims, kind):
            raise ForeignLoraError(path, f"layer '{name}' does not exist in this model (too few {kind})")
        out_f, in_f = lora.layer_shape(name)
        for piece, keys in pieces.items():
            rows = lora.rows_of(name, piece)
            want_out = out_f if rows is None else rows.stop - rows.start
            got = (shapes[keys.up][0], shapes[keys.down][1])
            if got != (want_out, in_f):
                raise DamagedLoraError(
                    path,
                    f"'{keys.down}' writes a ({got[0]}, {got[1]}) delta but layer '{name}' needs ({want_out}, {in_f})",
                )
    return lora


def _scalar(fh, key: str, path: str) -> float:
    value = float(fh.get_tensor(key).double().reshape(-1)[0])
    if not torch.isfinite(torch.tensor(value)):
        raise DamagedLoraError(path, f"'{key}' is {value}")
    return value


def iter_layers(
    lora: LoraFile, dtype: torch.dtype = torch.float32, names: Iterable[str] | None = None
) -> Iterator[LoraLayer]:
    """Yield each layer (or those in ``names``) with its tensors; only one layer is in memory at a time.

    Raises :class:`DamagedLoraError` at the first NaN/inf; callers that must not use half a file collect
    per file and commit after the loop (see ``metalora_core.lomd.distill``).
    """
    wanted = set(names) if names is not None else None
    try:
        fh_ctx = safe_open(lora.path, framework="pt")
    except (SafetensorError, OSError) as exc:
        raise DamagedLoraError(lora.path, f"not a readable safetensors file ({exc})") from None
    with fh_ctx as fh:
        for name, pieces in lora.layers.items():
            if wanted is not None and name not in wanted:
                continue
            out_f, in_f = lora.layer_shape(name)
            built = []
            for index in sorted(pieces):
                keys = pieces[index]
                down = fh.get_tensor(keys.down).to(dtype)
                up = fh.get_tensor(keys.up).to(dtype)
                for key, t in ((keys.down, down), (keys.up, up)):
                    if not bool(torch.isfinite(t).all()):
                        raise DamagedLoraError(lora.path, f"'{key}' contains NaN or inf values")
                rank = down.shape[0]
                alpha = _scalar(fh, keys.alpha, lora.path) if keys.alpha else float(rank)
                prefix = keys.down.rsplit(".", 2)[0]
                built.append(LoraPiece(prefix, up, down, alpha / rank, lora.rows_of(name, index)))
            yield LoraLayer(name, out_f, in_f, tuple(built))


def read_lora(
    path: str | os.PathLike, dims: FluxDims | None = None, dtype: torch.dtype = torch.float32
) -> dict[str, LoraLayer]:
    """Every layer of one file (convenience for small files and tests; large batches use :func:`iter_layers`)."""
    return {layer.name: layer for layer in iter_layers(scan_lora(path, dims), dtype)}


def scan_loras(
    paths: Iterable[str | os.PathLike], dims: FluxDims | None = None
) -> tuple[list[LoraFile], list[tuple[str, str]]]:
    """Scan many files; unusable ones go to the skip list as ``(path, reason)`` instead of raising."""
    ok: list[LoraFile] = []
    skipped: list[tuple[str, str]] = []
    for path in paths:
        try:
            ok.append(scan_lora(path, dims))
        except LoraReadError as exc:
            skipped.append((exc.path, exc.reason))
    return ok, skipped


def content_hash(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """sha256 of the file's bytes (first 16 hex digits), streamed: the provenance id of a LoRA file."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()[:16]


def with_dtype(layer: LoraLayer, dtype: torch.dtype) -> LoraLayer:
    """The same layer with its factors cast (e.g. to float64 for exact sums)."""
    pieces = tuple(replace(p, up=p.up.to(dtype), down=p.down.to(dtype)) for p in layer.pieces)
    return replace(layer, pieces=pieces)
