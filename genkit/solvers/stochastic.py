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
from .base import SOLVERS, Solver, SolverState, Transition

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

    name, order, stochastic, gaussian_transitions = "ancestral", 1, True, True

    def __init__(self, eta: float = 1.0):
        if not 0 <= eta <= 1:
            raise ConfigError(f"eta must be in [0, 1]; got {eta} (1 = DDPM, 0 = DDIM)")
        self.eta = float(eta)

    def __repr__(self) -> str:
        return f"Ancestral(eta={self.eta})"

    def init(self, field: Field, x: Tensor, times: Tensor, *, generator: torch.Generator | None = None,
             **cond: Any) -> SolverState:
        """Precompute each step's ``(alpha_t, sigma_t, alpha_s, std, c)``: the posterior's std (scaled by
        ``eta``) and the weight ``c = sqrt(sigma_s^2 - std^2)`` of DDIM's deterministic eps part."""
        del generator, cond
        self.check_steps(times)
        t64 = times.to(torch.float64).cpu()
        a, s = field.path.alpha(t64), field.path.sigma(t64)
        coeffs = []
        for n in range(len(times) - 1):
            at, st, as_, ss = (float(v) for v in (a[n], s[n], a[n + 1], s[n + 1]))
            a_ts = at / as_ if as_ > 0 else math.inf
            var = max(st ** 2 - a_ts ** 2 * ss ** 2, 0.0) * ss ** 2 / st ** 2 if as_ > 0 else 0.0
            std = self.eta * math.sqrt(var)
            coeffs.append((at, st, as_, std, math.sqrt(max(ss ** 2 - std ** 2, 0.0))))
        return SolverState(x, 0, 0, times, (times.to(device=x.device, dtype=x.dtype), tuple(coeffs)))

    def transition(self, field: Field, state: SolverState, **cond: Any) -> Transition:
        """``N(alpha_s x0 + c eps, std^2)`` with ``x0`` the field's data prediction at ``state`` and ``eps = (x -
        alpha_t x0) / sigma_t``; std is 0 for ``eta = 0`` and on a last step to sigma_s = 0 (deterministic)."""
        ts, coeffs = state.plan
        n, x = state.n, state.x
        at, st, as_, std, c = coeffs[n]
        x0 = as_x0(field)(x, broadcast_time(ts[n], x), **cond)
        eps = (x - at * x0) / st
        return Transition(as_ * x0 + c * eps, std)

    def step(self, field: Field, state: SolverState, *, generator: torch.Generator | None = None,
             **cond: Any) -> SolverState:
        """Draw ``x_s`` from :meth:`transition` (no noise when its std is 0); the new state carries it."""
        tr = self.transition(field, state, **cond)
        x = tr.mean
        if tr.std > 0:
            x = x + tr.std * _noise(x, generator)
        return state.advance(x, 1, (), tr)


@SOLVERS.register("edm")
class EDMStochastic(Solver):
    """EDM's stochastic sampler (Karras et al. 2022, arXiv 2206.00364, Algorithm 2): at each step raise the
    noise level ``rho -> rho_hat = rho (1 + gamma)`` by adding fresh noise (``gamma = min(churn / N,
    sqrt 2 - 1)`` while ``rho`` lies in ``[s_tmin, s_tmax]``), then take a Heun step to ``rho_next``
    (Euler when it reaches 0). ``churn = 0`` is EDM's deterministic Heun sampler; two evaluations per step
    (one on the last). ``rho_hat`` is capped at the path's ``rho(1)``; a first step from ``alpha = 0``
    (``rho`` infinite) is a DDIM step."""

    name, order, stochastic, evals_per_step = "edm", 2, True, 2

    def __init__(self, churn: float = 10.0, s_tmin: float = 0.05, s_tmax: float = 50.0, s_noise: float = 1.003):
        if churn < 0 or s_noise < 0 or s_tmin > s_tmax:
            raise ConfigError(f"need churn >= 0, s_noise >= 0, s_tmin <= s_tmax; got {churn}, {s_noise}, "
                              f"{s_tmin}, {s_tmax}")
        self.churn, self.s_tmin, self.s_tmax, self.s_noise = float(churn), float(s_tmin), float(s_tmax), float(s_noise)

    def __repr__(self) -> str:
        return f"EDMStochastic(churn={self.churn}, s_tmin={self.s_tmin}, s_tmax={self.s_tmax}, s_noise={self.s_noise})"

    def _plan(self, path: Any, times: Tensor) -> tuple[bool, list[tuple[float, ...]]]:
        """Whether the first step is a DDIM step from alpha = 0, and per Heun step ``(rho_hat, rho_next,
        noise scale or None, t_hat, alpha(t_hat), t_next, alpha(t_next))`` (float64 arithmetic, as Python floats)."""
        t64 = times.to(torch.float64).cpu()
        a, s = path.alpha(t64), path.sigma(t64)
        rho = (s / a).tolist()
        one = torch.tensor(1.0, dtype=torch.float64)
        rho_cap = float(path.sigma(one) / path.alpha(one))
        num = len(times) - 1
        gamma_max = min(self.churn / num, math.sqrt(2) - 1)
        ddim_first = float(a[0]) == 0  # rho = inf at pure noise: a DDIM step (exact in the limit) enters finite rho

        def alpha(t: float) -> float:
            return float(path.alpha(torch.tensor(t, dtype=torch.float64)))

        steps = []
        for n in range(1 if ddim_first else 0, num):
            r, r_next = rho[n], rho[n + 1]
            gamma = gamma_max if self.s_tmin <= r <= self.s_tmax else 0.0
            r_hat = min(r * (1 + gamma), rho_cap)
            if r_hat == r:
                t_hat = float(times[n])
            else:
                t_hat = float(path.t_from_log_snr(torch.tensor(-2 * math.log(r_hat), dtype=torch.float64)))
            scale = math.sqrt(r_hat ** 2 - r ** 2) * self.s_noise if r_hat > r else None
            t_next = float(times[n + 1])
            steps.append((r_hat, r_next, scale, t_hat, alpha(t_hat), t_next, alpha(t_next) if r_next > 0 else 0.0))
        return ddim_first, steps

    def nfe(self, steps: int, *, times: Tensor | None = None, path: Any = None) -> int:
        """Two evaluations per step, one on a last step to sigma = 0 (Euler) and on a first step from alpha = 0
        (DDIM); without ``times`` and ``path``, ``2 * steps`` (a grid inside (0, 1))."""
        if times is None or path is None:
            return 2 * int(steps)
        ddim_first, plan = self._plan(path, times)
        return int(ddim_first) + sum(1 + (p[1] > 0) for p in plan)

    def init(self, field: Field, x: Tensor, times: Tensor, *, generator: torch.Generator | None = None,
             **cond: Any) -> SolverState:
        """Precompute the noise levels, churn and evaluation times of every step; ``memory = (y,)`` holds the
        VE-equivalent state ``y = x / alpha`` the steps run in (None before a first DDIM step)."""
        del generator, cond
        self.check_steps(times)
        path = field.path
        ddim_first, steps = self._plan(path, times)
        t64 = times.to(torch.float64).cpu()
        a, s = path.alpha(t64).tolist(), path.sigma(t64).tolist()

        def tensor(t: float) -> Tensor:
            return torch.tensor(t, dtype=x.dtype, device=x.device)

        steps = [(r_hat, r_next, scale, tensor(t_hat), a_hat, tensor(t_next), a_next)
                 for r_hat, r_next, scale, t_hat, a_hat, t_next, a_next in steps]
        plan = (ddim_first, times[0].to(device=x.device, dtype=x.dtype), tuple(a), tuple(s), tuple(steps))
        return SolverState(x, 0, 0, times, plan, (None if ddim_first else x / float(a[0]),))

    def step(self, field: Field, state: SolverState, *, generator: torch.Generator | None = None,
             **cond: Any) -> SolverState:
        """Churn (fresh noise raising rho to rho_hat), then a Heun step in ``y`` to ``rho_next`` (Euler to 0)."""
        ddim_first, t0, a, s, steps = state.plan
        n, denoise = state.n, as_x0(field)
        if n == 0 and ddim_first:
            x = state.x
            x0 = denoise(x, broadcast_time(t0, x), **cond)
            x = float(s[1] / s[0]) * x + float(a[1]) * x0
            return state.advance(x, 1, (x / float(a[1]),))
        r_hat, r_next, scale, t_hat, a_hat, t_next, a_next = steps[n - ddim_first]
        y = state.memory[0]
        if scale is not None:
            y = y + scale * _noise(y, generator)
        d = (y - denoise(y * a_hat, broadcast_time(t_hat, y), **cond)) / r_hat  # dy/drho = (y - D(y; rho)) / rho
        y_next = y + (r_next - r_hat) * d
        nfe = 1
        if r_next > 0:
            d2 = (y_next - denoise(y_next * a_next, broadcast_time(t_next, y_next), **cond)) / r_next
            nfe += 1
            y_next = y + (r_next - r_hat) * 0.5 * (d + d2)
        return state.advance(y_next * float(a[n + 1]), nfe, (y_next,))
