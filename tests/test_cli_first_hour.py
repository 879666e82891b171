"""What a new user hits in the first hour: every bad input gives one line naming the input and exit 2,
decided before any model loads where the arguments decide; a trained result is never lost to a failed
write; every option's help shows its default; the face features say what is missing without insightface."""

from __future__ import annotations

import argparse
import errno
import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from metalora_core.cli import personalize_cmd
from metalora_core.cli.main import all_parsers, build_parser, main
from metalora_core.dev.tiny_faces import paint_markers, write_tiny_face_models
from metalora_core.errors import MetaLoRAError
from metalora_core.formats import load_identity
from metalora_core.training.diffusers_backend import DiffusersBackend
from tests.personalize_kit import personalize_args, write_kit


@pytest.fixture(scope="module")
def kit(tmp_path_factory):
    root = write_kit(tmp_path_factory.mktemp("firsthour"), (128, 128))
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(root / "tiny.png")
    return root


def _args(root, out, *extra):
    return personalize_args(
        root, out, "--steps", "2", "--resolution", "128", "--views", "2", "--quiet", *extra
    )


@pytest.fixture
def no_model_load(monkeypatch):
    """Loading FLUX fails the test: these inputs must be judged before it."""

    def refuse(*args, **kwargs):
        raise AssertionError("FLUX was loaded before the bad input was reported")

    monkeypatch.setattr(DiffusersBackend, "from_path", refuse)  # every command loads FLUX through it


def _one_line_error(capsys, *needles: str) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err and lines[0].startswith("metalora ")
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize(
    ("extra", "needles"),
    [
        (("--steps", "0"), ("--steps 0", "at least 1")),
        (("--resolution", "100"), ("--resolution 100", "multiple of 64", "nearest: 128")),
        (("--lr", "-1"), ("--lr -1", "greater than 0")),
        (("--lr-mid", "-0.001"), ("--lr-mid -0.001",)),
        (("--lr-up", "0"), ("--lr-up 0",)),
        (("--warmup", "-1"), ("--warmup -1",)),
        (("--views", "0"), ("--views 0",)),
        (("--batch-size", "0"), ("--batch-size 0",)),
        (("--face-weight", "-2"), ("--face-weight -2",)),
        (("--resume", "missing.ckpt.safetensors"), ("--resume missing.ckpt.safetensors", "no such file")),
        (("--face-box", "1,2,3,4", "--face-model", "tiny"), ("--face-box and --face-model",)),
        (("--device", "gpu0"), ("--device gpu0",)),
        (("--bf16", "--dtype", "bfloat16"), ("--bf16 autocasts a float32 model", "drop --bf16")),
    ],
)
def test_personalize_settings_are_refused_before_flux_loads(
    kit, tmp_path, capsys, no_model_load, extra, needles
):
    assert main(_args(kit, tmp_path / "me.safetensors", *extra)) == 2
    _one_line_error(capsys, *needles)
    assert list(tmp_path.iterdir()) == []


def test_fp8_storage_from_the_command_line(kit, tmp_path, capsys):
    """--dtype float8_e4m3fn trains on the CPU too (bf16 compute) and says how the weights are held."""
    out = tmp_path / "me.safetensors"
    args = [a for a in _args(kit, out, "--dtype", "float8_e4m3fn", "--steps", "2") if a != "--quiet"]
    assert main(args) == 0
    captured = capsys.readouterr()
    assert "(float8_e4m3fn weights, bfloat16 compute (cast layer by layer), on cpu;" in captured.err
    report = json.loads(captured.out.strip().splitlines()[-1])
    assert (
        report["precision"].startswith("float8_e4m3fn weights") and report["gradient_checkpointing"] is False
    )
    assert load_identity(out).training["steps_done"] == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device exists here")
def test_cuda_without_cuda_is_refused(kit, tmp_path, capsys, no_model_load):
    assert main(_args(kit, tmp_path / "me.safetensors", "--device", "cuda")) == 2
    _one_line_error(capsys, "--device cuda", "--device cpu")


def test_out_naming_a_folder_fails_before_training(kit, tmp_path, capsys, no_model_load):
    """It used to fail with IsADirectoryError AFTER training, losing the result."""
    folder = tmp_path / "results"
    folder.mkdir()
    assert main(_args(kit, folder)) == 2
    _one_line_error(capsys, f"--out {folder}", "is a folder")
    blocked = tmp_path / "file.txt"
    blocked.write_text("x")
    assert main(_args(kit, blocked / "me.safetensors")) == 2
    _one_line_error(capsys, "is a file, so no folder can be made")


def test_cache_dir_naming_a_file_fails_before_training(kit, tmp_path, capsys, no_model_load):
    cache = tmp_path / "cache"
    cache.write_text("not a folder")
    assert main(_args(kit, tmp_path / "me.safetensors", "--cache-dir", str(cache))) == 2
    _one_line_error(capsys, f"--cache-dir {cache}", "is a file")


@pytest.mark.parametrize("option", ["--lomd", "--image", "--vae", "--conditioning"])
def test_missing_inputs_are_named(kit, tmp_path, capsys, no_model_load, option):
    args = _args(kit, tmp_path / "me.safetensors")
    args[args.index(option) + 1] = str(tmp_path / "nope")
    assert main(args) == 2
    _one_line_error(capsys, f"{option} {tmp_path / 'nope'}", "no such")


def test_a_tiny_photo_is_refused_with_both_sizes(kit, tmp_path, capsys, no_model_load):
    args = _args(kit, tmp_path / "me.safetensors", "--resolution", "512")
    args[args.index("--image") + 1] = str(kit / "tiny.png")
    assert main(args) == 2
    _one_line_error(capsys, "16x16 px", "512x512 px", "32.0x upscaled")


def test_a_small_photo_trains_with_a_warning_naming_both_sizes(kit, tmp_path, capsys):
    out = tmp_path / "me.safetensors"
    assert main(_args(kit, out, "--resolution", "256", "--steps", "1")) == 0
    err = capsys.readouterr().err
    assert "warning: --image: the photo is 128x128 px and trains at 256x256 px (2.0x upscaled)" in err
    assert load_identity(out).training["steps_done"] == 1


def test_progress_lines_come_before_anything_slow(kit, tmp_path, capsys):
    args = [a for a in _args(kit, tmp_path / "me.safetensors") if a != "--quiet"]
    assert main(args) == 0
    err = capsys.readouterr().err
    first = err.splitlines()[0]
    assert first == (
        f"metalora personalize: loading FLUX from {kit / 'flux.safetensors'} "
        "(float32 weights, on cpu; this takes a while)"
    )
    assert err.index("encoding 2 views") < err.index("gradient checkpointing off (auto: on the CPU")
    assert err.index("gradient checkpointing") < err.index("training 2 steps at 128x128 px")


def test_a_failed_write_after_training_saves_the_result_beside(kit, tmp_path, capsys, monkeypatch):
    """Disk full (or the folder gone) after training: the adapter goes beside under a new name."""
    out = tmp_path / "me.safetensors"
    real = personalize_cmd.save_identity

    def disk_full_at_out(path, adapter):
        if str(path) == str(out):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, adapter)

    monkeypatch.setattr(personalize_cmd, "save_identity", disk_full_at_out)
    assert main(_args(kit, out)) == 2
    line = _one_line_error(capsys, f"--out {out}", "No space left on device", "was saved to")
    saved = [p for p in tmp_path.glob("me.saved-*.safetensors")]
    assert len(saved) == 1 and str(saved[0]) in line and not out.exists()
    assert load_identity(saved[0]).training["steps_done"] == 2
    assert saved[0].with_suffix(".loss.png").is_file()


def test_interrupt_says_checkpoints_stay(kit, tmp_path, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(personalize_cmd, "personalize", interrupted)
    assert main(_args(kit, tmp_path / "me.safetensors")) == 130
    err = capsys.readouterr().err
    assert "result was not written" in err and "--resume" in err and "Traceback" not in err


def test_face_model_finds_the_face_like_the_train_node(kit, tmp_path, capsys):
    root = tmp_path / "models"
    write_tiny_face_models(root, "tiny")
    photo = np.asarray(Image.open(kit / "photo.png").convert("RGB"))
    with_face = tmp_path / "face.png"
    Image.fromarray(paint_markers(photo, [((320, 320), 128)])).save(with_face)
    out = tmp_path / "me.safetensors"
    args = _args(kit, out, "--face-model", "tiny", "--insightface-root", str(root), "--steps", "1")
    args[args.index("--image") + 1] = str(with_face)
    assert main(args) == 0
    training = load_identity(out).training
    x0, y0, x1, y1 = training["face_box"]
    assert 40 <= x0 < x1 <= 88 and 40 <= y0 < y1 <= 88  # the marker in the middle of the 128 px photo
    assert training["face_weight"] == 2.0 and training["face_model"] == "tiny"
    args[args.index("--image") + 1] = str(kit / "photo.png")  # the same photo without a face
    assert main(args) == 2
    _one_line_error(capsys, "finds no face", "--face-box")


def test_meta_train_settings_are_refused_before_flux_loads(kit, tmp_path, capsys, no_model_load):
    base = [
        "meta-train", "--flux", str(kit / "flux.safetensors"), "--data", str(tmp_path),
        "--conditioning", str(kit / "cond.safetensors"), "--vae", str(kit / "vae"),
    ]  # fmt: skip
    out = ["--out", str(tmp_path / "l.safetensors")]
    for extra, needle in [
        (["--steps", "0", *out], "--steps 0"),
        (["--lr", "-1", *out], "--lr -1"),
        (["--lr-heads", "0", *out], "--lr-heads 0"),
        (["--identities-per-batch", "0", *out], "--identities-per-batch 0"),
        (["--resolution", "100", *out], "--resolution 100"),
        (["--out", str(tmp_path)], "is a folder"),
        (["--cache-dir", str(kit / "photo.png"), *out], "--cache-dir"),
    ]:
        assert main(base + extra) == 2, extra
        _one_line_error(capsys, needle)


def test_meta_train_says_how_many_photos_it_drops(kit, tmp_path, capsys, monkeypatch):
    data = tmp_path / "ids"
    assert (
        main(["dev", "synthetic-identities", "--out", str(data), "--identities", "3", "--images", "4"]) == 0
    )
    capsys.readouterr()

    def stop(*args, **kwargs):
        raise MetaLoRAError("stopped before loading FLUX")

    monkeypatch.setattr(DiffusersBackend, "from_path", stop)
    args = [
        "meta-train", "--flux", str(kit / "flux.safetensors"), "--data", str(data), "--resolution", "128",
        "--conditioning", str(kit / "cond.safetensors"), "--vae", str(kit / "vae"),
        "--out", str(tmp_path / "l.safetensors"), "--quiet",
    ]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "6 of 12 photos dropped" in err and "dataset check" in err  # half the synthetic photos are square


def test_export_names_its_default_format_and_checks_out_first(kit, tmp_path, capsys):
    flux, lomd = str(kit / "flux.safetensors"), str(kit / "lomd.safetensors")
    ident = str(tmp_path / "id.safetensors")
    assert main(["dev", "random-adapter", "--lomd", lomd, "--model", flux, "--out", ident]) == 0
    capsys.readouterr()
    assert main(["export", "--lomd", lomd, "--adapter", ident, "--out", str(tmp_path / "x.safetensors")]) == 0
    captured = capsys.readouterr()
    assert "kohya format" in captured.err and json.loads(captured.out)["format"] == "kohya"
    assert main(["export", "--lomd", lomd, "--adapter", ident, "--out", str(tmp_path)]) == 2
    _one_line_error(capsys, "is a folder")


def test_every_option_has_help_that_shows_its_default():
    parser = build_parser()
    missing = []
    for each in all_parsers(parser):
        formatter = each._get_formatter()
        for action in each._actions:
            if not action.option_strings or isinstance(
                action, (argparse._HelpAction, argparse._VersionAction)
            ):
                continue
            text = formatter._expand_help(action) if action.help else ""
            has_default = not any(action.default is v for v in (None, False, argparse.SUPPRESS))
            if not text or (has_default and "default" not in text.lower()):
                missing.append(f"{each.prog} {action.option_strings[0]}")
    assert missing == []
    personalize = next(p for p in all_parsers(parser) if p.prog.endswith(" personalize"))
    assert "(default: 0)" in personalize.format_help()  # --seed 0: a falsy default is still shown


def test_inspect_names_a_conditioning_file(kit, capsys):
    assert main(["inspect", str(kit / "cond.safetensors")]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["kind"] == "conditioning" and summary["tokens"] == 16 and summary["context_dim"] > 0


def test_without_insightface_the_face_features_say_what_to_install(kit, tmp_path, capsys, monkeypatch):
    from metalora_core.faces import load_face_model

    root = tmp_path / "models"
    write_tiny_face_models(root, "tiny")
    monkeypatch.setitem(sys.modules, "insightface", None)  # what `import insightface` sees when absent
    with pytest.raises(MetaLoRAError, match="need insightface, not installed here: pip install insightface"):
        load_face_model(root, "tiny")
    gen = tmp_path / "gen"
    gen.mkdir()
    Image.open(kit / "photo.png").save(gen / "a.png")
    score = ["score", "--generated", str(gen), "--references", str(gen), "--insightface-root", str(root)]
    assert main([*score, "--face-model", "tiny"]) == 2
    _one_line_error(capsys, "insightface", "prebuilt")


@pytest.mark.parametrize("root_name", ["insightface", "insightface/models"])
def test_face_model_hints_never_double_the_insightface_folder(tmp_path, root_name):
    from metalora_core.faces import validate_model

    models = tmp_path / "ComfyUI" / "models"
    write_tiny_face_models(models, "tiny")
    with pytest.raises(MetaLoRAError) as info:
        validate_model(models / root_name, "antelopev2")
    text = str(info.value)
    assert "insightface/insightface" not in text and "models/models" not in text
    assert f"{models / 'insightface' / 'models' / 'antelopev2'}/" in text


def test_face_model_listing_names_model_folders_not_containers(tmp_path):
    from metalora_core.faces import validate_model

    models = tmp_path / "models"
    write_tiny_face_models(models, "tiny")
    with pytest.raises(MetaLoRAError, match="Model folders found there: tiny\\.") as info:
        validate_model(models, "antelopev2")
    assert "insightface," not in str(info.value)


def test_everything_but_the_face_features_imports_without_insightface():
    """insightface is the most common failed install: the library, the CLI and the demo must still load."""
    import subprocess

    code = (
        "import sys\n"
        "for m in ('insightface', 'onnx', 'onnxruntime'): sys.modules[m] = None\n"
        "import metalora_core.faces, metalora_core.cli.main, metalora_core.demo, metalora_core.training.personalize\n"
        "from metalora_core.faces.models import require_face_packages\n"
        "try:\n    require_face_packages()\nexcept Exception as exc:\n    print(type(exc).__name__, exc)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("MetaLoRAError the face features need insightface, onnx, onnxruntime")


def test_meta_train_allows_lr_0_and_checks_init_lomd(kit, tmp_path, capsys, no_model_load):
    base = [
        "meta-train", "--flux", str(kit / "flux.safetensors"), "--data", str(tmp_path),
        "--conditioning", str(kit / "cond.safetensors"), "--vae", str(kit / "vae"),
        "--out", str(tmp_path / "l.safetensors"),
    ]  # fmt: skip
    assert main([*base, "--lr", "0"]) == 2  # a frozen Down is allowed: what stops it is the empty data folder
    assert "--lr" not in _one_line_error(capsys, "no identities with images")
    assert main([*base, "--init-lomd", str(tmp_path / "nope.safetensors")]) == 2
    _one_line_error(capsys, "--init-lomd", "no such file")


# --- the second hour (issue 18) ----------------------------------------------------------------------------


def test_steps_below_the_warmup_cap_it_and_say_so(kit, tmp_path, capsys):
    out = tmp_path / "me.safetensors"
    args = [a for a in _args(kit, out, "--steps", "3") if a != "--quiet"]  # default warm-up: 20 steps
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "warm-up capped at 2 steps (asked 20) so that the last of the 3 steps trains at the set" in err
    assert err.count("warm-up capped") == 1  # said once, before training
    assert load_identity(out).training["steps_done"] == 3


def test_a_file_that_is_no_lomd_says_what_it_holds(kit, tmp_path, capsys):
    from safetensors.torch import save_file

    other = tmp_path / "random.safetensors"
    save_file({"model.layer1.weight": torch.zeros(3, 4), "model.layer1.bias": torch.zeros(3)}, str(other))
    args = _args(kit, tmp_path / "me.safetensors")
    args[args.index("--lomd") + 1] = str(other)
    assert main(args) == 2
    line = _one_line_error(capsys, f"--lomd {other}: this file is not a LoMD: it holds 2 tensor(s)")
    assert "'model.layer1.bias' (3,)" in line and "metalora lomd seeded" in line


def test_a_text_file_given_as_the_photo_names_the_option(kit, tmp_path, capsys):
    text = tmp_path / "notes.txt"
    text.write_text("not a photo")
    args = _args(kit, tmp_path / "me.safetensors")
    args[args.index("--image") + 1] = str(text)
    assert main(args) == 2
    _one_line_error(capsys, f"--image {text}: not a readable image", "JPEG, PNG or WebP")


def test_a_folder_named_like_a_preset_wins_over_the_preset(tmp_path, capsys, monkeypatch):
    """`--model flux` with a folder ./flux beside it reads the folder (a tiny FLUX here), and says so."""
    from metalora_core.dev.tiny_flux import TINY_DIMS, write_tiny_flux
    from metalora_core.formats import load_lomd

    write_tiny_flux(tmp_path / "flux", "diffusers", TINY_DIMS, seed=0)
    monkeypatch.chdir(tmp_path)
    assert main(["lomd", "seeded", "--model", "flux", "--out", "seeded.safetensors"]) == 0
    err = capsys.readouterr().err
    assert "--model flux: reading the checkpoint 'flux' found here, not the FLUX.1 preset" in err
    assert load_lomd(tmp_path / "seeded.safetensors").hidden_size == 128  # the folder's width, not 3072
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert main(["lomd", "seeded", "--model", "flux", "--out", "preset.safetensors"]) == 0
    assert load_lomd(tmp_path / "elsewhere" / "preset.safetensors").hidden_size == 3072


def test_help_lists_the_commands_in_the_order_of_the_work_and_dev_last(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    listing = capsys.readouterr().out
    order = ["demo", "lomd", "encode-caption", "personalize", "export", "score", "inspect", "meta-train"]
    positions = [listing.index(f"\n    {name}") for name in order]
    assert positions == sorted(positions)
    assert listing.index("\n    dev") > max(positions) and "not for use" in listing
    assert "rank-r_d" not in build_parser().format_help()


def test_encode_caption_writes_what_personalize_would_encode(tmp_path, capsys):
    from metalora_core.dev.tiny_pipeline import write_tiny_pipeline
    from metalora_core.training.conditioning import encode_prompt, load_conditioning

    pipeline = write_tiny_pipeline(tmp_path / "pipe")
    out = tmp_path / "cond.safetensors"
    assert (
        main(["encode-caption", "--text-encoders", str(pipeline), "--out", str(out), "--trigger", "sks"]) == 0
    )
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["caption"] == "photo of sks person"
    got, want = load_conditioning(out), encode_prompt(pipeline, "photo of sks person")
    assert torch.equal(got.context, want.context) and torch.equal(got.pooled, want.pooled)
