"""Print file sizes of a LoMD, an identity and its folded LoRA for FLUX.1-dev's real shapes (no weights needed),
and the memory FLUX.1-dev's weights hold under each training precision (built on the meta device).

python bench/sizes.py [--rank-down 4] [--rank-mid 16]
"""

from __future__ import annotations

import argparse

from metalora_core.targets import PRESETS, FluxDims, resolve_targets

FLUX1_DEV = FluxDims(3072, 12288, 19, 38, 16, 4096, 768, True, 16)
MB = 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank-down", type=int, default=4)
    parser.add_argument("--rank-mid", type=int, default=16)
    args = parser.parse_args()
    r_d, r_m = args.rank_down, args.rank_mid
    print(
        "| preset | targets | LoMD fp32 MB | identity fp32 MB | folded LoRA bf16 / fp32 MB | rank-16 LoRA bf16 MB |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    for preset in PRESETS:
        targets = resolve_targets(FLUX1_DEV, preset)
        lomd = sum(r_d * t.in_features for t in targets)
        identity = sum(r_m * r_d + r_m * t.out_features for t in targets)
        folded = sum(r_d * (t.in_features + t.out_features) for t in targets)
        lora16 = sum(16 * (t.in_features + t.out_features) for t in targets)
        print(
            f"| {preset} | {len(targets)} | {4 * lomd / MB:.1f} | {4 * identity / MB:.1f} | "
            f"{2 * folded / MB:.1f} / {4 * folded / MB:.1f} | {2 * lora16 / MB:.1f} |"
        )


def resident_weights() -> None:
    """GiB of FLUX.1-dev's transformer weights in memory under each ``--dtype`` (exact, from the shapes)."""
    import torch
    from diffusers import FluxTransformer2DModel

    from metalora_core.targets import diffusers_config_for
    from metalora_core.training.precision import store_layerwise

    def gib(prepare) -> float:
        with torch.device("meta"):
            model = FluxTransformer2DModel(**diffusers_config_for(FLUX1_DEV)).to(torch.bfloat16)
        prepare(model)
        return sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30

    fp8 = torch.float8_e4m3fn
    rows = [
        ("bfloat16", lambda m: None),
        (
            "float8_e4m3fn, diffusers' default (modulation kept bf16)",
            lambda m: m.enable_layerwise_casting(storage_dtype=fp8, compute_dtype=torch.bfloat16),
        ),
        ("float8_e4m3fn, this pack (every linear fp8)", lambda m: store_layerwise(m, fp8, torch.bfloat16)),
    ]
    print("\n| FLUX.1-dev weights | GiB in memory |")
    print("| --- | --- |")
    for name, prepare in rows:
        print(f"| {name} | {gib(prepare):.2f} |")


if __name__ == "__main__":
    main()
    resident_weights()
