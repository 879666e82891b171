"""Training-step benchmark: what does a Meta-LoRA step cost over the bare frozen-model floor?

CPU default (real FLUX width, a thin slice): hidden 3072, 24 heads, one double + one single block,
1024 image tokens (512 px) + 256 text tokens. One run times, per training step:

  (a) floor  frozen base forward + backward (activation gradients only; no trainable weights)
  (b) meta   Meta-LoRA bypass heads (rank_down 4, rank_mid 16, attn_mlp targets) + AdamW step
  (c) dense  the same adapter as a materialised delta-W weight wrapper, W + s*Up@Mid@Down per forward
             (how ComfyUI's native trainer patches weights) + AdamW step
  (d) lora   plain rank-16 LoRA via peft on the same layers + AdamW step

Peak memory: on CPU the peak process RSS above the RSS just before the variant's first step, sampled
every 2 ms by a thread (psutil); on CUDA ``torch.cuda.max_memory_allocated`` above the pre-step
allocation. Warm-up steps are excluded from times. The last line is ``ratio meta_over_floor <b/a>``.

  python bench/train_step.py                              # CPU, a few minutes on 2 cores
  python bench/train_step.py --device cuda --full         # full FLUX.1-dev size, random bf16 weights,
                                                          # 512 and 1024 px, with/without checkpointing
"""

from __future__ import annotations

import argparse
import gc
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from metalora_core.adapter import AdapterShape, IdentityHead  # noqa: E402
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


@contextmanager
def wrap(model: nn.Module, dims: FluxDims, heads, cls):
    originals = []
    for key, head in heads.items():
        for module, rows in diffusers_pieces(key.replace("__", "."), dims):
            parent, child = _parent(model, module)
            originals.append((parent, child, getattr(parent, child)))
            setattr(parent, child, cls(getattr(parent, child), head, rows))
    try:
        yield
    finally:
        for parent, child, base in originals:
            setattr(parent, child, base)


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


def time_variant(model, feed, params, warmup: int, iters: int, device: str, with_input_grad: bool):
    opt = torch.optim.AdamW(params, lr=1e-4) if params else None
    x = feed["hidden_states"]
    target = torch.randn(x.shape, generator=torch.Generator().manual_seed(3)).to(x.device, x.dtype)
    meter = PeakMemory(device)
    times = []
    meter.start()
    for i in range(warmup + iters):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step_feed = dict(feed, hidden_states=x.detach().requires_grad_(with_input_grad))
        out = model(**step_feed)[0]
        F.mse_loss(out.float(), target.float()).backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    peak = meter.stop()
    return sum(times) / len(times), peak


def run_config(dims, img_tokens, txt_tokens, device, dtype, warmup, iters, checkpointing, variants, label=""):
    model = build(dims, device, dtype)
    if checkpointing:
        model.enable_gradient_checkpointing()
    feed = inputs(dims, img_tokens, txt_tokens, device, dtype)
    shape = AdapterShape(4, 16)
    lomd = random_lomd(dims, shape)
    rows = {}

    def heads():
        torch.manual_seed(4)
        hs = make_heads(dims, lomd, dtype=torch.float32, device=device)
        with torch.no_grad():
            for h in hs.values():
                h.up.normal_(0, 1e-3)
        return hs

    from metalora_core.adapter import BypassLinear

    if "a" in variants:
        rows["a"] = (
            "frozen base fwd+bwd (floor)",
            *time_variant(model, feed, [], warmup, iters, device, True),
        )
    if "b" in variants:
        hs = heads()
        with wrap(model, dims, hs, BypassLinear):
            rows["b"] = (
                "Meta-LoRA bypass step",
                *time_variant(model, feed, list(hs.parameters()), warmup, iters, device, False),
            )
    if "c" in variants:
        hs = heads()
        with wrap(model, dims, hs, DenseDelta):
            rows["c"] = (
                "materialised delta-W step",
                *time_variant(model, feed, list(hs.parameters()), warmup, iters, device, False),
            )
    if "d" in variants:
        modules = [m for t in lomd.targets for m, _ in diffusers_pieces(t, dims)]
        with peft_lora(model, modules, 16, 16.0, 5) as params:
            for p in params.values():
                p.data = p.data.to(device)
            rows["d"] = (
                "peft LoRA rank 16 step",
                *time_variant(model, feed, list(params.values()), warmup, iters, device, False),
            )
    del model
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    print(f"\n{label}| variant | s/step | peak memory MiB | vs floor |")
    print("|---|---|---|---|")
    floor = rows.get("a", (None, None, None))[1]
    for key, (name, sec, peak) in rows.items():
        ratio = f"{sec / floor:.3f}" if floor else "-"
        print(f"| ({key}) {name} | {sec:.3f} | {peak:.0f} | {ratio} |", flush=True)
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
    ap.add_argument("--iters", type=int, default=2)
    ap.add_argument("--variants", default="abcd")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args(argv)
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
