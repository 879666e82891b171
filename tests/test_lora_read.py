"""metalora_core.loras.read: every key layout, exact float64 deltas, round trips of our exports, bad files."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from metalora_core.dev.synthetic_loras import LAYOUTS, SPLIT_LAYOUTS, write_lora
from metalora_core.dev.tiny_flux import TINY_DIMS
from metalora_core.formats import export_lora, fold_identity, load_identity, load_lomd
from metalora_core.loras import (
    DamagedLoraError,
    ForeignLoraError,
    LoraReadError,
    iter_layers,
    read_lora,
    scan_lora,
    scan_loras,
)
from metalora_core.model_files import read_model_dims
from metalora_core.targets import diffusers_pieces, layer_shape

D = TINY_DIMS
F64 = torch.float64
LAYERS = ["double_blocks.0.img_attn.qkv", "double_blocks.1.txt_mlp.2", "single_blocks.1.linear1"]


def _pairs(name: str, split: bool, g: torch.Generator, rank: int = 3, alpha: float | None = 6.0):
    """Random factor pairs for one layer and the dense float64 delta they mean."""
    out_f, in_f = layer_shape(D, name)
    pieces = diffusers_pieces(name, D) if split else [(name, None)]
    pairs, delta = [], torch.zeros(out_f, in_f, dtype=F64)
    for i, (_, rows) in enumerate(pieces):
        r = rank + i  # a different rank per piece
        n_rows = out_f if rows is None else rows.stop - rows.start
        up = torch.randn(n_rows, r, generator=g, dtype=F64)
        down = torch.randn(r, in_f, generator=g, dtype=F64)
        a = None if alpha is None else alpha + i
        scale = 1.0 if a is None else a / r
        delta[rows if rows is not None else slice(None)] += scale * up @ down
        pairs.append((up, down, a))
    return pairs, delta


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_gives_the_exact_delta(tmp_path, layout):
    g = torch.Generator().manual_seed(0)
    split = layout in SPLIT_LAYOUTS
    no_alpha = layout in ("diffusers", "comfyui-peft")
    layers, want = {}, {}
    for name in LAYERS:
        split_here = split and len(diffusers_pieces(name, D)) > 1
        layers[name], want[name] = _pairs(name, split_here, g, alpha=None if no_alpha else 6.0)
    path = write_lora(tmp_path / f"{layout}.safetensors", layers, layout, D, dtype=F64)
    lora = scan_lora(path, D)
    assert sorted(lora.layer_names) == sorted(LAYERS)  # partial coverage: only these layers
    got = read_lora(path, D, dtype=F64)
    for name in LAYERS:
        assert torch.allclose(got[name].delta(), want[name], rtol=0, atol=1e-12), (layout, name)
        up, down = got[name].factors()
        assert torch.allclose(up @ down, want[name], rtol=0, atol=1e-12)
        assert got[name].energy() == pytest.approx(float(want[name].pow(2).sum()), rel=1e-12)


def test_sizes_are_read_from_the_file_without_a_model(tmp_path):
    g = torch.Generator().manual_seed(1)
    layers = {n: _pairs(n, len(diffusers_pieces(n, D)) > 1, g)[0] for n in LAYERS}
    lora = scan_lora(write_lora(tmp_path / "a.safetensors", layers, "diffusers", D, dtype=F64))
    assert (lora.hidden, lora.mlp_hidden) == (D.hidden, D.mlp_hidden)
    assert lora.rows_of("single_blocks.1.linear1", 3) == slice(3 * D.hidden, 3 * D.hidden + D.mlp_hidden)


@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
def test_round_trip_of_our_own_exports(assets, tmp_path, fmt):
    lomd, adapter = load_lomd(assets["lomd"]), load_identity(assets["adapter"])
    dims, _ = read_model_dims(assets["bfl"])
    path = export_lora(tmp_path / f"{fmt}.safetensors", lomd, adapter, dims, fmt=fmt, dtype=F64)
    folded = fold_identity(lomd, adapter)
    got = read_lora(path, dims, dtype=F64)
    assert set(got) == set(folded)
    for name, (up, down) in folded.items():
        assert torch.allclose(got[name].delta(), up @ down, rtol=0, atol=1e-13), name


def test_text_encoder_and_bias_keys_are_ignored_and_listed(tmp_path):
    g = torch.Generator().manual_seed(2)
    pairs, want = _pairs("double_blocks.0.img_attn.proj", False, g)
    tensors = {
        "lora_unet_double_blocks_0_img_attn_proj.lora_up.weight": pairs[0][0],
        "lora_unet_double_blocks_0_img_attn_proj.lora_down.weight": pairs[0][1],
        "lora_unet_double_blocks_0_img_attn_proj.alpha": torch.tensor(6.0, dtype=F64),
        "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(8, 2, dtype=F64),
        "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(2, 8, dtype=F64),
        "diffusion_model.double_blocks.0.img_attn.proj.diff_b": torch.zeros(128, dtype=F64),
        # FLUX layers outside the blocks: real FLUX LoRAs train them, no LoMD covers them
        "lora_unet_final_layer_linear.lora_up.weight": torch.zeros(64, 2, dtype=F64),
        "lora_unet_final_layer_linear.lora_down.weight": torch.zeros(2, 128, dtype=F64),
        "transformer.x_embedder.lora_A.weight": torch.zeros(2, 64, dtype=F64),
        "transformer.x_embedder.lora_B.weight": torch.zeros(128, 2, dtype=F64),
    }
    save_file(tensors, tmp_path / "te.safetensors")
    lora = scan_lora(tmp_path / "te.safetensors", D)
    assert len(lora.ignored) == 7 and lora.layout == "kohya"
    layer = next(iter_layers(lora, F64))
    assert torch.allclose(layer.delta(), want, rtol=0, atol=1e-12)


def _sdxl(path):
    save_file(
        {
            "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(320, 4),
            "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 320),
        },
        path,
    )
    return path


def _bad(tmp_path, kind):
    g = torch.Generator().manual_seed(3)
    name = "double_blocks.0.img_attn.proj"
    pairs, _ = _pairs(name, False, g)
    up, down, alpha = pairs[0]
    if kind == "sdxl":
        return _sdxl(tmp_path / "sdxl.safetensors"), ForeignLoraError, "SD/SDXL"
    if kind == "width":
        up, down = torch.randn(256, 3, dtype=F64), torch.randn(3, 256, dtype=F64)
        err, text = ForeignLoraError, "width 256"
    elif kind == "nan":
        down = down.clone()
        down[1, 5] = float("nan")
        err, text = DamagedLoraError, "NaN"
    elif kind == "inf_alpha":
        alpha = float("inf")
        err, text = DamagedLoraError, "alpha"
    elif kind == "rank":
        up = up[:, :2]
        err, text = DamagedLoraError, "not a LoRA pair"
    elif kind == "rows":
        up = torch.randn(100, 3, dtype=F64)
        err, text = DamagedLoraError, "needs (128, 128)"
    elif kind == "half":
        path = tmp_path / "half.safetensors"
        save_file({"lora_unet_double_blocks_0_img_attn_proj.lora_up.weight": up}, path)
        return path, DamagedLoraError, "without its pair"
    elif kind == "garbage":
        path = tmp_path / "garbage.safetensors"
        path.write_bytes(b"not a safetensors file at all")
        return path, DamagedLoraError, "not a readable safetensors"
    elif kind == "lokr":
        path = tmp_path / "lokr.safetensors"
        save_file({"lora_unet_double_blocks_0_img_attn_proj.lokr_w1": torch.zeros(2, 2)}, path)
        return path, LoraReadError, "LoKr"
    path = write_lora(tmp_path / f"{kind}.safetensors", {name: [(up, down, alpha)]}, "kohya", D, dtype=F64)
    return path, err, text


BAD = ["sdxl", "width", "nan", "inf_alpha", "rank", "rows", "half", "garbage", "lokr"]


@pytest.mark.parametrize("kind", BAD)
def test_bad_files_are_named_with_the_reason(tmp_path, kind):
    path, err, text = _bad(tmp_path, kind)
    with pytest.raises(err) as info:
        read_lora(path, D, dtype=F64)
    assert text in str(info.value) and str(path) in str(info.value)


def test_a_batch_skips_bad_files_by_name(tmp_path):
    g = torch.Generator().manual_seed(4)
    good = write_lora(
        tmp_path / "good.safetensors", {LAYERS[0]: _pairs(LAYERS[0], False, g)[0]}, "kohya", D, dtype=F64
    )
    sdxl = _sdxl(tmp_path / "sdxl.safetensors")
    ok, skipped = scan_loras([good, sdxl], D)
    assert [f.path for f in ok] == [str(good)]
    assert skipped[0][0] == str(sdxl) and "SD/SDXL" in skipped[0][1]


def test_deeper_model_lora_is_foreign(tmp_path):
    g = torch.Generator().manual_seed(5)
    name = "double_blocks.5.img_attn.proj"  # TINY_DIMS has 2 double blocks
    pairs, _ = _pairs("double_blocks.0.img_attn.proj", False, g)
    path = write_lora(tmp_path / "deep.safetensors", {name: pairs}, "comfyui", D, dtype=F64)
    with pytest.raises(ForeignLoraError, match="double_blocks.5.img_attn.proj"):
        scan_lora(path, D)
