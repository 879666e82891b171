"""Distil a LoMD from a collection of standard LoRAs: per layer, the input subspace their deltas share.

For each targeted layer the Down is the top-``r`` eigenvectors of ``G = sum_i w_i dW_i^T dW_i``. It is
computed in factored form and streamed:

* a LoRA's delta is ``dW = U D`` (stacked pieces, :meth:`LoraLayer.factors`); with ``U = Q R`` (thin QR),
  ``dW^T dW = (R D)^T (R D)``, so the LoRA adds the few rows ``sqrt(w) R D`` (rank x in), never an
  ``out x in`` matrix;
* those rows are merged into a fixed-size sketch ``B`` (``sketch_rank x in`` per layer) with
  ``B^T B = G`` exactly while the stacked rank fits, and the best rank-``sketch_rank`` approximation of
  ``G`` after (frequent-directions style). Memory is one sketch per layer plus ONE LoRA's rows, whatever
  the number of LoRAs;
* weighting ``w_i = 1 / ||dW_i||_F^2`` per layer: every LoRA contributes the same energy to every layer it
  covers, so one LoRA trained with a large learning rate or alpha cannot decide the subspace alone, and
  the Down is the directions most LoRAs use (docs/lomd-sources.md).

A file is committed to the sketches only after all its layers were read and checked, so a NaN in its last
layer cannot leave half a LoRA behind. A second streaming pass measures, per layer, the share of each
LoRA's delta energy the Down keeps (``||dW V^T||^2 / ||dW||^2``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..adapter import AdapterShape
from ..errors import MetaLoRAError
from ..formats import PROVENANCE_KEY, SOURCE_KEY, LoMD
from ..loras import LoraFile, LoraLayer, LoraReadError, content_hash, iter_layers, scan_loras
from ..models import family_of
from ..targets import DEFAULT_PRESET, FluxDims, resolve_targets
from .seeded import seeded_down

F64 = torch.float64
# callback(done, total, message): done/total count LoRA-file passes (two passes per file)
ProgressFn = Callable[[int, int, str], None]


class DistillCancelled(Exception):
    """The cancel callback said stop; nothing was written."""


@dataclass
class DistillConfig:
    rank_down: int = 4
    rank_mid: int = 16
    preset: str | list[str] = DEFAULT_PRESET
    sketch_rank: int | None = None  # None: max(8 * rank_down, 32)
    weighting: str = "energy"  # energy: w_i = 1/||dW_i||^2 per layer; none: w_i = 1
    seed: int = 0  # of the seeded Down of layers no LoRA covers
    dtype: torch.dtype = torch.float32  # of the LoMD's Downs (float64 keeps the exact result for tests)

    @property
    def sketch(self) -> int:
        return self.sketch_rank or max(8 * self.rank_down, 32)


@dataclass
class LayerEnergy:
    """Share of the LoRAs' delta energy the distilled Down keeps in one layer."""

    loras: int
    mean: float
    worst: float
    worst_lora: str


@dataclass
class DistillReport:
    lomd: LoMD
    used: list[tuple[str, str]]  # (path, content hash)
    skipped: list[tuple[str, str]]  # (path, reason)
    uncovered: list[str]  # target layers no LoRA covers (they got the seeded Down)
    energy: dict[str, LayerEnergy] = field(default_factory=dict)

    def summary(self) -> dict[str, object]:
        means = [e.mean for e in self.energy.values()]
        worst = min(self.energy.items(), key=lambda kv: kv[1].worst, default=None)
        return {
            "loras_used": len(self.used),
            "loras_skipped": [{"file": p, "reason": r} for p, r in self.skipped],
            "layers": len(self.lomd.downs),
            "layers_distilled": len(self.energy),
            "layers_seeded": self.uncovered,
            "energy_kept_mean": sum(means) / len(means) if means else None,
            "energy_kept_worst": (
                {"layer": worst[0], "share": worst[1].worst, "lora": worst[1].worst_lora} if worst else None
            ),
        }


def _rows(layer: LoraLayer) -> torch.Tensor:
    """``R D`` with ``(R D)^T (R D) == dW^T dW``: the LoRA's contribution without its out dimension."""
    up, down = layer.factors()
    r = torch.linalg.qr(up.to(F64), mode="r")[1]
    return r @ down.to(F64)


def _merge(sketch: torch.Tensor | None, rows: torch.Tensor, size: int) -> torch.Tensor:
    """Stack and keep the best rank-``size`` part: ``B^T B`` stays exactly ``G`` until the rank exceeds it."""
    stacked = rows if sketch is None else torch.cat([sketch, rows])
    if stacked.shape[0] <= size:
        return stacked
    evals, evecs = torch.linalg.eigh(stacked @ stacked.T)  # small: (k + r) x (k + r)
    return evecs[:, -size:].T @ stacked


def _top_subspace(sketch: torch.Tensor, rank: int, filler: torch.Tensor) -> torch.Tensor:
    """Top-``rank`` right singular vectors of the sketch, completed by ``filler`` where it has fewer."""
    _, s, vh = torch.linalg.svd(sketch, full_matrices=False)
    keep = int((s > s[0] * 1e-10).sum()) if s.numel() and s[0] > 0 else 0
    basis = vh[: min(rank, keep)]
    if basis.shape[0] < rank:  # too few directions: complete orthonormally from the seeded Down
        q, _ = torch.linalg.qr(torch.cat([basis, filler.to(F64)]).T)
        basis = torch.cat([basis, q[:, basis.shape[0] : rank].T])
    idx = basis.abs().argmax(dim=1)
    signs = torch.sign(basis[torch.arange(rank), idx])
    return basis * signs[:, None]  # deterministic orientation


def _file_rows(
    lora: LoraFile, names: set[str], config: DistillConfig, check: Callable[[], None]
) -> dict[str, torch.Tensor]:
    """Every targeted layer of one file as weighted rows (raises on a damaged layer: nothing committed)."""
    out = {}
    for layer in iter_layers(lora, F64, names):
        check()
        rows = _rows(layer)
        energy = float(rows.pow(2).sum())
        if energy == 0.0:
            continue
        out[layer.name] = rows / energy**0.5 if config.weighting == "energy" else rows
    return out


def distill_lomd(
    paths: Sequence[str | Path],
    dims: FluxDims,
    config: DistillConfig | None = None,
    on_progress: ProgressFn | None = None,
    should_cancel: Callable[[], bool] | None = None,
) -> DistillReport:
    """Distil a LoMD for a FLUX of ``dims`` from LoRA files; bad files are skipped by name, never fatal."""
    config = config or DistillConfig()
    if config.weighting not in ("energy", "none"):
        raise MetaLoRAError(f"weighting '{config.weighting}' is unknown (use 'energy' or 'none')")
    targets = {t.name: t.in_features for t in resolve_targets(dims, config.preset)}
    names = set(targets)

    def check() -> None:
        if should_cancel is not None and should_cancel():
            raise DistillCancelled()

    files, skipped = scan_loras(paths, dims)
    total = 2 * len(files)
    sketches: dict[str, torch.Tensor] = {}
    used: list[LoraFile] = []
    for i, lora in enumerate(files):
        check()
        if on_progress:
            on_progress(i, total, f"reading {Path(lora.path).name}")
        try:
            rows = _file_rows(lora, names, config, check)
        except LoraReadError as exc:
            skipped.append((exc.path, exc.reason))
            continue
        if not rows:
            skipped.append((lora.path, "covers none of the target layers"))
            continue
        for name, r in rows.items():
            sketches[name] = _merge(sketches.get(name), r, config.sketch)
        used.append(lora)
    if not used:
        reasons = "; ".join(f"{Path(p).name}: {r}" for p, r in skipped) or "no files given"
        raise MetaLoRAError(f"no usable LoRA to distil a LoMD from ({reasons})")
    downs, uncovered = {}, []
    for name, in_f in targets.items():
        filler = seeded_down(name, in_f, config.rank_down, config.seed)
        if name in sketches:
            downs[name] = _top_subspace(sketches[name], config.rank_down, filler).to(config.dtype)
        else:
            downs[name], _ = filler.to(config.dtype), uncovered.append(name)
    del sketches
    energy = _energy_pass(used, downs, names, len(files), total, on_progress, check)
    shape = AdapterShape(config.rank_down, config.rank_mid)
    lomd = LoMD(downs, shape, family_of(dims).name, dims.hidden, {})
    hashes = [(f.path, content_hash(f.path)) for f in used]
    report = DistillReport(lomd, hashes, skipped, uncovered, energy)
    provenance = {
        **report.summary(),
        "lora_hashes": [h for _, h in hashes],
        "lora_names": [Path(p).name for p, _ in hashes],
        "weighting": config.weighting,
        "sketch_rank": config.sketch,
        "seed": config.seed,
        "energy_per_layer": {n: [round(e.mean, 6), round(e.worst, 6), e.loras] for n, e in energy.items()},
    }
    lomd.metadata = {SOURCE_KEY: "distilled", PROVENANCE_KEY: json.dumps(provenance)}
    return report


def _energy_pass(
    used: list[LoraFile],
    downs: dict[str, torch.Tensor],
    names: set[str],
    offset: int,
    total: int,
    on_progress: ProgressFn | None,
    check: Callable[[], None],
) -> dict[str, LayerEnergy]:
    """Second pass: per layer, each LoRA's kept share ``||R D V^T||^2 / ||R D||^2``; mean and worst."""
    shares: dict[str, list[tuple[float, str]]] = {}
    for i, lora in enumerate(used):
        if on_progress:
            on_progress(
                offset + i * (total - offset) // len(used), total, f"measuring {Path(lora.path).name}"
            )
        for layer in iter_layers(lora, F64, names):
            check()
            rows = _rows(layer)
            energy = float(rows.pow(2).sum())
            if energy > 0:
                kept = float((rows @ downs[layer.name].to(F64).T).pow(2).sum()) / energy
                shares.setdefault(layer.name, []).append((kept, Path(lora.path).name))
    if on_progress:
        on_progress(total, total, "done")
    out = {}
    for name, values in shares.items():
        worst = min(values)
        out[name] = LayerEnergy(len(values), sum(v for v, _ in values) / len(values), worst[0], worst[1])
    return out
