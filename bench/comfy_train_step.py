"""Seconds per training step: the in-ComfyUI backend vs the standalone diffusers backend, same weights.

    COMFYUI_PATH=/path/to/ComfyUI python bench/comfy_train_step.py [--steps 8] [--resolution 512]
        [--hidden 256] [--depth 2] [--single 4] [--device cpu|cuda] [--dtype float32|bfloat16]

Builds a FLUX of the given size with random weights (BFL layout), loads it once through ComfyUI's own
loader and once as diffusers' FluxTransformer2DModel, and times ``personalize`` on both, with and without
gradient checkpointing. Prints one line per run (s/step, first loss: equal losses show the same math).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def import_comfy(comfy_path: str, stub_root: Path) -> None:
    """Import ComfyUI from a checkout (an empty torchaudio stands in when none matches the torch)."""
    if importlib.util.find_spec("torchaudio") is None:
        (stub_root / "torchaudio").mkdir(parents=True, exist_ok=True)
        for name in ("__init__", "functional", "transforms"):
            (stub_root / "torchaudio" / f"{name}.py").write_text("")
        sys.path.insert(0, str(stub_root))
    sys.path.append(comfy_path)
    import comfy.cli_args

    comfy.cli_args.args.cpu = not torch.cuda.is_available()


def pack_backend():
    """nodes/comfy_training/backend.py inside the pack package, as ComfyUI loads it (see tests/pack_import)."""
    spec = importlib.util.spec_from_file_location("metalora_pack_import", REPO / "tests" / "pack_import.py")
    helper = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(helper)
    return helper.pack_module("comfy_training.backend")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--single", type=int, default=4)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()
    comfy_path = os.environ.get("COMFYUI_PATH")
    if not comfy_path:
        sys.exit("set COMFYUI_PATH to a ComfyUI checkout")
    sys.path.insert(0, str(REPO))
    work = Path(tempfile.mkdtemp(prefix="metalora_bench_"))
    import_comfy(comfy_path, work / "stubs")
    import comfy.sd

    from metalora_core.adapter import AdapterShape
    from metalora_core.dev.random_assets import random_lomd
    from metalora_core.dev.tiny_flux import tiny_dims, write_tiny_flux
    from metalora_core.training.diffusers_backend import DiffusersBackend
    from metalora_core.training.personalize import PersonalizeConfig, personalize
    from metalora_core.training.protocol import TextConditioning

    dtype = getattr(torch, args.dtype)
    dims = tiny_dims(hidden=args.hidden, depth=args.depth, depth_single=args.single)
    path = write_tiny_flux(work / "flux.safetensors", "bfl", dims)
    lomd = random_lomd(path, AdapterShape(4, 16), "attn_mlp", seed=1)
    g = torch.Generator().manual_seed(0)
    cond = TextConditioning(
        torch.randn(64, dims.context_dim, generator=g), torch.randn(dims.vec_dim, generator=g)
    )
    side = args.resolution // 8
    views = [torch.randn(16, side, side, generator=g) for _ in range(4)]
    with torch.inference_mode():  # as ComfyUI's loader node runs
        patcher = comfy.sd.load_diffusion_model(str(path), model_options={"dtype": dtype})
    device = "cuda" if torch.cuda.is_available() else "cpu"
    backends = {
        "comfyui": pack_backend().ComfyFluxBackend(patcher),
        "diffusers": DiffusersBackend.from_path(path, dtype=dtype, device=device),
    }
    for name, backend in backends.items():
        for checkpointing in (False, True):
            session = backend.session() if name == "comfyui" else contextlib.nullcontext()
            with session:
                personalize(backend, lomd, views, cond, PersonalizeConfig(steps=1, warmup_steps=0))  # warm-up
                config = PersonalizeConfig(
                    steps=args.steps, warmup_steps=0, gradient_checkpointing=checkpointing
                )
                start = time.perf_counter()
                result = personalize(backend, lomd, views, cond, config)
                seconds = (time.perf_counter() - start) / args.steps
            print(
                f"{name:9s} checkpointing={checkpointing!s:5s} {seconds:.3f} s/step  "
                f"first loss {result.losses[0]:.5f}  ({device}, {args.dtype}, {args.resolution} px)"
            )


if __name__ == "__main__":
    main()
