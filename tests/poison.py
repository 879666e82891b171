"""Backend wrappers that turn a working backend non-finite from its ``n``-th call on (for the NaN guards)."""

from __future__ import annotations

import torch


class NanGrad(torch.autograd.Function):
    """Identity forward; backward returns NaN: the loss stays finite, the gradients do not."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return torch.full_like(grad, float("nan"))


class PoisonGradAfter:
    """Wraps a backend: from call ``n`` on, its velocity is unchanged but back-propagates NaN."""

    def __init__(self, inner, n: int) -> None:
        self.inner, self.n, self.calls = inner, n, 0
        self.dims, self.device, self.dtype = inner.dims, inner.device, inner.dtype

    def velocity(self, x_t, t, cond, guidance):
        self.calls += 1
        out = self.inner.velocity(x_t, t, cond, guidance)
        return NanGrad.apply(out) if self.calls > self.n else out

    def adapters(self, heads):
        return self.inner.adapters(heads)

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        self.inner.set_gradient_checkpointing(enabled)


class PoisonAfter(PoisonGradAfter):
    """From call ``n`` on, the velocity itself is NaN (so the loss is)."""

    def velocity(self, x_t, t, cond, guidance):
        self.calls += 1
        out = self.inner.velocity(x_t, t, cond, guidance)
        return out * float("nan") if self.calls > self.n else out


class PoisonGradOnce(PoisonGradAfter):
    """Only call ``n + 1`` back-propagates NaN; every later call is finite again (a transient spike)."""

    def velocity(self, x_t, t, cond, guidance):
        self.calls += 1
        out = self.inner.velocity(x_t, t, cond, guidance)
        return NanGrad.apply(out) if self.calls == self.n + 1 else out
