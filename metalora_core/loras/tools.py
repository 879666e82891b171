"""LoRA file tools: difference, weighted merge, rank resize, rescale (LoRA files in) and extraction (two FLUX
checkpoints in), each streaming one layer at a time.

Inputs are read with :mod:`.read` (kohya, ComfyUI, diffusers/peft naming); outputs are written with
:func:`metalora_core.formats.save_lora` in kohya or diffusers naming, so every tool also converts. Only
one input layer is in memory at a time; the low-rank outputs are collected (a FLUX LoRA is small) and
written atomically at the end, with their provenance in the metadata (``metalora_lora_tool``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..errors import MetaLoRAError
from ..formats import save_lora
from ..model_files import read_model_dims
from ..models import family_of
from ..targets import FluxDims, resolve_targets
from .lowrank import Factors, Truncation, choose_rank, compress, dense_svd, truncate, weighted_sum
from .read import LoraFile, content_hash, iter_layers, scan_lora

Progress = Callable[[int, int, str], None]  # (done, total, layer); may raise to cancel
_BFL_PREFIXES = ("", "model.diffusion_model.", "diffusion_model.")


@dataclass
class LayerReport:
    """One output layer: the rank it came in with, the rank written, and what truncation discarded."""

    name: str
    rank_in: int
    rank_out: int
    energy_kept: float = 1.0
    error: float = 0.0
    relative_error: float = 0.0


@dataclass
class ToolReport:
    """What a tool wrote: the file, its layers, and the metadata it recorded."""

    path: str
    operation: str
    layers: list[LayerReport] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        kept = [r.energy_kept for r in self.layers]
        return {
            "written": self.path,
            "operation": self.operation,
            "layers": len(self.layers),
            "rank_max": max((r.rank_out for r in self.layers), default=0),
            "energy_kept_min": min(kept, default=1.0),
            "relative_error_max": max((r.relative_error for r in self.layers), default=0.0),
            "skipped": self.skipped,
        }

    def as_dict(self) -> dict:
        return {**self.summary(), "per_layer": [asdict(r) for r in self.layers]}


def _dims(lora: LoraFile) -> FluxDims:
    return lora.dims or FluxDims(lora.hidden, lora.mlp_hidden, 0, 0, 0, 0, 0, False, 0)


def _same_model(files: Sequence[LoraFile]) -> FluxDims:
    first = files[0]
    for other in files[1:]:
        if (other.hidden, other.mlp_hidden) != (first.hidden, first.mlp_hidden):
            raise MetaLoRAError(
                f"{other.path} is for a model of width {other.hidden} but {first.path} of width {first.hidden}: "
                "LoRAs of different base models cannot be combined"
            )
    return _dims(first)


def _truncation_of(
    factors: Factors, rank: int | None, energy: float | None
) -> tuple[Factors, Truncation | None]:
    if rank is None and energy is None:
        return factors, None
    return compress(*factors, rank=rank, energy=energy)


def _provenance(operation: str, sources: list[dict], **settings) -> dict[str, str]:
    record = {
        "operation": operation,
        "sources": sources,
        **{k: v for k, v in settings.items() if v is not None},
    }
    return {"metalora_lora_tool": json.dumps(record)}


def combine_loras(
    inputs: Sequence[tuple[str | os.PathLike, float]],
    out: str | os.PathLike,
    operation: str = "merge",
    rank: int | None = None,
    energy: float | None = None,
    fmt: str = "kohya",
    dtype: torch.dtype = torch.float32,
    progress: Progress | None = None,
) -> ToolReport:
    """``sum_i w_i delta_i`` of LoRA files, per layer: exact (factors concatenated, rank = sum of ranks) or
    compressed to ``rank`` / a kept ``energy`` fraction by an exact SVD of the factored sum."""
    if not inputs:
        raise MetaLoRAError(f"{operation}: no input LoRA")
    files = [scan_lora(path) for path, _ in inputs]
    dims = _same_model(files)
    names = list(dict.fromkeys(n for f in files for n in f.layer_names))
    report = ToolReport(str(out), operation)
    layers: dict[str, Factors] = {}
    for done, name in enumerate(names):
        if progress is not None:
            progress(done, len(names), name)
        terms = []
        for lora, (_, weight) in zip(files, inputs):
            if name in lora.layers and weight != 0.0:
                (layer,) = iter_layers(lora, torch.float64, [name])
                terms.append((layer.factors(), float(weight)))
        if not terms:
            report.skipped.append(name)
            continue
        summed = weighted_sum(terms)
        factors, cut = _truncation_of(summed, rank, energy)
        layers[name] = factors
        report.layers.append(LayerReport(name, summed[1].shape[0], factors[1].shape[0], *(_cut_numbers(cut))))
    sources = [{"file": Path(p).name, "sha256_16": content_hash(p), "weight": float(w)} for p, w in inputs]
    meta = _provenance(
        operation, sources, rank=rank, energy=energy, energy_kept_min=report.summary()["energy_kept_min"]
    )
    save_lora(out, layers, fmt, dims, dtype, meta)
    return report


def _cut_numbers(cut: Truncation | None) -> tuple[float, float, float]:
    return (1.0, 0.0, 0.0) if cut is None else (cut.energy_kept, cut.error, cut.relative_error)


def difference(a, b, out, **kw) -> ToolReport:
    """``B - A``: applying the result once equals applying B at +1 and A at -1."""
    return combine_loras([(b, 1.0), (a, -1.0)], out, "difference", **kw)


def merge(paths: Sequence, weights: Sequence[float], out, **kw) -> ToolReport:
    if len(paths) != len(weights):
        raise MetaLoRAError(f"{len(paths)} LoRAs but {len(weights)} weights")
    return combine_loras(list(zip(paths, weights)), out, "merge", **kw)


def resize(path, out, rank: int | None = None, energy: float | None = None, **kw) -> ToolReport:
    """Each layer truncated by SVD; the per-layer Frobenius error is exactly the discarded spectrum."""
    if rank is None and energy is None:
        raise MetaLoRAError("resize: give a rank or an energy fraction to keep")
    return combine_loras([(path, 1.0)], out, "resize", rank=rank, energy=energy, **kw)


def rescale(path, out, factor: float, **kw) -> ToolReport:
    """Every change multiplied by ``factor`` (ranks kept); also converts naming with ``fmt``."""
    return combine_loras([(path, float(factor))], out, "rescale", **kw)


# --- extraction from two checkpoints ---------------------------------------------------------------------


def _keys(path) -> set[str]:
    try:
        with safe_open(str(path), "pt") as fh:
            return set(fh.keys())
    except (SafetensorError, OSError) as exc:
        raise MetaLoRAError(f"{path}: not a readable safetensors file ({exc})") from None


def _weight_key(keys: set[str], name: str, path) -> str:
    for prefix in _BFL_PREFIXES:
        key = f"{prefix}{name}.weight"
        if key in keys:
            return key
    raise MetaLoRAError(f"{path}: layer '{name}' is missing (no '{name}.weight')")


def layer_difference(tuned, base, key_t: str, key_b: str, chunk_rows: int = 1024) -> torch.Tensor:
    """``tuned - base`` of one weight (float32, or float64 for float64 checkpoints), both read through row
    slices (``get_slice``): peak memory is the one result plus two slices of rows."""
    tuned_slice, base_slice = tuned.get_slice(key_t), base.get_slice(key_b)
    shape, base_shape = tuple(tuned_slice.get_shape()), tuple(base_slice.get_shape())
    if shape != base_shape or len(shape) != 2:
        raise MetaLoRAError(f"layer '{key_t}': fine-tuned {shape} vs base {base_shape}")
    dtype = torch.float64 if "F64" in (tuned_slice.get_dtype(), base_slice.get_dtype()) else torch.float32
    delta = torch.empty(shape, dtype=dtype)
    for r in range(0, shape[0], chunk_rows):
        rows = slice(r, min(r + chunk_rows, shape[0]))
        torch.sub(tuned_slice[rows].to(dtype), base_slice[rows].to(dtype), out=delta[rows])
    return delta


def frobenius_energy(delta: torch.Tensor, chunk_rows: int = 1024) -> float:
    """``||delta||_F^2`` accumulated in float64 over blocks of rows (a float64 cast of the whole layer
    would double the peak memory of extraction)."""
    return sum(
        float(torch.linalg.vector_norm(delta[r : r + chunk_rows], dtype=torch.float64)) ** 2
        for r in range(0, delta.shape[0], chunk_rows)
    )


def extract(
    base: str | os.PathLike,
    tuned: str | os.PathLike,
    out: str | os.PathLike,
    rank: int = 16,
    energy: float | None = None,
    preset: str = "all_linear",
    fmt: str = "kohya",
    dtype: torch.dtype = torch.float32,
    oversample: int = 16,
    chunk_rows: int = 1024,
    progress: Progress | None = None,
) -> ToolReport:
    """A LoRA of ``tuned - base`` by truncated (randomized) SVD, one layer at a time.

    ``rank`` is the rank written (with ``energy``: the cap, the rank then being the smallest reaching that
    fraction of each layer's ``||delta||_F^2``). Unchanged layers are skipped. Both checkpoints are ComfyUI
    single files (FLUX.1 in BFL names, Qwen-Image in its own); they are never loaded whole."""
    if rank < 1:
        raise MetaLoRAError(f"extract: rank {rank}; use 1 or more (with an energy fraction it is the cap)")
    dims_b, layout_b = read_model_dims(base)
    dims_t, layout_t = read_model_dims(tuned)
    if Path(base).is_dir() or Path(tuned).is_dir():
        raise MetaLoRAError(
            "extract reads single-file checkpoints (ComfyUI's diffusion_models files), not folders"
        )
    if "diffusers" in (layout_b, layout_t) and family_of(dims_b).name == "flux":
        raise MetaLoRAError(
            "extract reads BFL / ComfyUI single-file FLUX checkpoints, not diffusers-named ones"
        )
    if dims_b != dims_t:
        raise MetaLoRAError(f"{tuned} ({dims_t}) and {base} ({dims_b}) are different model sizes")
    targets = resolve_targets(dims_b, preset)
    report = ToolReport(str(out), "extract")
    layers: dict[str, Factors] = {}
    keys_t, keys_b = _keys(tuned), _keys(base)
    for done, target in enumerate(targets):
        if progress is not None:
            progress(done, len(targets), target.name)
        key_t, key_b = _weight_key(keys_t, target.name, tuned), _weight_key(keys_b, target.name, base)
        try:  # opened per layer: closing unmaps the file, so its pages never pile up in this process
            with safe_open(str(tuned), "pt") as ft, safe_open(str(base), "pt") as fb:
                delta = layer_difference(ft, fb, key_t, key_b, chunk_rows)
        except SafetensorError as exc:
            raise MetaLoRAError(f"reading layer '{target.name}' of {tuned} / {base} failed: {exc}") from None
        total = frobenius_energy(delta, chunk_rows)
        if total == 0.0:
            report.skipped.append(target.name)
            continue
        svd = dense_svd(delta, rank, oversample)
        del delta
        k = choose_rank(svd.s, rank=None if energy else rank, energy=energy, total_energy=total)
        (up, down), cut = truncate(svd, min(k, rank), total)
        layers[target.name] = (up, down)
        rank_in = min(target.out_features, target.in_features)
        report.layers.append(LayerReport(target.name, rank_in, cut.rank, *_cut_numbers(cut)))
    sources = [  # no content hash: hashing two multi-GB checkpoints would cost more than the extraction
        {"file": Path(base).name, "role": "base", "bytes": os.path.getsize(base)},
        {"file": Path(tuned).name, "role": "fine-tuned", "bytes": os.path.getsize(tuned)},
    ]
    meta = _provenance(
        "extract",
        sources,
        rank=rank,
        energy=energy,
        preset=preset,
        energy_kept_min=report.summary()["energy_kept_min"],
    )
    save_lora(out, layers, fmt, dims_b, dtype, meta)
    return report
