"""Two CPU processes launched with torchrun (``python -m torch.distributed.run``): both ranks end with the
same LoMD, which matches one process with the same global batch, and the 2-process checkpoint resumes in
1 process. The default group is created with a backend registered for ``cuda`` only (``cuda:gloo``), so
every CPU tensor sent through it fails exactly as it would under NCCL on GPUs ("No backend type associated
with device type cpu"): the trainer must route CPU tensors through a group that carries them.

Tolerance: the Down's gradient is summed in another order across 2 processes (float32 all-reduce) than
in one, so weights may differ by rounding; they must agree to ``atol = 1e-5`` after 3 steps of
``lr = 3e-3`` (well under one step's update). Ranks must agree bit for bit.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from metalora_core.formats import load_lomd
from metalora_core.meta.train import MetaConfig, MetaTrainer

FAST = dict(batch_size=4, lr=3e-3, lr_heads=3e-3, warmup_steps=1, rank_mid=4)
ATOL = 1e-5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _collectives(rank: int, port: int, out: str) -> None:
    """One process of the fast test: the default group knows only ``cuda``, every tensor is on the CPU."""
    import torch.distributed as dist

    from metalora_core.meta.distributed import (
        all_reduce_grads,
        all_reduce_sum,
        gather_to_main,
        init_from_env,
        shutdown,
    )

    os.environ.update(RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group(backend="cuda:gloo")
    ctx = init_from_env()
    try:
        p = torch.nn.Parameter(torch.zeros(3))
        p.grad = torch.full((3,), float(rank + 1))
        all_reduce_grads(ctx, [p])
        total = all_reduce_sum(ctx, torch.tensor(float(rank + 1), dtype=torch.float64))
        bank = gather_to_main(ctx, {f"h{rank}": torch.full((2,), float(rank + 5))}, {"h0": (2,), "h1": (2,)})
        result = {
            "grad": p.grad.tolist(),
            "total": float(total),
            "bank": {k: v.tolist() for k, v in (bank or {}).items()},
        }
        Path(out, f"r{rank}.json").write_text(json.dumps(result))
    finally:
        shutdown(ctx)


def test_cpu_tensors_cross_a_group_registered_for_cuda_only(tmp_path):
    """The NCCL bug on CPU: loss totals, CPU gradients and the checkpoint's bank gather all go through."""
    import torch.multiprocessing as mp

    mp.spawn(_collectives, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (json.loads((tmp_path / f"r{i}.json").read_text()) for i in (0, 1))
    assert r0["grad"] == r1["grad"] == [3.0, 3.0, 3.0]
    assert r0["total"] == r1["total"] == 3.0
    assert r0["bank"] == {"h0": [5.0, 5.0], "h1": [6.0, 6.0]} and r1["bank"] == {}


@pytest.mark.slow
def test_two_processes_match_each_other_and_one_process(meta_assets, meta_backend, build, tmp_path):
    ckpt = tmp_path / "ddp.ckpt.safetensors"
    config = dict(steps=3, checkpoint_every=3, checkpoint_path=str(ckpt), **FAST)
    paths = {k: str(v) for k, v in meta_assets.items()}
    worker = Path(__file__).with_name("ddp_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[2])}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
        "--master_port", str(_free_port()), str(worker), json.dumps(paths), json.dumps(config), str(tmp_path), "cuda:gloo",
    ]  # fmt: skip
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    rank0, rank1 = load_lomd(tmp_path / "rank0.safetensors"), load_lomd(tmp_path / "rank1.safetensors")
    assert json.loads((tmp_path / "rank0.json").read_text())["world"] == 2
    for n in rank0.downs:
        assert torch.equal(rank0.downs[n], rank1.downs[n]), n  # all-reduced: identical on every rank

    data, plan, prepared = build(4)
    single = MetaTrainer(meta_backend, data, plan, prepared, MetaConfig(steps=3, **FAST)).train()
    worst = max(float((single.lomd.downs[n] - rank0.downs[n]).abs().max()) for n in rank0.downs)
    print(f"max |Down(1 process) - Down(2 processes)| after 3 steps: {worst:.2e}")
    assert worst <= ATOL, worst
    moved = max(float((single.lomd.downs[n] - MetaTrainer(meta_backend, data, plan, prepared, MetaConfig(
        steps=1, **FAST)).downs[n].detach()).abs().max()) for n in rank0.downs)  # fmt: skip
    assert moved > 100 * ATOL  # the tolerance is far below what training changes
    losses = json.loads((tmp_path / "rank0.json").read_text())["losses"]
    assert losses == pytest.approx(single.losses, rel=1e-5)

    # the checkpoint the 2 processes wrote (full bank gathered on rank 0) resumes in 1 process
    resumed = MetaTrainer(
        meta_backend, data, plan, prepared, MetaConfig(steps=5, resume_from=str(ckpt), **FAST)
    )
    result = resumed.train()
    straight = MetaTrainer(meta_backend, data, plan, prepared, MetaConfig(steps=5, **FAST)).train()
    assert result.steps_done == 5 and result.losses[:3] == losses
    for n in straight.lomd.downs:
        torch.testing.assert_close(result.lomd.downs[n], straight.lomd.downs[n], rtol=0, atol=ATOL)
