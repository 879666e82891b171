"""Training-step benchmark: what does a Meta-LoRA step cost over the bare frozen-model floor?

CPU default (real FLUX width, a thin slice): hidden 3072, 24 heads, one double + one single block,
1024 image tokens (512 px) + 256 text tokens. One run times, per training step:

  (a) floor  frozen base forward + backward (activation gradients only; no trainable weights)
  (b) meta   Meta-LoRA bypass heads (rank_down 4, rank_mid 16, attn_mlp targets) + AdamW step
  (c) dense  the same adapter as a materialised delta-W weight wrapper, W + s*Up@Mid@Down per forward
             (how ComfyUI's native trainer patches weights) + AdamW step
  (d) lora   plain rank-16 LoRA via peft on the same layers + AdamW step

Variants run round-robin (one step of each per round) so load from other processes hits all alike;
times are medians over the rounds after warm-up; on the CPU the ratio uses process CPU seconds per step
(wall time on a shared machine swings with other processes' load), on CUDA synchronised wall time. Peak memory is per step, the largest over the rounds:
on CPU the peak process RSS above the RSS just before the step, sampled every 2 ms by a thread (psutil),
with glibc told to mmap every allocation >= 64 KiB so freed tensors leave RSS; on CUDA
``torch.cuda.max_memory_allocated`` above the allocation before the step. The base weights are in memory
before every step and not counted. The last line is ``ratio meta_over_floor <b/a>``.

  python bench/train_step.py                              # CPU, a few minutes on 2 cores
  python bench/train_step.py --device cuda --full         # full FLUX.1-dev size, random bf16 weights,
                                                          # 512 and 1024 px, with/without checkpointing
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from metalora_core.adapter import AdapterShape, BypassLinear, IdentityHead  # noqa: E402
from metalora_core.formats import LoMD  # noqa: E402
from metalora_core.inject import _parent, make_heads  # noqa: E402
from metalora_core.targets import FluxDims, diffusers_config_for, diffusers_pieces, resolve_targets  # noqa: E402
from metalora_core.training.diffusers_backend import image_ids  # noqa: E402
from metalora_core.training.lora_baseline import peft_lora  # noqa: E402


def build(dims: FluxDims, device: str, dtype: torch.dtype):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    with torch.device(device):
        model = FluxTransformer2DModel(**diffusers_config_for(dims)).to(dtype)
    return model.requires_grad_(False).eval()


def random_lomd(dims: FluxDims, shape: AdapterShape) -> LoMD:
    g = torch.Generator().manual_seed(1)
    downs = {
        t.name: torch.randn(shape.rank_down, t.in_features, generator=g) / t.in_features**0.5
        for t in resolve_targets(dims, "attn_mlp")
    }
    return LoMD(downs, shape, "flux", dims.hidden)


def inputs(dims: FluxDims, img_tokens: int, txt_tokens: int, device: str, dtype: torch.dtype) -> dict:
    side = int(round(img_tokens**0.5))
    g = torch.Generator().manual_seed(2)
    return {
        "hidden_states": torch.randn(1, side * side, dims.in_channels * 4, generator=g).to(device, dtype),
        "encoder_hidden_states": torch.randn(1, txt_tokens, dims.context_dim, generator=g).to(device, dtype),
        "pooled_projections": torch.randn(1, dims.vec_dim, generator=g).to(device, dtype),
        "timestep": torch.tensor([0.7], device=device, dtype=dtype),
        "guidance": torch.tensor([1.0], device=device, dtype=dtype),
        "img_ids": image_ids(2 * side, 2 * side, device, dtype),
        "txt_ids": torch.zeros(txt_tokens, 3, device=device, dtype=dtype),
        "return_dict": False,
    }


class DenseDelta(nn.Module):
    """``y = x (W + s * Up[rows] Mid Down)^T + b``: the adapter materialised as a dense weight per forward."""

    def __init__(self, base: nn.Linear, head: IdentityHead, rows: slice | None) -> None:
        super().__init__()
        self.base, self.head, self.rows = base, head, rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        up = self.head.up if self.rows is None else self.head.up[self.rows]
        delta = self.head.scale * (up @ (self.head.mid @ self.head.down))
        return F.linear(x, self.base.weight + delta.to(self.base.weight.dtype), self.base.bias)


class Slots:
    """Every variant's module for each adapted diffusers layer, built once; ``install`` swaps them in.

    Variants are timed round-robin (one step of each per round), so load from other processes on a
    shared machine hits all of them alike; swapping modules keeps each variant's weights and optimizer.
    """

    def __init__(self, model: nn.Module, modules: list[str]) -> None:
        self.model = model
        self.by_variant: dict[str, dict[str, nn.Module]] = {"a": {}}
        for name in modules:
            parent, child = _parent(model, name)
            self.by_variant["a"][name] = getattr(parent, child)

    def add(self, variant: str, make) -> None:
        self.by_variant[variant] = {name: make(name, base) for name, base in self.by_variant["a"].items()}

    def install(self, variant: str) -> None:
        for name, module in self.by_variant[variant].items():
            parent, child = _parent(self.model, name)
            setattr(parent, child, module)


def mmap_large_allocations() -> bool:
    """Make glibc serve every allocation >= 64 KiB by mmap and unmap it on free, so process RSS follows the
    live tensors (otherwise freed activations stay in the heap and later peaks hide in reused memory)."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(-3, 64 * 1024))  # M_MMAP_THRESHOLD
    except OSError:
        return False


class PeakMemory:
    """Peak memory above the level at ``start()``: CUDA allocator stats, or sampled process RSS on CPU."""

    def __init__(self, device: str) -> None:
        self.cuda = device.startswith("cuda")

    def start(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return
        import psutil

        self.proc = psutil.Process()
        self.base = self.peak = self.proc.memory_info().rss
        self.running = True

        def sample() -> None:
            while self.running:
                self.peak = max(self.peak, self.proc.memory_info().rss)
                time.sleep(0.002)

        self.thread = threading.Thread(target=sample, daemon=True)
        self.thread.start()

    def stop(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            return (torch.cuda.max_memory_allocated() - self.base) / 2**20
        self.running = False
        self.thread.join()
        return (self.peak - self.base) / 2**20


def one_step(model, feed, target, opt, with_input_grad: bool, device: str) -> tuple[float, float]:
    """One training step; returns (wall seconds, process CPU seconds)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0, c0 = time.perf_counter(), time.process_time()
    x = feed["hidden_states"].detach().requires_grad_(with_input_grad)
    out = model(**dict(feed, hidden_states=x))[0]
    F.mse_loss(out.float(), target.float()).backward()
    if opt is not None:
        opt.step()
        opt.zero_grad(set_to_none=True)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - t0, time.process_time() - c0


NAMES = {
    "a": "frozen base fwd+bwd (floor)",
    "b": "Meta-LoRA bypass step",
    "c": "materialised delta-W step",
    "d": "peft LoRA rank 16 step",
}


def run_config(dims, img_tokens, txt_tokens, device, dtype, warmup, iters, checkpointing, variants, label=""):
    model = build(dims, device, dtype)
    if checkpointing:
        model.enable_gradient_checkpointing()
    feed = inputs(dims, img_tokens, txt_tokens, device, dtype)
    x = feed["hidden_states"]
    target = torch.randn(x.shape, generator=torch.Generator().manual_seed(3)).to(x.device, x.dtype)
    lomd = random_lomd(dims, AdapterShape(4, 16))
    modules = [m for t in lomd.targets for m, _ in diffusers_pieces(t, dims)]
    slots = Slots(model, modules)
    opts: dict[str, torch.optim.Optimizer | None] = {"a": None}

    def heads():
        torch.manual_seed(4)
        hs = make_heads(dims, lomd, dtype=torch.float32, device=device)
        with torch.no_grad():
            for h in hs.values():
                h.up.normal_(0, 1e-3)
        return hs

    def adapter_slots(variant: str, cls) -> None:
        hs = heads()
        rows = {m: (k, r) for k in hs for m, r in diffusers_pieces(k.replace("__", "."), dims)}
        slots.add(variant, lambda name, base: cls(base, hs[rows[name][0]], rows[name][1]))
        opts[variant] = torch.optim.AdamW(hs.parameters(), lr=1e-4)

    if "b" in variants:
        adapter_slots("b", BypassLinear)
    if "c" in variants:
        adapter_slots("c", DenseDelta)
    with peft_lora(model, modules, 16, 16.0, 5) as params:
        peft_layers = {m: model.get_submodule(m) for m in modules}
        slots.by_variant["d"] = peft_layers
        opts["d"] = torch.optim.AdamW(list(params.values()), lr=1e-4)
        order = [v for v in "abcd" if v in variants]
        times: dict[str, list[float]] = {v: [] for v in order}
        cpu: dict[str, list[float]] = {v: [] for v in order}
        peaks: dict[str, float] = {v: 0.0 for v in order}
        for round_ in range(warmup + iters):
            for v in order:
                slots.install(v)
                meter = PeakMemory(device)
                meter.start()
                sec, cpu_sec = one_step(model, feed, target, opts[v], v == "a", device)
                peaks[v] = max(peaks[v], meter.stop())
                if round_ >= warmup:
                    times[v].append(sec)
                    cpu[v].append(cpu_sec)
                print(
                    f"  round {round_ + 1}/{warmup + iters} ({v}) {sec:.3f} s wall, {cpu_sec:.3f} s CPU",
                    file=sys.stderr,
                    flush=True,
                )
        slots.install("a")
    del model
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    # On the CPU the comparison uses process CPU time: on a shared machine wall time swings 2x with other
    # processes' load, CPU seconds far less. On CUDA it is wall time (synchronised).
    key_times = times if device.startswith("cuda") else cpu
    rows = {
        v: (NAMES[v], statistics.median(key_times[v]), peaks[v], statistics.median(times[v])) for v in order
    }
    clock = "wall" if device.startswith("cuda") else "CPU"
    print(
        f"\n{label}| variant | {clock} s/step (median) | wall s/step (median) | peak memory MiB | vs floor |"
    )
    print("|---|---|---|---|---|")
    floor = rows["a"][1] if "a" in rows else None
    for key, (name, sec, peak, wall) in rows.items():
        ratio = f"{sec / floor:.3f}" if floor else "-"
        print(f"| ({key}) {name} | {sec:.3f} | {wall:.3f} | {peak:.0f} | {ratio} |", flush=True)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument(
        "--full", action="store_true", help="FLUX.1-dev size (19 double + 38 single), bf16, 512 and 1024 px"
    )
    ap.add_argument("--hidden", type=int, default=3072)
    ap.add_argument("--image-tokens", type=int, default=1024)
    ap.add_argument("--text-tokens", type=int, default=256)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--variants", default="abcd")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args(argv)
    if args.device == "cpu" and not mmap_large_allocations():
        print("note: could not set glibc's mmap threshold; CPU peak memory may be under-reported")
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, device {args.device}, threads {torch.get_num_threads()}")
    if args.full:
        dims = FluxDims(3072, 12288, 19, 38, 64, 4096, 768, True, 64)
        results = {}
        for px, img_tokens in ((512, 1024), (1024, 4096)):
            for ckpt in (False, True):
                label = f"{px} px, checkpointing {'on' if ckpt else 'off'} "
                results[(px, ckpt)] = run_config(
                    dims,
                    img_tokens,
                    512,
                    args.device,
                    torch.bfloat16,
                    args.warmup,
                    args.iters,
                    ckpt,
                    args.variants,
                    label,
                )
        sec = results[(512, False)]["b"][1]
        print(f"\n375 Meta-LoRA steps at 512 px (no checkpointing): {375 * sec:.1f} s")
        rows = results[(512, False)]
    else:
        heads = args.hidden // 128
        dims = FluxDims(
            args.hidden,
            4 * args.hidden,
            1,
            1,
            64,
            4096 if args.hidden == 3072 else 64,
            768 if args.hidden == 3072 else 32,
            True,
            64,
        )
        print(
            f"hidden {dims.hidden}, {heads} heads, 1 double + 1 single block, {args.image_tokens} image + {args.text_tokens} text tokens, float32"
        )
        rows = run_config(
            dims,
            args.image_tokens,
            args.text_tokens,
            args.device,
            torch.float32,
            args.warmup,
            args.iters,
            False,
            args.variants,
        )
    if "a" in rows and "b" in rows:
        print(f"ratio meta_over_floor {rows['b'][1] / rows['a'][1]:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
