"""``metalora personalize``: one photo -> an identity adapter (+ loss-curve PNG), on a standalone FLUX.

Also ``metalora dev tiny-vae`` and ``metalora dev random-conditioning``, so the whole command runs in tests.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from PIL import Image

from ..errors import MetaLoRAError
from ..faces.images import load_image
from ..formats import load_lomd, save_identity
from ..training.conditioning import encode_prompt, load_conditioning
from ..training.data import (
    DEFAULT_CAPTION,
    AugmentConfig,
    augment_settings,
    cached_latents,
    caption,
    encode_views,
    face_loss_weights,
    make_views,
    view_cache_key,
)
from ..training.diffusers_backend import DiffusersFluxBackend
from ..training.loss_plot import save_loss_curve
from ..training.personalize import PersonalizeConfig, personalize
from ..training.schedules import SCHEDULES, TrainingDiverged
from ..training.standalone import find_parts, load_vae, vae_encoder

# options whose argparse dest is a PersonalizeConfig field of the same name
CONFIG_ARGS = (
    "steps", "lr", "lr_mid", "lr_up", "schedule", "warmup_steps", "batch_size", "bf16",
    "gradient_checkpointing", "seed", "guidance", "rank_mid", "checkpoint_every", "resume_from",
)  # fmt: skip
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _face_box(text: str | None) -> tuple[float, float, float, float] | None:
    if not text:
        return None
    try:
        x0, y0, x1, y1 = (float(v) for v in text.split(","))
    except ValueError:
        raise MetaLoRAError(f"--face-box '{text}': give four pixel numbers x0,y0,x1,y1") from None
    return x0, y0, x1, y1


class ProgressBar:
    """tqdm progress bar on stderr (silent with --quiet); shared by every training command."""

    def __init__(self, total: int, quiet: bool) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=total, disable=quiet, file=sys.stderr, unit="step", dynamic_ncols=True)

    def __call__(self, p) -> None:
        self.bar.n = p.step
        self.bar.set_postfix(loss=f"{p.loss:.4f}", lr=f"{p.lr:.2e}", eta=f"{p.eta_s:.0f}s", refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()


def run(args) -> int:
    out = Path(args.out)
    parts = find_parts(args.flux, args.vae)
    if parts.vae is None:
        raise MetaLoRAError(
            f"{args.flux}: no VAE found; pass --vae with a diffusers AutoencoderKL folder (FLUX.1-dev's vae/)"
        )
    photo = Image.fromarray(load_image(args.image))  # EXIF rotation applied, as everywhere else
    lomd = load_lomd(args.lomd)
    device = torch.device(args.device)
    backend = DiffusersFluxBackend.from_path(parts.transformer, dtype=DTYPES[args.dtype], device=device)
    prompt = caption(args.trigger, args.subject_class, args.caption)
    if args.conditioning:
        cond = load_conditioning(args.conditioning, backend.dims)
    elif parts.text_encoders is not None:
        cond = encode_prompt(parts.text_encoders, prompt, device)
    else:
        raise MetaLoRAError(
            f"{args.flux}: no text encoders; pass --conditioning FILE.safetensors (tensors 'context' and "
            "'pooled') or a FLUX pipeline folder with text_encoder/, text_encoder_2/, tokenizer/, tokenizer_2/"
        )
    face_box = _face_box(args.face_box)
    augment = AugmentConfig(strength=args.augment)
    views = make_views(photo, args.views, args.resolution, face_box, args.seed, augment)
    key = view_cache_key(
        photo.tobytes(),
        augment_settings(augment, args.views, args.resolution, face_box, args.seed),
        str(parts.vae),
    )
    vae_path = parts.vae
    latents = cached_latents(  # the VAE is only loaded when the views are not cached yet
        args.cache_dir, key, lambda: encode_views(views.images, vae_encoder(load_vae(vae_path, device)))
    )
    weights = face_loss_weights(views, inside=args.face_weight) if args.face_weight != 1.0 else None
    config = PersonalizeConfig(
        **{name: getattr(args, name) for name in CONFIG_ARGS},
        checkpoint_path=str(out.with_suffix(".ckpt.safetensors")) if args.checkpoint_every else None,
        extra={
            "image": Path(args.image).name,
            "caption": prompt,
            "trigger": args.trigger,
            "class": args.subject_class,
            "resolution": args.resolution,
            "bucket": list(views.bucket),
            "views": args.views,
            "augment_strength": args.augment,
            "face_box": face_box,
            "face_weight": args.face_weight,
            "flux": Path(args.flux).name,
        },
    )
    bar = ProgressBar(config.steps, args.quiet)
    try:
        result = personalize(backend, lomd, latents, cond, config, on_progress=bar, weights=weights)
    except TrainingDiverged as exc:
        if exc.result is not None and exc.result.steps_done:
            kept = save_identity(out.with_suffix(".last_finite.safetensors"), exc.result.adapter)
            raise MetaLoRAError(f"{exc} (saved to {kept})") from None
        raise
    finally:
        bar.close()
    path = save_identity(out, result.adapter)
    plot = save_loss_curve(out.with_suffix(".loss.png"), result.losses, f"{out.name}: loss per step")
    print(
        json.dumps(
            {
                "written": str(path),
                "loss_curve": str(plot),
                "steps": result.steps_done,
                "seconds": round(result.seconds, 2),
                "first_loss": result.losses[0],
                "final_loss": result.losses[-1],
                "bucket": list(views.bucket),
                "fingerprint": result.adapter.fingerprint,
            }
        )
    )
    return 0


def add_run_options(
    p, resume_help: str = "continue from a checkpoint written with the same settings"
) -> None:
    """Options every standalone training command shares: guidance, precision, memory, checkpoints, device."""
    p.add_argument("--guidance", type=float, default=1.0, help="FLUX.1-dev guidance input in training")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast of the forward")
    p.add_argument(
        "--checkpointing",
        dest="gradient_checkpointing",
        action="store_true",
        help="gradient checkpointing (less memory)",
    )
    p.add_argument("--checkpoint-every", type=int, default=0, help="write OUT.ckpt.safetensors every N steps")
    p.add_argument("--resume", dest="resume_from", help=resume_help)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="transformer weight dtype")


def register(sub) -> None:
    p = sub.add_parser(
        "personalize",
        help="train an identity adapter (Mid/Up) from ONE photo against a LoMD (stage 2)",
        description="Train an identity adapter from one photo. FLUX: a diffusers pipeline folder (transformer/, "
        "vae/, text_encoder*/, tokenizer*/) or a transformer file/folder plus --vae and --conditioning.",
    )
    p.add_argument("--flux", required=True, help="FLUX pipeline folder, or a BFL/diffusers transformer")
    p.add_argument("--lomd", required=True, help="the LoMD (.safetensors) to train against")
    p.add_argument("--image", required=True, help="the one photo of the person")
    p.add_argument(
        "--out", required=True, help="identity adapter to write (.safetensors); a .loss.png goes beside"
    )
    p.add_argument("--vae", help="diffusers AutoencoderKL folder (default: the pipeline's vae/)")
    p.add_argument(
        "--conditioning", help="precomputed text features: 'context' (tokens, ctx) and 'pooled' (vec,)"
    )
    p.add_argument("--steps", type=int, default=375, help="optimizer steps (default 375, the paper's)")
    p.add_argument(
        "--lr", type=float, default=PersonalizeConfig.lr, help="learning rate (default %(default)s)"
    )
    p.add_argument("--lr-mid", type=float, help="own learning rate for Mid (default: --lr)")
    p.add_argument("--lr-up", type=float, help="own learning rate for Up (default: --lr)")
    p.add_argument("--schedule", choices=SCHEDULES, default="constant", help="LR decay after warm-up")
    p.add_argument(
        "--warmup",
        dest="warmup_steps",
        type=int,
        default=PersonalizeConfig.warmup_steps,
        help="warm-up steps",
    )
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--rank-mid", type=int, help="Mid rank (default: the LoMD's)")
    p.add_argument("--seed", type=int, default=0, help="seed of views, init, timesteps and noise")
    p.add_argument("--resolution", type=int, default=512, help="pixel budget side (buckets of ~res^2 pixels)")
    p.add_argument("--views", type=int, default=16, help="augmented views made from the photo (default 16)")
    p.add_argument("--augment", type=float, default=1.0, help="augmentation strength (0 = none, default 1)")
    p.add_argument("--face-box", help="x0,y0,x1,y1 of the face in the photo: crops always keep it")
    p.add_argument(
        "--face-weight", type=float, default=1.0, help="loss weight inside the face box (default 1)"
    )
    p.add_argument("--trigger", default="ohwx", help="trigger word (default ohwx)")
    p.add_argument("--class", dest="subject_class", default="person", help="class word (default person)")
    p.add_argument("--caption", default=DEFAULT_CAPTION, help="caption template (default '%(default)s')")
    p.add_argument("--cache-dir", help="keep the encoded views here and reuse them next time")
    add_run_options(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def _tiny_vae(args) -> int:
    from ..dev.tiny_vae import write_tiny_vae

    print(json.dumps({"written": str(write_tiny_vae(args.out, args.seed))}))
    return 0


def _random_conditioning(args) -> int:
    from ..dev.conditioning import write_random_conditioning

    path = write_random_conditioning(args.model, args.out, args.tokens, args.seed)
    print(json.dumps({"written": str(path)}))
    return 0


def _tiny_pipeline(args) -> int:
    from ..dev.tiny_pipeline import write_tiny_pipeline

    print(json.dumps({"written": str(write_tiny_pipeline(args.out, seed=args.seed))}))
    return 0


def register_dev(dsub) -> None:
    p = dsub.add_parser(
        "tiny-pipeline",
        help="a tiny FLUX pipeline folder (transformer, vae, CLIP + T5 text encoders, tokenizers)",
    )
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_tiny_pipeline)
    p = dsub.add_parser("tiny-vae", help="a tiny FLUX-shaped diffusers VAE (16 latent channels, 8x)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_tiny_vae)
    p = dsub.add_parser("random-conditioning", help="random text features fitting a FLUX checkpoint")
    p.add_argument("--model", required=True, help="FLUX checkpoint (.safetensors or diffusers folder)")
    p.add_argument("--out", required=True, help="output .safetensors")
    p.add_argument("--tokens", type=int, default=16, help="text tokens (default 16)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_random_conditioning)
