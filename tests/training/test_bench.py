"""bench/train_step.py runs end to end (at a tiny width here), its ratio line is the table's own ratio, and
the variants it times compute what they claim (the dense-delta variant equals the bypass adapter)."""

from __future__ import annotations

import pytest
import torch

from tests.benches import load_bench


@pytest.fixture(scope="module")
def bench():
    return load_bench("train_step", "train_step_bench")


def test_bench_runs_tiny(bench, capsys):
    assert bench.main(["--hidden", "128", "--image-tokens", "16", "--text-tokens", "8", "--iters", "1"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    rows = {}
    for line in lines:
        if line.startswith("| ("):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0][1]] = cells  # variant letter -> name, CPU s, wall s, peak MiB, vs floor
    assert sorted(rows) == ["a", "b", "c", "d"]
    assert rows["a"][4] == "1.000" and all(float(r[1]) > 0 and float(r[2]) > 0 for r in rows.values())
    name, value = lines[-1].rsplit(" ", 1)
    assert name == "ratio meta_over_floor" and value == rows["b"][4]  # b over a, as the table says


def test_proxy_mode_counts_ops_and_host_time(bench, capsys):
    assert (
        bench.main(["--proxy", "--depth", "1", "--depth-single", "1", "--iters", "1", "--warmup", "0"]) == 0
    )
    lines = capsys.readouterr().out.strip().splitlines()
    rows = {}
    for line in lines:
        cells = [c.strip() for c in line.strip("|").split("|")]
        if line.startswith("| (") and len(cells) == 5 and cells[1].isdigit():
            rows[cells[0][1]] = cells  # variant -> name, ops, host s, ops ratio, host ratio
    assert sorted(rows) == ["a", "b", "d"] and rows["a"][3] == "1.000"
    assert int(rows["b"][1]) > int(rows["a"][1])  # heads add ops: the count sees the adapter
    assert lines[-2] == f"ratio ops_meta_over_floor {rows['b'][3]}"
    assert lines[-1] == f"ratio host_meta_over_floor {rows['b'][4]}"


def test_dense_delta_variant_equals_the_bypass_adapter(bench):
    from metalora_core.adapter import BypassLinear, IdentityHead

    g = torch.Generator().manual_seed(0)
    base = torch.nn.Linear(16, 24, dtype=torch.float64)
    head = IdentityHead(torch.randn(4, 16, generator=g, dtype=torch.float64), 24, 8, scale=0.5)
    with torch.no_grad():
        head.up.normal_(generator=g)
    x = torch.randn(3, 16, generator=g, dtype=torch.float64)
    for rows in (None, slice(8, 16)):
        if rows is not None:
            base = torch.nn.Linear(16, 8, dtype=torch.float64)
        dense, bypass = bench.DenseDelta(base, head, rows), BypassLinear(base, head, rows)
        torch.testing.assert_close(dense(x), bypass(x), rtol=1e-12, atol=1e-12)
    assert (bypass(x) - base(x)).abs().max() > 1e-3


def test_qwen_image_family_runs_tiny(bench, capsys):
    args = ["--family", "qwen_image", "--hidden", "128", "--image-tokens", "16", "--text-tokens", "8"]
    assert bench.main([*args, "--iters", "1", "--warmup", "0"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[1].startswith("family qwen_image (Qwen-Image): hidden 128,") and "2 of 60 blocks" in lines[1]
    assert "21 attn_mlp target layers" in lines[1]  # 12 per block, less the last block's 3 dead text layers
    assert any(line.startswith("Qwen-Image (qwen_image), 2 blocks | variant |") for line in lines)
    rows = {}
    for line in lines:
        if line.startswith("| ("):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0][1]] = cells
    assert sorted(rows) == ["a", "b", "c", "d"] and rows["a"][4] == "1.000"
    assert lines[-1] == f"ratio qwen_image_meta_over_floor {rows['b'][4]}"


def test_qwen_image_variants_adapt_every_target(bench):
    """The Meta-LoRA variant wraps every attn_mlp target of the Qwen-Image slice (image and text streams)
    with the trainer's bypass layer and its step trains the heads; peft wraps the same layers."""
    from diffusers import QwenImageTransformer2DModel
    from peft.tuners.tuners_utils import BaseTunerLayer

    from metalora_core.adapter import BypassLinear
    from metalora_core.targets import QwenImageDims, resolve_targets

    dims = QwenImageDims(128, 512, 2, 16, 32, 16)
    v = bench.Variants(dims, 16, 8, "cpu", torch.float32, False, "abd")
    try:
        assert isinstance(v.backend.model, QwenImageTransformer2DModel) and v.lomd.base_arch == "qwen_image"
        targets = {t.name for t in resolve_targets(dims, "attn_mlp")}
        assert {"transformer_blocks.0.attn.add_q_proj", "transformer_blocks.0.txt_mlp.net.2"} <= targets
        assert set(v.slots.by_variant["b"]) == set(v.slots.by_variant["d"]) == targets
        meta = v.slots.by_variant["b"]
        assert all(isinstance(m, BypassLinear) for m in meta.values())
        assert all(isinstance(m, BaseTunerLayer) for m in v.slots.by_variant["d"].values())
        before = {name: m.head.up.detach().clone() for name, m in meta.items()}
        v.run("b")
        assert all(not torch.equal(before[name], m.head.up) for name, m in meta.items())  # every head trained
    finally:
        v.close()
