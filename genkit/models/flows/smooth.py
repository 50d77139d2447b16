"""Smooth (C-infinity) mixture transforms on ``[0, 1]`` and on the circle (Köhler, Krämer, Noé 2021,
"Smooth Normalizing Flows", arXiv:2110.00351).

Building block: the bump-function sigmoid ``sigma(z) = r(z) / (r(z) + r(1 - z))`` with the smooth ramp
``r(z) = exp(-alpha / z)`` (``z > 0``, else 0), i.e. ``sigmoid(alpha (1 / (1 - z) - 1 / z))`` on ``(0, 1)``, 0 below
and 1 above, flat to all orders at both ends. Each component is ``sigma(a (u - b) + 1/2)`` with ``a >= 1`` and
``b in (0, 1)``; on the interval it is rescaled to map ``0 -> 0`` and ``1 -> 1``, on the circle its lift
``L(u) = sum_n sigma(a (u - b - n) + 1/2) - [n < 0]`` (``L(u + 1) = L(u) + 1``; ``n in {-1, 0, 1}`` is exact for
``a >= 1``) gives ``g(u) = L(u) - L(0)``, whose derivatives of every order agree at 0 and 1. The map is
``f(u) = (1 - c) sum_k w_k g_k(u) + c u`` with softmax weights ``w`` and ``c in [min_slope, 1)``, so
``f' >= min_slope > 0``. On the circle angles ``theta in [-pi, pi)`` are read as ``u = (theta + pi) / 2 pi`` and
the result is rotated by a learned offset and wrapped.

The forward map and ``log f'`` are analytic. The inverse solves ``f(u) = v`` with :mod:`.roots`' bracketed
safeguarded Newton on ``[0, 1]`` to ``|f(u) - v| <= tol`` (default ``1e-14`` in float64, ``1e-6`` in float32;
so ``|u - f^{-1}(v)| <= tol / min_slope``), and its gradients come from the inverse function theorem, not from
the iterations. Conditioners use SiLU MLPs, so the whole transform (and the flow's force) is smooth.

>>> import torch
>>> p = torch.randn(4, 3 * 5 + 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
>>> u = torch.tensor([0.0, 0.3, 0.7, 1.0], dtype=torch.float64)
>>> v, dv = smooth_unit_map(u, p)
>>> u2 = smooth_unit_inverse(v, p)
>>> bool((u2 - u).abs().max() < 1e-12), float(v[0]), float(v[3])
(True, 0.0, 1.0)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...errors import ConfigError, DataError, ShapeError
from .circular import check_angles, wrap
from .roots import inverse as root_inverse
from .transforms import FLOW_TRANSFORMS, Transform, _check_features, _randomise

__all__ = ["bump_sigmoid", "smooth_unit_map", "smooth_unit_inverse", "SmoothCoupling", "CircularSmoothCoupling",
           "DEFAULT_MIN_SLOPE"]

DEFAULT_MIN_SLOPE = 1e-2
_EXP_CUT = 700.0  # below z = alpha / 700 the ramp exp(-alpha / z) < 1e-304: 0 to float64 precision


def bump_sigmoid(z: Tensor, alpha: float = 1.0) -> tuple[Tensor, Tensor]:
    """``(sigma(z), sigma'(z))`` of the C-infinity bump-function sigmoid (0 for ``z <= 0``, 1 for ``z >= 1``).
    Points where the ramp is below 1e-304 are set to exactly 0 / 1 by ``torch.where`` on safe values, so values
    and all autograd derivatives stay finite."""
    cut = alpha / _EXP_CUT
    inside = (z > cut) & (z < 1 - cut)
    zs = torch.where(inside, z, torch.full_like(z, 0.5))
    t = alpha * (1 / (1 - zs) - 1 / zs)
    s = torch.sigmoid(t)
    ds = s * torch.sigmoid(-t) * alpha * (1 / (zs * zs) + 1 / ((1 - zs) * (1 - zs)))
    return torch.where(inside, s, (z >= 0.5).to(z.dtype)), torch.where(inside, ds, torch.zeros_like(ds))


def _split(params: Tensor, circle: bool, min_slope: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    n = params.shape[-1] - 1 - int(circle)
    if n < 3 or n % 3:
        raise ShapeError(f"smooth mixture parameters must be [..., 3 K + {1 + int(circle)}] (K weights, K slopes, "
                         f"K centres, 1 mixing{', 1 rotation' if circle else ''}); got last size {params.shape[-1]}")
    k = n // 3
    w = torch.softmax(params[..., :k], dim=-1)
    a = 1 + F.softplus(params[..., k:2 * k])
    b = torch.sigmoid(params[..., 2 * k:3 * k])
    c = min_slope + (1 - min_slope) * torch.sigmoid(params[..., 3 * k])
    return w, a, b, c


def smooth_unit_map(u: Tensor, params: Tensor, *, circle: bool = False, alpha: float = 1.0,
                    min_slope: float = DEFAULT_MIN_SLOPE) -> tuple[Tensor, Tensor]:
    """``(f(u), f'(u))`` of the smooth mixture on ``[0, 1]`` (``circle``: its periodic version), elementwise;
    ``params`` unnormalised, ``[..., 3 K + 1]`` (K weights, K slopes ``a``, K centres ``b``, the mixing ``c``), or
    ``[..., 3 K + 2]`` with ``circle`` (the last entry, the rotation, is applied by the transform, not here)."""
    w, a, b, c = _split(params, circle, min_slope)
    uu = u.unsqueeze(-1)
    if circle:
        # the lift's three sheaves n = -1, 0, 1 (last axis), at u and at 0 (second-last axis), in one call
        shift = torch.tensor([-1.0, 0.0, 1.0], dtype=u.dtype, device=u.device)
        ub, bb = torch.broadcast_tensors(uu, b)
        at = torch.stack([ub, torch.zeros_like(ub)], dim=-1)[..., None]
        s, ds = bump_sigmoid(a[..., None, None] * (at - bb[..., None, None] - shift) + 0.5, alpha)
        g = s[..., 0, :].sum(-1) - s[..., 1, :].sum(-1)
        der = a * ds[..., 0, :].sum(-1)
    else:
        s, ds = bump_sigmoid(a * (uu - b) + 0.5, alpha)
        s0, _ = bump_sigmoid(0.5 - a * b, alpha)
        s1, _ = bump_sigmoid(a * (1 - b) + 0.5, alpha)
        norm = s1 - s0  # > 0: sigma is 1/2 at u = b in (0, 1)
        g, der = (s - s0) / norm, a * ds / norm
    f = (1 - c) * (w * g).sum(-1) + c * u
    df = (1 - c) * (w * der).sum(-1) + c
    return f, df


def smooth_unit_inverse(v: Tensor, params: Tensor, *, circle: bool = False, alpha: float = 1.0,
                        min_slope: float = DEFAULT_MIN_SLOPE, tol: float | None = None) -> Tensor:
    """``f^{-1}(v)`` on ``[0, 1]`` by the bracketed root finder (tolerance as in the module docstring), with
    implicit-function-theorem gradients in ``v`` and ``params``."""
    if tol is None:
        tol = 1e-14 if v.dtype == torch.float64 else 1e-6

    def f(u: Tensor, p: Tensor) -> tuple[Tensor, Tensor]:
        return smooth_unit_map(u, p, circle=circle, alpha=alpha, min_slope=min_slope)

    return root_inverse(f, v, 0.0, 1.0, params, tol=tol)


def _smooth_mlp(n_in: int, n_out: int, hidden: int, layers: int) -> nn.Sequential:
    dims = [n_in] + [hidden] * layers
    mods: list[nn.Module] = []
    for i, o in zip(dims[:-1], dims[1:]):
        mods += [nn.Linear(i, o), nn.SiLU()]
    last = nn.Linear(dims[-1], n_out)
    nn.init.zeros_(last.weight)
    nn.init.zeros_(last.bias)
    return nn.Sequential(*mods, last)


def _check_unit(x: Tensor, what: str) -> None:
    ok = (x >= 0) & (x <= 1)
    if not bool(ok.all()):
        bad = x.detach()[~ok].flatten()[0].item()
        raise DataError(f"{what} takes values in [0, 1]; got {bad}; rescale the data first, e.g. "
                        "(x - low) / (high - low) for data in a known box [low, high]")


@FLOW_TRANSFORMS.register("smooth_coupling")
class SmoothCoupling(Transform):
    """C-infinity coupling layer on ``[0, 1]^features`` (``domain="interval"``) or, as
    :class:`CircularSmoothCoupling`, on the torus ``[-pi, pi)^features``: one half of the features (``parity``
    0: the first ``features // 2``) conditions, through a SiLU MLP (with the context), a smooth mixture of
    ``components`` bump-function sigmoids on each of the others. ``forward`` is analytic; ``inverse`` uses the
    bracketed root finder (``tol``, default 1e-14 in float64) with implicit gradients.

    >>> t = SmoothCoupling(2, components=4)
    >>> x = torch.tensor([[0.2, 0.9], [1.0, 0.0]], dtype=torch.float64)
    >>> t = t.double(); y, ld = t(x); x2, ld2 = t.inverse(y)
    >>> bool((x2 - x).abs().max() < 1e-12), bool((ld + ld2).abs().max() < 1e-12)
    (True, True)
    """

    domain = "interval"

    def __init__(self, features: int, context_features: int = 0, *, components: int = 8, hidden: int = 64,
                 layers: int = 2, parity: int = 0, alpha: float = 1.0, min_slope: float = DEFAULT_MIN_SLOPE,
                 tol: float | None = None):
        super().__init__()
        _check_features(type(self).__name__, features, 2)
        if not (isinstance(components, int) and components >= 1):
            raise ConfigError(f"{type(self).__name__} needs components >= 1; got {components!r}")
        if not (0 < alpha <= 10):
            raise ConfigError(f"alpha (the ramp's sharpness) must be in (0, 10]; got {alpha!r}; pass e.g. 1.0")
        if not (0 < min_slope < 1):
            raise ConfigError(f"min_slope must be in (0, 1) (a lower bound on f'); got {min_slope!r}; pass e.g. 1e-2")
        self.features, self.context_features, self.parity = features, context_features, parity % 2
        self.components, self.alpha, self.min_slope, self.tol = components, float(alpha), float(min_slope), tol
        self.circle = self.domain == "circle"
        idx = torch.arange(features)
        cond = idx < features // 2 if self.parity == 0 else idx >= features - features // 2
        self.register_buffer("cond_idx", idx[cond], persistent=False)
        self.register_buffer("trans_idx", idx[~cond], persistent=False)
        n_in = (2 if self.circle else 1) * len(self.cond_idx) + context_features
        self.per = 3 * components + 1 + int(self.circle)
        self.net = _smooth_mlp(n_in, len(self.trans_idx) * self.per, hidden, layers)

    def _run(self, x: Tensor, context: Tensor | None, inverse: bool) -> tuple[Tensor, Tensor]:
        self._check(x, context)
        if self.circle:
            check_angles(x, type(self).__name__)
        else:
            _check_unit(x, type(self).__name__)
        xc = x[:, self.cond_idx]
        feats = [torch.cos(xc), torch.sin(xc)] if self.circle else [2 * xc - 1]
        if self.context_features:
            feats.append(context)
        p = self.net(torch.cat(feats, dim=1)).to(x.dtype)  # x's precision under autocast too
        p = p.view(x.shape[0], len(self.trans_idx), self.per)
        kw = dict(circle=self.circle, alpha=self.alpha, min_slope=self.min_slope)
        xt = x[:, self.trans_idx]
        if self.circle:
            rot = p[..., -1]
            if inverse:
                v = (wrap(xt - rot) + math.pi) / (2 * math.pi)
                u = smooth_unit_inverse(v, p, tol=self.tol, **kw)
                z, dz = wrap(2 * math.pi * u - math.pi), smooth_unit_map(u, p, **kw)[1]
            else:
                v, dz = smooth_unit_map((xt + math.pi) / (2 * math.pi), p, **kw)
                z = wrap(2 * math.pi * v - math.pi + rot)
        elif inverse:
            z = smooth_unit_inverse(xt, p, tol=self.tol, **kw)
            dz = smooth_unit_map(z, p, **kw)[1]
        else:
            z, dz = smooth_unit_map(xt, p, **kw)
        ld = torch.log(dz).sum(1)
        out = x.clone()
        out[:, self.trans_idx] = z
        return out, -ld if inverse else ld

    @classmethod
    def example(cls) -> tuple[SmoothCoupling, Tensor, Tensor | None]:
        t = cls(3, 2, components=4, hidden=8, layers=2).double()
        _randomise(t, 0)
        g = torch.Generator().manual_seed(1)
        x = torch.rand(5, 3, generator=g, dtype=torch.float64)
        if t.circle:
            x = (2 * x - 1) * math.pi
        return t, x, torch.randn(5, 2, generator=g, dtype=torch.float64)


@FLOW_TRANSFORMS.register("circular_smooth_coupling")
class CircularSmoothCoupling(SmoothCoupling):
    """:class:`SmoothCoupling` on the torus ``[-pi, pi)^features``: periodic smooth mixtures (value and every
    derivative agree at the seam) with a learned rotation, conditioned on ``cos`` / ``sin`` of the other angles.

    >>> t = CircularSmoothCoupling(2, components=4).double()
    >>> x = torch.tensor([[-math.pi, 3.0], [0.5, math.nextafter(math.pi, 0)]], dtype=torch.float64)
    >>> y, ld = t(x); x2, ld2 = t.inverse(y)
    >>> bool(wrap(x2 - x).abs().max() < 1e-12), bool((ld + ld2).abs().max() < 1e-12)
    (True, True)
    """

    domain = "circle"
