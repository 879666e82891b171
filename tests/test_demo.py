"""`metalora demo`: every stage runs on the embedded default, the report holds what it claims, the printed
personalize command reproduces the identity bit for bit, and the real-weights path takes given files."""

from __future__ import annotations

import json
import shlex

import pytest
import torch

from metalora_core.cli.main import main
from metalora_core.formats import load_identity
from metalora_core.sampling import flux_schedule
from metalora_core.training.objective import flux_mu

SMALL = ["--steps", "8", "--meta-steps", "4", "--images", "2", "--sample-steps", "3", "--quiet"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "run"
    assert main(["demo", "--out", str(out), *SMALL]) == 0
    return out, json.loads((out / "report.json").read_text())


def test_demo_runs_every_stage_and_writes_the_report(demo):
    out, report = demo
    names = [t["name"].split(":")[0] for t in report["timings"]]
    assert names[0] == "models" and names[2] == "LoMD" and names[-1].startswith("exporting")
    assert len(report["timings"]) == 9 and all(t["cpu_s"] >= 0 for t in report["timings"])
    methods = report["methods"]
    assert list(report["lomds"]) == ["meta-trained", "distilled", "seeded"]
    meta, lora = methods["Meta-LoRA (meta-trained LoMD)"], methods["plain LoRA (rank 16)"]
    assert methods["Meta-LoRA (seeded LoMD)"]["first_loss"] == pytest.approx(meta["first_loss"], rel=1e-6)
    assert len(meta["losses"]) == len(lora["losses"]) == 8
    assert meta["first_loss"] == pytest.approx(lora["first_loss"], rel=1e-6)  # paired draws, untouched model
    assert meta["losses"] != lora["losses"]
    assert len(report["images"]["identity"]) == 2 and all(c > 0 for c in report["images"]["pixel_change"])
    assert report["scores"]["total"] == 2 and report["scores"]["model"] == "tiny"
    assert (
        report["export"]["format"] == "kohya" and (out / "identity_meta-trained_lora.safetensors").is_file()
    )
    page = (out / "report.html").read_text()
    for needle in (
        "Mechanics, not quality",
        "<svg",
        "data:image/png;base64,",
        "metalora personalize",
        "CPU s",
    ):
        assert needle in page


def test_the_reported_personalize_command_reproduces_the_identity(demo, tmp_path, capsys):
    out, report = demo
    line = next(c for c in report["commands"] if c.startswith("metalora personalize"))
    args = shlex.split(line.split("   #")[0])[1:]
    again = tmp_path / "again.safetensors"
    args[args.index("--out") + 1] = str(again)
    assert main([*args, "--quiet"]) == 0
    capsys.readouterr()
    assert (
        load_identity(again).fingerprint
        == load_identity(out / "identity_meta-trained.safetensors").fingerprint
    )


def test_the_real_weights_path_takes_given_files(demo, tmp_path, capsys):
    """--flux/--vae/--conditioning/--lomd/--image: no tiny models built, no meta-training, the given LoMD."""
    out, _ = demo
    models = out / "models"
    run = tmp_path / "real"
    args = [
        "demo", "--out", str(run), "--flux", str(models / "tiny_flux.safetensors"), "--vae", str(models / "tiny_vae"),
        "--conditioning", str(models / "prompt.safetensors"), "--lomd", str(out / "lomd_meta_trained.safetensors"),
        "--image", str(out / "images" / "photo.png"), "--resolution", "128", "--no-baseline", *SMALL,
    ]  # fmt: skip
    assert main(args) == 0
    report = json.loads((run / "report.json").read_text())
    assert list(report["lomds"]) == ["given"] and not (run / "models").exists()
    assert list(report["methods"]) == ["Meta-LoRA (given LoMD)"] and "skipped" in report["scores"]
    capsys.readouterr()
    assert main(["demo", "--out", str(tmp_path / "x"), "--flux", str(models / "tiny_flux.safetensors")]) == 2
    assert "--image" in capsys.readouterr().err
    bad = [*args[:2], str(tmp_path / "y"), *args[3:]]
    bad[bad.index("--lomd") + 1] = str(tmp_path / "missing.safetensors")
    assert main(bad) == 2 and "--lomd" in capsys.readouterr().err and not (tmp_path / "y").exists()
    no_lomd = [a for a in args if a not in ("--lomd", str(out / "lomd_meta_trained.safetensors"))]
    no_lomd[no_lomd.index("--out") + 1] = str(tmp_path / "seeded")
    assert main(no_lomd) == 0  # no LoMD given: the seeded one, said to have no prior
    report = json.loads((tmp_path / "seeded" / "report.json").read_text())
    assert list(report["lomds"]) == ["seeded"] and "no prior" in report["lomds"]["seeded"]["source"]


def test_flux_schedule_runs_from_noise_to_image_and_shifts_like_flux():
    times = flux_schedule(4, (64, 64))  # 1024 image tokens: FLUX's mu > 0 pushes towards noise
    assert times[0] == 1.0 and times[-1] == 0.0 and bool((times[1:] < times[:-1]).all())
    assert float(times[2]) > 0.5  # unshifted it would be exactly 0.5
    mid = flux_schedule(2, (64, 64))[1]  # t = 0.5 shifted: exp(mu) / (exp(mu) + 1) = sigmoid(mu)
    assert float(mid) == pytest.approx(float(torch.sigmoid(torch.tensor(flux_mu(1024)))), rel=1e-6)
