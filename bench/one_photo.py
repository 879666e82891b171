"""What Meta-LoRA claims, asked synthetically: from ONE photo, who generalises to the person's OTHER photos?

bench/prior.py asks how fast each Down fits an identity's whole change; there is nothing photo-specific to
overfit there, so raw capacity wins (a rank-16 LoRA). The paper's claim is different: with one photo, a
shared meta-learned Down keeps the adapter on identity directions, so it does not copy the photo's pose,
light and background, and scores higher R-FaceSim on the person's other photos. This bench asks that, on
bench/prior.py's tiny FLUX, generator and Down sources (nothing is drawn a second way):

* Photos. Photo (j, p) of identity j is the teacher ``base + dW_j + N_jp``:
  - ``dW_j``, the identity change of bench/prior.py (a shared family on input subspace ``V_l`` plus a
    private part);
  - ``N_jp``, that photo's nuisance change, drawn from a nuisance family shared by all photos of all
    people: its own input subspace ``U_l`` (cos^2 of every principal angle to ``V_l`` = ``--overlap``),
    its own output bases, a fresh code per photo, ``--nuisance`` times the identity's energy per layer.
  This mirrors faces: every person's photos vary in the same ways (pose, light, expression, background:
  one family for everyone), and identity is what stays the same across one person's photos. A photo is
  identity plus one draw of everything else; an adapter that fits the photo fits both.
* Stage 1 sees several photos (``--photos``) per training identity, as the paper's does: meta-training
  takes one photo per identity per step through that identity's head; the LoRAs that distillation reads
  are trained on all of their person's photos, as users' person LoRAs are.
* Personalization uses ONE photo (j, 0) of each held-out identity: each step takes the next ``--batch``
  draws (latent, time, text) of a pool of ``--draws``, as the real trainer draws new noise and times of its
  one photo every step (a handful of fixed draws would be memorised, and every method then scored worse
  than doing nothing on fresh draws). Every method gets the same draws, steps and seeds: meta-trained, distilled and seeded Downs; diagnostics: the oracle Down (``V_l``) and plain
  peft LoRAs of rank 16 and 4.
* Scores (each normalised by the untouched base model's loss on the same target, so 1 = nothing learned):
  ``fit``, on the training photo and the draws of the step; ``other``, on the same person's OTHER photos, on other
  draws: the R-FaceSim analogue (new generations against other photos), the number that matters; ``identity``, against the identity-only teacher
  ``base + dW_j``; ``gap`` = other - fit. At k/4, k/2 and k steps; the LoRA also early-stopped (its best
  step on ``other``, evaluated every ``--eval-every`` steps), and the steps each method needs to reach that
  best.
* A sweep over ``--nuisance`` (default 0, 0.5, 1, 2; at 0 the photos equal the identity and this is
  bench/prior.py's question). The levels run in parallel processes.

Last lines: ``ratio heldout_photos_meta_over_lora X`` and ``ratio heldout_photos_distilled_over_lora X`` at
nuisance 1: loss on other photos after k steps (below 1 = the prior generalises better).

  python bench/one_photo.py             # ~15 minutes on 2 CPU cores
  python bench/one_photo.py --quick     # smoke run (numbers not meaningful)
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def _prior():
    """bench/prior.py as a module: its generator, tasks, training loops and Down sources."""
    spec = importlib.util.spec_from_file_location("prior_bench", HERE / "prior.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("prior_bench", module)
    spec.loader.exec_module(module)
    return module


METHODS = ("meta", "distilled", "seeded", "oracle", "lora", "lora_r4")


def held_out_scores(P, backend, family, j: int, downs: dict, args) -> dict[str, dict]:
    """Personalize every method on photo (j, 0); score fit, other photos and identity along the way."""
    # The photo trains on its --draws; the person's other photos and the identity are scored on other draws
    # (--eval-draws, one set per person): as R-FaceSim scores new generations against other photos.
    photo = P.Task(backend, family.photo(j, 0), 20_000 + j, args.draws, args.batch)
    seed, n = 50_000 + j, args.eval_draws
    others = [P.Task(backend, family.photo(j, p), seed, n) for p in range(1, args.photos)]
    identity = P.Task(backend, family.teacher(j), seed, n)
    marks = sorted({args.k // 4, args.k // 2, args.k, *range(0, args.k + 1, args.eval_every)})
    out = {}
    for name in METHODS:
        trace: dict[int, tuple[float, float]] = {}

        def probe(step: int, trace=trace) -> None:
            if step in marks:
                with torch.no_grad():
                    other = statistics.mean(float(t.loss()) for t in others)
                    trace[step] = (other, float(identity.loss()))

        seed = args.seed + j
        if name in downs:
            fit = P.personalize(photo, downs[name], args.k, args.lr, seed, probe)
        else:
            rank = 16 if name == "lora" else 4
            fit = P.plain_lora(photo, args.k, args.lr, seed, rank, probe)[0]
        out[name] = {"fit": fit, "trace": trace}
    return out


def run_level(nuisance: float, args) -> dict:
    """One nuisance level: the family, stage 1 (meta-training, distillation), then every held-out person."""
    P = _prior()
    torch.set_num_threads(1)
    args = argparse.Namespace(**{**vars(args), "nuisance": nuisance})
    begun = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        flux = P.write_tiny_flux(Path(tmp) / "tiny_flux.safetensors", "bfl", P.TINY_DIMS, seed=0)
        backend = P.DiffusersBackend.from_path(flux)
        family = P.Family(backend, args)
        train = [
            [
                P.Task(backend, family.photo(j, p), 10_000 + 97 * j + p, args.draws, args.batch)
                for p in range(args.photos)
            ]
            for j in range(args.train_ids)
        ]
        meta = P.meta_train(backend, train, args)
        paths = []
        for j, photos in enumerate(train):
            _, lora = P.plain_lora(photos, args.lora_steps, args.lr, args.seed + j)
            paths.append(P.save_tensors(Path(tmp) / f"lora_{j:03d}.safetensors", lora, {}))
        config = P.DistillConfig(P.SHAPE.rank_down, P.SHAPE.rank_mid, P.PRESET)
        distilled = P.distill_lomd(paths, backend.dims, config).lomd
        downs = {
            "meta": meta,
            "distilled": distilled,
            "seeded": P.seeded_lomd(backend.dims, P.SHAPE, P.PRESET, seed=args.seed + 1),
            "oracle": P.LoMD(dict(family.V), P.SHAPE, "flux", backend.dims.hidden),
        }
        shares = {name: P.subspace_share(lomd, family) for name, lomd in downs.items()}
        held = [held_out_scores(P, backend, family, 100_000 + h, downs, args) for h in range(args.heldout)]
    return {"nuisance": nuisance, "held": held, "shares": shares, "seconds": time.perf_counter() - begun}


def summarize(level: dict, args) -> dict[str, dict]:
    """Per method, means over held-out people: fit / other / identity at the marks, best other, and the
    steps to reach the LoRA's best other-photos loss."""
    k, held = args.k, level["held"]
    marks = (k // 4, k // 2, k)
    rows = {}
    for m in METHODS:
        fit = [statistics.mean(h[m]["fit"][s] for h in held) for s in marks]
        steps = sorted(held[0][m]["trace"])
        other = {s: statistics.mean(h[m]["trace"][s][0] for h in held) for s in steps}
        ident = {s: statistics.mean(h[m]["trace"][s][1] for h in held) for s in steps}
        best = min(steps, key=other.__getitem__)
        rows[m] = {
            "fit": fit,
            "other": [other[s] for s in marks],
            "identity": [ident[s] for s in marks],
            "gap": other[k] - fit[-1],
            "best": (other[best], best),
            "curve": other,
        }
    target = rows["lora"]["best"][0]
    for r in rows.values():
        r["reach"] = next((s for s in sorted(r["curve"]) if r["curve"][s] <= target), None)
    return rows


def print_level(level: dict, rows: dict, args) -> None:
    k = args.k
    q, h = k // 4, k // 2
    print(
        f"\nnuisance {level['nuisance']:g} (x the identity's energy), overlap {args.overlap:g}: "
        f"{args.heldout} held-out people x 1 photo, {args.photos - 1} other photos each ({level['seconds']:.0f} s)"
    )
    print(
        f"{'method':10s} {'V share':>7s} {'fit@' + str(k):>8s} {'other@' + str(q):>9s} {'other@' + str(h):>9s} "
        f"{'other@' + str(k):>9s} {'ident@' + str(k):>9s} {'gap@' + str(k):>8s} {'best other (step)':>18s} "
        f"{'steps to LoRA best':>18s}"
    )
    for m, r in rows.items():
        share = f"{level['shares'][m]:7.3f}" if m in level["shares"] else f"{'-':>7s}"
        best = f"{r['best'][0]:.4f} ({r['best'][1]})"
        reach = str(r["reach"]) if r["reach"] is not None else f">{k}"
        print(
            f"{m:10s} {share} {r['fit'][2]:8.4f} {r['other'][0]:9.4f} {r['other'][1]:9.4f} {r['other'][2]:9.4f} "
            f"{r['identity'][2]:9.4f} {r['gap']:8.4f} {best:>18s} {reach:>18s}"
        )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nuisance", default="0,0.5,1,2", help="comma list of nuisance energies (x identity's)")
    p.add_argument("--overlap", type=float, default=0.05, help="cos^2 of the angles between U_l and V_l")
    p.add_argument(
        "--photos", type=int, default=4, help="photos per person (held-out: 1 to train, rest scored)"
    )
    p.add_argument("--train-ids", type=int, default=8, help="training identities (meta-training, LoRAs)")
    p.add_argument("--heldout", type=int, default=3, help="held-out identities personalized by every method")
    p.add_argument("--meta-steps", type=int, default=240)
    p.add_argument("--meta-batch", type=int, default=4, help="identities per meta-training step")
    p.add_argument("--lora-steps", type=int, default=120, help="steps of each LoRA distillation reads")
    p.add_argument("--k", type=int, default=100, help="personalization steps from the one photo")
    p.add_argument("--eval-every", type=int, default=10, help="steps between held-out evaluations")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument(
        "--draws", type=int, default=48, help="pool of draws (latent, time, text) a photo trains on"
    )
    p.add_argument(
        "--batch", type=int, default=4, help="draws per training step, taken from the pool in turn"
    )
    p.add_argument("--eval-draws", type=int, default=8, help="other draws the scores are taken on")
    p.add_argument("--family-dim", type=int, default=8)
    p.add_argument("--true-rank", type=int, default=4)
    p.add_argument(
        "--private", type=float, default=0.15, help="share of each identity change no prior predicts"
    )
    p.add_argument("--strength", type=float, default=0.3, help="identity change norm / weight norm per layer")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=2, help="nuisance levels run in this many processes")
    p.add_argument("--quick", action="store_true", help="tiny settings for a smoke run")
    args = p.parse_args(argv)
    if args.quick:
        args.train_ids, args.heldout, args.meta_steps, args.lora_steps, args.k = 3, 1, 6, 4, 8
        args.photos, args.eval_every, args.nuisance = 3, 4, "0,1"
        args.draws, args.batch, args.eval_draws = 4, 2, 2
    levels = [float(x) for x in args.nuisance.split(",")]
    begun = time.perf_counter()
    if args.workers > 1 and len(levels) > 1:
        with ProcessPoolExecutor(max_workers=args.workers) as pool:
            results = list(pool.map(run_level, levels, [args] * len(levels)))
    else:
        results = [run_level(level, args) for level in levels]
    print(
        f"tiny FLUX, {args.train_ids} training identities x {args.photos} photos (stage 1), family dim "
        f"{args.family_dim}, true rank {args.true_rank}, private {args.private:.0%}; meta-training "
        f"{args.meta_steps} steps, LoRAs {args.lora_steps} steps; personalization {args.k} steps from one photo"
    )
    summaries = {}
    for level in results:
        rows = summarize(level, args)
        summaries[level["nuisance"]] = rows
        print_level(level, rows, args)
    print(f"\ntotal {time.perf_counter() - begun:.0f} s")
    at = 1.0 if 1.0 in summaries else levels[-1]
    rows = summaries[at]
    lora = rows["lora"]["other"][2]
    print(f"ratio heldout_photos_meta_over_lora {rows['meta']['other'][2] / lora:.3f}")
    print(f"ratio heldout_photos_distilled_over_lora {rows['distilled']['other'][2] / lora:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
