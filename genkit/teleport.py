"""Analytic teleportation: skip the early, nearly Gaussian part of sampling in closed form.

Wang & Vastola, "The Unreasonable Effectiveness of Gaussian Score Approximation for Diffusion Models
and its Applications" (TMLR 2024, arXiv 2412.09726). Early in sampling (high noise) the marginal
``p_t`` of real data is close to that of the Gaussian ``N(m, C)`` with the data's mean and covariance,
whose probability-flow ODE has a closed form under every affine path ``x_t = alpha x_0 + sigma eps``.
With ``C = U diag(lam) U^T``, ``y = x_t - alpha_t m``::

    x_s = alpha_s m + U diag(sqrt((alpha_s^2 lam + sigma_s^2) / (alpha_t^2 lam + sigma_t^2))) U^T y
          + sqrt((alpha_s^2 delta + sigma_s^2) / (alpha_t^2 delta + sigma_t^2)) (I - U U^T) y

A low-rank fit keeps the top ``rank`` eigenvectors and treats the orthogonal complement as isotropic
with variance ``delta``: by default the mean discarded eigenvalue (probabilistic PCA), or ``delta = 0``
for the paper's code, where the complement scales by ``sigma_s / sigma_t``. Teleporting jumps prior
samples from t = 1 to ``t_skip`` with this map; any genkit solver then spends all its steps on
``[t_skip, t_min]`` (:func:`teleport_solve`). :func:`steps_saved` measures what that buys.

Data range: image statistics are often computed on ``[0, 1]`` pixels while the networks see
``[-1, 1]``. ``data_range=(0, 1)`` maps the statistics explicitly (mean ``2 m - 1``, covariance
``4 C``); ``data_range=None`` takes the data as already in the model's range.

>>> import torch
>>> from genkit.paths import get_path
>>> from genkit.analytic import Gaussian
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

from .analytic import Gaussian, GaussianMixture
from .errors import ConfigError, DataError, ShapeError
from .fields import Field, check_field
from .paths import Path, broadcast_time
from .solvers.base import Solution, Solver, solve
from .solvers.grids import TimeGrid, get_grid, validate_grid

GridLike = str | TimeGrid | Tensor | Sequence[float]

__all__ = ["GaussianFit", "fit_gaussian", "GaussianFlowMap", "teleport", "teleport_solve", "StepsSaved",
           "steps_saved"]


@dataclass
class GaussianFit:
    """``N(mean, U diag(eigvals) U^T + residual (I - U U^T))`` on flattened samples of ``event_shape``.

    mean: ``[D]``; eigvals: ``[k]`` descending; eigvecs: ``[D, k]`` orthonormal columns (``k = D`` for a
    full fit); residual: the variance of each direction outside ``U`` (unused when ``k = D``). float64.
    """

    mean: Tensor
    eigvals: Tensor
    eigvecs: Tensor
    residual: float
    event_shape: tuple[int, ...]

    @property
    def dim(self) -> int:
        return self.mean.shape[0]

    @property
    def rank(self) -> int:
        return self.eigvals.shape[0]

    def to(self, device: torch.device | str) -> GaussianFit:
        """The same fit on ``device`` (statistics stay float64)."""
        return GaussianFit(self.mean.to(device), self.eigvals.to(device), self.eigvecs.to(device), self.residual,
                           self.event_shape)

    def covariance(self) -> Tensor:
        """The ``[D, D]`` covariance this fit stands for."""
        U = self.eigvecs
        eye = torch.eye(self.dim, dtype=U.dtype, device=U.device)
        return (U * self.eigvals) @ U.T + self.residual * (eye - U @ U.T)

    def as_field(self, path: Path, prediction: str = "velocity") -> GaussianMixture:
        """The exact field of this Gaussian (the "Gaussian score approximation"), an analytic Gaussian."""
        return Gaussian(self.mean, self.covariance(), path, prediction)

    @classmethod
    def from_moments(cls, mean: Tensor, cov: Tensor, *, rank: int | None = None, residual: float | None = None,
                     data_range: tuple[float, float] | None = None) -> GaussianFit:
        """A fit from a known mean ``[D]`` and covariance ``[D, D]`` (options as in :func:`fit_gaussian`)."""
        mean, cov = torch.as_tensor(mean, dtype=torch.float64), torch.as_tensor(cov, dtype=torch.float64)
        if mean.ndim != 1 or cov.shape != (mean.shape[0], mean.shape[0]):
            raise ShapeError(f"need mean [D] and cov [D, D]; got {tuple(mean.shape)} and {tuple(cov.shape)}")
        _check_options(mean.shape[0], rank, residual, data_range)
        lam, U = torch.linalg.eigh(0.5 * (cov + cov.T))
        return _finish(mean, lam.flip(0), U.flip(1), float(torch.trace(cov)), rank, residual, data_range,
                       (mean.shape[0],))


def _finish(mean: Tensor, lam: Tensor, U: Tensor, total: float, rank: int | None, residual: float | None,
            data_range: tuple[float, float] | None, event_shape: tuple[int, ...]) -> GaussianFit:
    """Truncate descending eigenpairs to ``rank``, set the residual variance, map ``data_range`` to [-1, 1]."""
    dim = mean.shape[0]
    lam = lam.clamp_min(0.0)
    k = min(rank if rank is not None else dim, lam.shape[0])
    kept = lam[:k]
    if residual is None:  # probabilistic PCA: the discarded variance spread evenly over the complement
        residual = max(total - float(kept.sum()), 0.0) / (dim - k) if k < dim else 0.0
    mean = mean.clone()
    if data_range is not None:
        lo, hi = (float(v) for v in data_range)
        scale, shift = 2.0 / (hi - lo), -(hi + lo) / (hi - lo)  # (0, 1) -> x' = 2 x - 1
        mean, kept, residual = scale * mean + shift, scale ** 2 * kept, scale ** 2 * residual
    return GaussianFit(mean, kept.clone(), U[:, :k].clone(), float(residual), tuple(event_shape))


def _check_options(dim: int, rank: int | None, residual: float | None,
                   data_range: tuple[float, float] | None) -> None:
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= dim):
        raise ConfigError(f"rank must be an integer in [1, {dim}] (the data dimension) or None; got {rank!r}")
    if rank is None and residual is not None:
        raise ConfigError(f"residual={residual} applies to a low-rank fit only; pass rank=k or drop residual")
    if residual is not None and not residual >= 0:
        raise ConfigError(f"residual variance must be >= 0; got {residual}")
    if data_range is not None and (len(data_range) != 2 or not float(data_range[0]) < float(data_range[1])):
        raise ConfigError(f"data_range must be (low, high) with low < high, e.g. (0, 1) for pixels; "
                          f"got {data_range!r}")


def fit_gaussian(data: Tensor, rank: int | None = None, data_range: tuple[float, float] | None = None, *,
                 residual: float | None = None) -> GaussianFit:
    """Fit mean and covariance of ``data [N, *event]`` (float64).

    rank: keep the top ``rank`` principal directions (``None``: full covariance). The complement gets
        variance ``residual`` (default: the mean discarded eigenvalue; 0 reproduces Wang & Vastola).
    data_range: the range ``(low, high)`` the data lives in; the fit is mapped to ``[-1, 1]``, so
        ``(0, 1)`` gives mean ``2 m - 1`` and covariance ``4 C``. ``None``: no mapping.
    Uses the ``D x D`` covariance when ``N > D`` and an SVD of the centred data otherwise.
    """
    if not torch.is_tensor(data) or data.ndim < 2 or data.shape[0] < 2:
        raise ShapeError(f"data must be a tensor [N, *event] with N >= 2; got {getattr(data, 'shape', data)!r}")
    x = data.reshape(data.shape[0], -1).to(torch.float64)
    _check_options(x.shape[1], rank, residual, data_range)
    if not torch.isfinite(x).all():
        raise DataError("data contains NaN or inf; clean it before fitting the Gaussian")
    if data_range is not None:
        lo, hi = (float(v) for v in data_range)
        slack = 1e-6 * (hi - lo)
        if x.min() < lo - slack or x.max() > hi + slack:
            raise DataError(f"data spans [{float(x.min()):.4g}, {float(x.max()):.4g}], outside "
                            f"data_range={data_range}. If it is already in the model's range (e.g. [-1, 1]) "
                            "pass data_range=None.")
    n, dim = x.shape
    mean = x.mean(0)
    xc = x - mean
    total = float(xc.square().sum()) / (n - 1)
    if n > dim:
        lam, U = torch.linalg.eigh(xc.T @ xc / (n - 1))
        lam, U = lam.flip(0), U.flip(1)
    else:  # at most n - 1 nonzero eigenvalues; the rest are exactly 0
        _, sv, vh = torch.linalg.svd(xc, full_matrices=False)
        lam, U = sv.square() / (n - 1), vh.T
        if rank is not None and rank > n:
            raise ConfigError(f"rank={rank} exceeds the {n} samples (at most {n - 1} directions have variance); "
                              "use a smaller rank or more data")
        if rank is None:  # the empirical covariance exactly: its n eigenpairs and 0 elsewhere
            rank, residual = n, 0.0
    return _finish(mean, lam, U, total, rank, residual, data_range, tuple(data.shape[1:]))


class GaussianFlowMap:
    """The closed-form probability-flow map of a :class:`GaussianFit` under ``path``:
    ``flow(x [B, *event], t, s) -> x_s`` (``t``, ``s`` floats or ``[B]``). A genkit FlowMap."""

    def __init__(self, gaussian: GaussianFit, path: Path):
        if not isinstance(gaussian, GaussianFit):
            raise ConfigError(f"need a GaussianFit (from fit_gaussian); got {type(gaussian).__name__}")
        if not isinstance(path, Path):
            raise ConfigError(f"path must be a genkit Path (use genkit.get_path(name)); got {path!r}")
        self.gaussian, self.path = gaussian, path

    def __call__(self, x: Tensor, t: Tensor | float, s: Tensor | float, **cond: Any) -> Tensor:
        if cond:
            raise ConfigError(f"the Gaussian flow map takes no conditioning; got {sorted(cond)}")
        g = self.gaussian
        if x.ndim < 2 or x[0].numel() != g.dim:
            raise ShapeError(f"x must be [batch, *{g.event_shape}] ({g.dim} numbers per sample); "
                             f"got {tuple(x.shape)}")
        y = x.reshape(x.shape[0], -1).to(torch.float64)
        if x.device != g.mean.device:
            raise ShapeError(f"x is on {x.device} but the Gaussian fit on {g.mean.device}; use fit.to(x.device)")
        a_t, s_t, a_s, s_s = (f(broadcast_time(v, y))[:, None]
                              for v in (t, s) for f in (self.path.alpha, self.path.sigma))
        partial = g.rank < g.dim
        lam = torch.cat([g.eigvals, g.eigvals.new_tensor([g.residual] if partial else [])])  # [k (+1)]
        var_t = a_t ** 2 * lam + s_t ** 2
        if (var_t == 0).any():
            raise ConfigError("the flow starts at a time where a direction has zero variance (t = 0 with a "
                              "zero eigenvalue or residual); start it at t > 0")
        scale = torch.sqrt((a_s ** 2 * lam + s_s ** 2) / var_t)  # [B, k (+1)]
        y = y - a_t * g.mean
        c = y @ g.eigvecs  # coordinates along the kept eigenvectors, [B, k]
        out = a_s * g.mean + (c * scale[:, :g.rank]) @ g.eigvecs.T
        if partial:
            out = out + scale[:, g.rank:] * (y - c @ g.eigvecs.T)
        return out.to(x.dtype).reshape(x.shape)


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
