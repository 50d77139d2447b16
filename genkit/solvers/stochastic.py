"""Stochastic diffusion samplers: ancestral DDPM and EDM's churn sampler, on any path and grid.

Both work in the VE-equivalent coordinates ``y = x / alpha``, ``rho = sigma / alpha`` (``rho`` is EDM's
sigma), where every affine path is the same process, so one implementation serves ``linear``, ``cosine``,
``ddpm`` and ``ve``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ..errors import ConfigError
from ..fields import Field, as_x0
from ..paths import broadcast_time
from .base import SOLVERS, Solution, Solver, check_finite_result

__all__ = ["Ancestral", "EDMStochastic"]


def _noise(x: Tensor, generator: torch.Generator | None) -> Tensor:
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


@SOLVERS.register("ancestral")
class Ancestral(Solver):
    """Ancestral sampling (Ho et al. 2020, arXiv 2006.11239) on any grid: draw ``x_s`` from the Gaussian
    posterior ``q(x_s | x_t, x_0 = x0_hat)``, whose mean is
    ``alpha_s sigma_{t|s}^2 / sigma_t^2 x0 + alpha_{t|s} sigma_s^2 / sigma_t^2 x_t`` and variance
    ``sigma_{t|s}^2 sigma_s^2 / sigma_t^2`` with ``alpha_{t|s} = alpha_t / alpha_s``,
    ``sigma_{t|s}^2 = sigma_t^2 - alpha_{t|s}^2 sigma_s^2``. With ``eta < 1`` the variance is scaled by
    ``eta^2`` and the mean follows DDIM (Song et al. 2021), so ``eta = 0`` is DDIM. Weak order 1."""

    name, order, stochastic = "ancestral", 1, True

    def __init__(self, eta: float = 1.0):
        if not 0 <= eta <= 1:
            raise ConfigError(f"eta must be in [0, 1]; got {eta} (1 = DDPM, 0 = DDIM)")
        self.eta = float(eta)

    def __repr__(self) -> str:
        return f"Ancestral(eta={self.eta})"

    def solve(self, field: Field, x: Tensor, times: Tensor, *, generator: torch.Generator | None = None,
              trajectory: bool = False, **cond: Any) -> Solution:
        self.check_steps(times)
        t64 = times.to(torch.float64).cpu()
        a, s = field.path.alpha(t64), field.path.sigma(t64)
        denoise = as_x0(field)
        ts = times.to(device=x.device, dtype=x.dtype)
        traj = [x] if trajectory else None
        for n in range(len(times) - 1):
            x0 = denoise(x, broadcast_time(ts[n], x), **cond)
            at, st, as_, ss = (float(v) for v in (a[n], s[n], a[n + 1], s[n + 1]))
            # std of the posterior step (scaled by eta), then DDIM's deterministic part with the rest
            a_ts = at / as_ if as_ > 0 else math.inf
            var = max(st ** 2 - a_ts ** 2 * ss ** 2, 0.0) * ss ** 2 / st ** 2 if as_ > 0 else 0.0
            std = self.eta * math.sqrt(var)
            eps = (x - at * x0) / st
            x = as_ * x0 + math.sqrt(max(ss ** 2 - std ** 2, 0.0)) * eps
            if std > 0:
                x = x + std * _noise(x, generator)
            if traj is not None:
                traj.append(x)
        check_finite_result(x, self, times)
        return Solution(x, len(times) - 1, times, torch.stack(traj) if traj is not None else None)


@SOLVERS.register("edm")
class EDMStochastic(Solver):
    """EDM's stochastic sampler (Karras et al. 2022, arXiv 2206.00364, Algorithm 2): at each step raise the
    noise level ``rho -> rho_hat = rho (1 + gamma)`` by adding fresh noise (``gamma = min(churn / N,
    sqrt 2 - 1)`` while ``rho`` lies in ``[s_tmin, s_tmax]``), then take a Heun step to ``rho_next``
    (Euler when it reaches 0). ``churn = 0`` is EDM's deterministic Heun sampler; two evaluations per step
    (one on the last). ``rho_hat`` is capped at the path's ``rho(1)``; a first step from ``alpha = 0``
    (``rho`` infinite) is a DDIM step."""

    name, order, stochastic = "edm", 2, True

    def __init__(self, churn: float = 10.0, s_tmin: float = 0.05, s_tmax: float = 50.0, s_noise: float = 1.003):
        if churn < 0 or s_noise < 0 or s_tmin > s_tmax:
            raise ConfigError(f"need churn >= 0, s_noise >= 0, s_tmin <= s_tmax; got {churn}, {s_noise}, "
                              f"{s_tmin}, {s_tmax}")
        self.churn, self.s_tmin, self.s_tmax, self.s_noise = float(churn), float(s_tmin), float(s_tmax), float(s_noise)

    def __repr__(self) -> str:
        return f"EDMStochastic(churn={self.churn}, s_tmin={self.s_tmin}, s_tmax={self.s_tmax}, s_noise={self.s_noise})"

    def solve(self, field: Field, x: Tensor, times: Tensor, *, generator: torch.Generator | None = None,
              trajectory: bool = False, **cond: Any) -> Solution:
        self.check_steps(times)
        path = field.path
        t64 = times.to(torch.float64).cpu()
        a, s = path.alpha(t64), path.sigma(t64)
        rho = (s / a).tolist()
        one = torch.tensor(1.0, dtype=torch.float64)
        rho_cap = float(path.sigma(one) / path.alpha(one))
        denoise = as_x0(field)
        num = len(times) - 1
        gamma_max = min(self.churn / num, math.sqrt(2) - 1)

        def d_at(y: Tensor, r: float, t: float) -> Tensor:
            """dy/drho = (y - D(y; rho)) / rho, evaluated through the field at time t."""
            alpha = float(path.alpha(torch.tensor(t, dtype=torch.float64)))
            x0 = denoise(y * alpha, broadcast_time(torch.tensor(t, dtype=x.dtype, device=x.device), y), **cond)
            return (y - x0) / r

        traj = [x] if trajectory else None
        nfe, start = 0, 0
        if float(a[0]) == 0:  # rho = inf at pure noise: a DDIM step (exact in the limit) enters finite rho
            x0 = denoise(x, broadcast_time(times[0].to(device=x.device, dtype=x.dtype), x), **cond)
            x = float(s[1] / s[0]) * x + float(a[1]) * x0
            nfe, start = 1, 1
            if traj is not None:
                traj.append(x)
        y = x / float(a[start])
        for n in range(start, num):
            r, r_next = rho[n], rho[n + 1]
            gamma = gamma_max if self.s_tmin <= r <= self.s_tmax else 0.0
            r_hat = min(r * (1 + gamma), rho_cap)
            if r_hat == r:
                t_hat = float(times[n])
            else:
                t_hat = float(path.t_from_log_snr(torch.tensor(-2 * math.log(r_hat), dtype=torch.float64)))
            if r_hat > r:
                y = y + math.sqrt(r_hat ** 2 - r ** 2) * self.s_noise * _noise(y, generator)
            d = d_at(y, r_hat, t_hat)
            nfe += 1
            y_next = y + (r_next - r_hat) * d
            if r_next > 0:
                d2 = d_at(y_next, r_next, float(times[n + 1]))
                nfe += 1
                y_next = y + (r_next - r_hat) * 0.5 * (d + d2)
            y = y_next
            if traj is not None:
                traj.append(y * float(a[n + 1]))
        x = y * float(a[-1])
        check_finite_result(x, self, times)
        return Solution(x, nfe, times, torch.stack(traj) if traj is not None else None)
