"""Identity folders, JSONL manifests, face screening and `metalora dataset check`."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from PIL import Image

from metalora_core.cli.main import main
from metalora_core.errors import MetaLoRAError
from metalora_core.meta.dataset import load_identity_set, screen_faces, split_holdout


def _photo(path, size=(64, 48), colour=(200, 10, 10)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def test_folder_scan_reads_identities_sizes_and_captions(tmp_path):
    _photo(tmp_path / "bob" / "a.png", (80, 40))
    (tmp_path / "bob" / "a.txt").write_text("photo of a man\n")
    _photo(tmp_path / "alice" / "b.jpg")
    (tmp_path / "alice" / "notes.md").write_text("ignored")
    (tmp_path / "alice" / "broken.png").write_bytes(b"not an image")
    data = load_identity_set(tmp_path)
    assert data.names == ["alice", "bob"]
    assert [(it.identity, it.path.name, it.size, it.caption) for it in data.items] == [
        (0, "b.jpg", (64, 48), None),
        (1, "a.png", (80, 40), "photo of a man"),
    ]
    assert len(data.unreadable) == 1 and "broken.png" in data.unreadable[0]


def test_manifest_paths_are_relative_to_it_and_bad_lines_are_named(tmp_path):
    _photo(tmp_path / "img" / "x.png")
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(
        json.dumps({"identity": "p1", "image": "img/x.png", "caption": "photo of a woman"}) + "\n\n"
    )
    data = load_identity_set(manifest)
    assert data.names == ["p1"] and data.items[0].caption == "photo of a woman"
    manifest.write_text('{"identity": "p1"}\n')
    with pytest.raises(MetaLoRAError, match="line 1"):
        load_identity_set(manifest)
    with pytest.raises(MetaLoRAError, match="no such dataset"):
        load_identity_set(tmp_path / "missing")


class _FakeAnalyzer:
    """Finds a 'face' only in red photos (stands in for insightface so the screening logic is tested)."""

    def face(self, rgb, index=0):
        if rgb[0, 0, 0] > 100:
            return SimpleNamespace(box=(4, 5, 20, 30), bbox=(4, 5, 20, 30))
        return None


def test_face_screening_drops_faceless_photos_and_reports_identities_without_any(tmp_path):
    _photo(tmp_path / "a" / "1.png")
    _photo(tmp_path / "a" / "2.png", colour=(0, 0, 255))
    _photo(tmp_path / "b" / "1.png", colour=(0, 0, 255))
    screened = screen_faces(load_identity_set(tmp_path), _FakeAnalyzer())
    assert [it.path.name for it in screened.items] == ["1.png"] and screened.items[0].identity == 0
    assert screened.skipped_identities == ["b"]
    assert len(screened.no_face_images) == 2
    assert screened.face_boxes[screened.items[0].path] == (4.0, 5.0, 20.0, 30.0)


def test_holdout_takes_the_last_identities(meta_assets):
    data = load_identity_set(meta_assets["data"])
    train, held = split_holdout(data, 2)
    assert held == [4, 5] and {it.identity for it in train.items} == {0, 1, 2, 3}
    with pytest.raises(MetaLoRAError, match="leaves no identity"):
        split_holdout(data, 6)


def test_dataset_check_reports_buckets_and_drops(meta_assets, capsys):
    data = str(meta_assets["data"])
    assert (
        main(["dataset", "check", data, "--resolution", "128", "--identities-per-batch", "2", "--json"]) == 0
    )
    report = json.loads(capsys.readouterr().out)
    assert report["identities"] == 6 and report["images"] == 24 and report["captions"] == 12
    # 128 px buckets are 1:1, 1:3, 1:4 (and transposes): within 0.25 (log aspect) only the square photos fit
    squares = sum(1 for it in load_identity_set(data).items if it.size[0] == it.size[1])
    assert 0 < squares < 24
    assert len(report["dropped_aspect"]) == 24 - squares == 24 - sum(report["buckets"].values())
    assert report["remainder"] == squares % 2
    assert main(["dataset", "check", data, "--resolution", "128", "--max-aspect-error", "0.5"]) == 0
    assert "dropped (aspect further than 0.5 from every bucket): 0" in capsys.readouterr().out
    assert main(["dataset", "check", str(meta_assets["root"] / "nope")]) == 2


def test_dataset_check_with_a_face_model_reports_faces_and_skipped_identities(tmp_path, capsys):
    """Through insightface with the tiny marker detector: identity 'a' has faces, 'b' none."""
    import numpy as np

    from metalora_core.dev.tiny_faces import paint_markers, write_tiny_face_models

    write_tiny_face_models(tmp_path / "models")
    for name, marked in (("a", True), ("b", False)):
        for j in range(2):
            rgb = np.full((320, 320, 3), 90 + 40 * j, np.uint8)
            rgb = paint_markers(rgb, [((320, 320), 128)]) if marked else rgb
            (tmp_path / "data" / name).mkdir(parents=True, exist_ok=True)
            Image.fromarray(rgb).save(tmp_path / "data" / name / f"{j}.png")
    args = ["dataset", "check", str(tmp_path / "data"), "--face-models", str(tmp_path / "models")]
    assert main([*args, "--face-model", "tiny", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["faces_found"] == 2 and report["skipped_identities"] == ["b"]
    assert report["identities"] == 1 and len(report["no_face_images"]) == 2
    assert main([*args, "--face-model", "missing"]) == 2
    assert "missing" in capsys.readouterr().err


def test_exif_rotated_photo_is_bucketed_at_its_displayed_shape(tmp_path):
    """A phone portrait stored landscape with EXIF orientation 6 must get a portrait bucket, as its pixels load."""
    from metalora_core.faces import load_image

    path = tmp_path / "carol" / "phone.jpg"
    path.parent.mkdir(parents=True)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    Image.new("RGB", (80, 40), (10, 200, 10)).save(path, exif=exif)
    data = load_identity_set(tmp_path)
    height, width = load_image(path).shape[:2]
    assert (width, height) == (40, 80)
    assert data.items[0].size == (40, 80)
