"""``metalora lomd seeded`` / ``metalora lomd distill`` from the command line, read back by ``inspect``."""

from __future__ import annotations

import json

import torch

from metalora_core.cli.main import main
from metalora_core.dev.synthetic_loras import write_lora
from metalora_core.dev.tiny_flux import TINY_DIMS
from metalora_core.formats import load_lomd
from metalora_core.lomd.seeded import FLUX1_DIMS
from metalora_core.targets import resolve_targets


def _inspect(path, capsys) -> dict:
    capsys.readouterr()
    assert main(["inspect", str(path)]) == 0
    return json.loads(capsys.readouterr().out)


def test_seeded_for_flux_by_name_needs_no_file(tmp_path, capsys):
    out = tmp_path / "seeded.safetensors"
    assert main(["lomd", "seeded", "--model", "FLUX", "--out", str(out), "--targets", "attn"]) == 0
    lomd = load_lomd(out)
    assert len(lomd.targets) == len(resolve_targets(FLUX1_DIMS, "attn")) and lomd.hidden_size == 3072
    assert lomd.downs["single_blocks.37.linear2"].shape == (4, 15360)
    info = _inspect(out, capsys)
    assert info["lomd_source"] == "seeded" and "NO prior" in info["lomd_note"]


def test_distill_a_folder_skipping_a_foreign_file(assets, tmp_path, capsys):
    folder = tmp_path / "loras"
    g = torch.Generator().manual_seed(0)
    for i in range(3):
        layers = {
            t.name: [
                (torch.randn(t.out_features, 2, generator=g), torch.randn(2, t.in_features, generator=g), 2.0)
            ]
            for t in resolve_targets(TINY_DIMS, "attn")
        }
        write_lora(folder / "people" / f"p{i}.safetensors", layers, "kohya", TINY_DIMS)
    from safetensors.torch import save_file

    save_file(
        {"lora_unet_input_blocks_1_proj_in.lora_up.weight": torch.zeros(320, 4),
         "lora_unet_input_blocks_1_proj_in.lora_down.weight": torch.zeros(4, 320)},
        folder / "sdxl_style.safetensors",
    )  # fmt: skip
    out = tmp_path / "distilled.safetensors"
    argv = ["lomd", "distill", "--loras", str(folder), "--out", str(out), "--model", str(assets["bfl"])]
    assert main([*argv, "--quiet"]) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    assert summary["loras_used"] == 3 and "sdxl_style.safetensors" in captured.err
    assert "SD/SDXL" in summary["loras_skipped"][0]["reason"]
    info = _inspect(out, capsys)
    assert info["lomd_source"] == "distilled" and info["provenance"]["loras_used"] == 3
    assert len(info["provenance"]["lora_hashes"]) == 3
    # mlp layers of attn_mlp: no LoRA covers them, they are seeded and listed
    assert any("img_mlp" in n for n in info["provenance"]["layers_seeded"])


def test_distill_with_nothing_usable_exits_2(tmp_path, capsys):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"nope")
    assert (
        main(["lomd", "distill", "--loras", str(bad), "--out", str(tmp_path / "x.safetensors"), "--quiet"])
        == 2
    )
    assert "no usable LoRA" in capsys.readouterr().err
    assert not (tmp_path / "x.safetensors").exists()


def test_inspect_shows_the_lomd_source_of_an_identity(assets, tmp_path, capsys):
    from metalora_core.adapter import AdapterShape
    from metalora_core.dev.tiny_flux import TINY_DIMS as D
    from metalora_core.formats import save_identity
    from metalora_core.inject import heads_to_adapter, make_heads
    from metalora_core.lomd.seeded import seeded_lomd

    lomd = seeded_lomd(D, AdapterShape(4, 8), "attn")
    adapter = heads_to_adapter(make_heads(D, lomd), lomd, D)
    info = _inspect(save_identity(tmp_path / "id.safetensors", adapter), capsys)
    assert info["kind"] == "identity" and info["lomd_source"] == "seeded" and "NO prior" in info["lomd_note"]
