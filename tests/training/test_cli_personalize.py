"""`metalora personalize` end to end on tiny models built by the `dev` commands."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from metalora_core.cli.main import main
from metalora_core.formats import load_identity
from tests.personalize_kit import personalize_args, write_kit


@pytest.fixture(scope="module")
def kit(tmp_path_factory):
    return write_kit(tmp_path_factory.mktemp("cli"), (96, 160))


def _args(root, out, *extra):
    return personalize_args(
        root,
        out,
        "--steps",
        "6",
        "--resolution",
        "128",
        "--views",
        "3",
        "--quiet",
        "--trigger",
        "zkx",
        *extra,
    )


def test_personalize_writes_adapter_and_loss_png(kit, tmp_path, capsys):
    out = tmp_path / "me.safetensors"
    assert (
        main(
            _args(kit, out, "--face-box", "40,10,100,80", "--face-weight", "2", "--cache-dir", str(tmp_path))
        )
        == 0
    )
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["steps"] == 6 and report["written"] == str(out)
    adapter = load_identity(out)
    assert adapter.training["steps"] == 6 and adapter.training["caption"] == "photo of zkx person"
    assert adapter.training["face_box"] == [40.0, 10.0, 100.0, 80.0] and adapter.training["seed"] == 0
    assert any(float(u.abs().max()) > 0 for u in adapter.ups.values())  # it trained
    png = Image.open(tmp_path / "me.loss.png")
    assert png.format == "PNG" and png.size == (800, 400)
    assert main(["inspect", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["kind"] == "identity" and summary["training"]["trigger"] == "zkx"
    # the cached views make a second run identical (same seed) without re-encoding
    assert len(list(tmp_path.glob("*.safetensors"))) == 2
    again = tmp_path / "again.safetensors"
    assert (
        main(
            _args(
                kit, again, "--face-box", "40,10,100,80", "--face-weight", "2", "--cache-dir", str(tmp_path)
            )
        )
        == 0
    )
    assert load_identity(again).fingerprint == adapter.fingerprint


def test_personalize_user_errors(kit, tmp_path, capsys):
    out = tmp_path / "x.safetensors"
    args = _args(kit, out)
    no_vae = args[: args.index("--vae")] + args[args.index("--vae") + 2 :]
    assert main(no_vae) == 2 and "--vae" in capsys.readouterr().err
    no_cond = args[: args.index("--conditioning")] + args[args.index("--conditioning") + 2 :]
    assert main(no_cond) == 2 and "--conditioning" in capsys.readouterr().err
    assert main(_args(kit, out, "--face-box", "1,2,3")) == 2 and "x0,y0,x1,y1" in capsys.readouterr().err
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    args[args.index("--image") + 1] = str(bad)
    assert main(args) == 2 and "not a readable image" in capsys.readouterr().err
    assert not out.exists()


def test_personalize_from_a_pipeline_folder(kit, tmp_path, capsys):
    """FLUX.1-dev's layout: VAE and both text encoders come from the folder, read offline."""
    pipe = tmp_path / "pipe"
    assert main(["dev", "tiny-pipeline", "--out", str(pipe)]) == 0
    out = tmp_path / "p.safetensors"
    args = [
        "personalize", "--flux", str(pipe), "--lomd", str(kit / "lomd.safetensors"), "--image",
        str(kit / "photo.png"), "--out", str(out), "--steps", "3", "--resolution", "128", "--views", "2",
        "--quiet", "--caption", "{trigger} {class} in the garden",
    ]  # fmt: skip
    assert main(args) == 0
    adapter = load_identity(out)
    assert adapter.training["caption"] == "ohwx person in the garden" and adapter.training["steps_done"] == 3
    assert (tmp_path / "p.loss.png").is_file()


def test_personalize_trains_a_phone_photo_the_way_it_is_displayed(kit, tmp_path, capsys):
    """Stored landscape with EXIF orientation 6 (a phone portrait): the bucket must be portrait."""
    photo = tmp_path / "phone.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.open(kit / "photo.png").save(photo, exif=exif)  # stored 160 x 96, displayed 96 x 160
    out = tmp_path / "phone.safetensors"
    args = _args(kit, out, "--steps", "1", "--resolution", "256")
    args[args.index("--image") + 1] = str(photo)
    assert main(args) == 0
    capsys.readouterr()
    width, height = load_identity(out).training["bucket"]
    assert height > width
