"""Fixtures for tests against a real ComfyUI: skipped (with the reason) unless COMFYUI_PATH is set.

Run: ``COMFYUI_PATH=/path/to/ComfyUI /path/to/comfy-venv/bin/python -m pytest tests/comfyui -x -q``
(COMFYUI_PYTHON picks another interpreter for the server; default: the one running pytest).

One server per session (start-up is the slow part). The base folder holds:
- models/diffusion_models/tiny_flux.safetensors (hidden 128, context 64, pooled 32) and tiny_flux_256 (hidden 256)
- models/loras/style_lora.safetensors (a random rank-4 LoRA in diffusers naming, for composition) and
  style_lora_b.safetensors (another, kohya naming: the LoRA tools of workflow 5 take two)
- models/diffusion_models/tiny_flux_tuned.safetensors (tiny_flux plus a rank-2 change: a "fine-tune")
- models/metalora/lomd.safetensors + identity.safetensors (random, non-zero Up), identity_seeded.safetensors
  (trained, as it were, on the Seeded LoMD node's default LoMD of tiny_flux), lomd_misfit.safetensors
  (made for the hidden-256 model, so it does not fit tiny_flux), lomd_broken.safetensors (not safetensors)
- models/insightface/models/tiny/ (tiny ONNX detector + recognizer; the detector finds magenta frames)
- input/face_a.png, face_a2.png, face_b.png (painted faces), noface.png
- extra_models/metalora/lomd_extra.safetensors, registered only by extra_model_paths.yaml
- models/diffusion_models/tiny_qwen_image.safetensors (bf16, ~760 MB), written only when a test asks for the
  ``tiny_qwen_image`` fixture: ComfyUI's Qwen-Image at its real width (it reads only depth and input channels
  from a file) with one block
- with COMFYUI_GGUF_PATH (city96's ComfyUI-GGUF, copied into custom_nodes/): models/diffusion_models/
  tiny_flux-F16.gguf, -Q8_0.gguf and -Q4_0.gguf, the tiny FLUX as ComfyUI-GGUF's convert tool writes it
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from tests.comfyui.cpu_torchvision import torchvision_schemas
from tests.comfyui.gguf_files import TYPES as GGUF_TYPES
from tests.comfyui.gguf_files import write_gguf
from tests.comfyui.harness import ComfyServer, build_base_dir, gguf_nodes_path

# In-process tests import ComfyUI (and with it torchvision/torchaudio): the same test-only hook as the server.
torchvision_schemas.install()

TINY = {"context_dim": 64, "pooled_dim": 32}


def _images(folder: Path) -> dict[str, Path]:
    from PIL import Image

    from metalora_core.dev.tiny_faces import paint_markers

    rng = np.random.default_rng(0)
    base = rng.integers(60, 200, size=(512, 512, 3), dtype=np.uint8)
    other = rng.integers(60, 200, size=(512, 512, 3), dtype=np.uint8)
    images = {
        "face_a.png": paint_markers(base, [((320, 320), 128)]),
        "face_a2.png": paint_markers(base, [((320, 320), 128)]),  # same face again: another "real photo"
        "face_b.png": paint_markers(other, [((256, 256), 128)]),
        "noface.png": base,
    }
    out = {}
    for name, arr in images.items():
        Image.fromarray(arr).save(folder / name)
        out[name] = folder / name
    return out


def _fine_tune(flux: Path, out: Path) -> None:
    """tiny_flux with a rank-2 change in two layers: a "fine-tuned checkpoint" to extract a LoRA from."""
    import torch
    from safetensors.torch import load_file, save_file

    sd = load_file(str(flux))
    g = torch.Generator().manual_seed(3)
    for name in ("double_blocks.0.img_attn.qkv.weight", "single_blocks.1.linear2.weight"):
        w = sd[name]
        delta = torch.randn(w.shape[0], 2, generator=g) @ torch.randn(2, w.shape[1], generator=g)
        sd[name] = (w.float() + 0.05 * delta).to(w.dtype)
    save_file(sd, str(out))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Under METALORA_NO_SKIPS=1 (CI, which provides ComfyUI, ComfyUI-GGUF, chromium and comfy-cli) a skipped
    real-ComfyUI test is a failure: a missing piece must not turn the suite green by skipping it."""
    outcome = yield
    report = outcome.get_result()
    if os.environ.get("METALORA_NO_SKIPS") == "1" and report.skipped and "tests/comfyui" in item.nodeid:
        report.outcome = "failed"
        report.longrepr = f"skipped, but METALORA_NO_SKIPS=1 requires it to run: {report.longrepr}"


@pytest.fixture(scope="session")
def comfyui_path() -> Path:
    path = os.environ.get("COMFYUI_PATH")
    if not path:
        pytest.skip("COMFYUI_PATH is not set: tests against a real ComfyUI need a ComfyUI checkout")
    if not (Path(path) / "main.py").is_file():
        pytest.fail(f"COMFYUI_PATH={path} has no main.py")
    return Path(path)


@pytest.fixture(scope="session")
def comfy_base(comfyui_path, tmp_path_factory) -> Path:
    """The ComfyUI base folder with the tiny models, LoMDs, identity, face models and input photos."""
    from metalora_core.adapter import AdapterShape
    from metalora_core.dev.random_assets import random_adapter, random_lomd
    from metalora_core.dev.tiny_faces import write_tiny_face_models
    from metalora_core.dev.tiny_flux import TINY_DIMS, tiny_dims, write_tiny_flux
    from metalora_core.formats import export_lora, save_identity, save_lomd
    from metalora_core.lomd.seeded import seeded_lomd
    from metalora_core.model_files import read_model_dims

    base = build_base_dir(tmp_path_factory.mktemp("comfy_base"))
    models = base / "models"
    flux = write_tiny_flux(models / "diffusion_models" / "tiny_flux.safetensors", "bfl", TINY_DIMS, seed=0)
    big = write_tiny_flux(
        models / "diffusion_models" / "tiny_flux_256.safetensors", "bfl", tiny_dims(hidden=256), seed=0
    )
    lomd = random_lomd(flux, AdapterShape(4, 8), "attn_mlp", seed=1)
    save_lomd(models / "metalora" / "lomd.safetensors", lomd)
    save_identity(
        models / "metalora" / "identity.safetensors", random_adapter(lomd, flux, seed=2, up_std=0.05)
    )
    style = random_adapter(lomd, flux, seed=5, up_std=0.2)  # an ordinary LoRA file (diffusers naming)
    export_lora(
        models / "loras" / "style_lora.safetensors", lomd, style, read_model_dims(flux)[0], "diffusers"
    )
    other = random_adapter(lomd, flux, seed=6, up_std=0.2)  # a second one, kohya naming (LoRA tools)
    export_lora(models / "loras" / "style_lora_b.safetensors", lomd, other, read_model_dims(flux)[0])
    _fine_tune(flux, models / "diffusion_models" / "tiny_flux_tuned.safetensors")
    misfit = random_lomd(big, AdapterShape(4, 8), "attn_mlp", seed=3)
    save_lomd(models / "metalora" / "lomd_misfit.safetensors", misfit)
    save_identity(
        models / "metalora" / "identity_misfit.safetensors", random_adapter(misfit, big, seed=4, up_std=0.05)
    )
    # an identity trained against the LoMD the example workflows make (Seeded LoMD at its defaults)
    seeded = seeded_lomd(read_model_dims(flux)[0], AdapterShape(4, 16), "attn_mlp", seed=0)
    save_identity(
        models / "metalora" / "identity_seeded.safetensors", random_adapter(seeded, flux, seed=5, up_std=0.05)
    )
    (models / "metalora" / "lomd_broken.safetensors").write_bytes(
        b"\x00" * 64
    )  # e.g. an interrupted download
    if gguf_nodes_path() is not None:
        for qtype in GGUF_TYPES:
            write_gguf(flux, models / "diffusion_models" / f"tiny_flux-{qtype}.gguf", qtype)
    write_tiny_face_models(models, "tiny", seed=0)
    _images(base / "input")
    # a second metalora folder registered only through extra_model_paths.yaml
    extra = base / "extra_models"
    save_lomd(extra / "metalora" / "lomd_extra.safetensors", lomd)
    (base / "extra_model_paths.yaml").write_text(
        f"metalora_tests:\n    base_path: {extra}\n    metalora: metalora\n"
    )
    return base


@pytest.fixture(scope="session")
def tiny_qwen_image(comfy_base) -> Path:
    """models/diffusion_models/tiny_qwen_image.safetensors in the test base, written on first use (~15 s, ~760 MB
    in bfloat16): ComfyUI detects a Qwen-Image file from its tensor names and reads only its depth and input
    channels, so the file has Qwen-Image's real width (3072, text 3584) and ONE block (~380 M parameters)."""
    import torch

    from metalora_core.dev.tiny_qwen_image import COMFY_QWEN_DIMS, write_tiny_qwen_image
    from tests.comfyui.workflows import TINY_QWEN_FILE

    path = comfy_base / "models" / "diffusion_models" / TINY_QWEN_FILE
    if not path.is_file():  # (written atomically)
        write_tiny_qwen_image(path, COMFY_QWEN_DIMS, seed=0, dtype=torch.bfloat16)
    return path


@pytest.fixture(scope="session")
def comfy(comfyui_path, comfy_base):
    """A running ComfyUI (session-scoped), stopped cleanly at the end."""
    yaml = str(comfy_base / "extra_model_paths.yaml")
    server = ComfyServer(comfyui_path, comfy_base, extra_args=("--extra-model-paths-config", yaml)).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def opened(comfy):
    """Every example workflow loaded once in ComfyUI's real front end (headless Chromium): what it shows and
    the API prompt the front end converts it to (skips without a chromium binary or aiohttp)."""
    import importlib.util

    from tests.comfyui.browser import chromium_binary
    from tests.comfyui.workflows import open_in_front_end

    if chromium_binary() is None or importlib.util.find_spec("aiohttp") is None:
        pytest.skip("needs a chromium binary and aiohttp to drive ComfyUI's front end headless")
    return open_in_front_end(comfy)
