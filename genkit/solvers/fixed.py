"""Explicit Runge-Kutta solvers of the probability-flow ODE on any time grid.

Each method is a Butcher tableau that validates itself when built (row sums equal the nodes, weights
sum to one, strictly lower-triangular), and declares its order; the test suite measures that order.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..errors import ConfigError
from ..fields import Field, FieldView
from .base import SOLVERS, Solver, SolverState, apply_map, prepared

__all__ = ["Tableau", "RungeKutta", "Euler", "Midpoint", "Heun", "RK4"]


@dataclass(frozen=True)
class Tableau:
    """Butcher tableau ``(a, b, c)`` of an explicit method with ``len(b)`` stages."""

    a: tuple[tuple[float, ...], ...]
    b: tuple[float, ...]
    c: tuple[float, ...]

    def __post_init__(self) -> None:
        s = len(self.b)
        if len(self.c) != s or len(self.a) != s or any(len(row) != i for i, row in enumerate(self.a)):
            raise ConfigError(f"tableau rows must be strictly lower-triangular with {s} stages; got a={self.a}")
        if abs(sum(self.b) - 1) > 1e-12:
            raise ConfigError(f"tableau weights must sum to 1; got {self.b}")
        for i, row in enumerate(self.a):
            if abs(sum(row) - self.c[i]) > 1e-12:
                raise ConfigError(f"tableau row {i} sums to {sum(row)}, not its node c={self.c[i]}")


class RungeKutta(Solver):
    """Explicit RK on the velocity view of a field: ``k_i = v(x + h sum_j a_ij k_j, t + c_i h)``,
    ``x <- x + h sum_i b_i k_i`` with ``h = t_{n+1} - t_n`` (negative when sampling)."""

    tableau: Tableau

    @property
    def evals_per_step(self) -> int:  # type: ignore[override]
        return len(self.tableau.b)

    def init(self, field: Field, x: Tensor, times: Tensor, *, generator: torch.Generator | None = None,
             **cond: Any) -> SolverState:
        """Precompute the steps ``h``, the stage times ``[B]`` and the conversion maps to the velocity."""
        del generator, cond  # deterministic; no evaluation at init
        self.check_steps(times)
        tab = self.tableau
        t64 = times.to(torch.float64).cpu()
        h64 = t64[1:] - t64[:-1]
        stage_t = (t64[:-1, None] + torch.tensor(tab.c, dtype=torch.float64)[None, :] * h64[:, None]).flatten()
        _, cx, cout = prepared(field, "velocity", stage_t)
        # one [batch] time per stage, built once per solve (views of one expanded tensor)
        t_batch = stage_t.to(device=x.device, dtype=x.dtype)[:, None].expand(-1, x.shape[0]).unbind(0)
        hs = h64.tolist()
        if len(tab.b) == 1:  # Euler folds the conversion into the update: x <- (1 + h cx) x + h cout out
            return SolverState(x, 0, 0, times, [(t_batch[n], h * cout[n], 1 + h * cx[n]) for n, h in enumerate(hs)])
        return SolverState(x, 0, 0, times, (hs, t_batch, cx, cout))

    def step(self, field: Field, state: SolverState, *, generator: torch.Generator | None = None,
             **cond: Any) -> SolverState:
        """``k_i = v(x + h sum_j a_ij k_j, t + c_i h)``, ``x <- x + h sum_i b_i k_i`` over interval ``state.n``."""
        base = field.base if isinstance(field, FieldView) else field  # the maps convert its output
        n, x = state.n, state.x
        rows, weights = self._structure
        if not rows:  # Euler
            t, c_out, c_x = state.plan[n]
            return state.advance(torch.add(base(x, t, **cond) * c_out, x, alpha=c_x), 1)
        hs, t_batch, cx, cout = state.plan
        h, k = hs[n], n * (len(rows) + 1)
        out = base(x, t_batch[k], **cond)
        ks = [apply_map(out, x, cx[k], cout[k])]
        for i, row in enumerate(rows, 1):
            xi = x
            for j, aij in row:
                xi = xi + (h * aij) * ks[j]
            ks.append(apply_map(base(xi, t_batch[k + i], **cond), xi, cx[k + i], cout[k + i]))
        incr = None
        for i, bi in weights:
            incr = ks[i] * bi if incr is None else torch.add(incr, ks[i], alpha=bi)
        return state.advance(torch.add(x, incr, alpha=h), len(ks))

    @functools.cached_property
    def _structure(self) -> tuple[tuple[tuple[tuple[int, float], ...], ...], tuple[tuple[int, float], ...]]:
        """The tableau's nonzero ``(j, a_ij)`` of stages 2.. and nonzero ``(i, b_i)``, read once."""
        tab = self.tableau
        rows = tuple(tuple((j, aij) for j, aij in enumerate(row) if aij) for row in tab.a[1:])
        return rows, tuple((i, bi) for i, bi in enumerate(tab.b) if bi)


@SOLVERS.register("euler")
class Euler(RungeKutta):
    """Forward Euler, order 1, one evaluation per step."""

    name, order = "euler", 1
    tableau = Tableau(a=((),), b=(1.0,), c=(0.0,))


@SOLVERS.register("midpoint")
class Midpoint(RungeKutta):
    """Explicit midpoint, order 2, two evaluations per step."""

    name, order = "midpoint", 2
    tableau = Tableau(a=((), (0.5,)), b=(0.0, 1.0), c=(0.0, 0.5))


@SOLVERS.register("heun")
class Heun(RungeKutta):
    """Heun's method (explicit trapezoid), order 2, two evaluations per step (EDM's deterministic
    sampler, Karras et al. 2022, without the final-step shortcut: every step is a full Heun step)."""

    name, order = "heun", 2
    tableau = Tableau(a=((), (1.0,)), b=(0.5, 0.5), c=(0.0, 1.0))


@SOLVERS.register("rk4")
class RK4(RungeKutta):
    """The classical fourth-order Runge-Kutta method, four evaluations per step."""

    name, order = "rk4", 4
    tableau = Tableau(a=((), (0.5,), (0.0, 0.5), (0.0, 0.0, 1.0)), b=(1 / 6, 1 / 3, 1 / 3, 1 / 6),
                      c=(0.0, 0.5, 0.5, 1.0))
