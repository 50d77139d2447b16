"""Fast-solver accuracy: genkit's solvers against diffusers' schedulers on exact Gaussian-mixture fields.

Every solver starts from the same prior noise and is scored by its endpoint error to a 1000-step
high-order reference (UniPC-2 on a log-SNR grid; a second 1000-step solver, DPM-Solver++(3M), measures
how accurate that reference is). Error = RMS over samples of the per-sample L2 distance
``sqrt(mean_i |x_i - ref_i|^2)``. Fields (no training): Gaussian mixtures in 2-D and 16-D (and issue 8's 16-D
mixture of six well-separated narrow modes) on the ``ddpm``
path read as eps (diffusers' DDPM schedule, so its schedulers apply directly) and on the ``linear`` path
read as velocity (flow matching; diffusers' schedulers run through the SNR-matching adapter).

Contenders at NFE in --nfe: genkit ddim, dpmpp_2m, dpmpp_3m, unipc, deis, euler, heun (on the ddpm path
EDM's Heun, whose last step is Euler, since the ddpm velocity is singular at t = 0) on a log-SNR grid to
t = 0; diffusers DDIMScheduler, EulerDiscreteScheduler, DPMSolverMultistepScheduler (dpmsolver++, order 2)
and UniPCMultistepScheduler (bh2, order 2) through ``genkit.interop.DiffusersScheduler`` (beta 1e-4..0.02
linear, clip_sample=False); genkit's matching solvers re-run on the exact times each diffusers scheduler
visited (equality check); k-diffusion's sample_euler, sample_heun, sample_dpmpp_2m, sample_lms and
sample_dpm_2 on its Karras sigmas through ``genkit.interop.KDiffusionSampler``, with genkit's twins (DDIM,
EDM Heun, DPM-Solver++(2M)) on the same sigmas (when k-diffusion is installed: ``pip install k-diffusion
--no-deps torchsde``; only ``k_diffusion.sampling`` is imported); two searched solvers at NFE 5, DSS in the
paper's search space and with genkit's extensions (``search_solver(..., teleport="reference", eval_times=True,
step_scales=True)``, which runs the same DSS search first and keeps whichever is better on the held-out
noise), searched on the same pool, reference and optimiser settings; and analytic
teleportation (Gaussian fit of the mixture) with ``genkit.steps_saved``.

Targets (PASS/FAIL in the .md): genkit DPM-Solver++(2M) and UniPC within 3% of diffusers' error at every
NFE on the same timesteps; the 5-NFE searched solver at least as accurate as the best diffusers
scheduler at 10 NFE; teleportation saves >= 20% of the steps at equal error.

Trained field (part b): a small VP-eps ``genkit.Diffusion`` (``genkit.nets.UNet(8)``, ddpm path, eps) trained for
--digits-steps steps on the 8x8 digits; it is one more field, run through the same contenders on --digits-n noise
samples (float32). The network is evaluated only on its training range ``model.time_range() = [t_eps, 1]``:
genkit's grid is ``LogSNR(lambda_max=log-SNR(t_eps), t_min=0)`` (uniform in log-SNR from t = 1 to t_eps, then
the solver's own last step to t = 0, which evaluates at t_eps only), the reference the same grid at 1000 steps,
and diffusers' schedulers also evaluate at timestep >= 0 (t >= 1e-3 = t_eps) and end at t = 0 with their
final step; every endpoint is the t = 0 (denoised) state. The searches run on digits with --digits-search
only (a 1000-step reference of the search pool plus backpropagation through the UNet: ~30 min on 2 CPU
cores); teleportation uses ``genkit.fit_gaussian`` on the digits training set.

A trained checkpoint can stand in for the in-script training (--digits-checkpoint, EMA weights; any
``train/train.py`` run of a ddpm-path eps ``Diffusion`` on digits), and --digits-search runs the DSS search on it
too. --fields picks the analytic fields, the digits model or both; each choice writes its own results file
(``bench_solvers``, ``bench_solvers_analytic``, ``bench_solvers_digits``). --device runs the digits model there
(the analytic fields stay float64 on the CPU); on CUDA, TF32 is turned off so the 1000-step reference is a float32
reference.

  python eval/bench_solvers.py --fields analytic   # ~5 min on 1 CPU thread -> results/bench_solvers_analytic.*
  python train/train.py --family diffusion --path ddpm --prediction eps --data digits --channels 32,64 \
      --batch-size 256 --lr 1e-3 --steps 8000 --checkpoint-every 1000 --out runs/digits_vp_eps
      # the trained model of part (b): ~4 min on an H200
  python eval/bench_solvers.py --fields digits --digits-checkpoint runs/digits_vp_eps/checkpoint --digits-search \
      --digits-n 256 --search-iters 600 --search-pool 1024 --search-batch 64 --search-init uniform --threads 2
      # -> results/bench_solvers_digits.* (~35 min on 2 CPU cores; on a GPU eval/gpu_run.sh trains and runs both
      # with a larger search: --search-iters 1000 --search-pool 2048 --search-batch 256 --device cuda)
  python eval/bench_solvers.py --quick    # smaller sizes, to test the script
"""

from __future__ import annotations

import argparse
import functools
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import RESULTS, markdown_table, write_results  # noqa: E402

import genkit.data  # noqa: E402
import genkit.nets  # noqa: E402
from genkit import (  # noqa: E402  # noqa: E402
    DiffusersScheduler,
    Diffusion,
    GaussianFit,
    GaussianMixture,
    KDiffusionSampler,
    checkpoint,  # noqa: E402
    fit_gaussian,
    get_path,
    steps_saved,
)
from genkit.errors import ConfigError  # noqa: E402
from genkit.solvers import EDMStochastic, LogSNR, Solution, Solver, Uniform, solve  # noqa: E402
from genkit.solvers.searched import search_solver  # noqa: E402
from genkit.train import TrainConfig, Trainer  # noqa: E402

GENKIT = ["ddim", "dpmpp_2m", "dpmpp_3m", "unipc", "deis", "euler", "heun"]
DIFFUSERS = ["DDIMScheduler", "EulerDiscreteScheduler", "DPMSolverMultistepScheduler", "UniPCMultistepScheduler"]
#: genkit's solver that does what each diffusers scheduler does (Euler in sigma/alpha is DDIM)
TWIN = {"DDIMScheduler": "ddim", "EulerDiscreteScheduler": "ddim", "DPMSolverMultistepScheduler": "dpmpp_2m",
        "UniPCMultistepScheduler": "unipc"}
EQUALITY_TARGETS = ("DPMSolverMultistepScheduler", "UniPCMultistepScheduler")
FIELDS = ("all", "analytic", "digits")
#: k-diffusion samplers on their Karras sigmas, with genkit's twin on the same times where one exists
KDIFF = ["sample_euler", "sample_heun", "sample_dpmpp_2m", "sample_lms", "sample_dpm_2"]
KTWIN = {"sample_euler": "ddim", "sample_heun": "edm_heun", "sample_dpmpp_2m": "dpmpp_2m"}
KTWO = ("sample_heun", "sample_dpm_2")  # two evaluations per step, one on the last (to sigma = 0)


@functools.lru_cache(maxsize=1)
def k_diffusion_sampling() -> tuple[Any, str]:
    """``k_diffusion.sampling`` and its version, or (None, why not). Only that module is loaded: the package's
    ``__init__`` also imports its training stack (CLIP, wandb, kornia, ...), which the samplers do not use."""
    import importlib.metadata
    import importlib.util
    import types

    try:
        spec = importlib.util.find_spec("k_diffusion")
        if spec is None or not spec.submodule_search_locations:
            return None, "k-diffusion is not installed (pip install k-diffusion --no-deps torchsde)"
        if "k_diffusion" not in sys.modules:
            pkg = types.ModuleType("k_diffusion")
            pkg.__path__, pkg.__spec__ = list(spec.submodule_search_locations), spec
            sys.modules["k_diffusion"] = pkg
        import k_diffusion.sampling as sampling

        return sampling, importlib.metadata.version("k-diffusion")
    except Exception as e:  # any import failure leaves the k-diffusion rows out, with the reason reported
        return None, f"k_diffusion.sampling failed to import: {type(e).__name__}: {e}"


TOLERANCE = 0.03
SEARCHES = {"searched": "DSS", "searched_extended": "DSS + genkit extensions"}


def rms(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x - ref).reshape(x.shape[0], -1).square().sum(1).mean().sqrt())


def mixture(dim: int, path_name: str, prediction: str, narrow: bool = False) -> GaussianMixture:
    """2-D: 8 tight modes on a ring; 16-D: 6 random modes with random anisotropic covariances; ``narrow``: 6
    well-separated narrow modes (means N(0, I), std 0.05, equal weights: issue 8's field)."""
    g = torch.Generator().manual_seed(dim)
    if narrow:
        means = torch.randn(6, dim, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        covs = 0.05 ** 2 * torch.eye(dim, dtype=torch.float64).repeat(6, 1, 1)
        return GaussianMixture(torch.full((6,), 1 / 6, dtype=torch.float64), means, covs, get_path(path_name),
                               prediction)
    if dim == 2:
        ang = torch.arange(8, dtype=torch.float64) * (2 * math.pi / 8)
        means = 1.5 * torch.stack([ang.cos(), ang.sin()], 1)
        covs = 0.02 * torch.eye(2, dtype=torch.float64).repeat(8, 1, 1)
    else:
        k = 6
        means = 0.8 * torch.randn(k, dim, generator=g, dtype=torch.float64)
        a = torch.randn(k, dim, dim, generator=g, dtype=torch.float64)
        covs = 0.15 * a @ a.transpose(1, 2) / dim + 0.02 * torch.eye(dim, dtype=torch.float64)
    w = torch.softmax(0.5 * torch.randn(len(means), generator=g, dtype=torch.float64), 0)
    return GaussianMixture(w, means, covs, get_path(path_name), prediction)


def _check_digits_model(model: Any, source: str) -> None:
    """The diffusers contenders are built for diffusers' DDPM schedule and eps prediction: the model must match."""
    path = getattr(model, "path", None)
    ok = (isinstance(model, Diffusion) and getattr(path, "name", None) == "ddpm" and model.prediction == "eps"
          and (path.beta_start, path.beta_end, path.num_steps) == (1e-4, 0.02, 1000)
          and tuple(model.sample_shape) == (1, 8, 8))
    if not ok:
        raise ConfigError(f"{source} is not an eps-prediction Diffusion on the default ddpm path (beta 1e-4..0.02, "
                          f"1000 steps) for 8x8 digits (got {model!r}); train one with train/train.py --family "
                          "diffusion --path ddpm --prediction eps --data digits")


def digits_model(args: argparse.Namespace) -> tuple[Diffusion, torch.Tensor, dict[str, Any]]:
    """The VP-eps digits model (EMA weights) in eval mode on --device, with its training data: loaded from
    --digits-checkpoint, or trained here for --digits-steps steps."""
    import tempfile

    data = genkit.data.load_dataset("digits")
    device = torch.device(args.device)
    if args.digits_checkpoint is not None:
        model = checkpoint.load(args.digits_checkpoint, map_location=device)
        _check_digits_model(model, str(args.digits_checkpoint))
        config = checkpoint.read_config(args.digits_checkpoint)
        state_file = Path(args.digits_checkpoint) / "trainer_state.json"
        state = json_load(state_file) if state_file.is_file() else {}
        metrics_file = Path(args.digits_checkpoint).parent / "metrics.json"  # train/train.py's sample metrics
        info = {"source": "checkpoint", "checkpoint": str(args.digits_checkpoint), "config": config,
                "steps": state.get("step"), "train_config": state.get("train_config"),
                "sample_metrics": json_load(metrics_file) if metrics_file.is_file() else None}
    else:
        torch.manual_seed(args.seed)
        model = Diffusion(genkit.nets.UNet(8, in_channels=1, block_out_channels=(16, 32), norm_num_groups=8),
                          path="ddpm", prediction="eps", sample_shape=(1, 8, 8))
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            cfg = TrainConfig(steps=args.digits_steps, batch_size=64, lr=args.digits_lr, warmup_steps=20,
                              ema_decay=0.99, cpu=device.type == "cpu", progress=False, checkpoint_every=None,
                              out_dir=tmp, log_every=max(1, args.digits_steps // 10), seed=args.seed)
            result = Trainer(model, cfg).fit(data)
        if result.ema is not None:
            model.load_state_dict(result.ema)
        info = {"source": "trained here", "steps": args.digits_steps, "batch": 64, "lr": args.digits_lr,
                "ema_decay": 0.99, "train_seconds": time.perf_counter() - t0, "losses": result.losses}
        print(f"digits model: {args.digits_steps} steps in {info['train_seconds']:.1f} s, "
              f"final loss {result.losses[-1][1]:.4f}", flush=True)
    model = model.to(device).eval().requires_grad_(False)
    info.update({"data": list(data.shape), "params": sum(p.numel() for p in model.parameters()),
                 "time_range": list(model.time_range()), "device": str(device)})
    return model, data, info


def json_load(path: Path) -> Any:
    import json

    return json.loads(path.read_text(encoding="utf-8"))


def diffusers_scheduler(name: str) -> Any:
    import diffusers

    common = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                  prediction_type="epsilon")
    extra = {"DDIMScheduler": dict(clip_sample=False, set_alpha_to_one=True, timestep_spacing="trailing"),
             "EulerDiscreteScheduler": {},
             "DPMSolverMultistepScheduler": dict(algorithm_type="dpmsolver++", solver_order=2),
             "UniPCMultistepScheduler": dict(solver_type="bh2", predict_x0=True, solver_order=2)}[name]
    return getattr(diffusers, name)(**common, **extra)


class OnLogSNR(Solver):
    """A reference solver for ``search_solver``: ``inner`` with ``steps`` log-SNR steps between the given
    grid's end points, clipped at ``lambda_max`` as the scoring reference is (the search's own uniform reference
    grid would put rk4 on the singular t = 0)."""

    def __init__(self, inner: str, steps: int, lambda_max: float = 12.0):
        self.inner, self.steps, self.lambda_max = inner, steps, lambda_max
        self.name = f"{inner}@logsnr{steps}"

    def solve(self, field, x, times, *, generator=None, trajectory=False, **cond) -> Solution:
        grid = LogSNR(lambda_max=self.lambda_max, t_max=float(times[0]), t_min=float(times[-1]))
        return solve(field, x, self.inner, self.steps, grid, **cond)

    def __repr__(self) -> str:
        return f"OnLogSNR({self.inner!r}, {self.steps}, lambda_max={self.lambda_max:g})"


class Memo(Solver):
    """``inner`` solving each distinct start state once: the two searches share their pool's reference."""

    def __init__(self, inner: Solver):
        self.inner, self.name, self.seen = inner, inner.name, []

    def solve(self, field, x, times, *, generator=None, trajectory=False, **cond) -> Solution:
        for (x_seen, t_seen), sol in self.seen:
            if x_seen.shape == x.shape and torch.equal(x_seen, x) and torch.equal(t_seen, times) and not trajectory:
                return sol
        sol = self.inner.solve(field, x, times, generator=generator, trajectory=trajectory, **cond)
        self.seen.append(((x, times), sol))
        return sol

    def __repr__(self) -> str:
        return repr(self.inner)


def genkit_run(field: GaussianMixture, x: torch.Tensor, name: str, nfe: int, grid: LogSNR) -> Solution | None:
    """``name`` at (at most) ``nfe`` evaluations; None when the budget does not fit."""
    singular_end = field.path.name == "ddpm"
    # EDM's Heun on the ddpm path (its last step, onto t = 0, is an Euler step)
    solver = EDMStochastic(churn=0.0) if name == "heun" and singular_end else genkit.solvers.get_solver(name)
    # the most steps whose declared evaluations fit the budget
    fits = [n for n in range(1, nfe + 1) if solver.nfe(n, times=grid.times(n, field.path), path=field.path) <= nfe]
    return solve(field, x, solver, fits[-1], grid) if fits else None


def bench_field(label: str, field: Any, args: argparse.Namespace, *, n: int | None = None,
                fit: GaussianFit | None = None, search: bool = True, extra: dict[str, Any] | None = None
                ) -> dict[str, Any]:
    """All contenders on one field. Analytic mixtures: float64, grid to t = 0 with log-SNR up to 12. A trained
    Diffusion model: float32, log-SNR grid over its training range [t_eps, t_max], then the last step to t = 0."""
    t_field = time.perf_counter()
    path, n = field.path, n or args.n
    trained = isinstance(field, Diffusion)
    shape = tuple(field.sample_shape) if trained else (field.dim,)
    dtype = torch.float32 if trained else torch.float64
    device = next(field.parameters()).device if trained else torch.device("cpu")
    x = path.sample_prior((n, *shape), generator=torch.Generator().manual_seed(args.seed), dtype=dtype, device=device)
    if trained:
        t_eps, t_max = field.time_range()
        lam_max = float(path.log_snr(torch.tensor(t_eps, dtype=torch.float64)))
        grid = LogSNR(lambda_max=lam_max, t_max=t_max, t_min=0.0)
        grid_text = f"log-SNR steps from t={t_max:g} to t_eps={t_eps:g} (log-SNR {lam_max:.2f}), last step to t=0"
    else:
        grid = LogSNR(t_min=0.0)
        grid_text = "log-SNR steps to log-SNR 12, last step to t=0"
    with torch.no_grad():
        ref = solve(field, x, "unipc", args.reference_steps, grid).samples
        check = solve(field, x, "dpmpp_3m", args.reference_steps, grid).samples
    out: dict[str, Any] = {"field": repr(field) if not trained else "trained digits Diffusion (ddpm, eps)",
                           "n": n, "dtype": str(dtype).replace("torch.", ""), "grid": grid_text,
                           "reference": f"unipc, {args.reference_steps} {grid_text}",
                           "reference_error": rms(check, ref), "reference_norm": rms(ref, torch.zeros_like(ref)),
                           "reference_max_abs": float(ref.abs().max()), "device": str(device),
                           "genkit": {}, "diffusers": {},
                           "genkit_on_diffusers_times": {}, **(extra or {})}
    for name in GENKIT:
        rows = out["genkit"][name] = {}
        for nfe in args.nfe:
            with torch.no_grad():
                sol = genkit_run(field, x, name, nfe, grid)
            if sol is not None:
                rows[str(nfe)] = {"nfe": sol.nfe, "error": rms(sol.samples, ref)}
    for name in DIFFUSERS:
        rows = out["diffusers"][name] = {}
        same = out["genkit_on_diffusers_times"][name] = {}
        adapter = DiffusersScheduler(diffusers_scheduler(name))
        for nfe in args.nfe:
            with torch.no_grad():
                sol = solve(field, x, adapter, nfe)
            rows[str(nfe)] = {"nfe": sol.nfe, "error": rms(sol.samples, ref), "t_first": float(sol.times[0])}
            # the adapter hands the field x_vp * alpha_f / alpha_vp (x_vp: the prior in VP scale, as the
            # scheduler's first model input); start genkit's twin from that state at the same time
            t_first = sol.times[:1]
            scale = float(torch.sqrt(path.alpha(t_first) ** 2 + path.sigma(t_first) ** 2))
            with torch.no_grad():
                mine = solve(field, x / path.prior_std() * scale, TWIN[name], None, sol.times)
            same[str(nfe)] = {"solver": TWIN[name], "nfe": mine.nfe, "error": rms(mine.samples, ref),
                              "max_abs_diff_to_diffusers": float((mine.samples - sol.samples).abs().max())}
    out["kdiffusion"], out["genkit_on_kdiffusion_times"], out["kdiffusion_version"] = None, None, None
    sampling, version = k_diffusion_sampling()
    if sampling is None:
        out["kdiffusion_missing"] = version
    else:
        out["kdiffusion"], out["genkit_on_kdiffusion_times"], out["kdiffusion_version"] = {}, {}, version
        t_lo = field.time_range()[0] if trained else 1e-3  # diffusers' timestep 0 / CompVisDenoiser's sigma_min
        if path.alpha_vanishes:  # flow matching: EDM's range; the prior is taken as the noise at sigma_max
            s_min, s_max = 0.002, 80.0
        else:
            s_min, s_max = (float(path.ve_sigma(torch.tensor(t, dtype=torch.float64))) for t in (t_lo, 1.0))
        for name in KDIFF:
            rows = out["kdiffusion"][name] = {}
            same = out["genkit_on_kdiffusion_times"][name] = {} if name in KTWIN else None
            for nfe in args.nfe:
                steps = (nfe + 1) // 2 if name in KTWO else nfe
                if name == "sample_lms" and steps < 2 or steps < 1:
                    continue
                sig = sampling.get_sigmas_karras(steps, s_min, s_max).to(torch.float64)
                times = path.t_from_ve_sigma(sig)  # k-diffusion's last sigma is 0: t = 0
                if not path.alpha_vanishes:
                    times[0] = 1.0
                t_first = times[:1]
                scale = float(torch.sqrt(path.alpha(t_first) ** 2 + path.sigma(t_first) ** 2))
                x_start = x if not path.alpha_vanishes else x / path.prior_std() * scale
                with torch.no_grad():
                    sol = solve(field, x_start, KDiffusionSampler(getattr(sampling, name)), None, times)
                rows[str(nfe)] = {"nfe": sol.nfe, "steps": steps, "error": rms(sol.samples, ref),
                                  "t_first": float(times[0])}
                if same is not None:
                    twin = EDMStochastic(churn=0.0) if KTWIN[name] == "edm_heun" else KTWIN[name]
                    with torch.no_grad():
                        mine = solve(field, x_start, twin, None, times)
                    same[str(nfe)] = {"solver": KTWIN[name], "nfe": mine.nfe, "error": rms(mine.samples, ref),
                                      "max_abs_diff_to_kdiffusion": float((mine.samples - sol.samples).abs().max())}
    # searched solvers at NFE 5 (data variant: combines x0 predictions in DDIM steps): DSS in the paper's search
    # space, then with genkit's extensions (a teleport jump fitted to the reference endpoints, searched evaluation
    # times and step scales); both on the same pool, reference and optimiser settings
    out["searched"], out["searched_extended"] = None, None
    if search:
        reference = Memo(OnLogSNR("unipc", args.reference_steps, grid.lambda_max))
        for key, extended in (("searched", False), ("searched_extended", True)):
            t0 = time.perf_counter()
            given = {k: v for k, v in (("iters", args.search_iters), ("batch", args.search_batch),
                                       ("pool", args.search_pool), ("holdout", args.search_holdout),
                                       ("lr", args.search_lr), ("lr_schedule", args.search_lr_schedule))
                     if v is not None}  # the rest: search_solver's defaults
            searched = search_solver(field, args.search_nfe, shape=shape, variant=args.search_variant,
                                     reference_solver=reference, reference_steps=1, **given, eval_times=extended,
                                     step_scales=extended, teleport="reference" if extended else None,
                                     grid=grid if args.search_init == "grid" else Uniform(1.0, float(grid.t_min)),
                                     generator=torch.Generator().manual_seed(args.seed + 1), dtype=dtype)
            with torch.no_grad():
                s_err = rms(solve(field, x, searched, args.search_nfe, grid).samples, ref)
            out[key] = {"nfe": args.search_nfe, "error": s_err, "search_seconds": time.perf_counter() - t0,
                        "info": searched.info, "times": searched.times.tolist(),
                        "eval_times": searched.eval_times.tolist(),
                        "scales": None if searched.scales is None else searched.scales.tolist()}
    # teleportation: Gaussian with the mixture's exact mean and covariance (or the given data fit)
    fit = fit or GaussianFit.from_moments(field.mean(0.0), field.covariance(0.0))
    lam_skips = [-6.0, -4.0, -2.0, 0.0]
    t_skips = [float(path.t_from_log_snr(torch.tensor(v, dtype=torch.float64))) for v in lam_skips]
    tele = {}
    for solver in ("dpmpp_2m", "ddim"):
        with torch.no_grad():
            r = steps_saved(field, fit, x, solver, args.nfe, t_skips, ref, grid)
        # a t_skip is judged by its median saving over the budgets where equal error is measurable
        med = [float(torch.nan_to_num(r.saved[i], nan=-math.inf).median()) for i in range(1, len(r.t_skips))]
        i_best = max(range(len(med)), key=lambda i: med[i])
        best_cell = r.best()
        tele[solver] = {"t_skips": r.t_skips, "log_snr_skips": [None] + lam_skips, "steps": r.steps,
                        "errors": r.errors.tolist(), "saved": r.saved.tolist(),
                        "best_median_saved": med[i_best], "best_t_skip": r.t_skips[1 + i_best],
                        "best_log_snr_skip": lam_skips[i_best],
                        "best_cell": {"saved": best_cell[0], "t_skip": best_cell[1], "steps": best_cell[2]}}
    out["teleport"] = tele
    out["seconds"] = time.perf_counter() - t_field
    print(f"{label}: {out['seconds']:.1f} s (reference error {out['reference_error']:.2e})", flush=True)
    return out


def targets(results: dict[str, Any], nfes: list[int], search_nfe: int) -> list[dict[str, Any]]:
    rows = []
    for label, r in results.items():
        for name in EQUALITY_TARGETS:
            ratios = {n: r["genkit_on_diffusers_times"][name][str(n)]["error"] / r["diffusers"][name][str(n)]["error"]
                      for n in nfes}
            worst = max(ratios.values(), key=lambda v: abs(v - 1))
            rows.append({"field": label, "target": f"genkit {TWIN[name]} = diffusers {name} (same times, every NFE, "
                         f"error ratio within {TOLERANCE:.0%})", "value": f"worst ratio {worst:.4f}",
                         "pass": all(abs(v - 1) <= TOLERANCE for v in ratios.values())})
        if r.get("genkit_on_kdiffusion_times"):
            for name, same in r["genkit_on_kdiffusion_times"].items():
                if same is None:
                    continue
                ratios = {n: same[k]["error"] / r["kdiffusion"][name][k]["error"] for k, n in
                          ((str(n), n) for n in nfes) if k in same}
                worst = max(ratios.values(), key=lambda v: abs(v - 1))
                rows.append({"field": label, "target": f"genkit {same[next(iter(same))]['solver']} = k-diffusion "
                             f"{name} (same sigmas, every NFE, error ratio within {TOLERANCE:.0%})",
                             "value": f"worst ratio {worst:.4f}",
                             "pass": all(abs(v - 1) <= TOLERANCE for v in ratios.values())})
        best = min((r["diffusers"][d]["10"]["error"], d) for d in DIFFUSERS) if 10 in nfes else (math.nan, "-")
        kbest = (min((v["10"]["error"], k) for k, v in r["kdiffusion"].items() if "10" in v)
                 if r.get("kdiffusion") and 10 in nfes else None)
        for key, what in SEARCHES.items():
            target = f"searched ({what}) @ {search_nfe} NFE <= best diffusers @ 10 NFE"
            if r.get(key) is None:
                rows.append({"field": label, "target": target, "value": "not run (time budget)", "pass": None})
                continue
            s = r[key]["error"]
            also = f"; best k-diffusion @ 10: {kbest[0]:.3g} ({kbest[1]})" if kbest else ""
            rows.append({"field": label, "target": target, "value": f"{s:.3g} vs {best[0]:.3g} ({best[1]}){also}",
                         "pass": bool(s <= best[0])})
        if r.get("searched") and r.get("searched_extended"):
            d, e = r["searched"]["info"]["holdout_loss"], r["searched_extended"]["info"]["holdout_loss"]
            rows.append({"field": label, "target": "extended search's held-out MSE <= DSS's (same budget and seed)",
                         "value": f"{e:.3g} vs {d:.3g} (kept: {r['searched_extended']['info']['chosen']})",
                         "pass": bool(e <= d)})
        tp = r["teleport"]["dpmpp_2m"]
        rows.append({"field": label, "target": "teleportation saves >= 20% of dpmpp_2m steps at equal error (median "
                     "over budgets, best t_skip)", "value": f"{tp['best_median_saved']:.0%} at log-SNR "
                     f"{tp['best_log_snr_skip']:g} (best cell {tp['best_cell']['saved']:.0%})",
                     "pass": bool(tp["best_median_saved"] >= 0.2)})
    return rows


def plot(results: dict[str, Any], out: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.2 * len(results) + 1.6, 4.2))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(results), squeeze=False)[0]
    for ax, (label, r) in zip(axes, results.items()):
        for name, rows in r["genkit"].items():
            pts = sorted((v["nfe"], v["error"]) for v in rows.values())
            ax.plot(*zip(*pts), marker="o", ms=3, label=f"genkit {name}")
        for name, rows in r["diffusers"].items():
            pts = sorted((v["nfe"], v["error"]) for v in rows.values())
            ax.plot(*zip(*pts), ls="--", marker="x", ms=4, label=f"diffusers {name.replace('Scheduler', '')}")
        for name, rows in (r.get("kdiffusion") or {}).items():
            pts = sorted((v["nfe"], v["error"]) for v in rows.values())
            ax.plot(*zip(*pts), ls=":", marker="+", ms=5, label=f"k-diffusion {name.replace('sample_', '')}")
        for key, style, what in (("searched", "k*", "DSS"), ("searched_extended", "r*", "DSS + genkit extensions")):
            if r.get(key) is not None:
                ax.plot([r[key]["nfe"]], [r[key]["error"]], style, ms=12, label=f"searched ({what})")
        ax.set_xscale("log")
        ax.set_yscale("log")
        # unstable rows (EDM Heun at few steps) would hide the rest: cap the axis at 5x the worst diffusers error
        cap = 5 * max(v["error"] for rows in r["diffusers"].values() for v in rows.values())
        ax.set_ylim(top=min(ax.get_ylim()[1], cap))
        ax.set_xlabel("NFE")
        ax.set_title(label, fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("RMS error to reference")
    handles, labels = axes[-1].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=6, loc="center right")
    fig.tight_layout(rect=(0, 0, 1 - 1.6 / (4.2 * len(results) + 1.6), 1))
    fig.savefig(out, dpi=100)


def markdown(results: dict[str, Any], rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    md = ["## Targets", "", markdown_table(["field", "target", "measured", "result"],
                                           [[t["field"], t["target"], t["value"],
                                             "-" if t["pass"] is None else "PASS" if t["pass"] else "FAIL"]
                                            for t in rows]), ""]
    for label, r in results.items():
        md += [f"## {label}", "", f"`{r['field']}`, {r['n']} samples ({r['dtype']}), reference {r['reference']} (its "
               f"distance to a {args.reference_steps}-step dpmpp_3m solve on the same grid: "
               f"{r['reference_error']:.2e}; "
               f"RMS norm of the reference samples {r['reference_norm']:.3g}); {r['seconds']:.0f} s.", ""]
        if "model" in r:
            m = r["model"]
            if m["source"] == "checkpoint":
                cfg, tc = m["config"], m.get("train_config") or {}
                trained = (f"loaded from `{m['checkpoint']}` (EMA weights; {m['steps']} training steps, batch "
                           f"{tc.get('batch_size')}, lr {tc.get('lr')}, EMA {tc.get('ema_decay')}; UNet "
                           f"block_out_channels {cfg.get('net', {}).get('block_out_channels')})")
                sm = m.get("sample_metrics") or {}
                if "frechet_digits" in sm:
                    trained += (f"; its train.py samples ({sm['n_samples']}, {sm['solver']} {sm['nfe']} NFE) score "
                                f"frechet_digits {sm['frechet_digits']:.1f} against held-out digits, whose own noise "
                                f"floor is {sm['noise_floor']['frechet_digits']:.1f}")
            else:
                trained = (f"trained here {m['steps']} steps (batch {m['batch']}, lr {m['lr']:g}, "
                           f"EMA {m['ema_decay']}) "
                           f"in {m['train_seconds']:.0f} s, final loss {m['losses'][-1][1]:.4f}")
            bound = math.sqrt(math.prod(m["data"][1:]))
            near = r["reference_max_abs"] <= 1.25  # unclipped samples overshoot [-1, 1] a little
            md += [f"Model: a ddpm-path eps `Diffusion` with a `genkit.nets.UNet`, {m['params']} parameters, "
                   f"{trained}; run on {m['device']}, evaluated on `time_range()` = {m['time_range']}. "
                   "All endpoints are at t = 0: "
                   "genkit's last step goes from t_eps to 0 evaluating only at t_eps; diffusers' schedulers evaluate "
                   "at timesteps >= 0 (t >= 1e-3) and finish with their own step to alpha = 1. Its reference samples "
                   f"(unclipped) have RMS norm {r['reference_norm']:.3g} (an image in [-1, 1] has at most {bound:.0f}) "
                   f"and max |pixel| {r['reference_max_abs']:.3g}: "
                   + ("they lie in or near the data range." if near else "they leave the data range [-1, 1]: the "
                      "model is under-trained, and the rows measure solver accuracy on this field, not sample "
                      "quality."), ""]
        md += [f"RMS error to the reference (genkit: {r['grid']}; diffusers: their own timesteps; "
               "`= times`: the genkit twin on the diffusers scheduler's exact times).", ""]
        header = ["solver"] + [str(n) for n in args.nfe]
        table = []
        for name, v in r["genkit"].items():
            table.append([f"genkit {name}"] + [f"{v[str(n)]['error']:.3g}" + ("" if v[str(n)]["nfe"] == n else
                                               f" ({v[str(n)]['nfe']})") if str(n) in v else "-" for n in args.nfe])
        for name, v in r["diffusers"].items():
            table.append([f"diffusers {name}"] + [f"{v[str(n)]['error']:.3g}" for n in args.nfe])
            same = r["genkit_on_diffusers_times"][name]
            table.append([f"  = times: genkit {TWIN[name]}"] + [f"{same[str(n)]['error']:.3g} "
                         f"(x{same[str(n)]['error'] / v[str(n)]['error']:.4f})" for n in args.nfe])
        if r.get("kdiffusion"):
            for name, v in r["kdiffusion"].items():
                table.append([f"k-diffusion {name}"] + [f"{v[str(n)]['error']:.3g}" + ("" if v[str(n)]["nfe"] == n else
                             f" ({v[str(n)]['nfe']})") if str(n) in v else "-" for n in args.nfe])
                same = r["genkit_on_kdiffusion_times"][name]
                if same is not None:
                    table.append([f"  = sigmas: genkit {KTWIN[name]}"] + [f"{same[str(n)]['error']:.3g} "
                                 f"(x{same[str(n)]['error'] / v[str(n)]['error']:.4f})" if str(n) in same else "-"
                                 for n in args.nfe])
        md += [markdown_table(header, table), "",
               "(n) = the NFE actually used where the budget does not fit (heun: 2 per step; EDM's Heun on the ddpm "
               "path: 2 per step, 1 on the last; k-diffusion heun / dpm_2: 2 per step, 1 on the last)."
               + (f" k-diffusion {r['kdiffusion_version']} rows: its samplers on `get_sigmas_karras` (rho 7) through "
                  "`genkit.interop.KDiffusionSampler`; `= sigmas`: genkit's twin on the same times."
                  if r.get("kdiffusion") else f" k-diffusion: not run ({r.get('kdiffusion_missing')})."), ""]
        for key, what in SEARCHES.items():
            s = r.get(key)
            if s is None:
                md += [f"Searched ({what}): not run for this field (its 1000-step reference on the search pool would "
                       "cost minutes on the CPU).", ""]
                continue
            curve = ", ".join(f"{v:.3g}" for v in s["info"].get("loss_curve", [])[::4])
            extra = "" if s["scales"] is None else (
                "; evaluated at " + ", ".join(f"{t:.3g}" for t in s["eval_times"]) + "; step scales "
                + ", ".join(f"{v:.3g}" for v in s["scales"]))
            init = "uniform in t" if args.search_init == "uniform" else "the log-SNR grid"
            md += [f"Searched ({what}; {args.search_variant} variant, initial steps {init}, "
                   f"{s['info']['iters']} iters of batch {s['info']['batch']}, pool {s['info']['pool']}, "
                   f"lr {s['info']['lr']:g} "
                   f"{s['info'].get('lr_schedule', 'constant')}): NFE {s['nfe']}, error {s['error']:.3g}, search "
                   f"{s['search_seconds']:.0f} s; times " + ", ".join(f"{t:.3g}" for t in s["times"]) + extra
                   + f". Search loss (endpoint MSE on the pool, chunk means): {curve}. Held-out MSE "
                   f"{s['info']['holdout_loss']:.3g} (best of {len(s['info']['holdout_curve'])} checks, at iteration "
                   f"{s['info']['best_iter']}; DSS's {s['info']['dss_holdout_loss']:.3g}; kept: "
                   f"{s['info']['chosen']}).", ""]
        fit_text = ("a Gaussian fit (`fit_gaussian`) of the digits training set" if "model" in r
                    else "the mixture's exact mean and covariance")
        for solver, tp in r["teleport"].items():
            t_rows = [[f"{t:.4g}" + ("" if lam is None else f" (log-SNR {lam:g})")]
                      + [f"{e:.3g} ({sv:+.0%})" if not math.isnan(sv) else f"{e:.3g}" for e, sv in zip(er, sa)]
                      for t, lam, er, sa in zip(tp["t_skips"], tp["log_snr_skips"], tp["errors"], tp["saved"])]
            md += [f"Teleportation with {solver} ({fit_text}): error (steps saved at equal error) per step "
                   "budget; first row no teleport.", "",
                   markdown_table(["t_skip"] + [str(n) for n in tp["steps"]], t_rows), ""]
    digits = [r for r in results.values() if "model" in r]
    analytic = [r for r in results.values() if "model" not in r]
    if digits and digits[0]["searched"] is None:
        md += ["## Not measured", "", "The DSS searched solver on the trained digits model (add --digits-search): "
               "`search_solver` needs a 1000-step reference solve of its whole search pool plus backpropagation "
               "through the UNet at every iteration, minutes on a CPU.", ""]
    md += ["## Notes", "",
           "- genkit's own rows use a uniform log-SNR grid (analytic fields: from t = 1 to log-SNR 12, then one step "
           "to t = 0). At <= 10 NFE that grid can lose to diffusers' timestep spacing (compare genkit dpmpp_2m / "
           "unipc with the diffusers rows), because one of few steps is spent at high log-SNR where little happens; "
           "on the diffusers scheduler's own times genkit's solvers give the same error (`= times` rows).",
           "- `= times` for DDIMScheduler can differ by a few % at some NFE: diffusers' DDIM steps to "
           "`t - 1000 // n`, which is not always the next timestep of its own `trailing` schedule.",
           "- euler/heun run on the same log-SNR grid, which is not their best grid (Runge-Kutta in t prefers a "
           "uniform or Karras grid); EDM's Heun on the ddpm path is unstable at few steps there.",
           "- Teleportation: the best t_skip is chosen after the fact among 4 (log-SNR -6, -4, -2, 0); the 'best "
           "cell' is the single best (t_skip, budget) and is optimistic.",
           "- The searched solvers are searched on other noise (seed + 1) than they are scored on. 'DSS' is the "
           "paper's search space (step sizes and multistep coefficients). 'DSS + genkit extensions' adds, at no "
           "extra evaluation, a closed-form first jump along the Gaussian fitted to the search pool's reference "
           "endpoints (the times list starts 1, t_jump), a searched shift of each evaluation time and a searched "
           "factor on each update (`search_solver(..., teleport='reference', eval_times=True, step_scales=True)`)."]
    if analytic:
        md += ["- Analytic fields: exact everywhere, so the grid runs to log-SNR 12; the Gaussian of teleportation "
               "is the mixture's exact mean and covariance. dpmpp_3m is non-monotone at 4-8 NFE on these grids "
               "(third-order extrapolation over long log-SNR steps). On the linear path diffusers' schedules start "
               "at the SNR of step 999 (t = 0.994), not at t = 1, which puts a floor under their error; the "
               "`= times` rows start genkit there too, so the equality check is unaffected. diffusers keeps "
               "alphas_cumprod in float32. k-diffusion's rows on the linear path start at sigma 80 (EDM's "
               "sigma_max, t < 1) with the prior taken as the noise there, the same kind of floor; on the ddpm "
               "path they run from sigma(t = 1) to sigma(t = 1e-3) and then to 0."]
    if digits:
        md += ["- Digits: the reference and every genkit row stay on the model's training range (no network call "
               "below t_eps = 1e-3, the t of diffusers' timestep 0) and end at t = 0, as diffusers' schedulers do, so "
               "all endpoints compare the same (denoised) state. With eps prediction on the ddpm path the data "
               "prediction at t = 1 is (x - sigma eps_hat) / alpha with 1 / alpha ~ 156, so the network's eps error "
               "is amplified in the first steps of every solver (diffusers' schedulers start at the same t = 1).",
               "- Digits teleportation: the Gaussian is fitted to the training data (`fit_gaussian`), not to the "
               "model's distribution; the better the model, the closer its high-noise flow is to that Gaussian's."]
    return "\n".join(md)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nfe", default="3,4,5,6,8,10,16", help="comma-separated NFE budgets")
    p.add_argument("--fields", default="all", choices=FIELDS, help="analytic mixtures, the digits model, or both")
    p.add_argument("--n", type=int, default=512, help="noise samples per field")
    p.add_argument("--reference-steps", type=int, default=1000)
    p.add_argument("--search-nfe", type=int, default=5)
    p.add_argument("--search-iters", type=int, help="search iterations (default: search_solver's, 1000)")
    p.add_argument("--search-pool", type=int, help="search pool (default: search_solver's, 1024)")
    p.add_argument("--search-lr", type=float, help="search learning rate (default: search_solver's, 3e-2)")
    p.add_argument("--search-batch", type=int, help="search batch (default: search_solver's, 64)")
    p.add_argument("--search-holdout", type=int, help="held-out noise of the searches, on which they keep their best "
                   "iterate and the extended search its best candidate (default: search_solver's, 512)")
    p.add_argument("--search-lr-schedule", choices=("constant", "cosine"),
                   help="default: search_solver's (constant)")
    p.add_argument("--search-init", default="uniform", choices=("grid", "uniform"),
                   help="initial steps of the searches: uniform in t (search_solver's default), or the bench's "
                        "log-SNR grid")
    p.add_argument("--search-variant", default="data", choices=("data", "velocity"),
                   help="DSS update: data prediction in DDIM steps (the paper's DDPM form) or velocity Euler steps")
    p.add_argument("--digits-checkpoint", type=Path, help="a trained ddpm-path eps Diffusion on digits (EMA weights "
                   "used); without it the model is trained here for --digits-steps steps")
    p.add_argument("--digits-steps", type=int, default=500, help="training steps of the digits model trained here")
    p.add_argument("--digits-n", type=int, default=64, help="noise samples for the digits model")
    p.add_argument("--digits-lr", type=float, default=2e-3)
    p.add_argument("--digits-search", action="store_true", help="also run the DSS search on the digits model "
                   "(a 1000-step reference of the search pool plus backprop through the network: minutes on a CPU)")
    p.add_argument("--device", default="cpu", help="where the digits model runs (cpu, cuda, ...)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="tiny sizes to test the script (results not written to "
                   "eval/results)")
    p.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    args = p.parse_args(argv)
    args.nfe = sorted({int(v) for v in args.nfe.split(",")})
    if args.fields != "analytic" and args.digits_checkpoint is None and args.digits_steps < 1:
        raise ConfigError(f"--digits-steps {args.digits_steps}: the digits model needs >= 1 training step or "
                          "--digits-checkpoint; for the analytic fields alone use --fields analytic")
    if args.quick:
        args.n, args.reference_steps, args.search_iters, args.search_pool = 64, 100, 10, 64
        args.digits_steps, args.digits_n = min(args.digits_steps, 20), min(args.digits_n, 16)
    torch.set_num_threads(args.threads)
    if torch.device(args.device).type == "cuda":  # a float32 reference, not a TF32 one
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    t0 = time.perf_counter()
    results: dict[str, Any] = {}
    if args.fields in ("all", "analytic"):
        fields = {"gmm2d ddpm eps": mixture(2, "ddpm", "eps"), "gmm16d ddpm eps": mixture(16, "ddpm", "eps"),
                  "gmm2d linear velocity": mixture(2, "linear", "velocity"),
                  "gmm16d linear velocity": mixture(16, "linear", "velocity"),
                  "gmm16d narrow linear velocity": mixture(16, "linear", "velocity", narrow=True),
                  "gmm16d narrow ddpm eps": mixture(16, "ddpm", "eps", narrow=True)}
        results.update({label: bench_field(label, f, args) for label, f in fields.items()})
    if args.fields in ("all", "digits"):
        model, data, info = digits_model(args)
        label = "digits UNet ddpm eps (trained)"
        results[label] = bench_field(label, model, args, n=args.digits_n, fit=fit_gaussian(data).to(args.device),
                                     search=args.digits_search, extra={"model": info})
    rows = targets(results, args.nfe, args.search_nfe)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    payload = {"settings": settings, "targets": rows, "results": results, "seconds": time.perf_counter() - t0}
    name = "bench_solvers" + ("" if args.fields == "all" else f"_{args.fields}") + ("_quick" if args.quick else "")
    json_path, md_path = write_results(name, payload, markdown(results, rows, args)
                                       + f"\n\nTotal {payload['seconds']:.0f} s.", args.out)
    plot(results, args.out / f"{name}.png")
    for t in rows:
        verdict = "-" if t["pass"] is None else "PASS" if t["pass"] else "FAIL"
        print(f"{verdict}  {t['field']}: {t['target']}: {t['value']}")
    print(f"{json_path}\n{md_path}\n{args.out / (name + '.png')}\ntotal {payload['seconds']:.0f} s")


if __name__ == "__main__":
    main()
