"""Merge / Switch / Composite on ComfyUI's own tiny FLUX (float64, in this process, ComfyUI's real sampler).

Two adapters: a Meta-LoRA identity and an ordinary LoRA file in diffusers naming (loaded by ComfyUI's own
LoRA code into row slices of the fused qkv / linear1 weights, so the sliced bypass path is exercised).
"""

from __future__ import annotations

import pytest
import torch

from metalora_core.adapter import AdapterShape, delta_weight
from metalora_core.dev.random_assets import random_adapter, random_lomd
from metalora_core.errors import MetaLoRAError
from metalora_core.formats import export_lora
from metalora_core.model_files import read_model_dims

TOL = dict(atol=1e-5, rtol=1e-6)  # float64 model; ComfyUI returns samples in float32


@pytest.fixture(scope="module")
def cm(comfy, pack):
    return pack("comfy_model.compose_model")


@pytest.fixture(scope="module")
def flux(load, tiny_bfl):
    return load(tiny_bfl, torch.float64)


@pytest.fixture(scope="module")
def assets(tiny_bfl, tmp_path_factory):
    """(lomd, identity A, identity C, path of C exported as a diffusers-named LoRA file)."""
    lomd = random_lomd(tiny_bfl, AdapterShape(4, 8), "attn_mlp", seed=1)
    a = random_adapter(lomd, tiny_bfl, seed=2, up_std=0.2)
    c = random_adapter(lomd, tiny_bfl, seed=5, up_std=0.2)
    dims, _ = read_model_dims(tiny_bfl)
    path = export_lora(tmp_path_factory.mktemp("loras") / "style.safetensors", lomd, c, dims, "diffusers")
    return lomd, a, c, str(path)


def _specs(cm, assets, s_id=1.0, s_lora=1.0, w_id=1.0, w_lora=1.0):
    lomd, a, _c, path = assets
    return [
        cm.AdapterSpec("identity", s_id, w_id, lomd=lomd, identity=a),
        cm.AdapterSpec("style", s_lora, w_lora, lora_path=path),
    ]


def _cond():
    g = torch.Generator().manual_seed(0)
    cond = torch.randn(1, 8, 64, generator=g, dtype=torch.float64)
    pooled = torch.randn(1, 32, generator=g, dtype=torch.float64)
    return [[cond, {"pooled_output": pooled, "guidance": 3.5}]]


def _sample(comfy, model, steps, latent=None, noise=None, start=None, last=None, full=True):
    latent = torch.zeros(1, 16, 8, 8, dtype=torch.float64) if latent is None else latent
    if noise is None:
        noise = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    import comfy.sample

    cond = _cond()
    with torch.inference_mode():
        return comfy.sample.sample(
            model,
            noise,
            steps,
            1.0,
            "euler",
            "simple",
            cond,
            cond,
            latent,
            start_step=start,
            last_step=last,
            force_full_denoise=full,
            disable_pbar=True,
            seed=7,
        ).double()


def _stepwise(comfy, cm, flux, specs, active: list[int]):
    """Independent reference for Switch: the sampler run one stretch at a time, stretch ``j`` with only
    ``specs[active[j]]`` (by Merge, so no step counting is involved), each stretch continuing the last
    one's latent on the same full schedule (KSamplerAdvanced start/last steps, no added noise)."""
    steps, out, start = len(active), None, 0
    while start < steps:
        end = start + 1
        while end < steps and active[end] == active[start]:
            end += 1
        model = cm.compose(flux, [specs[active[start]]], "merge")
        if out is None:
            out = _sample(comfy, model, steps, last=end, full=end == steps)
        else:
            zeros = torch.zeros_like(out)
            out = _sample(comfy, model, steps, out, zeros, start=start, last=end, full=end == steps)
        start = end
    return out


def test_switch_equals_the_single_active_adapter_at_each_step(comfy, cm, flux, assets):
    """Switch every 2 of 4 steps == 2 steps with the identity alone, then 2 with the LoRA alone."""
    specs = _specs(cm, assets, 0.9, 0.8)
    switched = _sample(comfy, cm.compose(flux, specs, "switch", 2), 4)
    ref = _stepwise(comfy, cm, flux, specs, [0, 0, 1, 1])
    assert torch.allclose(switched, ref, **TOL), (switched - ref).abs().max()
    # and the order matters: starting with the LoRA gives something else
    other = _sample(comfy, cm.compose(flux, specs[::-1], "switch", 2), 4)
    assert (other - switched).abs().max() > 1e-3
    # k = 4 keeps the first adapter for all four steps
    assert torch.allclose(
        _sample(comfy, cm.compose(flux, specs, "switch", 4), 4),
        _sample(comfy, cm.compose(flux, specs[:1], "merge"), 4),
        **TOL,
    )


def test_switch_with_three_adapters_takes_turns_and_wraps_around(comfy, cm, flux, assets, tiny_bfl):
    """Three adapters every 2 of 7 steps: A A B B C C A, step by step against the single adapters. With
    three adapters and a wrap-around, a wrong step count, an index off by one, turns every step instead
    of every k, or no wrap-around each pick another adapter at some step."""
    lomd = assets[0]
    b = random_adapter(lomd, tiny_bfl, seed=3, up_std=0.2)
    specs = [*_specs(cm, assets, 0.9, 0.8), cm.AdapterSpec("identity B", 1.1, 1.0, lomd=lomd, identity=b)]
    switched = _sample(comfy, cm.compose(flux, specs, "switch", 2), 7)
    ref = _stepwise(comfy, cm, flux, specs, [0, 0, 1, 1, 2, 2, 0])
    assert torch.allclose(switched, ref, **TOL), (switched - ref).abs().max()
    # each adapter matters: the same run with the last step on the third adapter differs
    assert (_stepwise(comfy, cm, flux, specs, [0, 0, 1, 1, 2, 2, 2]) - ref).abs().max() > 1e-4


def test_switch_counts_steps_within_each_sampler_stage(comfy, cm, flux, assets):
    """ComfyUI hands a KSamplerAdvanced stage only its slice of the schedule (``sample_sigmas``), so a
    stage that starts at step 2 counts it as step 0 and starts again with the first adapter (documented
    in the node's tooltip). A Switch with the list rotated by ``start // k`` continues the turns exactly."""
    specs = _specs(cm, assets, 0.9, 0.8)
    switch = cm.compose(flux, specs, "switch", 2)
    first = _sample(comfy, switch, 4, last=2, full=False)
    zeros = torch.zeros_like(first)
    staged = _sample(comfy, switch, 4, first, zeros, start=2)
    identity_alone = _sample(comfy, cm.compose(flux, specs[:1], "merge"), 4)
    assert torch.allclose(staged, identity_alone, **TOL), (staged - identity_alone).abs().max()
    rotated = _sample(comfy, cm.compose(flux, specs[1:] + specs[:1], "switch", 2), 4, first, zeros, start=2)
    one_run = _sample(comfy, switch, 4)
    assert torch.allclose(rotated, one_run, **TOL), (rotated - one_run).abs().max()
    assert (one_run - staged).abs().max() > 1e-3


def test_composite_equals_the_weighted_mean_of_single_adapter_predictions(comfy, cm, flux, assets):
    """One Euler step down to sigma 0 returns the denoised prediction itself, so a 1-step sample of the
    composite is sum_i w_i x0_i / sum_i w_i of the single-adapter models' predictions."""
    specs = _specs(cm, assets, 0.9, 0.8, w_id=3.0, w_lora=1.0)
    composite = _sample(comfy, cm.compose(flux, specs, "composite"), 1)
    singles = [_sample(comfy, cm.compose(flux, [s], "merge"), 1) for s in specs]
    expected = 0.75 * singles[0] + 0.25 * singles[1]
    assert torch.allclose(composite, expected, **TOL), (composite - expected).abs().max()
    assert (singles[0] - singles[1]).abs().max() > 1e-3  # the two adapters really differ
    merged = _sample(comfy, cm.compose(flux, specs, "merge"), 1)
    assert (merged - composite).abs().max() > 1e-4  # composite is not merge


def test_merge_equals_the_patched_sum(comfy, cm, flux, assets, tiny_bfl):
    """Merge's weights, as ComfyUI loads them, == W + s_A dW_A + s_C dW_C (float64), on a fused qkv layer."""
    import comfy.model_management
    from safetensors import safe_open

    lomd, a, c, _ = assets
    merged = cm.compose(flux, _specs(cm, assets, 0.7, -0.4), "merge")
    name = "double_blocks.0.img_attn.qkv"
    with safe_open(str(tiny_bfl), "pt") as f:
        base = f.get_tensor(f"{name}.weight").double()
    with torch.inference_mode():
        comfy.model_management.load_models_gpu([merged])
        got = merged.model.state_dict()[f"diffusion_model.{name}.weight"].double().cpu()
        comfy.model_management.load_models_gpu([flux])  # the plain model again (unpatches the merge)
        plain = flux.model.state_dict()[f"diffusion_model.{name}.weight"].double().cpu()
    scale = a.shape.scale
    d_a = delta_weight(lomd.downs[name].double(), a.mids[name].double(), a.ups[name].double(), scale)
    d_c = delta_weight(lomd.downs[name].double(), c.mids[name].double(), c.ups[name].double(), scale)
    expected = base + 0.7 * d_a - 0.4 * d_c
    # ComfyUI patches in its float32 intermediate dtype and the LoRA file is float32
    assert torch.allclose(got, expected, atol=1e-6), (got - expected).abs().max()
    assert (got - base).abs().max() > 1e-2
    assert torch.equal(plain, base)


def test_the_base_model_is_unchanged_after_composing(comfy, cm, flux, assets):
    before = _sample(comfy, flux, 2)
    stacked = cm.compose(cm.compose(flux, _specs(cm, assets)[:1], "composite"), _specs(cm, assets), "switch")
    for model in (cm.compose(flux, _specs(cm, assets), "switch"), stacked):
        _sample(comfy, model, 2)
        after = _sample(comfy, flux, 2)
        assert torch.equal(before, after)
    module = flux.model.diffusion_model.double_blocks[0].img_attn.qkv
    assert "forward" not in vars(module)  # every bypass hook was ejected, in whatever order


def test_stacked_compositions_nest(comfy, cm, flux, assets):
    """Two single-adapter switches stacked keep both adapters on at every step: the merge of the two."""
    a, b = _specs(cm, assets, 0.9, 0.8)
    stacked = cm.compose(cm.compose(flux, [a], "switch"), [b], "switch")
    expected = _sample(comfy, cm.compose(flux, [a, b], "merge"), 2)
    assert torch.allclose(_sample(comfy, stacked, 2), expected, **TOL)


def test_bad_compositions_are_clear_errors(comfy, cm, flux, assets, tmp_path):
    with pytest.raises(MetaLoRAError, match="empty"):
        cm.compose(flux, [], "composite")
    with pytest.raises(MetaLoRAError, match="sum to 0"):
        cm.compose(flux, _specs(cm, assets, w_id=0.0, w_lora=0.0), "composite")
    from safetensors.torch import save_file

    diff = tmp_path / "diff.safetensors"
    save_file({"diffusion_model.double_blocks.0.img_attn.qkv.diff": torch.zeros(384, 128)}, str(diff))
    spec = cm.AdapterSpec("LoRA 'diff'", 1.0, lora_path=str(diff))
    with pytest.raises(MetaLoRAError, match="full weight difference.*Merge"):
        cm.compose(flux, [spec], "switch")
    cm.compose(flux, [spec], "merge")  # merge takes it
    other = tmp_path / "other.safetensors"
    save_file({"lora_te1_x.lora_up.weight": torch.zeros(4, 4)}, str(other))
    with pytest.raises(MetaLoRAError, match="none of its"):
        cm.compose(flux, [cm.AdapterSpec("LoRA 'other'", 1.0, lora_path=str(other))], "merge")


def test_difference_file_through_the_stock_loader_equals_b_plus_one_and_a_minus_one(
    comfy, flux, assets, tmp_path, tiny_bfl
):
    """``metalora lora difference`` read by ComfyUI's own LoRA loading: one load at +1 gives the same weights
    as loading B at +1 and A at -1 (kohya A, diffusers B: the output naming converts too)."""
    import comfy.model_management
    import comfy.sd
    import comfy.utils

    from metalora_core.loras.tools import difference

    lomd, a, _c, b_path = assets
    dims, _ = read_model_dims(tiny_bfl)
    a_path = export_lora(tmp_path / "a.safetensors", lomd, a, dims, "kohya")
    diff = difference(a_path, b_path, tmp_path / "diff.safetensors").path

    def weights(model):
        with torch.inference_mode():
            comfy.model_management.load_models_gpu([model])
            return {
                k: v.double().cpu().clone()
                for k, v in model.model.state_dict().items()
                if k.endswith(".weight")
            }

    def lora(model, path, strength):
        return comfy.sd.load_lora_for_models(
            model, None, comfy.utils.load_torch_file(str(path), safe_load=True), strength, 0
        )[0]

    both = weights(lora(lora(flux, b_path, 1.0), a_path, -1.0))
    once = weights(lora(flux, diff, 1.0))
    base = weights(flux)
    changed = [k for k in base if (both[k] - base[k]).abs().max() > 1e-4]
    assert len(changed) >= 8
    for k in base:
        assert torch.allclose(once[k], both[k], atol=1e-6), k


def test_outside_a_sampler_a_bypass_composition_is_the_base_model(comfy, cm, flux, assets):
    """The wrapper switches adapters on only for its own passes: a direct ``apply_model`` call on the
    loaded (hooks injected) model, even right after sampling, sees the base model."""
    import comfy.model_management

    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 16, 8, 8, generator=g, dtype=torch.float64)
    (cond, extra), sigma = _cond()[0], torch.tensor([0.7], dtype=torch.float64)

    def direct(model):
        with torch.inference_mode():
            comfy.model_management.load_models_gpu([model])
            return model.model.apply_model(
                x, sigma, c_crossattn=cond, y=extra["pooled_output"], guidance=torch.tensor([3.5])
            )

    base = direct(flux)
    composed = cm.compose(flux, _specs(cm, assets), "switch")
    _sample(comfy, composed, 2)
    assert "forward" in vars(flux.model.diffusion_model.double_blocks[0].img_attn.qkv)  # hooks are in
    assert torch.equal(direct(composed), base)
