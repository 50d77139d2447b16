"""Stochastic normalizing flow vs a plain flow of the same size and training budget (issue 10, METHODS.md 12).

Two targets: the SNF paper's 2-D double well (``double_well``) and genkit's two-angle energy on the torus
(``torus_dihedral``). Per target and seed, two models share the deterministic part, its initialisation, the
data, the optimiser and the step counts, and both train through genkit's ``Trainer`` with the SNF paper's
recipe: ``--ml-steps`` of maximum likelihood on samples, then ``--mixed-steps`` of ``0.5 ML + 0.5 KL``
(:class:`~genkit.models.flows.MixedObjective`, whose KL term draws its own samples through the model):

- ``flow``: six RealNVP affine couplings (three blocks of two, hidden 64-64), run as a deterministic-only
  :class:`~genkit.models.flows.StochasticFlow` (the same samples, log weights and NLL as the ``Flow``, and it
  meets the trainer's ``config()`` contract);
- ``snf``: the same couplings with Metropolis blocks (``--mc-steps`` steps each): on the double well one after
  each block of two, on ``lambda = 1/3, 2/3, 1`` (the paper's interpolated energies); on the torus one block on
  the target after the last layer.

On the torus (``--torus-flow circular``, the default) the couplings are six
:class:`~genkit.models.flows.CircularCoupling` layers (circular RQ splines, 8 bins) and the flow lives on
``[-pi, pi)^2`` with the uniform prior; the SNF's Metropolis blocks sit after each pair on ``lambda = 1/3, 2/3,
1`` (interpolated from the uniform prior) and wrap their proposals. ``--torus-flow squash`` is the earlier
real-valued variant: affine couplings on R^2 and a final ``theta = pi tanh(x)`` onto the open box with its exact
log-det, one Metropolis block on the target after it.

The double well also gets ``flow_kl``: the same flow trained by the energy (reverse KL) alone, data-free, for
the same total steps: it shows what a log Z bar alone does not catch (it sits in one well).

Training samples for ML come from the quadrature of the 2-D density (``Quadrature.sample``: a grid cell drawn
by its mass, uniform within the cell; 401 x 401 on the double well's bounds, 256 x 256 on the torus).

Measured on ``--eval-samples`` fresh samples: ESS (Kish, as a fraction of the samples); ``log Z`` relative and
absolute error against quadrature; the mode weights (double well: ``x_1 < 0`` / ``x_1 > 0``; torus: nearest
basin centre in wrapped distance) reweighted and unweighted, with their largest absolute error against
quadrature; the free-energy differences between the modes (``Delta F_k = -log(P_k / P_0)``, mode 0 the
heaviest) reweighted and unweighted, largest absolute error in kT; train time. Medians over ``--seeds``; the
time ratio snf/flow is the median of the per-seed ratios.

    python eval/bench_snf.py             # 3 seeds, 4-6 min on one thread of a shared 2-core machine
"""

from __future__ import annotations

import argparse
import logging
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import markdown_table, write_results  # noqa: E402

from genkit import metrics  # noqa: E402
from genkit.energies import get_energy, quadrature  # noqa: E402
from genkit.models.flows import (  # noqa: E402
    AffineCoupling,
    EnergyObjective,
    MetropolisBlock,
    MixedObjective,
    MLObjective,
    StochasticFlow,
    Transform,
    flow_log_weights,
)
from genkit.train import TrainConfig, Trainer  # noqa: E402


class BoxSquash(Transform):
    """``theta = pi tanh(x)`` (sampling direction) onto the open box ``(-pi, pi)^D``; forward ``atanh(theta /
    pi)``. Bench-local (not in FLOW_TRANSFORMS): what lets a real-valued flow carry an exact density on angles."""

    def __init__(self, features: int):
        super().__init__()
        self.features = features

    @staticmethod
    def _log_sech2(x: Tensor) -> Tensor:  # log(1 - tanh(x)^2), stable for large |x|
        a = x.abs()
        return 2 * (math.log(2.0) - a - torch.nn.functional.softplus(-2 * a))

    def forward(self, theta: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self._check(theta, None)
        lim = 1 - torch.finfo(theta.dtype).eps
        x = torch.atanh((theta / math.pi).clamp(-lim, lim))
        return x, -(math.log(math.pi) + self._log_sech2(x)).sum(1)

    def inverse(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self._check(x, None)
        return math.pi * torch.tanh(x), (math.log(math.pi) + self._log_sech2(x)).sum(1)


def couplings(hidden: int, seed: int) -> list[AffineCoupling]:
    torch.manual_seed(seed)
    return [AffineCoupling(2, hidden=hidden, parity=i % 2) for i in range(6)]


def circular_couplings(hidden: int, seed: int) -> list[Any]:
    from genkit.models.flows import CircularCoupling

    torch.manual_seed(seed)
    return [CircularCoupling(2, bins=8, hidden=hidden, parity=i % 2) for i in range(6)]


def build(kind: str, energy: Any, hidden: int, mc_steps: int, seed: int, torus_flow: str = "circular",
          mc_step_size: float | None = None) -> StochasticFlow:
    """Layers in sampling order; the deterministic part is the same for every kind at one seed. The Metropolis
    proposal scale is ``mc_step_size`` (default 0.1 on the double well, 0.3 on the torus)."""
    torus = energy.domain == "torus"
    step = mc_step_size if mc_step_size is not None else (0.3 if torus else 0.1)
    if torus and torus_flow == "circular":  # on the torus itself: uniform prior, blocks as on the double well
        cs = circular_couplings(hidden, seed)
        layers: list[torch.nn.Module] = []
        for b in range(3):
            layers += cs[2 * b:2 * b + 2]
            if kind == "snf":
                layers.append(MetropolisBlock(energy, (b + 1) / 3, step_size=step, n_steps=mc_steps))
        return StochasticFlow(layers, 2)
    cs = couplings(hidden, seed)
    layers = []
    for b in range(3):
        layers += cs[2 * b:2 * b + 2]
        if kind == "snf" and not torus:
            layers.append(MetropolisBlock(energy, (b + 1) / 3, step_size=step, n_steps=mc_steps))
    if torus:
        layers.append(BoxSquash(2))
        if kind == "snf":
            layers.append(MetropolisBlock(energy, 1.0, step_size=step, n_steps=3 * mc_steps))
    return StochasticFlow(layers, 2)


def modes(energy: Any, x: Tensor) -> tuple[Tensor, list[str]]:
    """Mode index per sample and the mode names."""
    if energy.domain == "torus":
        c = energy.centres.to(x)
        d = torch.remainder(x[:, None, :] - c + math.pi, 2 * math.pi) - math.pi
        return (d * d).sum(-1).argmin(1), [f"({float(a):.2f},{float(b):.2f})" for a, b in energy.centres]
    return (x[:, 0] > 0).long(), ["x1<0", "x1>0"]


def exact_modes(energy: Any, q: Any) -> Tensor:
    g0, g1 = torch.meshgrid(q.axes[0], q.axes[1], indexing="ij")
    idx, names = modes(energy, torch.stack([g0.reshape(-1), g1.reshape(-1)], 1))
    mass = (q.density * q.weights[0][:, None] * q.weights[1][None, :]).reshape(-1)
    return torch.zeros(len(names), dtype=torch.float64).index_add_(0, idx, mass)


def profile_bins(q: Any, cells: int = 8) -> tuple[Tensor, Tensor]:
    """Bin edges along x_1 on the quadrature's cell boundaries (``cells`` grid cells per bin, so the exact bin
    masses are sums of the grid marginal) and those exact masses."""
    grid, p = q.marginal(0)
    h = float(grid[1] - grid[0])
    k = torch.arange(0, grid.shape[0] // cells + 1, dtype=torch.float64)
    edges = grid[0] - h / 2 + cells * h * k
    idx = torch.div(torch.arange(grid.shape[0]), cells, rounding_mode="floor")
    keep = idx < edges.shape[0] - 1
    mass = torch.zeros(edges.shape[0] - 1, dtype=torch.float64).index_add_(0, idx[keep], (p * q.weights[0])[keep])
    return edges, mass


def profile_error(x1: Tensor, lw: Tensor | None, edges: Tensor, exact_mass: Tensor, window: float = 6.0) -> float:
    """Mass-weighted mean ``|F - F_exact|`` (kT, ``F = -log`` bin mass, no shift) over the bins within ``window``
    kT of the exact minimum: the free-energy profile bias along x_1 inside the wells (inf if such a bin is
    empty)."""
    _, f = metrics.reweighted_free_energy(x1, lw, edges, shift=False)
    f = f - torch.log(edges[1:] - edges[:-1])  # -log density -> -log bin mass
    f_exact = -torch.log(exact_mass)
    keep = f_exact < f_exact.min() + window
    return float((exact_mass[keep] * (f[keep] - f_exact[keep]).abs()).sum() / exact_mass[keep].sum())


def delta_f(p: Tensor, ref: int) -> Tensor:
    return -torch.log(p / p[ref])


def train(model: StochasticFlow, kind: str, energy: Any, data: Tensor, args: Any, seed: int, out: str) -> float:
    base = dict(batch_size=args.batch, lr=args.lr, ema_decay=None, grad_clip=1.0, min_lr_ratio=1.0,
                checkpoint_every=None, log_every=max(1, args.ml_steps), progress=False, seed=seed)
    t0 = time.perf_counter()
    if kind == "flow_kl":
        steps = args.ml_steps + args.mixed_steps
        Trainer(EnergyObjective(model, energy, batch_size=args.batch),
                TrainConfig(steps=steps, out_dir=f"{out}/kl", **base)).fit()
    else:
        Trainer(MLObjective(model), TrainConfig(steps=args.ml_steps, out_dir=f"{out}/ml", **base)).fit(data)
        if args.schedule == "cosine":
            base["min_lr_ratio"] = 0.0
        Trainer(MixedObjective(model, energy, batch_size=args.batch),
                TrainConfig(steps=args.mixed_steps, out_dir=f"{out}/mix", **base)).fit(data)
    return time.perf_counter() - t0


def evaluate(model: StochasticFlow, energy: Any, exact_p: Tensor, log_z: float, n: int, seed: int,
             bins: tuple[Tensor, Tensor] | None) -> dict[str, Any]:
    with torch.no_grad():
        x, lw = flow_log_weights(model, n, energy, generator=torch.Generator().manual_seed(10_000 + seed))
    idx, _ = modes(energy, x)
    onehot = torch.nn.functional.one_hot(idx, len(exact_p)).double()
    p_rw = metrics.reweighted_mean(onehot, lw).double()
    p_uw = onehot.mean(0)
    lz, se = metrics.log_z(lw)
    ref = int(exact_p.argmax())
    f_exact = delta_f(exact_p, ref)

    def f_err(p: Tensor) -> float:
        return float((delta_f(p, ref) - f_exact).abs().max()) if bool((p > 0).all()) else math.inf

    prof = {}
    if bins is not None:
        prof = {"profile_error_reweighted_kT": profile_error(x[:, 0], lw, *bins),
                "profile_error_unweighted_kT": profile_error(x[:, 0], None, *bins)}
    return {
        **prof,
        "ess_fraction": metrics.effective_sample_size(lw) / n,
        "log_z": lz, "log_z_se": se, "log_z_abs_error": abs(lz - log_z),
        "log_z_rel_error": abs(lz - log_z) / abs(log_z),
        "mode_weights_reweighted": p_rw.tolist(), "mode_weights_unweighted": p_uw.tolist(),
        "mode_error_reweighted": float((p_rw - exact_p).abs().max()),
        "mode_error_unweighted": float((p_uw - exact_p).abs().max()),
        "dF_error_reweighted_kT": f_err(p_rw), "dF_error_unweighted_kT": f_err(p_uw),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--energies", default="double_well,torus_dihedral")
    ap.add_argument("--ml-steps", type=int, default=300)
    ap.add_argument("--mixed-steps", type=int, default=300)
    ap.add_argument("--mc-steps", type=int, default=10)
    ap.add_argument("--mc-step-size", type=float, help="Metropolis proposal scale (default: 0.1 on the double "
                                                       "well, 0.3 on the torus)")
    ap.add_argument("--first-seed", type=int, default=0, help="seeds first-seed .. first-seed + seeds - 1")
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=5e-3)
    ap.add_argument("--train-samples", type=int, default=20000)
    ap.add_argument("--eval-samples", type=int, default=100000)
    ap.add_argument("--schedule", choices=["constant", "cosine"], default="constant",
                    help="LR of the mixed phase: constant (the SNF paper's) or cosine-decayed to 0")
    ap.add_argument("--torus-flow", choices=["circular", "squash"], default="circular",
                    help="circular couplings on the torus itself (default), or real couplings squashed by pi tanh")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="bench_snf")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    logging.disable(logging.WARNING)
    tmp = tempfile.mkdtemp(prefix="bench_snf-")
    runs: list[dict[str, Any]] = []
    exact: dict[str, Any] = {}
    t_start = time.perf_counter()
    warm = get_energy("double_well")  # warm-up (accelerate, autograd), not timed
    train(build("snf", warm, 8, 1, 0), "snf", warm, quadrature(warm, n=51).sample(256).float(),
          argparse.Namespace(**{**vars(args), "ml_steps": 2, "mixed_steps": 2}), 0, f"{tmp}/warm")
    for name in args.energies.split(","):
        energy = get_energy(name)
        torus = energy.domain == "torus"
        q = quadrature(energy, n=256 if torus else 401)
        exact_p = exact_modes(energy, q)
        bins = None if torus else profile_bins(q)
        floor = {}
        if bins is not None:  # the profile error of as many exact (quadrature) samples: the metric's noise floor
            xs = q.sample(args.eval_samples, generator=torch.Generator().manual_seed(99))
            floor = {"profile_error_exact_samples_kT": profile_error(xs[:, 0], None, *bins)}
        _, mode_names = modes(energy, torch.zeros(1, 2, dtype=torch.float64))
        exact[name] = {"log_z": q.log_z, "log_z_closed_form": energy.log_z, "modes": mode_names,
                       "mode_weights": exact_p.tolist(), "dF_kT": delta_f(exact_p, int(exact_p.argmax())).tolist(),
                       **floor}
        kinds = ["flow", "snf"] + ([] if torus else ["flow_kl"])
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            data = q.sample(args.train_samples, generator=torch.Generator().manual_seed(seed), periodic=torus).float()
            order = kinds[seed % len(kinds):] + kinds[:seed % len(kinds)]  # rotate who runs first
            for kind in order:
                model = build(kind, energy, args.hidden, args.mc_steps, seed, args.torus_flow, args.mc_step_size)
                secs = train(model, kind, energy, data, args, seed, f"{tmp}/{name}-{kind}-{seed}")
                rec = {"energy": name, "model": kind, "seed": seed, "train_s": secs,
                       **evaluate(model, energy, exact_p, q.log_z, args.eval_samples, seed, bins)}
                runs.append(rec)
                print(f"{name} {kind} seed {seed}: {secs:.0f}s ess {rec['ess_fraction']:.3f} "
                      f"logZ err {rec['log_z_rel_error']:.4f} modes rw {rec['mode_error_reweighted']:.4f} "
                      f"uw {rec['mode_error_unweighted']:.4f} dF rw {rec['dF_error_reweighted_kT']:.3f} "
                      f"uw {rec['dF_error_unweighted_kT']:.3f}", flush=True)
    keys = ["ess_fraction", "log_z_rel_error", "log_z_abs_error", "mode_error_reweighted", "mode_error_unweighted",
            "dF_error_reweighted_kT", "dF_error_unweighted_kT", "train_s"]
    PROFILE = ["profile_error_reweighted_kT", "profile_error_unweighted_kT"]
    summary, rows = [], []
    for name in args.energies.split(","):
        flow_t = {r["seed"]: r["train_s"] for r in runs if r["energy"] == name and r["model"] == "flow"}
        for kind in ("flow", "snf", "flow_kl"):
            rs = [r for r in runs if r["energy"] == name and r["model"] == kind]
            if not rs:
                continue
            med = {k: statistics.median(r[k] for r in rs) for k in keys + PROFILE if k in rs[0]}
            med["time_ratio_vs_flow"] = statistics.median(r["train_s"] / flow_t[r["seed"]] for r in rs)
            med["mode_weights_reweighted"] = [statistics.median(r["mode_weights_reweighted"][i] for r in rs)
                                              for i in range(len(exact[name]["mode_weights"]))]
            med["mode_weights_unweighted"] = [statistics.median(r["mode_weights_unweighted"][i] for r in rs)
                                              for i in range(len(exact[name]["mode_weights"]))]
            summary.append({"energy": name, "model": kind, **med})
            fmt = "/".join(f"{v:.3f}" for v in med["mode_weights_reweighted"])
            fmt_u = "/".join(f"{v:.3f}" for v in med["mode_weights_unweighted"])
            rows.append([name, kind, med["ess_fraction"], f"{fmt} (uw {fmt_u})", med["mode_error_reweighted"],
                         med["mode_error_unweighted"], med["dF_error_reweighted_kT"],
                         med["dF_error_unweighted_kT"], med.get("profile_error_reweighted_kT", "-"),
                         med.get("profile_error_unweighted_kT", "-"), med["log_z_abs_error"],
                         med["log_z_rel_error"], med["train_s"], med["time_ratio_vs_flow"]])
    header = ["energy", "model", "ESS (fraction)", "mode weights reweighted (unweighted)", "mode err rw",
              "mode err uw", "dF err rw (kT)", "dF err uw (kT)", "F(x1) err rw (kT)", "F(x1) err uw (kT)",
              "log Z abs err", "log Z rel err", "train s", "time / flow"]
    exact_lines = "\n".join(
        f"- {n}: log Z = {v['log_z']:.5f} (quadrature), modes {' / '.join(v['modes'])} weights "
        f"{' / '.join(f'{p:.4f}' for p in v['mode_weights'])}"
        + (f"; F(x1) error of {args.eval_samples} exact samples (noise floor): "
           f"{v['profile_error_exact_samples_kT']:.3f} kT" if "profile_error_exact_samples_kT" in v else "")
        for n, v in exact.items())
    md = (f"Medians over {args.seeds} seeds"
          + ("" if not args.first_seed else f" ({args.first_seed}..{args.first_seed + args.seeds - 1})")
          + f"; ML {args.ml_steps} steps then 0.5 ML + 0.5 KL {args.mixed_steps} steps "
          f"(flow_kl: KL only, {args.ml_steps + args.mixed_steps} steps), batch {args.batch}, Adam lr {args.lr} "
          f"({args.schedule} in the mixed phase), gradient clipping at norm 1, "
          f"six couplings hidden {args.hidden} (affine on the double well; on the torus "
          + ("circular RQ, uniform prior" if args.torus_flow == "circular" else "affine squashed by pi tanh")
          + f"); SNF Metropolis blocks of {args.mc_steps} steps"
          + ("" if args.mc_step_size is None else f" of scale {args.mc_step_size}") + " after each pair"
          + ("" if args.torus_flow == "circular" else f" (torus: one block of {3 * args.mc_steps})")
          + ". Errors are absolute, largest over the modes; 'rw' reweighted by the "
          f"exact path weights, 'uw' the raw samples. {args.eval_samples} evaluation samples. Whole run "
          f"{time.perf_counter() - t_start:.0f} s.\n\nQuadrature:\n{exact_lines}\n\n"
          + markdown_table(header, rows) + "\n")
    payload = {"settings": vars(args), "exact": exact, "summary": summary, "runs": runs,
               "wall_s": time.perf_counter() - t_start}
    j, m = write_results(args.out, payload, md)
    print(md)
    print(f"wrote {j} and {m}")


if __name__ == "__main__":
    main()
