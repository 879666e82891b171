"""End to end through the CLI on tiny models: synthetic identities -> meta-train (with the hold-out check
and saved heads) -> personalize one photo against the new LoMD -> apply it to the diffusers FLUX."""

from __future__ import annotations

import json

import torch

from metalora_core.cli.main import main
from metalora_core.formats import load_identity, load_lomd
from metalora_core.inject import attached
from metalora_core.training.conditioning import load_conditioning
from metalora_core.training.diffusers_backend import DiffusersBackend


def test_meta_train_then_personalize_then_apply(meta_assets, tmp_path, capsys):
    data = tmp_path / "ids"
    assert (
        main(["dev", "synthetic-identities", "--out", str(data), "--identities", "4", "--images", "3"]) == 0
    )
    common = ["--flux", str(meta_assets["flux"]), "--vae", str(meta_assets["vae"])]
    common += ["--conditioning", str(meta_assets["cond"])]
    lomd_path = tmp_path / "lomd.safetensors"
    capsys.readouterr()
    code = main(
        ["meta-train", *common, "--data", str(data), "--out", str(lomd_path), "--resolution", "128"]
        + ["--max-aspect-error", "0.5", "--identities-per-batch", "2", "--steps", "4", "--lr", "3e-3"]
        + [
            "--warmup",
            "1",
            "--rank-mid",
            "4",
            "--holdout",
            "1",
            "--holdout-every",
            "2",
            "--holdout-steps",
            "2",
        ]
        + ["--save-heads", str(tmp_path / "heads"), "--quiet"]
    )
    out = capsys.readouterr().out.strip().splitlines()
    assert code == 0, out
    summary = json.loads(out[-1])
    assert summary["steps"] == 4 and summary["identities"] == 3 and summary["processes"] == 1
    rows = [json.loads(line) for line in (tmp_path / "lomd.holdout.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4]
    assert all(r["metalora_loss"] > 0 and r["lora_loss"] > 0 for r in rows)
    lomd = load_lomd(lomd_path)
    assert lomd.fingerprint == summary["fingerprint"] and lomd.shape.rank_down == 4
    head = load_identity(tmp_path / "heads" / "id_000.safetensors")
    assert head.lomd_fingerprint == lomd.fingerprint and any(u.abs().sum() > 0 for u in head.ups.values())
    assert lomd.origin == "meta-trained" and head.lomd_origin == "meta-trained"
    assert (tmp_path / "lomd.cache").is_dir()  # latents cached beside the output by default

    identity = tmp_path / "me.safetensors"
    photo = data / "id_003" / "img_00.png"
    code = main(
        ["personalize", *common, "--lomd", str(lomd_path), "--image", str(photo), "--out", str(identity)]
        + ["--steps", "3", "--views", "2", "--resolution", "128", "--quiet"]
    )
    assert code == 0
    adapter = load_identity(identity)
    assert adapter.lomd_fingerprint == lomd.fingerprint

    backend = DiffusersBackend.from_path(meta_assets["flux"])
    cond = load_conditioning(meta_assets["cond"])
    x = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.5])
    with torch.no_grad():
        plain = backend.velocity(x, t, cond, 1.0)
        with attached(backend.model, backend.dims, lomd, adapter):
            styled = backend.velocity(x, t, cond, 1.0)
        again = backend.velocity(x, t, cond, 1.0)
    assert (styled - plain).abs().max() > 1e-6
    assert torch.equal(plain, again)  # detached again: the model is as before


def test_meta_train_user_errors_exit_2(meta_assets, tmp_path, capsys):
    code = main(["meta-train", "--flux", str(meta_assets["flux"]), "--data", str(tmp_path / "none")]
                + ["--out", str(tmp_path / "x.safetensors"), "--vae", str(meta_assets["vae"])])  # fmt: skip
    assert code == 2 and "no such dataset" in capsys.readouterr().err
