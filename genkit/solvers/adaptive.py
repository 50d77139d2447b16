"""Adaptive ODE solvers through torchdiffeq, with the number of function evaluations reported."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor

from ..errors import ConfigError, SolverError
from ..fields import Field, as_velocity
from ..paths import broadcast_time
from .base import SOLVERS, Solver, SolverState

__all__ = ["Adaptive", "Dopri5", "Bosh3"]


class Adaptive(Solver):
    """An embedded Runge-Kutta pair from ``torchdiffeq.odeint`` with error control.

    The grid's first and last times are the integration interval; all grid times are output times
    (the trajectory). ``nfe`` counts every evaluation the controller made, rejected steps included. A ``step``
    integrates one grid interval, the controller's step size carried over in the state, so stepping equals the
    one-call solve bitwise.
    """

    fixed_step, evals_per_step = False, None
    method = "dopri5"

    def __init__(self, rtol: float = 1e-5, atol: float = 1e-5, max_num_steps: int = 10_000):
        if rtol <= 0 or atol <= 0 or max_num_steps < 1:
            raise ConfigError(f"need rtol > 0, atol > 0, max_num_steps >= 1; got {rtol}, {atol}, {max_num_steps}")
        self.rtol, self.atol, self.max_num_steps = float(rtol), float(atol), int(max_num_steps)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(rtol={self.rtol}, atol={self.atol})"

    def _odeint_parts(self, field: Field, x: Tensor, times: Tensor, cond: dict[str, Any]) -> tuple[Any, ...]:
        """torchdiffeq's normalised problem for ``odeint(rhs, x, times)``: (wrapped rhs, y0, ascending times,
        options) and the evaluation counter of the rhs."""
        from torchdiffeq._impl.odeint import SOLVERS as TDE_SOLVERS
        from torchdiffeq._impl.odeint import _check_inputs

        v, calls = as_velocity(field), [0]

        def rhs(t: Tensor, y: Tensor) -> Tensor:
            calls[0] += 1
            return v(y, broadcast_time(t, y), **cond)

        out_times = times.to(device=x.device, dtype=x.dtype)
        # step_t: the last step lands on the end time. Otherwise torchdiffeq steps past it and interpolates back,
        # evaluating the field outside the grid (below t = 0, where the ddpm path is undefined).
        options = {"max_num_steps": self.max_num_steps, "step_t": out_times[-1:]}
        _, func, y0, t, rtol, atol, method, options, _, _ = _check_inputs(
            rhs, x, out_times, self.rtol, self.atol, self.method, options, None, TDE_SOLVERS)
        return TDE_SOLVERS[method], func, y0, t, rtol, atol, options, calls

    def _failed(self, times: Tensor, e: AssertionError) -> SolverError:
        return SolverError(
            f"solver {self.name!r} failed between t={float(times[0]):.4g} and t={float(times[-1]):.4g} "
            f"({e}); the field is likely singular or non-finite there: end the grid at the model's "
            "time_range(), or loosen rtol/atol, or use a fixed-step solver"
        )

    def init(self, field: Field, x: Tensor, times: Tensor, *, generator: torch.Generator | None = None,
             **cond: Any) -> SolverState:
        """Set up torchdiffeq's controller over the whole grid (it evaluates the field at ``times[0]`` and picks
        the first step: ``state.nfe`` counts those evaluations); its state (``rk_state``, the next ``step_t``
        index) travels in ``state.memory``."""
        del generator
        self.check_steps(times)
        cls, func, y0, t, rtol, atol, options, calls = self._odeint_parts(field, x, times, cond)
        solver = cls(func=func, y0=y0, rtol=rtol, atol=atol, **options)
        t = t.to(solver.dtype)
        try:
            solver._before_integrate(t)
        except AssertionError as e:  # torchdiffeq's step-size underflow or step limit
            raise self._failed(times, e) from None
        memory = (solver.rk_state, solver.next_step_index, solver.next_jump_index)
        return SolverState(x, 0, calls[0], times, (solver, t), memory)

    def step(self, field: Field, state: SolverState, *, generator: torch.Generator | None = None,
             **cond: Any) -> SolverState:
        """Integrate the next grid interval adaptively, continuing the controller where the state left it (a
        copy of torchdiffeq's solver object runs it; the state's is untouched): exactly ``odeint``'s output at
        the next grid time. ``nfe`` counts every evaluation, rejected steps included."""
        template, t = state.plan
        solver = copy.copy(template)
        _, solver.func, _, _, _, _, _, calls = self._odeint_parts(field, state.x, state.times, cond)
        solver.rk_state, solver.next_step_index, solver.next_jump_index = state.memory
        try:
            x = solver._advance(t[state.n + 1])
        except AssertionError as e:
            raise self._failed(state.times, e) from None
        memory = (solver.rk_state, solver.next_step_index, solver.next_jump_index)
        return state.advance(x, calls[0], memory)


@SOLVERS.register("dopri5")
class Dopri5(Adaptive):
    """Dormand-Prince 5(4), adaptive."""

    name, order, method = "dopri5", 5, "dopri5"


@SOLVERS.register("bosh3")
class Bosh3(Adaptive):
    """Bogacki-Shampine 3(2), adaptive."""

    name, order, method = "bosh3", 3, "bosh3"
