"""Analytic teleportation: skip the early, nearly Gaussian part of sampling in closed form.

Wang & Vastola (TMLR 2024, arXiv 2412.09726). Early in sampling (high noise) the marginal ``p_t`` of real
data is close to that of the Gaussian with the data's mean and covariance, whose probability-flow map is
closed-form (:class:`genkit.gaussian_fit.GaussianFlowMap`). Teleporting jumps prior samples from t = 1 to
``t_skip`` with this map; any genkit solver then spends all its steps on ``[t_skip, t_min]``
(:func:`teleport_solve`). :func:`steps_saved` measures what that buys.

>>> import torch
>>> from genkit.paths import get_path
>>> from genkit.gaussian_fit import fit_gaussian
>>> data = torch.randn(5000, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 0.5 + 1.0
>>> fit = fit_gaussian(data)
>>> x1 = torch.randn(4, 3, dtype=torch.float64)
>>> exact = fit.as_field(get_path("linear")).exact_flow(x1, 1.0, 0.3)
>>> bool(torch.allclose(teleport(fit, get_path("linear"), x1, 0.3), exact, atol=1e-10))
True
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..errors import ConfigError
from ..fields import Field, check_field
from ..gaussian_fit import GaussianFit, GaussianFlowMap
from ..paths import Path
from .base import Solution, Solver, solve
from .grids import TimeGrid, get_grid, validate_grid

GridLike = str | TimeGrid | Tensor | Sequence[float]

__all__ = ["teleport", "teleport_solve", "StepsSaved", "steps_saved"]


def _check_skip(t_skip: float, t_start: float) -> float:
    t_skip = float(t_skip)
    if not 0.0 < t_skip <= t_start <= 1.0:
        raise ConfigError(f"t_skip must lie in (0, t_start] = (0, {t_start}] (t=0 data, t=1 noise); got {t_skip}. "
                          "Teleport to a time before the data end, e.g. t_skip=0.8.")
    return t_skip


def teleport(gaussian: GaussianFit, path: Path, x1: Tensor, t_skip: float, t_start: float = 1.0) -> Tensor:
    """Jump samples ``x1 [B, *event]`` at ``t_start`` (the prior) to ``t_skip`` in closed form."""
    t_skip = _check_skip(t_skip, float(t_start))
    return x1 if t_skip == t_start else GaussianFlowMap(gaussian, path)(x1, float(t_start), t_skip)


def _grid_from(grid: GridLike, t_skip: float, path: Path) -> TimeGrid | Tensor:
    """``grid`` restarted at ``t_skip``: a name or TimeGrid gets ``t_max = t_skip``; explicit times must
    already start there."""
    if isinstance(grid, str):
        return get_grid(grid, t_max=t_skip)
    if isinstance(grid, TimeGrid) and hasattr(grid, "t_max"):
        grid = copy.copy(grid)
        grid.t_max = t_skip
        return grid
    times = grid.times(None, path) if isinstance(grid, TimeGrid) else validate_grid(grid)
    if abs(float(times[0]) - t_skip) > 1e-12:
        raise ConfigError(f"an explicit grid must start at t_skip={t_skip}; it starts at {float(times[0])}")
    return times


def teleport_solve(field: Field, gaussian: GaussianFit, x1: Tensor, t_skip: float, solver: str | Solver = "heun",
                   steps: int | None = 10, grid: GridLike = "uniform", *, t_start: float = 1.0,
                   generator: torch.Generator | None = None, trajectory: bool = False, **cond: Any) -> Solution:
    """Teleport ``x1`` from ``t_start`` to ``t_skip`` under ``field.path``, then solve with ``solver``
    over ``grid`` rebuilt on ``[t_skip, t_min]`` so that all ``steps`` come after the jump.

    Returns the solver's :class:`~genkit.solvers.Solution` (``nfe`` counts network evaluations only;
    ``times`` starts at ``t_skip``). ``t_skip = t_start`` is the plain solve.

    >>> import torch
    >>> from genkit.paths import get_path
    >>> fit = GaussianFit.from_moments(torch.tensor([2.0]), torch.eye(1))
    >>> field = fit.as_field(get_path("linear"))
    >>> sol = teleport_solve(field, fit, torch.zeros(1, 1), 0.5, "heun", 4)
    >>> round(sol.samples.item(), 4), float(sol.times[0]), sol.nfe
    (2.0, 0.5, 8)
    """
    check_field(field)
    t_skip = _check_skip(t_skip, float(t_start))
    x = teleport(gaussian, field.path, x1, t_skip, t_start)
    return solve(field, x, solver, steps, _grid_from(grid, t_skip, field.path), generator=generator,
                 trajectory=trajectory, **cond)


def _rms(x: Tensor, ref: Tensor) -> float:
    return float((x - ref).reshape(x.shape[0], -1).square().sum(1).mean().sqrt())


@dataclass
class StepsSaved:
    """Steps saved at equal error by teleporting (see :func:`steps_saved`).

    errors: ``[len(t_skips), len(steps)]``; row 0 is the plain solve (``t_skip = t_start``).
    equivalent_steps: baseline steps that reach the same error (log-log interpolation of row 0; NaN
        where the error is outside the baseline's range).
    saved: ``1 - steps / equivalent_steps``, the fraction of steps teleporting saves.
    """

    steps: list[int]
    t_skips: list[float]
    errors: Tensor
    equivalent_steps: Tensor
    saved: Tensor

    def best(self) -> tuple[float, float, int]:
        """``(fraction saved, t_skip, steps)`` of the best teleported setting."""
        s = torch.nan_to_num(self.saved[1:], nan=-math.inf)
        i, j = divmod(int(s.argmax()), s.shape[1])
        return float(self.saved[1 + i, j]), self.t_skips[1 + i], self.steps[j]

    def __str__(self) -> str:
        rows = ["t_skip  " + "".join(f"{n:>18d}" for n in self.steps)]
        for i, t in enumerate(self.t_skips):
            cells = "".join(f"{float(e):>10.3g} ({float(v):+4.0%})" for e, v in zip(self.errors[i], self.saved[i]))
            rows.append(f"{t:<8.3g}" + cells)
        return "error (steps saved) per step budget\n" + "\n".join(rows)


def _equivalent_steps(steps: Tensor, base: Tensor, err: Tensor) -> Tensor:
    """Baseline steps reaching ``err``: interpolate log(steps) linearly in log(error) along the baseline
    (made monotone by a running minimum); NaN outside its range."""
    env = torch.cummin(base, 0).values.log()
    ls, le = steps.log(), err.log()
    out = torch.full_like(err, math.nan)
    for i in range(len(steps) - 1):
        hi, lo = env[i], env[i + 1]
        inside = (le <= hi) & (le >= lo) & out.isnan()
        w = torch.where(hi > lo, (hi - le) / (hi - lo).clamp_min(1e-300), torch.zeros_like(le))
        out = torch.where(inside, torch.exp(ls[i] + w * (ls[i + 1] - ls[i])), out)
    return out


def steps_saved(field: Field, gaussian: GaussianFit, x1: Tensor, solver: str | Solver, steps_list: Sequence[int],
                t_skips: Sequence[float], reference: Tensor, grid: GridLike = "uniform", *,
                error: Callable[[Tensor, Tensor], float] | None = None, t_start: float = 1.0,
                generator_seed: int | None = None, **cond: Any) -> StepsSaved:
    """Run ``solver`` with and without teleporting and report the steps saved at equal error.

    For every ``t_skip`` (plus the plain solve) and every budget in ``steps_list``, solve from ``x1``
    with :func:`teleport_solve` and score the samples with ``error(samples, reference)`` (default: RMS
    distance to ``reference``, the same-seed endpoints of an accurate solve). A teleported error is
    then matched to the plain solve's error curve to find how many plain steps reach it.
    ``generator_seed`` seeds a fresh generator for every solve (stochastic solvers).
    """
    steps_list = sorted(int(n) for n in steps_list)
    if len(steps_list) < 2 or steps_list[0] < 1:
        raise ConfigError(f"steps_list needs at least two positive budgets; got {steps_list}")
    t_skips = [float(t_start)] + [_check_skip(t, float(t_start)) for t in t_skips if float(t) != float(t_start)]
    error = error or _rms
    errs = torch.empty(len(t_skips), len(steps_list), dtype=torch.float64)
    for i, t in enumerate(t_skips):
        for j, n in enumerate(steps_list):
            gen = None if generator_seed is None else torch.Generator(x1.device).manual_seed(generator_seed)
            out = teleport_solve(field, gaussian, x1, t, solver, n, grid, t_start=t_start, generator=gen, **cond)
            errs[i, j] = float(error(out.samples, reference))
    n = torch.tensor(steps_list, dtype=torch.float64)
    equiv = _equivalent_steps(n, errs[0], errs)
    return StepsSaved(steps_list, t_skips, errs, equiv, 1 - n / equiv)
