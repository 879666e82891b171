"""Routing of heads into ComfyUI's FLUX blocks (nodes/comfy_training/patches.py) without ComfyUI: every
block gets an out-of-place replacement, each head lands on its own block and layer, and a head for a block
the model does not have is an error, not silently dropped."""

from __future__ import annotations

import pytest
import torch
from torch import nn


@pytest.fixture(scope="module")
def patches(pure):
    return pure("comfy_training.patches")


class _Model(nn.Module):
    def __init__(self, depth: int = 2, depth_single: int = 3) -> None:
        super().__init__()
        self.double_blocks = nn.ModuleList(nn.Identity() for _ in range(depth))
        self.single_blocks = nn.ModuleList(nn.Identity() for _ in range(depth_single))


def test_group_heads_by_block_and_layer(patches):
    a, b, c = object(), object(), object()
    grouped = patches.group_heads(
        {"double_blocks.1.img_attn.qkv": a, "double_blocks__1__txt_mlp__2": b, "single_blocks.2.linear1": c}
    )
    assert grouped == {
        ("double_block", 1): {"img_attn.qkv": a, "txt_mlp.2": b},
        ("single_block", 2): {"linear1": c},
    }
    with pytest.raises(ValueError, match="final_layer.linear"):
        patches.group_heads({"final_layer.linear": a})


def test_every_block_is_replaced_and_heads_reach_their_own_block(patches):
    model = _Model()
    head = object()
    reps = patches.replacements(model, {"single_blocks.2.linear2": head}, lambda: False)
    assert sorted(reps) == [("double_block", 0), ("double_block", 1)] + [
        ("single_block", i) for i in range(3)
    ]
    assert reps[("single_block", 2)].heads == {"linear2": head}
    assert all(r.heads == {} for k, r in reps.items() if k != ("single_block", 2))
    assert all((r.kind, r.index) == k for k, r in reps.items())
    with pytest.raises(ValueError, match="no single_block 3"):
        patches.replacements(model, {"single_blocks.3.linear1": head}, lambda: False)


def test_checkpointing_is_read_per_call_and_only_under_grad(patches, monkeypatch):
    calls = []
    monkeypatch.setattr(
        patches.torch.utils.checkpoint, "checkpoint", lambda fn, *t, **kw: calls.append(kw) or fn(*t)
    )
    state = {"on": False}
    rep = patches.BlockReplacement(nn.ModuleList([nn.Identity()]), "single_block", 0, {}, lambda: state["on"])
    x = torch.ones(2)
    assert torch.equal(rep._run(lambda v: v * 2, x), x * 2) and calls == []
    state["on"] = True
    rep._run(lambda v: v, x)
    assert calls == [{"use_reentrant": False}]
    with torch.no_grad():
        rep._run(lambda v: v, x)
    assert len(calls) == 1  # no recomputation without autograd
