"""Bracketed root finding for monotone elementwise maps, with implicit gradients.

``bracketed_inverse(f, y, lo, hi)`` solves ``f(x) = y`` elementwise for an increasing ``f`` on
``[lo, hi]`` by safeguarded Newton (a Newton step is taken only when it stays inside the current
bracket, otherwise bisection), stopping when ``|f(x) - y| <= tol`` (default 1e-12 in float64, 1e-6
otherwise) or the bracket is narrower than ``tol``, so ``|x - f^{-1}(y)| <= tol * max(1, 1 / min f')``.
A ``y`` outside ``[f(lo) - tol, f(hi) + tol]`` is a SolverError. ``InverseFunction`` wraps the solve in an autograd
Function whose backward uses the inverse function theorem, ``dx/dy = 1 / f'(x)`` and
``dx/dtheta = -(df/dtheta) / f'(x)``, instead of backpropagating through the iterations; the backward is
itself differentiable (double backward, e.g. forces of a density evaluated through an inverse).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from genkit.errors import SolverError


def bracketed_inverse(f: Callable[[Tensor], tuple[Tensor, Tensor]], y: Tensor, lo: float, hi: float,
                      *, tol: float | None = None, max_iter: int = 100) -> Tensor:
    """Solve ``f(x) = y`` for increasing ``f``; ``f`` returns ``(value, derivative)`` elementwise."""
    if not lo < hi:
        raise SolverError(f"bracket needs lo < hi, got lo={lo}, hi={hi}; pass an increasing interval")
    if tol is None:
        tol = 1e-12 if y.dtype == torch.float64 else 1e-6
    a = torch.full_like(y, lo)
    b = torch.full_like(y, hi)
    f_lo, f_hi = f(a)[0], f(b)[0]
    out = (y < f_lo - tol) | (y > f_hi + tol) | ~torch.isfinite(y)
    if bool(out.any()):
        i = int(out.flatten().nonzero()[0, 0])
        raise SolverError(f"bracketed_inverse: y = {float(y.flatten()[i])} is outside the range "
                          f"[{float(f_lo.flatten()[i])}, {float(f_hi.flatten()[i])}] that f takes on "
                          f"[{lo}, {hi}]; pass y inside f's range (or widen the bracket)")
    x = 0.5 * (a + b)
    for _ in range(max_iter):
        fx, dfx = f(x)
        r = fx - y
        if bool(((r.abs() <= tol) | (b - a <= tol)).all()):
            return x
        a = torch.where(r < 0, x, a)
        b = torch.where(r > 0, x, b)
        newton = x - r / dfx.clamp_min(torch.finfo(y.dtype).tiny)
        ok = (newton > a) & (newton < b) & torch.isfinite(newton)
        x = torch.where(ok, newton, 0.5 * (a + b))
    raise SolverError(f"bracketed_inverse did not reach tol={tol} in {max_iter} iterations; "
                      "raise max_iter or tol, or check that f is increasing on [lo, hi]")


class InverseFunction(torch.autograd.Function):
    """x = f^{-1}(y; theta) with implicit gradients; ``f(x, theta) -> (value, dvalue/dx)``."""

    @staticmethod
    def forward(ctx, f, y, lo, hi, tol, *theta):
        with torch.no_grad():
            x = bracketed_inverse(lambda z: f(z, *theta), y, lo, hi, tol=tol)
        ctx.f = f
        ctx.save_for_backward(x, *theta)
        return x

    @staticmethod
    def backward(ctx, gx):
        x, *theta = ctx.saved_tensors
        create = torch.is_grad_enabled()  # a double backward (create_graph=True) is asked for
        with torch.enable_grad():
            if create:
                # keep x's graph (it depends on y and theta through this Function) and take the partial
                # derivative in theta through aliases, so the result is itself differentiable
                xs, th = x, [t.view_as(t) if t.requires_grad else t for t in theta]
            else:
                xs, th = x.detach(), [t.detach().requires_grad_(t.requires_grad) for t in theta]
            val, dval = ctx.f(xs, *th)
            gy = gx / dval
            need = [t for t in th if t.requires_grad]
            grads = torch.autograd.grad(val, need, -gy, allow_unused=True, create_graph=create) if need else []
        it = iter(grads)
        gtheta = [next(it) if t.requires_grad else None for t in th]
        return (None, gy if create else gy.detach(), None, None, None, *gtheta)


def inverse(f, y: Tensor, lo: float, hi: float, *theta: Tensor, tol: float | None = None) -> Tensor:
    """Differentiable ``f^{-1}(y; theta)`` on ``[lo, hi]`` (see ``InverseFunction``)."""
    return InverseFunction.apply(f, y, lo, hi, tol, *theta)
