"""Atomic safetensors I/O and content fingerprints. Nothing here ever unpickles."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .errors import MetaLoRAError


def current_umask() -> int:
    """The process umask, read without changing it where the OS shows it (Linux), else set-and-restore."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _final_mode(path: Path) -> int:
    """What ``open()`` would give a new file (0666 minus the umask), or the mode of the file replaced.

    Why: ``mkstemp`` creates its file 0600 whatever the umask, so without this every saved LoMD, identity
    or exported LoRA would be unreadable to a ComfyUI running as another user or in a container.
    """
    try:
        return stat.S_IMODE(path.stat().st_mode)
    except OSError:
        return 0o666 & ~current_umask()


def atomic_write_bytes(path: str | os.PathLike, write) -> Path:
    """Call ``write(tmp_path)`` then fsync and rename over ``path``: readers never see half a file.

    The file gets the mode a plain ``open()`` would give it (the umask is honoured), or keeps the mode of the
    file it replaces.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, _final_mode(path))
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:  # make the rename itself durable where the platform allows it
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass
    return path


def save_tensors(
    path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, object]
) -> Path:
    """Save contiguous CPU tensors with string metadata (non-strings are JSON-encoded), atomically."""
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}
    data: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, value in tensors.items():
        t = value.detach().to("cpu").contiguous()
        storage = t.untyped_storage().data_ptr()
        # safetensors refuses tensors sharing memory (e.g. one Down written under several diffusers names)
        data[key] = t.clone() if storage in seen else t
        seen.add(storage)
    return atomic_write_bytes(path, lambda tmp: save_file(data, tmp, metadata=meta))


def load_tensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Load every tensor and the metadata of a safetensors file, with a clear error for anything else."""
    path = Path(path)
    if not path.is_file():
        raise MetaLoRAError(f"{path}: no such file")
    try:
        with safe_open(str(path), framework="pt") as fh:
            metadata = dict(fh.metadata() or {})
            tensors = {key: fh.get_tensor(key) for key in fh.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise MetaLoRAError(
            f"{path}: not a readable safetensors file ({exc}). Only .safetensors files are accepted; "
            "if the download was interrupted, fetch it again"
        ) from None
    return tensors, metadata


def read_keys(path: str | os.PathLike) -> list[str]:
    """Tensor names only, from the header."""
    try:
        with safe_open(str(path), framework="pt") as fh:
            return list(fh.keys())
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise MetaLoRAError(f"{path}: not a readable safetensors file ({exc})") from None


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The header metadata only (cheap: no tensor is read)."""
    try:
        with safe_open(str(path), framework="pt") as fh:
            return dict(fh.metadata() or {})
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise MetaLoRAError(f"{path}: not a readable safetensors file ({exc})") from None


def fingerprint(tensors: Mapping[str, torch.Tensor]) -> str:
    """A content hash over names, dtypes, shapes and bytes, independent of insertion order."""
    digest = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].detach().to("cpu").contiguous()
        digest.update(key.encode())
        digest.update(str(t.dtype).encode())
        digest.update(str(tuple(t.shape)).encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()[:16]
