"""File formats: round trips, foreign LoMD layouts, fingerprints, atomic saves and every kind of bad input."""

from __future__ import annotations

import os
import re

import pytest
import torch
from safetensors.torch import save_file

from metalora_core.adapter import AdapterShape
from metalora_core.errors import FingerprintMismatch, MetaLoRAError
from metalora_core.formats import (
    LoMD,
    check_lomd_fits,
    check_pair,
    detect_kind,
    export_lora,
    load_identity,
    load_lomd,
    save_identity,
    save_lomd,
)
from metalora_core.model_files import fused_shapes, read_model_dims
from metalora_core.safeio import fingerprint, load_tensors, save_tensors
from metalora_core.targets import diffusers_pieces, kohya_name


def test_lomd_and_identity_round_trip(assets, tmp_path):
    lomd = load_lomd(assets["lomd"])
    again = load_lomd(save_lomd(tmp_path / "l.safetensors", lomd))
    assert again.fingerprint == lomd.fingerprint and again.shape == lomd.shape
    assert again.hidden_size == 128 and again.targets == lomd.targets
    assert all(torch.equal(again.downs[n], lomd.downs[n]) for n in lomd.targets)

    adapter = load_identity(assets["adapter"])
    adapter.training = {"steps": 375, "lr": 1e-3, "image": "me.jpg"}
    back = load_identity(save_identity(tmp_path / "a.safetensors", adapter))
    assert back.fingerprint == adapter.fingerprint and back.lomd_fingerprint == lomd.fingerprint
    assert back.training == adapter.training and back.shape == adapter.shape
    for n in adapter.targets:
        assert torch.equal(back.mids[n], adapter.mids[n]) and torch.equal(back.ups[n], adapter.ups[n])


def test_fingerprint_is_order_independent_and_content_sensitive():
    a = {"x": torch.arange(4.0), "y": torch.ones(2, 2)}
    b = {"y": torch.ones(2, 2), "x": torch.arange(4.0)}
    assert fingerprint(a) == fingerprint(b)
    assert fingerprint(a) != fingerprint({**a, "x": torch.arange(4.0) + 1e-6})
    assert fingerprint(a) != fingerprint({**a, "x": torch.arange(4.0).double()})


@pytest.mark.parametrize("layout", ["kohya", "diffusers", "canonical"])
def test_foreign_lomd_layouts_are_auto_detected(assets, tmp_path, layout):
    lomd = load_lomd(assets["lomd"])
    dims, _ = read_model_dims(assets["bfl"])
    tensors = {}
    for name, down in lomd.downs.items():
        if layout == "kohya":
            tensors[f"{kohya_name(name)}.lora_down.weight"] = down
            tensors[f"{kohya_name(name)}.alpha"] = torch.tensor(8.0)
        elif layout == "diffusers":
            for module, _ in diffusers_pieces(name, dims):
                tensors[f"transformer.{module}.lora_A.weight"] = down.clone()
        else:
            tensors[f"{name}.lora_down.weight"] = down
    path = tmp_path / f"{layout}.safetensors"
    save_file(tensors, str(path))
    read = load_lomd(path)
    assert read.fingerprint == lomd.fingerprint
    assert read.shape.rank_down == 4
    if layout == "kohya":
        assert read.shape.effective_alpha == 8.0


def test_foreign_lomd_errors_name_the_key(assets, tmp_path):
    lomd = load_lomd(assets["lomd"])
    dims, _ = read_model_dims(assets["bfl"])
    tensors = {
        f"transformer.{m}.lora_A.weight": torch.randn(4, 128)
        for m, _ in diffusers_pieces("double_blocks.0.img_attn.qkv", dims)
    }
    save_file(tensors, str(tmp_path / "split.safetensors"))
    with pytest.raises(MetaLoRAError, match="double_blocks.0.img_attn.qkv"):
        load_lomd(tmp_path / "split.safetensors")
    save_file(
        {"some.other.weight": torch.zeros(4, 4), **{k + DOWN: v for k, v in list(lomd.downs.items())[:1]}},
        str(tmp_path / "odd.safetensors"),
    )
    with pytest.raises(MetaLoRAError, match="some.other.weight"):
        load_lomd(tmp_path / "odd.safetensors")


DOWN = ".meta_down.weight"


def test_diffusers_export_in_the_fold_dtype_writes_shared_downs(assets, tmp_path):
    """Split pieces share one Down tensor; saving must not trip safetensors' shared-memory check."""
    lomd, adapter = load_lomd(assets["lomd"]), load_identity(assets["adapter"])
    dims, _ = read_model_dims(assets["bfl"])
    path = export_lora(tmp_path / "d64.safetensors", lomd, adapter, dims, "diffusers", dtype=torch.float64)
    tensors, _ = load_tensors(path)
    q = tensors["transformer.transformer_blocks.0.attn.to_q.lora_A.weight"]
    assert torch.equal(q, tensors["transformer.transformer_blocks.0.attn.to_k.lora_A.weight"])


def test_a_standard_lora_is_not_a_lomd(assets, tmp_path):
    lomd, adapter = load_lomd(assets["lomd"]), load_identity(assets["adapter"])
    dims, _ = read_model_dims(assets["bfl"])
    path = export_lora(tmp_path / "k.safetensors", lomd, adapter, dims, "kohya")
    assert detect_kind(*load_tensors(path)) == "lora"
    with pytest.raises(MetaLoRAError, match="standard LoRA"):
        load_lomd(path)


def test_adapter_where_lomd_expected_and_reverse(assets):
    with pytest.raises(MetaLoRAError, match="identity adapter"):
        load_lomd(assets["adapter"])
    with pytest.raises(MetaLoRAError, match="is a LoMD"):
        load_identity(assets["lomd"])


@pytest.mark.parametrize("content", [b"", b"not a safetensors file at all", b"\x00" * 7])
def test_garbage_files_are_refused_with_the_path(tmp_path, content):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(MetaLoRAError, match="bad.safetensors.*not a readable safetensors"):
        load_lomd(path)


def test_truncated_file_is_refused(assets, tmp_path):
    data = open(assets["lomd"], "rb").read()
    path = tmp_path / "truncated.safetensors"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(MetaLoRAError, match="truncated.safetensors"):
        load_lomd(path)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(MetaLoRAError, match="nowhere.safetensors: no such file"):
        load_lomd(tmp_path / "nowhere.safetensors")


def test_damaged_content_is_caught_by_fingerprint(assets, tmp_path):
    tensors, meta = load_tensors(assets["lomd"])
    key = next(iter(tensors))
    tensors[key] = tensors[key] + 1
    save_tensors(tmp_path / "damaged.safetensors", tensors, meta)
    with pytest.raises(MetaLoRAError, match="damaged"):
        load_lomd(tmp_path / "damaged.safetensors")


def test_lomd_that_does_not_fit_names_layer_and_shapes(assets):
    lomd = load_lomd(assets["lomd"])
    wide = {
        name: (out * 2, inp * 2)
        for name, (out, inp) in fused_shapes(read_model_dims(assets["bfl"])[0]).items()
    }
    with pytest.raises(
        MetaLoRAError, match=r"layer 'double_blocks\.0\.img_attn\.proj' has Down \(4, 128\).*\(256, 256\)"
    ):
        check_lomd_fits(lomd, wide, "flux1-dev.safetensors")


def test_adapter_from_another_lomd_is_refused_unless_forced(assets):
    lomd, adapter = load_lomd(assets["lomd"]), load_identity(assets["adapter"])
    other = LoMD({n: d + 0.1 for n, d in lomd.downs.items()}, lomd.shape, source="other.safetensors")
    with pytest.raises(FingerprintMismatch) as err:
        check_pair(other, adapter)
    assert lomd.fingerprint in str(err.value) and other.fingerprint in str(err.value)
    check_pair(other, adapter, force=True)


def test_identity_with_inconsistent_shapes_is_refused(assets, tmp_path):
    tensors, meta = load_tensors(assets["adapter"])
    key = next(k for k in tensors if k.endswith(".lom.weight"))
    tensors[key] = torch.zeros(3, 4)
    meta.pop("fingerprint")
    save_tensors(tmp_path / "bad_mid.safetensors", tensors, meta)
    with pytest.raises(MetaLoRAError, match=key.removesuffix(".lom.weight")):
        load_identity(tmp_path / "bad_mid.safetensors")


def test_atomic_save_keeps_the_old_file_when_writing_fails(assets, tmp_path, monkeypatch):
    target = tmp_path / "lomd.safetensors"
    lomd = load_lomd(assets["lomd"])
    save_lomd(target, lomd)
    before = target.read_bytes()

    def failing_save(tensors, filename, metadata=None):
        with open(filename, "wb") as fh:
            fh.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr("metalora_core.safeio.save_file", failing_save)
    changed = LoMD({n: d * 2 for n, d in lomd.downs.items()}, AdapterShape(4, 8))
    with pytest.raises(OSError, match="disk full"):
        save_lomd(target, changed)
    assert target.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["lomd.safetensors"], "no temporary file may be left behind"


def test_truncated_flux_checkpoint_is_named_not_a_traceback(assets, tmp_path):
    from metalora_core.model_files import load_diffusers_model

    data = open(assets["bfl"], "rb").read()
    path = tmp_path / "flux_cut.safetensors"
    path.write_bytes(data[: len(data) - 1000])  # header intact, tensor data short
    with pytest.raises(MetaLoRAError, match="flux_cut.safetensors.*not a readable safetensors"):
        load_diffusers_model(path)


def test_identity_from_another_model_size_names_layer_and_shapes(assets):
    """Both paths (ComfyUI patch plan, standalone heads) refuse an Up that does not fit, naming the layer."""
    from metalora_core.formats import check_identity_fits
    from metalora_core.inject import make_heads

    lomd, adapter = load_lomd(assets["lomd"]), load_identity(assets["adapter"])
    dims, _ = read_model_dims(assets["bfl"])
    name = "double_blocks.0.img_attn.qkv"
    adapter.ups[name] = torch.zeros(385, adapter.shape.rank_mid)
    message = rf"layer '{re.escape(name)}' has Up \(385, 8\).*\(384, 128\).*another size"
    with pytest.raises(MetaLoRAError, match=message):
        check_identity_fits(adapter, fused_shapes(dims), "flux1-dev.safetensors")
    with pytest.raises(MetaLoRAError, match=message):
        make_heads(dims, lomd, adapter, force=True)


def test_lomd_and_identity_print_as_one_short_line(assets):
    """ComfyUI's error report shows node inputs with ``str``: a LoMD or identity must never print tensors."""
    lomd, adapter = load_lomd(assets["lomd"]), load_identity(assets["adapter"])
    lomd.metadata["lomd_source"] = adapter.metadata["lomd_source"] = "seeded"
    for obj in (lomd, adapter):
        assert str(obj) == repr(obj) and "\n" not in str(obj) and len(str(obj)) < 300
        assert "tensor(" not in str(obj) and obj.fingerprint in str(obj) and str(obj.source) in str(obj)
    assert str(lomd).startswith(f"LoMD({len(lomd.targets)} layers, rank_down 4, seeded,")
    assert f"rank_mid {adapter.shape.rank_mid}" in str(adapter)
    assert f"for LoMD {lomd.fingerprint} (seeded)" in str(adapter)
