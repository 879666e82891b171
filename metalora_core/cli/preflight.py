"""Checks the command line can make before anything slow runs, and a save that never loses a result.

Why: loading FLUX takes from seconds (tiny) to minutes (FLUX.1-dev). A setting the arguments alone decide
(``--steps 0``, ``--resolution 100``, ``--lr -1``, an ``--out`` that is a folder) must fail in the first
second with one line naming the option, not after the model loaded or, worse, after training finished.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from ..errors import MetaLoRAError

# An upscale beyond this factor (photo side -> training side) is refused: the adapter would learn blur.
MAX_UPSCALE = 4.0
# Beyond this factor the photo is used but a warning names its size and the training size.
WARN_UPSCALE = 1.5


def at_least(minimum: float, **options: float | None) -> None:
    """Every option given (``steps=args.steps`` is ``--steps``) must be >= ``minimum``; None is skipped."""
    for name, value in options.items():
        if value is not None and value < minimum:
            raise MetaLoRAError(f"{_flag(name)} {value:g}: must be at least {minimum:g}")


def positive(**options: float | None) -> None:
    """Every option given must be > 0 (a learning rate: a negative one trains uphill); None is skipped."""
    for name, value in options.items():
        if value is not None and not value > 0:
            raise MetaLoRAError(f"{_flag(name)} {value:g}: must be greater than 0")


def resolution(value: int, flag: str = "--resolution") -> None:
    """FLUX packs 2x2 latents of an 8x VAE, and buckets step by 64 px: a multiple of 64 is required."""
    if value < 64 or value % 64:
        raise MetaLoRAError(
            f"{flag} {value}: must be a multiple of 64 of at least 64 (e.g. 512 or 1024; "
            f"nearest: {max(64, round(value / 64) * 64)})"
        )


def existing(path: str | None, flag: str, kind: str = "any") -> None:
    """An input named on the command line exists (and is a file / folder when ``kind`` says so)."""
    if path is None:
        return
    p = Path(path).expanduser()
    if not p.exists():
        raise MetaLoRAError(f"{flag} {path}: no such {'folder' if kind == 'dir' else 'file'}")
    if kind == "file" and not p.is_file():
        raise MetaLoRAError(f"{flag} {path}: is a folder; give a file")
    if kind == "dir" and not p.is_dir():
        raise MetaLoRAError(f"{flag} {path}: is a file; give a folder")


def inputs(*checks: tuple[str, str | None, str]) -> None:
    """:func:`existing` for each ``(flag, path, kind)``: every input named on the command line, in order."""
    for flag, path, kind in checks:
        existing(path, flag, kind)


def output_file(path: str | os.PathLike, flag: str = "--out") -> Path:
    """``path`` can be written as a file: not a folder, and its folder exists or can be made, writable
    (saves write a temporary file there and rename it, so the folder's permission is what counts)."""
    p = Path(path).expanduser()
    if p.is_dir():
        raise MetaLoRAError(f"{flag} {path}: is a folder; give a file name, e.g. {p / 'me.safetensors'}")
    folder = _nearest_existing(p.parent)
    if not folder.is_dir():
        raise MetaLoRAError(f"{flag} {path}: {folder} is a file, so no folder can be made there")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise MetaLoRAError(f"{flag} {path}: folder {folder} is not writable; choose another place")
    return p


def output_folder(path: str | os.PathLike | None, flag: str) -> None:
    """``path`` is (or can become) a writable folder: not an existing file."""
    if path is None:
        return
    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        raise MetaLoRAError(f"{flag} {path}: is a file; give a folder (it is created if missing)")
    folder = _nearest_existing(p)
    if not folder.is_dir():
        raise MetaLoRAError(f"{flag} {path}: {folder} is a file, so no folder can be made there")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise MetaLoRAError(f"{flag} {path}: folder {folder} is not writable; choose another place")


def _nearest_existing(p: Path) -> Path:
    p = p.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def photo_size(size: tuple[int, int], bucket: tuple[int, int], flag: str = "--image") -> str | None:
    """Refuse a photo the training size would blow up more than ``MAX_UPSCALE`` times; else a warning
    (or None) naming both sizes when it is upscaled more than ``WARN_UPSCALE`` times."""
    (w, h), (bw, bh) = size, bucket
    factor = max(bw / w, bh / h)
    sizes = f"the photo is {w}x{h} px and trains at {bw}x{bh} px ({factor:.1f}x upscaled)"
    if factor > MAX_UPSCALE:
        raise MetaLoRAError(
            f"{flag}: {sizes}; use a photo of at least {round(bw / MAX_UPSCALE)}x{round(bh / MAX_UPSCALE)} "
            "px (ideally the training size) or a lower --resolution"
        )
    if factor > WARN_UPSCALE:
        return (
            f"warning: {flag}: {sizes}; the adapter learns the blur of the upscale. A larger photo is better"
        )
    return None


def say(message: str, quiet: bool = False) -> None:
    """One status line on stderr (stdout stays machine-readable JSON)."""
    if not quiet:
        print(message, file=sys.stderr, flush=True)


class SavedElsewhere(MetaLoRAError):
    """The result could not be written where asked; ``path`` is where it went instead."""

    def __init__(self, message: str, path: Path) -> None:
        super().__init__(message)
        self.path = path


def save_or_beside(path: Path, save: Callable[[Path], Path], flag: str = "--out") -> Path:
    """``save(path)``; if that fails (disk full, folder removed, permissions changed during training), save
    under a new name beside it, else in the working folder, else the temp folder, and raise an error that
    says where the result went. A trained result is never lost to a failed write."""
    try:
        return save(path)
    except OSError as first:
        for folder in _fallback_folders(path):
            alt = (
                folder / f"{path.stem}.saved-{time.strftime('%Y%m%d-%H%M%S')}{path.suffix or '.safetensors'}"
            )
            try:
                written = save(alt)
            except OSError:
                continue
            raise SavedElsewhere(
                f"{flag} {path}: could not write it ({type(first).__name__}: {first.strerror or first}); "
                f"the result was saved to {written} instead",
                written,
            ) from None
        raise MetaLoRAError(
            f"{flag} {path}: could not write it ({first}), nor anywhere else; free disk space and rerun"
        ) from None


def _fallback_folders(path: Path) -> Iterable[Path]:
    import tempfile

    seen = set()
    for folder in (path.parent, Path.cwd(), Path(tempfile.gettempdir())):
        key = str(folder.absolute())
        if key not in seen:
            seen.add(key)
            yield folder


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")
