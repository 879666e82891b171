"""The out-of-place block forwards against ComfyUI's real FLUX blocks, in float64.

- no heads / zero Up: bit-identical to ComfyUI's block (which adds its residuals in place);
- random heads: equal to ComfyUI's block with ``delta_W`` merged into the weights (the bypass is exact);
- gradients: central finite differences, and checkpointing on == off.
"""

from __future__ import annotations

import copy

import pytest
import torch

from metalora_core.targets import DOUBLE_ATTN, DOUBLE_MLP, DOUBLE_MOD, SINGLE_CORE, SINGLE_MOD
from tests.comfyui.train.helpers import random_head


def _heads_for(block, layers, up_std=0.05, seed=0):
    heads = {}
    for i, layer in enumerate(layers):
        lin = block.get_submodule(layer)
        heads[layer] = random_head(lin.weight.shape[0], lin.weight.shape[1], seed + i, up_std)
    return heads


def _inputs(dm, img_tokens=16, txt_tokens=8, seed=0, pe_dtype=None):
    g = torch.Generator().manual_seed(seed)
    h = dm.hidden_size
    img = torch.randn(1, img_tokens, h, generator=g, dtype=torch.float64)
    txt = torch.randn(1, txt_tokens, h, generator=g, dtype=torch.float64)
    vec = torch.randn(1, h, generator=g, dtype=torch.float64)
    ids = torch.zeros(1, txt_tokens + img_tokens, 3)
    ids[0, txt_tokens:, 1] = torch.arange(img_tokens) // 4
    ids[0, txt_tokens:, 2] = torch.arange(img_tokens) % 4
    pe = dm.pe_embedder(ids)
    return img, txt, vec, pe if pe_dtype is None else pe.to(pe_dtype)


def _merged(block, heads):
    merged = copy.deepcopy(block)
    with torch.no_grad():
        for layer, head in heads.items():
            merged.get_submodule(layer).weight += head.delta_weight()
    return merged


@pytest.fixture(scope="module")
def blocks(comfy, flux64, pack):
    return pack("comfy_training.blocks")


pytestmark = pytest.mark.usefixtures("training_mode")


def test_double_block_identical_without_heads(flux64, blocks):
    dm = flux64.model.diffusion_model
    block = dm.double_blocks[0]
    img, txt, vec, pe = _inputs(dm)
    ref_img, ref_txt = block(img=img.clone(), txt=txt.clone(), vec=vec, pe=pe)
    out_img, out_txt = blocks.double_block_forward(block, img, txt, vec, pe)
    assert torch.equal(out_img, ref_img) and torch.equal(out_txt, ref_txt)
    zero = _heads_for(block, DOUBLE_ATTN + DOUBLE_MLP + DOUBLE_MOD, up_std=0.0)
    out_img, out_txt = blocks.double_block_forward(block, img, txt, vec, pe, zero)
    assert torch.equal(out_img, ref_img) and torch.equal(out_txt, ref_txt)


def test_single_block_identical_without_heads(flux64, blocks):
    dm = flux64.model.diffusion_model
    block = dm.single_blocks[1]
    img, txt, vec, pe = _inputs(dm)
    x = torch.cat((txt, img), 1)
    ref = block(x.clone(), vec=vec, pe=pe)
    assert torch.equal(blocks.single_block_forward(block, x, vec, pe), ref)
    zero = _heads_for(block, SINGLE_CORE + SINGLE_MOD, up_std=0.0)
    assert torch.equal(blocks.single_block_forward(block, x, vec, pe, zero), ref)


def test_inputs_are_not_modified(flux64, blocks):
    dm = flux64.model.diffusion_model
    img, txt, vec, pe = _inputs(dm)
    img0, txt0 = img.clone(), txt.clone()
    blocks.double_block_forward(dm.double_blocks[0], img, txt, vec, pe)
    blocks.single_block_forward(dm.single_blocks[0], torch.cat((txt, img), 1), vec, pe)
    assert torch.equal(img, img0) and torch.equal(txt, txt0)


def test_heads_equal_merged_weights(flux64, blocks):
    """A head on each targeted linear == ComfyUI's own block with Up @ Mid @ Down added to that weight."""
    dm = flux64.model.diffusion_model
    img, txt, vec, pe = _inputs(dm, seed=1)
    block = dm.double_blocks[1]
    heads = _heads_for(block, DOUBLE_ATTN + DOUBLE_MLP + DOUBLE_MOD)
    ref_img, ref_txt = _merged(block, heads)(img=img.clone(), txt=txt.clone(), vec=vec, pe=pe)
    out_img, out_txt = blocks.double_block_forward(block, img, txt, vec, pe, heads)
    plain_img, _ = block(img=img.clone(), txt=txt.clone(), vec=vec, pe=pe)
    assert (out_img - plain_img).abs().max() > 1e-3  # the heads do something ...
    torch.testing.assert_close(out_img, ref_img, rtol=1e-10, atol=1e-10)  # ... exactly the merged weight
    torch.testing.assert_close(out_txt, ref_txt, rtol=1e-10, atol=1e-10)

    block = dm.single_blocks[0]
    x = torch.cat((txt, img), 1)
    heads = _heads_for(block, SINGLE_CORE + SINGLE_MOD)
    ref = _merged(block, heads)(x.clone(), vec=vec, pe=pe)
    torch.testing.assert_close(
        blocks.single_block_forward(block, x, vec, pe, heads), ref, rtol=1e-10, atol=1e-10
    )


def _loss_double(blocks, block, heads, img, txt, vec, pe, weights):
    out_img, out_txt = blocks.double_block_forward(block, img, txt, vec, pe, heads)
    return (out_img * weights[0]).sum() + (out_txt * weights[1]).sum()


def test_gradients_match_finite_differences(flux64, blocks):
    """float64 central differences on every Mid/Up entry of two heads (pe in float64 so nothing rounds)."""
    dm = flux64.model.diffusion_model
    img, txt, vec, pe = _inputs(dm, img_tokens=8, txt_tokens=4, seed=2, pe_dtype=torch.float64)
    block = dm.double_blocks[0]
    heads = _heads_for(block, ("img_attn.qkv", "txt_mlp.2", "img_mod.lin"), seed=3)
    g = torch.Generator().manual_seed(4)
    weights = (
        torch.randn(img.shape, generator=g, dtype=torch.float64),
        torch.randn(txt.shape, generator=g, dtype=torch.float64),
    )
    loss = _loss_double(blocks, block, heads, img, txt, vec, pe, weights)
    params = [p for h in heads.values() for p in (h.mid, h.up)]
    grads = torch.autograd.grad(loss, params)
    eps = 1e-6
    with torch.no_grad():
        for p, grad in zip(params, grads):
            flat = p.view(-1)
            idx = torch.randperm(flat.numel(), generator=g)[:6]
            for i in idx.tolist():
                old = flat[i].item()
                flat[i] = old + eps
                plus = _loss_double(blocks, block, heads, img, txt, vec, pe, weights)
                flat[i] = old - eps
                minus = _loss_double(blocks, block, heads, img, txt, vec, pe, weights)
                flat[i] = old
                fd = (plus - minus) / (2 * eps)
                assert abs(fd - grad.view(-1)[i]) <= 1e-6 * max(1.0, abs(fd)), (
                    p.shape,
                    i,
                    fd,
                    grad.view(-1)[i],
                )


def test_checkpointing_gives_same_gradients(flux64, blocks, pack):
    """The replacement under activation checkpointing == without, for heads and for the block inputs."""
    BlockReplacement = pack("comfy_training.patches").BlockReplacement
    dm = flux64.model.diffusion_model
    img, txt, vec, pe = _inputs(dm, seed=5)
    heads = _heads_for(dm.double_blocks[0], DOUBLE_ATTN + DOUBLE_MLP, seed=6)
    results = []
    for checkpoint in (False, True):
        rep = BlockReplacement(dm.double_blocks, "double_block", 0, heads, lambda c=checkpoint: c)
        x_img, x_txt = img.clone().requires_grad_(True), txt.clone().requires_grad_(True)
        out = rep({"img": x_img, "txt": x_txt, "vec": vec, "pe": pe, "transformer_options": {}}, {})
        loss = (out["img"] ** 2).sum() + out["txt"].sin().sum()
        params = [p for h in heads.values() for p in (h.mid, h.up)]
        results.append(torch.autograd.grad(loss, params + [x_img, x_txt]))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
