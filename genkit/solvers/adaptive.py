"""Adaptive ODE solvers through torchdiffeq, with the number of function evaluations reported."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..errors import ConfigError, SolverError
from ..fields import Field, as_velocity
from ..paths import broadcast_time
from .base import SOLVERS, Solution, Solver, check_finite_result

__all__ = ["Adaptive", "Dopri5", "Bosh3"]


class Adaptive(Solver):
    """An embedded Runge-Kutta pair from ``torchdiffeq.odeint`` with error control.

    The grid's first and last times are the integration interval; all grid times are output times
    (the trajectory). ``nfe`` counts every evaluation the controller made, rejected steps included.
    """

    fixed_step = False
    method = "dopri5"

    def __init__(self, rtol: float = 1e-5, atol: float = 1e-5, max_num_steps: int = 10_000):
        if rtol <= 0 or atol <= 0 or max_num_steps < 1:
            raise ConfigError(f"need rtol > 0, atol > 0, max_num_steps >= 1; got {rtol}, {atol}, {max_num_steps}")
        self.rtol, self.atol, self.max_num_steps = float(rtol), float(atol), int(max_num_steps)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(rtol={self.rtol}, atol={self.atol})"

    def solve(self, field: Field, x: Tensor, times: Tensor, *, generator: torch.Generator | None = None,
              trajectory: bool = False, **cond: Any) -> Solution:
        from torchdiffeq import odeint

        del generator
        self.check_steps(times)
        v = as_velocity(field)
        nfe = 0

        def rhs(t: Tensor, y: Tensor) -> Tensor:
            nonlocal nfe
            nfe += 1
            return v(y, broadcast_time(t, y), **cond)

        out_times = times.to(device=x.device, dtype=x.dtype)
        # step_t: the last step lands on the end time. Otherwise torchdiffeq steps past it and interpolates back,
        # evaluating the field outside the grid (below t = 0, where the ddpm path is undefined).
        options = {"max_num_steps": self.max_num_steps, "step_t": out_times[-1:]}
        try:
            ys = odeint(rhs, x, out_times, method=self.method, rtol=self.rtol, atol=self.atol, options=options)
        except AssertionError as e:  # torchdiffeq's step-size underflow or step limit
            raise SolverError(
                f"solver {self.name!r} failed between t={float(times[0]):.4g} and t={float(times[-1]):.4g} "
                f"({e}); the field is likely singular or non-finite there: end the grid at the model's "
                "time_range(), or loosen rtol/atol, or use a fixed-step solver"
            ) from None
        check_finite_result(ys[-1], self, times)
        return Solution(ys[-1], nfe, times, ys if trajectory else None)


@SOLVERS.register("dopri5")
class Dopri5(Adaptive):
    """Dormand-Prince 5(4), adaptive."""

    name, order, method = "dopri5", 5, "dopri5"


@SOLVERS.register("bosh3")
class Bosh3(Adaptive):
    """Bogacki-Shampine 3(2), adaptive."""

    name, order, method = "bosh3", 3, "bosh3"
