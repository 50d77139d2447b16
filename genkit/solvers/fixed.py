"""Explicit Runge-Kutta solvers of the probability-flow ODE on any time grid.

Each method is a Butcher tableau that validates itself when built (row sums equal the nodes, weights
sum to one, strictly lower-triangular), and declares its order; the test suite measures that order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..errors import ConfigError
from ..fields import Field
from .base import SOLVERS, Solution, Solver, apply_map, check_finite_result, prepared

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

    def solve(self, field: Field, x: Tensor, times: Tensor, *, generator: torch.Generator | None = None,
              trajectory: bool = False, **cond: Any) -> Solution:
        del generator  # deterministic
        self.check_steps(times)
        tab = self.tableau
        t64 = times.to(torch.float64).cpu()
        h64 = t64[1:] - t64[:-1]
        stage_t = (t64[:-1, None] + torch.tensor(tab.c, dtype=torch.float64)[None, :] * h64[:, None]).flatten()
        base, cx, cout = prepared(field, "velocity", stage_t)
        stage_dev = stage_t.to(device=x.device, dtype=x.dtype)
        t_batch = [stage_dev[k].expand(x.shape[0]) for k in range(len(stage_t))]  # built once per solve
        hs = h64.tolist()
        traj = [x] if trajectory else None
        k_idx = 0
        for n in range(len(hs)):
            h = hs[n]
            ks: list[Tensor] = []
            for i in range(len(tab.b)):
                xi = x
                for j, aij in enumerate(tab.a[i]):
                    if aij:
                        xi = xi + (h * aij) * ks[j]
                out = base(xi, t_batch[k_idx], **cond)
                if len(tab.b) == 1:  # Euler: fold the conversion into the update, x <- (1 + h cx) x + h cout out
                    ks.append(out)
                    break
                ks.append(apply_map(out, xi, cx[k_idx], cout[k_idx]))
                k_idx += 1
            if len(tab.b) == 1:
                x = torch.add(ks[0] * (h * cout[k_idx]), x, alpha=1 + h * cx[k_idx])
                k_idx += 1
            else:
                incr = None
                for bi, k in zip(tab.b, ks):
                    if bi:
                        incr = k * bi if incr is None else torch.add(incr, k, alpha=bi)
                x = torch.add(x, incr, alpha=h)
            if traj is not None:
                traj.append(x)
        check_finite_result(x, self, times)
        return Solution(x, len(hs) * len(tab.b), times, torch.stack(traj) if traj is not None else None)


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
