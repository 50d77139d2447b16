"""diffusers interoperability, both ways, converted at the edge.

- :func:`from_diffusers` loads a diffusers ``UNet2DModel`` + scheduler folder (or objects) as a genkit
  :class:`~genkit.models.Diffusion` model: every genkit solver, likelihood and trainer works on it;
  :func:`to_diffusers` saves a genkit ddpm-path ``Diffusion`` with a UNet back as a ``DDPMPipeline`` folder.
  Integer step ``i`` of a DDPM schedule is genkit time ``t = (i + 1) / N`` on the ``ddpm`` path.
- :class:`DiffusersScheduler` lets any diffusers scheduler drive any genkit field. At each scheduler
  timestep the adapter finds the genkit time with the same signal-to-noise ratio on the field's path,
  rescales the scheduler's sample onto that path (``x_f = x * alpha_f / alpha_vp``), evaluates the
  field and hands back the scheduler's ``prediction_type`` (eps, x0 and v read through the path).
- :class:`KDiffusionSampler` lets any k-diffusion sampler function (``sample_euler``, ``sample_heun``,
  ``sample_dpmpp_2m``, ...) drive any genkit field on any genkit grid, through its denoiser convention.

>>> # model = from_diffusers("ddpm-folder"); x = model.sample(16, solver="dpmpp_2m", steps=10)
>>> # solve(field, x1, DiffusersScheduler(EulerDiscreteScheduler(...)), steps=20)
"""

from __future__ import annotations

import copy
import inspect
import json
import math
import re
from pathlib import Path as FsPath
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .checkpoint import is_checkpoint, unwrap
from .errors import CheckpointError, ConfigError
from .fields import Field
from .io import atomic_folder
from .paths import DDPMLinearPath, broadcast_time
from .solvers.base import Solution, Solver, check_finite_result

__all__ = ["from_diffusers", "to_diffusers", "DiffusersScheduler", "KDiffusionSampler", "PREDICTION_FROM_DIFFUSERS"]

PREDICTION_FROM_DIFFUSERS = {"epsilon": "eps", "sample": "x0", "v_prediction": "v"}


def _path_of(config: Any) -> DDPMLinearPath:
    sched = str(config.get("beta_schedule", "linear"))
    if sched != "linear" or config.get("trained_betas") is not None:
        raise ConfigError(
            f"from_diffusers supports beta_schedule='linear' (DDPM) schedulers, exactly; got {sched!r}. "
            "Wrap the UNet yourself with genkit.nets.UNet.from_unet2d and a genkit path that matches it."
        )
    return DDPMLinearPath(config.get("beta_start", 1e-4), config.get("beta_end", 0.02),
                          config.get("num_train_timesteps", 1000))


def _unet_folder(root: FsPath) -> FsPath:
    """The folder holding the UNet of a pipeline folder (``unet/``) or of a UNet folder (``config.json``)."""
    if not root.exists():
        raise ConfigError(f"no diffusers folder at {root}; check the path")
    if not root.is_dir():
        raise ConfigError(f"{root} is a file, not a diffusers folder; pass a pipeline folder (unet/, scheduler/) or a "
                          "UNet folder (config.json and its weights)")
    if (root / "unet").is_dir():
        return root / "unet"
    if is_checkpoint(root) or (root / "checkpoint").is_dir():
        raise CheckpointError(f"{root} is a genkit checkpoint or run folder, not a diffusers one; load it with "
                              f"genkit.load({str(root)!r})")
    if not (root / "config.json").is_file():
        found = ", ".join(sorted(p.name for p in root.iterdir())[:6]) or "nothing: the folder is empty"
        raise CheckpointError(f"{root} holds no diffusers UNet (found {found}). Pass a pipeline folder with unet/ and "
                              "scheduler/ (as to_diffusers and DDPMPipeline.save_pretrained write) or a UNet folder "
                              "with config.json and its weights")
    return root


def _from_pretrained(cls: Any, folder: FsPath, what: str) -> Any:
    try:
        return cls.from_pretrained(folder)
    except (OSError, ValueError) as e:  # diffusers raises OSError/EnvironmentError for missing or unreadable files
        raise CheckpointError(f"cannot read the diffusers {what} in {folder}: {str(e).rstrip('.')}. Check that the "
                              "folder is complete (re-export or re-download it)") from e


def _export_record(root: FsPath) -> dict[str, Any] | None:
    """The genkit model config that :func:`to_diffusers` recorded in ``genkit_export.json``, if any."""
    file = root / "genkit_export.json"
    if not file.is_file():
        return None
    try:
        record = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{file} is unreadable or not valid JSON ({e}); re-export the model, or delete the file "
                              "to load the UNet with diffusers' time map") from e
    config = record.get("genkit_config") if isinstance(record, dict) else None
    net = config.get("net") if isinstance(config, dict) else None
    if not isinstance(net, dict) or not all(isinstance(net.get(k), (int, float)) for k in ("time_scale", "time_shift")):
        raise CheckpointError(f"{file} records no genkit_config with the net's time_scale and time_shift; re-export "
                              "the model, or delete the file to load the UNet with diffusers' time map")
    return config


def _restore_export(config: dict[str, Any], path: DDPMLinearPath, prediction: str, root: FsPath) -> dict[str, Any]:
    """The UNet time map and ``Diffusion`` settings of the exported genkit model, checked against the scheduler."""
    from .paths import path_from_config

    try:
        recorded = path_from_config(config["path"]).config()
    except Exception as e:
        raise CheckpointError(f"{root / 'genkit_export.json'} records an unreadable path {config.get('path')!r} "
                              f"({e}); re-export the model") from e
    if recorded != path.config() or config.get("prediction") != prediction:
        raise ConfigError(f"{root / 'genkit_export.json'} records a {config.get('prediction')!r} model on "
                          f"{recorded} but the scheduler is a {prediction!r} model on {path.config()}: the folder "
                          "changed after the export. Delete genkit_export.json to load the UNet with diffusers' "
                          "time map")
    net = config["net"]
    keys = ("weighting", "sigma_data", "min_snr_gamma", "t_eps", "t_max", "num_classes", "class_names", "null_label",
            "class_dropout")
    return {"time_scale": float(net["time_scale"]), "time_shift": float(net["time_shift"]),
            **{k: config[k] for k in keys if k in config}}


def from_diffusers(unet: Any, scheduler: Any = None, *, null_label: int | None = None,
                   class_names: list[str] | None = None):
    """A genkit ``Diffusion`` model from a diffusers ``UNet2DModel`` and the scheduler it was trained with.

    Args:
        unet: a ``UNet2DModel``, or a folder: a pipeline folder with ``unet/`` and ``scheduler/``, or a
            UNet folder (then ``scheduler`` must be given).
        scheduler: a diffusers scheduler, a folder with ``scheduler_config.json``, or None (pipeline folder).
        null_label: for a class-conditional UNet (``num_class_embeds=N``, diffusers' class embedding): the class
            id it learned as "no class" (classifier-free guidance), which must be its last, ``N - 1``; the model
            then has ``num_classes = N - 1`` real classes and can be guided. Without it all ``N`` are classes.
        class_names: the names of the model's classes, or None.

    A class-conditional UNet gives a class-conditional model: ``model.num_classes``, and ``model.sample(n,
    labels=...)`` (with ``guidance=`` when it has a null label).

    The UNet's weights are shared, not copied. Sampling returns ``E[x_0 | x]`` at step 0 after the last
    step (as diffusers' final DDIM/DPM-Solver step does). The UNet sees diffusers' time map, step
    ``i = N t - 1``, except in a folder written by :func:`to_diffusers`: its ``genkit_export.json`` records the
    exported model, whose network time map (``time_scale``, ``time_shift``) and training settings (``t_eps``,
    ``weighting``, ...) are restored, so ``from_diffusers(to_diffusers(model, folder))`` is the same field as
    ``model``, also after an ``approximate_time=True`` export (diffusers' own pipeline runs that folder with the
    recorded offset). Delete ``genkit_export.json`` to load such a folder with diffusers' time map instead.

    A missing, empty or incomplete folder, or a genkit checkpoint, raises ConfigError or CheckpointError.
    """
    from diffusers import DDPMScheduler, UNet2DModel

    from .models import Diffusion
    from .nets import UNet

    record, folder = None, None
    if isinstance(unet, (str, FsPath)):
        root = FsPath(unet)
        folder = _unet_folder(root)
        if scheduler is None and (root / "scheduler").is_dir():
            scheduler = root / "scheduler"
        record = _export_record(root)
    if isinstance(scheduler, (str, FsPath)):
        if not (FsPath(scheduler) / "scheduler_config.json").is_file():
            raise CheckpointError(f"{scheduler} holds no scheduler_config.json; pass the scheduler folder of the "
                                  "pipeline (or a scheduler object)")
        scheduler = _from_pretrained(DDPMScheduler, FsPath(scheduler), "scheduler")
    if folder is not None:
        unet = _from_pretrained(UNet2DModel, folder, "UNet")
    if scheduler is None:
        raise ConfigError("from_diffusers needs the scheduler the UNet was trained with (object or folder)")
    config = scheduler.config
    pred = PREDICTION_FROM_DIFFUSERS.get(config.get("prediction_type", "epsilon"))
    if pred is None:
        raise ConfigError(f"unsupported prediction_type {config.get('prediction_type')!r}; genkit reads "
                          f"{sorted(PREDICTION_FROM_DIFFUSERS)}")
    path = _path_of(config)
    settings = {"time_scale": float(path.num_steps), "time_shift": -1.0, "t_eps": 1.0 / path.num_steps}
    if record is not None:
        settings = _restore_export(record, path, pred, root)
    net = UNet.from_unet2d(unet, time_scale=settings.pop("time_scale"), time_shift=settings.pop("time_shift"))
    embeds = unet.config.num_class_embeds
    if embeds is None and (null_label is not None or class_names is not None):
        raise ConfigError("null_label / class_names were given but the UNet is unconditional (num_class_embeds None); "
                          "drop them")
    if embeds is not None and "num_classes" not in settings:  # no genkit export record of the classes
        if null_label is not None and (isinstance(null_label, bool) or null_label != embeds - 1):
            raise ConfigError(f"null_label must be the UNet's last class embedding, {embeds - 1} (num_class_embeds="
                              f"{embeds}); got {null_label!r}. A UNet with its null class elsewhere needs relabelling")
        settings["num_classes"] = embeds - (null_label is not None)
        settings["null_label"] = null_label
    if class_names is not None:
        settings["class_names"] = class_names
    size = unet.config.sample_size
    hw = (size, size) if isinstance(size, int) else tuple(size)
    return Diffusion(net, path, pred, sample_shape=(unet.config.in_channels, *hw), **settings)


PREDICTION_TO_DIFFUSERS = {v: k for k, v in PREDICTION_FROM_DIFFUSERS.items()}


def to_diffusers(model: Any, folder: str | FsPath, *, approximate_time: bool = False) -> FsPath:
    """Save a genkit ``Diffusion`` model on the ``ddpm`` path with a ``genkit.nets.UNet`` as a diffusers
    ``DDPMPipeline`` folder (``unet/``, ``scheduler/``, ``model_index.json``); returns the folder.

    diffusers calls the UNet with integer steps ``i``, genkit time ``t = (i + 1) / N``; the export is exact
    when the network was built with diffusers' convention ``UNet(..., time_scale=N, time_shift=-1)`` (as
    :func:`from_diffusers` models are). A UNet with another time map (genkit's default feeds ``999 t``) is refused
    unless ``approximate_time=True``: diffusers then feeds it ``i`` where it was trained on ``time_scale * t +
    time_shift``, an offset of up to ``max |time_scale t + time_shift - (N t - 1)|`` steps, which the folder's
    ``genkit_export.json`` records. ``from_diffusers(folder)`` loads it back, with the model's own time map.

    The folder is written aside and moved into place whole. ``folder`` must be missing, empty or an earlier
    diffusers export (``model_index.json`` or ``genkit_export.json``; replaced whole); any other folder (a training
    run, say) is a CheckpointError, as the export would delete its files.
    """
    from diffusers import DDPMPipeline, DDPMScheduler

    from .models import Diffusion
    from .nets import UNet

    model = unwrap(model)
    if not isinstance(model, Diffusion) or not isinstance(model.path, DDPMLinearPath):
        raise ConfigError(f"to_diffusers exports Diffusion models on the 'ddpm' path (diffusers' DDPM schedule); got "
                          f"{type(model).__name__} on {getattr(model, 'path', None)!r}")
    net = model.net
    if not isinstance(net, UNet):
        raise ConfigError(f"to_diffusers needs a genkit.nets.UNet network (a diffusers UNet2DModel); got "
                          f"{type(net).__name__}")
    if net.unet.config.num_class_embeds is not None:
        raise ConfigError("to_diffusers exports unconditional models (DDPMPipeline passes no class labels); this "
                          f"UNet has num_classes={net.unet.config.num_class_embeds}")
    if model.sigma_data != 1.0:
        raise ConfigError(f"this model scales the network input by sigma_data={model.sigma_data:g}, which diffusers' "
                          "pipelines do not do; only sigma_data=1 models export")
    kind = PREDICTION_TO_DIFFUSERS.get(model.prediction)
    if kind is None:
        raise ConfigError(f"diffusers schedulers read eps, x0 or v predictions; this model predicts "
                          f"{model.prediction!r}")
    n = model.path.num_steps
    offset = max(abs(net.time_scale * t + net.time_shift - (n * t - 1)) for t in (1.0 / n, 1.0))  # affine: ends
    if offset > 1e-9 and not approximate_time:
        raise ConfigError(
            f"the UNet maps time as {net.time_scale:g} t + {net.time_shift:g} but diffusers feeds step i = {n} t - 1: "
            f"an offset of up to {offset:.3g} steps. Build the net with UNet(..., time_scale={n}, time_shift=-1) for "
            "an exact export, or pass approximate_time=True to export with that offset")
    scheduler = DDPMScheduler(num_train_timesteps=n, beta_start=model.path.beta_start, beta_end=model.path.beta_end,
                              beta_schedule="linear", prediction_type=kind, clip_sample=False)
    folder = FsPath(folder)
    # written whole aside, then swapped in: a crash leaves the old or the new export, never a mix
    with atomic_folder(folder, "diffusers export", _is_diffusers_export, "diffusers") as tmp:
        DDPMPipeline(unet=net.unet, scheduler=scheduler).save_pretrained(tmp)
        (tmp / "genkit_export.json").write_text(json.dumps({
            "genkit_config": model.config(), "time_offset_steps": offset, "exact": offset <= 1e-9,
        }, indent=2) + "\n", encoding="utf-8")
    return folder


def _is_diffusers_export(folder: FsPath) -> bool:
    return (folder / "model_index.json").is_file() or (folder / "genkit_export.json").is_file()


_NOISE_DRAW = re.compile(r"\brandn|\brandint|\brand\(|noise_sampler|brownian", re.IGNORECASE)


def _draws_noise(cls: type) -> bool:
    """Whether a scheduler class's own code draws random numbers (read from its source; False where unavailable)."""
    for klass in cls.__mro__[:-1]:
        try:
            if _NOISE_DRAW.search(inspect.getsource(klass)):
                return True
        except (OSError, TypeError):
            continue
    return False


class DiffusersScheduler(Solver):
    """A diffusers scheduler as a genkit solver: ``solve(field, x, DiffusersScheduler(sched), steps=n)``.

    The scheduler chooses its own timesteps from ``n = len(times) - 1`` (its ``timestep_spacing``, Karras
    sigmas, ... all apply); the genkit times actually visited are returned in ``Solution.times``. ``x``
    is the prior sample of the field's path at t = 1; it is rescaled to the scheduler's
    ``init_noise_sigma``. The scheduler object given is copied, never mutated.

    Stochastic schedulers draw their noise from ``generator``: passed to ``step`` where it takes one; for
    ``DPMSolverSDEScheduler`` (Brownian-tree noise seeded by an integer) the seed is drawn from ``generator``
    (overriding the scheduler's ``noise_sampler_seed``), so equal generators give equal samples. A scheduler
    that draws noise its ``step`` cannot be given a generator for is refused with a generator (ConfigError)
    rather than silently irreproducible; without one it draws from the global RNG.

    Not stepwise (``init``/``step`` raise SolverError: the scheduler object carries the position); ``nfe(steps)``
    asks a copy of the scheduler for its timesteps.
    """

    name, order, fixed_step, stepwise, evals_per_step = "diffusers", 1, True, False, None
    own_times = True  # its timesteps come from its own timestep_spacing; the grid gives only their number
    why_not_stepwise = ("a diffusers scheduler keeps its position and multistep history inside itself (_step_index, "
                        "model_outputs), so its steps are not a pure function of an explicit state")

    def nfe(self, steps: int, *, times: Tensor | None = None, path: Any = None) -> int:
        """One evaluation per scheduler timestep: ``len(timesteps)`` after ``set_timesteps(steps)`` (e.g.
        ``2 steps - 1`` for Heun-type schedulers)."""
        sched = copy.deepcopy(self.scheduler)
        sched.set_timesteps(int(steps))
        return len(sched.timesteps)

    def __init__(self, scheduler: Any):
        if not hasattr(scheduler, "set_timesteps") or not hasattr(scheduler, "alphas_cumprod"):
            raise ConfigError(f"{type(scheduler).__name__} is not a diffusers scheduler with alphas_cumprod")
        self.scheduler = scheduler
        if "generator" in inspect.signature(scheduler.step).parameters:
            self._noise: str | None = "generator"
        elif "noise_sampler_seed" in getattr(scheduler, "config", {}):
            self._noise = "seed"
        else:
            self._noise = "own" if _draws_noise(type(scheduler)) else None
        self.stochastic = self._noise is not None

    def __repr__(self) -> str:
        return f"DiffusersScheduler({type(self.scheduler).__name__})"

    def _vp(self, sched: Any, timestep: Tensor) -> tuple[float, float]:
        """(alpha, sigma) of the scheduler's VP process at a (possibly fractional) timestep."""
        # some schedulers move alphas_cumprod to the model's device
        ac = sched.alphas_cumprod.detach().cpu().to(torch.float64).numpy()
        ve = np.sqrt((1 - ac) / ac)
        s = float(np.interp(float(timestep), np.arange(len(ac)), ve))
        return 1 / math.sqrt(1 + s * s), s / math.sqrt(1 + s * s)

    def solve(self, field: Field, x: Tensor, times: Tensor, *, generator: torch.Generator | None = None,
              trajectory: bool = False, **cond: Any) -> Solution:
        self.check_steps(times)
        sched = copy.deepcopy(self.scheduler)
        sched.set_timesteps(len(times) - 1)
        path, kind = field.path, sched.config.get("prediction_type", "epsilon")
        if kind not in PREDICTION_FROM_DIFFUSERS:
            raise ConfigError(f"unsupported prediction_type {kind!r}")
        x = x / path.prior_std() * float(sched.init_noise_sigma)
        visited, traj, nfe = [], [x] if trajectory else None, 0
        step_kw = {"generator": generator} if self._noise == "generator" else {}
        if generator is not None and self._noise == "seed":
            sched.noise_sampler_seed = int(torch.randint(0, 2**63 - 1, (), generator=generator,
                                                         device=generator.device))
        elif generator is not None and self._noise == "own":
            raise ConfigError(f"{type(sched).__name__} draws its own noise and its step() takes no generator, so "
                              "generator= cannot make its samples reproducible; drop generator and seed the global "
                              "RNG with torch.manual_seed, or use a scheduler whose step() takes a generator")
        for ts in sched.timesteps:
            inp = sched.scale_model_input(x, ts)
            a_vp, s_vp = self._vp(sched, ts)
            lam = torch.tensor(2 * math.log(a_vp / s_vp), dtype=torch.float64)
            t = float(path.t_from_log_snr(lam))
            a_f = float(path.alpha(torch.tensor(t, dtype=torch.float64)))
            tb = broadcast_time(torch.tensor(t, dtype=x.dtype, device=x.device), x)
            xf = inp * (a_f / a_vp)
            x0, eps = path.to_x0_eps(field(xf, tb, **cond), xf, tb, field.prediction)
            out = {"epsilon": eps, "sample": x0, "v_prediction": a_vp * eps - s_vp * x0}[kind]
            x = sched.step(out, ts, x, **step_kw).prev_sample
            visited.append(t)
            nfe += 1
            if traj is not None:
                traj.append(x)
        visited.append(0.0)
        check_finite_result(x, self, times)
        return Solution(x, nfe, torch.tensor(visited, dtype=torch.float64),
                        torch.stack(traj) if traj is not None else None)


class KDiffusionSampler(Solver):
    """A k-diffusion sampler as a genkit solver: ``solve(field, x, KDiffusionSampler(sample_dpmpp_2m), grid=...)``.

    k-diffusion's samplers (``k_diffusion.sampling.sample_euler``, ``sample_heun``, ``sample_dpmpp_2m``,
    ``sample_lms``, ...) integrate the variance-exploding ODE in ``x_ve = x / alpha`` over noise levels
    ``sigma_ve = sigma / alpha``, calling a denoiser ``D(x_ve, sigma_ve) = E[x_0 | x]``. The adapter turns the
    genkit grid into those noise levels (``t = 0`` -> ``sigma_ve = 0``), hands the sampler ``x / alpha(t_0)``,
    and answers each denoiser call at the genkit time with the same log-SNR, with the state put back on the
    field's path (``x_f = alpha(t) x_ve``) and the field's output read as ``x_0``. Any genkit grid and path
    work (a ``karras`` grid gives k-diffusion's usual schedule); the grid must start where ``alpha > 0``
    (flow-matching paths: below t = 1). The sampler function is passed in, so k-diffusion is not a genkit
    dependency; ``sampler_kwargs`` go to it (``disable=True`` is added to silence its progress bar).
    ``Solution.nfe`` counts the denoiser calls; ``fixed_step`` samplers only (``sample_dpm_adaptive`` is not).
    Not stepwise (``init``/``step`` raise SolverError), and the evaluations per step depend on the sampler
    function (``evals_per_step``/``nfe()`` are None).
    """

    name, order, fixed_step, stepwise, evals_per_step = "k-diffusion", 1, True, False, None
    why_not_stepwise = ("a k-diffusion sampler is one Python loop over the noise levels that reports states only "
                        "through its callback")

    def __init__(self, sampler: Any, **sampler_kwargs: Any):
        if not callable(sampler):
            raise ConfigError(f"KDiffusionSampler needs a k-diffusion sampler function such as "
                              f"k_diffusion.sampling.sample_euler; got {sampler!r}")
        self.sampler, self.sampler_kwargs = sampler, {"disable": True, **sampler_kwargs}
        code = getattr(sampler, "__code__", None)
        self.stochastic = (any(k in getattr(code, "co_varnames", ()) for k in ("noise_sampler", "eta"))
                           or float(sampler_kwargs.get("s_churn", 0.0)) > 0)

    def __repr__(self) -> str:
        return f"KDiffusionSampler({getattr(self.sampler, '__name__', self.sampler)!r})"

    def solve(self, field: Field, x: Tensor, times: Tensor, *, generator: torch.Generator | None = None,
              trajectory: bool = False, **cond: Any) -> Solution:
        self.check_steps(times)
        if trajectory:
            raise ConfigError("KDiffusionSampler returns endpoints only (k-diffusion reports states through its "
                              "callback); call solve(..., trajectory=False)")
        if generator is not None and self.stochastic:
            raise ConfigError("k-diffusion's stochastic samplers draw from the global RNG (or their own "
                              "noise_sampler); seed with torch.manual_seed, or pass noise_sampler=..., and drop "
                              "generator")
        from .fields import as_x0

        path = field.path
        t64 = times.to(torch.float64).cpu()
        a, sig = path.alpha(t64), path.ve_sigma(t64)
        if float(a[0]) <= 0.0:
            raise ConfigError(f"the grid starts at t={float(t64[0]):.4g} where alpha = 0 (sigma_ve infinite); "
                              "start it below t = 1 (e.g. a karras grid, or t_max < 1)")
        denoise, calls = as_x0(field), [0]

        sigmas = sig.to(device=x.device, dtype=x.dtype)
        # grid levels map back to the grid's exact times, with alpha there evaluated once per solve
        on_grid = dict(zip(sigmas.tolist(), zip(t64.tolist(), a.tolist())))

        def model(x_ve: Tensor, sigma: Tensor, **extra: Any) -> Tensor:
            level = float(sigma.reshape(-1)[0])
            if not bool((sigma == sigma.reshape(-1)[0]).all()):
                raise ConfigError("KDiffusionSampler evaluates one noise level per call; the sampler asked for "
                                  "several in one batch")
            if level in on_grid:
                t, a_t = on_grid[level]
            else:  # a level between grid points (e.g. DPM-2's midpoints)
                t64_mid = path.t_from_ve_sigma(torch.tensor(level, dtype=torch.float64))
                t, a_t = float(t64_mid), float(path.alpha(t64_mid))
            calls[0] += 1
            return denoise(x_ve * a_t, broadcast_time(t, x_ve), **extra)

        out = self.sampler(model, x / float(a[0]), sigmas, extra_args=dict(cond), **self.sampler_kwargs)
        out = out * float(a[-1])
        check_finite_result(out, self, times)
        return Solution(out, calls[0], t64)
