"""One training step that never makes the host wait for the device, and its CUDA-graph replay.

A GPU runs a step fastest when the host only enqueues work: every ``float(loss)``, every non-finite check
read on the host, every pageable copy stops the queue until the device has caught up (measured on an H200 in
docs/performance.md). So here:

- the loss and the gradient norm stay on the device (:class:`StepLog` reads them one step late);
- gradient clipping and the norm use the foreach kernels and return a device tensor;
- non-finiteness is a device flag that stays set once raised (``sticky``); AdamW runs fused and reads it as
  its ``found_inf``, so from the first non-finite step on every update (and its step count) is skipped on the
  device, with no host decision. When the host reads the flag it stops the run with the weights of the last
  finite step, exactly as a check before each update would;
- on a CUDA device with a backend that allows it, the whole step (forward, backward, clipping, flag, AdamW)
  is captured once as a CUDA graph and replayed (:class:`CapturedStep`): single-image training has static
  shapes, so one replay launches the thousands of small kernels of a step at once. Capture that fails
  falls back to the eager step, and says so.
"""

from __future__ import annotations

import warnings
from collections import deque
from collections.abc import Sequence

import torch

from .objective import flow_loss
from .protocol import FluxBackend, TextConditioning


def gradient_norm(params: Sequence[torch.nn.Parameter], max_norm: float | None) -> torch.Tensor:
    """Total gradient norm as a device tensor; gradients clipped to ``max_norm`` in place (if set)."""
    with_grad = [p for p in params if p.grad is not None]
    if not with_grad:
        return torch.zeros((), device=params[0].device if params else "cpu")
    if max_norm and max_norm > 0:
        return torch.nn.utils.clip_grad_norm_(with_grad, max_norm, error_if_nonfinite=False, foreach=True)
    norms = torch._foreach_norm([p.grad for p in with_grad])
    return torch.linalg.vector_norm(torch.stack(norms))


class TrainStep:
    """Forward, backward, clipping, the sticky non-finite flag and the fused AdamW update, all enqueued.

    ``flag`` (a float32 scalar on the device) becomes 1 at the first step whose loss or gradient norm is not
    finite and stays 1; the optimizer skips its update whenever it is set.
    """

    def __init__(
        self,
        backend: FluxBackend,
        params: Sequence[torch.nn.Parameter],
        optimizer: torch.optim.Optimizer,
        cond: TextConditioning,
        max_grad_norm: float | None,
        guidance: float | None,
        bf16: bool,
    ) -> None:
        self.backend, self.params, self.optimizer = backend, list(params), optimizer
        self.cond, self.max_grad_norm, self.guidance, self.bf16 = cond, max_grad_norm, guidance, bf16
        self.flag = torch.zeros((), device=backend.device, dtype=torch.float32)
        optimizer.found_inf = self.flag  # read by fused AdamW: no update while set (torch.optim's AMP hook)

    def __call__(
        self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, weight: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One step on a batch; returns (loss, gradient norm before clipping), both on the device."""
        device_type = self.backend.device.type
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=self.bf16):
            loss = flow_loss(self.backend, x0, self.cond, t, noise, self.guidance, weight)
        loss.backward()
        norm = gradient_norm(self.params, self.max_grad_norm)
        loss = loss.detach()
        bad = torch.logical_not(torch.isfinite(loss) & torch.isfinite(norm)).to(self.flag.dtype)
        torch.maximum(self.flag, bad, out=self.flag)
        self.optimizer.step()
        return loss, norm.detach()

    def release(self) -> None:
        """Drop the gradients (the eager loop does this after every step; a captured step keeps its own)."""
        self.optimizer.zero_grad(set_to_none=True)


class CapturedStep:
    """A :class:`TrainStep` captured as one CUDA graph after ``warmup`` eager steps, then replayed.

    The step's inputs are copied into fixed buffers before each replay; the learning rates become device
    tensors that the scheduler fills in place, so the captured update reads each step's value. Eager
    warm-up steps run on a side stream, as PyTorch's whole-network capture recipe asks.
    """

    def __init__(self, eager: TrainStep, warmup: int = 2) -> None:
        self.eager, self.warmup = eager, warmup
        self.graph: torch.cuda.CUDAGraph | None = None
        self.failed: str | None = None  # why capture failed (the step then stays eager)
        self.done = 0
        self.side = torch.cuda.Stream(device=eager.backend.device)

    def __call__(self, x0, t, noise, weight) -> tuple[torch.Tensor, torch.Tensor]:
        if self.graph is None and self.failed is None and self.done >= self.warmup:
            self._capture(x0, t, noise, weight)
        self.done += 1
        if self.graph is None:
            return self._eager(x0, t, noise, weight)
        for buffer, value in zip(self.inputs, (x0, t, noise, weight)):
            if buffer is not None:
                buffer.copy_(value)
        self.graph.replay()
        return self.outputs

    def _eager(self, *inputs) -> tuple[torch.Tensor, torch.Tensor]:
        if self.failed is not None:
            out = self.eager(*inputs)
            self.eager.release()
            return out
        current = torch.cuda.current_stream(self.side.device)
        self.side.wait_stream(current)
        with torch.cuda.stream(self.side):
            out = self.eager(*inputs)
            self.eager.release()
        current.wait_stream(self.side)
        return out

    def _capture(self, x0, t, noise, weight) -> None:
        optimizer = self.eager.optimizer
        try:
            for group in optimizer.param_groups:
                if not torch.is_tensor(group["lr"]):
                    group["lr"] = torch.tensor(float(group["lr"]), device=self.eager.backend.device)
                group["capturable"] = True
            self.inputs = [None if v is None else v.clone() for v in (x0, t, noise, weight)]
            optimizer.zero_grad(set_to_none=True)
            torch.cuda.synchronize(self.eager.backend.device)
            graph = torch.cuda.CUDAGraph()
            # thread_local: CUDA calls other threads make meanwhile (a UI, a memory sampler) do not spoil it
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                self.outputs = self.eager(*self.inputs)
            self.graph = graph
        except Exception as exc:  # any capture failure: train on, eagerly
            self.failed = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
            self.graph = None
            for group in optimizer.param_groups:
                group["capturable"] = False
            optimizer.zero_grad(set_to_none=True)
            torch.cuda.synchronize(self.eager.backend.device)
            warnings.warn(
                f"Meta-LoRA: the training step could not be captured as a CUDA graph ({self.failed}); "
                "training goes on without it (slower per step, same result)",
                RuntimeWarning,
                stacklevel=3,
            )


class StepLog:
    """Loss and gradient norm of every step, copied off the device without waiting, read one step late.

    On a GPU each record is a non-blocking copy into pinned memory plus an event; :meth:`ready` waits only for
    the events of steps older than the newest, which the device has (nearly always) finished while the host
    enqueued the newest. On the CPU the values are simply there.
    """

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.pending: deque[tuple[int, torch.Tensor, torch.cuda.Event | None]] = deque()

    def record(self, step: int, loss: torch.Tensor, norm: torch.Tensor) -> None:
        values = torch.stack([loss.float(), norm.float()])
        event = None
        if self.cuda:
            host = torch.empty(2, pin_memory=True)
            host.copy_(values, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            values = host
        self.pending.append((step, values, event))

    def ready(self, keep_newest: bool = True) -> list[tuple[int, float, float]]:
        """``(step, loss, norm)`` of the recorded steps, oldest first; the newest stays unless told."""
        out = []
        while len(self.pending) > (1 if keep_newest else 0):
            step, values, event = self.pending.popleft()
            if event is not None:
                event.synchronize()
            loss, norm = values.tolist()
            out.append((step, loss, norm))
        return out


__all__ = ["CapturedStep", "StepLog", "TrainStep", "gradient_norm"]
