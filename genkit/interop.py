"""diffusers interoperability, both ways, converted at the edge.

- :func:`from_diffusers` loads a diffusers ``UNet2DModel`` + scheduler folder (or objects) as a genkit
  :class:`~genkit.models.Diffusion` model: every genkit solver, likelihood and trainer works on it.
  Integer step ``i`` of a DDPM schedule is genkit time ``t = (i + 1) / N`` on the ``ddpm`` path.
- :class:`DiffusersScheduler` lets any diffusers scheduler drive any genkit field. At each scheduler
  timestep the adapter finds the genkit time with the same signal-to-noise ratio on the field's path,
  rescales the scheduler's sample onto that path (``x_f = x * alpha_f / alpha_vp``), evaluates the
  field and hands back the scheduler's ``prediction_type`` (eps, x0 and v read through the path).

>>> # model = from_diffusers("ddpm-folder"); x = model.sample(16, solver="dpmpp_2m", steps=10)
>>> # solve(field, x1, DiffusersScheduler(EulerDiscreteScheduler(...)), steps=20)
"""

from __future__ import annotations

import copy
import math
from pathlib import Path as FsPath
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .errors import ConfigError
from .fields import Field
from .paths import DDPMLinearPath, broadcast_time
from .solvers.base import Solution, Solver, check_finite_result

__all__ = ["from_diffusers", "DiffusersScheduler", "PREDICTION_FROM_DIFFUSERS"]

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


def from_diffusers(unet: Any, scheduler: Any = None):
    """A genkit ``Diffusion`` model from a diffusers ``UNet2DModel`` and the scheduler it was trained with.

    Args:
        unet: a ``UNet2DModel``, or a folder: a pipeline folder with ``unet/`` and ``scheduler/``, or a
            UNet folder (then ``scheduler`` must be given).
        scheduler: a diffusers scheduler, a folder with ``scheduler_config.json``, or None (pipeline folder).

    The UNet's weights are shared, not copied. Sampling returns ``E[x_0 | x]`` at step 0 after the last
    step (as diffusers' final DDIM/DPM-Solver step does).
    """
    from diffusers import DDPMScheduler, UNet2DModel

    from .models import Diffusion
    from .nets import UNet

    if isinstance(unet, (str, FsPath)):
        root = FsPath(unet)
        if not root.exists():
            raise ConfigError(f"no diffusers folder at {root}; check the path")
        if scheduler is None and (root / "scheduler").is_dir():
            scheduler = root / "scheduler"
        unet = UNet2DModel.from_pretrained(root / "unet" if (root / "unet").is_dir() else root)
    if isinstance(scheduler, (str, FsPath)):
        scheduler = DDPMScheduler.from_pretrained(scheduler)
    if scheduler is None:
        raise ConfigError("from_diffusers needs the scheduler the UNet was trained with (object or folder)")
    config = scheduler.config
    pred = PREDICTION_FROM_DIFFUSERS.get(config.get("prediction_type", "epsilon"))
    if pred is None:
        raise ConfigError(f"unsupported prediction_type {config.get('prediction_type')!r}; genkit reads "
                          f"{sorted(PREDICTION_FROM_DIFFUSERS)}")
    path = _path_of(config)
    net = UNet.from_unet2d(unet, time_scale=float(path.num_steps), time_shift=-1.0)
    size = unet.config.sample_size
    hw = (size, size) if isinstance(size, int) else tuple(size)
    return Diffusion(net, path, pred, sample_shape=(unet.config.in_channels, *hw), t_eps=1.0 / path.num_steps)


class DiffusersScheduler(Solver):
    """A diffusers scheduler as a genkit solver: ``solve(field, x, DiffusersScheduler(sched), steps=n)``.

    The scheduler chooses its own timesteps from ``n = len(times) - 1`` (its ``timestep_spacing``, Karras
    sigmas, ... all apply); the genkit times actually visited are returned in ``Solution.times``. ``x``
    is the prior sample of the field's path at t = 1; it is rescaled to the scheduler's
    ``init_noise_sigma``. The scheduler object given is copied, never mutated.
    """

    name, order, fixed_step = "diffusers", 1, True

    def __init__(self, scheduler: Any):
        if not hasattr(scheduler, "set_timesteps") or not hasattr(scheduler, "alphas_cumprod"):
            raise ConfigError(f"{type(scheduler).__name__} is not a diffusers scheduler with alphas_cumprod")
        self.scheduler = scheduler
        self.stochastic = "generator" in scheduler.step.__code__.co_varnames

    def __repr__(self) -> str:
        return f"DiffusersScheduler({type(self.scheduler).__name__})"

    def _vp(self, sched: Any, timestep: Tensor) -> tuple[float, float]:
        """(alpha, sigma) of the scheduler's VP process at a (possibly fractional) timestep."""
        ac = sched.alphas_cumprod.detach().cpu().to(torch.float64).numpy()  # some schedulers move it to the model's device
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
        step_kw = {"generator": generator} if self.stochastic else {}
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
