"""The pack's nodes on ComfyUI's own tiny Qwen-Image, in this process: Seeded LoMD, Train Identity, Apply,
and Export read back by ComfyUI's stock LoRA loader (kohya and diffusers keys) == Apply == merged weights.
"""

from __future__ import annotations

import sys
import types

import pytest
import torch

from metalora_core.adapter import AdapterShape
from metalora_core.errors import MetaLoRAError
from metalora_core.formats import IdentityAdapter, export_lora
from metalora_core.lomd.seeded import seeded_lomd
from metalora_core.targets import resolve_targets
from tests.comfyui.train.helpers import TRAIN_SETTINGS, load_qwen, random_identity
from tests.comfyui.train.test_node_inprocess import PatchVAE


class VideoPatchVAE(PatchVAE):
    """A video VAE as ComfyUI's Wan 2.1 (Qwen-Image's) behaves: ``latent_dim`` 3, and a batch of images is
    ONE clip whose frames compress four to one: (N, H, W, 3) -> (1, 16, 1 + (N - 1) // 4, H/8, W/8)."""

    latent_dim = 3

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        frames = super().encode(pixels)  # (N, 16, h, w)
        return frames[::4].movedim(0, 1).unsqueeze(0)


@pytest.fixture(scope="module")
def nodes(comfy, pack):
    pack("comfy_folders.model_folders").register_model_folders()  # as the pack's entry point does
    return types.SimpleNamespace(
        train=pack("train_identity").MetaLoRATrainIdentity,
        seeded=pack("lomd_sources").MetaLoRASeededLoMD,
        lomd_sources=pack("lomd_sources"),
        apply=pack("apply").apply_identity,
    )


@pytest.fixture
def server(monkeypatch):
    events = []
    module = types.ModuleType("server")
    module.PromptServer = types.SimpleNamespace(
        instance=types.SimpleNamespace(send_sync=lambda e, d: events.append((e, d)))
    )
    monkeypatch.setitem(sys.modules, "server", module)
    return events


@pytest.fixture(scope="module")
def qwen32(comfy):
    return load_qwen(comfy, torch.float32, seed=11)


def _dims(pack, patcher):
    return pack("comfy_training.families").model_dims(patcher)


# --- LoMD sources -----------------------------------------------------------------------------------------


def test_seeded_lomd_node_reads_the_qwen_models_layers(nodes, qwen32, pack):
    dims = _dims(pack, qwen32)
    with torch.inference_mode():
        lomd = nodes.seeded.execute(model=qwen32, rank_down=4, rank_mid=8, targets="attn_mlp", seed=3).args[0]
    expected = resolve_targets(dims, "attn_mlp")
    assert lomd.targets == [t.name for t in expected] and lomd.base_arch == "qwen_image"
    assert all(lomd.downs[t.name].shape == (4, t.in_features) for t in expected)
    assert lomd.targets[0] == "transformer_blocks.0.attn.to_q"
    assert lomd.fingerprint == seeded_lomd(dims, AdapterShape(4, 8), "attn_mlp", 3).fingerprint
    found, shapes = nodes.lomd_sources.model_targets(qwen32, "all_linear")
    assert found == dims and shapes["transformer_blocks.1.img_mod.1"] == (6 * 64, 64)


# --- Train Identity ---------------------------------------------------------------------------------------


def _inputs(lomd) -> dict:
    g = torch.Generator().manual_seed(3)
    with torch.inference_mode():  # as ComfyUI's nodes make them
        return {
            "vae": VideoPatchVAE(),
            "positive": [[torch.randn(1, 7, 48, generator=g), {"pooled_output": None}]],
            "image": torch.rand(1, 300, 220, 3, generator=g),
            "lomd": lomd,
        }


# more than 4 views: batched through a video VAE, they would become 2 frames of one clip
SETTINGS = {**TRAIN_SETTINGS, "views": 5}


def _train(node, model, lomd, steps=2, **overrides):
    with torch.inference_mode():  # how ComfyUI's executor calls every node
        return node.execute(model=model, **{**_inputs(lomd), **SETTINGS, "steps": steps, **overrides})


def test_train_identity_node_trains_on_qwen_image(comfy, nodes, qwen32, server, pack):
    dims = _dims(pack, qwen32)
    lomd = seeded_lomd(dims, AdapterShape(4, 8), "attn_mlp", seed=1)
    options = repr(qwen32.model_options)
    weights = {k: v.clone() for k, v in qwen32.model.state_dict().items()}
    adapter, losses = _train(nodes.train, qwen32, lomd, steps=3).args
    assert isinstance(adapter, IdentityAdapter) and adapter.base_arch == "qwen_image"
    assert adapter.targets == lomd.targets and adapter.training["steps_done"] == 3
    assert len(losses["loss"]) == 3 and all(torch.isfinite(torch.tensor(losses["loss"])))
    assert max(float(u.abs().max()) for u in adapter.ups.values()) > 0  # Up moved off zero
    assert [d["step"] for _, d in server] == [1, 2, 3]
    now = qwen32.model.state_dict()
    assert repr(qwen32.model_options) == options and all(torch.equal(now[k], v) for k, v in weights.items())
    assert not comfy.model_management.in_training


@pytest.mark.parametrize(
    "override, match",
    [
        (
            {"positive": [[torch.randn(1, 8, 4096), {"pooled_output": torch.randn(1, 768)}]]},
            "type qwen_image",
        ),
        ({"vae": PatchVAE()}, "vae input.*Qwen-Image VAE"),
    ],
)
def test_flux_inputs_on_qwen_image_are_named(nodes, qwen32, server, pack, override, match):
    lomd = seeded_lomd(_dims(pack, qwen32), AdapterShape(4, 8), "attn", seed=1)
    with pytest.raises(MetaLoRAError, match=match):
        _train(nodes.train, qwen32, lomd, **override)


def test_train_identity_node_is_personalize_on_the_models_latents(nodes, qwen32, server, pack):
    """The node == the library's ``personalize`` on each view encoded alone, normalised by the model's own
    ``process_latent_in`` (Qwen-Image: Wan 2.1's per-channel mean / std), frame axis dropped."""
    from metalora_core.training.personalize import PersonalizeConfig, personalize

    glue, families = pack("comfy_training.glue"), pack("comfy_training.families")
    lomd = seeded_lomd(_dims(pack, qwen32), AdapterShape(4, 8), "attn", seed=4)
    losses = _train(nodes.train, qwen32, lomd, steps=2).args[1]["loss"]
    inputs = _inputs(lomd)
    photo = (inputs["image"][0].clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    pixels, weights = glue.training_views(photo, 5, 256, True, 0.5, 0)
    with torch.no_grad():
        encoded = torch.cat([inputs["vae"].encode(pixels[i : i + 1]) for i in range(5)])
        views = list(qwen32.model.process_latent_in(encoded).squeeze(2))
    config = PersonalizeConfig(
        steps=2, lr=1e-3, lr_mid=1e-3, lr_up=1e-3, warmup_steps=0, gradient_checkpointing=True, seed=0
    )
    with torch.inference_mode(False), torch.enable_grad():
        backend = families.make_backend(qwen32)
        cond = glue.text_conditioning(inputs["positive"], backend.dims)
        with backend.session():
            expected = personalize(backend, lomd, views, cond, config, weights=weights).losses
    assert losses == pytest.approx(expected, rel=1e-6)


# --- Apply == merged weights == Export through ComfyUI's stock LoRA loader ---------------------------------


def _forward(patcher, seed=0):
    """The patched transformer's output on fixed inputs; weights patched for the call only."""
    dm = patcher.model.diffusion_model
    dtype = patcher.model.get_dtype_inference()
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 16, 1, 8, 6, generator=g).to(dtype)
    context = torch.randn(2, 5, 48, generator=g).to(dtype)
    t = torch.tensor([0.3, 0.8])
    with torch.inference_mode():
        patcher.patch_model()
        try:
            return dm(x, t, context).double()
        finally:
            patcher.unpatch_model()


def _stock_lora(comfy, model, path):
    """ComfyUI's LoraLoaderModelOnly path, with every LoRA key checked to land on a weight."""
    import comfy.lora
    import comfy.lora_convert
    import comfy.sd
    import comfy.utils

    sd = comfy.utils.load_torch_file(str(path))
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    loaded = comfy.lora.load_lora(comfy.lora_convert.convert_lora(dict(sd)), key_map)
    patched, _ = comfy.sd.load_lora_for_models(model, None, sd, 1.0, 0)
    return patched, set(loaded)


@pytest.mark.usefixtures("training_mode")  # ComfyUI's torch RoPE: its kernels have no float64
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_apply_equals_merged_weights_and_exported_loras(comfy, nodes, pack, tmp_path, dtype, capsys):
    model = load_qwen(comfy, dtype, seed=5)
    dims = _dims(pack, model)
    lomd = seeded_lomd(dims, AdapterShape(4, 8), "all_linear", seed=2)
    adapter = random_identity(lomd, dims, seed=3)
    with torch.inference_mode():
        applied = nodes.apply(model, lomd, adapter, 1.0)
    plain, out_apply = _forward(model), _forward(applied)
    assert torch.equal(_forward(model), plain)  # Apply's clone leaves the MODEL as it was
    assert (out_apply - plain).abs().max() > 1e-3

    reference = load_qwen(comfy, dtype, seed=5)  # the same weights, the deltas merged by hand in float64
    with torch.no_grad():
        for name in adapter.targets:
            layer = reference.model.diffusion_model.get_submodule(name)
            delta = adapter.ups[name].double() @ adapter.mids[name].double() @ lomd.downs[name].double()
            layer.weight = torch.nn.Parameter(
                (layer.weight.double() + adapter.shape.scale * delta).to(dtype), requires_grad=False
            )
    # ComfyUI computes every weight patch in float32 (``patch_weight_to_device``), float64 models too
    tol = 1e-6 if dtype == torch.float64 else 1e-5
    out_merged = _forward(reference)
    torch.testing.assert_close(out_apply, out_merged, rtol=tol, atol=tol)

    weights = {f"diffusion_model.{n}.weight" for n in adapter.targets}
    diffs = {"apply-vs-merged": float((out_apply - out_merged).abs().max())}
    for fmt in ("kohya", "diffusers"):
        path = export_lora(tmp_path / f"identity_{fmt}.safetensors", lomd, adapter, dims, fmt)
        lora_model, loaded = _stock_lora(comfy, model, path)
        assert loaded == weights, (fmt, sorted(weights - loaded)[:3], sorted(loaded - weights)[:3])
        out = _forward(lora_model)
        diffs[f"{fmt}-vs-apply"] = float((out - out_apply).abs().max())
        torch.testing.assert_close(out, out_apply, rtol=tol, atol=tol)
    with capsys.disabled():
        print(f"\n[qwen export vs Apply, {dtype}] max |diff|: {diffs}")
