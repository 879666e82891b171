"""Meta-training throughput: steps/s with 1 and 2 data-parallel processes at the same global batch.

Builds a tiny FLUX (``--hidden``/``--depth``), a tiny VAE, random text features and a synthetic identity
set in a temporary folder, fills the latent cache once, then runs the real command
``python -m torch.distributed.run --nproc_per_node N -m metalora_core meta-train ...`` for N = 1 and 2
(one torch thread per process, gloo on CPU). steps/s is ``steps / seconds`` of the training loop as the
command reports it (start-up, loading and encoding excluded). Scaling efficiency is
``(steps/s with 2) / (2 * steps/s with 1)``: 1.0 is perfect data-parallel scaling. The last line is
``ratio scaling_efficiency <value>``.

  python bench/meta_train.py                       # CPU, ~2 minutes on 2 cores
  python bench/meta_train.py --hidden 256 --steps 40 --device cuda
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from metalora_core.dev.conditioning import write_random_conditioning  # noqa: E402
from metalora_core.dev.synthetic_identities import write_synthetic_identities  # noqa: E402
from metalora_core.dev.tiny_flux import tiny_dims, write_tiny_flux  # noqa: E402
from metalora_core.dev.tiny_vae import write_tiny_vae  # noqa: E402


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(nproc: int, args, assets: dict[str, Path], out: Path) -> dict:
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
        "--master_addr", "127.0.0.1", "--master_port", str(_port()),
        "-m", "metalora_core", "meta-train", "--flux", str(assets["flux"]), "--vae", str(assets["vae"]),
        "--conditioning", str(assets["cond"]), "--data", str(assets["data"]), "--out", str(out),
        "--cache-dir", str(assets["cache"]), "--resolution", str(args.resolution), "--max-aspect-error", "0.5",
        "--identities-per-batch", str(args.batch), "--steps", str(args.steps), "--warmup", "2",
        "--rank-mid", "8", "--device", args.device, "--quiet",
    ]  # fmt: skip
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(f"meta-train with {nproc} process(es) failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=128, help="tiny FLUX width (multiple of 128)")
    p.add_argument("--depth", type=int, default=2, help="double and single blocks each")
    p.add_argument("--identities", type=int, default=8)
    p.add_argument("--images", type=int, default=4, help="photos per identity")
    p.add_argument("--resolution", type=int, default=128)
    p.add_argument("--batch", type=int, default=4, help="global batch (photos per step)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        dims = tiny_dims(args.hidden, args.depth, args.depth)
        flux = write_tiny_flux(root / "flux", "diffusers", dims, seed=0)
        assets = {
            "flux": flux,
            "vae": write_tiny_vae(root / "vae"),
            "cond": write_random_conditioning(flux, root / "cond.safetensors", tokens=8),
            "data": write_synthetic_identities(root / "data", args.identities, args.images, size=96),
            "cache": root / "cache",
        }
        warm = argparse.Namespace(**{**vars(args), "steps": 1})
        run(1, warm, assets, root / "warm.safetensors")  # encode every photo once, outside the timing
        rows = {n: run(n, args, assets, root / f"lomd{n}.safetensors") for n in (1, 2)}
    sps = {n: r["steps"] / r["seconds"] for n, r in rows.items()}
    efficiency = sps[2] / (2 * sps[1])
    same = rows[1]["fingerprint"] == rows[2]["fingerprint"]
    print(f"meta-train, tiny FLUX hidden {args.hidden}, depth {args.depth}+{args.depth}, {args.resolution} px, "
          f"global batch {args.batch}, {args.steps} steps, device {args.device}")  # fmt: skip
    print("| processes | steps/s | loop seconds | final loss |")
    print("|---|---|---|---|")
    for n, r in rows.items():
        print(f"| {n} | {sps[n]:.3f} | {r['seconds']:.2f} | {r['final_loss']:.4f} |")
    print(f"same LoMD fingerprint with 1 and 2 processes: {same}")
    print(f"ratio scaling_efficiency {efficiency:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
