"""Test-only import hook: lets CUDA builds of torchvision/torchaudio import next to CPU torch (never shipped).

Why: every torchvision wheel the CI machines reach is a CUDA build. Its compiled ``_C`` cannot load next to CPU
torch; torchvision copes with that, except that ``torchvision._meta_registrations`` registers fake kernels for
``torchvision::nms`` and ``torchvision::qnms`` unconditionally, and import then fails with
``RuntimeError: operator torchvision::nms does not exist``. ComfyUI imports torchvision unguarded in core
modules, so the test server would not start.

What it does: just before ``torchvision._meta_registrations`` is imported, and only when those operators do not
exist (``_C`` did not load), it defines the two operator SCHEMAS (no implementation). What that hides: C++-only
ops (nms, roi_pool, deform_conv2d, image/video decoding) raise torchvision's own "Couldn't load custom C++ ops"
error; FLUX and this pack use none of them. With a torchvision whose ``_C`` loads, it does nothing.

torchaudio falls back to pure Python when its ``lib/_torchaudio*.so`` is absent, but raises when the file is
there and cannot load (it needs CUDA libraries). When that library does not load, the hook points
torchaudio's library folder at an empty path, which is the "absent" case torchaudio supports.
"""

from __future__ import annotations

import ctypes
import importlib.abc
import importlib.machinery
import sys

TARGET = "torchvision._meta_registrations"
AUDIO_UTILS = "torchaudio._extension.utils"
SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_LIBRARY = []  # keeps the torch.library.Library alive (its definitions vanish when it is collected)


def define_missing_schemas() -> list[str]:
    """Define the torchvision operator schemas that do not exist yet; returns the names defined."""
    import torch

    missing = [name for name in SCHEMAS if not _has_schema(name)]
    if missing:
        lib = torch.library.Library("torchvision", "FRAGMENT")
        for name in missing:
            lib.define(SCHEMAS[name])
        _LIBRARY.append(lib)
    return missing


def _has_schema(name: str) -> bool:
    import torch

    try:
        getattr(torch.ops.torchvision, name)
    except (AttributeError, RuntimeError):
        return False
    return True


def hide_unloadable_audio_library(utils) -> bool:
    """Point torchaudio's ``_LIB_DIR`` at an empty path when its ``_torchaudio`` library cannot load."""
    for path in utils._LIB_DIR.glob("_torchaudio*"):
        try:
            ctypes.CDLL(str(path))
        except OSError:
            utils._LIB_DIR = utils._LIB_DIR / "unloadable-cuda-build"
            return True
    return False


class _AudioLoader(importlib.abc.Loader):
    """Runs torchaudio's own loader, then :func:`hide_unloadable_audio_library` on the module."""

    def __init__(self, real) -> None:
        self.real = real

    def create_module(self, spec):
        return self.real.create_module(spec)

    def exec_module(self, module) -> None:
        self.real.exec_module(module)
        hide_unloadable_audio_library(module)


class _Finder(importlib.abc.MetaPathFinder):
    """Defines the schemas before torchvision's meta registrations; wraps torchaudio's extension utils."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname == TARGET:
            define_missing_schemas()
        elif fullname == AUDIO_UTILS:
            spec = importlib.machinery.PathFinder.find_spec(fullname, path)
            if spec is not None and spec.loader is not None:
                spec.loader = _AudioLoader(spec.loader)
            return spec
        return None  # the normal finders import the module itself


def install() -> None:
    """Idempotent: add the finder unless torchvision's meta registrations are already imported."""
    if TARGET in sys.modules or any(isinstance(f, _Finder) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _Finder())
