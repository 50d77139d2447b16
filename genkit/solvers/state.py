"""The explicit state of a stepwise solve and the Gaussian law of one stochastic step.

``Solver.init`` returns a :class:`SolverState`, ``Solver.step`` maps one state to the next; neither mutates
anything, so a caller may keep, branch, stop at or detach any state. A stochastic solver whose step is a
Gaussian draw (``ancestral``, ``euler_maruyama``) records it as a :class:`Transition` on the state it
produced: ``x_{n+1} ~ N(mean, std^2 I)`` given the previous state, which is what policy-gradient
fine-tuning (DDPO, arXiv 2305.13301; SEPO; VARD) scores.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ..errors import SolverError

__all__ = ["SolverState", "Transition", "detach_all"]

_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)
_tuple_new = tuple.__new__


@dataclass(frozen=True)
class Transition:
    """``x_{n+1} ~ N(mean, std^2 I)``: the law of one stochastic step given the state it started from.

    mean: ``[B, ...]``, shaped like the state. std: a float or a tensor broadcastable to ``mean``; 0 for a
    deterministic step (e.g. Euler-Maruyama's last step onto t = 0), which has no density.
    """

    mean: Tensor
    std: float | Tensor

    @property
    def deterministic(self) -> bool:
        """True when the step adds no noise (std = 0 everywhere): ``x_{n+1} = mean``."""
        std = self.std
        return bool((std == 0).all()) if torch.is_tensor(std) else std == 0

    def log_prob(self, x: Tensor) -> Tensor:
        """``log N(x; mean, std^2 I)`` summed over the non-batch dimensions: ``[B]``.

        Differentiable in ``mean`` and ``std`` (detach ``x`` for a score-function gradient). A deterministic
        step has no density: SolverError.
        """
        if self.deterministic:
            raise SolverError("this step is deterministic (std = 0): x_next = mean exactly, and it has no Gaussian "
                              "density; leave it out of the log-probability sum (its state's log_prob is None)")
        if x.shape != self.mean.shape:
            raise SolverError(f"x_next must be shaped like the transition's mean {tuple(self.mean.shape)}; got "
                              f"{tuple(x.shape)}")
        dims = tuple(range(1, x.ndim))
        std = self.std
        z = (x - self.mean) / std
        if torch.is_tensor(std):
            lp = -0.5 * z.square() - torch.log(std).expand_as(z) - _HALF_LOG_2PI
            return lp.sum(dims) if dims else lp
        quad = z.square().sum(dims) if dims else z.square()
        return -0.5 * quad - (x[0].numel()) * (math.log(std) + _HALF_LOG_2PI)

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        """A fresh draw ``mean + std * z``, ``z ~ N(0, I)`` from ``generator``: ``[B, ...]``."""
        m = self.mean
        return m + self.std * torch.randn(m.shape, generator=generator, device=m.device, dtype=m.dtype)


class SolverState(NamedTuple):
    """Where a stepwise solve stands: immutable (a NamedTuple, cheap to build once per step).

    x: ``[B, ...]`` the state at ``times[n]``.
    n: grid intervals done (0 after ``init``; ``len(times) - 1`` when done).
    nfe: field evaluations so far.
    times: the grid (``[N + 1]``, float64), as ``Solution.times`` reports it.
    plan: per-solve constants the solver precomputed in ``init`` (coefficients, time tensors); opaque.
    memory: a tuple of what the next step needs from the past (multistep history, a Brownian path);
        solver-specific.
    transition: the Gaussian law that drew ``x`` from the previous state (stochastic solvers that expose
        one), else None.
    """

    x: Tensor
    n: int
    nfe: int
    times: Tensor
    plan: Any = None
    memory: tuple = ()
    transition: Transition | None = None

    @property
    def t(self) -> float:
        """The current time ``times[n]``."""
        return float(self.times[self.n])

    @property
    def done(self) -> bool:
        """Whether the last grid time has been reached."""
        return self.n >= len(self.times) - 1

    @property
    def log_prob(self) -> Tensor | None:
        """``[B]`` log-density of ``x`` under the transition that drew it, with ``x`` held fixed (detached), so
        its gradient is the score-function (REINFORCE) gradient through the transition's mean and std. None
        when the step was deterministic or the solver exposes no transitions."""
        tr = self.transition
        if tr is None or tr.deterministic:
            return None
        return tr.log_prob(self.x.detach())

    def advance(self, x: Tensor, evals: int, memory: tuple = (), transition: Transition | None = None) -> SolverState:
        """The state one grid interval on: ``x``, ``n + 1``, ``nfe + evals``, the same times and plan, the new
        memory and transition (what every ``step`` returns; built without the keyword machinery, once per step)."""
        return _tuple_new(SolverState, (x, self[1] + 1, self[2] + evals, self[3], self[4], memory, transition))

    def detach(self) -> SolverState:
        """The same state cut from the autograd graph (``x``, the memory's tensors and the transition's mean):
        gradients of later steps stop here (truncated backpropagation through the last K steps)."""
        tr = self.transition
        if tr is not None:
            tr = Transition(tr.mean.detach(), tr.std.detach() if torch.is_tensor(tr.std) else tr.std)
        return self._replace(x=self.x.detach(), memory=detach_all(self.memory), transition=tr)


def detach_all(value: Any) -> Any:
    """``value`` with every tensor inside (nested tuples and lists) detached."""
    if torch.is_tensor(value):
        return value.detach()
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # a NamedTuple
        return type(value)(*(detach_all(v) for v in value))
    if isinstance(value, (tuple, list)):
        return type(value)(detach_all(v) for v in value)
    return value
