"""LoRA tools (metalora_core.loras.lowrank / tools) against float64 references: exact sums by factor
concatenation, factored SVD == dense SVD, truncation error == discarded spectrum, extraction recovers a
known rank-r change, every file read back with the project's reader in kohya and diffusers naming."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from metalora_core.dev.tiny_flux import TINY_DIMS, write_tiny_flux
from metalora_core.errors import MetaLoRAError
from metalora_core.formats import save_lora
from metalora_core.loras import iter_layers, scan_lora
from metalora_core.loras.lowrank import choose_rank, compress, factored_svd, truncate, weighted_sum
from metalora_core.loras.tools import difference, extract, merge, rescale, resize
from metalora_core.safeio import read_metadata, save_tensors
from metalora_core.targets import resolve_targets

F64 = torch.float64


def _rand_factors(out_f, in_f, rank, seed, scale=0.1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out_f, rank, generator=g, dtype=F64) * scale, torch.randn(
        rank, in_f, generator=g, dtype=F64
    )


def _lora(path, seed, rank, fmt="kohya", preset="attn_mlp", skip=()):
    layers = {
        t.name: _rand_factors(t.out_features, t.in_features, rank, seed + i)
        for i, t in enumerate(resolve_targets(TINY_DIMS, preset))
        if t.name not in skip
    }
    save_lora(path, layers, fmt, TINY_DIMS, F64)
    return path


def _deltas(path) -> dict[str, torch.Tensor]:
    return {layer.name: layer.delta() for layer in iter_layers(scan_lora(path), F64)}


# --- tensor math -----------------------------------------------------------------------------------------


def test_factored_svd_is_the_dense_svd_without_forming_the_product():
    up, down = _rand_factors(300, 200, 12, 0)
    svd = factored_svd(up, down)
    dense = torch.linalg.svdvals(up @ down)
    assert torch.allclose(svd.s, dense[:12], rtol=1e-12, atol=1e-12)
    assert torch.allclose(svd.left @ torch.diag(svd.s) @ svd.right, up @ down, atol=1e-12)
    assert torch.allclose(svd.left.T @ svd.left, torch.eye(12, dtype=F64), atol=1e-12)


def test_weighted_sum_by_concatenation_is_exact():
    a, b = _rand_factors(40, 30, 4, 1), _rand_factors(40, 30, 6, 2)
    up, down = weighted_sum([(a, 1.5), (b, -1.0)])
    assert up.shape == (40, 10)
    assert torch.allclose(up @ down, 1.5 * a[0] @ a[1] - b[0] @ b[1], atol=1e-13)


def test_truncation_error_is_exactly_the_discarded_singular_values():
    up, down = _rand_factors(64, 48, 10, 3)
    svd = factored_svd(up, down)
    (u, d), cut = truncate(svd, 4)
    actual = torch.linalg.matrix_norm(up @ down - u @ d)
    assert cut.rank == 4 and u.shape == (64, 4) and d.shape == (4, 48)
    assert cut.error == pytest.approx(float(svd.s[4:].square().sum().sqrt()), rel=1e-12)
    assert cut.error == pytest.approx(float(actual), rel=1e-10)
    assert cut.energy_kept == pytest.approx(float(svd.s[:4].square().sum() / svd.s.square().sum()), rel=1e-12)


def test_energy_rank_is_the_smallest_rank_reaching_the_fraction():
    s = torch.tensor([3.0, 2.0, 1.0, 0.5], dtype=F64)  # energies 9, 4, 1, .25 of 14.25
    assert choose_rank(s, energy=9 / 14.25) == 1
    assert choose_rank(s, energy=9 / 14.25 + 1e-6) == 2
    assert choose_rank(s, energy=1.0) == 4
    assert choose_rank(s, energy=0.9, total_energy=100.0) == 4  # partial spectrum: keep all it has
    assert choose_rank(s, rank=10) == 4
    for bad in ({}, {"rank": 2, "energy": 0.5}, {"energy": 0.0}, {"energy": 1.5}, {"rank": 0}):
        with pytest.raises(MetaLoRAError):
            choose_rank(s, **bad)


def test_compress_keeps_an_exactly_low_rank_sum_lossless():
    a = _rand_factors(50, 40, 3, 4)
    (u, d), cut = compress(*weighted_sum([(a, 1.0), (a, 1.0)]), rank=3)  # rank-6 factors, rank-3 product
    assert torch.allclose(u @ d, 2 * a[0] @ a[1], atol=1e-12) and cut.relative_error < 1e-7


# --- file tools ------------------------------------------------------------------------------------------


@pytest.fixture
def two_loras(tmp_path):
    a = _lora(tmp_path / "a.safetensors", 10, 4, "kohya")
    b = _lora(tmp_path / "b.safetensors", 20, 6, "diffusers", skip={"double_blocks.1.img_mlp.0"})
    return a, b


def test_difference_applied_once_equals_b_plus_one_and_a_minus_one(two_loras, tmp_path):
    a, b = two_loras
    out = tmp_path / "diff.safetensors"
    report = difference(a, b, out, dtype=F64)
    da, db, dd = _deltas(a), _deltas(b), _deltas(out)
    assert set(dd) == set(da) | set(db)
    for name, delta in dd.items():
        expected = db.get(name, 0) - da.get(name, 0)
        assert torch.allclose(delta, expected, atol=1e-12), name
    # exact: nothing truncated; ranks add (4 + 6, or 4 + 3 x 6 where B splits qkv into q, k, v pieces)
    assert all(r.rank_out == r.rank_in and r.error == 0.0 for r in report.layers)
    assert {r.rank_out for r in report.layers} == {4, 10, 22, 28}
    meta = json.loads(read_metadata(out)["metalora_lora_tool"])
    assert meta["operation"] == "difference" and [s["weight"] for s in meta["sources"]] == [1.0, -1.0]
    assert [s["file"] for s in meta["sources"]] == ["b.safetensors", "a.safetensors"]


def test_compressed_difference_and_merge_are_the_best_low_rank_approximation(two_loras, tmp_path):
    a, b = two_loras
    out = tmp_path / "merge.safetensors"
    report = merge([a, b], [0.5, 2.0], out, rank=3, fmt="diffusers", dtype=F64)
    assert scan_lora(out).layout == "diffusers"
    da, db, dm = _deltas(a), _deltas(b), _deltas(out)
    for r in report.layers:
        full = 0.5 * da[r.name] + 2.0 * db.get(r.name, 0)
        s = torch.linalg.svdvals(full)
        assert r.rank_out == 3
        assert r.error == pytest.approx(float(s[3:].square().sum().sqrt()), rel=1e-9)
        assert float(torch.linalg.matrix_norm(full - dm[r.name])) == pytest.approx(r.error, rel=1e-8)


def test_resize_reports_per_layer_error_equal_to_the_discarded_spectrum(two_loras, tmp_path):
    _, b = two_loras
    out = tmp_path / "small.safetensors"
    report = resize(b, out, energy=0.8, dtype=F64)
    db, ds = _deltas(b), _deltas(out)
    for r in report.layers:
        s = torch.linalg.svdvals(db[r.name])[: r.rank_in]
        kept = s[: r.rank_out].square().sum() / s.square().sum()
        assert kept >= 0.8 - 1e-12 and (
            r.rank_out == 1 or s[: r.rank_out - 1].square().sum() / s.square().sum() < 0.8
        )
        assert r.energy_kept == pytest.approx(float(kept), rel=1e-10)
        assert float(torch.linalg.matrix_norm(db[r.name] - ds[r.name])) == pytest.approx(
            r.error, rel=1e-8, abs=1e-12
        )


def test_rescale_multiplies_every_change_and_converts_naming(two_loras, tmp_path):
    a, _ = two_loras
    out = tmp_path / "scaled.safetensors"
    rescale(a, out, -0.5, fmt="diffusers", dtype=F64)
    assert scan_lora(a).layout == "kohya" and scan_lora(out).layout == "diffusers"
    da, do = _deltas(a), _deltas(out)
    assert set(da) == set(do)
    for name in da:
        assert torch.allclose(do[name], -0.5 * da[name], atol=1e-13)


def test_loras_of_different_models_are_refused(two_loras, tmp_path):
    a, _ = two_loras
    wide = tmp_path / "wide.safetensors"
    up, down = _rand_factors(256, 256, 2, 0)
    save_lora(wide, {"double_blocks.0.img_attn.proj": (up, down)}, "kohya")
    with pytest.raises(MetaLoRAError, match="different base models"):
        difference(a, wide, tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


# --- extraction ------------------------------------------------------------------------------------------


def test_extraction_recovers_a_known_rank_r_difference(tmp_path):
    base = write_tiny_flux(tmp_path / "base.safetensors", "bfl", TINY_DIMS, seed=0, dtype=F64)
    with safe_open(str(base), "pt") as fh:
        sd = {k: fh.get_tensor(k) for k in fh.keys()}
    changed = {}
    for i, name in enumerate(
        ["double_blocks.0.img_attn.qkv", "single_blocks.1.linear1", "double_blocks.1.txt_mlp.2"]
    ):
        w = sd[f"{name}.weight"]
        up, down = _rand_factors(w.shape[0], w.shape[1], 3, 100 + i, scale=0.05)
        changed[name] = up @ down
        sd[f"{name}.weight"] = w + changed[name]
    tuned = save_tensors(tmp_path / "tuned.safetensors", sd, {})
    out = tmp_path / "extracted.safetensors"
    report = extract(base, tuned, out, rank=3, dtype=F64, chunk_rows=7)  # odd chunks: slices must tile rows
    got = _deltas(out)
    assert set(got) == set(changed)
    for name, delta in changed.items():
        assert torch.allclose(got[name], delta, atol=1e-10), (name, (got[name] - delta).abs().max())
    assert all(r.relative_error < 1e-6 and r.rank_out == 3 for r in report.layers)
    assert len(report.skipped) == len(resolve_targets(TINY_DIMS, "all_linear")) - 3
    # a rank below the true rank: the error report is exactly the discarded part
    report2 = extract(base, tuned, tmp_path / "r2.safetensors", rank=2, dtype=F64)
    got2 = _deltas(tmp_path / "r2.safetensors")
    for r in report2.layers:
        s = torch.linalg.svdvals(changed[r.name])
        assert r.error == pytest.approx(float(s[2:].square().sum().sqrt()), rel=1e-6)
        assert float(torch.linalg.matrix_norm(changed[r.name] - got2[r.name])) == pytest.approx(
            r.error, rel=1e-6
        )


# --- command line ----------------------------------------------------------------------------------------


def test_cli_tools_end_to_end(two_loras, tmp_path, capsys):
    from metalora_core.cli.main import main

    a, b = two_loras
    diff, small, report = tmp_path / "d.safetensors", tmp_path / "s.safetensors", tmp_path / "r.json"
    assert main(["lora", "difference", str(a), str(b), "--out", str(diff), "--format", "diffusers"]) == 0
    assert json.loads(capsys.readouterr().out)["operation"] == "difference"
    assert scan_lora(diff).layout == "diffusers"
    assert (
        main(["lora", "resize", str(diff), "--rank", "2", "--out", str(small), "--report", str(report)]) == 0
    )
    per_layer = json.loads(report.read_text())["per_layer"]
    assert per_layer and all(r["rank_out"] == 2 and r["error"] > 0 for r in per_layer)
    capsys.readouterr()
    assert main(["lora", "resize", str(diff), "--rank", "2", "--out", str(small)]) == 2  # no silent overwrite
    assert "already exists" in capsys.readouterr().err
    assert (
        main(["lora", "merge", str(a), str(b), "--weights", "1", "--out", str(tmp_path / "m.safetensors")])
        == 2
    )
    assert "2 LoRAs but 1 weights" in capsys.readouterr().err
    assert main(["lora", "rescale", str(a), "--factor", "2", "--out", str(tmp_path / "x2.safetensors")]) == 0
    base = write_tiny_flux(tmp_path / "base.safetensors", "bfl", TINY_DIMS, seed=0)
    assert main(["lora", "extract", str(base), str(base), "--out", str(tmp_path / "e.safetensors")]) == 2
    assert "no layer left" in capsys.readouterr().err  # identical checkpoints: nothing to extract
