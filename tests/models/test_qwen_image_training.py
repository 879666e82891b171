"""Qwen-Image through the shared training code: exact gradients, exact bypass, LoRA export read back by
diffusers' own Qwen-Image LoRA loader, and the CLI end to end (seeded LoMD, personalize, export, distill,
meta-train) on the tiny model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from metalora_core.adapter import AdapterShape
from metalora_core.cli.main import main
from metalora_core.dev.tiny_qwen_image import TINY_QWEN_DIMS, tiny_qwen_image
from metalora_core.formats import IdentityAdapter, export_lora, fold_identity, load_identity, load_lomd
from metalora_core.inject import attached, heads_to_adapter, make_heads
from metalora_core.lomd.seeded import seeded_lomd
from metalora_core.loras.read import read_lora
from metalora_core.training.diffusers_backend import DiffusersBackend
from metalora_core.training.objective import flow_loss
from tests.gradcheck import assert_head_gradients_match

X_HW = (8, 6)


def _latents(seed: int, batch: int = 1, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(batch, 16, *X_HW, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _random_identity(lomd, seed: int, up_std: float = 0.05) -> IdentityAdapter:
    heads = make_heads(TINY_QWEN_DIMS, lomd)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for head in heads.values():
            head.mid.copy_(torch.randn(head.mid.shape, generator=g))
            head.up.copy_(up_std * torch.randn(head.up.shape, generator=g))
    return heads_to_adapter(heads, lomd, TINY_QWEN_DIMS)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_mid_up_gradients_match_finite_differences(qwen_backend64, qwen_cond, qwen_float64, checkpointing):
    lomd = seeded_lomd(TINY_QWEN_DIMS, AdapterShape(4, 8), "all_linear", seed=1)
    heads = make_heads(TINY_QWEN_DIMS, lomd, dtype=torch.float64)
    torch.manual_seed(3)
    with torch.no_grad():
        for head in heads.values():
            head.up.normal_(0.0, 0.05)
    cond = type(qwen_cond)(qwen_cond.context.double())
    x0, noise = _latents(1, dtype=torch.float64), _latents(2, dtype=torch.float64)
    t = torch.tensor([0.63], dtype=torch.float64)
    qwen_backend64.set_gradient_checkpointing(checkpointing)
    try:
        with qwen_backend64.adapters(heads):
            assert qwen_backend64.model.gradient_checkpointing is checkpointing
            loss = lambda: flow_loss(qwen_backend64, x0, cond, t, noise, guidance=None)  # noqa: E731
            errors = assert_head_gradients_match(loss, heads, f"Qwen-Image, checkpointing={checkpointing}")
            print(f"Qwen-Image finite differences, checkpointing={checkpointing}: {errors}")
    finally:
        qwen_backend64.set_gradient_checkpointing(False)


def test_bypass_equals_the_delta_merged_into_the_weights(qwen_files, qwen_cond):
    """Every head on its own module (no slicing in Qwen-Image): the bypass model equals a model whose
    weights hold ``W + delta`` (float64, exact up to rounding)."""
    lomd = seeded_lomd(TINY_QWEN_DIMS, AdapterShape(4, 8), "all_linear", seed=0)
    adapter = _random_identity(lomd, seed=4, up_std=0.2)
    model = tiny_qwen_image(TINY_QWEN_DIMS, seed=0).double()
    backend = DiffusersBackend(model, TINY_QWEN_DIMS)
    x, t = _latents(5, 2, torch.float64), torch.tensor([0.3, 0.8], dtype=torch.float64)
    cond = type(qwen_cond)(qwen_cond.context.double())
    with torch.no_grad():
        with attached(model, TINY_QWEN_DIMS, lomd, adapter, dtype=torch.float64):
            bypass = backend.velocity(x, t, cond, None)
        plain = backend.velocity(x, t, cond, None)
        for name, (up, down) in fold_identity(lomd, adapter).items():
            model.get_submodule(name).weight += up @ down
        merged = backend.velocity(x, t, cond, None)
    assert float((bypass - plain).abs().max()) > 1e-3  # the identity changes the output
    torch.testing.assert_close(bypass, merged, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
def test_export_read_by_diffusers_lora_loader_equals_the_bypass(tmp_path, qwen_cond, fmt):
    """The exported LoRA, loaded into ``QwenImageTransformer2DModel`` by diffusers' own Qwen-Image LoRA
    loader (``QwenImagePipeline.lora_state_dict`` + ``load_lora_adapter``), gives the bypass's output."""
    from diffusers import QwenImagePipeline

    lomd = seeded_lomd(TINY_QWEN_DIMS, AdapterShape(4, 8), "attn_mlp", seed=0)
    adapter = _random_identity(lomd, seed=6, up_std=0.2)
    path = export_lora(tmp_path / f"me_{fmt}.safetensors", lomd, adapter, TINY_QWEN_DIMS, fmt)
    ours = {layer.name: layer.delta() for layer in read_lora(path, TINY_QWEN_DIMS).values()}
    for name, (up, down) in fold_identity(lomd, adapter).items():
        torch.testing.assert_close(ours[name].double(), up @ down, rtol=1e-5, atol=1e-6)
    model = tiny_qwen_image(TINY_QWEN_DIMS, seed=0)
    backend = DiffusersBackend(model, TINY_QWEN_DIMS)
    x, t = _latents(7, 1), torch.tensor([0.55])
    with torch.no_grad(), attached(model, TINY_QWEN_DIMS, lomd, adapter):
        bypass = backend.velocity(x, t, qwen_cond, None)
    state = QwenImagePipeline.lora_state_dict(str(path))
    model.load_lora_adapter(state, adapter_name="identity", prefix="transformer")
    with torch.no_grad():
        loaded = backend.velocity(x, t, qwen_cond, None)
    diff = float((loaded - bypass).abs().max())
    assert diff < 1e-5, f"diffusers-loaded {fmt} LoRA differs from the bypass by {diff}"


def _photo(path, seed=0, hw=(80, 64)):
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (*hw, 3), dtype=np.uint8)).save(path)
    return path


def test_cli_seeded_personalize_export_distill_and_meta_train(qwen_files, tmp_path, capsys):
    model, vae = str(qwen_files["file"]), str(qwen_files["vae"])
    assert main(["inspect", model]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["kind"] == "qwen_image" and summary["blocks"] == TINY_QWEN_DIMS.depth
    lomd_path, cond = tmp_path / "lomd.safetensors", tmp_path / "cond.safetensors"
    assert main(["lomd", "seeded", "--model", model, "--out", str(lomd_path), "--rank", "4"]) == 0
    lomd = load_lomd(lomd_path)
    assert lomd.base_arch == "qwen_image" and "transformer_blocks.0.attn.to_q" in lomd.targets
    assert main(["dev", "random-conditioning", "--model", model, "--out", str(cond)]) == 0
    out = tmp_path / "me.safetensors"
    common = ["--vae", vae, "--conditioning", str(cond), "--resolution", "64", "--views", "2", "--quiet"]
    args = [
        "personalize",
        "--model",
        model,
        "--lomd",
        str(lomd_path),
        "--image",
        str(_photo(tmp_path / "p.png")),
    ]
    capsys.readouterr()
    assert main([*args, *common, "--out", str(out), "--steps", "3", "--rank-mid", "4"]) == 0
    identity = load_identity(out)
    assert identity.base_arch == "qwen_image" and set(identity.targets) == set(lomd.targets)
    assert any(float(u.abs().max()) > 0 for u in identity.ups.values())  # it trained
    loras = tmp_path / "loras"
    for fmt in ("kohya", "diffusers"):
        dest = loras / f"me_{fmt}.safetensors"
        assert (
            main(
                [
                    "export",
                    "--lomd",
                    str(lomd_path),
                    "--adapter",
                    str(out),
                    "--format",
                    fmt,
                    "--out",
                    str(dest),
                ]
            )
            == 0
        )
        assert read_lora(dest, TINY_QWEN_DIMS)  # placed on Qwen-Image layers, shapes checked
    distilled = tmp_path / "distilled.safetensors"
    assert (
        main(["lomd", "distill", "--loras", str(loras), "--model", model, "--out", str(distilled), "--quiet"])
        == 0
    )
    assert load_lomd(distilled).base_arch == "qwen_image"
    data = tmp_path / "ids"
    assert (
        main(["dev", "synthetic-identities", "--out", str(data), "--identities", "2", "--images", "2"]) == 0
    )
    meta = tmp_path / "meta.safetensors"
    code = main(
        ["meta-train", "--flux", model, "--vae", vae, "--conditioning", str(cond), "--data", str(data)]
        + [
            "--out",
            str(meta),
            "--resolution",
            "64",
            "--max-aspect-error",
            "0.5",
            "--identities-per-batch",
            "2",
        ]
        + ["--steps", "2", "--rank-mid", "4", "--quiet"]
    )
    assert code == 0
    assert load_lomd(meta).base_arch == "qwen_image"
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary


def test_a_flux_lomd_on_qwen_image_names_both_families(qwen_files, assets, tmp_path):
    from metalora_core.errors import MetaLoRAError

    with pytest.raises(MetaLoRAError, match="is for FLUX.1, but the model is a Qwen-Image model"):
        make_heads(TINY_QWEN_DIMS, load_lomd(assets["lomd"]))


def test_personalize_on_a_qwen_image_pipeline_folder_encodes_its_own_caption(tmp_path, capsys):
    """A Qwen-Image pipeline folder (transformer/, vae/, Qwen2.5-VL text_encoder/, tokenizer/): no --vae and
    no --conditioning needed; encode-caption writes the same features QwenImagePipeline.encode_prompt makes."""
    from diffusers import QwenImagePipeline
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    from metalora_core.dev.tiny_qwen_image import write_tiny_qwen_pipeline
    from metalora_core.safeio import load_tensors

    folder = write_tiny_qwen_pipeline(tmp_path / "qwen_pipeline")
    lomd = tmp_path / "lomd.safetensors"
    assert main(["lomd", "seeded", "--model", str(folder), "--out", str(lomd)]) == 0
    out = tmp_path / "me.safetensors"
    args = [
        "personalize",
        "--model",
        str(folder),
        "--lomd",
        str(lomd),
        "--image",
        str(_photo(tmp_path / "p.png")),
    ]
    assert (
        main([*args, "--out", str(out), "--steps", "2", "--resolution", "64", "--views", "2", "--quiet"]) == 0
    )
    assert load_identity(out).base_arch == "qwen_image"
    feats = tmp_path / "cond.safetensors"
    assert (
        main(["encode-caption", "--text-encoders", str(folder), "--trigger", "zkx", "--out", str(feats)]) == 0
    )
    tensors, _ = load_tensors(feats)
    pipe = QwenImagePipeline(
        None,
        None,
        Qwen2_5_VLForConditionalGeneration.from_pretrained(str(folder / "text_encoder")),
        AutoTokenizer.from_pretrained(str(folder / "tokenizer")),
        None,
    )
    with torch.no_grad():
        embeds, _ = pipe.encode_prompt("photo of zkx person", device=torch.device("cpu"))
    assert "pooled" not in tensors
    torch.testing.assert_close(tensors["context"], embeds[0].float())


def test_lora_extract_of_a_qwen_image_fine_tune_recovers_the_change(qwen_files, tmp_path):
    """``metalora lora extract`` on two Qwen-Image files: a rank-2 change of two layers comes back exactly,
    under Qwen-Image's names, and every other layer is reported unchanged."""
    from metalora_core.safeio import load_tensors, save_tensors

    tensors, _ = load_tensors(qwen_files["file"])
    g = torch.Generator().manual_seed(9)
    planted = {}
    for name in ("transformer_blocks.0.attn.to_q", "transformer_blocks.1.img_mlp.net.2"):
        w = tensors[f"{name}.weight"]
        planted[name] = (
            torch.randn(w.shape[0], 2, generator=g) @ torch.randn(2, w.shape[1], generator=g) * 0.1
        )
        tensors[f"{name}.weight"] = w + planted[name]
    tuned = save_tensors(tmp_path / "tuned.safetensors", tensors, {})
    out = tmp_path / "extracted.safetensors"
    assert (
        main(["lora", "extract", str(qwen_files["file"]), str(tuned), "--rank", "4", "--out", str(out)]) == 0
    )
    layers = read_lora(out, TINY_QWEN_DIMS)
    assert set(layers) == set(planted)
    for name, delta in planted.items():
        torch.testing.assert_close(layers[name].delta(), delta, rtol=1e-4, atol=1e-5)


def test_the_demo_says_it_runs_flux_when_given_qwen_image(qwen_files, tmp_path, capsys):
    code = main(
        [
            "demo",
            "--flux",
            str(qwen_files["file"]),
            "--vae",
            str(qwen_files["vae"]),
            "--lomd",
            str(qwen_files["lomd"]),
        ]
        + ["--image", str(_photo(tmp_path / "p.png")), "--out", str(tmp_path / "demo")]
    )
    assert code == 2
    assert "metalora demo runs FLUX.1; this is Qwen-Image" in capsys.readouterr().err


def test_files_without_metadata_are_placed_by_the_layers_only_qwen_image_has(tmp_path):
    """A Qwen-Image LoRA stripped of its metadata, read with no model given, and a LoMD in diffusers naming
    with no ``base_arch``: the keys only Qwen-Image has (``img_mlp.net.*``) decide the family."""
    from metalora_core.formats import lomd_from_tensors
    from metalora_core.loras.read import scan_lora
    from metalora_core.safeio import load_tensors, save_tensors

    lomd = seeded_lomd(TINY_QWEN_DIMS, AdapterShape(4, 8), "attn_mlp", seed=0)
    exported = export_lora(tmp_path / "me.safetensors", lomd, _random_identity(lomd, 3), TINY_QWEN_DIMS)
    tensors, _ = load_tensors(exported)
    bare = save_tensors(tmp_path / "bare.safetensors", tensors, {})
    assert scan_lora(bare).family == "qwen_image"
    downs = {f"transformer.{name}.lora_A.weight": down for name, down in lomd.downs.items()}
    assert lomd_from_tensors(downs, {}, "downs.safetensors").base_arch == "qwen_image"


def test_a_flux_vae_with_qwen_image_is_refused_before_anything_is_encoded(qwen_files, tmp_path, capsys):
    from metalora_core.dev.tiny_vae import write_tiny_vae

    flux_vae = write_tiny_vae(tmp_path / "flux_vae")
    cond = tmp_path / "cond.safetensors"
    assert main(["dev", "random-conditioning", "--model", str(qwen_files["file"]), "--out", str(cond)]) == 0
    capsys.readouterr()
    args = ["personalize", "--model", str(qwen_files["file"]), "--lomd", str(qwen_files["lomd"])]
    args += ["--image", str(_photo(tmp_path / "p.png")), "--vae", str(flux_vae), "--conditioning", str(cond)]
    assert main([*args, "--out", str(tmp_path / "me.safetensors"), "--resolution", "64", "--quiet"]) == 2
    assert "is a FLUX.1 VAE but the transformer is Qwen-Image" in capsys.readouterr().err
    assert not (tmp_path / "me.safetensors").exists()
