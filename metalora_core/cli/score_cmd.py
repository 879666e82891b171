"""``metalora score``: R-FaceSim and friends for a folder of generated images; ``metalora dev
tiny-face-models``: the tiny ONNX face models the tests use."""

from __future__ import annotations

import json
from pathlib import Path

from ..safeio import atomic_write_bytes


def _score(args) -> int:
    from ..faces import FaceAnalyzer, load_face_model, score_folders
    from ..faces.images import list_images

    list_images(args.generated, "generated folder")  # cheap input checks before the models load
    list_images(args.references, "references folder")
    providers = ["CPUExecutionProvider"] if args.cpu else None
    model = load_face_model(args.insightface_root, args.face_model, providers)
    analyzer = FaceAnalyzer(model)
    feature_models = None
    if args.clip or args.dino:
        from ..faces.features import load_feature_models

        feature_models = load_feature_models(clip=args.clip, dino=args.dino)
    result = score_folders(
        analyzer,
        args.generated,
        args.references,
        args.exclude,
        face_index=args.face_index,
        threshold=args.threshold,
        pixel_metrics=not args.no_pixel_metrics,
        feature_models=feature_models,
        prompt=args.prompt,
    )
    print(result.report())
    if args.json:
        data = json.dumps(result.to_dict(), indent=2).encode()
        path = atomic_write_bytes(args.json, lambda tmp: Path(tmp).write_bytes(data))
        print(f"written: {path}")
    return 0


def _tiny_face_models(args) -> int:
    from ..dev.tiny_faces import write_tiny_face_models

    folder = write_tiny_face_models(args.out, args.name, args.seed)
    print(json.dumps({"written": str(folder), "files": sorted(p.name for p in folder.glob("*.onnx"))}))
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "score",
        help="R-FaceSim of generated images against the person's real photos (excluding the training photo)",
    )
    p.add_argument("--generated", required=True, help="folder of generated images")
    p.add_argument("--references", required=True, help="folder of the person's real photos")
    p.add_argument(
        "--exclude",
        help="the personalization photo: removed from the references (matched by path, pixels or face), "
        "and the target of FaceSim(reference) / PSNR / SSIM",
    )
    p.add_argument(
        "--face-model",
        default="antelopev2",
        help="insightface model folder name: antelopev2 (default), buffalo_l, or any folder path",
    )
    p.add_argument(
        "--insightface-root",
        default="~/.insightface",
        help="folder holding insightface/models/<name>/ (ComfyUI's models folder) or models/<name>/",
    )
    p.add_argument("--json", help="also write the full result as JSON to this file")
    p.add_argument("--face-index", type=int, default=0, help="which face per image, 0 = largest (default)")
    p.add_argument("--threshold", type=float, help="same-person cosine threshold (default: per face model)")
    p.add_argument("--prompt", help="the generation prompt, for CLIP-T")
    p.add_argument("--clip", help="local folder of a transformers CLIP model (CLIP-T, CLIP-I); offline")
    p.add_argument("--dino", help="local folder of a transformers DINOv2 model (DINO score); offline")
    p.add_argument("--no-pixel-metrics", action="store_true", help="skip PSNR/SSIM and pixel diversity")
    p.add_argument("--cpu", action="store_true", help="run onnxruntime on the CPU even if CUDA is available")
    p.set_defaults(func=_score)


def register_dev(dev_sub) -> None:
    p = dev_sub.add_parser(
        "tiny-face-models",
        help="tiny ONNX detector + recognizer insightface loads like antelopev2 (detector finds magenta frames)",
    )
    p.add_argument("--out", required=True, help="root: writes <out>/insightface/models/<name>/")
    p.add_argument("--name", default="tiny", help="model folder name (default tiny)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the weights / drawings")
    p.set_defaults(func=_tiny_face_models)
