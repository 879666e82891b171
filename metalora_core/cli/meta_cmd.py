"""``metalora meta-train`` (stage 1: learn a LoMD over many identities), ``metalora dataset check`` and
``metalora dev synthetic-identities``.

``meta-train`` runs as is on one process, or data-parallel under ``torchrun --nproc_per_node N`` /
``accelerate launch`` (the same command; the launcher's environment says which process this is).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..errors import MetaLoRAError
from ..formats import save_identity, save_lomd
from ..meta.cache import cached_conditioning, item_latent
from ..meta.dataset import IdentitySet, load_identity_set, screen_faces, split_holdout
from ..meta.distributed import DistContext, init_from_env, shutdown
from ..meta.holdout import HoldoutCheck
from ..meta.prepare import DEFAULT_META_CAPTION, prepare
from ..meta.sampler import REMAINDER, BucketPlan, plan_buckets
from ..meta.train import MetaConfig, MetaTrainer
from ..targets import DEFAULT_PRESET, presets_help
from ..training.conditioning import load_conditioning
from ..training.data import photo_bucket
from ..training.schedules import SCHEDULES
from ..training.standalone import check_vae_matches, find_parts, load_transformer, load_vae, vae_encoder
from . import preflight
from .personalize_cmd import ProgressBar, add_run_options, check_run_options, choose_checkpointing

# options whose argparse dest is a MetaConfig field of the same name
CONFIG_ARGS = (
    "steps", "lr", "lr_heads", "weight_decay", "schedule", "warmup_steps",
    "rank_down", "rank_mid", "alpha", "targets", "bf16", "seed", "guidance", "checkpoint_every", "resume_from", "init_lomd",
)  # fmt: skip


def _load_data(args) -> IdentitySet:
    data = load_identity_set(args.data)
    if args.face_models:
        from ..faces import load_analyzer

        data = screen_faces(data, load_analyzer(args.face_models, args.face_model))
    return data


def _plan(data: IdentitySet, args) -> BucketPlan:
    return plan_buckets(
        [it.size for it in data.items],
        args.resolution,
        args.identities_per_batch,
        args.max_aspect_error,
        args.seed,
    )


def _device(ctx_local_rank: str | None, requested: str) -> torch.device:
    device = torch.device(requested)
    if device.type == "cuda" and device.index is None and ctx_local_rank is not None:
        device = torch.device("cuda", int(ctx_local_rank))  # one GPU per process under torchrun
    return device


def _text(args, parts, dims, cache_dir, device):
    if args.conditioning:
        cond = load_conditioning(args.conditioning, dims)
        return lambda caption: cond
    if parts.text_encoders is None:
        raise MetaLoRAError(
            f"{args.flux}: no text encoders; pass --conditioning FILE.safetensors (tensors 'context' and "
            "'pooled') or a FLUX pipeline folder with text_encoder/, text_encoder_2/, tokenizer/, tokenizer_2/"
        )
    return lambda caption: cached_conditioning(caption, parts.text_encoders, cache_dir, device)


def _holdout(args, data: IdentitySet, held: list[int], encode, encoder_id, text, cache_dir) -> HoldoutCheck:
    """One photo per held-out identity (its first), at that photo's own bucket, as stage 2 uses it."""
    views, conds = {}, {}
    for i in held:
        item = data.images_of(i)[0]
        size = photo_bucket(*item.size, args.resolution)
        face = data.face_boxes.get(item.path)
        views[data.names[i]] = [item_latent(item, size, face, encoder_id, encode, cache_dir)]
        conds[data.names[i]] = text(item.caption or DEFAULT_META_CAPTION)
    log = Path(args.out).with_suffix(".holdout.jsonl")
    return HoldoutCheck(views, conds, args.holdout_every, args.holdout_steps, seed=args.seed, log_path=log)


def run_meta_train(args) -> int:
    _check(args)
    device = _device(os.environ.get("LOCAL_RANK"), args.device)
    ctx: DistContext = init_from_env(device)
    try:
        return _meta_train(args, ctx, device)
    finally:
        shutdown(ctx)


def _check(args) -> Path:
    """Everything the arguments alone decide, before any photo or model is read."""
    check_run_options(args)
    preflight.at_least(1, identities_per_batch=args.identities_per_batch, rank_down=args.rank_down)
    preflight.at_least(1, rank_mid=args.rank_mid, holdout_every=args.holdout_every)
    preflight.at_least(1, holdout_steps=args.holdout_steps)
    preflight.at_least(0, weight_decay=args.weight_decay, holdout=args.holdout)
    preflight.at_least(0, lr=args.lr)  # 0 keeps the Down fixed (e.g. an --init-lomd) and trains heads only
    preflight.positive(lr_heads=args.lr_heads, alpha=args.alpha)
    preflight.existing(args.init_lomd, "--init-lomd", "file")
    preflight.existing(args.flux, "--flux")
    preflight.existing(args.vae, "--vae", "dir")
    preflight.existing(args.conditioning, "--conditioning", "file")
    out = preflight.output_file(args.out)
    preflight.output_folder(args.cache_dir, "--cache-dir")
    preflight.output_folder(args.save_heads, "--save-heads")
    return out


def _meta_train(args, ctx: DistContext, device: torch.device) -> int:
    out = Path(args.out)
    cache_dir = Path(args.cache_dir) if args.cache_dir else out.with_suffix(".cache")
    parts = find_parts(args.flux, args.vae)
    if parts.vae is None:
        raise MetaLoRAError(
            f"{args.flux}: no VAE found; pass --vae with the model's diffusers VAE folder (FLUX.1-dev's or "
            "Qwen-Image's vae/)"
        )
    full = _load_data(args)
    if not full.items:
        raise MetaLoRAError(
            f"{args.data}: no usable photo ({len(full.no_face_images)} without a face, "
            f"{len(full.unreadable)} unreadable); see `metalora dataset check {args.data}`"
        )
    data, held = split_holdout(full, args.holdout)
    if data.skipped_identities and ctx.is_main:
        print(json.dumps({"skipped_no_face": data.skipped_identities}))
    plan = _plan(data, args)
    if plan.dropped and ctx.is_main:
        preflight.say(
            f"metalora meta-train: {len(plan.dropped)} of {len(data.items)} photos dropped: their aspect ratio "
            f"is further than --max-aspect-error {args.max_aspect_error} from every bucket at {args.resolution} "
            f"px (`metalora dataset check {args.data}` lists them)"
        )

    def say(text: str) -> None:
        preflight.say(f"metalora meta-train: {text}", args.quiet or not ctx.is_main)

    backend, _ = load_transformer(parts.transformer, args.dtype, device, args.bf16, say)
    side = args.resolution // 8  # one identity's photos go through the model at a time, at about this size
    checkpointing = choose_checkpointing(args, backend, (side, side), 512, 1, say)
    text = _text(args, parts, backend.dims, cache_dir, device)
    vae_path, encoder_id = parts.vae, str(Path(parts.vae).resolve())
    check_vae_matches(vae_path, backend.dims)
    prepared = prepare(
        data, plan, ctx.owns, lambda: vae_encoder(load_vae(vae_path, device)), encoder_id, text, cache_dir
    )
    config = MetaConfig(
        **{name: getattr(args, name) for name in CONFIG_ARGS},
        batch_size=args.identities_per_batch,
        gradient_checkpointing=checkpointing,
        checkpoint_path=str(out.with_suffix(".ckpt.safetensors")) if args.checkpoint_every else None,
    )
    trainer = MetaTrainer(backend, data, plan, prepared, config, ctx)
    check = None
    if held and ctx.is_main:
        encode = vae_encoder(load_vae(vae_path, device))
        check = _holdout(args, full, held, encode, encoder_id, text, cache_dir)

    def every(step: int) -> None:
        if check is not None and check.due(step):
            row = check.run(backend, trainer.lomd(), step)
            print(json.dumps({k: v for k, v in row.items() if k != "per_identity"}), flush=True)

    bar = ProgressBar(config.steps, args.quiet or not ctx.is_main)
    try:
        result = trainer.train(on_progress=bar, every=every)
    finally:
        bar.close()
    if not ctx.is_main:
        return 0
    path = preflight.save_or_beside(out, lambda p: save_lomd(p, result.lomd))
    summary = {
        "written": str(path),
        "fingerprint": result.lomd.fingerprint,
        "steps": result.steps_done,
        "processes": ctx.world,
        "seconds": round(result.seconds, 2),
        "first_loss": result.losses[0] if result.losses else None,
        "final_loss": result.losses[-1] if result.losses else None,
        "identities": len(trainer.identities),
        "buckets": plan.histogram(),
        "dropped": len(plan.dropped),
    }
    if args.save_heads and result.bank is not None:
        from ..meta.bank import bank_adapters

        names = {i: data.names[i] for i in trainer.identities}
        for name, adapter in bank_adapters(result.bank, result.layout, result.lomd, names).items():
            save_identity(Path(args.save_heads) / f"{name}.safetensors", adapter)
        summary["heads"] = str(args.save_heads)
    if check is not None and check.history:
        summary["holdout_log"] = str(check.log_path)
    print(json.dumps(summary))
    return 0


def dataset_report(args) -> dict[str, object]:
    """What ``dataset check`` prints: counts, faces, bucket histogram and what would be dropped."""
    data = _load_data(args)
    plan = _plan(data, args)
    report: dict[str, object] = {
        "identities": len({it.identity for it in data.items}),
        "images": len(data.items),
        "unreadable": data.unreadable,
        "buckets": plan.histogram(),
        "remainder": len(plan.groups.get(REMAINDER, [])),
        "dropped_aspect": [str(data.items[i].path) for i in plan.dropped],
        "captions": sum(1 for it in data.items if it.caption),
    }
    if args.face_models:
        report["faces_found"] = len(data.face_boxes)
        report["no_face_images"] = [str(p) for p in data.no_face_images]
        report["skipped_identities"] = data.skipped_identities
    return report


def run_dataset_check(args) -> int:
    report = dataset_report(args)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"identities: {report['identities']}  images: {report['images']}  captions: {report['captions']}")
    if "faces_found" in report:
        print(f"faces found: {report['faces_found']}  images without a face: {len(report['no_face_images'])}")
        for name in report["skipped_identities"]:  # type: ignore[attr-defined]
            print(f"  skipped identity (no usable face): {name}")
    print(f"buckets at {args.resolution}px, batches of {args.identities_per_batch}:")
    for name, count in report["buckets"].items():  # type: ignore[attr-defined]
        print(f"  {name:>10}: {count}")
    dropped = report["dropped_aspect"]
    print(f"dropped (aspect further than {args.max_aspect_error} from every bucket): {len(dropped)}")
    for path in dropped:  # type: ignore[attr-defined]
        print(f"  {path}")
    for line in report["unreadable"]:  # type: ignore[attr-defined]
        print(f"  unreadable: {line}")
    return 0


def _data_args(p) -> None:
    p.add_argument(
        "--resolution", type=int, default=512, help="pixel budget side: buckets of <= res^2 pixels"
    )
    p.add_argument("--identities-per-batch", type=int, default=MetaConfig.batch_size, help="photos per step")
    p.add_argument(
        "--max-aspect-error",
        type=float,
        default=0.25,
        help="drop photos whose log aspect is further than this from every bucket (default 0.25)",
    )
    p.add_argument("--face-models", help="face model root (ComfyUI's models/ folder); none: no face step")
    p.add_argument("--face-model", default="antelopev2", help="face model name under insightface/models/")
    p.add_argument("--seed", type=int, default=0, help="seed of the plan, sampler, init, timesteps, noise")


def register(sub) -> None:
    p = sub.add_parser(
        "meta-train",
        help="learn a LoMD (shared Meta-Down) over many identities (stage 1); torchrun/accelerate for DDP",
        description="Meta-train a LoMD. DATA: a folder of identity subfolders of photos (optional .txt "
        "captions beside them) or a .jsonl manifest. Run under `torchrun --nproc_per_node N` or "
        "`accelerate launch` for data-parallel training over identities.",
    )
    p.add_argument(
        "--flux",
        "--model",
        dest="flux",
        required=True,
        help="the base model: a FLUX.1 or Qwen-Image pipeline folder, or its transformer file / folder",
    )
    p.add_argument("--data", required=True, help="identity folders or a .jsonl manifest")
    p.add_argument("--out", required=True, help="LoMD to write (.safetensors)")
    p.add_argument("--vae", help="diffusers AutoencoderKL folder (default: the pipeline's vae/)")
    p.add_argument("--conditioning", help="precomputed text features for every photo (else per caption)")
    _data_args(p)
    p.add_argument(
        "--steps", type=int, default=MetaConfig.steps, help="optimizer steps (default %(default)s)"
    )
    p.add_argument("--lr", type=float, default=MetaConfig.lr, help="Down learning rate (default %(default)s)")
    p.add_argument(
        "--init-lomd",
        help="start the Down from this LoMD (e.g. from 'metalora lomd distill'); same --rank-down and "
        "--targets. Default: orthonormal from --seed. Recorded in the LoMD's provenance",
    )
    p.add_argument("--lr-heads", type=float, default=MetaConfig.lr_heads, help="Mid/Up heads' learning rate")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay of the Down")
    p.add_argument("--schedule", choices=SCHEDULES, default="constant", help="LR decay after warm-up")
    p.add_argument("--warmup", dest="warmup_steps", type=int, default=MetaConfig.warmup_steps, help="warm-up")
    p.add_argument("--rank-down", type=int, default=4, help="LoMD rank (default 4)")
    p.add_argument("--rank-mid", type=int, default=16, help="Mid rank of the heads (default 16)")
    p.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default: rank-down, scale 1)")
    p.add_argument("--targets", default=DEFAULT_PRESET, help=presets_help())
    add_run_options(p, "continue from a checkpoint (written by any number of processes)")
    p.add_argument("--holdout", type=int, default=0, help="identities kept out for the hold-out check")
    p.add_argument("--holdout-every", type=int, default=100, help="run the hold-out check every K steps")
    p.add_argument("--holdout-steps", type=int, default=20, help="personalization steps in the check")
    p.add_argument("--save-heads", help="also write every identity's meta-trained head to this folder")
    p.add_argument("--cache-dir", help="latent / text cache (default: OUT.cache/)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run_meta_train)

    d = sub.add_parser("dataset", help="inspect a meta-training dataset")
    dsub = d.add_subparsers(dest="dataset_command", required=True, metavar="DATASET_COMMAND")
    c = dsub.add_parser("check", help="identities, images, faces, bucket histogram and what would be dropped")
    c.add_argument("data", help="identity folders or a .jsonl manifest")
    _data_args(c)
    c.add_argument("--json", action="store_true", help="machine-readable report")
    c.set_defaults(func=run_dataset_check)


def _synthetic(args) -> int:
    from ..dev.synthetic_identities import write_synthetic_identities

    path = write_synthetic_identities(args.out, args.identities, args.images, args.size, args.seed)
    print(json.dumps({"written": str(path), "identities": args.identities, "images": args.images}))
    return 0


def register_dev(dsub) -> None:
    p = dsub.add_parser("synthetic-identities", help="drawn (not real) identities at varied aspect ratios")
    p.add_argument("--out", required=True, help="output folder (one subfolder per identity)")
    p.add_argument("--identities", type=int, default=4, help="how many identities to draw")
    p.add_argument("--images", type=int, default=4, help="photos per identity")
    p.add_argument("--size", type=int, default=128, help="side of the square photos in pixels (default 128)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the weights / drawings")
    p.set_defaults(func=_synthetic)
