"""Sampling-loop overhead: genkit's fixed-step solvers against diffusers' schedulers on the same network.

Overhead = (time of a whole sampling run) - (time of the same number of network evaluations alone), the
time a sampler spends outside the network: schedule arithmetic, parametrization conversions, bookkeeping.

- genkit: ``genkit.solvers.solve(model, x, "euler" | "heun", steps)`` on a ``Diffusion`` model with an eps
  network on the ``ddpm`` path (DDPM's linear betas 1e-4..0.02 over 1000 steps: the same schedule as
  diffusers' ``beta_schedule="linear"``), uniform grid from t = 1 to the path's t_min.
- diffusers: ``EulerDiscreteScheduler`` and ``DPMSolverMultistepScheduler`` (dpmsolver++, order 2) with that
  schedule and ``prediction_type="epsilon"``, driven by the loop a pipeline runs: ``set_timesteps``,
  ``init_noise_sigma``, then per timestep ``scale_model_input`` -> network -> ``step(..., return_dict=False)``.
  The network gets genkit time ``t = (timestep + 1) / 1000``, the ddpm path's map between the two clocks.

Pairs: genkit Euler vs diffusers Euler (both 1 evaluation per step) and genkit Heun vs DPM-Solver++(2M)
(both second order; Heun takes 2 evaluations per step, DPM-Solver multistep 1), at the same number of steps;
and, as the same algorithm on both sides, genkit's ``dpmpp_2m`` vs diffusers' DPM-Solver++(2M).
Both sides drive the same ``genkit.nets.MLP`` instance, in float32, under ``torch.no_grad()``, starting
from the same ``x``. Each repeat times every contender once (the order rotates every repeat) right next to
the same number of evaluations of the bare network (which of the two goes first alternates); the overhead
is the median over repeats of these paired differences.

A second measurement swaps the MLP for a network that costs almost nothing (``x * 0.5``): the whole run
time is then overhead, without the noise of subtracting two large numbers.

Usage: ``python eval/bench_sampling_overhead.py [--repeats 7 --batch 64 4096 --steps 10 50]``.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import markdown_table, median, write_results  # noqa: E402

from genkit.models import Diffusion  # noqa: E402
from genkit.nets import MLP  # noqa: E402
from genkit.solvers import get_solver, solve  # noqa: E402

SCHEDULE = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                prediction_type="epsilon")


class Cheap(nn.Module):
    """A stand-in network that costs ~nothing, so a run's time is all overhead."""

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        return x * 0.5

    def config(self) -> dict[str, Any]:
        return {"name": "cheap"}


def diffusers_loop(scheduler: Any, net: nn.Module, x: Tensor, steps: int) -> Tensor:
    scheduler.set_timesteps(steps)
    sample = x * scheduler.init_noise_sigma
    batch = x.shape[0]
    for timestep in scheduler.timesteps:
        model_in = scheduler.scale_model_input(sample, timestep)
        eps = net(model_in, ((timestep.float() + 1) / SCHEDULE["num_train_timesteps"]).expand(batch))
        sample = scheduler.step(eps, timestep, sample, return_dict=False)[0]
    return sample


def contenders(net: nn.Module, x: Tensor, steps: int) -> dict[str, tuple[Callable[[], Tensor], int]]:
    """name -> (run, number of network evaluations per run)."""
    from diffusers import DPMSolverMultistepScheduler, EulerDiscreteScheduler

    model = Diffusion(net, "ddpm", "eps", sample_shape=(x.shape[1],)).eval()
    grid = model.default_grid("uniform")
    euler = EulerDiscreteScheduler(**SCHEDULE)
    dpm = DPMSolverMultistepScheduler(**SCHEDULE, algorithm_type="dpmsolver++", solver_order=2)
    nfe = {name: get_solver(name).nfe(steps) for name in ("euler", "heun", "dpmpp_2m")}  # declared evaluations
    runs = {
        "genkit euler": (lambda: solve(model, x, "euler", steps, grid).samples, nfe["euler"]),
        "genkit heun": (lambda: solve(model, x, "heun", steps, grid).samples, nfe["heun"]),
        "genkit dpmpp_2m": (lambda: solve(model, x, "dpmpp_2m", steps, grid).samples, nfe["dpmpp_2m"]),
        "diffusers EulerDiscrete": (lambda: diffusers_loop(euler, net, x, steps), steps),
        "diffusers DPMSolverMultistep": (lambda: diffusers_loop(dpm, net, x, steps), steps),
    }
    return runs


def network_alone(net: nn.Module, x: Tensor, n: int) -> Callable[[], Tensor]:
    """``n`` evaluations of the bare network on the batch (the baseline an overhead is measured against)."""
    t = torch.full((x.shape[0],), 0.5)

    def run() -> Tensor:
        for _ in range(n):
            out = net(x, t)
        return out

    return run


def _seconds(run: Callable[[], Tensor]) -> tuple[float, float]:
    """(wall-clock, process CPU) seconds of one run."""
    wall, cpu = time.perf_counter(), time.process_time()
    run()
    return time.perf_counter() - wall, time.process_time() - cpu


def measure(net: nn.Module, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Per (batch, steps) and contender: run times and the network-only time measured right next to each."""
    blocks = []
    for batch in args.batch:
        x = torch.randn(batch, 2, generator=torch.Generator().manual_seed(args.seed))
        for steps in args.steps:
            runs = contenders(net, x, steps)
            for name, (run, _) in runs.items():  # warm up, and check every sampler returns finite samples
                if not torch.isfinite(run()).all():
                    raise RuntimeError(f"{name} returned non-finite values at batch {batch}, {steps} steps")
            base = {n: network_alone(net, x, n) for _, n in runs.values()}
            blocks.append({"batch": batch, "steps": steps, "runs": runs, "base": base,
                           "times": {k: [] for k in runs}, "net": {k: [] for k in runs}})
    for r in range(args.repeats):
        for block in blocks:
            names = list(block["runs"])
            for name in names[r % len(names):] + names[:r % len(names)]:  # rotate the order every repeat
                run, n = block["runs"][name]
                pair = [("run", run), ("net", block["base"][n])]
                for kind, fn in pair if r % 2 else pair[::-1]:  # alternate which of the pair goes first
                    (block["times"] if kind == "run" else block["net"])[name].append(_seconds(fn))
    return blocks


def summarise(blocks: list[dict[str, Any]], clock: int) -> list[dict[str, Any]]:
    """Overheads on one clock (0: wall-clock, 1: process CPU time)."""
    rows = []
    for block in blocks:
        steps = block["steps"]
        entry: dict[str, Any] = {"batch": block["batch"], "steps": steps, "contenders": {}}
        per_eval = []
        for name, both in block["times"].items():
            nfe = block["runs"][name][1]
            runs, net = [x[clock] for x in both], [x[clock] for x in block["net"][name]]
            paired = [a - b for a, b in zip(runs, net)]
            per_eval += [b / nfe for b in net]
            over = median(paired)
            entry["contenders"][name] = {
                "nfe": nfe, "total_ms": 1e3 * median(runs), "network_alone_ms": 1e3 * median(net),
                "overhead_ms_per_step": 1e3 * over / steps, "overhead_ms_per_nfe": 1e3 * over / nfe,
                "total_s_repeats": runs, "network_alone_s_repeats": net, "paired_overhead_s_repeats": paired}
        entry["network_ms_per_eval"] = 1e3 * median(per_eval)
        rows.append(entry)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--batch", type=int, nargs="+", default=[64, 4096])
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 50])
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--name", default="bench_sampling_overhead")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    mlp = MLP(2, hidden=args.hidden, depth=args.depth).eval()
    with torch.no_grad():
        real_blocks, cheap_blocks = measure(mlp, args), measure(Cheap(), args)

    pairs = [("euler", "genkit euler", "diffusers EulerDiscrete"),
             ("2nd order", "genkit heun", "diffusers DPMSolverMultistep"),
             ("DPM-Solver++(2M) both", "genkit dpmpp_2m", "diffusers DPMSolverMultistep")]
    payload: dict[str, Any] = {
        "settings": {**vars(args), "net": f"genkit.nets.MLP(2, hidden={args.hidden}, depth={args.depth})",
                     "schedule": SCHEDULE, "genkit_model": "Diffusion(net, 'ddpm', 'eps'), uniform grid",
                     "dpm_solver": "DPMSolverMultistepScheduler(algorithm_type='dpmsolver++', solver_order=2)"},
        "definition": "overhead = total sampling time - time of the same number of network evaluations alone "
                      "(paired per repeat, median over repeats); per step = / steps, per nfe = / evaluations",
        "target": "genkit overhead / diffusers overhead <= 0.5",
    }
    sections = []
    for clock, key, title in ((1, "cpu", "process CPU time"), (0, "wall", "wall-clock time")):
        real, cheap = summarise(real_blocks, clock), summarise(cheap_blocks, clock)
        table_rows, ratios = [], []
        for entry, centry in zip(real, cheap):
            for label, g, d in pairs:
                gm, dm = entry["contenders"][g], entry["contenders"][d]
                gc, dc = centry["contenders"][g], centry["contenders"][d]
                ratio = gm["overhead_ms_per_step"] / dm["overhead_ms_per_step"]
                cratio = gc["overhead_ms_per_step"] / dc["overhead_ms_per_step"]
                ratios.append({"batch": entry["batch"], "steps": entry["steps"], "pair": label, "genkit": g,
                               "diffusers": d, "genkit_overhead_ms_per_step": gm["overhead_ms_per_step"],
                               "diffusers_overhead_ms_per_step": dm["overhead_ms_per_step"], "ratio": ratio,
                               "cheap_net_genkit_ms_per_step": gc["overhead_ms_per_step"],
                               "cheap_net_diffusers_ms_per_step": dc["overhead_ms_per_step"],
                               "cheap_net_ratio": cratio})
                table_rows.append([entry["batch"], entry["steps"], f"{g} / {d}", entry["network_ms_per_eval"],
                                   gm["overhead_ms_per_step"], dm["overhead_ms_per_step"], ratio,
                                   gc["overhead_ms_per_step"], dc["overhead_ms_per_step"], cratio])
        payload[key] = {"ratios": ratios, "mlp": real, "cheap_network": cheap}
        sections.append(f"## Overhead per step, {title} (ms)\n\n" + markdown_table(
            ["batch", "steps", "genkit / diffusers", "net ms/eval", "genkit", "diffusers", "ratio",
             "cheap net: genkit", "cheap net: diffusers", "cheap net: ratio"], table_rows))
    md = (f"{args.repeats} repeats, contenders interleaved (rotated order), each paired with the same number of "
          f"bare network evaluations; MLP(2, hidden={args.hidden}, depth={args.depth}), float32, no_grad. "
          "Overhead per step in ms; heun takes 2 network evaluations per step, the others 1. 'cheap net' "
          "columns: the same runs with a network costing ~nothing (run time = overhead, no subtraction noise). "
          "Process CPU time (one torch thread) is the steadier clock on a shared machine; wall-clock time is "
          "also given. Target: ratio <= 0.5.\n\n" + "\n\n".join(sections))
    paths = write_results(args.name, payload, md)
    print(md)
    print("wrote", *paths)


if __name__ == "__main__":
    main()
