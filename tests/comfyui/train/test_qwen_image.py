"""The Qwen-Image trainer against ComfyUI's own tiny Qwen-Image (float64): block, backend, family detection.

- the out-of-place block == ComfyUI's ``QwenImageTransformerBlock`` bit for bit without heads, and == the
  block with ``delta_W`` merged into its weights with heads;
- Mid/Up gradients == central finite differences; checkpointing on == off;
- the backend's velocity == ComfyUI's transformer on 5-D latents, and == KSampler's ``apply_model``
  convention; ``adapters()`` leaves the MODEL's options as they were, also after an exception;
- the MODEL's family picks the backend; other models are refused by name.
"""

from __future__ import annotations

import copy

import pytest
import torch

from metalora_core.adapter import AdapterShape, IdentityHead
from metalora_core.errors import MetaLoRAError
from metalora_core.inject import make_heads
from metalora_core.lomd.seeded import seeded_lomd
from metalora_core.models.qwen_image import LAYERS, QwenImageDims, dims_from_shapes
from metalora_core.training.objective import noisy_latents
from metalora_core.training.protocol import FluxBackend, TextConditioning
from tests.comfyui.train.helpers import directional_check, load_qwen, random_head, random_identity

pytestmark = pytest.mark.usefixtures("training_mode")


@pytest.fixture(scope="module")
def qi(comfy, pack):
    return pack("comfy_training.qwen_image")


@pytest.fixture(scope="module")
def families(comfy, pack):
    return pack("comfy_training.families")


# --- inputs and heads -------------------------------------------------------------------------------------


def block_inputs(dm, h=8, w=6, tokens=5, seed=0, batch=1):
    """img / txt streams, timestep embedding and RoPE of ComfyUI's own ``_forward`` for one latent size."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 16, 1, h, w, generator=g, dtype=torch.float64)
    img, img_ids, _ = dm.process_img(x)
    img = torch.randn(img.shape[:2] + (dm.inner_dim,), generator=g, dtype=torch.float64)
    txt = torch.randn(batch, tokens, dm.inner_dim, generator=g, dtype=torch.float64)
    temb = torch.randn(batch, dm.inner_dim, generator=g, dtype=torch.float64)
    start = max(w // 2, h // 2) // 2
    txt_ids = torch.arange(start, start + tokens).reshape(1, -1, 1).repeat(batch, 1, 3)
    pe = dm.pe_embedder(torch.cat((txt_ids, img_ids), dim=1)).to(torch.float64).contiguous()
    return img, txt, temb, pe


def block_heads(block, layers=LAYERS, up_std=0.05, seed=0) -> dict[str, IdentityHead]:
    return {
        layer: random_head(*block.get_submodule(layer).weight.shape, seed + i, up_std)
        for i, layer in enumerate(layers)
    }


def merged(module, heads, prefix=""):
    """A deep copy of ``module`` with each head's ``Up @ Mid @ Down`` added to its layer's weight."""
    out = copy.deepcopy(module)
    with torch.no_grad():
        for name, h in heads.items():
            out.get_submodule(prefix + name.replace("__", ".")).weight += h.delta_weight()
    return out


def conditioning(dims, tokens=6, seed=0) -> TextConditioning:
    g = torch.Generator().manual_seed(seed)
    return TextConditioning(torch.randn(tokens, dims.context_dim, generator=g, dtype=torch.float64))


def latents(batch=2, h=8, w=6, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 16, h, w, generator=g, dtype=torch.float64)


# --- the block --------------------------------------------------------------------------------------------


def test_block_identical_without_heads(qwen64, qi):
    dm = qwen64.model.diffusion_model
    block = dm.transformer_blocks[0]
    img, txt, temb, pe = block_inputs(dm)
    img0, txt0 = img.clone(), txt.clone()
    ref_txt, ref_img = block(img, txt, None, temb, pe)
    out_img, out_txt = qi.qwen_block_forward(block, img, txt, temb, pe)
    assert torch.equal(out_img, ref_img) and torch.equal(out_txt, ref_txt)
    out_img, out_txt = qi.qwen_block_forward(block, img, txt, temb, pe, block_heads(block, up_std=0.0))
    assert torch.equal(out_img, ref_img) and torch.equal(out_txt, ref_txt)
    assert torch.equal(img, img0) and torch.equal(txt, txt0)  # out of place


def test_block_heads_equal_merged_weights(qwen64, qi):
    """A head on every one of the 14 layers == ComfyUI's own block with Up @ Mid @ Down in the weights."""
    dm = qwen64.model.diffusion_model
    block = dm.transformer_blocks[1]
    img, txt, temb, pe = block_inputs(dm, seed=1, batch=2)
    heads = block_heads(block)
    ref_txt, ref_img = merged(block, heads)(img, txt, None, temb, pe)
    out_img, out_txt = qi.qwen_block_forward(block, img, txt, temb, pe, heads)
    plain_txt, plain_img = block(img, txt, None, temb, pe)
    assert (out_img - plain_img).abs().max() > 1e-3 and (out_txt - plain_txt).abs().max() > 1e-3
    torch.testing.assert_close(out_img, ref_img, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out_txt, ref_txt, rtol=1e-10, atol=1e-10)


def test_block_with_a_text_mask_matches_comfyui(qwen64, qi):
    """The mask path (unused by training, which has no padding mask) is ComfyUI's too."""
    dm = qwen64.model.diffusion_model
    block = dm.transformer_blocks[0]
    img, txt, temb, pe = block_inputs(dm, seed=2)
    mask = torch.zeros(1, txt.shape[1], dtype=torch.float64)
    mask[:, -2:] = -torch.finfo(torch.float64).max
    ref_txt, ref_img = block(img, txt, mask, temb, pe)
    out_img, out_txt = qi.qwen_block_forward(block, img, txt, temb, pe, None, mask)
    assert torch.equal(out_img, ref_img) and torch.equal(out_txt, ref_txt)


def _block_loss(qi, block, heads, inputs, weights):
    img, txt = qi.qwen_block_forward(block, *inputs, heads)
    return (img * weights[0]).sum() + (txt * weights[1]).sum()


def test_block_gradients_match_finite_differences(qwen64, qi):
    """float64 central differences on entries of the Mid and Up of heads in attention, MLP and modulation."""
    dm = qwen64.model.diffusion_model
    block = dm.transformer_blocks[0]
    inputs = block_inputs(dm, seed=3)
    heads = block_heads(block, ("attn.to_k", "attn.add_v_proj", "txt_mlp.net.0.proj", "img_mod.1"), seed=4)
    g = torch.Generator().manual_seed(5)
    weights = tuple(torch.randn(x.shape, generator=g, dtype=torch.float64) for x in inputs[:2])
    params = [p for h in heads.values() for p in (h.mid, h.up)]
    grads = torch.autograd.grad(_block_loss(qi, block, heads, inputs, weights), params)
    eps = 1e-6
    with torch.no_grad():
        for p, grad in zip(params, grads):
            flat = p.view(-1)
            for i in torch.randperm(flat.numel(), generator=g)[:5].tolist():
                old = flat[i].item()
                flat[i] = old + eps
                plus = _block_loss(qi, block, heads, inputs, weights)
                flat[i] = old - eps
                minus = _block_loss(qi, block, heads, inputs, weights)
                flat[i] = old
                fd = (plus - minus) / (2 * eps)
                assert abs(fd - grad.view(-1)[i]) <= 1e-6 * max(1.0, abs(fd)), (p.shape, i)


def test_checkpointing_gives_the_same_values_and_gradients(qwen64, qi):
    dm = qwen64.model.diffusion_model
    img, txt, temb, pe = block_inputs(dm, seed=6)
    heads = block_heads(dm.transformer_blocks[1], seed=7)
    results = []
    for checkpoint in (False, True):
        reps = qi.qwen_replacements(
            dm, {f"transformer_blocks.1.{k}": h for k, h in heads.items()}, lambda c=checkpoint: c
        )
        x_img, x_txt = img.clone().requires_grad_(True), txt.clone().requires_grad_(True)
        args = {"img": x_img, "txt": x_txt, "vec": temb, "pe": pe, "transformer_options": {}}
        out = reps[("double_block", 1)](args, {"original_block": None})
        loss = (out["img"] ** 2).sum() + out["txt"].sin().sum()
        params = [p for h in heads.values() for p in (h.mid, h.up)]
        results.append(
            (out["img"].detach(), out["txt"].detach(), *torch.autograd.grad(loss, params + [x_img, x_txt]))
        )
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_heads_route_by_block_and_refuse_foreign_names(qwen64, qi):
    dm = qwen64.model.diffusion_model
    h = random_head(64, 64, 0)
    reps = qi.qwen_replacements(dm, {"transformer_blocks__1__attn__to_add_out": h}, lambda: False)
    assert set(reps) == {("double_block", 0), ("double_block", 1)}
    assert reps[("double_block", 0)].heads == {} and reps[("double_block", 1)].heads == {"attn.to_add_out": h}
    with pytest.raises(MetaLoRAError, match="larger Qwen-Image"):
        qi.qwen_replacements(dm, {"transformer_blocks.2.attn.to_q": h}, lambda: False)
    with pytest.raises(MetaLoRAError, match="not a Qwen-Image block layer"):
        qi.qwen_replacements(dm, {"double_blocks.0.img_attn.qkv": h}, lambda: False)


# --- the backend -----------------------------------------------------------------------------------------


def test_backend_reads_the_models_sizes(qwen64, qi):
    backend = qi.ComfyQwenImageBackend(qwen64)
    assert isinstance(backend, FluxBackend)
    expected = QwenImageDims(64, 256, 2, 16, 48, 16, 32)
    assert backend.dims == expected and backend.dtype == torch.float64
    shapes = {f"model.diffusion_model.{k}": v for k, v in qwen64.model.diffusion_model.state_dict().items()}
    assert dims_from_shapes(shapes) == expected  # the library reads the same sizes from the tensors
    assert backend.dims.axes_dims_rope == (4, 14, 14)


def test_velocity_is_comfyuis_transformer_on_one_frame(comfy, qwen64, qi):
    backend = qi.ComfyQwenImageBackend(qwen64)
    cond, x_t = conditioning(backend.dims), latents()
    t = torch.tensor([0.7, 0.3], dtype=torch.float64)
    context, _ = cond.batch(2, "cpu", torch.float64)
    with backend.session(), torch.no_grad():
        v = backend.velocity(x_t, t, cond, guidance=None)
        own = qwen64.model.diffusion_model(x_t.unsqueeze(2), t.float(), context)
        x0 = qwen64.model.apply_model(x_t.unsqueeze(2), t, c_crossattn=context)
    assert v.shape == x_t.shape and own.shape == (2, 16, 1, 8, 6)
    torch.testing.assert_close(v, own.squeeze(2), rtol=1e-12, atol=1e-12)
    # KSampler's path: x0 = x_t - sigma * out, so out is the velocity noise - x0 (float32 output there)
    torch.testing.assert_close(v, (x_t - x0.squeeze(2)) / t.view(-1, 1, 1, 1), rtol=1e-6, atol=1e-6)


def test_heads_equal_merged_weights_and_leave_no_trace(comfy, qwen64, qi):
    dims = qi.qwen_image_dims(qwen64.model.diffusion_model)
    lomd = seeded_lomd(dims, AdapterShape(4, 8), "all_linear", seed=1)
    heads = make_heads(dims, lomd, random_identity(lomd, dims, seed=2), dtype=torch.float64)
    backend = qi.ComfyQwenImageBackend(qwen64)
    cond, x_t = conditioning(dims, seed=3), latents(seed=4)
    t = torch.tensor([0.5, 0.9], dtype=torch.float64)
    options_before = repr(qwen64.model_options)
    comfy.model_management.in_training = False  # as outside training (the module's fixture set it)
    with backend.session(), torch.no_grad():
        assert comfy.model_management.in_training
        plain = backend.velocity(x_t, t, cond, None)
        with backend.adapters(heads):
            adapted = backend.velocity(x_t, t, cond, None)
            assert repr(qwen64.model_options) == options_before
        after = backend.velocity(x_t, t, cond, None)
        with pytest.raises(RuntimeError, match="inside"), backend.adapters(heads):
            raise RuntimeError("inside")
        assert backend._active is None and torch.equal(backend.velocity(x_t, t, cond, None), plain)
    assert torch.equal(plain, after) and (adapted - plain).abs().max() > 1e-3
    assert (
        repr(qwen64.model_options) == options_before and repr(backend.patcher.model_options) == options_before
    )
    assert not comfy.model_management.in_training
    comfy.model_management.in_training = True  # float64 RoPE below needs ComfyUI's torch path again

    reference = merged(qwen64.model.diffusion_model, heads)
    with torch.no_grad():
        ref = reference(x_t.unsqueeze(2), t.float(), cond.batch(2, "cpu", torch.float64)[0]).squeeze(2)
    torch.testing.assert_close(adapted, ref, rtol=1e-10, atol=1e-10)


def _loss(backend, heads, x0, cond, t, noise):
    with backend.adapters(heads):
        v = backend.velocity(noisy_latents(x0, noise, t), t, cond, None)
    return ((v - (noise - x0)) ** 2).mean()


@pytest.mark.parametrize("checkpointing", [False, True])
def test_backend_gradient_matches_finite_differences(qwen64, qi, checkpointing):
    """Directional derivative of the flow loss along a random Mid/Up direction: autograd == central
    differences, through the whole ComfyUI Qwen-Image (float64)."""
    dims = qi.qwen_image_dims(qwen64.model.diffusion_model)
    lomd = seeded_lomd(dims, AdapterShape(4, 8), "all_linear", seed=5)
    heads = make_heads(dims, lomd, random_identity(lomd, dims, seed=6), dtype=torch.float64)
    backend = qi.ComfyQwenImageBackend(qwen64)
    backend.set_gradient_checkpointing(checkpointing)
    cond, x0, noise = conditioning(dims, seed=7), latents(seed=8), latents(seed=9)
    t = torch.tensor([0.4, 0.8], dtype=torch.float64)
    params = [p for h in heads.values() for p in (h.mid, h.up)]
    with backend.session():
        analytic, numeric = directional_check(
            lambda: _loss(backend, heads, x0, cond, t, noise), params, eps=1e-5, seed=10
        )
    assert abs(analytic) > 1e-3
    assert abs(numeric - analytic) <= 1e-7 * abs(analytic), (numeric.item(), analytic.item())


# --- the family seam --------------------------------------------------------------------------------------


def test_the_models_family_picks_the_backend(comfy, flux64, qwen64, families, pack):
    assert type(families.make_backend(flux64)) is pack("comfy_training.backend").ComfyFluxBackend
    backend = families.make_backend(qwen64)
    assert type(backend) is pack("comfy_training.qwen_image").ComfyQwenImageBackend
    assert families.model_dims(qwen64) == backend.dims
    assert families.model_dims(flux64) == families.make_backend(flux64).dims


def test_other_models_are_refused_by_name(comfy, families, qi):
    class Patcher:
        def __init__(self, model):
            self.model = model

    with pytest.raises(MetaLoRAError, match=r"MODEL input.*FLUX\.1.*Qwen-Image.*'Linear'"):
        families.make_backend(Patcher(torch.nn.Linear(2, 2)))
    mage = object.__new__(comfy.model_base.MageFlow)  # a QwenImage subclass with its own transformer
    with pytest.raises(MetaLoRAError, match="'MageFlow'.*built on Qwen-Image"):
        families.make_backend(Patcher(mage))
    with pytest.raises(MetaLoRAError, match="MODEL input.*FLUX.1"):
        qi.ComfyQwenImageBackend(Patcher(torch.nn.Linear(2, 2)))


@pytest.mark.parametrize(
    "variant", [{"default_ref_method": "index_timestep_zero"}, {"use_additional_t_cond": True}]
)
def test_qwen_image_edit_variants_are_refused(comfy, families, variant):
    with pytest.raises(MetaLoRAError, match="edit / layered variant"):
        families.make_backend(load_qwen(comfy, torch.float32, **variant))
