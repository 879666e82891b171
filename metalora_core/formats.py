"""File formats: LoMD, identity adapter, and standard LoRA exports (kohya / diffusers). See README "File formats".

Every file is safetensors with string metadata. Our own files carry ``format`` and ``format_version``;
readers also accept LoMDs in other plausible layouts (kohya or diffusers key names holding only down
matrices) and say which key they could not place otherwise.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .adapter import AdapterShape, fold_to_lora
from .errors import FingerprintMismatch, MetaLoRAError
from .models import ModelFamily, family_named, family_of, family_of_targets, family_placing
from .safeio import fingerprint, load_tensors, save_tensors
from .targets import FluxDims, diffusers_pieces, kohya_name

FORMAT_LOMD = "metalora.lomd"
FORMAT_IDENTITY = "metalora.identity"
FORMAT_VERSION = 1
DOWN_SUFFIX = ".meta_down.weight"
# Where a LoMD comes from (metadata key of LoMDs, copied into every identity trained against one): see
# docs/lomd-sources.md. Not to be confused with ``LoMD.source``, the file a LoMD was read from.
SOURCE_KEY = "lomd_source"
PROVENANCE_KEY = "lomd_provenance"  # JSON: how it was made (seed, LoRA hashes, energy summary, ...)
LOMD_SOURCES = ("meta-trained", "distilled", "seeded", "random")
UNKNOWN_SOURCE = "unknown"
MID_SUFFIX = ".lom.weight"
UP_SUFFIX = ".lou.weight"


def _short(kind: str, obj: LoMD | IdentityAdapter, extra: list[str]) -> str:
    """One line naming what an adapter object is (never its tensors: ComfyUI prints inputs with ``str`` in its
    error reports, and a FLUX.1-dev LoMD or identity printed in full would be gigabytes of text)."""
    parts = [f"{len(obj.targets)} layers", f"rank_down {obj.shape.rank_down}", *extra]
    if obj.hidden_size:
        parts.append(f"hidden {obj.hidden_size}")
    parts += [f"fingerprint {obj.fingerprint}", f"from {obj.source}"]
    return f"{kind}({', '.join(parts)})"


@dataclass(repr=False)
class LoMD:
    """The shared Meta-Down: one ``rank_down x in`` matrix per canonical target."""

    downs: dict[str, torch.Tensor]
    shape: AdapterShape
    base_arch: str = "flux"
    hidden_size: int | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    source: str = "<memory>"

    @property
    def targets(self) -> list[str]:
        return list(self.downs)

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.downs)

    @property
    def origin(self) -> str:
        """``meta-trained``, ``distilled``, ``seeded``, ``random`` or ``unknown`` (a file from elsewhere)."""
        return self.metadata.get(SOURCE_KEY) or UNKNOWN_SOURCE

    def __repr__(self) -> str:
        return _short("LoMD", self, [f"{self.origin}"])


@dataclass(repr=False)
class IdentityAdapter:
    """Per-identity Mid (``rank_mid x rank_down``) and Up (``out x rank_mid``) per canonical target."""

    mids: dict[str, torch.Tensor]
    ups: dict[str, torch.Tensor]
    shape: AdapterShape
    lomd_fingerprint: str
    training: dict[str, object] = field(default_factory=dict)
    base_arch: str = "flux"
    hidden_size: int | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    source: str = "<memory>"

    @property
    def targets(self) -> list[str]:
        return list(self.mids)

    @property
    def lomd_origin(self) -> str:
        """Where the LoMD this identity was trained against came from (``seeded`` = no prior)."""
        return self.metadata.get(SOURCE_KEY) or UNKNOWN_SOURCE

    @property
    def fingerprint(self) -> str:
        return fingerprint(
            {
                **{k + MID_SUFFIX: v for k, v in self.mids.items()},
                **{k + UP_SUFFIX: v for k, v in self.ups.items()},
            }
        )

    def __repr__(self) -> str:
        lomd = f"for LoMD {self.lomd_fingerprint or 'unknown'} ({self.lomd_origin})"
        extra = [f"rank_mid {self.shape.rank_mid}", lomd]
        return _short("MetaLoRA identity", self, extra)


# --- writing -------------------------------------------------------------------------------------------


def _common_meta(
    shape: AdapterShape, base_arch: str, hidden: int | None, targets: list[str]
) -> dict[str, object]:
    return {
        "format_version": str(FORMAT_VERSION),
        "rank_down": str(shape.rank_down),
        "rank_mid": str(shape.rank_mid),
        "alpha": str(shape.effective_alpha),
        "base_arch": base_arch,
        "hidden_size": str(hidden or ""),
        "targets": json.dumps(targets),
        "created_by": "metalora_core",
    }


def save_lomd(path: str | os.PathLike, lomd: LoMD) -> Path:
    tensors = {name + DOWN_SUFFIX: t for name, t in lomd.downs.items()}
    meta = {"format": FORMAT_LOMD, **_common_meta(lomd.shape, lomd.base_arch, lomd.hidden_size, lomd.targets)}
    meta["fingerprint"] = lomd.fingerprint
    meta.update({k: lomd.metadata[k] for k in (SOURCE_KEY, PROVENANCE_KEY) if lomd.metadata.get(k)})
    return save_tensors(path, tensors, meta)


def save_identity(path: str | os.PathLike, adapter: IdentityAdapter) -> Path:
    tensors = {name + MID_SUFFIX: t for name, t in adapter.mids.items()}
    tensors.update({name + UP_SUFFIX: t for name, t in adapter.ups.items()})
    meta = {
        "format": FORMAT_IDENTITY,
        **_common_meta(adapter.shape, adapter.base_arch, adapter.hidden_size, adapter.targets),
    }
    meta["lomd_fingerprint"] = adapter.lomd_fingerprint
    meta["fingerprint"] = adapter.fingerprint
    meta["training"] = json.dumps(adapter.training, default=str)
    if adapter.metadata.get(SOURCE_KEY):
        meta[SOURCE_KEY] = adapter.metadata[SOURCE_KEY]
    return save_tensors(path, tensors, meta)


# --- reading -------------------------------------------------------------------------------------------


def detect_kind(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> str:
    """``lomd``, ``identity``, ``lora`` (a standard LoRA with up and down) or ``unknown``."""
    fmt = metadata.get("format", "")
    if fmt == FORMAT_LOMD:
        return "lomd"
    if fmt == FORMAT_IDENTITY:
        return "identity"
    keys = list(tensors)
    has_up = any(k.endswith((".lora_up.weight", ".lora_B.weight")) for k in keys)
    has_down = any(k.endswith((".lora_down.weight", ".lora_A.weight", DOWN_SUFFIX)) for k in keys)
    if has_down and has_up:
        return "lora"
    if has_down:
        return "lomd"
    if any(k.endswith((MID_SUFFIX, UP_SUFFIX)) for k in keys):
        return "identity"
    return "unknown"


def _shape_from_meta(metadata: Mapping[str, str], rank_down: int, source: str) -> AdapterShape:
    try:
        rank_mid = int(metadata.get("rank_mid") or 16)
        alpha = float(metadata["alpha"]) if metadata.get("alpha") else None
        declared = int(metadata.get("rank_down") or rank_down)
    except ValueError as exc:
        raise MetaLoRAError(f"{source}: unreadable rank/alpha metadata ({exc})") from None
    if declared != rank_down:
        raise MetaLoRAError(
            f"{source}: metadata says rank_down={declared} but the tensors have rank {rank_down}"
        )
    return AdapterShape(rank_down=rank_down, rank_mid=rank_mid, alpha=alpha)


def _hidden(metadata: Mapping[str, str]) -> int | None:
    value = metadata.get("hidden_size", "")
    return int(value) if value.isdigit() else None


def _place_down_key(key: str, family: str = "flux") -> tuple[str, int] | None:
    """Map one key of a foreign LoMD layout to (canonical target, piece index)."""
    if key.endswith(DOWN_SUFFIX):
        return key[: -len(DOWN_SUFFIX)], 0
    m = re.fullmatch(r"(.+)\.(?:lora_down|lora_A)\.weight", key)
    if not m:
        return None
    prefix = m.group(1)
    for strip in ("diffusion_model.", "transformer.", "base_model.model.", "unet."):
        if prefix.startswith(strip):
            prefix = prefix[len(strip) :]
    hit = family_named(family).place_lora_prefix(prefix)
    return (hit.name, hit.piece) if hit else None


def _lomd_family(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> str:
    """The family a LoMD file is for: its metadata, its canonical names, else the family that places a key
    FLUX.1 cannot."""
    if metadata.get("base_arch"):
        return family_named(metadata["base_arch"]).name
    names = [k[: -len(DOWN_SUFFIX)] for k in tensors if k.endswith(DOWN_SUFFIX)]
    if names:
        return family_of_targets(names).name
    return family_placing(tensors, lambda key, family: _place_down_key(key, family.name) is not None).name


def lomd_from_tensors(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str], source: str) -> LoMD:
    kind = detect_kind(tensors, metadata)
    if kind == "identity":
        raise MetaLoRAError(
            f"{source}: this is an identity adapter (Mid/Up), not a LoMD; pass it as the adapter"
        )
    if kind == "lora":
        raise MetaLoRAError(
            f"{source}: this is a standard LoRA (it has up matrices); a LoMD holds only the shared down "
            "matrices. Load it with a LoRA loader instead"
        )
    downs: dict[str, torch.Tensor] = {}
    pieces: dict[str, dict[int, torch.Tensor]] = {}
    alphas: dict[str, float] = {}
    family = _lomd_family(tensors, metadata)
    label = family_named(family).label
    for key, value in tensors.items():
        if key.endswith(".alpha"):
            alphas[key[: -len(".alpha")]] = float(value.float().reshape(-1)[0])
            continue
        placed = _place_down_key(key, family)
        if placed is None and not any(
            _place_down_key(k, family) for k in tensors if not k.endswith(".alpha")
        ):
            raise MetaLoRAError(_not_a_lomd(tensors, metadata, source))
        if placed is None:
            raise MetaLoRAError(
                f"{source}: cannot place key '{key}' as a {label} LoMD down matrix (expected "
                f"'<{label} layer>{DOWN_SUFFIX}', kohya 'lora_unet_..._lora_down.weight' or diffusers "
                "'transformer....lora_A.weight')"
            )
        name, piece = placed
        if value.ndim != 2:
            raise MetaLoRAError(
                f"{source}: '{key}' should be a 2-D down matrix, got shape {tuple(value.shape)}"
            )
        pieces.setdefault(name, {})[piece] = value
    for name, parts in pieces.items():
        first = parts[min(parts)]
        for index, part in parts.items():
            if part.shape != first.shape or not torch.equal(part, first):
                raise MetaLoRAError(
                    f"{source}: the diffusers pieces of '{name}' (piece {index}) have different down matrices; "
                    "a LoMD shares one Down per fused FLUX layer"
                )
        downs[name] = first
    if not downs:
        raise MetaLoRAError(f"{source}: no down matrices found; this is not a LoMD")
    ranks = {t.shape[0] for t in downs.values()}
    if len(ranks) != 1:
        raise MetaLoRAError(f"{source}: down matrices have different ranks {sorted(ranks)}")
    rank_down = ranks.pop()
    meta = dict(metadata)
    if "alpha" not in meta and alphas:
        meta["alpha"] = str(next(iter(alphas.values())))
    shape = _shape_from_meta(meta, rank_down, source)
    lomd = LoMD(downs, shape, family, _hidden(meta), meta, source)
    declared = meta.get("fingerprint")
    if declared and declared != lomd.fingerprint:
        raise MetaLoRAError(
            f"{source}: content fingerprint {lomd.fingerprint} does not match its metadata ({declared}); the file is damaged"
        )
    return lomd


def _not_a_lomd(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str], source: str) -> str:
    """What a file given as a LoMD holds instead, in one line (no key of it is a down matrix)."""
    keys = sorted(tensors)
    sample = ", ".join(f"'{k}' {tuple(tensors[k].shape)}" for k in keys[:3])
    more = f" and {len(keys) - 3} more" if len(keys) > 3 else ""
    fmt = metadata.get("format")
    what = f"format '{fmt}', " if fmt else ""
    if any(
        re.match(r"(model\.diffusion_model\.)?(double_blocks|single_blocks)\.\d+\..*weight$", k) for k in keys
    ):
        what += "a FLUX model checkpoint, "
    return (
        f"{source}: this file is not a LoMD: it holds {what}{len(keys)} tensor(s) ({sample}{more}), none of them "
        f"a down matrix ('<flux layer>{DOWN_SUFFIX}', kohya '..._lora_down.weight' or diffusers "
        "'....lora_A.weight'). Make a LoMD with `metalora lomd seeded`, `metalora lomd distill` or "
        "`metalora meta-train`"
    )


def load_lomd(path: str | os.PathLike) -> LoMD:
    tensors, metadata = load_tensors(path)
    return lomd_from_tensors(tensors, metadata, str(path))


def identity_from_tensors(
    tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str], source: str
) -> IdentityAdapter:
    kind = detect_kind(tensors, metadata)
    if kind == "lomd":
        raise MetaLoRAError(
            f"{source}: this is a LoMD (shared Meta-Down), not an identity adapter; pass it as the LoMD"
        )
    if kind != "identity":
        raise MetaLoRAError(
            f"{source}: not a Meta-LoRA identity adapter (format '{metadata.get('format', '?')}', kind {kind})"
        )
    mids, ups = {}, {}
    for key, value in tensors.items():
        if key.endswith(MID_SUFFIX):
            mids[key[: -len(MID_SUFFIX)]] = value
        elif key.endswith(UP_SUFFIX):
            ups[key[: -len(UP_SUFFIX)]] = value
        else:
            raise MetaLoRAError(
                f"{source}: cannot place key '{key}' (expected '<flux layer>{MID_SUFFIX}' or '{UP_SUFFIX}')"
            )
    missing = sorted(set(mids) ^ set(ups))
    if missing:
        raise MetaLoRAError(f"{source}: layer '{missing[0]}' has a Mid without an Up or the reverse")
    first = next(iter(mids.values()))
    shape = _shape_from_meta(metadata, first.shape[1], source)
    for name in mids:
        if (
            tuple(mids[name].shape) != (shape.rank_mid, shape.rank_down)
            or ups[name].shape[1] != shape.rank_mid
        ):
            raise MetaLoRAError(
                f"{source}: layer '{name}' has Mid {tuple(mids[name].shape)} / Up {tuple(ups[name].shape)}, "
                f"expected Mid ({shape.rank_mid}, {shape.rank_down}) and Up (out, {shape.rank_mid})"
            )
    try:
        training = json.loads(metadata.get("training", "{}"))
    except json.JSONDecodeError:
        training = {}
    adapter = IdentityAdapter(
        mids,
        ups,
        shape,
        metadata.get("lomd_fingerprint", ""),
        training,
        metadata.get("base_arch") or family_of_targets(mids).name,
        _hidden(metadata),
        dict(metadata),
        source,
    )
    declared = metadata.get("fingerprint")
    if declared and declared != adapter.fingerprint:
        raise MetaLoRAError(
            f"{source}: content fingerprint {adapter.fingerprint} does not match its metadata ({declared}); the file is damaged"
        )
    return adapter


def load_identity(path: str | os.PathLike) -> IdentityAdapter:
    tensors, metadata = load_tensors(path)
    return identity_from_tensors(tensors, metadata, str(path))


# --- checks --------------------------------------------------------------------------------------------


def check_pair(lomd: LoMD, adapter: IdentityAdapter, force: bool = False) -> None:
    """Refuse an adapter trained against another LoMD (unless forced) or whose layers do not fit it."""
    if adapter.lomd_fingerprint and adapter.lomd_fingerprint != lomd.fingerprint and not force:
        raise FingerprintMismatch(
            f"identity adapter {adapter.source} was trained against LoMD {adapter.lomd_fingerprint}, but LoMD "
            f"{lomd.source} has fingerprint {lomd.fingerprint}. Use the LoMD it was trained with, or force it "
            "(results will not be what the adapter learned)"
        )
    for name in adapter.targets:
        if name not in lomd.downs:
            raise MetaLoRAError(
                f"identity adapter {adapter.source}: layer '{name}' has no Down in LoMD {lomd.source}"
            )
        down = lomd.downs[name]
        if adapter.mids[name].shape[1] != down.shape[0]:
            raise MetaLoRAError(
                f"layer '{name}': adapter Mid {tuple(adapter.mids[name].shape)} does not fit LoMD Down {tuple(down.shape)}"
            )


def check_lomd_fits(lomd: LoMD, shapes: Mapping[str, tuple[int, int]], model_name: str = "the model") -> None:
    """Check every Down against the model's fused ``(out, in)`` shapes; the message names layer and shapes."""
    _check_family("LoMD", lomd.source, lomd.base_arch, shapes, model_name)
    for name, down in lomd.downs.items():
        if name not in shapes:
            raise MetaLoRAError(f"LoMD {lomd.source}: layer '{name}' does not exist in {model_name}")
        out_f, in_f = shapes[name]
        if down.shape[1] != in_f:
            raise MetaLoRAError(
                f"LoMD {lomd.source} does not fit {model_name}: layer '{name}' has Down {tuple(down.shape)} "
                f"(input {down.shape[1]}) but the model's weight is ({out_f}, {in_f}) (input {in_f}). "
                f"The LoMD was made for a {family_named(lomd.base_arch).label} of another size"
            )


def _check_family(
    kind: str, source: str, base_arch: str, shapes: Mapping[str, tuple[int, int]], model_name: str
) -> None:
    """A file for one base model family used on another: say both families, not a missing layer."""
    if not shapes:
        return
    theirs, ours = family_named(base_arch), family_of_targets(shapes)
    if theirs.name != ours.name:
        raise MetaLoRAError(
            f"{kind} {source} is for {theirs.label}, but {model_name} is a {ours.label} model; "
            f"use a {ours.label} {kind} (or make one for this model)"
        )


def check_identity_fits(
    adapter: IdentityAdapter, shapes: Mapping[str, tuple[int, int]], model_name: str = "the model"
) -> None:
    """Check every Up against the model's fused ``(out, in)`` shapes; the message names layer and shapes."""
    _check_family("identity", adapter.source, adapter.base_arch, shapes, model_name)
    for name in adapter.targets:
        if name not in shapes:
            raise MetaLoRAError(f"identity {adapter.source}: layer '{name}' does not exist in {model_name}")
        out_f, in_f = shapes[name]
        if adapter.ups[name].shape[0] != out_f:
            raise MetaLoRAError(
                f"identity {adapter.source} does not fit {model_name}: layer '{name}' has Up "
                f"{tuple(adapter.ups[name].shape)} (output {adapter.ups[name].shape[0]}) but the model's weight "
                f"is ({out_f}, {in_f}) (output {out_f}). The identity was trained on a "
                f"{family_named(adapter.base_arch).label} of another size"
            )


# --- standard LoRA export ------------------------------------------------------------------------------


def fold_identity(
    lomd: LoMD, adapter: IdentityAdapter, strength: float = 1.0
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{target: (lora_up, lora_down)}`` with ``lora_up @ lora_down == strength * delta_W`` exactly."""
    check_pair(lomd, adapter, force=True)
    out = {}
    for name in adapter.targets:
        up, down = fold_to_lora(
            lomd.downs[name].double(),
            adapter.mids[name].double(),
            adapter.ups[name].double(),
            adapter.shape.scale * strength,
        )
        out[name] = (up, down)
    return out


LORA_FORMATS = ("kohya", "diffusers")


def _layers_family(layers: Mapping[str, object], dims) -> ModelFamily:
    """The family of the model's sizes, or (no sizes given) of the layers' canonical names."""
    return family_of(dims) if dims is not None else family_of_targets(layers)


def lora_tensors(
    layers: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    fmt: str = "kohya",
    dims: FluxDims | None = None,
    dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    """Standard LoRA tensors of ``{canonical layer: (up, down)}`` with ``up @ down == delta_W`` exactly.

    kohya / ComfyUI: ``lora_unet_*`` with ``alpha = rank`` (scale 1, so each layer may have its own rank);
    diffusers / peft: ``transformer.*.lora_A/B`` with fused layers split into row slices of ``up`` sharing
    ``down`` (``dims`` gives the slice sizes; only needed for fused layers)."""
    tensors: dict[str, torch.Tensor] = {}
    if fmt == "kohya":
        for name, (up, down) in layers.items():
            prefix = kohya_name(name)
            tensors[f"{prefix}.lora_up.weight"] = up.to(dtype).contiguous()
            tensors[f"{prefix}.lora_down.weight"] = down.to(dtype).contiguous()
            tensors[f"{prefix}.alpha"] = torch.tensor(float(down.shape[0]), dtype=dtype)
    elif fmt == "diffusers":
        family = _layers_family(layers, dims)
        for name, (up, down) in layers.items():
            pieces = diffusers_pieces(name, dims or family.dims_for_lora(up.shape[0], 0))
            if len(pieces) > 1 and dims is None:
                raise MetaLoRAError(
                    f"writing fused layer '{name}' in diffusers naming needs the model's sizes"
                )
            for module, rows in pieces:
                tensors[f"transformer.{module}.lora_A.weight"] = down.to(dtype).contiguous()
                tensors[f"transformer.{module}.lora_B.weight"] = (
                    (up if rows is None else up[rows]).to(dtype).contiguous()
                )
    else:
        raise MetaLoRAError(f"unknown LoRA format '{fmt}' (use one of {LORA_FORMATS})")
    return tensors


def save_lora(
    path: str | os.PathLike,
    layers: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    fmt: str = "kohya",
    dims: FluxDims | None = None,
    dtype: torch.dtype = torch.float32,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write ``{canonical layer: (up, down)}`` as a standard LoRA (atomic), with kohya-style metadata."""
    if not layers:
        raise MetaLoRAError(f"refusing to write {path}: no layer left to save")
    rank = max(int(down.shape[0]) for _, down in layers.values())
    family = _layers_family(layers, dims)
    meta = {
        "format": f"lora.{fmt}",
        "ss_network_module": family.kohya_network_module if fmt == "kohya" else "",
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(float(rank)),
        "ss_base_model_version": family.lora_base_version,
        **(metadata or {}),
    }
    return save_tensors(path, lora_tensors(layers, fmt, dims, dtype), meta)


def export_lora(
    path: str | os.PathLike,
    lomd: LoMD,
    adapter: IdentityAdapter,
    dims: FluxDims,
    fmt: str = "kohya",
    strength: float = 1.0,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write the folded identity as a standard LoRA that stock loaders read (kohya/ComfyUI or diffusers/peft)."""
    source = {"lomd": lomd.fingerprint, "identity": adapter.fingerprint, "strength": strength}
    folded = fold_identity(lomd, adapter, strength)
    return save_lora(path, folded, fmt, dims, dtype, {"metalora_source": json.dumps(source)})
