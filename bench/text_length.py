"""How many T5 text tokens does FLUX training see, and what does each length cost per step?

1. With ``COMFYUI_PATH`` set: the number of T5 tokens ComfyUI's own FLUX text encoding produces for a short
   caption and for long prompts (its tokenizer pads to at least 256 tokens and never truncates).
2. The Meta-LoRA training step (bypass heads, AdamW) at real FLUX width (hidden 3072, T5 width 4096),
   one double + one single block, ``--image-tokens`` image tokens (1024 = 512 px), for each text length
   in ``--lengths``. Lengths run round-robin (one step of each per round) so other processes' load hits
   all alike; the comparison is process CPU seconds per step (median), printed with ratios to 256 tokens.

  COMFYUI_PATH=/path/to/ComfyUI python bench/text_length.py --threads 1 --iters 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from train_step import build, inputs, one_step, random_lomd  # noqa: E402

from metalora_core.adapter import AdapterShape  # noqa: E402
from metalora_core.inject import attach_heads  # noqa: E402
from metalora_core.targets import FluxDims  # noqa: E402

PROMPTS = {
    "short caption ('photo of ohwx person')": "photo of ohwx person",
    "long prompt (~660 T5 tokens)": "a photo of ohwx person, " * 60,
}


def comfy_t5_tokens(comfy: str) -> dict[str, int]:
    """T5 token counts from ComfyUI's FluxTokenizer (the tokenizer CLIP Text Encode uses for FLUX)."""
    sys.path.insert(0, comfy)
    argv, sys.argv = sys.argv, [sys.argv[0], "--cpu"]
    try:
        import comfy.options

        comfy.options.enable_args_parsing()
        from comfy.text_encoders.flux import FluxTokenizer
    finally:
        sys.argv = argv
    tok = FluxTokenizer()
    return {name: sum(len(b) for b in tok.tokenize_with_weights(p)["t5xxl"]) for name, p in PROMPTS.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="77,256,512", help="text token counts to time")
    ap.add_argument("--image-tokens", type=int, default=1024, help="1024 = 512 px (8x VAE, 2x2 patches)")
    ap.add_argument("--hidden", type=int, default=3072)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--iters", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    comfy = os.environ.get("COMFYUI_PATH")
    if comfy:
        for name, count in comfy_t5_tokens(comfy).items():
            print(f"ComfyUI FLUX text encoding, {name}: {count} T5 tokens")
    else:
        print("COMFYUI_PATH not set: ComfyUI's token counts not measured")
    lengths = [int(v) for v in args.lengths.split(",")]
    dims = FluxDims(args.hidden, 4 * args.hidden, 1, 1, 64, 4096, 768, True, 64)
    model = build(dims, "cpu", torch.float32)
    heads = attach_heads(model, dims, random_lomd(dims, AdapterShape(4, 16)))
    with torch.no_grad():
        for h in heads.values():
            h.up.normal_(0, 1e-3)
    opt = torch.optim.AdamW(heads.parameters(), lr=1e-4)
    feeds = {n: inputs(dims, args.image_tokens, n, "cpu", torch.float32) for n in lengths}
    target = torch.randn(feeds[lengths[0]]["hidden_states"].shape, generator=torch.Generator().manual_seed(3))
    cpu: dict[int, list[float]] = {n: [] for n in lengths}
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; hidden {dims.hidden}, 1 double + 1 single "
        f"block, {args.image_tokens} image tokens, Meta-LoRA step (attn_mlp, rank 4/16, AdamW), float32"
    )
    for round_ in range(args.warmup + args.iters):
        for n in lengths:
            wall, sec = one_step(model, feeds[n], target, opt, False, "cpu")
            print(
                f"  round {round_ + 1} text {n}: {sec:.2f} s CPU, {wall:.2f} s wall",
                file=sys.stderr,
                flush=True,
            )
            if round_ >= args.warmup:
                cpu[n].append(sec)
    base = statistics.median(cpu[256]) if 256 in cpu else statistics.median(cpu[lengths[0]])
    print("\n| text tokens | total tokens | CPU s/step (median) | vs 256 text tokens |")
    print("|---|---|---|---|")
    for n in lengths:
        med = statistics.median(cpu[n])
        print(f"| {n} | {args.image_tokens + n} | {med:.3f} | {med / base:.3f} |")
    if 512 in cpu and 256 in cpu:
        print(f"ratio text512_over_text256 {statistics.median(cpu[512]) / statistics.median(cpu[256]):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
