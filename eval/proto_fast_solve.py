"""PROTOTYPE (not library code) of three changes proposed for ``genkit/paths.py``, ``genkit/solvers/fixed.py``
and ``Diffusion.net_input``, kept here so that ``bench_sampling_overhead.py --prototype`` can measure them.
Delete it once they land. Checked against the library: coefficients bit-equal; conversion maps equal to
``Path.convert`` to 3e-15 (float64, all 25 pairs, ddpm/cosine/linear/ve); solves equal to 8e-7 relative
(float32; euler, heun, midpoint, rk4 at 10 and 50 steps).

1. ``paths.py``: ``Path.coefficients`` evaluates the float64 schedule once per *distinct* time: solvers pass
   one time for the whole batch (``broadcast_time`` of a 0-d tensor is an ``expand``, stride 0), so it is
   computed on one element and expanded, instead of on ``batch`` float64 elements; and a path computes its
   four functions in one pass (``_coefficients64``), so ``ddpm`` evaluates ``lgamma``/``digamma`` once
   instead of 5 and 2 times.
2. ``solvers/fixed.py``: every conversion between parametrizations is affine in ``(x, out)`` with
   coefficients that depend on ``t`` only: ``convert(out, x, t, src, dst) = cx(t) x + cout(t) out``.
   ``RungeKutta.solve`` computes ``cx, cout`` for all stage times of the grid at once, in float64, once per
   solve (one host transfer), calls the field in its own parametrization and forms the velocity with one
   fused op, instead of going through ``FieldView`` (two more ``coefficients`` calls and ~6 tensor ops
   per evaluation). Euler folds the conversion into its update: ``x <- (1 + h cx) x + h cout out``.
3. ``paths.py`` + ``models/diffusion.py``: a path declares ``variance_preserving`` (``ddpm``, ``cosine``), and
   ``Diffusion.net_input`` skips EDM's ``c_in = 1 / sqrt(alpha^2 sigma_data^2 + sigma^2)`` when it is 1
   analytically (variance preserving and ``sigma_data == 1``): it costs a schedule evaluation per call.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from genkit.fields import FieldView
from genkit.models import Diffusion
from genkit.paths import DDPMLinearPath, Path, broadcast_time
from genkit.solvers.base import Solution, check_finite_result
from genkit.solvers.fixed import RungeKutta

__all__ = ["FastCoefficients", "FastDDPMPath", "FastDiffusion", "conversion_coefficients", "fast_rk_solve"]


class FastCoefficients:
    """Mixin for a Path: proposal 1 (one evaluation per distinct time, one pass over the schedule)."""

    def _coefficients64(self, t: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return self._alpha(t), self._sigma(t), self._d_alpha(t), self._d_sigma(t)

    def coefficients(self, t: Tensor | float, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        t = broadcast_time(t, x)
        shape = (-1,) + (1,) * (x.ndim - 1)
        dtype = t.dtype if t.is_floating_point() else torch.get_default_dtype()
        if t.shape[0] > 1 and t.stride(0) == 0:  # one time for the batch: evaluate once, expand (a view)
            full = (t.shape[0],) + (1,) * (x.ndim - 1)
            return tuple(v.to(dtype).reshape(shape).expand(full)
                         for v in self._coefficients64(t[:1].to(torch.float64)))
        return tuple(v.to(dtype).reshape(shape) for v in self._coefficients64(t.to(torch.float64)))


class FastDDPMPath(FastCoefficients, DDPMLinearPath):
    """``ddpm`` with proposal 1: the same formulas as DDPMLinearPath, ``lgamma``/``digamma`` evaluated once,
    the constant ``lgamma(c + 1)`` computed once (the same float64 value), and flagged variance preserving."""

    variance_preserving = True  # alpha^2 + sigma^2 = 1 (proposal 3)

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._lgamma_c1 = float(torch.lgamma(torch.tensor(self._c + 1, dtype=torch.float64)))

    def _log_abar(self, t: Tensor) -> Tensor:
        u = self.num_steps * t - 1
        return (u + 1) * math.log(self._d) + self._lgamma_c1 - torch.lgamma(self._c - u)

    def _coefficients64(self, t: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        la, dla = self._log_abar(t), self._d_log_abar(t)
        alpha, sigma = torch.exp(0.5 * la), torch.sqrt(-torch.expm1(la))
        safe = torch.where(sigma > 0, sigma, torch.ones_like(sigma))
        d_sigma = torch.where(sigma > 0, -torch.exp(la) * dla / (2 * safe), torch.full_like(t, torch.inf))
        return alpha, sigma, 0.5 * dla * alpha, d_sigma


def _to_x0_eps_maps(a: Tensor, s: Tensor, da: Tensor, ds: Tensor, src: str) -> tuple[Tensor, ...]:
    """``(p1, p2, q1, q2)``: ``x0 = p1 x + p2 out`` and ``eps = q1 x + q2 out`` (Path.to_x0_eps in closed form)."""
    one, zero = torch.ones_like(a), torch.zeros_like(a)
    if src == "eps":
        return 1 / a, -s / a, zero, one
    if src == "score":
        return 1 / a, s * s / a, zero, -s
    if src == "x0":
        pos = s > 0
        safe = torch.where(pos, s, one)
        return zero, one, torch.where(pos, 1 / safe, zero), torch.where(pos, -a / safe, zero)
    if src == "velocity":
        det = a * ds - s * da
        return ds / det, -s / det, -da / det, a / det
    norm = a * a + s * s  # Salimans' v
    return a / norm, -s / norm, s / norm, a / norm


def _from_x0_eps_maps(a: Tensor, s: Tensor, da: Tensor, ds: Tensor, dst: str) -> tuple[Tensor, Tensor]:
    """``(r1, r2)``: ``dst = r1 x0 + r2 eps`` (Path.from_x0_eps in closed form)."""
    one, zero = torch.ones_like(a), torch.zeros_like(a)
    return {"eps": (zero, one), "x0": (one, zero), "velocity": (da, ds), "v": (-s, a), "score": (zero, -1 / s)}[dst]


def conversion_coefficients(path: Path, t: Tensor, src: str, dst: str) -> tuple[Tensor, Tensor]:
    """``(cx, cout)`` with ``path.convert(out, x, t, src, dst) == cx * x + cout * out`` (float64, shape of t).

    Every conversion is linear in ``(x, out)``; the schedule is evaluated once for all times and the two
    maps composed in closed form (the library would keep these maps next to ``to_x0_eps``/``from_x0_eps``
    and apply them there too, so that there is one source of truth).
    """
    coeffs = path._coefficients64(t.to(torch.float64))
    p1, p2, q1, q2 = _to_x0_eps_maps(*coeffs, src)
    r1, r2 = _from_x0_eps_maps(*coeffs, dst)
    return r1 * p1 + r2 * q1, r1 * p2 + r2 * q2


def fast_rk_solve(solver: RungeKutta, field: Any, x: Tensor, times: Tensor, **cond: Any) -> Solution:
    """``solver.solve(field, x, times)`` with proposal 2 (same tableau, same grid, same result to rounding)."""
    solver.check_steps(times)
    base = field.base if isinstance(field, FieldView) else field  # call the model in its own parametrization
    tab = solver.tableau
    ts = times.to(torch.float64).cpu()
    n, s = len(ts) - 1, len(tab.b)
    # grid, steps and stage times formed as the library forms them (in x's dtype); the conversion in float64
    tx = ts.to(x.dtype)
    hx = tx[1:] - tx[:-1]
    stage = tx[:-1, None] + torch.tensor(tab.c, dtype=x.dtype)[None, :] * hx[:, None]
    cx, cout = conversion_coefficients(field.path, stage.flatten(), base.prediction, "velocity")
    cx, cout, h = cx.tolist(), cout.tolist(), hx.tolist()  # the one host transfer of the solve
    t_dev = stage.flatten().to(x.device)  # one transfer; each stage time is a view, expanded to the batch
    batch = x.shape[0]
    for i in range(n):
        if s == 1 and tab.b[0] == 1:  # Euler: fold the conversion into the update, x <- A x + B out
            out = base(x, t_dev[i].expand(batch), **cond)
            x = torch.add(out * (h[i] * cout[i]), x, alpha=1 + h[i] * cx[i])
            continue
        ks: list[Tensor] = []
        for j in range(s):
            xj = x
            for m, a in enumerate(tab.a[j]):
                if a:
                    xj = torch.add(xj, ks[m], alpha=h[i] * a)
            q = i * s + j
            out = base(xj, t_dev[q].expand(batch), **cond)
            ks.append(torch.add(out * cout[q], xj, alpha=cx[q]))  # the velocity: cx x + cout out
        incr = None
        for b, k in zip(tab.b, ks):
            if b:
                incr = (k if b == 1 else k * b) if incr is None else torch.add(incr, k, alpha=b)
        x = torch.add(x, incr, alpha=h[i])
    check_finite_result(x, solver, times)
    return Solution(x, n * s, times, None)


class FastDiffusion(Diffusion):
    """Diffusion with proposal 3: no input scaling where it is the identity analytically."""

    def net_input(self, x: Tensor, t: Tensor) -> Tensor:
        if getattr(self.path, "variance_preserving", False) and self.sigma_data == 1.0:
            return x
        return super().net_input(x, t)
