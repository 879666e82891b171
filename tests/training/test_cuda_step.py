"""What only a GPU can show: the CUDA-graph step equals the eager step, training never launches a cuDNN
attention kernel, and fp8 weights train. Skipped without CUDA; `pytest tests/training/test_cuda_step.py`
on any NVIDIA GPU runs them (docs/performance.md records an H200 run).

The model is FLUX-shaped where it matters for kernel choice (head dim 128, bf16, 1024 image + 512 text
tokens, the shapes PyTorch sends to cuDNN on Hopper) but only 2 + 4 blocks wide 512, so it builds in a
second and fits any card.
"""

from __future__ import annotations

import pytest
import torch

from metalora_core.adapter import AdapterShape
from metalora_core.lomd.seeded import seeded_lomd
from metalora_core.targets import FluxDims, diffusers_config_for
from metalora_core.training.diffusers_backend import DiffusersBackend
from metalora_core.training.objective import flow_loss
from metalora_core.training.personalize import PersonalizeConfig, personalize
from metalora_core.training.precision import store_layerwise
from metalora_core.training.protocol import TextConditioning

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

DIMS = FluxDims(512, 2048, 2, 4, 16, 256, 64, True, 16, 128)
LATENT = (64, 64)  # 512 px: 1024 image tokens


def _model(dtype=torch.bfloat16):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    with torch.device("cuda"):
        return FluxTransformer2DModel(**diffusers_config_for(DIMS)).to(dtype)


@pytest.fixture(scope="module")
def gpu():
    backend = DiffusersBackend(_model(), DIMS)
    g = torch.Generator().manual_seed(1)
    cond = TextConditioning(
        torch.randn(512, DIMS.context_dim, generator=g), torch.randn(DIMS.vec_dim, generator=g)
    )
    views = [torch.randn(16, *LATENT, generator=g) for _ in range(3)]
    return backend, cond, views, seeded_lomd(DIMS, AdapterShape(4, 16))


def _kernels(run) -> list[str]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if e.device_type.name == "CUDA"]


def test_training_launches_no_cudnn_attention_kernel(gpu):
    backend, cond, views, _ = gpu
    x0 = torch.stack(views[:1]).cuda()
    noise = torch.randn_like(x0)
    t = torch.tensor([0.6], device="cuda")

    def step():
        flow_loss(backend, x0.requires_grad_(True), cond.to("cuda", torch.bfloat16), t, noise).backward()

    names = _kernels(step)
    attention = sorted(
        {n for n in names if "flash" in n.lower() or "fmha" in n.lower() or "attention" in n.lower()}
    )
    print("training attention kernels:", attention)
    assert attention, "no attention kernel seen: the check would be vacuous"
    assert not [n for n in names if "cudnn" in n.lower()], "a cuDNN kernel ran in training"


@pytest.mark.parametrize("checkpointing", [False, True])
def test_graph_step_equals_eager_step_over_20_steps(gpu, checkpointing):
    """The captured step is the eager step: it differs from an eager run no more than a second eager run
    does (flash attention's backward accumulates with atomics, so two eager bf16 runs differ slightly)."""
    backend, cond, views, lomd = gpu
    runs = []
    for capture in (False, False, True):
        cfg = PersonalizeConfig(
            steps=20,
            lr=1e-3,
            warmup_steps=3,
            seed=3,
            gradient_checkpointing=checkpointing,
            capture_step=capture,
        )
        runs.append(personalize(backend, lomd, views, cond, cfg))
    eager, again, graph = runs
    assert graph.notes == ["training step captured as a CUDA graph"], graph.notes
    assert eager.notes == []

    def gap(a, b) -> float:
        losses = max(abs(x - y) for x, y in zip(a.losses, b.losses))
        ups = max(float((a.adapter.ups[n] - b.adapter.ups[n]).abs().max()) for n in a.adapter.ups)
        mids = max(float((a.adapter.mids[n] - b.adapter.mids[n]).abs().max()) for n in a.adapter.mids)
        return max(losses, ups, mids)

    noise, captured = gap(eager, again), gap(eager, graph)
    print(f"checkpointing {checkpointing}: eager vs eager {noise:.3g}, eager vs graph {captured:.3g}")
    assert captured <= 4 * noise + 1e-6
    torch.testing.assert_close(torch.tensor(graph.losses), torch.tensor(eager.losses), rtol=2e-2, atol=1e-3)
    assert max(float(u.abs().max()) for u in graph.adapter.ups.values()) > 1e-3  # it trained


def test_fp8_storage_trains_with_bf16_compute(gpu, tmp_path):
    _, cond, views, lomd = gpu
    model = _model()
    store_layerwise(model, torch.float8_e4m3fn, torch.bfloat16)
    backend = DiffusersBackend(model, DIMS, compute_dtype=torch.bfloat16)
    assert backend.dtype == torch.bfloat16 and not backend.capturable
    assert model.transformer_blocks[0].attn.to_q.weight.dtype == torch.float8_e4m3fn
    result = personalize(
        backend, lomd, views, cond, PersonalizeConfig(steps=6, warmup_steps=0, gradient_checkpointing=True)
    )
    assert len(result.losses) == 6 and all(torch.isfinite(torch.tensor(result.losses)))
    assert model.transformer_blocks[0].attn.to_q.weight.dtype == torch.float8_e4m3fn  # stored fp8 throughout
