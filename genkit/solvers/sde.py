"""Stochastic samplers: Euler-Maruyama on the reverse-time SDE of any field, and its noise sources.

For a path with forward SDE diffusion ``g^2(t) = 2 sigma (alpha sigma' - sigma alpha') / alpha`` the
SDEs ``dx = [v(x, t) - (eta g^2 / 2) score(x, t)] dt + sqrt(eta) g dW`` (run backwards in time) share the
marginals of the path for every ``eta >= 0``: ``eta = 1`` is the reverse diffusion (Song et al. 2021,
arXiv 2011.13456), ``eta = 0`` the probability-flow ODE. Velocity and score both come from the path.
Since ``score = -eps / sigma``, the drift is computed as ``v + eta c(t) eps`` with
``c = (alpha sigma' - sigma alpha') / alpha = g^2 / (2 sigma)``, which stays finite at ``sigma = 0``.

Noise sources (``noise=``):

- ``"fresh"`` (default): a new ``torch.randn`` draw from ``generator`` per step; the Brownian path
  depends on the grid.
- ``"brownian_tree"``: increments of one Brownian motion ``W(s)`` over reverse time ``s = 1 - t``,
  built by ``torchsde``'s Brownian tree (Li et al. 2020, arXiv 2001.01328; Kidger et al. 2021,
  arXiv 2105.13493) from an integer seed drawn from ``generator``. The same generator gives the same
  path whatever the grid, so refining the grid converges to one sample (strong convergence), and
  every SDE solver in genkit that takes this option (``euler_maruyama``, ``sde_srk``) sees the same path.

>>> import torch
>>> from genkit.paths import get_path
>>> from genkit.analytic import Gaussian
>>> from genkit.solvers import Uniform, solve
>>> g = Gaussian(torch.zeros(2), torch.eye(2), get_path("ddpm"), "eps")
>>> x1 = torch.randn(4, 2, dtype=torch.float64)
>>> em = EulerMaruyama(noise="brownian_tree")
>>> a = solve(g, x1, em, 64, generator=torch.Generator().manual_seed(0)).samples
>>> b = solve(g, x1, em, 128, generator=torch.Generator().manual_seed(0)).samples
>>> bool((a - b).abs().max() < 0.1)   # the same Brownian path on both grids
True
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..errors import ConfigError, SolverError
from ..fields import Field
from ..paths import Path, broadcast_time
from .base import SOLVERS, Solver, SolverState, Transition

__all__ = ["NOISES", "EulerMaruyama", "seed_from_generator", "brownian_tree", "check_noise", "reverse_drift",
           "diffusion_g2"]

NOISES = ("fresh", "brownian_tree")


def check_noise(noise: str, tol: float | None) -> float:
    """Validate the ``noise`` and ``tol`` options shared by the SDE solvers; return the tree tolerance."""
    if noise not in NOISES:
        raise ConfigError(f"unknown noise {noise!r}; choose one of {NOISES} ('brownian_tree' gives the same "
                          "Brownian path on every grid for one generator)")
    if tol is not None and noise != "brownian_tree":
        raise ConfigError(f"tol={tol} sets the Brownian tree's resolution; it needs noise='brownian_tree'")
    tol = 1e-6 if tol is None else float(tol)
    if not 0 < tol < 1e-3:
        raise ConfigError(f"the Brownian tree tolerance must be in (0, 1e-3); got {tol}. torchsde's default 1e-6 "
                          "is a good choice.")
    return tol


def seed_from_generator(generator: torch.Generator | None) -> int:
    """One integer seed drawn from ``generator`` (or torch's global generator when ``None``)."""
    device = generator.device if generator is not None else "cpu"
    return int(torch.randint(0, 2 ** 62, (), generator=generator, device=device))


def brownian_tree(shape: tuple[int, ...], *, generator: torch.Generator | None, dtype: torch.dtype,
                  device: torch.device | str, tol: float = 1e-6):
    """A ``torchsde.BrownianInterval`` in dyadic-tree mode over reverse time ``s = 1 - t in [0, 1]``.

    ``bm(s_a, s_b) -> [*shape]`` is ``W(s_b) - W(s_a)``; its values depend only on the seed drawn
    from ``generator``, not on where or in which order it is queried (query times are resolved to
    ``tol``). It also carries the space-time Levy area needed by stochastic Runge-Kutta methods.
    """
    import torchsde

    return torchsde.BrownianInterval(t0=0.0, t1=1.0, size=tuple(shape), dtype=dtype, device=device,
                                     entropy=seed_from_generator(generator), tol=tol, halfway_tree=True,
                                     levy_area_approximation="space-time")


def diffusion_g2(path: Path, times: Tensor, eta: float) -> Tensor:
    """``eta g^2`` at ``times`` (float64), or SolverError where it is infinite (alpha = 0 at t = 1)."""
    g2 = path.g2(times.to(torch.float64)) * eta
    if not torch.isfinite(g2).all():
        bad = float(times[~torch.isfinite(g2)][0])
        raise SolverError(
            f"the {path.name!r} path has infinite diffusion g^2 at t={bad:.4g} (alpha=0 there). Start the grid "
            "below 1, e.g. grid=Uniform(t_max=0.99), or use eta=0 / an ODE solver."
        )
    return g2


def reverse_drift(field: Field, x: Tensor, t: Tensor, eta: float, **cond: Any) -> Tensor:
    """``dx/dt`` of the reverse SDE, ``v - (eta g^2 / 2) score = v + eta c(t) eps``, from one evaluation.

    ``x`` is ``[batch, ...]`` and ``t`` a float or ``[batch]``; the result has ``x``'s shape.
    """
    path = field.path
    tb = broadcast_time(t, x)
    x0, eps = path.to_x0_eps(field(x, tb, **cond), x, tb, field.prediction)
    drift = path.from_x0_eps(x0, eps, x, tb, "velocity")
    if eta > 0:  # Path.coefficients evaluates the schedule once when t is one time for the batch
        a, s, da, ds = path.coefficients(tb, x)
        drift = drift + (eta * (a * ds - s * da) / a) * eps
    return drift


@SOLVERS.register("euler_maruyama")
class EulerMaruyama(Solver):
    """Euler-Maruyama, strong order 1/2 in general and 1 here (the noise does not depend on ``x``), weak
    order 1; velocity and score both come from one network evaluation per step. The last step adds no
    noise when it ends at t = 0. ``noise="brownian_tree"`` draws the increments from
    :func:`brownian_tree` (resolved to ``tol``, default 1e-6) instead of fresh per-step noise."""

    name, order, stochastic, gaussian_transitions = "euler_maruyama", 1, True, True

    def __init__(self, eta: float = 1.0, noise: str = "fresh", tol: float | None = None):
        if eta < 0:
            raise ConfigError(f"eta (noise scale) must be >= 0; got {eta}. eta=1 is the reverse diffusion.")
        self.eta, self.noise, self.tol = float(eta), noise, check_noise(noise, tol)

    def __repr__(self) -> str:
        if self.noise == "fresh":
            return f"EulerMaruyama(eta={self.eta})"
        return f"EulerMaruyama(eta={self.eta}, noise={self.noise!r}, tol={self.tol})"

    def init(self, field: Field, x: Tensor, times: Tensor, *, generator: torch.Generator | None = None,
             **cond: Any) -> SolverState:
        """Check the grid decreases and ``g^2`` is finite on it; precompute ``h``, ``sqrt(-h)``, ``g = sqrt(eta
        g^2)`` and the transition std ``g sqrt(-h)`` per step, and the Brownian tree (seeded from
        ``generator``) for ``noise="brownian_tree"``."""
        del cond
        self.check_steps(times)
        if times[-1] > times[0]:
            raise SolverError("Euler-Maruyama runs the reverse SDE: the grid must decrease (from noise to data)")
        g = torch.sqrt(diffusion_g2(field.path, times[:-1], self.eta).to(device=x.device, dtype=x.dtype))
        ts = times.to(device=x.device, dtype=x.dtype)
        h = ts[1:] - ts[:-1]
        root_h = torch.sqrt(-h)
        num = len(times) - 1
        # the last step adds no noise when it ends at t = 0
        noisy = tuple(self.eta > 0 and not (n == num - 1 and float(times[-1]) == 0.0) for n in range(num))
        bm = None
        if self.eta > 0 and self.noise == "brownian_tree":
            bm = brownian_tree((x.shape[0], x[0].numel()), generator=generator, dtype=x.dtype, device=x.device,
                               tol=self.tol)
        plan = (ts, h, root_h, g, g * root_h, noisy, tuple((1.0 - times.to(torch.float64)).tolist()), bm)
        return SolverState(x, 0, 0, times, plan)

    def transition(self, field: Field, state: SolverState, **cond: Any) -> Transition:
        """``N(x + h drift(x, t), eta g^2 |h|)`` with ``h = t_{n+1} - t_n < 0``; std 0 on a last step to t = 0."""
        ts, h, _, _, std, noisy, _, _ = state.plan
        n, x = state.n, state.x
        mean = x + h[n] * reverse_drift(field, x, ts[n], self.eta, **cond)
        return Transition(mean, std[n] if noisy[n] else 0.0)

    def step(self, field: Field, state: SolverState, *, generator: torch.Generator | None = None,
             **cond: Any) -> SolverState:
        """Draw from :meth:`transition`: ``x + h drift + g dW`` with ``dW = sqrt(-h) z`` (or the tree's increment)."""
        tr = self.transition(field, state, **cond)
        _, _, _, g, _, noisy, s, bm = state.plan
        n, x = state.n, tr.mean
        if noisy[n]:
            if bm is None:  # exactly Transition.sample, so a sampler drawing from the transition draws the same
                x = tr.sample(generator)
            else:
                x = x + g[n] * bm(s[n], s[n + 1]).reshape(x.shape)
        return state.advance(x, 1, (), tr)
