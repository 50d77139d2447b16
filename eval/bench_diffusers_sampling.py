"""Few-step sampling of a ddpm-path eps model: genkit's default sampling against diffusers' default schedulers.

A digits UNet in diffusers' default DDPM configuration (linear betas 1e-4..0.02 over 1000 steps, eps prediction,
trained on the whole range: ``genkit.Diffusion(..., path="ddpm", prediction="eps", t_max=1)``, timestep k at
``t = (k + 1) / 1000``) is trained here on the 8x8 digits, then sampled from the same prior noise by

- diffusers' ``DDIMScheduler()`` with its defaults (``timestep_spacing="leading"``, ``clip_sample=True``,
  ``set_alpha_to_one=True``) and ``DPMSolverMultistepScheduler()`` with its defaults (DPM-Solver++(2M),
  ``linspace`` spacing, ``lower_order_final``), through ``genkit.interop.DiffusersScheduler``;
- genkit's default sampling, ``model.sample(n, steps=k)`` with the model's own default sampler;
- the genkit candidates the default was chosen from (solver x grid, with and without x0 clipping).

Every run is scored by the digits Frechet distance (``genkit.metrics.fid`` on the features of
``genkit.metrics.train_digits_classifier``) against ``genkit.data.held_out("digits")``, whose second set gives
the noise floor (what a perfect sampler scores). NFE is the number of network evaluations, counted by the
solve. Target: genkit's default <= the better diffusers scheduler at every NFE.

  python eval/bench_diffusers_sampling.py            # ~4 min on 2 CPU threads -> results/bench_diffusers_sampling.*
  python eval/bench_diffusers_sampling.py --quick    # tiny sizes, to test the script
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_common import RESULTS, markdown_table, write_results  # noqa: E402

import genkit.data  # noqa: E402
import genkit.nets  # noqa: E402
from genkit import Diffusion, metrics  # noqa: E402
from genkit.interop import DiffusersScheduler  # noqa: E402
from genkit.paths import X0Limit  # noqa: E402
from genkit.sampling import ODESampler  # noqa: E402
from genkit.solvers import Uniform, solve  # noqa: E402

NAME = "bench_diffusers_sampling"


def train_model(args: argparse.Namespace) -> tuple[Diffusion, dict[str, Any]]:
    data = genkit.data.load_dataset("digits")
    torch.manual_seed(args.seed)
    # diffusers' time map for the UNet (step k = N t - 1), as train/train.py gives a ddpm-path UNet
    net = genkit.nets.UNet(8, in_channels=1, block_out_channels=tuple(args.channels), norm_num_groups=8,
                           time_scale=1000.0, time_shift=-1.0)
    model = Diffusion(net, path="ddpm", prediction="eps", sample_shape=(1, 8, 8), t_max=1.0)
    if args.model_cache is not None and args.model_cache.is_file():  # weights of an earlier run with these settings
        saved = torch.load(args.model_cache, map_location="cpu")
        if saved["info"]["steps"] == args.train_steps and saved["info"]["channels"] == list(args.channels):
            model.load_state_dict(saved["state"])
            print(f"loaded the trained model from {args.model_cache}", flush=True)
            return model.eval().requires_grad_(False), saved["info"]
    t0 = time.perf_counter()
    # a plain Adam loop on model.loss with an EMA of the weights: the benchmark needs no checkpoints, logs or
    # resume state (genkit's Trainer per-step cost is measured against torchcfm's loop in bench_fm_training)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    ema = {k: v.detach().clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(args.seed)
    losses = []
    for step in range(args.train_steps):
        for group in opt.param_groups:
            group["lr"] = args.lr * min(1.0, (step + 1) / 50)
        batch = data[torch.randint(0, len(data), (args.batch_size,), generator=g)]
        loss, _ = model.loss(batch, generator=g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            for k, v in model.state_dict().items():
                ema[k].mul_(0.995).add_(v.detach(), alpha=0.005) if v.is_floating_point() else ema[k].copy_(v)
        losses.append(float(loss.detach()))
        if (step + 1) % max(1, args.train_steps // 10) == 0:
            print(f"step {step + 1}: loss {sum(losses[-50:]) / len(losses[-50:]):.4f} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
    model.load_state_dict(ema)
    info = {"steps": args.train_steps, "batch_size": args.batch_size, "lr": args.lr, "ema_decay": 0.995,
            "channels": list(args.channels), "train_seconds": time.perf_counter() - t0,
            "final_loss": sum(losses[-100:]) / len(losses[-100:]), "params": sum(p.numel() for p in model.parameters())}
    if args.model_cache is not None:
        torch.save({"state": model.state_dict(), "info": info}, args.model_cache)
    print(f"trained {args.train_steps} steps in {info['train_seconds']:.0f} s, loss {info['final_loss']:.4f}",
          flush=True)
    return model.eval().requires_grad_(False), info


def diffusers_default(name: str) -> Any:
    import diffusers

    # the model's schedule, everything else at the scheduler's defaults
    return getattr(diffusers, name)(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02,
                                    beta_schedule="linear", prediction_type="epsilon")


def genkit_candidates() -> list[tuple[str, str, Any, bool]]:
    """(label, solver, grid, clip) of the genkit runs the default was chosen from."""
    out = []
    for solver in ("ddim", "dpmpp_2m"):
        for grid in ("uniform", "leading", "trailing", "logsnr"):
            for clip in (False, True):
                out.append((f"{solver} / {grid}{' / clip' if clip else ''}", solver, grid, clip))
    return out


def steps_for(solver: str, grid: str, nfe: int) -> int:
    """Grid steps that cost ``nfe`` evaluations: a named grid over [t_eps, t_max] takes nfe - 1 solver steps plus the
    final denoising evaluation; diffusers' spacings end at t = 0, their last step being that evaluation."""
    del solver
    return nfe if grid in ("leading", "trailing", "linspace") else nfe - 1


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train-steps", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--channels", type=int, nargs="+", default=[8, 16])
    p.add_argument("--n", type=int, default=500, help="samples per run (and held-out reference size)")
    p.add_argument("--nfe", type=int, nargs="+", default=[5, 10, 20])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--model-cache", type=Path, default=None,
                   help="save the trained weights here, or load them when a run with the same settings saved them")
    args = p.parse_args(argv)
    if args.quick:
        args.train_steps, args.n, args.nfe = 30, 64, [5]
    torch.set_num_threads(args.threads)

    model, train_info = train_model(args)
    ref, floor = genkit.data.held_out("digits", args.n, args.seed)
    features = metrics.train_digits_classifier(genkit.data.digits("train"), genkit.data.digits_labels("train"),
                                               generator=torch.Generator().manual_seed(0)).features

    def frechet(x: torch.Tensor) -> float:
        return metrics.fid(x.float().clamp(-1, 1), ref, features)

    noise_floor = frechet(floor)
    x1 = model.path.sample_prior((args.n, *model.sample_shape), generator=torch.Generator().manual_seed(args.seed + 1))
    runs: list[dict[str, Any]] = []

    def record(kind: str, label: str, nfe_target: int, fn) -> None:
        t0 = time.perf_counter()
        with torch.no_grad():
            sol = fn()
        runs.append({"kind": kind, "label": label, "nfe_target": nfe_target, "nfe": int(sol.nfe),
                     "frechet_digits": frechet(sol.samples), "seconds": time.perf_counter() - t0,
                     "times": [round(float(t), 6) for t in sol.times]})
        print(f"{kind:9s} {label:32s} nfe {sol.nfe:3d}  frechet {runs[-1]['frechet_digits']:8.2f}", flush=True)

    clip = X0Limit(clip_sample=True)
    for nfe in args.nfe:
        for name in ("DDIMScheduler", "DPMSolverMultistepScheduler"):
            sched = DiffusersScheduler(diffusers_default(name))
            record("diffusers", name, nfe, lambda s=sched, k=nfe: solve(model, x1, s, k, Uniform(t_min=1e-3)))
        default = model.default_sampler()
        if isinstance(default, ODESampler) and default._solver.evals_per_step == 1:
            default = default.with_steps(steps_for(default._solver.name, default.grid, nfe))
        else:
            default = default.with_steps(nfe)
        record("default", f"genkit default ({default.describe()})", nfe, lambda d=default: d.sample(model, x1))
        for label, solver, grid, clipped in genkit_candidates():
            field = with_limit(model, clip) if clipped else model
            k = steps_for(solver, grid, nfe)
            record("genkit", label, nfe,
                   lambda f=field, s=solver, g=grid, k=k: ODESampler(s, k, g).sample(f, x1))

    best: dict[int, dict[str, Any]] = {}
    for nfe in args.nfe:
        diff = [r for r in runs if r["kind"] == "diffusers" and r["nfe_target"] == nfe]
        dflt = next(r for r in runs if r["kind"] == "default" and r["nfe_target"] == nfe)
        best_d = min(diff, key=lambda r: r["frechet_digits"])
        best[nfe] = {"genkit_default": dflt["frechet_digits"], "best_diffusers": best_d["frechet_digits"],
                     "best_diffusers_label": best_d["label"],
                     "ratio": dflt["frechet_digits"] / best_d["frechet_digits"],
                     "pass": dflt["frechet_digits"] <= best_d["frechet_digits"]}
    payload = {"train": train_info, "n": args.n, "noise_floor_frechet_digits": noise_floor, "runs": runs,
               "summary": best}
    md = markdown(payload, args)
    write_results(NAME, payload, md, args.out)
    plot(payload, args.out / f"{NAME}.png")


def with_limit(model: Diffusion, limit: X0Limit) -> Diffusion:
    """The same model (shared weights) sampling with an x0 limit."""
    import copy

    m = copy.copy(model)
    m.x0_limit = limit
    return m


def markdown(payload: dict[str, Any], args: argparse.Namespace) -> str:
    tr = payload["train"]
    md = [f"Model: `genkit.nets.UNet(8, block_out_channels={tuple(tr['channels'])})`, {tr['params']} parameters, "
          f"ddpm path, eps, t over [1e-3, 1] (diffusers' default DDPM configuration), trained {tr['steps']} steps "
          f"(batch {tr['batch_size']}, lr {tr['lr']}, EMA {tr['ema_decay']}) in {tr['train_seconds']:.0f} s; final "
          f"loss {tr['final_loss']:.4f}. {args.n} samples per run from the same prior noise; digits Frechet distance "
          f"to held-out digits, noise floor **{payload['noise_floor_frechet_digits']:.2f}**.", ""]
    rows = [[nfe, f"{s['genkit_default']:.2f}", f"{s['best_diffusers']:.2f} ({s['best_diffusers_label']})",
             f"{s['ratio']:.3f}", "PASS" if s["pass"] else "FAIL"] for nfe, s in payload["summary"].items()]
    md += ["## Target: genkit's default <= the better diffusers default at every NFE", "",
           markdown_table(["NFE", "genkit default", "best diffusers", "ratio", "target"], rows), ""]
    labels = []
    for r in payload["runs"]:
        if r["label"] not in labels:
            labels.append(r["label"])
    nfes = sorted({r["nfe_target"] for r in payload["runs"]})
    table = []
    for label in labels:
        row: list[Any] = [label]
        for nfe in nfes:
            hit = [r for r in payload["runs"] if r["label"] == label and r["nfe_target"] == nfe]
            row.append(f"{hit[0]['frechet_digits']:.2f} ({hit[0]['nfe']})" if hit else "")
        table.append(row)
    md += ["## Every run: Frechet distance (NFE counted)", "",
           markdown_table(["run"] + [f"NFE {n}" for n in nfes], table), ""]
    return "\n".join(md) + "\n"


def plot(payload: dict[str, Any], out: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    nfes = sorted(int(n) for n in payload["summary"])
    for label, style in (("DDIMScheduler", "s--"), ("DPMSolverMultistepScheduler", "^--")):
        ys = [next(r["frechet_digits"] for r in payload["runs"] if r["label"] == label and r["nfe_target"] == n)
              for n in nfes]
        ax.plot(nfes, ys, style, label=f"diffusers {label} (defaults)")
    ys = [payload["summary"][n]["genkit_default"] for n in nfes]
    ax.plot(nfes, ys, "o-", label="genkit default", lw=2)
    ax.axhline(payload["noise_floor_frechet_digits"], color="gray", ls=":", label="noise floor")
    ax.set_xlabel("NFE")
    ax.set_ylabel("digits Frechet distance")
    ax.set_yscale("log")
    ax.set_xticks(nfes)
    ax.legend(fontsize=8)
    ax.set_title("ddpm-path eps digits UNet: few-step sampling")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
