"""The demo's LoMDs, one per source (docs/lomd-sources.md): meta-trained, distilled from LoRAs, seeded.

Tiny default: all three, so the report compares them on the same photo and budget. The meta-trained one
learns over drawn identities (`metalora meta-train`); the distilled one is the input subspace of plain
LoRAs trained on drawn identities (the stand-in for a user's collection of person LoRAs, `metalora lomd
distill`); the seeded one has no prior (`metalora lomd seeded`). With real weights: the given --lomd, or
a seeded one (honest fallback: it runs, without a prior).
"""

from __future__ import annotations

from pathlib import Path

from ..safeio import save_tensors
from .commands import cli

DISTILL_IDENTITIES = 4  # plain LoRAs trained for the distilled LoMD
DISTILL_STEPS = 40


def lomd_stage_title(opt) -> str:
    if opt.lomd:
        return "using the given LoMD"
    if opt.tiny:
        return "meta-training, distilling and seeding tiny LoMDs"
    return "seeding a LoMD (no --lomd given: no prior)"


def make_lomds(opt, kit: dict, backend, vae, cond, out: Path, run, stages) -> None:
    """Fill ``kit['lomds']`` (kind -> file) and ``run.lomds`` (kind -> source, file, numbers)."""
    kit["lomds"] = {}
    if opt.lomd:
        _add(kit, run, "given", opt.lomd, "given with --lomd")
        return
    if opt.tiny:
        _meta_trained(opt, kit, out, run, stages)
        _distilled(opt, kit, backend, vae, cond, out, run, stages)
    _seeded(opt, kit, out, run)


def _add(kit: dict, run, kind: str, path: str, source: str, **extra) -> None:
    kit["lomds"][kind] = str(path)
    run.lomds[kind] = {"file": str(path), "source": source, **extra}


def _meta_trained(opt, kit: dict, out: Path, run, stages) -> None:
    path = out / "lomd_meta_trained.safetensors"
    steps = opt.setting("meta_steps")
    summary = cli(
        [
            "meta-train", "--flux", kit["flux"], "--vae", kit["vae"], "--conditioning", kit["conditioning"],
            "--data", kit["identities"], "--out", str(path), "--resolution", "128", "--identities-per-batch", "2",
            "--steps", str(steps), "--lr", "1e-3", "--lr-heads", "4e-3", "--warmup", "10",
            "--seed", str(opt.seed), "--device", opt.device, "--quiet",
            "--max-aspect-error", "0.8",  # the demo drew these photos itself: every one of them trains
        ],
        run,
    )  # fmt: skip
    stages.note(
        f"meta-trained over {summary.get('identities')} drawn identities: loss {summary.get('first_loss'):.4f} "
        f"-> {summary.get('final_loss'):.4f} in {steps} steps"
    )
    source = f"meta-trained (stage 1, the paper's way) on {summary.get('identities')} drawn identities, {steps} steps"
    _add(kit, run, "meta-trained", path, source, summary=summary)


def _square_photos(folder: Path, count: int) -> list[Path]:
    """The first square photo of each of the first ``count`` identities (every one has some)."""
    from PIL import Image

    photos = []
    for identity in sorted(p for p in folder.iterdir() if p.is_dir())[:count]:
        for photo in sorted(identity.glob("*.png")):
            with Image.open(photo) as im:
                if im.width == im.height:
                    photos.append(photo)
                    break
    return photos


def _distilled(opt, kit: dict, backend, vae, cond, out: Path, run, stages) -> None:
    """Plain rank-4 LoRAs on a few drawn identities (a user's LoRA collection in miniature), then distil."""
    from PIL import Image

    from ..training.data import encode_views, make_views
    from ..training.lora_baseline import train_lora_baseline
    from ..training.personalize import PersonalizeConfig
    from ..training.standalone import vae_encoder

    folder = out / "person_loras"
    for i, photo in enumerate(_square_photos(Path(kit["identities"]), DISTILL_IDENTITIES)):
        views = make_views(Image.open(photo).convert("RGB"), 4, 128, None, opt.seed + i)
        latents = encode_views(views.images, vae_encoder(vae))
        config = PersonalizeConfig(steps=DISTILL_STEPS, lr=4e-3, warmup_steps=5, seed=opt.seed + i)
        lora = train_lora_baseline(backend, latents, cond, config, rank=4).lora
        save_tensors(
            folder / f"{photo.parent.name}.safetensors", lora, {"demo": "plain LoRA of a drawn identity"}
        )
    path = out / "lomd_distilled.safetensors"
    summary = cli(
        ["lomd", "distill", "--loras", str(folder), "--model", kit["flux"], "--out", str(path), "--seed",
         str(opt.seed), "--quiet"],
        run,
    )  # fmt: skip
    kept = summary.get("energy_kept_mean") or 0.0
    stages.note(
        f"distilled from {summary.get('loras_used')} plain LoRAs of drawn identities "
        f"(mean share of their delta energy the Down keeps: {kept:.1%})"
    )
    source = (
        f"distilled from {summary.get('loras_used')} plain rank-4 LoRAs ({DISTILL_STEPS} steps each) of drawn "
        "identities: the input subspace their deltas share"
    )
    _add(kit, run, "distilled", path, source, summary=summary)


def _seeded(opt, kit: dict, out: Path, run) -> None:
    path = out / "lomd_seeded.safetensors"
    cli(["lomd", "seeded", "--model", kit["flux"], "--out", str(path), "--seed", str(opt.seed)], run)
    _add(kit, run, "seeded", path, "seeded: orthonormal random Down, no prior (runs with FLUX alone)")
