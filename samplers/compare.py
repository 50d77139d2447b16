"""Compare ODE solvers on a genkit checkpoint: endpoint error against a high-accuracy reference per NFE.

Every solver starts from the same prior noise (--seed) and runs over the model's own time range on the
chosen grid (model.default_grid(GRID)); its endpoint is compared with a reference solve (rk4 with
--reference-steps steps on the same grid and range). Error = per-sample L2 RMS to the reference,
sqrt(mean_i |x_i - ref_i|^2) (genkit.metrics.endpoint_rms, the measure of every solver table in genkit's
scripts: train/secant.py and samplers/search_solver.py report the same). A searched solver (given by its saved
name or its folder) runs on its own searched times between the grid's end points, at its own NFE only; its
row says so. All solvers are compared at the raw end of the solve, before the
final denoising step that Diffusion.sample adds, so every row sees the same endpoint. Steps are chosen so
that the number of network evaluations (NFE) matches, from each solver's declared count (``Solver.nfe``):
one per step for euler and the diffusion solvers (ddim, dpmpp_2m, dpmpp_3m, unipc, deis), NFE // 2 steps for
heun and midpoint, NFE // 4 for rk4; budgets that do not fit (e.g. rk4 at 3 NFE) are skipped and listed.
The reference's own error is estimated by a solve with half its steps.

Writes OUT/compare.json (every number), OUT/compare.md (a table) and OUT/compare.png (error vs NFE, log
scale, one line per solver).

examples:
  python samplers/compare.py --checkpoint runs/default --out runs/default/compare
  python samplers/compare.py --checkpoint runs/ddpm --solvers ddim,dpmpp_2m,unipc --nfe 5,10,20 --out cmp
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

import genkit
from genkit.cli import checkpoint_dir, run_main, script_device
from genkit.errors import ConfigError
from genkit.metrics import ENDPOINT_ERROR, endpoint_rms
from genkit.solvers import GRIDS, Solver, get_grid, get_solver, solve

DEFAULT_SOLVERS = "euler,heun,ddim,dpmpp_2m,dpmpp_3m,unipc,deis,rk4"
DEFAULT_NFE = "3,4,5,6,8,10,16"
REFERENCE = "rk4"


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Show defaults and keep the description's line breaks."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="compare.py", description=__doc__, formatter_class=_Formatter)
    p.add_argument("--checkpoint", required=True, metavar="DIR",
                   help="a checkpoint folder, or a train.py run folder holding checkpoint/")
    p.add_argument("--solvers", default=DEFAULT_SOLVERS,
                   help="comma-separated deterministic fixed-step solvers (registry names, searched solvers saved "
                        "by name or their folders); stochastic and adaptive ones are refused")
    p.add_argument("--nfe", default=DEFAULT_NFE, help="comma-separated budgets of network evaluations")
    p.add_argument("--grid", default="logsnr",
                   help=f"time grid, one of {', '.join(n for n in GRIDS.names() if n != 'custom')}")
    p.add_argument("--n", type=int, default=256, help="number of prior samples")
    p.add_argument("--reference-steps", type=int, default=200, help=f"steps of the {REFERENCE} reference")
    p.add_argument("--seed", type=int, default=0, help="seed of the prior draw")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    p.add_argument("--raw-weights", action="store_true", help="use the raw weights instead of the EMA weights")
    return p.parse_args(argv)


def _int_list(text: str, flag: str) -> list[int]:
    try:
        values = sorted({int(v) for v in text.split(",") if v.strip()})
    except ValueError:
        values = []
    if not values or values[0] < 1:
        raise ConfigError(f"{flag} must be comma-separated positive integers, e.g. {DEFAULT_NFE}; got {text!r}")
    return values


def _solvers(text: str) -> dict[str, Solver]:
    names = [v.strip() for v in text.split(",") if v.strip()]
    if not names:
        raise ConfigError(f"--solvers is empty; give e.g. {DEFAULT_SOLVERS}")
    out = {}
    for name in names:
        solver = get_solver(name)  # registry names, saved names and folders alike; unknown: the error lists them
        if solver.stochastic or not solver.fixed_step:
            kind = "stochastic" if solver.stochastic else "adaptive"
            raise ConfigError(f"solver {name!r} is {kind}: its error to a deterministic reference at a fixed NFE is "
                              "not comparable; drop it from --solvers")
        out[name] = solver
    return out


def steps_for(solver: Solver, nfe: int, grid: Any = None, path: Any = None) -> int | None:
    """The step count whose declared evaluations (``solver.nfe``, asked with the grid's times where given) are
    exactly ``nfe``, or None when no count fits (rk4 at 3 NFE; a searched solver at another budget than its own)."""
    if solver.evals_per_step is None:
        return None  # adaptive: its evaluations are not known before solving
    grid = get_grid(grid) if grid is not None else None
    for steps in range(max(solver.min_steps, 1), nfe + 1):
        times = grid.times(steps, path) if grid is not None and path is not None else None
        if solver.nfe(steps, times=times, path=path) == nfe:
            return steps
    return None


def plot(results: dict[str, list[dict[str, Any]]], path: Path, title: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for name, rows in results.items():
        pts = [(r["nfe"], r["error"]) for r in rows if r["error"] > 0]
        if pts:
            ax.plot(*zip(*pts), marker="o", ms=4, label=name)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("NFE (network evaluations)")
    ax.set_ylabel(f"endpoint error: {ENDPOINT_ERROR}")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def markdown(report: dict[str, Any], nfes: list[int]) -> str:
    ref = report["reference"]
    lines = [f"# Solver comparison: {report['checkpoint']}", "",
             f"{report['family']} model, {report['n']} samples (seed {report['seed']}), {report['grid']} grid over "
             f"t in [{report['t_range'][0]:.4g}, {report['t_range'][1]:.4g}]. Reference: {ref['solver']} with "
             f"{ref['steps']} steps (distance to {ref['steps'] // 2} steps: {ref['half_steps_error']:.3g}).", "",
             f"Endpoint error: {ENDPOINT_ERROR} (sqrt(mean_i |x_i - ref_i|^2)); `-` = the budget does not fit the "
             "solver.", "",
             f"| solver ({ENDPOINT_ERROR}) | " + " | ".join(f"NFE {n}" for n in nfes) + " |",
             "|---|" + "---|" * len(nfes)]
    for name, rows in report["results"].items():
        by = {r["nfe"]: r["error"] for r in rows}
        grid = report.get("grids", {}).get(name, report["grid"])
        shown = name if grid == report["grid"] else f"{name} ({'own searched times' if grid == 'searched' else grid})"
        lines.append(f"| {shown} | " + " | ".join(f"{by[n]:.3g}" if n in by else "-" for n in nfes) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    nfes = _int_list(args.nfe, "--nfe")
    solvers = _solvers(args.solvers)
    if args.grid not in GRIDS.names() or args.grid == "custom":
        raise ConfigError(f"unknown grid {args.grid!r}; choose from "
                          f"{', '.join(n for n in GRIDS.names() if n != 'custom')}")
    if args.n < 1 or args.reference_steps < 2:
        raise ConfigError(f"--n must be >= 1 and --reference-steps >= 2; got {args.n} and {args.reference_steps}")
    device = script_device(args.device)
    ckpt = checkpoint_dir(args.checkpoint)
    model = genkit.load(ckpt, ema=not args.raw_weights, map_location=device)
    if not hasattr(model, "path") or not hasattr(model, "default_grid"):
        raise ConfigError(f"{ckpt} holds a {type(model).__name__}, not a continuous-time model with a path; "
                          "solver comparisons need a diffusion or flow-matching checkpoint")
    grid = model.default_grid(args.grid)
    dtype = next(model.parameters()).dtype
    x = model.path.sample_prior((args.n, *model.sample_shape), dtype=dtype, device=device,
                                generator=torch.Generator(device=device).manual_seed(args.seed))
    t0 = time.perf_counter()
    with torch.no_grad():
        ref_sol = solve(model, x, REFERENCE, args.reference_steps, grid)
        ref = ref_sol.samples
        half = solve(model, x, REFERENCE, args.reference_steps // 2, grid).samples
        results: dict[str, list[dict[str, Any]]] = {}
        skipped = []
        for name, solver in solvers.items():
            results[name] = []
            for nfe in nfes:
                steps = steps_for(solver, nfe, grid, model.path)
                if steps is None:
                    skipped.append({"solver": name, "nfe": nfe})
                    continue
                sol = solve(model, x, solver, steps, grid)
                err = endpoint_rms(sol.samples, ref)
                if not math.isfinite(err):
                    raise ConfigError(f"solver {name!r} at {nfe} NFE gave a non-finite error; check the model")
                results[name].append({"nfe": sol.nfe, "steps": steps, "error": err})
    seconds = time.perf_counter() - t0
    times = ref_sol.times
    report = {"checkpoint": str(ckpt), "family": getattr(model, "family", type(model).__name__),
              "path": model.path.config(), "grid": args.grid, "t_range": [float(times[-1]), float(times[0])],
              "n": args.n, "seed": args.seed, "device": str(device), "weights": "raw" if args.raw_weights else "ema",
              "error": ENDPOINT_ERROR,
              "grids": {name: "searched" if s.default_grid() is not None else args.grid for name, s in solvers.items()},
              "reference": {"solver": REFERENCE, "steps": args.reference_steps,
                            "half_steps_error": endpoint_rms(half, ref)},
              "results": results, "skipped": skipped, "seconds": seconds}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    (out / "compare.md").write_text(markdown(report, nfes), encoding="utf-8")
    plot(results, out / "compare.png", f"{ckpt.name}: {args.grid} grid, reference {REFERENCE} x{args.reference_steps}")
    print(markdown(report, nfes))
    print(f"{len(solvers)} solvers x {len(nfes)} budgets in {seconds:.1f} s ({len(skipped)} combinations skipped)")
    print(f"results: {out / 'compare.json'}, {out / 'compare.md'}, {out / 'compare.png'}")


def run(argv: list[str] | None = None) -> int:
    """``main`` with genkit errors reported as one ``error: ...`` line and exit status 2."""
    return run_main(main, argv)


if __name__ == "__main__":
    sys.exit(run())
