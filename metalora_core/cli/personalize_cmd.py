"""``metalora personalize``: one photo -> an identity adapter (+ loss-curve PNG), on a standalone FLUX.1 or
Qwen-Image (the family is read from the transformer's tensors).

Also ``metalora dev tiny-vae`` and ``metalora dev random-conditioning``, so the whole command runs in tests.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
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
    photo_bucket,
    view_cache_key,
)
from ..training.loss_plot import save_loss_curve
from ..training.memory import activation_bytes, decide_checkpointing, layerwise_copy_bytes
from ..training.personalize import PersonalizeConfig, personalize
from ..training.precision import PRECISION_CHOICES, choose_precision
from ..training.schedules import SCHEDULES, TrainingDiverged, capped_warmup
from ..training.standalone import check_vae_matches, find_parts, load_transformer, load_vae, vae_encoder

# options whose argparse dest is a PersonalizeConfig field of the same name
CONFIG_ARGS = (
    "steps", "lr", "lr_mid", "lr_up", "schedule", "warmup_steps", "batch_size", "bf16",
    "seed", "guidance", "rank_mid", "checkpoint_every", "resume_from",
)  # fmt: skip


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


def check_run_options(args) -> None:
    """The options every standalone training command shares, judged before anything loads."""
    from . import preflight

    preflight.at_least(1, steps=args.steps)
    preflight.at_least(0, warmup=args.warmup_steps, checkpoint_every=args.checkpoint_every)
    preflight.at_least(0, guidance=args.guidance)
    preflight.resolution(args.resolution)
    preflight.existing(args.resume_from, "--resume", "file")
    choose_precision(args.dtype, device(args.device), None, args.bf16)  # --bf16 with a non-float32 --dtype


def device(name: str) -> torch.device:
    """``--device`` parsed and available, or one line saying what is."""
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise MetaLoRAError(f"--device {name}: not a device name (cpu, cuda, cuda:1, mps)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise MetaLoRAError(f"--device {name}: this torch has no CUDA device; use --device cpu")
    return dev


def _check(args) -> Path:
    """Everything the arguments alone decide, before the photo or any model is read."""
    from . import preflight

    check_run_options(args)
    preflight.at_least(1, views=args.views, batch_size=args.batch_size, rank_mid=args.rank_mid)
    preflight.at_least(0, augment=args.augment)
    preflight.positive(lr=args.lr, lr_mid=args.lr_mid, lr_up=args.lr_up, face_weight=args.face_weight)
    preflight.inputs(
        ("--flux", args.flux, "any"),
        ("--lomd", args.lomd, "file"),
        ("--image", args.image, "file"),
        ("--vae", args.vae, "dir"),
        ("--conditioning", args.conditioning, "file"),
    )
    _face_box(args.face_box)
    if args.face_box and args.face_model:
        raise MetaLoRAError("--face-box and --face-model both locate the face; give one of them")
    out = preflight.output_file(args.out)
    preflight.output_folder(args.cache_dir, "--cache-dir")
    return out


def _find_face(args, photo: Image.Image) -> tuple[float, float, float, float] | None:
    """The face box: given (--face-box), detected (--face-model, as the Train node does), or none."""
    if not args.face_model:
        return _face_box(args.face_box)
    from ..faces import face_box, load_analyzer

    box = face_box(np.asarray(photo), load_analyzer(args.insightface_root, args.face_model))
    if box is None:
        raise MetaLoRAError(
            f"--image {args.image}: face model '{args.face_model}' finds no face in the photo; use a photo "
            "where the face is clearly visible, give --face-box x0,y0,x1,y1, or leave out --face-model"
        )
    return box


def run(args) -> int:
    from . import preflight

    out = _check(args)
    parts = find_parts(args.flux, args.vae)
    if parts.vae is None:
        raise MetaLoRAError(
            f"{args.flux}: no VAE found; pass --vae with the model's diffusers VAE folder (FLUX.1-dev's or "
            "Qwen-Image's vae/)"
        )
    if not args.conditioning and parts.text_encoders is None:
        raise MetaLoRAError(
            f"{args.flux}: no text encoders; pass --conditioning FILE.safetensors (tensors 'context' and "
            "'pooled'; Qwen-Image: 'context' only) or a FLUX pipeline folder with text_encoder/, text_encoder_2/, "
            "tokenizer/, tokenizer_2/"
        )
    try:
        photo = Image.fromarray(load_image(args.image))  # EXIF rotation applied, as everywhere else
    except MetaLoRAError as exc:
        raise MetaLoRAError(f"--image {exc} (give a JPEG, PNG or WebP photo of the person)") from None
    bucket = photo_bucket(photo.width, photo.height, args.resolution)
    warning = preflight.photo_size(photo.size, bucket)
    if warning:
        preflight.say(f"metalora personalize: {warning}")
    try:
        lomd = load_lomd(args.lomd)
    except MetaLoRAError as exc:
        raise MetaLoRAError(f"--lomd {exc}") from None
    face_box = _find_face(args, photo)
    face_weight = args.face_weight if args.face_weight is not None else (2.0 if face_box else 1.0)
    dev = device(args.device)
    say = lambda text: preflight.say(f"metalora personalize: {text}", args.quiet)  # noqa: E731
    backend, precision = load_transformer(parts.transformer, args.dtype, dev, args.bf16, say)
    prompt = caption(args.trigger, args.subject_class, args.caption)
    if args.conditioning:
        cond = load_conditioning(args.conditioning, backend.dims)
    else:
        say(f"encoding the caption '{prompt}' with the text encoders of {parts.text_encoders}")
        cond = encode_prompt(parts.text_encoders, prompt, dev)
    augment = AugmentConfig(strength=args.augment)
    views = make_views(photo, args.views, args.resolution, face_box, args.seed, augment)
    key = view_cache_key(
        photo.tobytes(),
        augment_settings(augment, args.views, args.resolution, face_box, args.seed),
        str(parts.vae),
    )
    vae_path = parts.vae
    check_vae_matches(vae_path, backend.dims)

    def encode() -> list[torch.Tensor]:
        say(f"encoding {args.views} views of {bucket[0]}x{bucket[1]} px with the VAE {vae_path}")
        return encode_views(views.images, vae_encoder(load_vae(vae_path, dev)))

    latents = cached_latents(args.cache_dir, key, encode)  # the VAE is only loaded when not cached yet
    weights = face_loss_weights(views, inside=face_weight) if face_weight != 1.0 else None
    checkpointing = choose_checkpointing(
        args, backend, tuple(latents[0].shape[-2:]), cond.context.shape[0], args.batch_size, say
    )
    config = PersonalizeConfig(
        **{name: getattr(args, name) for name in CONFIG_ARGS},
        gradient_checkpointing=checkpointing,
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
            "face_model": args.face_model,
            "face_weight": face_weight,
            "flux": Path(args.flux).name,
        },
    )
    _, warmup_note = capped_warmup(config.steps, config.warmup_steps)
    if warmup_note:
        say(warmup_note)
    say(f"training {config.steps} steps at {bucket[0]}x{bucket[1]} px")
    bar = ProgressBar(config.steps, args.quiet)
    try:
        result = personalize(backend, lomd, latents, cond, config, on_progress=bar, weights=weights)
        for note in result.notes:
            if note != warmup_note:  # (said before training)
                say(note)
    except TrainingDiverged as exc:
        if exc.result is not None and exc.result.steps_done:
            last, adapter = out.with_suffix(".last_finite.safetensors"), exc.result.adapter
            kept = preflight.save_or_beside(last, lambda p: save_identity(p, adapter))
            raise MetaLoRAError(f"{exc} (saved to {kept})") from None
        raise
    finally:
        bar.close()
    try:
        path = preflight.save_or_beside(out, lambda p: save_identity(p, result.adapter))
    except preflight.SavedElsewhere as moved:
        try:  # the curve too, beside the result that was saved
            save_loss_curve(moved.path.with_suffix(".loss.png"), result.losses, f"{out.name}: loss per step")
        except OSError:
            pass
        raise
    plot = save_loss_curve(path.with_suffix(".loss.png"), result.losses, f"{out.name}: loss per step")
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
                "precision": precision.describe(),
                "gradient_checkpointing": checkpointing,
            }
        )
    )
    return 0


def choose_checkpointing(args, backend, latent_hw, text_tokens: int, batch: int, say) -> bool:
    """``--checkpointing auto|on|off`` resolved for this model, resolution and device, and said."""
    copies = layerwise_copy_bytes(backend.model, backend.dtype)  # 0 unless the weights are stored in fp8
    dtype = torch.bfloat16 if args.bf16 else backend.dtype
    without = (
        activation_bytes(backend.dims, latent_hw, text_tokens, batch, dtype, checkpointing=False) + copies
    )
    with_ = activation_bytes(backend.dims, latent_hw, text_tokens, batch, dtype, checkpointing=True)
    on, why = decide_checkpointing(args.checkpointing, backend.device, without, with_)
    say(f"gradient checkpointing {why}")
    return on


def add_run_options(
    p, resume_help: str = "continue from a checkpoint written with the same settings"
) -> None:
    """Options every standalone training command shares: guidance, precision, memory, checkpoints, device."""
    p.add_argument(
        "--guidance",
        type=float,
        default=1.0,
        help="FLUX.1-dev guidance input in training (Qwen-Image has none)",
    )
    p.add_argument(
        "--dtype",
        choices=PRECISION_CHOICES,
        default="auto",
        help="how FLUX's weights are held: auto (bf16 on a GPU, or the file's own dtype if smaller; float32 on "
        "the CPU), float32, bfloat16, float16, or float8_e4m3fn (fp8 weights, bf16 compute: about half the "
        "memory of bf16). Default: %(default)s",
    )
    p.add_argument(
        "--bf16",
        action="store_true",
        help="with --dtype float32 only: bf16 autocast of the forward (float32 weights, bf16 matmuls); "
        "--dtype bfloat16 is the leaner way to train in bf16",
    )
    p.add_argument(
        "--checkpointing",
        nargs="?",
        const="on",
        default="auto",
        choices=("auto", "on", "off"),
        help="gradient checkpointing: recompute each block in backward for far less activation memory, at "
        "~1.3-2x the step time. auto (default): on when a step would not fit in the GPU's free memory "
        "without it, off on the CPU; a bare --checkpointing means on",
    )
    p.add_argument("--checkpoint-every", type=int, default=0, help="write OUT.ckpt.safetensors every N steps")
    p.add_argument("--resume", dest="resume_from", help=resume_help)
    p.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="where FLUX runs: cpu, cuda, cuda:1, ... (default here: %(default)s)",
    )


def register(sub) -> None:
    p = sub.add_parser(
        "personalize",
        help="train an identity adapter (Mid/Up) from ONE photo against a LoMD (stage 2)",
        description="Train an identity adapter from one photo. FLUX: a diffusers pipeline folder (transformer/, "
        "vae/, text_encoder*/, tokenizer*/) or a transformer file/folder plus --vae and --conditioning.",
    )
    p.add_argument(
        "--flux",
        "--model",
        dest="flux",
        required=True,
        help="the base model: a FLUX.1 or Qwen-Image pipeline folder, or its transformer (BFL / ComfyUI / "
        "diffusers file or folder); --model is the same option",
    )
    p.add_argument("--lomd", required=True, help="the LoMD (.safetensors) to train against")
    p.add_argument("--image", required=True, help="the one photo of the person")
    p.add_argument(
        "--out", required=True, help="identity adapter to write (.safetensors); a .loss.png goes beside"
    )
    p.add_argument("--vae", help="diffusers AutoencoderKL folder (default: the pipeline's vae/)")
    p.add_argument(
        "--conditioning",
        help="precomputed text features ('context' (tokens, ctx), 'pooled' (vec,)), needed when --flux is a "
        "transformer file without text encoders: make them with `metalora encode-caption --text-encoders "
        "FLUX.1-dev/ --out cond.safetensors` (same --trigger/--class/--caption)",
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
    p.add_argument(
        "--batch-size",
        type=int,
        default=1,
        help="views per optimizer step (default 1: one photo, many views)",
    )
    p.add_argument("--rank-mid", type=int, help="Mid rank (default: the LoMD's)")
    p.add_argument("--seed", type=int, default=0, help="seed of views, init, timesteps and noise")
    p.add_argument("--resolution", type=int, default=512, help="pixel budget side (buckets of ~res^2 pixels)")
    p.add_argument("--views", type=int, default=16, help="augmented views made from the photo (default 16)")
    p.add_argument("--augment", type=float, default=1.0, help="augmentation strength (0 = none, default 1)")
    p.add_argument("--face-box", help="x0,y0,x1,y1 of the face in the photo: crops always keep it")
    p.add_argument(
        "--face-model",
        help="insightface model folder name (antelopev2, buffalo_l) or path: finds the face box, as the Train "
        "node does; crops keep the face and the loss weighs it --face-weight times",
    )
    p.add_argument(
        "--insightface-root",
        default="~/.insightface",
        help="folder holding insightface/models/<name>/ (ComfyUI's models folder) or models/<name>/",
    )
    p.add_argument(
        "--face-weight",
        type=float,
        help="loss weight inside the face box (default: 2 when the face is known from --face-box or "
        "--face-model, as in the Train node; else 1)",
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
    p.add_argument("--seed", type=int, default=0, help="random seed of the weights / drawings")
    p.set_defaults(func=_tiny_pipeline)
    p = dsub.add_parser("tiny-vae", help="a tiny FLUX-shaped diffusers VAE (16 latent channels, 8x)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--seed", type=int, default=0, help="random seed of the weights / drawings")
    p.set_defaults(func=_tiny_vae)
    p = dsub.add_parser(
        "random-conditioning", help="random text features fitting a FLUX.1 or Qwen-Image checkpoint"
    )
    p.add_argument(
        "--model", required=True, help="FLUX.1 or Qwen-Image checkpoint (.safetensors or diffusers folder)"
    )
    p.add_argument("--out", required=True, help="output .safetensors")
    p.add_argument("--tokens", type=int, default=16, help="text tokens (default 16)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the weights / drawings")
    p.set_defaults(func=_random_conditioning)
