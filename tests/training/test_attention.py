"""Training never runs cuDNN attention (its backward fails on Hopper GPUs); sampling keeps PyTorch's choice.

A spy inside the model (a pre-hook on every diffusers attention module) reads PyTorch's SDPA switches at the
moment attention runs: in the training forward, in the block a checkpoint recomputes during backward, and
in meta-training's forward (tests/meta/test_meta_attention.py); and in a sampling forward, where nothing may be restricted.
"""

from __future__ import annotations

import pytest
import torch

from metalora_core.inject import make_heads
from metalora_core.sampling import sample_latents
from metalora_core.training.attention import heads_attention, training_backends, training_sdpa
from metalora_core.training.objective import flow_loss
from metalora_core.training.personalize import PersonalizeConfig, personalize
from tests.sdpa_spy import TRAINING_FLAGS, attention_spy, sdpa_flags


@pytest.fixture
def spy(backend):
    with attention_spy(backend.model) as seen_and_count:
        yield seen_and_count


@pytest.mark.parametrize("checkpointing", [False, True])
def test_training_forward_and_its_recompute_never_allow_cudnn(backend, lomd, views, cond, spy, checkpointing):
    seen, n_attn = spy
    assert sdpa_flags()[0], "cuDNN attention should be allowed outside training (PyTorch's default)"
    heads = make_heads(backend.dims, lomd)
    x0 = views[0].unsqueeze(0)
    backend.set_gradient_checkpointing(checkpointing)
    try:
        with backend.adapters(heads):
            loss = flow_loss(backend, x0, cond, torch.tensor([0.5]), torch.randn(x0.shape))
            seen.append("backward")
            loss.backward()
    finally:
        backend.set_gradient_checkpointing(False)
    split = seen.index("backward")
    forward, recompute = seen[:split], seen[split + 1 :]
    assert len(forward) == n_attn
    assert len(recompute) == (n_attn if checkpointing else 0)  # checkpointing recomputes every attention
    assert all(f == TRAINING_FLAGS for f in forward + recompute), seen
    assert sdpa_flags()[0], "the restriction must end with the training forward"


def test_sampling_keeps_pytorch_attention_choice(backend, cond, spy):
    seen, n_attn = spy
    sample_latents(backend, cond, (8, 8), steps=2)
    assert len(seen) == 2 * n_attn and all(f[0] for f in seen)


def test_the_personalize_loop_trains_without_cudnn(backend, lomd, views, cond, spy):
    seen, _ = spy
    personalize(backend, lomd, views, cond, PersonalizeConfig(steps=2, warmup_steps=0))
    assert seen and not any(f[0] for f in seen)


def test_priority_is_flash_then_efficient_then_math():
    from torch.nn.attention import SDPBackend

    assert training_backends() == [
        SDPBackend.FLASH_ATTENTION,
        SDPBackend.EFFICIENT_ATTENTION,
        SDPBackend.MATH,
    ]
    if hasattr(torch._C, "_get_sdp_priority_order"):
        with training_sdpa():
            order = torch._C._get_sdp_priority_order()
        assert order[:3] == [int(b) for b in training_backends()]


@pytest.mark.parametrize("skip_reshape", [False, True])
def test_heads_attention_matches_per_head_softmax(skip_reshape):
    """ComfyUI's calling convention, checked against attention written out by hand (float64)."""
    g = torch.Generator().manual_seed(0)
    b, heads, length, dim = 2, 3, 5, 4
    q, k, v = (torch.randn(b, heads, length, dim, generator=g, dtype=torch.float64) for _ in range(3))
    mask = torch.randn(length, length, generator=g, dtype=torch.float64)
    expect = torch.softmax(q @ k.transpose(-1, -2) / dim**0.5 + mask, dim=-1) @ v  # (b, heads, length, dim)
    if skip_reshape:
        got = heads_attention(q, k, v, heads, mask=mask, skip_reshape=True)
    else:
        flat = [t.transpose(1, 2).reshape(b, length, heads * dim) for t in (q, k, v)]
        got = heads_attention(*flat, heads, mask=mask)
    torch.testing.assert_close(got, expect.transpose(1, 2).reshape(b, length, heads * dim))
    kept = heads_attention(q, k, v, heads, mask=mask, skip_reshape=True, skip_output_reshape=True)
    torch.testing.assert_close(kept, expect)
    shared = torch.softmax(q @ k[:, :1].transpose(-1, -2) / dim**0.5, -1) @ v[:, :1]  # one key/value head
    few = heads_attention(
        q, k[:, :1], v[:, :1], heads, skip_reshape=True, skip_output_reshape=True, enable_gqa=True
    )
    torch.testing.assert_close(few, shared)


def test_threads_interleaving_leave_pytorchs_switches_as_they_were():
    """First in applies, last out lifts: interleaved threads cannot leave cuDNN off (sdpa_kernel alone does)."""
    import threading

    inside, release = threading.Event(), threading.Event()
    seen = []

    def worker():
        with training_sdpa():
            inside.set()
            release.wait(5)
            seen.append(sdpa_flags())

    thread = threading.Thread(target=worker)
    thread.start()
    inside.wait(5)
    with training_sdpa():  # enters while the worker is inside...
        release.set()
        thread.join(5)  # ...and the worker leaves first
        seen.append(sdpa_flags())
    assert seen == [TRAINING_FLAGS, TRAINING_FLAGS]
    assert sdpa_flags() == (True, True, True, True)
