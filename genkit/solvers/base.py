"""The solver contract, the registry, and ``solve``: one entry point for every sampler.

A solver is a stateless object with a declared ``order``, ``min_steps`` and ``evals_per_step``; the pure pair
``solver.init(field, x, times)`` / ``solver.step(field, state)`` advances an explicit
:class:`~genkit.solvers.state.SolverState` one grid interval at a time, and ``solver.solve(field, x, times)`` is
their loop from ``times[0]`` to ``times[-1]``, returning a :class:`Solution`. Solvers see only
fields and grids, never a family or a network class.
"""

from __future__ import annotations

import functools
import numbers
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from ..checks import check_generator, check_state, describe_nonfinite
from ..errors import ConfigError, DataError, SolverError
from ..fields import Field, FieldView, check_field
from ..registry import Registry
from .grids import Custom, TimeGrid, get_grid
from .state import SolverState, Transition

__all__ = ["Solution", "Solver", "SolverState", "Transition", "SOLVERS", "get_solver", "solve", "SolverResolver",
           "register_resolver", "solve_times", "check_finite_result", "prepared", "unwrap", "apply_map"]

SOLVERS: Registry = Registry("solver")


@dataclass
class Solution:
    """What a solve returns.

    samples: the state at the last grid time, shaped like the initial state.
    nfe: number of field evaluations.
    times: the grid actually used (float64, ``[n + 1]``; for adaptive solvers the output times).
    trajectory: ``[n + 1, *x.shape]`` states at the grid times when asked for, else ``None``.
    """

    samples: Tensor
    nfe: int
    times: Tensor
    trajectory: Tensor | None = None


class Solver:
    """Base class. Subclasses set ``name``, ``order``, ``min_steps``, ``evals_per_step`` and implement the pure pair
    ``init`` / ``step``; ``solve`` is their loop (one implementation for every solver).

    ``init(field, x, times, *, generator=None, **cond) -> SolverState`` checks the grid once and precomputes the
    per-solve coefficients; ``step(field, state, *, generator=None, **cond) -> SolverState`` advances one grid
    interval. Neither mutates the solver or the state, so a caller can stop at any state, detach it
    (``state.detach()``) to backpropagate through the last K steps only, or interleave its own work. ``step``
    must get the field ``init`` saw (its path and prediction fixed the coefficients); conditioning may change.

    >>> import torch
    >>> from genkit.paths import get_path
    >>> from genkit.analytic import Gaussian
    >>> from genkit.solvers import get_solver, Uniform
    >>> g = Gaussian(torch.tensor([2.0]), torch.eye(1), get_path("linear"))
    >>> heun, x = get_solver("heun"), torch.zeros(3, 1)
    >>> times = Uniform().times(8, g.path)
    >>> state = heun.init(g, x, times)
    >>> while not state.done:
    ...     state = heun.step(g, state)   # any work of the caller's may go between steps
    >>> torch.equal(state.x, heun.solve(g, x, times).samples), state.n, state.nfe, heun.nfe(8)
    (True, 8, 16, 16)

    Declarations: ``evals_per_step`` (None: adaptive, unknown beforehand) and ``nfe(steps)`` the evaluations a
    solve of ``steps`` intervals takes; ``stepwise`` (False: an external loop that cannot be stepped purely;
    ``init``/``step`` raise); ``gaussian_transitions`` (True: ``transition`` gives each step's Gaussian and the
    states carry it).
    """

    name: str = "solver"
    order: int = 1
    min_steps: int = 1
    stochastic: bool = False
    fixed_step: bool = True
    #: Field evaluations per grid interval (None: not known before solving, e.g. adaptive step-size control).
    evals_per_step: int | None = 1
    #: Whether ``init`` / ``step`` work (False: wrappers of external loops; use ``solve``).
    stepwise: bool = True
    #: Whether each step is a Gaussian draw exposed by ``transition`` and recorded on the state it makes.
    gaussian_transitions: bool = False
    #: Whether the solver picks its own times and reads only the grid's length (a diffusers scheduler): then a
    #: model's training-range check on the grid (``field.check_grid``) does not apply.
    own_times: bool = False

    def nfe(self, steps: int, *, times: Tensor | None = None, path: Any = None) -> int | None:
        """Field evaluations of a solve over ``steps`` grid intervals (None: not known beforehand). Solvers whose
        count depends on the grid's end points (``edm``: one evaluation on a last step to sigma = 0 and on a
        first step from alpha = 0) use ``times`` (``[steps + 1]``) and ``path`` when given."""
        return None if self.evals_per_step is None else int(steps) * self.evals_per_step

    def init(self, field: Field, x: Tensor, times: Tensor, *, generator: torch.Generator | None = None,
             **cond: Any) -> SolverState:
        """The state at ``times[0]``: ``x`` ``[B, ...]`` and the per-solve constants (no field evaluation unless
        the solver needs one to start)."""
        raise SolverError(f"solver {self.name!r} ({type(self).__name__}) cannot be stepped: "
                          + (self.why_not_stepwise if not self.stepwise else "it implements no init/step")
                          + "; use solve(...)")

    def step(self, field: Field, state: SolverState, *, generator: torch.Generator | None = None,
             **cond: Any) -> SolverState:
        """The state one grid interval on from ``state`` (pure: ``state`` is left as it was)."""
        raise SolverError(f"solver {self.name!r} ({type(self).__name__}) cannot be stepped: "
                          + (self.why_not_stepwise if not self.stepwise else "it implements no init/step")
                          + "; use solve(...)")

    #: Why ``stepwise`` is False, for the error init/step raise.
    why_not_stepwise: str = ""

    def transition(self, field: Field, state: SolverState, **cond: Any) -> Transition:
        """The Gaussian law of the next step's ``x`` given ``state`` (one field evaluation). Only solvers with
        ``gaussian_transitions``; the others raise SolverError."""
        raise SolverError(f"solver {self.name!r} does not expose Gaussian transitions (its step is "
                          + ("deterministic" if not self.stochastic else "not a single Gaussian draw given the state")
                          + "); 'ancestral' and 'euler_maruyama' do")

    def solve(self, field: Field, x: Tensor, times: Tensor, *, generator: torch.Generator | None = None,
              trajectory: bool = False, **cond: Any) -> Solution:
        """``init`` then ``step`` until the last grid time; ``Solution`` of the final state."""
        state = self.init(field, x, times, generator=generator, **cond)
        step = self.step
        traj = [state.x] if trajectory else None
        for _ in range(len(state.times) - 1 - state.n):
            state = step(field, state, generator=generator, **cond)
            if traj is not None:
                self._record(traj, state)
        check_finite_result(state.x, self, state.times)
        return Solution(state.x, state.nfe, state.times, torch.stack(traj) if traj is not None else None)

    def _record(self, traj: list[Tensor], state: SolverState) -> None:
        """Append the state's ``x`` to a trajectory (UniPC also revises the previous entry it corrected)."""
        traj.append(state.x)

    def default_grid(self) -> TimeGrid | None:
        """The grid ``solve`` uses when none is given (None: the uniform grid); a searched solver's own."""
        return None

    #: The step count ``solve`` uses when none is given (None: 10, or the grid's own for explicit times).
    default_steps: int | None = None

    def check_steps(self, times: Tensor) -> None:
        if len(times) - 1 < self.min_steps:
            raise SolverError(
                f"solver {self.name!r} needs at least {self.min_steps} steps; the grid has {len(times) - 1}. "
                "Ask for more steps."
            )

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def prepared(field: Field, dst: str, times: Tensor) -> tuple[Field, list[float], list[float]]:
    """The field to call in its own parametrization and, for each time in ``times`` (float64), the affine map
    ``(cx, cout)`` to ``dst``: ``dst = cx * x + cout * out``. Computed once per solve, so a step costs the
    network call plus one fused op, not a schedule evaluation."""
    base = field.base if isinstance(field, FieldView) else field
    cx, cout = _maps(base.path, tuple(times.to(torch.float64).cpu().tolist()), base.prediction, dst)
    return base, cx, cout


@functools.lru_cache(maxsize=256)
def _maps(path: Any, times: tuple[float, ...], src: str, dst: str) -> tuple[list[float], list[float]]:
    """Memoised: a pure function of an immutable path, the times and the two parametrizations, so sampling
    again on the same grid skips the schedule evaluation."""
    cx, cout = path.conversion_coefficients(torch.tensor(times, dtype=torch.float64), src, dst)
    return cx.tolist(), cout.tolist()


def unwrap(field: Field) -> Field:
    """The field ``prepared`` calls: a view's base (the conversion to the view's parametrization is in the map)."""
    return field.base if isinstance(field, FieldView) else field


def apply_map(out: Tensor, x: Tensor, cx: float, cout: float) -> Tensor:
    """``cx * x + cout * out`` with the trivial cases skipped."""
    if cx == 0.0:
        return out if cout == 1.0 else out * cout
    return torch.add(out * cout, x, alpha=cx)


def check_finite_result(x: Tensor, solver: Solver, times: Tensor) -> Tensor:
    """Raise SolverError when a solve produced NaN/inf (checked once, at the end)."""
    if not torch.isfinite(x).all():
        raise SolverError(
            f"solver {solver.name!r} produced non-finite values on the grid from t={float(times[0]):.4g} to "
            f"t={float(times[-1]):.4g}. The field is likely singular at an evaluated time (e.g. the 'ddpm' "
            "path at t=0, or alpha=0 at t=1 for eps/score fields); end the grid at the path's t_min, start "
            "it below 1, or use more steps."
        )
    return x


class SolverResolver(Protocol):
    """Finds solvers that are not registry entries: folders, names saved by an earlier process, ...

    ``resolve(spec)`` returns the solver ``spec`` names or None when it is not one of its own; ``explain(spec)``
    adds a hint to the unknown-solver error (or None). Stores register one with :func:`register_resolver`, so
    this module needs no import of them (the searched-solver store does, genkit/solvers/searched.py).
    """

    def resolve(self, spec: str | os.PathLike) -> Solver | None: ...

    def explain(self, spec: str | os.PathLike) -> str | None: ...


_RESOLVERS: list[SolverResolver] = []


def register_resolver(resolver: SolverResolver) -> SolverResolver:
    """Let :func:`get_solver` (and so ``solve`` / ``sample``) find solvers through ``resolver``; returns it."""
    if resolver not in _RESOLVERS:
        _RESOLVERS.append(resolver)
    return resolver


def get_solver(solver: str | os.PathLike | Solver, **kwargs: Any) -> Solver:
    """A solver by registry name (``euler``, ``heun``, ``midpoint``, ``rk4``, ``dopri5``,
    ``euler_maruyama``, ...) with its options, one a registered resolver finds (a searched-solver artifact
    directory, a searched solver saved by name), or a Solver unchanged."""
    if isinstance(solver, Solver):
        if kwargs:
            raise ConfigError(f"options {sorted(kwargs)} given with an already built solver {solver!r}")
        return solver
    if isinstance(solver, str) and solver in SOLVERS:
        try:
            return SOLVERS.get(solver)(**kwargs)
        except TypeError as e:
            raise ConfigError(f"bad options for solver {solver!r}: {e}") from None
    if isinstance(solver, (str, os.PathLike)):
        for resolver in _RESOLVERS:
            found = resolver.resolve(solver)
            if found is not None:
                if kwargs:
                    raise ConfigError(f"options {sorted(kwargs)} given with the solver {str(solver)!r}, which "
                                      f"is fixed ({found!r}); drop them")
                return found
    hints = [h for r in _RESOLVERS if isinstance(solver, (str, os.PathLike)) and (h := r.explain(solver))]
    raise ConfigError(f"unknown solver {str(solver)!r}; choose one of: {', '.join(SOLVERS.names())}"
                      + "".join(f"; {h}" for h in hints))


def steps_or_default(steps: Any, solver: Solver, grid: TimeGrid) -> int | None:
    """``steps`` as a Python int (NumPy and 0-d integer tensors accepted), or the default when None: the
    solver's own (a searched solver's N), else 10 for a named grid; explicit times keep their own count."""
    if steps is None:
        if isinstance(grid, Custom):
            return None
        return solver.default_steps if solver.default_steps is not None else 10
    if torch.is_tensor(steps) and steps.ndim == 0 and not steps.is_floating_point() and steps.dtype != torch.bool:
        steps = int(steps)
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1:
        raise ConfigError(f"steps must be a positive integer; got {steps!r}")
    return int(steps)


def solve_times(field: Field, solver: Solver, steps: int | None = None,
                grid: str | TimeGrid | Tensor | Sequence[float] | None = None) -> Tensor:
    """The times ``[n + 1]`` (float64) :func:`solve` runs ``solver`` on for ``steps`` and ``grid`` (see there):
    the solver's own grid for None, a named grid filled in with the field's training range, checked against it.
    Samplers that step a solver themselves (``genkit.finetune.svdd``) use it to step on the same grid."""
    if grid is None:  # a searched solver's own times, unless the steps asked for differ (its check says so)
        own = solver.default_grid()
        grid = own if own is not None and steps in (None, solver.default_steps) else "uniform"
    fill = getattr(field, "default_grid", None)
    if isinstance(grid, str) and callable(fill):  # a grid by name runs over the model's training range
        grid = fill(grid)
    g = get_grid(grid)
    times = g.times(steps_or_default(steps, solver, g), field.path)
    check = getattr(field, "check_grid", None)
    if callable(check) and not solver.own_times:  # a model's training range (Diffusion: t >= t_eps)
        check(times)
    return times


def solve(field: Field, x: Tensor, solver: str | Solver = "euler", steps: int | None = None,
          grid: str | TimeGrid | Tensor | Sequence[float] | None = None, *,
          generator: torch.Generator | None = None, trajectory: bool = False, **cond: Any) -> Solution:
    """Integrate ``field`` from the first to the last time of ``grid`` starting at ``x``.

    Args:
        field: any genkit field (network, family, analytic field, wrapped function).
        x: initial state ``[batch, ...]`` at the first grid time (the prior at t = 1 for sampling), a
            floating-point tensor (a NumPy array is refused: ``torch.as_tensor(x)`` first).
        solver: a Solver, its registry name, or a searched-solver artifact folder.
        steps: number of steps (adaptive solvers take only the grid's end points and pick their own). None: the
            solver's own (a searched solver's N), else 10; explicit times must match it when it is given.
        grid: a TimeGrid, its name, or explicit times (validated). None: the solver's own (a searched
            solver's times), else ``"uniform"``. A name is filled in with a model's training range
            (``field.default_grid(name)``: a ``Diffusion`` model's ``[t_eps, t_max]``); an explicit grid outside
            it is a TimeGridError (``field.check_grid``).
        generator: randomness for stochastic solvers.
        trajectory: also return the states at the grid times.

    >>> import torch
    >>> from genkit.paths import get_path
    >>> from genkit.analytic import Gaussian
    >>> g = Gaussian(torch.tensor([2.0]), torch.eye(1), get_path("linear"))
    >>> sol = solve(g, torch.zeros(1, 1), "heun", steps=8)
    >>> round(sol.samples.item(), 4), sol.nfe   # the prior's mean goes to the data's mean
    (2.0, 16)
    """
    check_field(field)
    check_state(x, "solve()")
    solver = get_solver(solver)
    times = solve_times(field, solver, steps, grid)
    if x.ndim == 0 or x.shape[0] == 0:
        raise ConfigError(f"x must be a batch [n, ...] with n >= 1; got shape {tuple(x.shape)}")
    check_generator(generator, "solve()")
    solver.check_steps(times)
    try:
        return solver.solve(field, x, times, generator=generator, trajectory=trajectory, **cond)
    except SolverError as e:  # checked only on failure: a solve that works pays no host sync for it
        bad = describe_nonfinite(x)
        if bad:
            raise DataError(f"the initial state x {bad}, so the solve could not give finite samples; the field is "
                            "not at fault: check how x was made") from e
        raise
    except TypeError as e:
        # e.g. sample(..., eta=0.5) or a typo such as stpes=5
        if cond and ("keyword argument" in str(e) or "multiple values for argument" in str(e)):
            raise ConfigError(f"solve()/sample() passed {sorted(cond)} to the field as conditioning, and it refused "
                              f"them ({e}); solver options go to the solver: get_solver(name, **options), e.g. "
                              "solver=get_solver('euler_maruyama', eta=0.5)") from e
        raise
