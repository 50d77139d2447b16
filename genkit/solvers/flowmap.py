"""Any field plus an ODE solver is a flow map ``x_t -> x_s``."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..errors import ConfigError, ShapeError
from ..fields import Field, check_field
from .base import Solver, get_solver

__all__ = ["ODEFlowMap"]


def _times(t: float | Tensor, x: Tensor, name: str) -> Tensor | float:
    """A float (or 0-d tensor) stays one time for the batch; a ``[B]`` tensor is checked against ``x``."""
    if not torch.is_tensor(t):
        return float(t)
    if t.ndim == 0:
        return float(t)
    if t.shape != (x.shape[0],):
        raise ShapeError(f"flow-map time {name} must be a float or a tensor of shape [batch]=[{x.shape[0]}]; got "
                         f"shape {tuple(t.shape)}. Pass one time per sample, e.g. torch.full((x.shape[0],), {name})")
    if not t.is_floating_point():
        raise ShapeError(f"flow-map time {name} must be a float tensor in [0, 1]; got dtype {t.dtype}")
    return t


class ODEFlowMap:
    """``flow_map(x, t, s)`` solves the probability-flow ODE of ``field`` from ``t`` to ``s`` with
    ``steps`` uniform steps of ``solver``.

    ``t`` and ``s`` are floats (one jump for the batch) or per-sample times ``[B]``: the samples are grouped
    by their ``(t, s)`` pair and each group is solved on its own grid, so every row equals the scalar call
    for its times exactly (one solve per distinct pair: a batch of all-different times costs ``B`` solves).

    >>> import torch
    >>> from genkit.paths import get_path
    >>> from genkit.analytic import Gaussian
    >>> g = Gaussian(torch.tensor([3.0]), torch.eye(1), get_path("linear"))
    >>> fm = ODEFlowMap(g, "rk4", steps=4)
    >>> round(fm(torch.zeros(1, 1), 1.0, 0.0).item(), 4)
    3.0
    >>> fm(torch.zeros(2, 1), torch.tensor([1.0, 0.5]), torch.tensor([0.0, 0.5])).flatten().tolist()
    [3.0, 0.0]
    """

    def __init__(self, field: Field, solver: str | Solver = "heun", steps: int = 32):
        check_field(field)
        self.field, self.solver, self.steps = field, get_solver(solver), int(steps)
        if self.solver.stochastic:
            raise ConfigError(f"a flow map needs an ODE solver; {self.solver.name!r} is stochastic")
        if self.steps < self.solver.min_steps:
            raise ConfigError(f"steps={steps} is below {self.solver.name!r}'s minimum {self.solver.min_steps}")

    def _solve(self, x: Tensor, t: float, s: float, **cond: Any) -> Tensor:
        if t == s:
            return x
        times = torch.linspace(t, s, self.steps + 1, dtype=torch.float64)
        return self.solver.solve(self.field, x, times, **cond).samples

    def __call__(self, x: Tensor, t: float | Tensor, s: float | Tensor, **cond: Any) -> Tensor:
        """``x [B, ...]`` at times ``t`` to times ``s`` (floats or ``[B]``); conditioning ``[B, ...]`` is split
        with the samples."""
        t, s = _times(t, x, "t"), _times(s, x, "s")
        if not torch.is_tensor(t) and not torch.is_tensor(s):
            return self._solve(x, t, s, **cond)
        n = x.shape[0]
        pairs = torch.stack([torch.as_tensor(t, dtype=torch.float64).expand(n).to(torch.float64).cpu(),
                             torch.as_tensor(s, dtype=torch.float64).expand(n).to(torch.float64).cpu()], 1)
        unique, group = torch.unique(pairs, dim=0, return_inverse=True)
        out = torch.empty_like(x)
        group = group.to(x.device)
        for k, (tk, sk) in enumerate(unique.tolist()):
            idx = (group == k).nonzero().flatten()
            part = {key: (v[idx] if torch.is_tensor(v) and v.ndim and v.shape[0] == n else v)
                    for key, v in cond.items()}
            out[idx] = self._solve(x[idx], tk, sk, **part)
        return out
