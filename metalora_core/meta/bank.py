"""The bank of per-identity Mid/Up heads, kept on the CPU with their AdamW moments.

Only the identities of the current batch are paged onto the training device, as :class:`IdentityHead`
modules sharing the one trainable Down, with a small AdamW holding just their state; after the step the
new weights and moments go back to the bank. So device memory and optimizer state grow with the batch, not
with the number of identities (the paper used ~1,450). Identities not in a batch are untouched (no
decay, no moment update: "lazy" AdamW, the usual choice for embedding-like tables).

Every head starts from a seed derived from its identity index alone, so 1 process and N processes build
the same bank; a process holds only the identities it owns (``index % world == rank``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace

import torch
from torch import nn

from ..adapter import IdentityHead
from ..formats import SOURCE_KEY, IdentityAdapter, LoMD
from ..inject import head_key
from ..training.schedules import make_adamw

MOMENTS = ("exp_avg", "exp_avg_sq")


@dataclass(frozen=True)
class BankLayout:
    """Shapes of one identity's heads: ``out_features`` per canonical target, and the ranks."""

    outs: dict[str, int]
    rank_down: int
    rank_mid: int

    def shapes(self, identity: int) -> dict[str, tuple[int, ...]]:
        """Every tensor the bank keeps for ``identity``: weights, both AdamW moments, the step count."""
        out: dict[str, tuple[int, ...]] = {f"{identity}.step": ()}
        for name, features in self.outs.items():
            for part, shape in (("mid", (self.rank_mid, self.rank_down)), ("up", (features, self.rank_mid))):
                out[f"{identity}.{name}.{part}"] = shape
                for m in MOMENTS:
                    out[f"{identity}.{name}.{part}.{m}"] = shape
        return out

    def initial(self, identity: int, seed: int) -> dict[str, torch.Tensor]:
        """Fresh heads: Mid uniform in +-1/sqrt(rank_down) (kaiming, as IdentityHead), Up and moments zero."""
        g = torch.Generator().manual_seed(seed * 1_000_003 + identity)
        bound = 1.0 / self.rank_down**0.5
        tensors = {k: torch.zeros(s) for k, s in self.shapes(identity).items()}
        for name in self.outs:
            mid = tensors[f"{identity}.{name}.mid"]
            mid.copy_((torch.rand(mid.shape, generator=g) * 2 - 1) * bound)
        return tensors


class HeadBank:
    """CPU tensors of the identities this process owns (see :meth:`BankLayout.shapes` for the names)."""

    def __init__(self, layout: BankLayout, identities: Iterable[int], seed: int = 0) -> None:
        self.layout = layout
        self.identities = sorted(set(identities))
        self.tensors: dict[str, torch.Tensor] = {}
        for i in self.identities:
            self.tensors.update(layout.initial(i, seed))

    def page_in(
        self,
        identities: Iterable[int],
        downs: Mapping[str, nn.Parameter],
        scale: float,
        lr: float,
        weight_decay: float,
        device: torch.device | str,
    ) -> tuple[dict[int, nn.ModuleDict], torch.optim.AdamW]:
        """Heads for ``identities`` on ``device`` (sharing ``downs``) and an AdamW holding only their state."""
        heads: dict[int, nn.ModuleDict] = {}
        params: list[nn.Parameter] = []
        for i in identities:
            heads[i] = nn.ModuleDict(
                {
                    head_key(name): IdentityHead(
                        downs[name],
                        features,
                        self.layout.rank_mid,
                        scale,
                        mid_init=self.tensors[f"{i}.{name}.mid"].to(device),
                        up_init=self.tensors[f"{i}.{name}.up"].to(device),
                    )
                    for name, features in self.layout.outs.items()
                }
            )
            params.extend(p for n, p in heads[i].named_parameters() if not n.endswith("down"))
        optimizer = make_adamw([{"params": params, "lr": lr, "weight_decay": weight_decay}])
        for i, mods in heads.items():
            for name in self.layout.outs:
                head = mods[head_key(name)]
                for part in ("mid", "up"):
                    p = getattr(head, part)
                    state = {m: self.tensors[f"{i}.{name}.{part}.{m}"].to(device).clone() for m in MOMENTS}
                    optimizer.state[p] = {"step": self.tensors[f"{i}.step"].clone(), **state}
        return heads, optimizer

    def page_out(self, heads: Mapping[int, nn.ModuleDict], optimizer: torch.optim.Optimizer) -> None:
        """Write the stepped weights and moments of paged heads back to the CPU bank."""
        for i, mods in heads.items():
            for name in self.layout.outs:
                head = mods[head_key(name)]
                for part in ("mid", "up"):
                    p = getattr(head, part)
                    self.tensors[f"{i}.{name}.{part}"].copy_(p.detach().cpu())
                    state = optimizer.state[p]
                    for m in MOMENTS:
                        self.tensors[f"{i}.{name}.{part}.{m}"].copy_(state[m].detach().cpu())
                    step = state["step"]
            self.tensors[f"{i}.step"].copy_(torch.as_tensor(step, dtype=torch.float32))


def optimizer_state_numel(optimizer: torch.optim.Optimizer) -> int:
    """Elements held in an optimizer's state tensors (what a paged batch costs on the device)."""
    return sum(v.numel() for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor))


def bank_adapters(
    bank: Mapping[str, torch.Tensor], layout: BankLayout, lomd: LoMD, names: Mapping[int, str]
) -> dict[str, IdentityAdapter]:
    """The meta-trained heads of a full bank as identity adapters (for analysis), by identity name."""
    shape = replace(lomd.shape, rank_mid=layout.rank_mid)
    out = {}
    for i, name in names.items():
        mids = {n: bank[f"{i}.{n}.mid"].clone() for n in layout.outs}
        ups = {n: bank[f"{i}.{n}.up"].clone() for n in layout.outs}
        training = {"method": "metalora-stage1-head", "identity": name, "steps": int(bank[f"{i}.step"])}
        meta = {SOURCE_KEY: lomd.origin}
        out[name] = IdentityAdapter(
            mids, ups, shape, lomd.fingerprint, training, lomd.base_arch, lomd.hidden_size, meta
        )
    return out
