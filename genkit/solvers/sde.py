"""Stochastic samplers: Euler-Maruyama on the reverse-time SDE of any field.

For a path with forward SDE diffusion ``g^2(t) = 2 sigma (alpha sigma' - sigma alpha') / alpha`` the
SDEs ``dx = [v(x, t) - (eta g^2 / 2) score(x, t)] dt + sqrt(eta) g dW`` (run backwards in time) share the
marginals of the path for every ``eta >= 0``: ``eta = 1`` is the reverse diffusion (Song et al. 2021,
arXiv 2011.13456), ``eta = 0`` the probability-flow ODE. Velocity and score both come from the path.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..errors import ConfigError, SolverError
from ..fields import Field
from ..paths import broadcast_time
from .base import SOLVERS, Solution, Solver, check_finite_result

__all__ = ["EulerMaruyama"]


@SOLVERS.register("euler_maruyama")
class EulerMaruyama(Solver):
    """Euler-Maruyama, strong order 1/2 (weak order 1); velocity and score both come from one network
    evaluation per step. The last step adds no noise when it ends at t = 0."""

    name, order, stochastic = "euler_maruyama", 1, True

    def __init__(self, eta: float = 1.0):
        if eta < 0:
            raise ConfigError(f"eta (noise scale) must be >= 0; got {eta}. eta=1 is the reverse diffusion.")
        self.eta = float(eta)

    def __repr__(self) -> str:
        return f"EulerMaruyama(eta={self.eta})"

    def solve(self, field: Field, x: Tensor, times: Tensor, *, generator: torch.Generator | None = None,
              trajectory: bool = False, **cond: Any) -> Solution:
        self.check_steps(times)
        if times[-1] > times[0]:
            raise SolverError("Euler-Maruyama runs the reverse SDE: the grid must decrease (from noise to data)")
        path = field.path
        g2 = path.g2(times[:-1]) * self.eta
        if not torch.isfinite(g2).all():
            bad = float(times[:-1][~torch.isfinite(g2)][0])
            raise SolverError(
                f"the {path.name!r} path has infinite diffusion g^2 at t={bad:.4g} (alpha=0 there). Start the grid "
                "below 1, e.g. grid=Uniform(t_max=0.99), or use eta=0 / an ODE solver."
            )
        ts = times.to(device=x.device, dtype=x.dtype)
        g2 = g2.to(device=x.device, dtype=x.dtype)
        traj = [x] if trajectory else None
        for n in range(len(ts) - 1):
            t, h = ts[n], ts[n + 1] - ts[n]
            tb = broadcast_time(t, x)
            out = field(x, tb, **cond)
            x0, eps = path.to_x0_eps(out, x, tb, field.prediction)
            drift = path.from_x0_eps(x0, eps, x, tb, "velocity")
            if self.eta > 0:
                drift = drift - (0.5 * g2[n]) * path.from_x0_eps(x0, eps, x, tb, "score")
            x = x + h * drift
            if self.eta > 0 and not (n == len(ts) - 2 and float(times[-1]) == 0.0):
                noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
                x = x + torch.sqrt(-h * g2[n]) * noise
            if traj is not None:
                traj.append(x)
        check_finite_result(x, self, times)
        return Solution(x, len(ts) - 1, times, torch.stack(traj) if traj is not None else None)

