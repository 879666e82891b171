"""The nodes' pure logic, without ComfyUI: entry point import, weight-patch math (float64, against
metalora_core.adapter.delta_weight), bypass output, the model-fit checks, and relative imports only."""

from __future__ import annotations

import ast
import subprocess
import sys

import pytest
import torch

from metalora_core.adapter import delta_weight
from tests.nodes.conftest import REPO


def _factors(seed=0, out=24, inn=16, r_d=4, r_m=8):
    g = torch.Generator().manual_seed(seed)
    down = torch.randn(r_d, inn, generator=g, dtype=torch.float64)
    mid = torch.randn(r_m, r_d, generator=g, dtype=torch.float64)
    up = torch.randn(out, r_m, generator=g, dtype=torch.float64)
    weight = torch.randn(out, inn, generator=g, dtype=torch.float64)
    return weight, down, mid, up


_ENTRY_CHECK = """
import asyncio, importlib.util, inspect, sys
spec = importlib.util.spec_from_file_location("pack_entry", sys.argv[1], submodule_search_locations=[sys.argv[2]])
pack = importlib.util.module_from_spec(spec)
sys.modules["pack_entry"] = pack
spec.loader.exec_module(pack)
assert not {"comfy", "comfy_api", "folder_paths", "torch"} & set(sys.modules), sorted(sys.modules)
assert pack.WEB_DIRECTORY == "./js"
assert inspect.iscoroutinefunction(pack.comfy_entrypoint)
if importlib.util.find_spec("comfy_api") is None:
    try:
        asyncio.run(pack.comfy_entrypoint())
    except ModuleNotFoundError as exc:
        assert "comfy" in str(exc)
    else:
        raise AssertionError("comfy_entrypoint ran without ComfyUI")
print("entry ok")
"""


def test_entry_point_imports_without_comfy(tmp_path):
    """In a fresh interpreter: importing the pack root pulls in neither ComfyUI nor torch (cheap, safe)."""
    out = subprocess.run(
        [sys.executable, "-c", _ENTRY_CHECK, str(REPO / "__init__.py"), str(REPO)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert out.returncode == 0 and "entry ok" in out.stdout, out.stderr
    assert (REPO / "js").is_dir()


@pytest.mark.parametrize("strength", [1.0, -0.7, 2.5])
def test_patch_equals_reference_delta_in_float64(pack_module, strength):
    pm = pack_module("nodes.comfy_model.patch_math")
    weight, down, mid, up = _factors()
    scale = 0.5
    # independent of delta_weight (which the patch math now calls): a plain float64 chain product
    expected = weight + strength * scale * torch.linalg.multi_dot([up, mid, down])
    got = pm.add_identity_delta(weight.clone(), down, mid, up, strength * scale, None, torch.float64)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_patch_is_in_place_applies_function_and_zero_is_a_no_op(pack_module):
    pm = pack_module("nodes.comfy_model.patch_math")
    weight, down, mid, up = _factors(1)
    w = weight.clone()
    out = pm.add_identity_delta(w, down, mid, up, 1.0, lambda t: 2 * t, torch.float64)
    assert out.data_ptr() == w.data_ptr()  # ComfyUI's contract: the weight it passed, updated
    torch.testing.assert_close(out, weight + 2 * delta_weight(down, mid, up, 1.0), rtol=1e-12, atol=1e-12)
    assert torch.equal(pm.add_identity_delta(weight.clone(), down, mid, up, 0.0), weight)


def test_patch_in_low_precision_storage_uses_the_intermediate_dtype(pack_module):
    pm = pack_module("nodes.comfy_model.patch_math")
    weight, down, mid, up = _factors(2)
    bf16 = weight.to(torch.bfloat16)
    got = pm.add_identity_delta(bf16.clone(), down.float(), mid.float(), up.float(), 0.3, None, torch.float32)
    assert got.dtype == torch.bfloat16
    expected = (bf16.double() + delta_weight(down, mid, up, 0.3)).to(torch.bfloat16)
    assert (got.double() - expected.double()).abs().max() <= 2**-6 * expected.abs().max()


def test_patch_shape_mismatch_raises(pack_module):
    pm = pack_module("nodes.comfy_model.patch_math")
    weight, down, mid, up = _factors()
    with pytest.raises(ValueError, match="does not match"):
        pm.add_identity_delta(weight[:, :8].clone(), down, mid, up, 1.0)


def test_bypass_output_equals_dense_delta(pack_module):
    pm = pack_module("nodes.comfy_model.patch_math")
    _, down, mid, up = _factors(3)
    x = torch.randn(5, 16, dtype=torch.float64)
    got = pm.bypass_output(x, down, mid, up, -1.3)
    torch.testing.assert_close(got, x @ delta_weight(down, mid, up, -1.3).T, rtol=1e-12, atol=1e-12)


def test_fit_checks_name_layer_and_shapes(pack_module, assets):
    plan = pack_module("nodes.comfy_model.patch_plan")
    formats = pack_module("metalora_core.formats")
    errors = pack_module("metalora_core.errors")
    lomd, adapter = formats.load_lomd(assets["lomd"]), formats.load_identity(assets["adapter"])
    from safetensors import safe_open

    with safe_open(str(assets["bfl"]), "pt") as fh:
        state = {f"diffusion_model.{k}": tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}
    shapes = plan.target_shapes(state)
    assert shapes["double_blocks.0.img_attn.qkv"] == (384, 128)
    plan.check_fits(lomd, adapter, shapes)  # fits
    patches = plan.patch_tensors(lomd, adapter)
    assert set(patches) == {f"diffusion_model.{n}.weight" for n in adapter.targets}
    assert all(w[3] == adapter.shape.scale for w in patches.values())

    narrow = dict(shapes, **{"double_blocks.0.img_attn.proj": (128, 64)})
    with pytest.raises(
        errors.MetaLoRAError, match=r"double_blocks\.0\.img_attn\.proj.*\(4, 128\).*\(128, 64\)"
    ):
        plan.check_fits(lomd, adapter, narrow)
    short = dict(shapes, **{"single_blocks.1.linear2": (64, shapes["single_blocks.1.linear2"][1])})
    with pytest.raises(errors.MetaLoRAError, match=r"single_blocks\.1\.linear2.*Up \(128, 8\).*\(64, "):
        plan.check_fits(lomd, adapter, short)
    missing = {k: v for k, v in shapes.items() if not k.startswith("single_blocks.0.")}
    with pytest.raises(errors.MetaLoRAError, match="does not exist"):
        plan.check_fits(lomd, adapter, missing)


def _absolute_imports(path):
    tree = ast.parse(path.read_text())
    for n in ast.walk(tree):
        if isinstance(n, ast.ImportFrom) and n.level == 0 and (n.module or "").startswith("metalora_core"):
            yield n.module
        if isinstance(n, ast.Import):
            yield from (a.name for a in n.names if a.name.startswith("metalora_core"))


def test_library_and_nodes_use_relative_imports_only():
    """So the pack works from custom_nodes/ without pip install (and never picks up another copy)."""
    offenders = {
        str(p.relative_to(REPO)): list(_absolute_imports(p))
        for folder in ("metalora_core", "nodes")
        for p in (REPO / folder).rglob("*.py")
    }
    assert not {k: v for k, v in offenders.items() if v}


def test_library_never_imports_comfy():
    for p in (REPO / "metalora_core").rglob("*.py"):
        tree = ast.parse(p.read_text())
        for n in ast.walk(tree):
            if not isinstance(n, (ast.Import, ast.ImportFrom)):
                continue  # (a `global` statement has `names` too, of plain strings)
            names = [n.module or ""] if isinstance(n, ast.ImportFrom) else [a.name for a in n.names]
            assert not any(x.split(".")[0] in ("comfy", "comfy_api", "folder_paths") for x in names), p
