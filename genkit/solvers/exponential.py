"""Fast diffusion solvers: exponential integrators on the data prediction, in log-SNR time.

With ``lambda = log(alpha / sigma)`` (half the log-SNR) the probability-flow ODE has the exact solution
``x_s = (sigma_s / sigma_t) x_t + sigma_s int_{lambda_t}^{lambda_s} e^{l} x0(l) dl``; the solvers below
differ in how they approximate ``x0`` over the step:

- ``ddim``: ``x0`` constant (Song et al. 2021, arXiv 2010.02502; DPM-Solver++ order 1), order 1.
- ``dpmpp_2m`` / ``dpmpp_3m``: multistep extrapolation of past ``x0`` (Lu et al. 2022, arXiv 2211.01095).
- ``unipc``: UniPC's predictor-corrector with the ``B(h) = e^h - 1`` ("bh2") variant (Zhao et al. 2023,
  arXiv 2302.04867); the corrector reuses the next step's evaluation and raises the order by one.
- ``deis``: variable-step Adams-Bashforth on ``eps`` in the VE-equivalent coordinates
  ``y = x / alpha``, ``rho = sigma / alpha`` (DEIS's rho-AB, Zhang & Chen 2023, arXiv 2204.13902).

``order`` is the *global* convergence order the tests measure, warm-up included: multistep methods
start with a first-order step (as diffusers does), whose local error ``O(h^2)`` caps the global order at
2 for the third-order multistep formulas (``dpmpp_3m``, ``deis`` with ``order=3``); their third-order
terms still shrink the error constant. UniPC's first step is corrected, so UniPC-2 reaches order 3.

All accept any grid and path (``linear``, ``cosine``, ``ddpm``, ``ve``), so flow-matching models use them
too. Where a grid ends at ``sigma = 0`` the last step is first order (its log-SNR step is infinite), as in
diffusers. ``lower_order_final=True`` (default, as diffusers) also lowers the order of the final steps when
the grid has fewer than 15 steps. Multistep history travels in the explicit ``SolverState.memory``: solvers
keep no state.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..errors import ConfigError
from ..fields import Field, FieldView, LimitedX0, as_eps, as_x0
from .base import SOLVERS, Solver, SolverState, apply_map, prepared, unwrap

__all__ = ["ExponentialSolver", "DDIM", "DPMSolverPP2M", "DPMSolverPP3M", "UniPC", "DEIS"]


def _schedule(field: Field, times: Tensor) -> tuple[list[float], list[float], list[float]]:
    """``alpha``, ``sigma`` and ``lambda = log(alpha/sigma)`` at the grid times (float64, as Python floats:
    the per-step arithmetic is scalar)."""
    t = times.to(torch.float64).cpu()
    a, s = field.path.alpha(t), field.path.sigma(t)
    return a.tolist(), s.tolist(), (torch.log(a) - torch.log(s)).tolist()


def _time_batches(times: Tensor, x: Tensor) -> tuple[Tensor, ...]:
    """Each time as a ``[batch]`` tensor in ``x``'s dtype and device (views of one expanded tensor), built once per
    solve so that a step does no time conversion."""
    return times.to(device=x.device, dtype=x.dtype)[:, None].expand(-1, x.shape[0]).unbind(0)


class ExponentialSolver(Solver):
    """Shared step: evaluate the data prediction, then ``update(x, history, n, ...) -> x_next`` with ``history``
    the past data predictions (a tuple in ``SolverState.memory``)."""

    max_order = 1

    def __init__(self, lower_order_final: bool = True):
        self.lower_order_final = bool(lower_order_final)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(lower_order_final={self.lower_order_final})"

    def step_order(self, n: int, num_steps: int, lam: list[float]) -> int:
        """Order of step ``n``: warm-up from order 1, lower near the end like diffusers."""
        order = min(self.max_order, n + 1)
        if math.isinf(float(lam[n + 1])):
            return 1
        while order > 1 and not all(math.isfinite(v) for v in lam[n - order + 1: n + 1]):
            order -= 1  # a past point at alpha = 0 (lambda = -inf) carries no curvature information
        if self.lower_order_final and num_steps < 15:
            order = min(order, num_steps - n)
        return order

    def init(self, field: Field, x: Tensor, times: Tensor, *, generator: torch.Generator | None = None,
             **cond: Any) -> SolverState:
        """Precompute the schedule, the conversion maps to ``x0`` and every step's order; empty history."""
        del generator, cond
        self.check_steps(times)
        a, s, lam = _schedule(field, times)
        _, cx, cout = prepared(field, "x0", times[:-1])
        num = len(times) - 1
        orders = tuple(self.step_order(n, num, lam) for n in range(num))
        plan = (tuple(a), tuple(s), tuple(lam), _time_batches(times[:-1], x), tuple(cx), tuple(cout), orders)
        return SolverState(x, 0, 0, times, plan, ((),))

    def step(self, field: Field, state: SolverState, *, generator: torch.Generator | None = None,
             **cond: Any) -> SolverState:
        """One evaluation (the data prediction at ``x_n``), appended to the history; then the update."""
        a, s, lam, t_batch, cx, cout, orders = state.plan
        n, x = state.n, state.x
        base = field.base if isinstance(field, FieldView) else field  # the maps convert its output
        m = apply_map(base(x, t_batch[n], **cond), x, cx[n], cout[n])
        hist = (state.memory[0] + (m,))[-self.max_order:]
        return state.advance(self.update(x, hist, n, a, s, lam, orders[n]), 1, (hist,))

    def update(self, x: Tensor, hist: tuple[Tensor, ...], n: int, a: tuple[float, ...], s: tuple[float, ...],
               lam: tuple[float, ...], order: int) -> Tensor:
        raise NotImplementedError


def _phi1(a: Tensor, s: Tensor, lam: Tensor, n: int) -> tuple[float, float, float]:
    """``(sigma_s / sigma_t, alpha_s (1 - e^{-h}), h)`` of the step ``n -> n + 1``; safe at sigma_s = 0."""
    h = float(lam[n + 1] - lam[n])
    ratio = float(s[n + 1] / s[n])
    return ratio, float(a[n + 1]) * -math.expm1(-h), h


@SOLVERS.register("ddim")
class DDIM(ExponentialSolver):
    """DDIM / DPM-Solver++(1): ``x_s = (sigma_s/sigma_t) x_t + alpha_s (1 - e^{-h}) x0``; one evaluation per
    step. Equals Euler in the VE-equivalent coordinates ``(x/alpha, sigma/alpha)``."""

    name, order, max_order = "ddim", 1, 1

    def __init__(self, lower_order_final: bool = True, use_clipped_model_output: bool = True):
        super().__init__(lower_order_final)
        self.use_clipped_model_output = bool(use_clipped_model_output)

    def __repr__(self) -> str:
        extra = "" if self.use_clipped_model_output else ", use_clipped_model_output=False"
        return f"DDIM(lower_order_final={self.lower_order_final}{extra})"

    def step(self, field: Field, state: SolverState, *, generator: torch.Generator | None = None,
             **cond: Any) -> SolverState:
        """As every exponential solver, except on an x0-limited field (:class:`genkit.fields.LimitedX0`) with
        ``use_clipped_model_output=False``: then the step pairs the limited ``x0`` with the noise of the unlimited
        prediction, ``x_s = alpha_s x0_lim + sigma_s (x_t - alpha_t x0) / sigma_t``, which is diffusers'
        ``DDIMScheduler.step`` default. The default (True) reads the limited ``x0`` alone, the noise implied by
        it (diffusers' ``use_clipped_model_output=True``, what every other genkit solver does)."""
        base = field.base if isinstance(field, FieldView) else field
        if self.use_clipped_model_output or not isinstance(base, LimitedX0):
            return super().step(field, state, generator=generator, **cond)
        a, s, lam, t_batch, cx, cout, orders = state.plan
        n, x = state.n, state.x
        inner = base.base
        raw = base.path.convert(inner(x, t_batch[n], **cond), x, t_batch[n], inner.prediction, "x0")
        limited = base.limit(raw)
        ratio = float(s[n + 1] / s[n])
        x_next = ratio * x + float(a[n + 1]) * limited - ratio * float(a[n]) * raw
        return state.advance(x_next, 1, ((limited,),))

    def update(self, x, hist, n, a, s, lam, order):
        ratio, c, _ = _phi1(a, s, lam, n)
        return ratio * x + c * hist[-1]


def _dpmpp_data(hist: tuple[Tensor, ...], lam: tuple[float, ...], n: int, order: int, h: float) -> tuple[Tensor, ...]:
    """Finite differences ``D0, D1, D2`` of the data prediction in lambda (DPM-Solver++ notation)."""
    m0 = hist[-1]
    if order == 1:
        return (m0,)
    h0 = float(lam[n] - lam[n - 1])
    r0 = h0 / h
    d1_0 = (m0 - hist[-2]) / r0
    if order == 2:
        return m0, d1_0
    h1 = float(lam[n - 1] - lam[n - 2])
    r1 = h1 / h
    d1_1 = (hist[-2] - hist[-3]) / r1
    d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
    d2 = (d1_0 - d1_1) / (r0 + r1)
    return m0, d1, d2


@SOLVERS.register("dpmpp_2m")
class DPMSolverPP2M(ExponentialSolver):
    """DPM-Solver++(2M): ``x_s = (sigma_s/sigma_t) x_t + alpha_s (1 - e^{-h}) (D0 + D1 / 2)`` with
    ``D1 = (x0_n - x0_{n-1}) h / h_{n-1}`` (diffusers' ``solver_type="midpoint"``)."""

    name, order, max_order = "dpmpp_2m", 2, 2

    def update(self, x, hist, n, a, s, lam, order):
        ratio, c, h = _phi1(a, s, lam, n)
        d = _dpmpp_data(hist, lam, n, order, h)
        return ratio * x + c * (d[0] + 0.5 * d[1] if order == 2 else d[0])


@SOLVERS.register("dpmpp_3m")
class DPMSolverPP3M(ExponentialSolver):
    """DPM-Solver++(3M): third-order multistep with the phi_2, phi_3 corrections of Lu et al. (global order
    2 because of the first-order start, see the module docstring)."""

    name, order, max_order = "dpmpp_3m", 2, 3

    def update(self, x, hist, n, a, s, lam, order):
        ratio, c, h = _phi1(a, s, lam, n)
        d = _dpmpp_data(hist, lam, n, order, h)
        out = ratio * x + c * d[0]
        if order >= 2:
            em = math.expm1(-h)  # e^{-h} - 1
            out = out + float(a[n + 1]) * (em / h + 1) * d[1]
            if order == 3:
                out = out - float(a[n + 1]) * ((em + h) / h ** 2 - 0.5) * d[2]
        return out


@SOLVERS.register("unipc")
class UniPC(ExponentialSolver):
    """UniPC-p with the bh2 variant on the data prediction; predictor UniP and corrector UniC.

    After the network is evaluated at the predicted ``x_s``, UniC corrects ``x_s`` with that evaluation;
    the evaluation (at the uncorrected point, as in the paper and diffusers) then drives the next
    predictor, so the corrector is free. No correction after the final evaluation.
    """

    name, order, max_order = "unipc", 3, 2

    def __init__(self, order: int = 2, lower_order_final: bool = True):
        super().__init__(lower_order_final)
        if order not in (1, 2, 3):
            raise ConfigError(f"UniPC order must be 1, 2 or 3; got {order}")
        self.max_order = int(order)
        self.order = min(self.max_order + 1, 3)  # UniC adds one; the corrected first step caps it at 3

    def __repr__(self) -> str:
        return f"UniPC(order={self.max_order}, lower_order_final={self.lower_order_final})"

    @staticmethod
    def _coefficients(
        lam: Tensor, n: int, order: int
    ) -> tuple[float, float, float, list[float], np.ndarray, np.ndarray]:
        """Step n -> n+1 of the given order: ratio, h_phi_1, B(h), r_k of past points, R and b (float64)."""
        h = float(lam[n + 1] - lam[n])
        hh = -h
        h_phi_1 = math.expm1(hh)
        b_h = math.expm1(hh)
        rks = [float(lam[n - i] - lam[n]) / h for i in range(1, order)] + [1.0]
        h_phi_k = h_phi_1 / hh - 1
        fact = 1
        R, b = [], []
        for i in range(1, order + 1):
            R.append([r ** (i - 1) for r in rks])
            b.append(h_phi_k * fact / b_h)
            fact *= i + 1
            h_phi_k = h_phi_k / hh - 1 / fact
        return h, h_phi_1, b_h, rks[:-1], np.array(R), np.array(b)

    def _predict(self, x, hist, n, a, s, lam, order):
        h, h_phi_1, b_h, rks, R, b = self._coefficients(lam, n, order)
        m0 = hist[-1]
        base = float(s[n + 1] / s[n]) * x - float(a[n + 1]) * h_phi_1 * m0
        if order == 1:
            return base
        d1s = [(hist[-1 - i] - m0) / rks[i - 1] for i in range(1, order)]
        rhos = [0.5] if order == 2 else np.linalg.solve(R[:-1, :-1], b[:-1]).tolist()
        return base - float(a[n + 1]) * b_h * sum(r * d for r, d in zip(rhos, d1s))

    def _correct(self, x_prev, x_new, m_new, hist, n, a, s, lam, order):
        """Correct the step n -> n+1 (taken at ``order``) with the evaluation ``m_new`` at ``x_new``."""
        h, h_phi_1, b_h, rks, R, b = self._coefficients(lam, n, order)
        m0 = hist[-1]
        base = float(s[n + 1] / s[n]) * x_prev - float(a[n + 1]) * h_phi_1 * m0
        d1s = [(hist[-1 - i] - m0) / rks[i - 1] for i in range(1, order)]
        rhos = [0.5] if order == 1 else np.linalg.solve(R, b).tolist()
        corr = sum(r * d for r, d in zip(rhos[:-1], d1s)) if d1s else 0
        return base - float(a[n + 1]) * b_h * (corr + rhos[-1] * (m_new - m0))

    def init(self, field: Field, x: Tensor, times: Tensor, *, generator: torch.Generator | None = None,
             **cond: Any) -> SolverState:
        """As the other exponential solvers; the memory also holds the predictor's input and order, which the
        next step's corrector needs."""
        state = super().init(field, x, times, generator=generator, **cond)
        return state._replace(memory=((), None))

    def step(self, field: Field, state: SolverState, *, generator: torch.Generator | None = None,
             **cond: Any) -> SolverState:
        """Evaluate at the predicted ``x_n``, correct ``x_n`` with it (UniC), then predict ``x_{n+1}`` (UniP). The
        state's ``x`` is the predictor's value; the corrected ``x_n`` is ``state.memory[1][0]`` after the step."""
        a, s, lam, t_batch, cx, cout, orders = state.plan
        n, x = state.n, state.x
        hist, prev = state.memory
        m = apply_map(unwrap(field)(x, t_batch[n], **cond), x, cx[n], cout[n])
        if prev is not None:
            x = self._correct(prev[0], x, m, hist, n - 1, a, s, lam, prev[1])
        hist = (hist + (m,))[-self.max_order:]
        order = min(orders[n], len(hist))
        return state.advance(self._predict(x, hist, n, a, s, lam, order), 1, (hist, (x, order)))

    def _record(self, traj: list[Tensor], state: SolverState) -> None:
        traj[-1] = state.memory[1][0]  # the corrected previous state replaces its prediction
        traj.append(state.x)


@SOLVERS.register("deis")
class DEIS(Solver):
    """Variable-step Adams-Bashforth in ``(y, rho) = (x / alpha, sigma / alpha)``, where the ODE is
    ``dy/drho = eps``: each step integrates the Lagrange interpolant of the last ``order`` eps predictions
    exactly over ``[rho_n, rho_{n+1}]``. Warm-up from order 1; one evaluation per step. A step from
    ``alpha = 0`` (``rho`` infinite) is a DDIM step. ``order`` (1 to 4) is the number of past evaluations
    used; the global order is ``min(order, 2)`` because of the first-order start."""

    name = "deis"

    def __init__(self, order: int = 2):
        if order not in (1, 2, 3, 4):
            raise ConfigError(f"DEIS order must be 1 to 4; got {order}")
        self.ab_order = int(order)
        self.order = min(self.ab_order, 2)

    def __repr__(self) -> str:
        return f"DEIS(order={self.ab_order})"

    @staticmethod
    def _weights(nodes: list[float], lo: float, hi: float) -> list[float]:
        """Integrals over [lo, hi] of the Lagrange basis polynomials on ``nodes`` (float64)."""
        out = []
        for j, xj in enumerate(nodes):
            poly = np.poly1d([1.0])
            for k, xk in enumerate(nodes):
                if k != j:
                    poly = poly * np.poly1d([1.0, -xk]) / (xj - xk)
            integ = np.polyint(poly)
            out.append(float(integ(hi) - integ(lo)))
        return out

    def init(self, field: Field, x: Tensor, times: Tensor, *, generator: torch.Generator | None = None,
             **cond: Any) -> SolverState:
        """Precompute ``alpha``, ``sigma`` and ``rho = sigma / alpha`` at the grid times; empty eps history."""
        del generator, cond
        self.check_steps(times)
        a, s, _ = _schedule(field, times)
        rho = tuple(si / ai if ai > 0 else math.inf for ai, si in zip(a, s))
        return SolverState(x, 0, 0, times, (tuple(a), tuple(s), rho, _time_batches(times[:-1], x)), ((),))

    def step(self, field: Field, state: SolverState, *, generator: torch.Generator | None = None,
             **cond: Any) -> SolverState:
        """One eps evaluation and the Adams-Bashforth update over ``[rho_n, rho_{n+1}]`` (DDIM from alpha = 0)."""
        a, s, rho, t_batch = state.plan
        n, x = state.n, state.x
        tn = t_batch[n]
        if float(a[n]) == 0:  # pure noise (rho = inf): a DDIM step, exact in the limit, starts the history
            x = float(s[n + 1] / s[n]) * x + float(a[n + 1]) * as_x0(field)(x, tn, **cond)
            hist: tuple[Tensor, ...] = ()
        else:
            y = x / float(a[n])
            hist = (state.memory[0] + (as_eps(field)(x, tn, **cond),))[-self.ab_order:]
            nodes = list(rho[n - len(hist) + 1: n + 1])
            w = self._weights(nodes, rho[n], rho[n + 1])
            x = (y + sum(wi * e for wi, e in zip(w, hist))) * float(a[n + 1])
        return state.advance(x, 1, (hist,))
