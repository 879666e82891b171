"""The hold-out check: does the LoMD being meta-trained make new identities converge faster?

Every K steps a few identities never seen in meta-training are personalized for M steps from the current
LoMD (:func:`personalize`, stage 2 as users run it) and, on the very same views, timesteps and noise, a
plain LoRA is trained for the same M steps (:func:`train_lora_baseline`). The paper's headline claim is
that the first beats the second at equal budget; this logs both so a run shows whether it does.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..formats import LoMD
from ..training.diffusers_backend import DiffusersBackend
from ..training.lora_baseline import train_lora_baseline
from ..training.personalize import PersonalizeConfig, personalize
from ..training.protocol import TextConditioning


@dataclass
class HoldoutCheck:
    """Held-out identities' views and text, and how to compare (``tail``: losses averaged at the end)."""

    views: Mapping[str, list[torch.Tensor]]  # identity name -> latents (C, h, w), one shape each
    conds: Mapping[str, TextConditioning]
    every: int = 100
    steps: int = 20
    lr: float = PersonalizeConfig.lr
    lora_rank: int = 16
    seed: int = 0
    log_path: str | os.PathLike | None = None
    history: list[dict[str, object]] = field(default_factory=list)

    def due(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    def run(self, backend: DiffusersBackend, lomd: LoMD, step: int) -> dict[str, object]:
        """Personalize and LoRA-train each held-out identity for ``steps``; log mean final losses."""
        config = PersonalizeConfig(steps=self.steps, lr=self.lr, warmup_steps=0, seed=self.seed)
        tail = max(1, self.steps // 4)
        meta, lora = [], []
        for name, views in self.views.items():
            ours = personalize(backend, lomd, views, self.conds[name], config)
            base = train_lora_baseline(backend, views, self.conds[name], config, rank=self.lora_rank)
            meta.append(sum(ours.losses[-tail:]) / tail)
            lora.append(sum(base.losses[-tail:]) / tail)
        row = {
            "step": step,
            "identities": len(meta),
            "personalize_steps": self.steps,
            "metalora_loss": sum(meta) / len(meta),
            "lora_loss": sum(lora) / len(lora),
            "per_identity": {n: [m, b] for n, m, b in zip(self.views, meta, lora)},
        }
        row["advantage"] = row["lora_loss"] - row["metalora_loss"]  # > 0: Meta-LoRA lower at equal budget
        self.history.append(row)
        if self.log_path is not None:
            path = Path(self.log_path)
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("a", encoding="utf-8") as fh:
                fh.write(json.dumps(row) + "\n")
        return row
