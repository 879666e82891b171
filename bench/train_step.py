"""Training-step benchmark: what does a Meta-LoRA step cost over the bare frozen-model floor?

CPU default (real FLUX width, a thin slice): hidden 3072, 24 heads, one double + one single block,
1024 image tokens (512 px) + 256 text tokens. One run times, per training step:

  (a) floor  frozen base forward + backward (activation gradients only; no trainable weights)
  (b) meta   Meta-LoRA heads (rank_down 4, rank_mid 16, attn_mlp targets) through the trainer's own step
             (metalora_core.training.step.TrainStep: fused AdamW, device-side guard, no host reads)
  (c) dense  the same adapter as a materialised delta-W weight wrapper, W + s*Up@Mid@Down per forward
             (how ComfyUI's native trainer patches weights), same step
  (d) lora   plain rank-16 LoRA via peft on the same layers, same step
  (e) graph  (b) captured once as a CUDA graph and replayed, as the trainer does on a GPU (CUDA only)

Every variant goes through the trainer's backend (packing, ids, attention restricted to flash /
memory-efficient / math) on the same latents, timestep and noise. Variants run round-robin (one step of
each per round) so load from other processes hits all alike; times are medians over the rounds after
warm-up. On the CPU the ratio uses process CPU seconds per step (wall time on a shared machine swings with
other processes' load), on CUDA synchronised wall time. Peak memory is per step, the largest over the
rounds: on CPU the peak process RSS above the RSS just before the step, sampled every 2 ms by a thread
(psutil), with glibc told to mmap every allocation >= 64 KiB so freed tensors leave RSS; on CUDA
``torch.cuda.max_memory_allocated`` above the allocation before the step. The last line is
``ratio meta_over_floor <b/a>`` (``graph_over_floor`` before it on CUDA).

  python bench/train_step.py                              # CPU, a few minutes on 2 cores
  python bench/train_step.py --proxy                      # CPU proxies of GPU host cost (see below)
  python bench/train_step.py --device cuda --full         # full FLUX.1-dev size, random bf16 weights,
                                                          # 512 and 1024 px, with/without checkpointing
  python bench/train_step.py --device cuda --full --profile --full-px 512    # + where the time goes

``--proxy``: full FLUX depth (19 double + 38 single blocks) at width 128 with 16 image + 8 text tokens,
float32, one thread. Arithmetic is then negligible and a step costs what the host spends launching it,
which is what bounds a GPU step when kernels are small. It reports top-level aten ops per step (ops the
host dispatches, not counting ops nested inside other ops) and host seconds per step, and ends with
``ratio ops_meta_over_floor`` and ``ratio host_meta_over_floor``.

``--family qwen_image``: the same comparison on Qwen-Image (``QwenImageTransformer2DModel``) at its real
width (hidden 3072, 24 heads of 128, MLP 12288, 3584-wide Qwen2.5-VL text) on a thin slice of ``--depth``
blocks (default 2: the last block's text-stream layers get no gradient, so presets skip them there; with two
blocks the first carries every attn_mlp layer). CPU defaults are 64 image + 16 text tokens. Adapter targets,
heads and peft's layers come from the family-blind API (``resolve_targets``, ``make_heads``,
``diffusers_pieces``); the table's label and the ratio line name the family
(``ratio qwen_image_meta_over_floor``). ``--full`` and ``--proxy`` are FLUX-only.

  python bench/train_step.py --family qwen_image --threads 1     # CPU, a few minutes on 2 cores

``--profile``: ``torch.profiler`` over one step per variant after the timing: host time, device time
(CUDA kernel time), aten ops, and the top kernels (CUDA) or ops (CPU) by self time.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import threading
import time
from collections import Counter
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from metalora_core.adapter import AdapterShape, IdentityHead  # noqa: E402
from metalora_core.formats import LoMD  # noqa: E402
from metalora_core.inject import _parent, attach_to_diffusers, detach_heads, make_heads  # noqa: E402
from metalora_core.models import family_of  # noqa: E402
from metalora_core.targets import (  # noqa: E402
    FluxDims,
    QwenImageDims,
    diffusers_config_for,
    diffusers_pieces,
    resolve_targets,
)
from metalora_core.training.diffusers_backend import DiffusersBackend  # noqa: E402
from metalora_core.training.lora_baseline import peft_lora  # noqa: E402
from metalora_core.training.objective import flow_loss  # noqa: E402
from metalora_core.training.protocol import TextConditioning  # noqa: E402
from metalora_core.training.step import CapturedStep, TrainStep  # noqa: E402


def build(dims, device: str, dtype: torch.dtype):
    """The family's diffusers transformer (``FluxTransformer2DModel``, ``QwenImageTransformer2DModel``) of
    these sizes, diffusers' own random initialisation under seed 0, frozen."""
    model_class = family_of(dims).diffusers_class()

    torch.manual_seed(0)
    with torch.device(device):
        model = model_class(**diffusers_config_for(dims))
    if dtype != torch.float32:  # (diffusers builds in float32; Qwen-Image warns on a no-op cast)
        model = model.to(dtype)
    return model.requires_grad_(False).eval()


def random_lomd(dims, shape: AdapterShape) -> LoMD:
    g = torch.Generator().manual_seed(1)
    downs = {
        t.name: torch.randn(shape.rank_down, t.in_features, generator=g) / t.in_features**0.5
        for t in resolve_targets(dims, "attn_mlp")
    }
    return LoMD(downs, shape, family_of(dims).name, dims.hidden)


def step_inputs(dims, img_tokens: int, txt_tokens: int, device: str, dtype: torch.dtype):
    """Latents ``(1, C, H, W)``, timestep, noise and text of one step (fixed seed), on the device."""
    side = int(round(img_tokens**0.5))
    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(1, dims.in_channels, 2 * side, 2 * side, generator=g).to(device)
    noise = torch.randn(x0.shape, generator=g).to(device)
    context = torch.randn(txt_tokens, dims.context_dim, generator=g)
    pooled = torch.randn(dims.vec_dim, generator=g) if dims.vec_dim else None  # Qwen-Image: no pooled vector
    cond = TextConditioning(context, pooled)
    return x0, torch.tensor([0.7], device=device), noise, cond.to(device, dtype)


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

    def record(self, variant: str) -> None:
        """Take the modules now in the model as ``variant``'s (after an attach that wrapped them)."""
        self.by_variant[variant] = {}
        for name in self.by_variant["a"]:
            parent, child = _parent(self.model, name)
            self.by_variant[variant][name] = getattr(parent, child)

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


NAMES = {
    "a": "frozen base fwd+bwd (floor)",
    "b": "Meta-LoRA step",
    "c": "materialised delta-W step",
    "d": "peft LoRA rank 16 step",
    "e": "Meta-LoRA step, CUDA graph",
}


def timed(run, device: str) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of ``run()``, synchronised on CUDA."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0, c0 = time.perf_counter(), time.process_time()
    run()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - t0, time.process_time() - c0


class Variants:
    """One model, one backend, and a step function per variant (modules swapped in by :class:`Slots`)."""

    def __init__(self, dims, img_tokens, txt_tokens, device, dtype, checkpointing, variants) -> None:
        model = build(dims, device, dtype)
        self.backend = DiffusersBackend(model, dims)
        if checkpointing:
            self.backend.set_gradient_checkpointing(True)
        self.x0, self.t, self.noise, self.cond = step_inputs(dims, img_tokens, txt_tokens, device, dtype)
        self.lomd = random_lomd(dims, AdapterShape(4, 16))
        modules = [m for t in self.lomd.targets for m, _ in diffusers_pieces(t, dims)]
        self.slots = Slots(model, modules)
        self.dims, self.device, self.modules = dims, device, modules
        self.steps: dict[str, object] = {"a": self.floor}
        self._peft = None
        if "b" in variants:
            self.steps["b"] = self._eager(self._attached("b"))
        if "e" in variants and device.startswith("cuda"):
            step = CapturedStep(TrainStep(*self._train_args(self._attached("e"))))
            self.steps["e"] = lambda: step(self.x0, self.t, self.noise, None)
            self.slots.install("e")
            for _ in range(step.warmup + 1):  # eager warm-up steps, then the capture: timed rounds replay
                self.steps["e"]()
            self.capture_note = step.failed or "captured"
            self.slots.install("a")  # (the graph replays its own kernels whatever modules are installed)
        if "c" in variants:
            heads = self._heads()
            rows = {m: (k, r) for k in heads for m, r in diffusers_pieces(k.replace("__", "."), dims)}
            self.slots.add("c", lambda name, base: DenseDelta(base, heads[rows[name][0]], rows[name][1]))
            self.steps["c"] = self._eager(list(heads.parameters()))
        if "d" in variants:
            self._peft = peft_lora(model, modules, 16, 16.0, 5)
            params = self._peft.__enter__()
            self.slots.by_variant["d"] = {m: model.get_submodule(m) for m in modules}
            self.steps["d"] = self._eager(list(params.values()))
        self.slots.install("a")
        self.order = [v for v in "abcde" if v in self.steps]

    def _heads(self):
        torch.manual_seed(4)
        heads = make_heads(self.dims, self.lomd, dtype=torch.float32, device=self.device)
        with torch.no_grad():
            for h in heads.values():
                h.up.normal_(0, 1e-3)
        return heads

    def _attached(self, variant: str) -> list[nn.Parameter]:
        heads = self._heads()
        attach_to_diffusers(self.backend.model, self.dims, heads)  # the trainer's own bypass wrappers
        self.slots.record(variant)
        detach_heads(self.backend.model)
        return list(heads.parameters())

    def _train_args(self, params):
        optimizer = torch.optim.AdamW(params, lr=1e-4, fused=True)
        return self.backend, params, optimizer, self.cond, 1.0, 1.0, False

    def _eager(self, params):
        step = TrainStep(*self._train_args(params))

        def run() -> None:
            step(self.x0, self.t, self.noise, None)
            step.release()

        return run

    def floor(self) -> None:
        x0 = self.x0.detach().requires_grad_(True)
        flow_loss(self.backend, x0, self.cond, self.t, self.noise).backward()

    def run(self, variant: str) -> None:
        self.slots.install(variant)
        self.steps[variant]()

    def close(self) -> None:
        self.slots.install("a")
        if self._peft is not None:
            self._peft.__exit__(None, None, None)


def aten_ops(events) -> int:
    """Top-level aten ops: the ops the host dispatched itself (not those nested inside another aten op)."""
    count = 0
    for e in events:
        if not e.name.startswith("aten::"):
            continue
        parent = e.cpu_parent
        while parent is not None and not parent.name.startswith("aten::"):
            parent = parent.cpu_parent
        count += parent is None
    return count


def profile_step(variants: Variants, variant: str, device: str, top: int = 8) -> dict:
    """One profiled step: host seconds, device seconds, top-level aten ops and the top kernels / ops."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    variants.run(variant)  # warm
    variants.slots.install(variant)
    with profile(activities=activities) as prof:
        wall, cpu = timed(variants.steps[variant], device)
    events = prof.events()
    row = {"host_s": cpu, "wall_s": wall, "ops": aten_ops(events)}
    if device.startswith("cuda"):
        kernels = Counter()
        for e in events:
            if e.device_type.name == "CUDA":
                kernels[e.name] += e.self_device_time_total
        row["device_s"] = sum(kernels.values()) / 1e6
        row["launches"] = sum(1 for e in events if e.device_type.name == "CUDA")
        row["top"] = [(name, us / 1e6) for name, us in kernels.most_common(top)]
    else:
        ops = Counter()
        for e in events:
            if e.name.startswith("aten::"):
                ops[e.name] += e.self_cpu_time_total
        row["top"] = [(name, us / 1e6) for name, us in ops.most_common(top)]
    return row


def print_profile(rows: dict[str, dict], label: str) -> None:
    print(f"\n{label}profile, one step per variant")
    print("| variant | host s | wall s | device s | aten ops | kernel launches |")
    print("|---|---|---|---|---|---|")
    for v, r in rows.items():
        dev = f"{r['device_s']:.3f}" if "device_s" in r else "-"
        launches = str(r.get("launches", "-"))
        print(
            f"| ({v}) {NAMES[v]} | {r['host_s']:.3f} | {r['wall_s']:.3f} | {dev} | {r['ops']} | {launches} |"
        )
    for v, r in rows.items():
        print(f"\n({v}) top {'kernels' if 'device_s' in r else 'ops'} by self time:")
        for name, sec in r["top"]:
            print(f"    {sec * 1e3:9.2f} ms  {name[:100]}")


def run_config(
    dims,
    img_tokens,
    txt_tokens,
    device,
    dtype,
    warmup,
    iters,
    checkpointing,
    variants,
    label="",
    profile=False,
):
    v = Variants(dims, img_tokens, txt_tokens, device, dtype, checkpointing, variants)
    order = v.order
    times: dict[str, list[float]] = {k: [] for k in order}
    cpu: dict[str, list[float]] = {k: [] for k in order}
    peaks: dict[str, float] = {k: 0.0 for k in order}
    for round_ in range(warmup + iters):
        for k in order:
            meter = PeakMemory(device)
            meter.start()
            sec, cpu_sec = timed(partial(v.run, k), device)
            peaks[k] = max(peaks[k], meter.stop())
            if round_ >= warmup:
                times[k].append(sec)
                cpu[k].append(cpu_sec)
            print(
                f"  round {round_ + 1}/{warmup + iters} ({k}) {sec:.3f} s wall, {cpu_sec:.3f} s CPU",
                file=sys.stderr,
                flush=True,
            )
    profiled = {k: profile_step(v, k, device) for k in order} if profile else None
    v.close()
    v = None
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    # On the CPU the comparison uses process CPU time: on a shared machine wall time swings 2x with other
    # processes' load, CPU seconds far less. On CUDA it is wall time (synchronised).
    key_times = times if device.startswith("cuda") else cpu
    rows = {
        k: (NAMES[k], statistics.median(key_times[k]), peaks[k], statistics.median(times[k])) for k in order
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
    if profiled:
        print_profile(profiled, label)
    return rows, profiled


def proxy(args) -> int:
    """CPU proxies of the host cost a GPU step pays (see the module docstring)."""
    torch.set_num_threads(1)
    dims = FluxDims(128, 512, args.depth, args.depth_single, 16, 64, 32, True, 16)
    print(
        f"proxy: hidden 128, {args.depth} double + {args.depth_single} single blocks, 16 image + 8 text tokens, "
        "float32, 1 thread"
    )
    variants = args.variants or "abd"
    rows, _ = run_config(dims, 16, 8, "cpu", torch.float32, args.warmup, args.iters, False, variants)
    v = Variants(dims, 16, 8, "cpu", torch.float32, False, variants)
    ops = {k: profile_step(v, k, "cpu")["ops"] for k in v.order}
    v.close()
    print("\n| variant | top-level aten ops per step | host s/step (median) | ops vs floor | host vs floor |")
    print("|---|---|---|---|---|")
    for k in ops:
        print(
            f"| ({k}) {NAMES[k]} | {ops[k]} | {rows[k][1]:.4f} | {ops[k] / ops['a']:.3f} | "
            f"{rows[k][1] / rows['a'][1]:.3f} |"
        )
    print(f"ratio ops_meta_over_floor {ops['b'] / ops['a']:.3f}")
    print(f"ratio host_meta_over_floor {rows['b'][1] / rows['a'][1]:.3f}")
    return 0


def thin_slice(args, dims, label: str = "") -> dict:
    """The default comparison (float32, no checkpointing, variants a-d unless asked) on a thin slice."""
    rows, _ = run_config(
        dims,
        args.image_tokens,
        args.text_tokens,
        args.device,
        torch.float32,
        args.warmup,
        args.iters,
        False,
        args.variants or "abcd",
        label=label,
        profile=args.profile,
    )
    return rows


def qwen_image(args) -> int:
    """Floor / Meta-LoRA / (delta-W) / peft LoRA on a thin slice of Qwen-Image at its real width."""
    real = args.hidden == 3072
    dims = QwenImageDims(
        hidden=args.hidden,
        mlp_hidden=4 * args.hidden,
        depth=args.depth,
        in_channels=16,  # the Wan 2.1 VAE's 16 latent channels (64 after 2x2 packing)
        context_dim=3584 if real else 32,  # Qwen2.5-VL-7B's hidden size
        out_channels=16,
        head_dim=128 if args.hidden % 128 == 0 else 32,
    )
    family = family_of(dims)
    targets = resolve_targets(dims, "attn_mlp")
    print(
        f"family {family.name} ({family.label}): hidden {dims.hidden}, {dims.heads} heads of {dims.head_dim}, "
        f"MLP {dims.mlp_hidden}, text width {dims.context_dim}, {dims.depth} of 60 blocks, "
        f"{args.image_tokens} image + {args.text_tokens} text tokens, float32, "
        f"{len(targets)} attn_mlp target layers"
    )
    rows = thin_slice(args, dims, label=f"{family.label} ({family.name}), {dims.depth} blocks ")
    if "a" in rows and "b" in rows:
        print(f"ratio {family.name}_meta_over_floor {rows['b'][1] / rows['a'][1]:.3f}")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument(
        "--family",
        choices=("flux", "qwen_image"),
        default="flux",
        help="base model family (qwen_image: real Qwen-Image width, a thin slice of --depth blocks)",
    )
    ap.add_argument(
        "--full", action="store_true", help="FLUX.1-dev size (19 double + 38 single), bf16, 512 and 1024 px"
    )
    ap.add_argument("--proxy", action="store_true", help="CPU proxies of GPU host cost (ops, host s/step)")
    ap.add_argument("--profile", action="store_true", help="torch.profiler over one step per variant")
    ap.add_argument("--hidden", type=int, default=3072)
    ap.add_argument("--image-tokens", type=int, default=None, help="default 1024 (qwen_image on the CPU: 64)")
    ap.add_argument("--text-tokens", type=int, default=None, help="default 256 (qwen_image on the CPU: 16)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--variants", default="", help="subset of abcde (default: abcd; abde with --full)")
    ap.add_argument(
        "--depth",
        type=int,
        default=None,
        help="--full/--proxy: double blocks (default 19, FLUX.1-dev's); qwen_image: blocks (default 2)",
    )
    ap.add_argument(
        "--depth-single", type=int, default=38, help="--full/--proxy: single blocks (FLUX.1-dev: 38)"
    )
    ap.add_argument("--full-px", default="512,1024", help="--full: square resolutions to time")
    ap.add_argument("--checkpointing", default="off,on", help="--full: off, on, or off,on")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args(argv)
    if args.family != "flux" and (args.full or args.proxy):
        ap.error("--full and --proxy time FLUX.1 only; --family qwen_image times a thin slice")
    small = args.family == "qwen_image" and args.device == "cpu"  # a CPU run of a Qwen-Image slice
    if args.depth is None:
        args.depth = 2 if args.family == "qwen_image" else 19
    if args.image_tokens is None:
        args.image_tokens = 64 if small else 1024
    if args.text_tokens is None:
        args.text_tokens = 16 if small else 256
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, device {args.device}, threads {torch.get_num_threads()}")
    if args.proxy:
        return proxy(args)
    if args.full:
        dims = FluxDims(args.hidden, 4 * args.hidden, args.depth, args.depth_single, 16, 4096, 768, True, 16)
        variants = args.variants or "abde"
        sizes = [int(px) for px in args.full_px.split(",")]
        modes = [m == "on" for m in args.checkpointing.split(",")]
        results = {}
        for px in sizes:
            img_tokens = (px // 16) ** 2  # 8x VAE, 2x2 patches
            for ckpt in modes:
                label = f"{px} px ({img_tokens} image + 512 text tokens), checkpointing {'on' if ckpt else 'off'} "
                results[(px, ckpt)], _ = run_config(
                    dims,
                    img_tokens,
                    512,
                    args.device,
                    torch.bfloat16,
                    args.warmup,
                    args.iters,
                    ckpt,
                    variants,
                    label,
                    args.profile,
                )
        first = results[(sizes[0], modes[0])]
        best = "e" if "e" in first else "b"
        if best in first:
            print(f"\n375 Meta-LoRA steps at {sizes[0]} px ({NAMES[best]}): {375 * first[best][1]:.1f} s")
        rows = first
    elif args.family == "qwen_image":
        return qwen_image(args)
    else:
        heads = args.hidden // 128
        dims = FluxDims(
            args.hidden,
            4 * args.hidden,
            1,
            1,
            16,  # FLUX's 16 latent channels (64 after 2x2 packing)
            4096 if args.hidden == 3072 else 64,
            768 if args.hidden == 3072 else 32,
            True,
            16,
        )
        print(
            f"hidden {dims.hidden}, {heads} heads, 1 double + 1 single block, {args.image_tokens} image + {args.text_tokens} text tokens, float32"
        )
        rows = thin_slice(args, dims)
    if "a" in rows and "e" in rows:
        print(f"ratio graph_over_floor {rows['e'][1] / rows['a'][1]:.3f}")
    if "a" in rows and "b" in rows:
        print(f"ratio meta_over_floor {rows['b'][1] / rows['a'][1]:.3f}")
    return 0


if __name__ == "__main__":
    # process-wide allocator setting, so only when run as a script (never inside a test session)
    if not mmap_large_allocations():
        print("note: could not set glibc's mmap threshold; CPU peak memory may be under-reported")
    sys.exit(main())
