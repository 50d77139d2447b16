"""Higher-order and adaptive reverse-SDE solvers with ``torchsde`` as the backend.

The reverse SDE of :mod:`genkit.solvers.sde`, ``dx = [v - (eta g^2 / 2) score] dt + sqrt(eta) g dW``
(``dx = b(x, t) dt + sqrt(eta) g(t) dW`` run from noise to data), is handed to ``torchsde.sdeint`` in
reverse time ``s = 1 - t`` (torchsde integrates forwards): ``dy = -b(y, 1 - s) ds + sqrt(eta g^2(1 - s))
dW_s``. The noise does not depend on the state ("additive" in torchsde's terms), so Ito and
Stratonovich coincide and the stochastic Runge-Kutta scheme SRA1 of Rossler (SIAM J. Numer. Anal. 48,
2010) reaches strong order 1.5 with two field evaluations per step.

``method``:

- ``"srk"`` (registered as ``sde_srk``): SRA1, strong order 1.5; with ``eta = 0`` it is Ralston's
  second-order Runge-Kutta method. Two evaluations per step.
- ``"heun"`` (registered as ``sde_heun``): stochastic Heun, strong order 1, ODE order 2; two evaluations.
- ``"euler"``: Euler-Maruyama through torchsde (equals ``euler_maruyama`` on one Brownian path, except
  that it also adds noise on a last step that ends at t = 0); one evaluation.

``order`` is the deterministic (``eta = 0``) order, ``strong_order`` the strong order for this SDE.
Fixed steps land exactly on the grid; ``adaptive=True`` lets torchsde choose the steps by step doubling
with ``rtol``/``atol`` (the grid gives the interval, the first step and the output times; the
trajectory is interpolated linearly between accepted steps). ``nfe`` counts field evaluations.
The Brownian path comes from ``generator``: ``noise="fresh"`` uses a ``torchsde.BrownianInterval``
(reproducible for one grid), ``noise="brownian_tree"`` the grid-independent tree of
:func:`genkit.solvers.sde.brownian_tree`, shared with ``EulerMaruyama(noise="brownian_tree")``.

>>> import torch
>>> from genkit.paths import get_path
>>> from genkit.analytic import Gaussian
>>> from genkit.solvers import solve
>>> g = Gaussian(torch.tensor([1.0]), torch.eye(1) * 0.5, get_path("ddpm"), "eps")
>>> x1 = torch.randn(3, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
>>> sol = solve(g, x1, TorchSDE("srk"), 20, generator=torch.Generator().manual_seed(1))
>>> sol.samples.shape, sol.nfe
(torch.Size([3, 1]), 40)
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ..errors import ConfigError, SolverError
from ..fields import Field
from .base import SOLVERS, Solution, Solver, SolverState, check_finite_result
from .sde import brownian_tree, check_noise, diffusion_g2, reverse_drift, seed_from_generator

__all__ = ["TorchSDE", "SDE_METHODS"]

#: method -> (torchsde SDE type, deterministic order, strong order for state-independent noise)
SDE_METHODS: dict[str, tuple[str, int, float]] = {
    "srk": ("ito", 2, 1.5),
    "heun": ("stratonovich", 2, 1.0),
    "euler": ("ito", 1, 1.0),
}


class _ReverseSDE:
    """torchsde's SDE protocol for the reverse SDE in ``s = 1 - t`` on flattened states ``[batch, D]``.

    ``f`` remembers its last evaluation: torchsde asks again for ``f(s_n, y_n)`` (once when it checks
    shapes, once more inside SRA1), and a repeated point must not cost another network call.
    """

    noise_type = "additive"

    def __init__(self, field: Field, shape: torch.Size, eta: float, sde_type: str, cond: dict[str, Any]):
        self.field, self.shape, self.eta, self.sde_type, self.cond = field, shape, eta, sde_type, cond
        self.nfe = 0
        self._last: tuple[float, Tensor, Tensor] | None = None
        self._g: dict[float, float] = {}

    def f(self, s: Tensor, y: Tensor) -> Tensor:
        s_val = float(s)
        if self._last is not None and self._last[0] == s_val and self._last[1] is y:
            return self._last[2]
        self.nfe += 1
        x = y.reshape(self.shape)
        t = torch.as_tensor(1.0 - s_val, dtype=y.dtype, device=y.device)
        out = -reverse_drift(self.field, x, t, self.eta, **self.cond).reshape(y.shape)
        self._last = (s_val, y, out)
        return out

    def g_prod(self, s: Tensor, y: Tensor, v: Tensor) -> Tensor:
        s_val = float(s)
        if s_val not in self._g:
            g2 = float(self.field.path.g2(torch.tensor(1.0 - s_val, dtype=torch.float64)))
            self._g[s_val] = math.sqrt(max(g2, 0.0) * self.eta)
        return self._g[s_val] * v


class TorchSDE(Solver):
    """Reverse-SDE solver through ``torchsde.sdeint`` (see the module docstring for the options)."""

    stochastic = True
    why_not_stepwise = ("with adaptive=True torchsde's step sizes cross the grid times inside one sdeint call, so "
                        "there is no per-interval state; use adaptive=False to step")

    def __init__(self, method: str = "srk", eta: float = 1.0, noise: str = "fresh", adaptive: bool = False,
                 rtol: float | None = None, atol: float | None = None, dt_min: float | None = None,
                 tol: float | None = None):
        if method not in SDE_METHODS:
            raise ConfigError(f"unknown torchsde method {method!r}; choose one of {sorted(SDE_METHODS)}")
        if eta < 0:
            raise ConfigError(f"eta (noise scale) must be >= 0; got {eta}. eta=1 is the reverse diffusion.")
        self.method, self.eta, self.noise, self.adaptive = method, float(eta), noise, bool(adaptive)
        self.tol = check_noise(noise, tol)
        given = {k: v for k, v in (("rtol", rtol), ("atol", atol), ("dt_min", dt_min)) if v is not None}
        if given and not self.adaptive:
            raise ConfigError(f"{sorted(given)} control adaptive stepping; pass adaptive=True or drop them")
        self.rtol, self.atol, self.dt_min = (float(d if v is None else v)
                                             for v, d in ((rtol, 1e-3), (atol, 1e-3), (dt_min, 1e-5)))
        if self.rtol <= 0 or self.atol <= 0 or not 0 < self.dt_min < 1:
            raise ConfigError(f"need rtol > 0, atol > 0 and 0 < dt_min < 1; got {rtol}, {atol}, {dt_min}")
        self.name = f"sde_{method}"
        _, self.order, self.strong_order = SDE_METHODS[method]
        self.fixed_step = self.stepwise = not self.adaptive
        self.evals_per_step = None if self.adaptive else (1 if method == "euler" else 2)

    def __repr__(self) -> str:
        extra = f", rtol={self.rtol}, atol={self.atol}" if self.adaptive else ""
        return (f"TorchSDE(method={self.method!r}, eta={self.eta}, noise={self.noise!r}, "
                f"adaptive={self.adaptive}{extra})")

    def _brownian(self, y: Tensor, generator: torch.Generator | None):
        import torchsde

        if self.noise == "brownian_tree":
            return brownian_tree(tuple(y.shape), generator=generator, dtype=y.dtype, device=y.device, tol=self.tol)
        return torchsde.BrownianInterval(t0=0.0, t1=1.0, size=tuple(y.shape), dtype=y.dtype, device=y.device,
                                         entropy=seed_from_generator(generator), levy_area_approximation="space-time")

    def _run(self, sde: _ReverseSDE, bm: Any, ts: Tensor, y0: Tensor, dt: float) -> Tensor:
        import torchsde

        # sdeint draws one torch.randn from the global generator to check shapes: keep it private
        devices = [y0.device.index or 0] if y0.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            return torchsde.sdeint(sde, y0, ts, bm=bm, method=self.method, dt=dt, adaptive=self.adaptive,
                                   rtol=self.rtol, atol=self.atol, dt_min=self.dt_min)

    def _check(self, field: Field, times: Tensor) -> None:
        self.check_steps(times)
        if times[-1] > times[0]:
            raise SolverError(f"{self.name} runs the reverse SDE: the grid must decrease (from noise to data)")
        diffusion_g2(field.path, times[:-1], self.eta)

    def init(self, field: Field, x: Tensor, times: Tensor, *, generator: torch.Generator | None = None,
             **cond: Any) -> SolverState:
        """Check the grid; draw the Brownian path's seed from ``generator`` (the path is in ``state.plan``:
        its increments depend only on that seed, not on the order of the queries)."""
        del cond
        if self.adaptive:  # the step sizes cross grid times: one sdeint call, not a loop of intervals
            super().init(field, x, times)
        self._check(field, times)
        bm = self._brownian(x.reshape(x.shape[0], -1), generator)
        return SolverState(x, 0, 0, times, (bm, (1.0 - times.to(torch.float64)).to(x.device)))

    def step(self, field: Field, state: SolverState, *, generator: torch.Generator | None = None,
             **cond: Any) -> SolverState:
        """One torchsde step over the next grid interval, on the state's Brownian path."""
        bm, s = state.plan
        n, x = state.n, state.x
        sde = _ReverseSDE(field, x.shape, self.eta, SDE_METHODS[self.method][0], cond)
        # a step a hair longer than the interval is clipped by torchsde to its end: one step, on the grid
        y = self._run(sde, bm, s[n:n + 2], x.reshape(x.shape[0], -1), float(s[n + 1] - s[n]) * (1 + 1e-9))[-1]
        return state.advance(y.reshape(x.shape), sde.nfe)

    def solve(self, field: Field, x: Tensor, times: Tensor, *, generator: torch.Generator | None = None,
              trajectory: bool = False, **cond: Any) -> Solution:
        if not self.adaptive:
            return super().solve(field, x, times, generator=generator, trajectory=trajectory, **cond)
        self._check(field, times)
        sde = _ReverseSDE(field, x.shape, self.eta, SDE_METHODS[self.method][0], cond)
        y = x.reshape(x.shape[0], -1)
        s = (1.0 - times.to(torch.float64)).to(x.device)
        ys = self._run(sde, self._brownian(y, generator), s, y, float(s[1] - s[0]))
        out = ys[-1].reshape(x.shape)
        check_finite_result(out, self, times)
        return Solution(out, sde.nfe, times, ys.reshape(len(ys), *x.shape) if trajectory else None)


@SOLVERS.register("sde_srk")
def _sde_srk(**kwargs: Any) -> TorchSDE:
    """``TorchSDE(method="srk", ...)``: Rossler's SRA1, strong order 1.5 for this SDE."""
    return TorchSDE(method="srk", **kwargs)


@SOLVERS.register("sde_heun")
def _sde_heun(**kwargs: Any) -> TorchSDE:
    """``TorchSDE(method="heun", ...)``: stochastic Heun, strong order 1."""
    return TorchSDE(method="heun", **kwargs)
