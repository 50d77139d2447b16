"""Any field plus an ODE solver is a flow map ``x_t -> x_s``."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..errors import ConfigError
from ..fields import Field, check_field
from .base import Solver, get_solver

__all__ = ["ODEFlowMap"]


class ODEFlowMap:
    """``flow_map(x, t, s)`` solves the probability-flow ODE of ``field`` from ``t`` to ``s`` with
    ``steps`` uniform steps of ``solver`` (one scalar ``t`` and ``s`` per call).

    >>> import torch
    >>> from genkit.paths import get_path
    >>> from genkit.analytic import Gaussian
    >>> g = Gaussian(torch.tensor([3.0]), torch.eye(1), get_path("linear"))
    >>> fm = ODEFlowMap(g, "rk4", steps=4)
    >>> round(fm(torch.zeros(1, 1), 1.0, 0.0).item(), 4)
    3.0
    """

    def __init__(self, field: Field, solver: str | Solver = "heun", steps: int = 32):
        check_field(field)
        self.field, self.solver, self.steps = field, get_solver(solver), int(steps)
        if self.solver.stochastic:
            raise ConfigError(f"a flow map needs an ODE solver; {self.solver.name!r} is stochastic")
        if self.steps < self.solver.min_steps:
            raise ConfigError(f"steps={steps} is below {self.solver.name!r}'s minimum {self.solver.min_steps}")

    def __call__(self, x: Tensor, t: float | Tensor, s: float | Tensor, **cond: Any) -> Tensor:
        t, s = float(t), float(s)
        if t == s:
            return x
        times = torch.linspace(t, s, self.steps + 1, dtype=torch.float64)
        return self.solver.solve(self.field, x, times, **cond).samples
