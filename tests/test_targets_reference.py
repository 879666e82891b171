"""The q/k/v (and mlp) row order of the target map against diffusers' own BFL -> diffusers converter, fast.

diffusers' converter hard-codes FLUX.1's width (``inner_dim = 3072``, MLP 4x) but never reads a column
count, so a "thin" checkpoint, FLUX.1's row counts with two columns per weight, goes through it in
milliseconds. Every element is distinct, so any permuted slice, swapped half or misplaced block shows.
The same table drives the sliced adapters (``attach_to_diffusers``) and the diffusers LoRA export; the
full-size comparison stays in tests/test_targets.py (slow).
"""

from __future__ import annotations

import torch

from metalora_core.targets import FluxDims, bfl_to_diffusers, diffusers_pieces, resolve_targets

# FLUX.1 at its real width; context and pooled widths are free for the converter, kept small here
REAL = FluxDims(3072, 12288, 2, 2, 16, 8, 8, True, 16)
COLS = 2


def _thin_bfl(dims: FluxDims) -> dict[str, torch.Tensor]:
    h = dims.hidden
    rows: dict[str, tuple[int, int]] = {
        "img_in.weight": (h, dims.in_channels * 4),
        "txt_in.weight": (h, dims.context_dim),
        "vector_in.in_layer.weight": (h, dims.vec_dim),
        "final_layer.linear.weight": (dims.out_channels * 4, COLS),
        "final_layer.adaLN_modulation.1.weight": (2 * h, COLS),
    }
    for name in ("time_in.in_layer", "time_in.out_layer", "vector_in.out_layer", "guidance_in.in_layer"):
        rows.setdefault(f"{name}.weight", (h, COLS))
    rows["guidance_in.out_layer.weight"] = (h, COLS)
    for target in resolve_targets(dims, "all_linear"):
        rows[f"{target.name}.weight"] = (target.out_features, COLS)
    sd, start = {}, 0.0

    def distinct(*shape: int) -> torch.Tensor:
        nonlocal start
        n = int(torch.Size(shape).numel())
        t = torch.arange(start, start + n, dtype=torch.float64).reshape(shape)
        start += n
        return t

    for key, shape in rows.items():
        sd[key] = distinct(*shape)
        sd[key[: -len("weight")] + "bias"] = distinct(shape[0])
    for i in range(dims.depth):
        for stream in ("img", "txt"):
            for norm in ("query_norm", "key_norm"):
                sd[f"double_blocks.{i}.{stream}_attn.norm.{norm}.scale"] = distinct(dims.head_dim)
    for i in range(dims.depth_single):
        for norm in ("query_norm", "key_norm"):
            sd[f"single_blocks.{i}.norm.{norm}.scale"] = distinct(dims.head_dim)
    return sd


def test_conversion_equals_diffusers_converter_element_for_element():
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    sd = _thin_bfl(REAL)
    ours = bfl_to_diffusers(sd)
    theirs = convert_flux_transformer_checkpoint_to_diffusers(
        {f"model.diffusion_model.{k}": v for k, v in sd.items()}
    )
    assert set(ours) == set(theirs)
    for key in sorted(ours):
        assert torch.equal(ours[key], theirs[key]), key


def test_every_sliced_piece_is_the_rows_diffusers_gives_that_module():
    """The table itself (used by adapters and exports, not only by the converter): piece ``module`` with
    row slice ``rows`` of a fused weight is exactly the weight diffusers' converter puts on ``module``."""
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    sd = _thin_bfl(REAL)
    theirs = convert_flux_transformer_checkpoint_to_diffusers(
        {f"model.diffusion_model.{k}": v for k, v in sd.items()}
    )
    fused = 0
    for target in resolve_targets(REAL, "all_linear"):
        pieces = diffusers_pieces(target.name, REAL)
        fused += len(pieces) > 1
        for module, rows in pieces:
            for suffix in ("weight", "bias"):
                mine = sd[f"{target.name}.{suffix}"]
                mine = mine if rows is None else mine[rows]
                assert torch.equal(mine, theirs[f"{module}.{suffix}"]), (target.name, module, suffix)
    assert fused == 2 * REAL.depth + REAL.depth_single  # img/txt qkv per double block, linear1 per single
