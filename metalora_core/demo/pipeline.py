"""``metalora demo``: the whole job in one command, on tiny models by default or on real weights.

Stages: models -> LoMD -> views -> personalize (Meta-LoRA) -> plain-LoRA baseline on the same budget ->
generate -> score -> export -> report. Personalization is built exactly as ``metalora personalize`` builds
it (same views, settings and seed), so the command printed in the report reproduces the identity file
bit for bit; the meta-training and export stages run the CLI commands themselves, in-process.
"""

from __future__ import annotations

import json
import shlex
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from ..errors import MetaLoRAError
from .commands import cli as _cli
from .lomds import lomd_stage_title, make_lomds
from .stages import Stages

TINY = {"steps": 120, "resolution": 128, "sample_steps": 12, "meta_steps": 60}
REAL = {"steps": 375, "resolution": 512, "sample_steps": 28, "meta_steps": 0}
CAPTION = "photo of ohwx person"


@dataclass
class DemoOptions:
    out: Path
    flux: str | None = None  # None: the tiny models
    vae: str | None = None
    conditioning: str | None = None
    lomd: str | None = None
    image: str | None = None
    references: str | None = None
    face_model: str | None = None
    insightface_root: str = "~/.insightface"
    steps: int | None = None
    resolution: int | None = None
    sample_steps: int | None = None
    meta_steps: int | None = None
    images: int = 4
    seed: int = 0
    device: str = "cpu"
    dtype: str = "auto"
    baseline: bool = True
    quiet: bool = False

    @property
    def tiny(self) -> bool:
        return self.flux is None

    def setting(self, name: str) -> int:
        value = getattr(self, name)
        return value if value is not None else (TINY if self.tiny else REAL)[name]


@dataclass
class DemoRun:
    """Everything the report shows; ``to_json`` is report.json."""

    options: dict
    models: dict = field(default_factory=dict)
    lomds: dict = field(default_factory=dict)
    methods: dict = field(default_factory=dict)  # name -> losses, summary numbers, file
    images: dict = field(default_factory=dict)  # role -> list of relative paths
    scores: dict = field(default_factory=dict)
    export: dict = field(default_factory=dict)
    commands: list = field(default_factory=list)
    timings: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    environment: dict = field(default_factory=dict)


def _last_quarter(losses: list[float]) -> float:
    tail = losses[-max(1, len(losses) // 4) :]
    return sum(tail) / len(tail)


def run_demo(opt: DemoOptions) -> DemoRun:
    from ..cli import preflight

    out = opt.out
    preflight.output_folder(out, "--out")
    steps, resolution = opt.setting("steps"), opt.setting("resolution")
    preflight.at_least(1, steps=steps, images=opt.images, sample_steps=opt.setting("sample_steps"))
    preflight.resolution(resolution)
    if not opt.tiny and not opt.image:
        raise MetaLoRAError("with --flux give --image: the photo of the person to personalize")
    preflight.inputs(
        ("--flux", opt.flux, "any"),
        ("--vae", opt.vae, "dir"),
        ("--conditioning", opt.conditioning, "file"),
        ("--lomd", opt.lomd, "file"),
        ("--image", opt.image, "file"),
        ("--references", opt.references, "dir"),
    )
    from ..cli.personalize_cmd import device

    device(opt.device)
    out.mkdir(parents=True, exist_ok=True)
    (out / "images").mkdir(exist_ok=True)
    threads = torch.get_num_threads()
    if opt.tiny:  # tiny models: intra-op threads only spin (measured 20x the CPU per step on 2 busy cores)
        torch.set_num_threads(1)
    try:
        return _run(opt, out)
    finally:
        torch.set_num_threads(threads)


def _run(opt: DemoOptions, out: Path) -> DemoRun:
    steps, resolution = opt.setting("steps"), opt.setting("resolution")
    run = DemoRun(options={k: str(v) if isinstance(v, Path) else v for k, v in vars(opt).items()})
    run.environment = {"torch": torch.__version__, "threads": torch.get_num_threads(), "device": opt.device}
    stages = Stages(total=9, quiet=opt.quiet)

    with stages.run(
        "models: "
        + (
            "building the tiny FLUX, VAE, text features and face models"
            if opt.tiny
            else "checking the given files"
        )
    ):
        kit = _models(opt, out, run)
    with stages.run(f"loading FLUX from {kit['flux']} and the VAE"):
        backend, vae, cond = _load(opt, kit)
    with stages.run("LoMD: " + lomd_stage_title(opt)):
        make_lomds(opt, kit, backend, vae, cond, out, run, stages)
    with stages.run(f"photo: making and encoding the training views at {resolution} px"):
        photo, latents, bucket = _views(opt, kit, out, vae, run)
    with stages.run(f"personalizing with Meta-LoRA ({steps} steps per LoMD)"):
        adapters = _personalize(opt, kit, backend, latents, cond, out, run, stages)
    with stages.run(
        f"plain LoRA (rank 16) on the same {steps}-step budget"
        if opt.baseline
        else "plain LoRA baseline: skipped"
    ):
        if opt.baseline:
            _baseline(opt, backend, latents, cond, run)
    with stages.run(f"generating {opt.images} images without and with the identity"):
        _generate(opt, backend, vae, cond, adapters, bucket, out, run)
    with stages.run("scoring R-FaceSim of the generated images"):
        _score(opt, kit, photo, out, run, stages)
    with stages.run("exporting the identity as a standard LoRA"):
        _export(opt, kit, out, run)
    run.timings = stages.to_list()
    return run


def _models(opt: DemoOptions, out: Path, run: DemoRun) -> dict:
    from .assets import build_tiny_kit

    if opt.tiny:
        kit = build_tiny_kit(out / "models", opt.seed)
        run.commands += [
            f"metalora dev tiny-flux --out {out / 'models/tiny_flux.safetensors'}",
            f"metalora dev tiny-vae --out {out / 'models/tiny_vae'}",
            f"metalora dev random-conditioning --model {kit.flux} --out {kit.conditioning}",
            f"metalora dev tiny-face-models --out {kit.face_root} --name tiny",
            f"metalora dev synthetic-identities --out {kit.identities} --identities 8 --images 4",
        ]
        run.models = {
            "flux": str(kit.flux),
            "kind": "tiny random FLUX (hidden 128, 2 double + 2 single blocks)",
            "vae": str(kit.vae),
            "text": "random text features standing in for the encoded caption",
            "face_model": "tiny ONNX face models (the detector only fires on a drawn magenta frame)",
        }
        return {
            "flux": str(kit.flux), "vae": str(kit.vae), "conditioning": str(kit.conditioning),
            "face_root": str(kit.face_root), "face_model": kit.face_model, "identities": str(kit.identities),
        }  # fmt: skip
    from ..model_files import read_model_dims
    from ..models import family_of
    from ..training.standalone import find_parts

    parts = find_parts(opt.flux, opt.vae)
    family = family_of(read_model_dims(parts.transformer)[0])
    if family.name != "flux":  # the demo's sampler and VAE decode are FLUX.1's
        raise MetaLoRAError(
            f"--flux {opt.flux}: metalora demo runs FLUX.1; this is {family.label}. For {family.label} run "
            "`metalora personalize`, `export` and `score` (docs/training.md), or example workflow 6 in ComfyUI"
        )
    if parts.vae is None:
        raise MetaLoRAError(f"--flux {opt.flux}: no VAE found; pass --vae (a diffusers AutoencoderKL folder)")
    if not opt.conditioning and parts.text_encoders is None:
        raise MetaLoRAError(f"--flux {opt.flux}: no text encoders; pass --conditioning FILE.safetensors")
    run.models = {"flux": str(parts.transformer), "kind": "given weights", "vae": str(parts.vae)}
    return {
        "flux": str(parts.transformer), "vae": str(parts.vae), "conditioning": opt.conditioning,
        "text_encoders": str(parts.text_encoders) if parts.text_encoders else None,
        "face_root": opt.insightface_root, "face_model": opt.face_model, "pipeline": opt.flux,
    }  # fmt: skip


def _load(opt: DemoOptions, kit: dict):
    from ..cli.personalize_cmd import device
    from ..training.conditioning import encode_prompt, load_conditioning
    from ..training.standalone import load_transformer, load_vae

    dev = device(opt.device)
    backend, _ = load_transformer(kit["flux"], opt.dtype, dev)
    vae = load_vae(kit["vae"], dev)
    if kit["conditioning"]:
        cond = load_conditioning(kit["conditioning"], backend.dims)
    else:
        cond = encode_prompt(kit["text_encoders"], CAPTION, dev)
    return backend, vae, cond


def _views(opt: DemoOptions, kit: dict, out: Path, vae, run: DemoRun):
    """The CLI's own view pipeline (``metalora personalize`` defaults): 16 views, augmentation 1."""
    from ..cli import preflight
    from ..faces.images import load_image
    from ..training.data import AugmentConfig, encode_views, make_views, photo_bucket
    from ..training.standalone import vae_encoder
    from .assets import packaged_photo, reference_stand_in

    photo_path = Path(opt.image) if opt.image else packaged_photo()
    photo = Image.fromarray(load_image(photo_path))
    resolution = opt.setting("resolution")
    bucket = photo_bucket(photo.width, photo.height, resolution)
    warning = preflight.photo_size(photo.size, bucket)
    if warning:
        run.notes.append(warning)
    views = make_views(photo, 16, resolution, None, opt.seed, AugmentConfig(strength=1.0))
    latents = encode_views(views.images, vae_encoder(vae))
    shutil.copyfile(photo_path, out / "images" / f"photo{photo_path.suffix}")
    refs = (
        Path(opt.references)
        if opt.references
        else reference_stand_in(photo_path, out / "references", marker=opt.tiny).parent
    )
    run.images["photo"] = [f"images/photo{photo_path.suffix}"]
    run.images["views"] = []
    for i, view in enumerate(views.images[:4]):
        Image.fromarray(view).save(out / "images" / f"view_{i}.png")
        run.images["views"].append(f"images/view_{i}.png")
    run.images["references"] = [str(p) for p in sorted(refs.iterdir()) if p.is_file()]
    kit["photo"], kit["references"] = str(photo_path), str(refs)
    if not opt.references:
        run.notes.append(
            "R-FaceSim scores against the person's OTHER photos; this run has one photo, so a mirrored copy "
            "stands in for the others (give --references DIR for a real score)"
            + (
                ". The tiny face detector only fires on a drawn magenta frame, so the stand-in carries one"
                if opt.tiny
                else ""
            )
        )
    return photo_path, latents, views.bucket


def _config(opt: DemoOptions):
    from ..training.personalize import PersonalizeConfig

    return PersonalizeConfig(
        steps=opt.setting("steps"), seed=opt.seed, extra={"caption": CAPTION, "demo": True}
    )


def _personalize(opt, kit, backend, latents, cond, out: Path, run: DemoRun, stages: Stages) -> dict:
    from ..formats import load_lomd, save_identity
    from ..training.personalize import personalize

    adapters = {}
    for kind, path in kit["lomds"].items():
        lomd = load_lomd(path)
        result = personalize(backend, lomd, latents, cond, _config(opt))
        file = save_identity(out / f"identity_{kind}.safetensors", result.adapter)
        adapters[kind] = (lomd, result.adapter, file)
        run.methods[f"Meta-LoRA ({kind} LoMD)"] = {
            "losses": result.losses,
            "first_loss": result.losses[0],
            "last_quarter_loss": _last_quarter(result.losses),
            "seconds": result.seconds,
            "file": str(file),
            "trained_parameters": sum(
                m.numel() + u.numel()
                for m, u in zip(result.adapter.mids.values(), result.adapter.ups.values())
            ),
        }
        stages.note(f"{kind}: loss {result.losses[0]:.4f} -> last quarter {_last_quarter(result.losses):.4f}")
        run.commands.append(
            "metalora "
            + shlex.join(
                [
                    "personalize",
                    "--flux",
                    kit["pipeline"] if not opt.tiny else kit["flux"],
                    "--lomd",
                    path,
                    "--image",
                    kit["photo"],
                    "--out",
                    str(out / f"identity_{kind}.safetensors"),
                    "--steps",
                    str(opt.setting("steps")),
                    "--resolution",
                    str(opt.setting("resolution")),
                    "--seed",
                    str(opt.seed),
                    "--device",
                    opt.device,
                    *(["--vae", kit["vae"]] if opt.tiny or opt.vae else []),
                    *(["--conditioning", kit["conditioning"]] if kit["conditioning"] else []),
                ]
            )  # fmt: skip
            + "   # same identity, bit for bit"
        )
    kit["adapters"] = adapters
    return adapters


def _baseline(opt, backend, latents, cond, run: DemoRun) -> None:
    from ..training.lora_baseline import train_lora_baseline

    result = train_lora_baseline(backend, latents, cond, _config(opt), rank=16)
    run.methods["plain LoRA (rank 16)"] = {
        "losses": result.losses,
        "first_loss": result.losses[0],
        "last_quarter_loss": _last_quarter(result.losses),
        "seconds": result.seconds,
        "trained_parameters": sum(t.numel() for t in result.lora.values()),
    }


def _generate(opt, backend, vae, cond, adapters: dict, bucket, out: Path, run: DemoRun) -> None:
    from ..inject import make_heads
    from ..sampling import generate
    from .assets import save_png

    seeds = list(range(opt.seed, opt.seed + opt.images))
    size = (bucket[0] // 16 * 16, bucket[1] // 16 * 16)
    steps = opt.setting("sample_steps")
    base = generate(backend, vae, cond, size, seeds, steps)
    run.images["base"] = [
        str(save_png(im, out / "images" / f"base_{s}.png").relative_to(out)) for im, s in zip(base, seeds)
    ]
    kind, (lomd, adapter, _file) = next(iter(adapters.items()))
    heads = make_heads(backend.dims, lomd, adapter, device=backend.device)
    with backend.adapters(heads):
        personal = generate(backend, vae, cond, size, seeds, steps)
    gen_dir = out / "generated"
    run.images["pixel_change"] = [  # the identity changes the output: mean |identity - base| in [0, 1]
        float(abs(a.astype("float32") - b.astype("float32")).mean() / 255.0) for a, b in zip(personal, base)
    ]
    run.images["identity"] = []
    for im, s in zip(personal, seeds):
        save_png(im, gen_dir / f"identity_{s}.png")
        run.images["identity"].append(
            str(save_png(im, out / "images" / f"identity_{s}.png").relative_to(out))
        )
    run.images["identity_lomd"] = kind


def _score(opt, kit: dict, photo: Path, out: Path, run: DemoRun, stages: Stages) -> None:
    if not kit.get("face_model"):
        run.scores = {"skipped": "no --face-model given: R-FaceSim needs an insightface model folder"}
        stages.note("skipped: give --face-model antelopev2 --insightface-root ComfyUI/models to score")
        return
    args = [
        "score", "--generated", str(out / "generated"), "--references", kit["references"], "--exclude", str(photo),
        "--face-model", kit["face_model"], "--insightface-root", kit["face_root"],
        "--json", str(out / "score.json"), "--cpu",
    ]  # fmt: skip
    try:
        _cli(args, run)
    except MetaLoRAError as exc:  # e.g. no reference face: the report says so, the other stages stand
        run.scores = {"skipped": str(exc)}
        stages.note(f"not scored: {exc}")
        return
    run.scores = json.loads((out / "score.json").read_text())
    score, total = run.scores.get("score"), run.scores.get("total", 0)
    found = total - run.scores.get("no_face", 0)
    if score is not None:
        stages.note(f"R-FaceSim {score:.4f} ({found} of {total} generated images have a face)")
    elif opt.tiny:
        stages.note(
            f"no R-FaceSim: no face in the {total} generated images (tiny face models find only a drawn "
            "marker; with --face-model antelopev2 and real weights this is the identity score)"
        )
    else:
        stages.note(f"no R-FaceSim: none of the {total} generated images has a detectable face")


def _export(opt, kit: dict, out: Path, run: DemoRun) -> None:
    kind, (lomd, adapter, file) = next(iter(kit["adapters"].items()))
    lora = out / f"identity_{kind}_lora.safetensors"
    summary = _cli(
        [
            "export",
            "--lomd",
            kit["lomds"][kind],
            "--adapter",
            str(file),
            "--out",
            str(lora),
            "--format",
            "kohya",
        ],
        run,
    )
    run.export = {**summary, "bytes": lora.stat().st_size, "identity_bytes": Path(file).stat().st_size}
