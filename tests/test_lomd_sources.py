"""Seeded and distilled LoMDs: exact subspace recovery, weighting, skipped files, provenance everywhere."""

from __future__ import annotations

import json

import pytest
import torch

from metalora_core.adapter import AdapterShape
from metalora_core.dev.synthetic_loras import SPLIT_LAYOUTS, write_lora
from metalora_core.dev.tiny_flux import TINY_DIMS
from metalora_core.formats import (
    PROVENANCE_KEY,
    SOURCE_KEY,
    load_identity,
    load_lomd,
    save_identity,
    save_lomd,
)
from metalora_core.inject import heads_to_adapter, make_heads
from metalora_core.lomd.distill import DistillCancelled, DistillConfig, distill_lomd
from metalora_core.lomd.seeded import seeded_down, seeded_lomd
from metalora_core.targets import diffusers_pieces, resolve_targets

D = TINY_DIMS
F64 = torch.float64
R = 4


def _orthonormal(n: int, k: int, g: torch.Generator) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(n, k, generator=g, dtype=F64))[0].T


def _shared_lora(path, layout, basis, g, layers, rank=3, gain=1.0):
    """A LoRA whose every piece reads only the layer's shared input subspace ``basis[name]`` (R x in)."""
    pairs = {}
    for name in layers:
        out_f = next(t.out_features for t in resolve_targets(D, [name]))
        split = layout in SPLIT_LAYOUTS and len(diffusers_pieces(name, D)) > 1
        pieces = diffusers_pieces(name, D) if split else [(name, None)]
        pairs[name] = []
        for _, rows in pieces:
            n_rows = out_f if rows is None else rows.stop - rows.start
            mix = torch.randn(rank, R, generator=g, dtype=F64)
            up = gain * torch.randn(n_rows, rank, generator=g, dtype=F64)
            alpha = None if layout == "diffusers" else 2.0 * rank
            pairs[name].append((up, mix @ basis[name], alpha))
    return write_lora(path, pairs, layout, D, dtype=F64)


def _angles_cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosines of the principal angles between the row spaces of two orthonormal-row matrices."""
    return torch.linalg.svdvals(a.to(F64) @ b.to(F64).T)


@pytest.fixture
def shared(tmp_path):
    g = torch.Generator().manual_seed(0)
    targets = resolve_targets(D, "attn_mlp")
    basis = {t.name: _orthonormal(t.in_features, R, g) for t in targets}
    covered = [t.name for t in targets if t.name != "double_blocks.1.txt_mlp.2"]
    layouts = ["kohya", "diffusers", "comfyui", "kohya-diffusers", "diffusers-old", "comfyui-peft"]
    paths = []
    for i, layout in enumerate(layouts):
        some = covered if i % 2 == 0 else covered[::2]  # partial coverage for half of them
        paths.append(_shared_lora(tmp_path / f"l{i}_{layout}.safetensors", layout, basis, g, some))
    return basis, paths, covered


def test_distill_recovers_a_shared_subspace_exactly(shared, tmp_path):
    basis, paths, covered = shared
    nan_path = tmp_path / "zz_nan.safetensors"
    tensors = torch.randn(3, 128, dtype=F64)
    tensors[0, 0] = float("nan")
    write_lora(nan_path, {covered[0]: [(torch.randn(384, 3, dtype=F64), tensors, 3.0)]}, "kohya", D, F64)
    wide = tmp_path / "zz_wide.safetensors"
    write_lora(
        wide,
        {covered[0]: [(torch.randn(768, 2, dtype=F64), torch.randn(2, 256, dtype=F64), 2.0)]},
        "kohya",
        D,
    )
    config = DistillConfig(rank_down=R, rank_mid=8, dtype=F64)
    report = distill_lomd([*paths, nan_path, wide], D, config)
    for name in covered:
        cos = _angles_cos(report.lomd.downs[name], basis[name])
        assert torch.allclose(cos, torch.ones(R, dtype=F64), atol=1e-10), name
        assert report.energy[name].worst == pytest.approx(1.0, abs=1e-10)
    assert report.uncovered == ["double_blocks.1.txt_mlp.2"]
    assert torch.equal(
        report.lomd.downs["double_blocks.1.txt_mlp.2"].float(),
        seeded_down("double_blocks.1.txt_mlp.2", 512, R, 0),
    )
    skipped = dict(report.skipped)
    assert "NaN" in skipped[str(nan_path)] and "width 256" in skipped[str(wide)]
    assert len(report.used) == len(paths)
    meta = report.lomd.metadata
    assert meta[SOURCE_KEY] == "distilled"
    prov = json.loads(meta[PROVENANCE_KEY])
    assert prov["loras_used"] == len(paths) and len(prov["lora_hashes"]) == len(paths)
    assert prov["energy_kept_mean"] == pytest.approx(1.0, abs=1e-10)


def test_a_file_damaged_in_its_last_layer_contributes_nothing(shared, tmp_path):
    basis, paths, covered = shared
    g = torch.Generator().manual_seed(9)
    other = {n: _orthonormal(b.shape[1], R, g) for n, b in basis.items()}
    bad = _shared_lora(tmp_path / "bad.safetensors", "comfyui", other, g, covered)
    from safetensors.torch import load_file, save_file

    t = load_file(bad)
    last = sorted(k for k in t if k.endswith("lora_down.weight"))[-1]
    t[last][0, 0] = float("inf")
    save_file(t, bad)
    config = DistillConfig(rank_down=R, dtype=F64)
    with_bad = distill_lomd([*paths[:2], bad], D, config)
    without = distill_lomd(paths[:2], D, config)
    assert [p for p, _ in with_bad.skipped] == [str(bad)]
    for name in covered:
        assert torch.equal(with_bad.lomd.downs[name], without.lomd.downs[name])


def _rank1(path, direction, gain, g, layout="kohya", name="double_blocks.0.img_attn.proj"):
    up = gain * torch.randn(128, 1, generator=g, dtype=F64)
    return write_lora(path, {name: [(up, direction[None, :], 1.0)]}, layout, D, F64)


def test_energy_weighting_stops_one_loud_lora_from_deciding(tmp_path):
    g = torch.Generator().manual_seed(1)
    a, b = _orthonormal(128, 2, g)
    paths = [_rank1(tmp_path / "loud.safetensors", a, 1000.0, g)]
    paths += [_rank1(tmp_path / f"q{i}.safetensors", b, 1.0, g) for i in range(3)]
    name = "double_blocks.0.img_attn.proj"
    fair = distill_lomd(paths, D, DistillConfig(rank_down=1, preset=[name], dtype=F64))
    loud = distill_lomd(paths, D, DistillConfig(rank_down=1, preset=[name], weighting="none", dtype=F64))
    assert float(_angles_cos(fair.lomd.downs[name], b[None])[0]) == pytest.approx(1.0, abs=1e-10)
    assert float(_angles_cos(loud.lomd.downs[name], a[None])[0]) == pytest.approx(1.0, abs=1e-10)
    assert fair.energy[name].worst == pytest.approx(0.0, abs=1e-10)  # the loud one: nothing kept
    assert fair.energy[name].worst_lora == "loud.safetensors"


def test_sketch_equals_the_dense_eigenproblem_and_tracks_it_when_truncated(tmp_path):
    """Generic LoRAs (no shared subspace): the factored, streamed result equals eigh of the dense sum."""
    g = torch.Generator().manual_seed(2)
    name = "double_blocks.0.img_attn.qkv"
    dense = torch.zeros(128, 128, dtype=F64)
    paths = []
    for i in range(5):
        up, down = torch.randn(384, 3, generator=g, dtype=F64), torch.randn(3, 128, generator=g, dtype=F64)
        down[0] *= 6.0  # a dominant direction per LoRA, so the top-4 subspace is well separated
        dw = 2.0 * up @ down
        dense += dw.T @ dw / float(dw.pow(2).sum())
        paths.append(write_lora(tmp_path / f"g{i}.safetensors", {name: [(up, down, 6.0)]}, "kohya", D, F64))
    want = torch.linalg.eigh(dense)[1][:, -R:].T
    exact = distill_lomd(paths, D, DistillConfig(rank_down=R, preset=[name], sketch_rank=15, dtype=F64))
    cos = _angles_cos(exact.lomd.downs[name], want)
    assert torch.allclose(cos, torch.ones(R, dtype=F64), atol=1e-10)
    small = distill_lomd(paths, D, DistillConfig(rank_down=R, preset=[name], sketch_rank=8, dtype=F64))
    assert float(_angles_cos(small.lomd.downs[name], want).min()) > 0.9  # truncated: close, not exact


def test_distill_honours_cancel_and_reports_progress(shared):
    _, paths, _ = shared
    seen = []
    calls = iter(range(10**6))
    with pytest.raises(DistillCancelled):
        distill_lomd(paths, D, DistillConfig(), lambda *a: seen.append(a), lambda: next(calls) > 20)
    distill_lomd(paths, D, DistillConfig(), lambda d, t, m: seen.append((d, t)))
    assert seen[-1] == (2 * len(paths), 2 * len(paths))


def test_nothing_usable_is_one_clear_error(tmp_path):
    from metalora_core.errors import MetaLoRAError

    bad = tmp_path / "x.safetensors"
    bad.write_bytes(b"junk")
    with pytest.raises(MetaLoRAError, match="no usable LoRA.*x.safetensors"):
        distill_lomd([bad], D)


# --- seeded ----------------------------------------------------------------------------------------------


def test_seeded_lomd_is_orthonormal_deterministic_and_labelled(tmp_path):
    lomd = seeded_lomd(D, AdapterShape(4, 8), "attn_mlp", seed=3)
    for down in lomd.downs.values():
        assert torch.allclose(down.double() @ down.double().T, torch.eye(4, dtype=F64), atol=1e-6)
    again = seeded_lomd(D, AdapterShape(4, 8), "attn_mlp", seed=3)
    assert lomd.fingerprint == again.fingerprint
    assert seeded_lomd(D, AdapterShape(4, 8), "attn_mlp", seed=4).fingerprint != lomd.fingerprint
    same_width = lomd.downs["double_blocks.0.img_attn.qkv"], lomd.downs["double_blocks.0.img_attn.proj"]
    assert not torch.equal(*same_width)  # every layer has its own draw, not one per width
    attn = seeded_lomd(D, AdapterShape(4, 8), "attn", seed=3)
    assert all(torch.equal(attn.downs[n], lomd.downs[n]) for n in attn.targets)  # per-layer seeding
    back = load_lomd(save_lomd(tmp_path / "s.safetensors", lomd))
    assert back.origin == "seeded" and back.metadata[SOURCE_KEY] == "seeded"
    assert json.loads(back.metadata[PROVENANCE_KEY])["seed"] == 3


def test_identities_record_their_lomd_source(tmp_path):
    lomd = load_lomd(save_lomd(tmp_path / "s.safetensors", seeded_lomd(D, AdapterShape(4, 8), "attn")))
    heads = make_heads(D, lomd)
    adapter = heads_to_adapter(heads, lomd, D, {"steps": 1})
    assert adapter.lomd_origin == "seeded"
    back = load_identity(save_identity(tmp_path / "id.safetensors", adapter))
    assert back.lomd_origin == "seeded" and back.metadata[SOURCE_KEY] == "seeded"
