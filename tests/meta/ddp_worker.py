"""One process of the data-parallel test run (launched by tests/meta/test_ddp.py through
``python -m torch.distributed.run``): meta-train the synthetic set and write THIS rank's LoMD, so the test
can check that every rank ends with the same weights."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed

sys.path.insert(0, str(Path(__file__).parent))

from conftest import _build  # noqa: E402

from metalora_core.formats import save_lomd  # noqa: E402
from metalora_core.meta.distributed import init_from_env, shutdown  # noqa: E402
from metalora_core.meta.train import MetaConfig, MetaTrainer  # noqa: E402
from metalora_core.training.diffusers_backend import DiffusersBackend  # noqa: E402


def main() -> None:
    paths, config, out = json.loads(sys.argv[1]), MetaConfig(**json.loads(sys.argv[2])), Path(sys.argv[3])
    torch.set_num_threads(1)
    if len(sys.argv) > 4:  # a group created before us with a backend for cuda only, as NCCL on a GPU
        torch.distributed.init_process_group(backend=sys.argv[4])
    ctx = init_from_env()
    try:
        assets = {k: Path(v) for k, v in paths.items()}
        data, plan, prepared = _build(assets, config.identities_per_batch, config.seed, ctx.owns)
        trainer = MetaTrainer(DiffusersBackend.from_path(assets["flux"]), data, plan, prepared, config, ctx)
        result = trainer.train()
        save_lomd(out / f"rank{ctx.rank}.safetensors", result.lomd)
        (out / f"rank{ctx.rank}.json").write_text(json.dumps({"losses": result.losses, "world": ctx.world}))
    finally:
        shutdown(ctx)


if __name__ == "__main__":
    main()
