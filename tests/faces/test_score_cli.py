"""``metalora score``: table + JSON on folders; user errors exit 2 with a one-line message naming the input."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from metalora_core.cli.main import main
from metalora_core.dev.tiny_faces import paint_markers


@pytest.fixture(scope="module")
def folders(tmp_path_factory, astronaut):
    root = tmp_path_factory.mktemp("score")
    gen, refs = root / "generated", root / "references"
    gen.mkdir()
    refs.mkdir()
    face = lambda img: paint_markers(img, [((288, 128), 128)])  # noqa: E731
    Image.fromarray(face(astronaut)).save(refs / "train.png")
    Image.fromarray(face(np.ascontiguousarray(astronaut[:, ::-1]))).save(refs / "other1.png")
    Image.fromarray(face(np.roll(astronaut, 25, axis=1))).save(refs / "other2.jpg", quality=95)
    Image.fromarray(face(astronaut // 2 + 60)).save(gen / "a.png")
    Image.fromarray(astronaut).save(gen / "b_noface.png")
    Image.fromarray(np.full((16, 16), 128, np.uint8)).save(gen / "c_tiny.png")  # greyscale, 16 px
    rgba = np.concatenate(
        [face(np.ascontiguousarray(astronaut[::-1])), np.full((512, 512, 1), 255, np.uint8)], 2
    )
    Image.fromarray(rgba).save(gen / "d_rgba.png")
    return root


def test_score_prints_table_and_writes_json(folders, face_root, capsys):
    out = folders / "score.json"
    argv = ["score", "--generated", str(folders / "generated"), "--references", str(folders / "references")]
    argv += ["--exclude", str(folders / "references" / "train.png"), "--face-model", "tiny"]
    argv += ["--insightface-root", str(face_root), "--json", str(out), "--cpu"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "R-FaceSim" in text and "no face             2 of 4 (50.0 %)" in text and "too small" in text
    data = json.loads(out.read_text())
    assert data["total"] == 4 and data["no_face"] == 2 and data["score"] is not None
    assert data["references_excluded"] == ["train.png"] and data["references_used"] == [
        "other1.png",
        "other2.jpg",
    ]
    assert [im["name"] for im in data["images"]] == ["a.png", "b_noface.png", "c_tiny.png", "d_rgba.png"]
    assert data["per_image"][1] is None and data["per_image"][3] is not None
    assert len(data["extras"]["psnr_ref"]) == 4


@pytest.mark.parametrize(
    "change, message",
    [
        ({"--generated": "empty"}, "holds no images"),
        ({"--face-model": "antelopev2"}, "insightface/models/antelopev2"),
        ({"--exclude": "missing.png"}, "no such image file"),
    ],
)
def test_score_user_errors_exit_2(folders, face_root, capsys, change, message):
    (folders / "empty").mkdir(exist_ok=True)
    args = {
        "--generated": str(folders / "generated"),
        "--references": str(folders / "references"),
        "--face-model": "tiny",
        "--insightface-root": str(face_root),
    }
    for key, value in change.items():
        args[key] = value if key == "--face-model" else str(folders / value)
    argv = ["score"] + [x for kv in args.items() for x in kv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.startswith("metalora score: error:")
