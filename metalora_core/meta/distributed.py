"""Data-parallel meta-training on torch.distributed, set up from what ``torchrun`` / ``accelerate launch``
put in the environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``).

Identities are sharded (``index % world == rank``): a head lives on one process only, so only the shared
Down's gradients cross processes (one all-reduce per step). Gradient clipping uses the global norm (Down +
every process's heads), so every process scales by the same factor and the Downs stay bit-identical.

Devices: on CUDA the group is ``cpu:gloo,cuda:nccl``: NCCL takes only CUDA tensors, while the loss totals
and the head bank (gathered for checkpoints) live on the CPU. A group somebody else created with one
backend for ``cuda`` only (``accelerate`` / plain ``nccl``) gets a gloo side group for CPU tensors; every
collective here picks its group from the tensor's device (:meth:`DistContext.group_for`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world: int = 1
    cpu_group: object | None = None  # a gloo group for CPU tensors when the default group has no CPU backend

    def group_for(self, tensor: torch.Tensor):
        """The process group that can carry ``tensor`` (None = the default group)."""
        return self.cpu_group if tensor.device.type == "cpu" else None

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def owns(self, identity: int) -> bool:
        return identity % self.world == self.rank


def init_from_env(device: torch.device | None = None) -> DistContext:
    """Join the process group a launcher described in the environment; a plain run is rank 0 of 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext()
    if not dist.is_initialized():
        backend = "cpu:gloo,cuda:nccl" if device is not None and device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
    cpu_group = None if carries_cpu() else dist.new_group(backend="gloo")
    return DistContext(dist.get_rank(), dist.get_world_size(), cpu_group)


def carries_cpu(group=None) -> bool:
    """Whether a group (default: the default group) has a backend for CPU tensors (NCCL alone has not)."""
    config = str(dist.get_backend_config(group)) if hasattr(dist, "get_backend_config") else ""
    if ":" in config:  # "cpu:gloo,cuda:nccl" style
        return any(part.split(":")[0].strip() == "cpu" for part in config.split(","))
    return dist.get_backend(group) != "nccl"


def shutdown(ctx: DistContext) -> None:
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_grads(ctx: DistContext, params: Sequence[torch.nn.Parameter]) -> None:
    """Sum the gradients of ``params`` over processes (a missing gradient counts as zero), in one flat op."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    if not ctx.enabled:
        return
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    dist.all_reduce(flat, group=ctx.group_for(flat))
    offset = 0
    for p in params:
        n = p.numel()
        p.grad.copy_(flat[offset : offset + n].view_as(p))
        offset += n


def all_reduce_sum(ctx: DistContext, value: torch.Tensor) -> torch.Tensor:
    """Sum a small tensor over processes (the loss and the squared head-gradient norm)."""
    if ctx.enabled:
        value = value.clone()
        dist.all_reduce(value, group=ctx.group_for(value))
    return value


def gather_to_main(
    ctx: DistContext, local: Mapping[str, torch.Tensor], shapes: Mapping[str, tuple[int, ...]]
) -> dict[str, torch.Tensor] | None:
    """Every process's ``local`` tensors merged on rank 0 (``shapes``: all names over all processes).

    Each name is owned by exactly one process; the others contribute zeros to one flat sum-reduce.
    Returns the full mapping on rank 0 and None elsewhere.
    """
    names = sorted(shapes)
    full = {n: (local[n].float() if n in local else torch.zeros(shapes[n])) for n in names}
    if not ctx.enabled:
        return full
    flat = torch.cat([full[n].reshape(-1) for n in names])
    dist.reduce(flat, dst=0, group=ctx.group_for(flat))
    if not ctx.is_main:
        return None
    out, offset = {}, 0
    for n in names:
        size = int(torch.Size(shapes[n]).numel())
        out[n] = flat[offset : offset + size].view(shapes[n]).clone()
        offset += size
    return out
