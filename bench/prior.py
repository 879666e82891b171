"""Does a LoMD prior help at small scale? Meta-trained vs distilled vs seeded Down vs a plain rank-16 LoRA.

Synthetic identities on the tiny FLUX (hidden 128, 2 double + 2 single blocks, diffusers backend):

* Generator. Faces differ from each other in a few directions of a shared space; here an identity IS a
  target change of the model drawn from a shared low-dimensional family. On every targeted layer ``l``
  there is one shared input subspace ``V_l`` (``--true-rank`` rows, orthonormal) and ``--family-dim``
  shared output bases ``B_l,k``; identity ``j`` has a code ``z_j ~ N(0, I)`` and its change is
  ``dW_l,j = (sum_k z_j,k B_l,k) V_l + Q_l,j P_l,j``, where ``Q P`` is a private rank-2 part (its own
  random input directions, ``--private`` of the energy) that no prior can predict. Every layer's change is
  scaled to ``--strength`` x the layer's weight norm. So a prior CAN exist (``V_l`` is shared) but does not
  explain everything (the private part).
* Personalization loss. The "photo" of identity ``j`` is its teacher model (base + ``dW_j``); the loss
  is the mean squared difference between the student's and the teacher's velocity on ``--draws`` fixed
  draws (latents 16x16, timestep, text features) per identity, divided by the loss of the untouched base
  model (so 1.0 = nothing learned, 0 = identity reproduced). The product trains on photos with the
  rectified-flow objective; at this scale that objective's irreducible noise would swamp the differences
  between Downs, so the bench regresses on the teacher's velocity: same model, same adapters, same
  optimizer, a noise-free target.
* Four ways to get the Down (rank 4), then personalization of fresh Mid (16 x 4) and Up on each held-out
  identity (AdamW, ``--lr``, ``--k`` steps, same draws and seeds for every method):
    meta       meta-trained on the ``--train-ids`` training identities: one shared Down, one Mid/Up head per
               identity, trained jointly on their losses (the paper's stage 1, on this objective);
    distilled  ``metalora_core.lomd.distill`` over plain rank-16 peft LoRAs trained on the same training
               identities (``--lora-steps`` each), written as diffusers LoRA files and read back;
    seeded     orthonormal random Down (no prior);
    lora       the baseline: a plain peft LoRA rank 16 on the same layers, no Down.
  Diagnostics only: ``oracle`` uses the generator's true ``V_l`` as the Down (the best any prior can do);
  ``lora_r4`` is a plain peft LoRA of rank 4 (the Down's rank, but a trained down projection).
* Reported: mean normalised loss at steps k/4, k/2, k; the steps each method needs to reach the plain
  LoRA's final loss (the paper: Meta-LoRA ~375 steps vs 625+ for LoRA, 1.67x); how much of the true
  subspace each Down holds (mean cos^2 of the principal angles to ``V_l``). The last two lines are
  ``ratio heldout_distilled_over_seeded X`` and ``ratio heldout_meta_over_seeded X`` (loss after k steps;
  below 1 = the prior helps).

  python bench/prior.py                 # ~8 minutes alone on 2 CPU cores
  python bench/prior.py --quick         # ~1 minute smoke run (numbers not meaningful)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from metalora_core.adapter import AdapterShape, IdentityHead  # noqa: E402
from metalora_core.dev.tiny_flux import TINY_DIMS, write_tiny_flux  # noqa: E402
from metalora_core.formats import SOURCE_KEY, LoMD  # noqa: E402
from metalora_core.inject import head_key, make_heads  # noqa: E402
from metalora_core.lomd.distill import DistillConfig, distill_lomd  # noqa: E402
from metalora_core.lomd.seeded import seeded_down, seeded_lomd  # noqa: E402
from metalora_core.safeio import save_tensors  # noqa: E402
from metalora_core.targets import resolve_targets  # noqa: E402
from metalora_core.training.diffusers_backend import DiffusersBackend  # noqa: E402
from metalora_core.training.lora_baseline import diffusers_modules, export_peft, peft_lora  # noqa: E402
from metalora_core.training.protocol import TextConditioning  # noqa: E402

PRESET = "attn_mlp"
SHAPE = AdapterShape(4, 16)


class Family:
    """The generator of identities (see the module docstring)."""

    def __init__(self, backend: DiffusersBackend, args) -> None:
        g = torch.Generator().manual_seed(args.seed + 1000)
        self.args, self.backend = args, backend
        self.targets = resolve_targets(backend.dims, PRESET)
        weights = dict(fused_weights(backend))
        self.V, self.B, self.norm = {}, {}, {}
        for t in self.targets:
            self.V[t.name] = torch.linalg.qr(torch.randn(t.in_features, args.true_rank, generator=g))[0].T
            self.B[t.name] = torch.randn(args.family_dim, t.out_features, args.true_rank, generator=g)
            self.norm[t.name] = float(weights[t.name].norm())
        # The nuisance family (bench/one_photo.py): what varies between photos of anyone (pose, light,
        # background). Its own input subspace U_l, whose principal angles to V_l all have cos^2 = overlap,
        # and its own output bases; drawn from a generator of its own, so the identities stay as they were.
        self.nuisance, overlap = getattr(args, "nuisance", 0.0), getattr(args, "overlap", 0.0)
        self.U, self.C = {}, {}
        gn = torch.Generator().manual_seed(args.seed + 2000)
        for t in self.targets:
            v = self.V[t.name].T  # (in, r)
            q = torch.linalg.qr(torch.cat([v, torch.randn(t.in_features, args.true_rank, generator=gn)], 1))[
                0
            ]
            apart = q[:, args.true_rank :]  # orthonormal, orthogonal to V_l
            self.U[t.name] = (overlap**0.5 * v + (1 - overlap) ** 0.5 * apart).T
            self.C[t.name] = torch.randn(args.family_dim, t.out_features, args.true_rank, generator=gn)

    def change(self, j: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Identity ``j``'s change per layer as ``(down, up)`` with ``up @ down = dW``: Down = [V; P]."""
        a = self.args
        g = torch.Generator().manual_seed(a.seed * 7919 + j)
        z = torch.randn(a.family_dim, generator=g)
        out = {}
        for t in self.targets:
            shared_up = torch.einsum("k,kor->or", z, self.B[t.name])
            private_down = torch.linalg.qr(torch.randn(t.in_features, 2, generator=g))[0].T
            private_up = torch.randn(t.out_features, 2, generator=g)
            shared = shared_up @ self.V[t.name]
            private = private_up @ private_down
            shared = shared / shared.norm() * (1 - a.private) ** 0.5
            private = private / private.norm() * a.private**0.5
            gain = a.strength * self.norm[t.name]
            down = torch.cat([self.V[t.name], private_down])
            up = gain * torch.cat([shared @ self.V[t.name].T, private @ private_down.T], dim=1)
            out[t.name] = (down, up)
        return out

    def nuisance_change(self, j: int, p: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Photo ``p`` of identity ``j``: its nuisance change per layer, ``(U_l, up)``, with
        ``|N|^2 = nuisance * |dW_j|^2`` (the identity's energy on that layer)."""
        g = torch.Generator().manual_seed(self.args.seed * 104_729 + j * 1_000 + p)
        w = torch.randn(self.args.family_dim, generator=g)
        identity = self.change(j)
        out = {}
        for t in self.targets:
            n = torch.einsum("k,kor->or", w, self.C[t.name]) @ self.U[t.name]
            down, up = identity[t.name]
            n = n / n.norm() * (up @ down).norm() * self.nuisance**0.5
            out[t.name] = (self.U[t.name], n @ self.U[t.name].T)
        return out

    def heads(self, parts: list[dict[str, tuple[torch.Tensor, torch.Tensor]]]) -> nn.ModuleDict:
        """Fixed heads (Mid = I) whose change is the sum of ``parts`` (each ``{layer: (down, up)}``)."""
        heads = nn.ModuleDict()
        for t in self.targets:
            down = torch.cat([part[t.name][0] for part in parts])
            up = torch.cat([part[t.name][1] for part in parts], dim=1)
            r = down.shape[0]
            heads[head_key(t.name)] = IdentityHead(down, t.out_features, r, 1.0, torch.eye(r), up)
        return heads

    def teacher(self, j: int) -> nn.ModuleDict:
        """Identity ``j``'s change as fixed heads: Down = [V; P], Mid = I, Up = [sum z B, Q]."""
        return self.heads([self.change(j)])

    def photo(self, j: int, p: int) -> nn.ModuleDict:
        """Photo ``p`` of identity ``j``: the identity's change plus that photo's nuisance change."""
        if not self.nuisance:
            return self.teacher(j)
        return self.heads([self.change(j), self.nuisance_change(j, p)])


def fused_weights(backend: DiffusersBackend):
    """(canonical name, fused weight) of every target, concatenating diffusers' split pieces."""
    from metalora_core.targets import diffusers_pieces

    model = backend.model
    for t in resolve_targets(backend.dims, PRESET):
        parts = [model.get_submodule(m).weight for m, _ in diffusers_pieces(t.name, backend.dims)]
        yield t.name, torch.cat(parts).detach()


class Task:
    """Fixed draws (seeded by ``draw_seed``), a teacher's velocities on them, and the base model's loss
    against that teacher (the normaliser: 1.0 = nothing learned)."""

    def __init__(
        self,
        backend: DiffusersBackend,
        teacher: nn.ModuleDict,
        draw_seed: int,
        draws: int,
        batch: int | None = None,
    ) -> None:
        g = torch.Generator().manual_seed(draw_seed)
        self.batch, self.calls = batch, 0  # batch: each loss() takes the next ``batch`` draws of the pool
        dims = backend.dims
        self.backend = backend
        self.x = torch.randn(draws, dims.in_channels, 16, 16, generator=g)
        self.t = torch.rand(draws, generator=g) * 0.8 + 0.1
        self.cond = TextConditioning(
            torch.randn(8, dims.context_dim, generator=g), torch.randn(dims.vec_dim, generator=g)
        )
        with torch.no_grad():
            with backend.adapters(teacher):
                self.target = self.velocity()
            self.base = float((self.velocity() - self.target).pow(2).mean())

    def velocity(self, rows: slice = slice(None)) -> torch.Tensor:
        return self.backend.velocity(self.x[rows], self.t[rows], self.cond, 1.0)

    def loss(self) -> torch.Tensor:
        """Normalised loss on all draws, or (with ``batch``) on the next window of the pool, in turn."""
        rows = slice(None)
        if self.batch:
            start = (self.calls * self.batch) % self.x.shape[0]
            rows, self.calls = slice(start, start + self.batch), self.calls + 1
        return (self.velocity(rows) - self.target[rows]).pow(2).mean() / self.base


def fit(task: Task | list[Task], params, steps: int, lr: float, probe=None) -> list[float]:
    """AdamW on ``params`` for ``steps`` steps; the loss before each step and after the last.

    Several tasks (photos of one person) are taken in turn, one per step. ``probe(step)``, if given, is
    called before each step and after the last (the held-out evaluation of bench/one_photo.py).
    """
    tasks = task if isinstance(task, list) else [task]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    curve = []
    for step in range(steps + 1):
        if probe is not None:
            probe(step)
        loss = tasks[step % len(tasks)].loss()
        curve.append(float(loss.detach()))
        if step == steps:
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return curve


def personalize(task: Task, lomd: LoMD, steps: int, lr: float, seed: int, probe=None) -> list[float]:
    torch.manual_seed(seed)  # Mid's random init: the same for every Down
    heads = make_heads(task.backend.dims, lomd)
    with task.backend.adapters(heads):
        return fit(task, list(heads.parameters()), steps, lr, probe)


def plain_lora(
    task: Task | list[Task], steps: int, lr: float, seed: int, rank: int = 16, probe=None
) -> tuple[list[float], dict[str, torch.Tensor]]:
    backend = (task[0] if isinstance(task, list) else task).backend
    with peft_lora(backend.model, diffusers_modules(backend, PRESET), rank, float(rank), seed) as params:
        curve = fit(task, list(params.values()), steps, lr, probe)
        return curve, export_peft(params, 1.0)


def meta_train(backend: DiffusersBackend, tasks: list[Task] | list[list[Task]], args) -> LoMD:
    """Stage 1 on this objective: one shared Down (Parameter) under every training identity's head.

    ``tasks[j]`` is identity ``j``'s task, or the list of its photos' tasks, taken in turn (the paper's
    stage 1 sees several photos per identity)."""
    dims = backend.dims
    downs = {
        t.name: nn.Parameter(seeded_down(t.name, t.in_features, SHAPE.rank_down, args.seed))
        for t in resolve_targets(dims, PRESET)
    }
    torch.manual_seed(args.seed)
    bank = []
    for _ in tasks:
        heads = nn.ModuleDict()
        for t in resolve_targets(dims, PRESET):
            heads[head_key(t.name)] = IdentityHead(downs[t.name], t.out_features, SHAPE.rank_mid, SHAPE.scale)
        bank.append(heads)
    params = list(downs.values()) + [
        p for h in bank for n, p in h.named_parameters() if not n.endswith("down")
    ]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    for step in range(args.meta_steps):
        opt.zero_grad(set_to_none=True)
        batch = [(step * args.meta_batch + i) % len(tasks) for i in range(args.meta_batch)]
        for j in batch:
            task = tasks[j][step % len(tasks[j])] if isinstance(tasks[j], list) else tasks[j]
            with backend.adapters(bank[j]):
                (task.loss() / len(batch)).backward()
        opt.step()
    lomd = {n: d.detach().clone() for n, d in downs.items()}
    return LoMD(lomd, SHAPE, "flux", dims.hidden, {SOURCE_KEY: "meta-trained"})


def subspace_share(lomd: LoMD, family: Family) -> float:
    """Mean over layers of the mean cos^2 of the principal angles between the Down's rows and V_l."""
    shares = []
    for name, v in family.V.items():
        q = torch.linalg.qr(lomd.downs[name].double().T)[0]
        shares.append(float(torch.linalg.svdvals(v.double() @ q).pow(2).mean()))
    return statistics.mean(shares)


def steps_to(curve: list[float], level: float) -> int | None:
    return next((s for s, v in enumerate(curve) if v <= level), None)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train-ids", type=int, default=12, help="training identities (meta-training, LoRAs)")
    p.add_argument("--heldout", type=int, default=4, help="held-out identities personalized by every method")
    p.add_argument("--meta-steps", type=int, default=480)
    p.add_argument("--meta-batch", type=int, default=4, help="identities per meta-training step")
    p.add_argument("--lora-steps", type=int, default=200, help="steps of each LoRA distillation reads")
    p.add_argument("--k", type=int, default=120, help="personalization steps on held-out identities")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--draws", type=int, default=4, help="fixed draws per identity")
    p.add_argument("--family-dim", type=int, default=8)
    p.add_argument("--true-rank", type=int, default=4)
    p.add_argument("--private", type=float, default=0.15, help="share of each change no prior can predict")
    p.add_argument("--strength", type=float, default=0.3, help="change norm / weight norm per layer")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="tiny settings for a smoke run")
    args = p.parse_args(argv)
    if args.quick:
        args.train_ids, args.heldout, args.meta_steps, args.lora_steps, args.k = 4, 2, 8, 6, 8
    torch.set_num_threads(1)  # tiny model: intra-op threads only spin (and the machine is shared)
    begun = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        flux = write_tiny_flux(Path(tmp) / "tiny_flux.safetensors", "bfl", TINY_DIMS, seed=0)
        backend = DiffusersBackend.from_path(flux)
        family = Family(backend, args)
        train = [Task(backend, family.teacher(j), 10_000 + j, args.draws) for j in range(args.train_ids)]
        held = [
            Task(backend, family.teacher(100_000 + j), 110_000 + j, args.draws) for j in range(args.heldout)
        ]

        t0 = time.perf_counter()
        meta = meta_train(backend, train, args)
        t_meta = time.perf_counter() - t0
        t0 = time.perf_counter()
        paths = []
        for j, task in enumerate(train):
            _, lora = plain_lora(task, args.lora_steps, args.lr, args.seed + j)
            paths.append(save_tensors(Path(tmp) / f"lora_{j:03d}.safetensors", lora, {}))
        report = distill_lomd(paths, backend.dims, DistillConfig(SHAPE.rank_down, SHAPE.rank_mid, PRESET))
        t_distill = time.perf_counter() - t0
        downs = {
            "meta": meta,
            "distilled": report.lomd,
            "seeded": seeded_lomd(backend.dims, SHAPE, PRESET, seed=args.seed + 1),
            "oracle": LoMD(dict(family.V), SHAPE, "flux", backend.dims.hidden),
        }
        curves: dict[str, list[list[float]]] = {m: [] for m in [*downs, "lora", "lora_r4"]}
        for h, task in enumerate(held):
            for name, lomd in downs.items():
                curves[name].append(personalize(task, lomd, args.k, args.lr, args.seed + h))
            curves["lora"].append(plain_lora(task, args.k, args.lr, args.seed + h)[0])
            curves["lora_r4"].append(plain_lora(task, args.k, args.lr, args.seed + h, rank=4)[0])
    mean = {m: [statistics.mean(c[s] for c in cs) for s in range(args.k + 1)] for m, cs in curves.items()}
    target = mean["lora"][-1]
    print(
        f"tiny FLUX hidden {TINY_DIMS.hidden}, {args.train_ids} training / {args.heldout} held-out identities, "
        f"family dim {args.family_dim}, true rank {args.true_rank}, private {args.private:.0%}; "
        f"meta-training {args.meta_steps} steps ({t_meta:.0f} s), {args.train_ids} LoRAs x {args.lora_steps} "
        f"steps + distillation ({t_distill:.0f} s, energy kept {report.summary()['energy_kept_mean']:.1%})"
    )
    quarter, half = args.k // 4, args.k // 2
    print(f"{'Down':10s} {'V share':>8s} {'loss@' + str(quarter):>9s} {'loss@' + str(half):>9s} "
          f"{'loss@' + str(args.k):>9s} {'steps to LoRA final':>19s}")  # fmt: skip
    for m in [*downs, "lora", "lora_r4"]:
        share = f"{subspace_share(downs[m], family):8.3f}" if m in downs else f"{'-':>8s}"
        reach = steps_to(mean[m], target)
        reach_text = str(reach) if reach is not None else f">{args.k}"
        print(
            f"{m:10s} {share} {mean[m][quarter]:9.4f} {mean[m][half]:9.4f} {mean[m][-1]:9.4f} {reach_text:>19s}"
        )
    meta_reach = steps_to(mean["meta"], target)
    if meta_reach:
        print(f"speedup steps lora_over_meta {args.k / meta_reach:.2f} (the paper: 625+/375 = 1.67)")
    print(f"total {time.perf_counter() - begun:.0f} s")
    print(f"ratio heldout_distilled_over_seeded {mean['distilled'][-1] / mean['seeded'][-1]:.3f}")
    print(f"ratio heldout_meta_over_seeded {mean['meta'][-1] / mean['seeded'][-1]:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
