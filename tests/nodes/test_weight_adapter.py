"""The ComfyUI-side math without ComfyUI: the Meta-LoRA weight adapter (patch and bypass paths) and the
out-of-place modulation of the training blocks, each against a float64 reference.

``nodes/comfy_model/weight_adapter.py`` needs only two things from ComfyUI: ``WeightAdapterBase`` (a base class with a
``multiplier``) and ``model_management.cast_to_device``. Where ComfyUI is not importable, a stand-in with
exactly that interface is put in ``sys.modules`` for the import and removed afterwards; with ComfyUI on the
path the real modules are used. tests/comfyui runs the same adapter inside a real ComfyUI.
"""

from __future__ import annotations

import importlib.util
import sys
import types

import pytest
import torch

from tests.nodes.conftest import PACK


def _stand_in_comfy() -> dict[str, types.ModuleType]:
    comfy = types.ModuleType("comfy")
    comfy.__path__ = []
    mm = types.ModuleType("comfy.model_management")

    def cast_to_device(tensor, device, dtype, copy=False):
        return tensor.to(device=device, dtype=dtype, copy=copy)

    mm.cast_to_device = cast_to_device
    wa = types.ModuleType("comfy.weight_adapter")

    class WeightAdapterBase:  # ComfyUI's attributes that the bypass system sets
        multiplier: float = 1.0
        shape: tuple | None = None

    wa.WeightAdapterBase = WeightAdapterBase
    comfy.model_management, comfy.weight_adapter = mm, wa
    return {"comfy": comfy, "comfy.model_management": mm, "comfy.weight_adapter": wa}


@pytest.fixture
def adapter_cls(pack, monkeypatch):
    name = f"{PACK}.nodes.comfy_model.weight_adapter"
    stand_in = importlib.util.find_spec("comfy") is None
    if stand_in:
        for key, module in _stand_in_comfy().items():
            monkeypatch.setitem(sys.modules, key, module)
        sys.modules.pop(name, None)
    module = importlib.import_module(name)
    yield module.MetaLoRAWeightAdapter
    if stand_in:  # never leave a module bound to the stand-in behind
        sys.modules.pop(name, None)


def _factors(seed=0, out=24, inn=16, r_d=4, r_m=8):
    g = torch.Generator().manual_seed(seed)
    down = torch.randn(r_d, inn, generator=g)
    mid = torch.randn(r_m, r_d, generator=g)
    up = torch.randn(out, r_m, generator=g)
    weight = torch.randn(out, inn, generator=g, dtype=torch.float64)
    return weight, down, mid, up


def _delta(down, mid, up):
    return torch.linalg.multi_dot([up.double(), mid.double(), down.double()])


@pytest.mark.parametrize("strength, strength_model", [(0.8, 1.0), (-1.5, 0.5)])
def test_calculate_weight_adds_strength_times_scale_times_the_product(adapter_cls, strength, strength_model):
    """ComfyUI's ``calculate_weight`` has already multiplied the base by ``strength_model``; the adapter
    adds ``strength * scale * Up @ Mid @ Down`` in the intermediate dtype, in place."""
    weight, down, mid, up = _factors()
    adapter = adapter_cls({"k"}, (down, mid, up, 0.25))
    w = weight.clone()
    out = adapter.calculate_weight(w, "k", strength, strength_model, None, lambda a: a, torch.float64)
    assert out.data_ptr() == w.data_ptr()
    expected = weight + strength * 0.25 * _delta(down, mid, up)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    rebuilt = type(adapter)(adapter.loaded_keys, adapter.weights)  # ComfyUI rebuilds on prefetch
    again = rebuilt.calculate_weight(
        weight.clone(), "k", strength, strength_model, None, lambda a: a, torch.float64
    )
    torch.testing.assert_close(again, expected, rtol=1e-12, atol=1e-12)


def test_calculate_weight_applies_the_patch_function_and_skips_zero_strength(adapter_cls):
    weight, down, mid, up = _factors(1)
    adapter = adapter_cls({"k"}, (down, mid, up, 2.0))
    got = adapter.calculate_weight(weight.clone(), "k", 1.0, 1.0, None, lambda a: -3 * a, torch.float64)
    torch.testing.assert_close(got, weight - 6.0 * _delta(down, mid, up), rtol=1e-12, atol=1e-12)
    assert torch.equal(adapter.calculate_weight(weight.clone(), "k", 0.0, 1.0, None, None), weight)


def test_bypass_h_is_multiplier_times_scale_times_the_low_rank_path(adapter_cls):
    _, down, mid, up = _factors(2)
    adapter = adapter_cls({"k"}, (down, mid, up, 0.5))
    adapter.multiplier = 0.6
    x = torch.randn(3, 5, 16, dtype=torch.float64)
    base_out = torch.zeros(3, 5, 24, dtype=torch.bfloat16)
    got = adapter.h(x, base_out)
    assert got.dtype == torch.bfloat16
    expected = 0.6 * 0.5 * x @ _delta(down, mid, up).T
    assert float((got.double() - expected).abs().max()) <= 2**-7 * float(expected.abs().max())
    full = adapter.h(x, base_out.double())
    torch.testing.assert_close(full, expected, rtol=1e-6, atol=1e-6)  # float32 factors, float64 input


def test_adapter_is_never_loaded_from_lora_files(adapter_cls):
    assert adapter_cls.name == "metalora"
    assert adapter_cls.load("x", {}, 1.0, None) is None


# --- the out-of-place modulation of nodes/comfy_training/blocks.py ---------------------------------------


def _comfy_apply_mod(tensor, m_mult, m_add=None, modulation_dims=None):
    """ComfyUI's ``apply_mod`` (comfy/ldm/flux/layers.py), in place, as the reference."""
    if modulation_dims is None:
        return torch.addcmul(m_add, tensor, m_mult) if m_add is not None else tensor * m_mult
    for d in modulation_dims:
        tensor[:, d[0] : d[1]] *= m_mult[:, d[2] : d[2] + 1]
        if m_add is not None:
            tensor[:, d[0] : d[1]] += m_add[:, d[2] : d[2] + 1]
    return tensor


@pytest.fixture(scope="module")
def blocks(pack_module):
    return pack_module("nodes.comfy_training.blocks")


@pytest.mark.parametrize("dims", [None, [(0, 3, 0), (3, 7, 1)], [(5, 9, 1), (1, 3, 0)]])
@pytest.mark.parametrize("with_add", [True, False])
def test_apply_mod_equals_comfyuis_and_never_writes_its_input(blocks, dims, with_add):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 9, 6, generator=g, dtype=torch.float64)
    shape = (2, 1, 6) if dims is None else (2, 2, 6)  # per-sample, or one row per modulation index
    mult = torch.randn(shape, generator=g, dtype=torch.float64)
    add = torch.randn(shape, generator=g, dtype=torch.float64) if with_add else None
    before = x.clone()
    got = blocks.apply_mod(x, mult, add, dims)
    assert torch.equal(x, before)
    torch.testing.assert_close(got, _comfy_apply_mod(x.clone(), mult, add, dims), rtol=0, atol=1e-15)


def test_linear_with_head_is_the_layer_plus_the_head(blocks):
    layer = torch.nn.Linear(16, 24, dtype=torch.float64)
    _, down, mid, up = _factors(4)
    head = lambda x: 0.5 * x @ _delta(down, mid, up).T  # noqa: E731  (no add_into: the plain sum path)
    x = torch.randn(2, 3, 16, dtype=torch.float64)
    torch.testing.assert_close(blocks._linear(layer, x, head), layer(x) + head(x), rtol=1e-12, atol=1e-12)
    assert torch.equal(blocks._linear(layer, x, None), layer(x))
