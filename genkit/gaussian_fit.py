"""Gaussian fits of data and their closed-form probability-flow map (ground truth beside :mod:`genkit.analytic`).

Wang & Vastola, "The Unreasonable Effectiveness of Gaussian Score Approximation for Diffusion Models
and its Applications" (TMLR 2024, arXiv 2412.09726). The Gaussian ``N(m, C)`` with the data's mean and
covariance has a closed-form probability-flow ODE under every affine path ``x_t = alpha x_0 + sigma eps``.
With ``C = U diag(lam) U^T``, ``y = x_t - alpha_t m``::

    x_s = alpha_s m + U diag(sqrt((alpha_s^2 lam + sigma_s^2) / (alpha_t^2 lam + sigma_t^2))) U^T y
          + sqrt((alpha_s^2 delta + sigma_s^2) / (alpha_t^2 delta + sigma_t^2)) (I - U U^T) y

A low-rank fit keeps the top ``rank`` eigenvectors and treats the orthogonal complement as isotropic
with variance ``delta``: by default the mean discarded eigenvalue (probabilistic PCA), or ``delta = 0``
for the paper's code, where the complement scales by ``sigma_s / sigma_t``.

Data range: image statistics are often computed on ``[0, 1]`` pixels while the networks see
``[-1, 1]``. ``data_range=(0, 1)`` maps the statistics explicitly (mean ``2 m - 1``, covariance
``4 C``); ``data_range=None`` takes the data as already in the model's range.

>>> import torch
>>> from genkit.paths import get_path
>>> data = torch.randn(5000, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 0.5 + 1.0
>>> fit = fit_gaussian(data)
>>> x1 = torch.randn(4, 3, dtype=torch.float64)
>>> exact = fit.as_field(get_path("linear")).exact_flow(x1, 1.0, 0.3)
>>> bool(torch.allclose(GaussianFlowMap(fit, get_path("linear"))(x1, 1.0, 0.3), exact, atol=1e-10))
True
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .analytic import Gaussian, GaussianMixture
from .errors import ConfigError, DataError, ShapeError
from .paths import Path, broadcast_time

__all__ = ["GaussianFit", "fit_gaussian", "GaussianFlowMap"]


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
