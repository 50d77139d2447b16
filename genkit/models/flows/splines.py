"""Monotone rational-quadratic (RQ) splines with linear tails (Durkan et al. 2019, "Neural Spline Flows",
arXiv:1906.04032).

On ``[-bound, bound]`` the map is a monotone RQ spline through ``K + 1`` knots; outside it is the identity.
The two boundary derivatives are exactly 1, so the map is C^1 at ``+-bound``. Parameters come unnormalised
(any real numbers, e.g. a conditioner's output): widths and heights through a softmax with a floor, interior
derivatives through a softplus with a floor.

>>> import torch
>>> x = torch.tensor([-5.0, -1.0, 0.3, 3.0], dtype=torch.float64)
>>> g = torch.Generator().manual_seed(0)
>>> w, h, d = (torch.randn(4, k, generator=g, dtype=torch.float64) for k in (8, 8, 7))
>>> y, ld = rq_spline(x, w, h, d, bound=3.0)
>>> x2, ld2 = rq_spline(y, w, h, d, bound=3.0, inverse=True)
>>> bool((x2 - x).abs().max() < 1e-12), bool((ld + ld2).abs().max() < 1e-12), float(y[0]), float(y[3])
(True, True, -5.0, 3.0)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ...errors import ConfigError, ShapeError

__all__ = ["rq_spline", "spline_knots", "DEFAULT_MIN_WIDTH", "DEFAULT_MIN_HEIGHT", "DEFAULT_MIN_DERIVATIVE"]

DEFAULT_MIN_WIDTH = 1e-3
DEFAULT_MIN_HEIGHT = 1e-3
DEFAULT_MIN_DERIVATIVE = 1e-3


def _check_options(bins: int, bound: float, min_width: float, min_height: float, min_derivative: float) -> None:
    if not (isinstance(bound, int | float) and math.isfinite(bound) and bound > 0):
        raise ConfigError(f"spline bound must be a finite number > 0 (the spline acts on [-bound, bound]); "
                          f"got bound={bound!r}; pass e.g. bound=3.0")
    if bins < 1:
        raise ConfigError(f"a spline needs at least 1 bin; got {bins} unnormalised widths; pass bins >= 1")
    for name, value in (("min_width", min_width), ("min_height", min_height)):
        if not (0 <= value and bins * value < 1):
            raise ConfigError(f"bins * {name} must be < 1 (the bins must fit in the interval); got bins={bins}, "
                              f"{name}={value!r} (product {bins * value:g}); lower {name} below {1 / bins:g} "
                              f"or use fewer bins")
    if not min_derivative > 0:
        raise ConfigError(f"min_derivative must be > 0 for the spline to be strictly monotone; got "
                          f"{min_derivative!r}; pass e.g. 1e-3")


def spline_knots(unnormalised: Tensor, bound: float, minimum: float) -> Tensor:
    """Knot positions ``[..., K + 1]`` from unnormalised widths (or heights) ``[..., K]``: a floored softmax,
    cumulated and scaled to ``[-bound, bound]``, with the end knots set exactly to ``-bound`` and ``bound``.
    Built by concatenation: no tensor is edited in place."""
    k = unnormalised.shape[-1]
    frac = minimum + (1 - minimum * k) * _softmax(unnormalised)
    inner = 2 * bound * torch.cumsum(frac[..., :-1], dim=-1) - bound
    ends = frac.new_full((*frac.shape[:-1], 1), bound)
    return torch.cat([-ends, inner, ends], dim=-1)


def _softmax(u: Tensor) -> Tensor:
    """``softmax(u, dim=-1)`` written out: on the CPU torch's kernel is slow for a short last axis (a few bins:
    about 4x slower than this on a [1024, 8, 8] float32 tensor with torch 2.14); the result is the same to
    rounding."""
    e = torch.exp(u - u.detach().amax(dim=-1, keepdim=True))
    return e / e.sum(dim=-1, keepdim=True)


def _unit(xi: Tensor) -> Tensor:
    """Clamp rounding excursions to [0, 1] while keeping d/dxi = 1 (torch's clamp has gradient 0 at the
    ends, which would zero dy/dx exactly on the knots and at +-bound)."""
    return xi + (xi.clamp(0, 1) - xi).detach()


def _gather(t: Tensor, idx: Tensor) -> Tensor:
    return torch.gather(t, -1, idx).squeeze(-1)


def rq_spline(x: Tensor, widths: Tensor, heights: Tensor, derivatives: Tensor, *, bound: float = 3.0,
              inverse: bool = False, min_width: float = DEFAULT_MIN_WIDTH, min_height: float = DEFAULT_MIN_HEIGHT,
              min_derivative: float = DEFAULT_MIN_DERIVATIVE, boundary_derivatives: Tensor | None = None
              ) -> tuple[Tensor, Tensor]:
    """Apply the spline (or its inverse) elementwise.

    ``x``: ``[...]``; ``widths``, ``heights``: ``[..., K]``; ``derivatives``: ``[..., K - 1]`` (interior knots
    only; the boundary derivatives are 1). Parameters broadcast against ``x``. Returns ``(y, logabsdet)``, both
    shaped like ``x``; ``logabsdet`` is ``log |dy/dx|`` of the map applied (of the inverse when ``inverse``).
    ``boundary_derivatives`` (optional, unnormalised ``[..., 2]``, floored softplus like the interior ones) sets
    the derivatives at ``-bound`` and ``bound`` instead of 1 (the circular spline's; the map is then only C^0
    where it meets the identity tails).
    """
    k = widths.shape[-1]
    if heights.shape[-1] != k or derivatives.shape[-1] != k - 1:
        raise ShapeError(f"a {k}-bin spline needs widths [..., {k}], heights [..., {k}] and derivatives "
                         f"[..., {k - 1}]; got {tuple(widths.shape)}, {tuple(heights.shape)}, "
                         f"{tuple(derivatives.shape)}")
    _check_options(k, bound, min_width, min_height, min_derivative)
    shape = torch.broadcast_shapes(x.shape, widths.shape[:-1], heights.shape[:-1], derivatives.shape[:-1])
    if shape != x.shape:
        raise ShapeError(f"spline parameters of batch shape {tuple(widths.shape[:-1])} do not broadcast to the "
                         f"input's shape {tuple(x.shape)}; give one parameter set per input element")
    widths, heights = widths.expand(*shape, k), heights.expand(*shape, k)
    derivatives = derivatives.expand(*shape, k - 1)

    inside = (x >= -bound) & (x <= bound)
    # Outside points are evaluated at 0 and then discarded by torch.where, so their branch is finite and routes
    # no gradient to the spline parameters (a clamp would also zero d/dx exactly at +-bound).
    xc = torch.where(inside, x, torch.zeros_like(x))
    cw = spline_knots(widths, bound, min_width)
    ch = spline_knots(heights, bound, min_height)
    if boundary_derivatives is None:
        left = right = derivatives.new_ones(*shape, 1)
    else:
        if boundary_derivatives.shape[-1] != 2:
            raise ShapeError(f"boundary_derivatives must be [..., 2] (at -bound and bound); got "
                             f"{tuple(boundary_derivatives.shape)}")
        left, right = (min_derivative + F.softplus(boundary_derivatives.expand(*shape, 2))).split(1, dim=-1)
    # softplus on a strided slice of a conditioner's output is several times slower than on a copy (CPU)
    d = torch.cat([left, min_derivative + F.softplus(derivatives.contiguous()), right], dim=-1)

    knots = ch if inverse else cw
    # searchsorted reads the knots and writes nothing; x exactly at +bound falls in the last bin by the clamp.
    idx = torch.searchsorted(knots.contiguous(), xc.unsqueeze(-1).contiguous(), right=True) - 1
    idx = idx.clamp(0, k - 1)
    xk, x1 = _gather(cw, idx), _gather(cw, idx + 1)
    yk, y1 = _gather(ch, idx), _gather(ch, idx + 1)
    dk, d1 = _gather(d, idx), _gather(d, idx + 1)
    wk, hk = x1 - xk, y1 - yk
    s = hk / wk

    if inverse:
        dy = xc - yk
        mix = dk + d1 - 2 * s
        a = dy * mix + hk * (s - dk)
        b = hk * dk - dy * mix
        c = -s * dy
        disc = (b * b - 4 * a * c).clamp_min(0)  # can dip below 0 by rounding in float32 near knots
        xi = _unit(2 * c / (-b - disc.sqrt()))  # the root that does not cancel
        out = xk + xi * wk
    else:
        xi = _unit((xc - xk) / wk)
    t = xi * (1 - xi)
    den = s + (dk + d1 - 2 * s) * t
    if not inverse:
        out = yk + hk * (s * xi * xi + dk * t) / den
    dnum = s * s * (d1 * xi * xi + 2 * s * t + dk * (1 - xi) * (1 - xi))
    logdet = torch.log(dnum) - 2 * torch.log(den)
    if inverse:
        logdet = -logdet
    y = torch.where(inside, out, x)
    return y, torch.where(inside, logdet, torch.zeros_like(logdet))
