"""Print file sizes of a LoMD, an identity and its folded LoRA for FLUX.1-dev's real shapes (no weights needed).

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


if __name__ == "__main__":
    main()
