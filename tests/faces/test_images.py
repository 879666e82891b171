"""Image files are read as a person sees them: EXIF rotation applied to the pixels and to the size."""

from __future__ import annotations

import pytest
from PIL import Image

from metalora_core.errors import MetaLoRAError
from metalora_core.faces import image_size, load_image


@pytest.mark.parametrize(
    "orientation, expected", [(1, (80, 40)), (3, (80, 40)), (6, (40, 80)), (8, (40, 80))]
)
def test_image_size_matches_loaded_pixels(tmp_path, orientation, expected):
    path = tmp_path / f"o{orientation}.jpg"
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.new("RGB", (80, 40), (200, 10, 10)).save(path, exif=exif)
    height, width = load_image(path).shape[:2]
    assert image_size(path) == (width, height) == expected


def test_image_size_names_bad_files(tmp_path):
    with pytest.raises(MetaLoRAError, match="missing.png: no such image file"):
        image_size(tmp_path / "missing.png")
    bad = tmp_path / "bad.png"
    bad.write_text("nope")
    with pytest.raises(MetaLoRAError, match="bad.png: not a readable image"):
        image_size(bad)
