"""In-process fixtures for the training backend tests: ComfyUI's own modules imported from COMFYUI_PATH.

These tests call ComfyUI's FLUX directly (no server), so they are fast and can compare gradients; without
COMFYUI_PATH every test here skips with the reason.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

from metalora_core.dev.tiny_flux import TINY_DIMS, write_tiny_flux
from tests.comfyui.train.helpers import load_qwen
from tests.pack_import import PACK as PACK_PREFIX
from tests.pack_import import pack_module

COMFYUI_PATH = os.environ.get("COMFYUI_PATH")


def _stub_torchaudio(root: Path) -> None:
    """ComfyUI imports torchaudio at module level for its audio models; FLUX never uses it. Where no
    torchaudio wheel matches the installed torch, an empty package lets ``comfy.sd`` import."""
    if importlib.util.find_spec("torchaudio") is not None:
        return
    pkg = root / "torchaudio"
    pkg.mkdir(parents=True, exist_ok=True)
    for name in ("__init__", "functional", "transforms"):
        (pkg / f"{name}.py").write_text('"""Empty stand-in: FLUX tests never touch audio."""\n')
    sys.path.insert(0, str(root))


@pytest.fixture(scope="package")
def comfy(tmp_path_factory):
    """ComfyUI's modules, imported in this process on the CPU (skips without COMFYUI_PATH).

    After this folder's tests ComfyUI leaves this process again (its modules and path entry removed), so
    later tests that check the pack imports without ComfyUI still see a process without it.
    """
    if not COMFYUI_PATH:
        pytest.skip("COMFYUI_PATH is not set: in-process ComfyUI training tests need a ComfyUI checkout")
    root = Path(COMFYUI_PATH).resolve()
    if not (root / "comfy" / "model_patcher.py").is_file():
        pytest.skip(f"COMFYUI_PATH={COMFYUI_PATH} is not a ComfyUI checkout")
    stubs = tmp_path_factory.mktemp("stubs")
    _stub_torchaudio(stubs)
    added = COMFYUI_PATH not in sys.path
    if added:
        sys.path.append(COMFYUI_PATH)
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    import comfy.model_management
    import comfy.sd

    yield comfy
    # ComfyUI's root has a `tests` folder too; ours must stay imported (dropping tests.comfyui.harness would
    # re-import it with new classes, and pytest.raises(ComfyError) in later tests would miss the server's errors)
    tops = ({p.stem for p in root.iterdir()} - {"tests"}) | {PACK_PREFIX}
    if str(stubs) in sys.path:
        tops.add("torchaudio")
    for name in list(sys.modules):
        if name.split(".")[0] in tops:
            del sys.modules[name]
    if added:
        sys.path.remove(COMFYUI_PATH)
    if str(stubs) in sys.path:
        sys.path.remove(str(stubs))


@pytest.fixture(scope="session")
def pack():
    return pack_module


@pytest.fixture
def training_mode(comfy):
    """ComfyUI's autograd-safe paths (torch RoPE instead of comfy_kitchen kernels, which lack float64),
    as the backend's session sets them."""
    comfy.model_management.in_training = True
    yield
    comfy.model_management.in_training = False


@pytest.fixture(scope="session")
def tiny_bfl(tmp_path_factory) -> Path:
    return write_tiny_flux(
        tmp_path_factory.mktemp("flux") / "tiny_flux.safetensors", "bfl", TINY_DIMS, seed=0
    )


def load_flux(comfy, path: Path, dtype: torch.dtype):
    """A fresh ComfyUI ModelPatcher over the tiny FLUX, loaded under inference mode as ComfyUI's nodes do."""
    with torch.inference_mode():
        return comfy.sd.load_diffusion_model(str(path), model_options={"dtype": dtype})


@pytest.fixture(scope="package")
def load(comfy):
    return lambda path, dtype: load_flux(comfy, path, dtype)


@pytest.fixture(scope="package")
def flux64(comfy, tiny_bfl):
    """The tiny FLUX in float64, its inference-mode weights made autograd-usable as the backend does."""
    patcher = load_flux(comfy, tiny_bfl, torch.float64)
    assert pack_module("comfy_training.base").materialize_inference_tensors(patcher.model) > 0
    return patcher


@pytest.fixture(scope="package")
def qwen64(comfy):
    """The tiny Qwen-Image in float64, its weights made autograd-usable as the backend does."""
    patcher = load_qwen(comfy, torch.float64)
    assert pack_module("comfy_training.base").materialize_inference_tensors(patcher.model) > 0
    return patcher
