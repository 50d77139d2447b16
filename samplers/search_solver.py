"""Search a few-step solver for a genkit checkpoint (Differentiable Solver Search, arXiv 2505.21114).

Learns the step sizes and multistep coefficients of an NFE-step solver so that it lands where a
high-accuracy reference solver lands from the same prior noise (with --eval-times, --step-scales and
--teleport also genkit's extensions: shifted evaluation times, a factor per update and a free first jump
along the Gaussian of the reference samples; see genkit.solvers.searched), saves it as OUT/solver.safetensors +
OUT/solver.json, and prints the endpoint error (per-sample L2 RMS to the reference, sqrt(mean_i |x_i - ref_i|^2),
genkit.metrics.endpoint_rms, the measure of compare.py and train/secant.py too; at the end of the sampling
interval, before any final denoising step) on held-out noise for the searched solver and for
euler, heun (as many whole steps as fit in the NFE), ddim, dpmpp_2m and unipc at the same NFE on the
uniform and log-SNR grids.

Use the artifact by its folder (sample.py --solver OUT, solve(model, x, "OUT")), or give it a name with
--name NAME: it is then also saved under genkit's solver home ($GENKIT_SOLVERS, else ~/.cache/genkit/solvers)
and any later process uses it by that name: model.sample(64, solver="NAME"), sample.py --solver NAME. (In
Python: genkit.solvers.searched.register_searched("NAME", OUT, persist=True).) The solver's own times and
step count are the defaults wherever it is used.

examples:
  python samplers/search_solver.py --checkpoint runs/default --nfe 5 --name moons5
  python samplers/search_solver.py --checkpoint runs/ddpm/checkpoint --nfe 6 --iters 500 --out s6
  python samplers/search_solver.py --checkpoint runs/ddpm/checkpoint --nfe 5 --lr 2e-2 \
      --lr-schedule cosine --iters 600 --eval-times --step-scales --teleport reference   # genkit's extensions
"""

from __future__ import annotations

import argparse
import inspect
import sys
import time
from pathlib import Path

import torch

import genkit
from genkit.cli import checkpoint_dir, run_main, script_device
from genkit.errors import ConfigError
from genkit.metrics import ENDPOINT_ERROR, endpoint_rms
from genkit.solvers import solve
from genkit.solvers.searched import VARIANTS, check_new_name, register_searched, search_solver, solver_home

DEFAULTS = {k: v.default for k, v in inspect.signature(search_solver).parameters.items()}  # one source of defaults


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Show defaults and keep the description's line breaks."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="search_solver.py", description=__doc__, formatter_class=_Formatter)
    p.add_argument("--checkpoint", required=True, metavar="DIR",
                   help="a checkpoint folder, or a train.py run folder holding checkpoint/")
    p.add_argument("--nfe", type=int, required=True, help="number of steps = network evaluations (>= 2)")
    p.add_argument("--variant", default=DEFAULTS["variant"], choices=VARIANTS,
                   help="data: DDIM steps on combined x0 predictions (the paper's DDPM form); velocity: Euler steps "
                        "on combined velocities (its flow-matching form)")
    p.add_argument("--iters", type=int, default=DEFAULTS["iters"],
                   help="optimiser steps (the extended search adds as many)")
    p.add_argument("--batch", type=int, default=DEFAULTS["batch"], help="noise samples per optimiser step")
    p.add_argument("--pool", type=int, default=DEFAULTS["pool"],
                   help="noise samples solved by the reference and searched on")
    p.add_argument("--holdout", type=int, default=DEFAULTS["holdout"],
                   help="held-out noise samples on which the search keeps its best iterate (and the extended search "
                        "its best candidate, DSS's optimum included)")
    p.add_argument("--importance", type=float, default=DEFAULTS["importance"],
                   help="share of minibatch draws proportional to each pool sample's error (0: uniform epochs)")
    p.add_argument("--lr", type=float, default=DEFAULTS["lr"], help="learning rate (the extensions: lr / 5)")
    p.add_argument("--optimiser", default="adam", choices=("adam", "lion"), help="the paper uses lion")
    p.add_argument("--lr-schedule", default="constant", choices=("constant", "cosine"),
                   help="constant, or decayed to 0 on a cosine")
    p.add_argument("--eval-times", action="store_true",
                   help="genkit extension: also search a shift of each evaluation time")
    p.add_argument("--step-scales", action="store_true",
                   help="genkit extension: also search a factor on each update")
    p.add_argument("--teleport", default="none", choices=("none", "reference"),
                   help="genkit extension: first segment a free closed-form jump along the Gaussian fitted to the "
                        "reference endpoints")
    p.add_argument("--reference-solver", default="rk4", help="high-accuracy solver, e.g. rk4 or dopri5")
    p.add_argument("--reference-steps", type=int, default=100, help="steps of the reference solver")
    p.add_argument("--trajectory-weight", type=float, default=0.0,
                   help="weight of the intermediate-state loss (0: endpoint loss only)")
    p.add_argument("--eval", type=int, default=1024, help="held-out noise samples for the error table")
    p.add_argument("--seed", type=int, default=0, help="seed of the search noise (held-out noise uses seed + 1)")
    p.add_argument("--out", metavar="DIR", help="artifact folder (default: searched_nfeN/ next to the checkpoint)")
    p.add_argument("--name", help="also save the solver under this name in genkit's solver home, so that any later "
                                  "process uses it as solver=NAME")
    p.add_argument("--replace", action="store_true", help="with --name: replace a solver saved under that name")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    p.add_argument("--raw-weights", action="store_true", help="use the raw weights instead of the EMA weights")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.eval < 1:
        raise ConfigError(f"--eval must be a positive integer; got {args.eval}")
    device = script_device(args.device)
    if args.name is not None:  # before the search, not after it
        check_new_name(args.name, replace=args.replace, persist=True)
    ckpt = checkpoint_dir(args.checkpoint)
    model = genkit.load(ckpt, ema=not args.raw_weights, map_location=device)
    if not hasattr(model, "path") or not hasattr(model, "sample_shape"):
        raise ConfigError(f"{ckpt} holds a {type(model).__name__}, not a continuous-time model with a path; "
                          "searched solvers need a diffusion or flow-matching checkpoint")
    model.requires_grad_(False)  # frozen: the search differentiates through the model, never into it
    shape, dtype = tuple(model.sample_shape), next(model.parameters()).dtype
    t0 = time.perf_counter()
    solver = search_solver(model, args.nfe, shape=shape, variant=args.variant,
                           reference_solver=args.reference_solver, reference_steps=args.reference_steps,
                           iters=args.iters, batch=args.batch, pool=args.pool, holdout=args.holdout, lr=args.lr,
                           optimiser=args.optimiser, importance=args.importance,
                           lr_schedule=args.lr_schedule, eval_times=args.eval_times, step_scales=args.step_scales,
                           teleport=None if args.teleport == "none" else args.teleport,
                           trajectory_weight=args.trajectory_weight, grid=model.default_grid("uniform"),
                           generator=torch.Generator(device=device).manual_seed(args.seed), device=device,
                           dtype=dtype)
    seconds = time.perf_counter() - t0
    out = solver.save(Path(args.out) if args.out else ckpt.parent / f"searched_nfe{args.nfe}")
    print(f"searched {args.nfe}-step {args.variant} solver for {ckpt} in {seconds:.1f} s "
          f"(search loss, per-element MSE: {solver.info['first_loss']:.3g} -> {solver.info['last_loss']:.3g}; held-out "
          f"{solver.info['holdout_loss']:.3g}, DSS's {solver.info['dss_holdout_loss']:.3g}; kept: "
          f"{solver.info['chosen']}): {out}")
    if args.name:
        register_searched(args.name, solver, persist=True, replace=args.replace)
        print(f"saved as {args.name!r} in {solver_home() / args.name}: any later process can use "
              f"solver={args.name!r}")
    print("times:", " ".join(f"{t:.4f}" for t in solver.times.tolist())
          + (" (the first step is the closed-form jump)" if solver.teleport is not None else ""))
    if solver.eval_shift is not None:
        print("evaluated at:", " ".join(f"{t:.4f}" for t in solver.eval_times.tolist()))

    gen = torch.Generator(device=device).manual_seed(args.seed + 1)
    x = model.path.sample_prior((args.eval, *shape), generator=gen, device=device, dtype=dtype)
    with torch.no_grad():
        grid = model.default_grid("uniform")
        ref = solve(model, x, args.reference_solver, args.reference_steps, grid).samples
        rows = [("searched", "searched", solve(model, x, solver, args.nfe, grid))]
        for name, steps in (("euler", args.nfe), ("heun", args.nfe // 2)):
            rows.append((name, "uniform", solve(model, x, name, steps, grid)))
        for name in ("ddim", "dpmpp_2m", "unipc"):
            for grid_name in ("uniform", "logsnr"):
                rows.append((name, grid_name, solve(model, x, name, args.nfe, model.default_grid(grid_name))))
    errors = [(name, g, sol.nfe, endpoint_rms(sol.samples, ref)) for name, g, sol in rows]
    euler = errors[1][3]
    print(f"\nendpoint error: {ENDPOINT_ERROR} ({args.reference_solver}, {args.reference_steps} steps) on "
          f"{args.eval} held-out samples (the search's own losses above are per-element MSE)")
    print(f"{'solver':<10} {'grid':<9} {'NFE':>4} {'L2 RMS':>11} {'/ euler':>8}")
    for name, g, nfe, err in errors:
        print(f"{name:<10} {g:<9} {nfe:>4} {err:>11.4g} {err / euler if euler > 0 else float('nan'):>8.3f}")


def run(argv: list[str] | None = None) -> int:
    """``main`` with genkit errors reported as one ``error: ...`` line and exit status 2."""
    return run_main(main, argv)


if __name__ == "__main__":
    sys.exit(run())
