"""The stage-1 identity set: a folder of identity subfolders of photos (an optional ``.txt`` caption beside
each image) or a JSONL manifest, plus optional face screening so photos without a usable face never train
the shared Down (an identity prior learnt from face-less photos is a prior of backgrounds)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import MetaLoRAError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class ImageItem:
    """One photo of one identity: where it is, its size and (optionally) its own caption."""

    identity: int
    path: Path
    size: tuple[int, int]  # (width, height) in pixels
    caption: str | None = None


@dataclass
class IdentitySet:
    """Identities (sorted names) and their photos; ``face_boxes`` filled by :func:`screen_faces`."""

    names: list[str]
    items: list[ImageItem]
    face_boxes: dict[Path, Box] = field(default_factory=dict)
    skipped_identities: list[str] = field(default_factory=list)  # no usable face in any photo
    no_face_images: list[Path] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)

    def images_of(self, identity: int) -> list[ImageItem]:
        return [it for it in self.items if it.identity == identity]


def _caption_beside(path: Path) -> str | None:
    txt = path.with_suffix(".txt")
    return (txt.read_text(encoding="utf-8").strip() or None) if txt.is_file() else None


def _size(path: Path, unreadable: list[str]) -> tuple[int, int] | None:
    """The size the photo will be trained at (EXIF rotation applied, as the pixels are loaded)."""
    from ..faces.images import image_size

    try:
        return image_size(path)
    except MetaLoRAError as exc:
        unreadable.append(str(exc))
        return None


def _from_pairs(pairs: list[tuple[str, Path, str | None]], source: str) -> IdentitySet:
    names = sorted({name for name, _, _ in pairs})
    if not names:
        raise MetaLoRAError(f"{source}: no identities with images found ({', '.join(IMAGE_SUFFIXES)})")
    index = {n: i for i, n in enumerate(names)}
    unreadable: list[str] = []
    items = []
    for name, path, text in sorted(pairs, key=lambda p: (p[0], str(p[1]))):
        size = _size(path, unreadable)
        if size is not None:
            items.append(ImageItem(index[name], path, size, text))
    return IdentitySet(names, items, unreadable=unreadable)


def scan_folder(root: str | os.PathLike) -> IdentitySet:
    """``root/<identity>/<photo>.jpg`` (+ ``<photo>.txt`` caption); hidden folders and files are ignored."""
    root = Path(root)
    if not root.is_dir():
        raise MetaLoRAError(f"{root}: not a folder of identity subfolders (or give a .jsonl manifest)")
    pairs = [
        (sub.name, f, _caption_beside(f))
        for sub in sorted(root.iterdir())
        if sub.is_dir() and not sub.name.startswith(".")
        for f in sorted(sub.iterdir())
        if f.suffix.lower() in IMAGE_SUFFIXES and not f.name.startswith(".")
    ]
    return _from_pairs(pairs, str(root))


def read_manifest(path: str | os.PathLike) -> IdentitySet:
    """JSONL, one photo a line: ``{"identity": "...", "image": "path", "caption": "..." (optional)}``.

    Relative image paths are relative to the manifest's folder.
    """
    path = Path(path)
    pairs = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            name, image = str(row["identity"]), Path(row["image"])
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise MetaLoRAError(
                f"{path} line {number}: need a JSON object with 'identity' and 'image' ({exc})"
            ) from None
        pairs.append((name, image if image.is_absolute() else path.parent / image, row.get("caption")))
    return _from_pairs(pairs, str(path))


def load_identity_set(source: str | os.PathLike) -> IdentitySet:
    """A folder of identity subfolders, or a ``.jsonl`` manifest."""
    source = Path(source)
    if source.is_file() and source.suffix.lower() == ".jsonl":
        return read_manifest(source)
    if not source.exists():
        raise MetaLoRAError(f"{source}: no such dataset folder or manifest")
    return scan_folder(source)


def screen_faces(data: IdentitySet, analyzer) -> IdentitySet:
    """Keep photos where ``analyzer`` finds a face (their boxes recorded); identities left with none are
    reported in ``skipped_identities`` and dropped. Identity indices keep their names."""
    from ..faces import face_box, load_image

    kept, boxes, no_face = [], {}, []
    for item in data.items:
        box = face_box(load_image(item.path), analyzer)
        if box is None:
            no_face.append(item.path)
        else:
            kept.append(item)
            boxes[item.path] = tuple(float(v) for v in box)
    present = {it.identity for it in kept}
    skipped = [n for i, n in enumerate(data.names) if i not in present]
    return IdentitySet(data.names, kept, boxes, skipped, no_face, data.unreadable)


def split_holdout(data: IdentitySet, n: int) -> tuple[IdentitySet, list[int]]:
    """The last ``n`` identities (by name) that have photos, kept out of meta-training for the hold-out check."""
    present = sorted({it.identity for it in data.items})
    if n <= 0:
        return data, []
    if n >= len(present):
        raise MetaLoRAError(f"--holdout {n} leaves no identity to meta-train on ({len(present)} have photos)")
    held = present[-n:]
    train = [it for it in data.items if it.identity not in held]
    return IdentitySet(
        data.names, train, data.face_boxes, data.skipped_identities, data.no_face_images, data.unreadable
    ), held
