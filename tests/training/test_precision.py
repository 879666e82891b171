"""One way to pick precision (--dtype), fp8 storage through diffusers' layer-wise casting on the tiny FLUX,
and --checkpointing auto deciding from the memory a step needs and the memory that is free."""

from __future__ import annotations

import pytest
import torch

from metalora_core.errors import MetaLoRAError
from metalora_core.model_files import read_weight_dtype
from metalora_core.training.diffusers_backend import DiffusersBackend
from metalora_core.training.memory import decide_checkpointing, layerwise_copy_bytes
from metalora_core.training.personalize import PersonalizeConfig, personalize
from metalora_core.training.precision import Precision, choose_precision
from metalora_core.training.standalone import load_transformer

CPU, GPU = torch.device("cpu"), torch.device("cuda")
FP8 = torch.float8_e4m3fn


def test_auto_is_float32_on_the_cpu_and_never_float32_on_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert choose_precision("auto", CPU) == Precision(torch.float32, torch.float32)
    assert choose_precision("auto", GPU) == Precision(torch.bfloat16, torch.bfloat16)
    assert choose_precision("auto", GPU, torch.float32) == Precision(torch.bfloat16, torch.bfloat16)
    assert choose_precision("auto", GPU, FP8) == Precision(FP8, torch.bfloat16)  # an fp8 file stays fp8
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)  # pre-Ampere
    assert choose_precision("auto", GPU) == Precision(torch.float16, torch.float16)
    assert choose_precision("float8_e4m3fn", GPU) == Precision(FP8, torch.float16)


def test_explicit_dtypes_and_bf16_autocast_only_on_float32():
    assert choose_precision("float8_e4m3fn", CPU) == Precision(FP8, torch.bfloat16)
    assert choose_precision("float32", CPU, bf16_autocast=True) == Precision(
        torch.float32, torch.float32, True
    )
    with pytest.raises(
        MetaLoRAError, match=r"--bf16 autocasts a float32 model.*--dtype bfloat16.*drop --bf16"
    ):
        choose_precision("bfloat16", CPU, bf16_autocast=True)
    with pytest.raises(MetaLoRAError, match="one of auto, float32"):
        choose_precision("int4", CPU)


def test_the_file_dtype_is_read_from_headers(assets, tmp_path):
    from metalora_core.dev.tiny_flux import TINY_DIMS, write_tiny_flux

    assert read_weight_dtype(assets["bfl"]) == torch.float32
    assert read_weight_dtype(assets["diffusers"]) == torch.float32
    path = write_tiny_flux(tmp_path / "half.safetensors", "bfl", TINY_DIMS, seed=0)
    from safetensors.torch import load_file, save_file

    save_file({k: v.to(FP8) if v.ndim == 2 else v for k, v in load_file(path).items()}, path)
    assert read_weight_dtype(path) == FP8


def test_fp8_storage_keeps_linears_in_fp8_and_trains_on_the_rounded_weights(assets, lomd, views, cond):
    """fp8 storage is exactly the bf16 model with its linear weights rounded to fp8 (and trains)."""
    heard = []
    fp8, precision = load_transformer(
        assets["diffusers"], "float8_e4m3fn", CPU, say=heard.append
    )  # as the CLI loads
    assert precision == Precision(FP8, torch.bfloat16) and "float8_e4m3fn weights" in heard[0]
    model = fp8.model
    assert fp8.dtype == torch.bfloat16 and not fp8.capturable
    block = model.transformer_blocks[0]
    assert block.attn.to_q.weight.dtype == FP8 and block.norm1.linear.weight.dtype == FP8  # modulation too
    assert model.proj_out.weight.dtype == torch.bfloat16  # kept, with RoPE and the norms
    assert layerwise_copy_bytes(model, torch.bfloat16) == 2 * sum(
        p.numel() for m in model.modules() if getattr(m, "_diffusers_hook", None) is not None
        for p in m.parameters(recurse=False)
    )  # fmt: skip
    rounded = DiffusersBackend.from_path(assets["diffusers"], torch.bfloat16, "cpu")
    with torch.no_grad():
        for name, param in rounded.model.named_parameters():
            stored = dict(model.named_parameters())[name]
            if stored.dtype == FP8:
                param.copy_(stored.to(torch.bfloat16))
    cfg = PersonalizeConfig(steps=3, lr=3e-3, warmup_steps=0)
    got = personalize(fp8, lomd, views, cond, cfg)
    want = personalize(rounded, lomd, views, cond, cfg)
    assert got.losses == want.losses
    for name in want.adapter.ups:
        assert torch.equal(got.adapter.ups[name], want.adapter.ups[name])
    assert block.attn.to_q.weight.dtype == FP8  # still stored fp8 after training


@pytest.mark.parametrize(
    ("requested", "device", "free", "expect", "words"),
    [
        ("auto", "cpu", 0, False, "off (auto: on the CPU"),
        ("auto", "cuda", 100, False, "off (auto: a step needs ~0.0 GiB without it"),
        ("auto", "cuda", 20, True, "on (auto"),
        ("auto", "cuda", 5, True, "may not fit: lower --resolution or use --dtype float8_e4m3fn"),
        ("on", "cuda", 100, True, "on (as asked)"),
        ("off", "cuda", 5, False, "off (as asked)"),
    ],
)
def test_checkpointing_auto_follows_the_free_memory(requested, device, free, expect, words):
    need_without, need_with = 30 * 2**20, 8 * 2**20  # bytes; free is in MiB here
    on, why = decide_checkpointing(
        requested, torch.device(device), need_without, need_with, free_bytes=lambda d: free * 2**20
    )
    assert on is expect and words in why, why
