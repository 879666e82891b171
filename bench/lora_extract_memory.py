"""Peak memory of ``metalora lora extract`` at FLUX.1 width against checkpoint size (2 vs 8 blocks).

python bench/lora_extract_memory.py [--blocks 2 8] [--hidden 3072] [--rank 16] [--workdir DIR]

Writes, for each block count, a synthetic base / fine-tuned pair of BFL checkpoints (bf16, FLUX.1 widths,
blocks split evenly between double and single blocks; fine-tuned = base + a rank-8 change per layer,
streamed to disk one tensor at a time), then runs the extraction in a fresh process and reads that
process's peak resident memory (VmHWM). A baseline process that only imports the library and opens
both files gives the interpreter's own share. The table prints side by side from one run.
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

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from metalora_core.dev.tiny_flux import bfl_norm_keys, bfl_weight_shapes  # noqa: E402
from metalora_core.targets import FluxDims, resolve_targets  # noqa: E402

MB = 2**20


def _bf16_bytes(t: torch.Tensor) -> bytes:
    return t.to(torch.bfloat16).contiguous().view(torch.int16).numpy().tobytes()


def write_pair(folder: Path, dims: FluxDims, preset: str, seed: int = 0) -> tuple[Path, Path]:
    """Base and fine-tuned checkpoints written tensor by tensor (safetensors layout by hand: the whole
    model is never in memory, so the bench measures the extraction, not the writer)."""
    entries: list[tuple[str, tuple[int, ...], str]] = []
    for key, shape in bfl_weight_shapes(dims).items():
        entries += [(key, shape, "weight"), (key[: -len("weight")] + "bias", (shape[0],), "bias")]
    entries += [(key, (dims.head_dim,), "ones") for key in bfl_norm_keys(dims)]
    changed = {f"{t.name}.weight" for t in resolve_targets(dims, preset)}
    header, offset = {}, 0
    for key, shape, _ in entries:
        size = 2 * int(torch.tensor(shape).prod())
        header[key] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    paths = folder / "base.safetensors", folder / "tuned.safetensors"
    with open(paths[0], "wb") as fb, open(paths[1], "wb") as ft:
        for fh in (fb, ft):
            fh.write(len(raw).to_bytes(8, "little") + raw)
        for i, (key, shape, kind) in enumerate(entries):
            g = torch.Generator().manual_seed(seed * 100003 + i)
            if kind == "ones":
                t = torch.ones(shape)
            elif kind == "bias":
                t = 0.01 * torch.randn(shape, generator=g)
            else:
                t = torch.randn(shape, generator=g) / shape[1] ** 0.5
            fb.write(_bf16_bytes(t))
            if key in changed:
                up = 0.02 * torch.randn(shape[0], 8, generator=g)
                t = t + up @ torch.randn(8, shape[1], generator=g) / shape[1] ** 0.5
            ft.write(_bf16_bytes(t))
            del t
    return paths


def _vm_hwm() -> int:
    """This process's peak resident memory in bytes (``VmHWM``: per address space, so unlike ``ru_maxrss``
    it does not inherit the parent's peak across fork + exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def child(mode: str, base: str, tuned: str, out: str, rank: int, preset: str) -> None:
    from safetensors import safe_open

    from metalora_core.loras.tools import extract

    start = time.perf_counter()
    layers = 0
    if mode == "extract":
        layers = len(extract(base, tuned, out, rank=rank, preset=preset).layers)
    else:
        with safe_open(base, "pt") as a, safe_open(tuned, "pt") as b:
            len(list(a.keys())) + len(list(b.keys()))
    peak = _vm_hwm()
    print(json.dumps({"peak": peak, "seconds": time.perf_counter() - start, "layers": layers}))


def measure(mode: str, base: Path, tuned: Path, out: Path, rank: int, preset: str) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, str(base), str(tuned), str(out), str(rank), preset]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True, env={"OMP_NUM_THREADS": "2"})
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, nargs="+", default=[2, 8])
    parser.add_argument("--hidden", type=int, default=3072)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--preset", default="attn_mlp")
    parser.add_argument("--workdir", help="where to write the checkpoints (default: a temporary folder)")
    parser.add_argument("--child", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        mode, base, tuned, out, rank, preset = args.child
        child(mode, base, tuned, out, int(rank), preset)
        return
    rows = []
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        for blocks in args.blocks:
            dims = FluxDims(
                args.hidden, 4 * args.hidden, blocks // 2, blocks - blocks // 2, 16, 4096, 768, True, 16
            )
            folder = Path(tmp) / f"b{blocks}"
            folder.mkdir()
            base, tuned = write_pair(folder, dims, args.preset)
            largest = max(o * i for o, i in bfl_weight_shapes(dims).values()) * 4 / MB
            idle = measure("open", base, tuned, folder / "x", args.rank, args.preset)
            run = measure("extract", base, tuned, folder / "lora.safetensors", args.rank, args.preset)
            rows.append((blocks, base.stat().st_size / MB, largest, idle["peak"] / MB, run))
            base.unlink()
            tuned.unlink()
    print(f"extraction at width {args.hidden}, rank {args.rank}, preset {args.preset}, bf16 checkpoints")
    print(
        "| blocks | checkpoint MB (each) | largest layer fp32 MB | layers | peak RSS MB | peak - baseline MB | s |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for blocks, size, largest, idle, run in rows:
        peak = run["peak"] / MB
        print(
            f"| {blocks} | {size:.0f} | {largest:.0f} | {run['layers']} | {peak:.0f} | {peak - idle:.0f} | "
            f"{run['seconds']:.0f} |"
        )
    if len(rows) > 1:
        (b0, s0, _, i0, r0), (b1, s1, _, i1, r1) = rows[0], rows[-1]
        grow = (r1["peak"] / MB - i1) / (r0["peak"] / MB - i0)
        print(f"{b1} vs {b0} blocks: checkpoint x{s1 / s0:.2f}, extraction memory above baseline x{grow:.2f}")


if __name__ == "__main__":
    main()
