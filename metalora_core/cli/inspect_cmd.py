"""``metalora inspect FILE``: a JSON summary of any file this project reads or writes."""

from __future__ import annotations

import json
import os

from ..formats import PROVENANCE_KEY, detect_kind, identity_from_tensors, lomd_from_tensors
from ..model_files import read_model_dims
from ..models import family_of
from ..safeio import fingerprint, load_tensors, read_keys
from ..training.checkpoint import FORMAT_CHECKPOINT
from ..training.conditioning import FORMAT_CONDITIONING

SOURCE_NOTES = {
    "meta-trained": "meta-learned prior (stage 1 over many identities, the paper's way)",
    "distilled": "prior distilled from person LoRAs (their shared input subspace)",
    "seeded": "NO prior: orthonormal random Down; behaves like a rank-r LoRA with a frozen random down projection",
    "random": "test asset (metalora dev random-lomd): no prior",
    "unknown": "made elsewhere or before sources were recorded",
}


def _model_summary(path: str) -> dict[str, object] | None:
    """Header-only summary when ``path`` is a FLUX checkpoint (real ones are 20+ GB: never read them whole)."""
    keys = set(read_keys(path))
    if not keys & {
        "img_in.weight",
        "x_embedder.weight",
        "model.diffusion_model.img_in.weight",
        "diffusion_model.img_in.weight",
    }:
        return None
    dims, layout = read_model_dims(path)
    summary = {
        "file": path,
        "kind": family_of(dims).name,
        "layout": layout,
        "bytes": os.path.getsize(path),
        "tensors": len(keys),
        "hidden_size": dims.hidden,
    }
    return {
        **summary,
        **_blocks(dims),
        "heads": dims.heads,
        "context_dim": dims.context_dim,
        "guidance_distilled": dims.guidance,
    }


def _blocks(dims) -> dict[str, int]:
    """Block counts under each family's own names (FLUX: double + single; Qwen-Image: one kind)."""
    if family_of(dims).name == "flux":
        return {"double_blocks": dims.depth, "single_blocks": dims.depth_single}
    return {"blocks": dims.depth}


# the project's other safetensors files, by their ``format`` metadata
OTHER_KINDS = {
    FORMAT_CONDITIONING: "conditioning",
    FORMAT_CHECKPOINT: "training checkpoint",
    "metalora.view_latents": "view latents",
}


def _other_summary(path: str, tensors, metadata) -> dict[str, object] | None:
    """Text features, training checkpoints and cached latents: named, with the sizes that matter."""
    fmt = metadata.get("format", "")
    kind = OTHER_KINDS.get(fmt)
    if kind is None and set(tensors) in ({"context"}, {"context", "pooled"}):
        kind = "conditioning"  # written by other tools without our metadata
    if kind is None:
        return None
    summary: dict[str, object] = {"file": path, "kind": kind, "format": fmt, "bytes": os.path.getsize(path)}
    if kind == "conditioning":
        context = tensors["context"]
        summary.update(
            tokens=int(context.shape[-2]),
            context_dim=int(context.shape[-1]),
            pooled_dim=int(tensors["pooled"].shape[-1]) if "pooled" in tensors else None,
        )
    elif kind == "view latents":
        summary["latents"] = list(tensors["latents"].shape) if "latents" in tensors else None
    else:
        summary.update(tensors=len(tensors), step=metadata.get("step"))
    return summary


def summarize(path: str) -> dict[str, object]:
    if os.path.isdir(path):
        dims, layout = read_model_dims(path)
        return {
            "file": path,
            "kind": family_of(dims).name,
            "layout": layout,
            "hidden_size": dims.hidden,
            **_blocks(dims),
        }
    model = _model_summary(path)
    if model is not None:
        return model
    tensors, metadata = load_tensors(path)
    other = _other_summary(path, tensors, metadata)
    if other is not None:
        return other
    kind = detect_kind(tensors, metadata)
    summary: dict[str, object] = {
        "file": path,
        "kind": kind,
        "tensors": len(tensors),
        "bytes": os.path.getsize(path),
        "parameters": sum(t.numel() for t in tensors.values()),
    }
    if kind in ("lomd", "identity"):
        parsed = (lomd_from_tensors if kind == "lomd" else identity_from_tensors)(tensors, metadata, path)
        summary.update(
            rank_down=parsed.shape.rank_down,
            rank_mid=parsed.shape.rank_mid,
            alpha=parsed.shape.effective_alpha,
            scale=parsed.shape.scale,
            base_arch=parsed.base_arch,
            hidden_size=parsed.hidden_size,
            fingerprint=parsed.fingerprint,
            targets=len(parsed.targets),
            target_names=parsed.targets,
        )
        if kind == "lomd":
            summary["layout"] = metadata.get("format", "foreign (auto-detected)")
            summary.update(lomd_source=parsed.origin, lomd_note=SOURCE_NOTES.get(parsed.origin, ""))
            if metadata.get(PROVENANCE_KEY):
                summary["provenance"] = json.loads(metadata[PROVENANCE_KEY])
        else:
            summary.update(
                lomd_fingerprint=parsed.lomd_fingerprint,
                lomd_source=parsed.lomd_origin,
                lomd_note=SOURCE_NOTES.get(parsed.lomd_origin, ""),
                training=parsed.training,
            )
    else:
        ranks = sorted(
            {
                int(t.shape[0])
                for k, t in tensors.items()
                if k.endswith((".lora_down.weight", ".lora_A.weight"))
            }
        )
        summary.update(fingerprint=fingerprint(tensors), ranks=ranks, format=metadata.get("format", ""))
    return summary


def run(args) -> int:
    print(json.dumps(summarize(args.file), indent=2, default=str))
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "inspect",
        help="print a JSON summary of a LoMD, identity, LoRA, FLUX, conditioning or checkpoint file",
    )
    p.add_argument(
        "file",
        help="a .safetensors file (LoMD, identity adapter, LoRA or FLUX checkpoint) or a diffusers FLUX folder",
    )
    p.set_defaults(func=run)
