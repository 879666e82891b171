"""Every random number of a training run, drawn ahead of the steps from the one seeded CPU generator.

Per step, in this order (the order the loop has always used, so seeds, checkpoints and resumed runs keep
their numbers): the view index (``randint``), the timestep (:func:`.objective.sample_timesteps`) and the
noise (``randn`` of the batch's latent shape). They are drawn for a chunk of steps at a time and moved to
the device in one pinned, non-blocking copy, so a step never copies pageable memory (a copy that waits for
the device's queue) and never draws on the host while the device idles. The generator state before each
drawn step is kept, so a checkpoint written after step ``k`` holds exactly the state an uninterrupted run
had there.
"""

from __future__ import annotations

import torch

from ..errors import MetaLoRAError
from .objective import FLUX_SHIFT_RANGE, sample_timesteps


class StepDraws:
    """The draws of steps ``start, start + 1, ...`` of a run of ``total`` steps, taken in order."""

    def __init__(
        self,
        generator: torch.Generator,
        views: int,
        batch: int,
        latent_shape: tuple[int, int, int],
        shift: bool,
        device: torch.device,
        start: int,
        total: int,
        chunk: int = 32,
        shift_range: tuple[int, int, float, float] = FLUX_SHIFT_RANGE,
    ) -> None:
        self.generator, self.views, self.batch = generator, views, batch
        self.latent_shape, self.shift, self.device = tuple(latent_shape), shift, device
        self.total, self.chunk, self.shift_range = total, max(1, chunk), shift_range
        self.first, self.states = start, []  # the current chunk: its first step and per-step states
        self.index = self.t = self.noise = torch.empty(0)

    def take(self, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(view indices ``(B,)``, timesteps ``(B,)``, noise ``(B, C, H, W)``) of ``step``, on the device."""
        if not self.first <= step < self.first + len(self.states):
            if step != self.first + len(self.states) or step >= self.total:
                raise MetaLoRAError(f"draws are taken in order: step {step} asked after {self.drawn_until}")
            self._fill(step)
        i = step - self.first
        return self.index[i], self.t[i], self.noise[i]

    @property
    def drawn_until(self) -> int:
        return self.first + len(self.states)

    def state_before(self, step: int) -> torch.Tensor:
        """The generator's state before ``step``'s draws (what a checkpoint after ``step`` steps stores)."""
        if step == self.drawn_until:
            return self.generator.get_state()
        if not self.first <= step < self.drawn_until:
            raise MetaLoRAError(f"no generator state kept for step {step}")
        return self.states[step - self.first]

    def _fill(self, step: int) -> None:
        g, hw = self.generator, self.latent_shape[1:]
        states, index, t, noise = [], [], [], []
        for _ in range(min(self.chunk, self.total - step)):
            states.append(g.get_state())
            index.append(torch.randint(self.views, (self.batch,), generator=g))
            t.append(sample_timesteps(self.batch, hw, g, self.shift, shift_range=self.shift_range))
            noise.append(torch.randn((self.batch, *self.latent_shape), generator=g))
        self.first, self.states = step, states
        self.index, self.t, self.noise = (_to_device(torch.stack(x), self.device) for x in (index, t, noise))


def _to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """One copy; from pinned memory and without waiting when the device is a GPU."""
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


__all__ = ["StepDraws"]
