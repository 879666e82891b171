"""The FLUX target map: presets, exact diffusers / kohya mappings, and whole state-dict conversion."""

from __future__ import annotations

import pytest
import torch

from metalora_core.dev.tiny_flux import TINY_DIMS, random_bfl_state_dict, tiny_dims
from metalora_core.errors import MetaLoRAError
from metalora_core.targets import (
    FluxDims,
    bfl_to_diffusers,
    canonical_from_diffusers,
    canonical_from_kohya,
    diffusers_pieces,
    diffusers_to_bfl,
    dims_from_bfl,
    dims_from_diffusers,
    kohya_name,
    resolve_targets,
)


def test_presets_cover_the_documented_layers():
    attn = {t.name for t in resolve_targets(TINY_DIMS, "attn")}
    default = {t.name for t in resolve_targets(TINY_DIMS, "attn_mlp")}
    every = {t.name for t in resolve_targets(TINY_DIMS, "all_linear")}
    assert "double_blocks.1.img_attn.qkv" in attn and "single_blocks.1.linear2" in attn
    assert "double_blocks.0.txt_mlp.2" not in attn and "double_blocks.0.txt_mlp.2" in default
    assert "single_blocks.0.modulation.lin" in every - default
    assert attn < default < every
    # 2 double blocks x 8 + 2 single x 2 layers; + 2 x 2 + 2 x 1 modulation
    assert len(default) == 20 and len(every) == 26


def test_shapes_come_from_the_model_not_constants():
    dims = tiny_dims(hidden=256, depth=1, depth_single=1)
    by_name = {t.name: (t.out_features, t.in_features) for t in resolve_targets(dims, "all_linear")}
    assert by_name["double_blocks.0.img_attn.qkv"] == (768, 256)
    assert by_name["single_blocks.0.linear1"] == (3 * 256 + 1024, 256)
    assert by_name["single_blocks.0.linear2"] == (256, 256 + 1024)
    assert by_name["double_blocks.0.img_mod.lin"] == (6 * 256, 256)


def test_explicit_targets_and_patterns():
    names = [
        t.name
        for t in resolve_targets(TINY_DIMS, [r"single_blocks\.\d+\.linear1", "double_blocks.0.img_attn.qkv"])
    ]
    assert names == ["single_blocks.0.linear1", "single_blocks.1.linear1", "double_blocks.0.img_attn.qkv"]
    with pytest.raises(MetaLoRAError, match="to_qq"):
        resolve_targets(TINY_DIMS, ["double_blocks.0.attn.to_qq"])


def test_diffusers_pieces_tile_the_fused_rows():
    for target in resolve_targets(TINY_DIMS, "all_linear"):
        pieces = diffusers_pieces(target.name, TINY_DIMS)
        if len(pieces) == 1:
            assert pieces[0][1] is None
            continue
        rows = [r for _, r in pieces]
        assert rows[0].start == 0 and rows[-1].stop == target.out_features
        assert all(a.stop == b.start for a, b in zip(rows, rows[1:]))
        for index, (module, _) in enumerate(pieces):
            assert canonical_from_diffusers(module) == (target.name, index)
    assert [m for m, _ in diffusers_pieces("single_blocks.3.linear1", TINY_DIMS)] == [
        "single_transformer_blocks.3.attn.to_q",
        "single_transformer_blocks.3.attn.to_k",
        "single_transformer_blocks.3.attn.to_v",
        "single_transformer_blocks.3.proj_mlp",
    ]


def test_kohya_names_follow_comfyui_key_rule():
    # ComfyUI maps "lora_unet_" + key[len("diffusion_model."):-len(".weight")].replace(".", "_") to each weight
    for target in resolve_targets(TINY_DIMS, "all_linear"):
        comfy_key = f"diffusion_model.{target.name}.weight"
        expected = "lora_unet_" + comfy_key[len("diffusion_model.") : -len(".weight")].replace(".", "_")
        assert kohya_name(target.name) == expected
        assert canonical_from_kohya(expected) == target.name
    assert kohya_name("double_blocks.0.img_attn.qkv") == "lora_unet_double_blocks_0_img_attn_qkv"
    assert canonical_from_kohya("lora_unet_double_blocks_0_img_attn_bogus") is None


def test_bfl_diffusers_round_trip_is_exact():
    sd = random_bfl_state_dict(TINY_DIMS, seed=3)
    diff = bfl_to_diffusers(sd)
    assert dims_from_diffusers(diff) == dims_from_bfl(sd) == TINY_DIMS
    back = diffusers_to_bfl(diff)
    assert set(back) == set(sd)
    for key in sd:
        assert torch.equal(back[key], sd[key]), key


def test_conversion_matches_a_diffusers_model_state_dict():
    from diffusers import FluxTransformer2DModel

    from metalora_core.targets import diffusers_config_for

    model = FluxTransformer2DModel(**diffusers_config_for(TINY_DIMS))
    diff = bfl_to_diffusers(random_bfl_state_dict(TINY_DIMS))
    expected = model.state_dict()
    assert set(diff) == set(expected)
    assert all(diff[k].shape == expected[k].shape for k in diff)


def test_unknown_and_missing_keys_are_named():
    sd = random_bfl_state_dict(TINY_DIMS)
    sd["double_blocks.0.extra.weight"] = torch.zeros(1)
    with pytest.raises(MetaLoRAError, match="double_blocks.0.extra.weight"):
        bfl_to_diffusers(sd, "ckpt.safetensors")
    sd = random_bfl_state_dict(TINY_DIMS)
    del sd["single_blocks.1.linear2.bias"]
    with pytest.raises(MetaLoRAError, match="single_blocks.1.linear2.bias"):
        bfl_to_diffusers(sd, "ckpt.safetensors")


@pytest.mark.slow
def test_matches_diffusers_single_file_converter_at_real_width():
    """diffusers' own converter hard-codes FLUX.1's width (3072); ours reads it from the tensors. Compare at 3072."""
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    dims = FluxDims(3072, 12288, 1, 1, 16, 4096, 768, True, 16)
    sd = random_bfl_state_dict(dims, seed=0, dtype=torch.bfloat16)
    ours = bfl_to_diffusers(sd)
    theirs = convert_flux_transformer_checkpoint_to_diffusers(
        {"model.diffusion_model." + k: v for k, v in sd.items()}
    )
    assert set(ours) == set(theirs)
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key
