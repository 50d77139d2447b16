"""Circular rational-quadratic splines and coupling transforms on the torus ``[-pi, pi)^D``.

:func:`circular_rq_spline` (Rezende et al. 2020, "Normalizing Flows on Tori and Spheres", arXiv:2002.02428;
Durkan et al.'s RQ spline with ``bound = pi``) maps ``-pi -> -pi`` and ``pi -> pi`` with one *learned*
derivative shared by both ends, then rotates by a learned offset and wraps back to ``[-pi, pi)``. Read on the
circle it is a diffeomorphism: value (mod 2 pi) and derivative agree at the seam. :class:`CircularCoupling`
transforms half the angles with such splines, conditioned on ``cos`` and ``sin`` of the other half (so the
conditioner is periodic too). Angles outside ``[-pi, pi)`` are a DataError: wrap them with :func:`wrap`.

>>> import torch
>>> g = torch.Generator().manual_seed(0)
>>> w, h, d, b, o = (torch.randn(3, k, generator=g, dtype=torch.float64) for k in (6, 6, 5, 1, 1))
>>> seam = torch.tensor([-math.pi, math.nextafter(math.pi, 0), 0.5], dtype=torch.float64)
>>> y, ld = circular_rq_spline(seam, w[:1], h[:1], d[:1], b[:1, 0], o[:1, 0])
>>> bool(wrap(y[1] - y[0]).abs() < 1e-12), bool((ld[1] - ld[0]).abs() < 1e-12)
(True, True)
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ...errors import DataError, ShapeError
from .splines import DEFAULT_MIN_DERIVATIVE, DEFAULT_MIN_HEIGHT, DEFAULT_MIN_WIDTH, _check_options, rq_spline
from .transforms import FLOW_TRANSFORMS, Transform, _check_features, _mlp, _randomise

__all__ = ["wrap", "check_angles", "circular_rq_spline", "CircularCoupling"]


def wrap(x: Tensor) -> Tensor:
    """Angles wrapped to ``[-pi, pi)`` (never exactly ``pi``, also after rounding); gradient 1."""
    r = torch.remainder(x + math.pi, 2 * math.pi)
    r = torch.where(r >= 2 * math.pi, r - 2 * math.pi, r)  # remainder of a tiny negative can round to 2 pi
    return r - math.pi


def check_angles(x: Tensor, what: str = "circular flows") -> None:
    """DataError unless every entry of ``x`` lies in ``[-pi, pi)``, naming the first bad value and the fix."""
    ok = (x >= -math.pi) & (x < math.pi)
    if not bool(ok.all()):
        bad = x.detach()[~ok].flatten()[0].item()
        raise DataError(f"{what} take angles in [-pi, pi); got {bad}; wrap the data first, e.g. "
                        "genkit.models.flows.circular.wrap(x) (= torch.remainder(x + pi, 2 * pi) - pi)")


def circular_rq_spline(x: Tensor, widths: Tensor, heights: Tensor, derivatives: Tensor,
                       boundary_derivative: Tensor | None = None, offset: Tensor | None = None, *,
                       inverse: bool = False, min_width: float = DEFAULT_MIN_WIDTH,
                       min_height: float = DEFAULT_MIN_HEIGHT,
                       min_derivative: float = DEFAULT_MIN_DERIVATIVE) -> tuple[Tensor, Tensor]:
    """Periodic RQ spline on ``[-pi, pi)``; returns ``(y, log|dy/dx|)`` as :func:`rq_spline` does.

    ``widths``, ``heights`` ``[..., K]`` and ``derivatives`` ``[..., K - 1]`` are unnormalised as in
    :func:`rq_spline`; ``boundary_derivative`` ``[...]`` (unnormalised, floored softplus; default: derivative 1)
    is the derivative at both ``-pi`` and ``pi``; ``offset`` ``[...]`` a rotation added after the spline
    (before the wrap). ``inverse`` applies the inverse map (rotate back, wrap, inverse spline).
    """
    check_angles(x)
    bd = None
    if boundary_derivative is not None:
        if boundary_derivative.shape != widths.shape[:-1]:
            raise ShapeError(f"boundary_derivative must have the parameters' batch shape {tuple(widths.shape[:-1])} "
                             f"(one per spline); got {tuple(boundary_derivative.shape)}")
        bd = boundary_derivative.unsqueeze(-1).expand(*boundary_derivative.shape, 2)
    kw = dict(bound=math.pi, min_width=min_width, min_height=min_height, min_derivative=min_derivative,
              boundary_derivatives=bd)
    if inverse:
        z = x if offset is None else wrap(x - offset)
        out, ld = rq_spline(z, widths, heights, derivatives, inverse=True, **kw)
        return wrap(out), ld  # the float below pi can map back to pi itself where the seam is steep
    y, ld = rq_spline(x, widths, heights, derivatives, **kw)
    return wrap(y if offset is None else y + offset), ld


@FLOW_TRANSFORMS.register("circular_coupling")
class CircularCoupling(Transform):
    """Coupling layer on the torus: the angles of one half (``parity`` 0: the first ``features // 2``) pass
    unchanged and condition, through an MLP on their ``cos`` and ``sin`` (and the context), a circular RQ spline
    on each of the others, with a learned boundary derivative and (``rotation=True``) a learned rotation. Per
    transformed angle the conditioner emits ``3 * bins + 1`` numbers. Inputs in both directions must lie in
    ``[-pi, pi)``.

    >>> t = CircularCoupling(2, bins=4)
    >>> x = torch.tensor([[0.5, -3.0], [-math.pi, 1.0]])
    >>> y, ld = t(x)
    >>> x2, ld2 = t.inverse(y)
    >>> bool((wrap(x2 - x)).abs().max() < 1e-5), bool((ld + ld2).abs().max() < 1e-5)
    (True, True)
    """

    domain = "circle"

    def __init__(self, features: int, context_features: int = 0, *, bins: int = 8, hidden: int = 64,
                 layers: int = 2, parity: int = 0, rotation: bool = True):
        super().__init__()
        _check_features("CircularCoupling", features, 2)
        _check_options(bins, math.pi, DEFAULT_MIN_WIDTH, DEFAULT_MIN_HEIGHT, DEFAULT_MIN_DERIVATIVE)
        self.features, self.context_features, self.parity = features, context_features, parity % 2
        self.bins, self.rotation = bins, bool(rotation)
        idx = torch.arange(features)
        cond = idx < features // 2 if self.parity == 0 else idx >= features - features // 2
        self.register_buffer("cond_idx", idx[cond], persistent=False)
        self.register_buffer("trans_idx", idx[~cond], persistent=False)
        n_in = 2 * len(self.cond_idx) + context_features
        self.net = _mlp(n_in, len(self.trans_idx) * (3 * bins + 1), hidden, layers)

    def _run(self, x: Tensor, context: Tensor | None, inverse: bool) -> tuple[Tensor, Tensor]:
        self._check(x, context)
        check_angles(x, type(self).__name__)
        xc = x[:, self.cond_idx]
        feats = [torch.cos(xc), torch.sin(xc)] + ([context] if self.context_features else [])
        k = self.bins
        p = self.net(torch.cat(feats, dim=1)).to(x.dtype)  # x's precision under autocast too
        p = p.view(x.shape[0], len(self.trans_idx), 3 * k + 1)
        w, h, d, bd, off = p[..., :k], p[..., k:2 * k], p[..., 2 * k:3 * k - 1], p[..., 3 * k - 1], p[..., 3 * k]
        z, ld = circular_rq_spline(x[:, self.trans_idx], w, h, d, bd, off if self.rotation else None,
                                   inverse=inverse)
        out = x.clone()
        out[:, self.trans_idx] = z
        return out, ld.sum(1)

    @classmethod
    def example(cls) -> tuple[CircularCoupling, Tensor, Tensor | None]:
        t = cls(3, 2, bins=5, hidden=8, layers=2).double()
        _randomise(t, 0)
        g = torch.Generator().manual_seed(1)
        x = (2 * torch.rand(5, 3, generator=g, dtype=torch.float64) - 1) * math.pi
        return t, x, torch.randn(5, 2, generator=g, dtype=torch.float64)
