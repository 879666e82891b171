"""Peak memory of LoMD distillation with 5 vs 50 LoRAs at FLUX.1 width: it must not grow with the count.

Writes N synthetic rank-16 LoRAs (bf16, kohya layout) at FLUX.1 width (hidden 3072, MLP 12288) covering
one double block (attn + MLP, 8 layers) and two single blocks (linear1/linear2) -- FLUX-wide layers, fewer
blocks, so 50 files fit on a small disk -- then runs ``distill_lomd`` over 5 and over 50 of them, each in
its own fresh process, and prints that process's peak RSS (``ru_maxrss``, which includes Python, torch and
the libraries). Both runs in one invocation, side by side. The last line is
``ratio peak_rss_50_over_5 <value>`` (1.0 = flat).

  python bench/distill_memory.py            # ~1 minute on 2 cores, ~300 MB of temporary files
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WIDTH = dict(hidden=3072, mlp_hidden=12288, depth=1, depth_single=2)


def _dims():
    from metalora_core.targets import FluxDims

    return FluxDims(
        WIDTH["hidden"], WIDTH["mlp_hidden"], WIDTH["depth"], WIDTH["depth_single"], 16, 4096, 768, True, 16
    )


def write_loras(folder: Path, count: int, rank: int) -> list[Path]:
    import torch

    from metalora_core.dev.synthetic_loras import random_fused_lora, write_lora

    g = torch.Generator().manual_seed(0)
    return [
        write_lora(folder / f"lora_{i:03d}.safetensors", random_fused_lora(_dims(), "attn_mlp", rank, g, 16.0),
                   "kohya", _dims(), dtype=torch.bfloat16)
        for i in range(count)
    ]  # fmt: skip


def child(paths: list[str]) -> None:
    """Distil in this process and print its peak RSS (MiB) and seconds."""
    import torch

    from metalora_core.lomd.distill import distill_lomd

    torch.set_num_threads(1)
    begun = time.perf_counter()
    report = distill_lomd(paths, _dims())
    seconds = time.perf_counter() - begun
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(json.dumps({"loras": len(report.used), "peak_mib": peak, "seconds": seconds}))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--few", type=int, default=5)
    p.add_argument("--many", type=int, default=50)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--child", nargs="*", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child is not None:
        child(args.child)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_loras(Path(tmp), args.many, args.rank)
        size = sum(p.stat().st_size for p in paths) / 2**20
        print(
            f"{args.many} LoRAs at FLUX width, rank {args.rank}, {size / args.many:.1f} MiB each ({size:.0f} MiB total)"
        )
        rows = {}
        for n in (args.few, args.many):
            cmd = [sys.executable, __file__, "--child", *map(str, paths[:n])]
            done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            if done.returncode != 0:
                raise SystemExit(done.stderr[-3000:])
            rows[n] = json.loads(done.stdout.strip().splitlines()[-1])
            print(f"{n:3d} LoRAs: peak RSS {rows[n]['peak_mib']:7.1f} MiB, {rows[n]['seconds']:6.1f} s")
    print(
        f"ratio peak_rss_{args.many}_over_{args.few} {rows[args.many]['peak_mib'] / rows[args.few]['peak_mib']:.3f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
