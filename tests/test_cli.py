"""The ``metalora`` command line: every foundation command end to end, and clean errors for bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from metalora_core.cli.main import main
from metalora_core.formats import load_identity, load_lomd
from metalora_core.safeio import load_tensors

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    """Run the real command in a subprocess, exactly as a user would."""
    return subprocess.run(
        [sys.executable, "-m", "metalora_core", *map(str, args)], cwd=ROOT, capture_output=True, text=True
    )


def test_dev_builders_inspect_and_export_end_to_end(tmp_path, capsys):
    flux, lomd, adapter = (
        tmp_path / "flux.safetensors",
        tmp_path / "lomd.safetensors",
        tmp_path / "id.safetensors",
    )
    assert main(["dev", "tiny-flux", "--format", "bfl", "--out", str(flux)]) == 0
    assert main(["dev", "tiny-flux", "--format", "diffusers", "--out", str(tmp_path / "flux_diffusers")]) == 0
    assert (
        main(
            [
                "dev",
                "random-lomd",
                "--model",
                str(flux),
                "--out",
                str(lomd),
                "--rank-mid",
                "8",
                "--targets",
                "attn",
            ]
        )
        == 0
    )
    assert (
        main(["dev", "random-adapter", "--lomd", str(lomd), "--model", str(flux), "--out", str(adapter)]) == 0
    )
    capsys.readouterr()

    summaries = {}
    for name, path in [
        ("flux", flux),
        ("diffusers", tmp_path / "flux_diffusers"),
        ("lomd", lomd),
        ("identity", adapter),
    ]:
        assert main(["inspect", str(path)]) == 0
        summaries[name] = json.loads(capsys.readouterr().out)
    assert summaries["flux"]["kind"] == "flux" and summaries["flux"]["layout"] == "bfl"
    assert summaries["flux"]["hidden_size"] == 128 and summaries["flux"]["double_blocks"] == 2
    assert summaries["diffusers"]["layout"] == "diffusers"
    assert (
        summaries["lomd"]["kind"] == "lomd"
        and summaries["lomd"]["rank_down"] == 4
        and summaries["lomd"]["rank_mid"] == 8
    )
    assert summaries["lomd"]["targets"] == 12  # attn preset: 2 doubles x 4 + 2 singles x 2
    assert summaries["lomd"]["fingerprint"] == load_lomd(lomd).fingerprint
    assert summaries["identity"]["kind"] == "identity"
    assert summaries["identity"]["lomd_fingerprint"] == summaries["lomd"]["fingerprint"]
    assert summaries["identity"]["bytes"] == adapter.stat().st_size

    for fmt in ("kohya", "diffusers"):
        out = tmp_path / f"lora_{fmt}.safetensors"
        assert (
            main(
                ["export", "--lomd", str(lomd), "--adapter", str(adapter), "--format", fmt, "--out", str(out)]
            )
            == 0
        )
        capsys.readouterr()
        assert main(["inspect", str(out)]) == 0
        summary = json.loads(capsys.readouterr().out)
        assert summary["kind"] == "lora" and summary["ranks"] == [4] and summary["format"] == f"lora.{fmt}"
    tensors, _ = load_tensors(tmp_path / "lora_kohya.safetensors")
    assert (
        len(tensors) == 3 * 12
        and torch.count_nonzero(tensors["lora_unet_single_blocks_1_linear2.lora_up.weight"]) > 0
    )
    assert load_identity(adapter).targets


@pytest.mark.parametrize(
    "case, expected",
    [
        ("garbage_lomd", "not a readable safetensors file"),
        ("adapter_as_lomd", "this is an identity adapter"),
        ("other_lomd", "was trained against LoMD"),
        ("missing", "no such file"),
    ],
)
def test_bad_input_gives_one_clear_line_and_nonzero_exit(assets, tmp_path, case, expected):
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_text("hello")
    other = tmp_path / "other_lomd.safetensors"
    assert (
        main(["dev", "random-lomd", "--model", str(assets["bfl"]), "--out", str(other), "--seed", "9"]) == 0
    )
    lomd_arg = {
        "garbage_lomd": garbage,
        "adapter_as_lomd": assets["adapter"],
        "other_lomd": other,
        "missing": tmp_path / "missing.safetensors",
    }[case]
    result = run_cli(
        "export", "--lomd", lomd_arg, "--adapter", assets["adapter"], "--out", tmp_path / "x.safetensors"
    )
    assert result.returncode == 2
    assert expected in result.stderr
    assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1
    assert not (tmp_path / "x.safetensors").exists()


def test_force_exports_against_another_lomd(assets, tmp_path):
    other = tmp_path / "other.safetensors"
    assert (
        main(
            [
                "dev",
                "random-lomd",
                "--model",
                str(assets["bfl"]),
                "--out",
                str(other),
                "--seed",
                "9",
                "--rank-mid",
                "8",
            ]
        )
        == 0
    )
    out = tmp_path / "forced.safetensors"
    assert (
        main(
            [
                "export",
                "--lomd",
                str(other),
                "--adapter",
                str(assets["adapter"]),
                "--out",
                str(out),
                "--force",
            ]
        )
        == 0
    )
    assert out.exists()


def test_inspect_refuses_garbage_cleanly(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x01\x02")
    result = run_cli("inspect", bad)
    assert result.returncode == 2 and "bad.safetensors" in result.stderr and "Traceback" not in result.stderr


def test_version_and_help():
    result = run_cli("--help")
    assert result.returncode == 0
    for command in ("inspect", "export", "dev"):
        assert command in result.stdout
