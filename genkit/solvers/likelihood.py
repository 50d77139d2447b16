"""Log-likelihood through the instantaneous change of variables (Chen et al. 2018, arXiv 1806.07366).

Integrating ``dx/dt = v(x, t)`` from data (t = t_min) to noise (t = 1) with
``d/dt log p_t(x_t) = -div v(x_t, t)`` gives
``log p_0(x_0) = log N(x_1; 0, sigma(1)^2 I) + int div v dt``.
The divergence is exact (one backward pass per dimension; for small dimension) or Hutchinson's
estimate ``E[z^T (dv/dx) z]`` with Rademacher ``z`` drawn once per solve (Grathwohl et al. 2019,
arXiv 1810.01367), which is unbiased.
"""

from __future__ import annotations

import difflib
import math
from typing import Any

import torch
from torch import Tensor

from ..checks import check_generator, check_state, describe_nonfinite
from ..errors import ConfigError, DataError, SolverError
from ..fields import Field, FunctionField, as_velocity, check_field
from ..paths import broadcast_time
from .base import Solver, get_solver
from .grids import validate_grid

__all__ = ["divergence", "ode_log_prob", "LOG_PROB_OPTIONS"]

#: The options of :func:`ode_log_prob` (and of a model's ``log_prob``); other keywords are conditioning.
LOG_PROB_OPTIONS = ("solver", "steps", "divergence_mode", "t_min", "t_max", "generator")


def divergence(v: Tensor, x: Tensor, *, noise: Tensor | None = None, create_graph: bool = False) -> Tensor:
    """Divergence of ``v(x)`` w.r.t. ``x`` (``x`` must require grad), per sample, shape ``[batch]``.
    Exact when ``noise`` is None, Hutchinson's estimate with that probe otherwise."""
    if noise is not None:
        (jz,) = torch.autograd.grad(v, x, noise, create_graph=create_graph)
        return (jz * noise).flatten(1).sum(1)
    flat_v = v.flatten(1)
    div = torch.zeros(x.shape[0], device=x.device, dtype=x.dtype)
    for i in range(flat_v.shape[1]):
        (g,) = torch.autograd.grad(flat_v[:, i].sum(), x, retain_graph=True, create_graph=create_graph)
        div = div + g.flatten(1)[:, i]
    return div


def ode_log_prob(field: Field, x: Tensor, *, solver: str | Solver = "dopri5", steps: int = 100,
                 divergence_mode: str = "exact", t_min: float | None = None, t_max: float = 1.0,
                 generator: torch.Generator | None = None, **cond: Any) -> Tensor:
    """``log p_0(x)`` under the probability-flow ODE of ``field``, shape ``[batch]`` (nats).

    Args:
        field: any genkit field; its velocity view is integrated.
        x: data ``[batch, ...]``.
        solver: an ODE solver (adaptive ``dopri5`` by default; a fixed-step one uses ``steps``).
        divergence_mode: ``"exact"`` or ``"hutchinson"``.
        t_min: start time (default: the path's ``t_min``).
        t_max: end time, where the prior is taken as ``N(0, sigma(t_max)^2 I)`` (exact at 1 when alpha(1) = 0;
            the same approximation the sampler makes when it starts below 1).
        generator: draws the Hutchinson probe.
    """
    check_field(field)
    for key in cond:  # a typo of an option would otherwise reach the field as conditioning
        close = difflib.get_close_matches(key, LOG_PROB_OPTIONS, n=1, cutoff=0.75)
        if close:
            raise ConfigError(f"log_prob got an unknown keyword {key!r}; did you mean {close[0]!r}? Its options are "
                              f"{', '.join(LOG_PROB_OPTIONS)}; other keywords are the field's conditioning (labels=)")
    check_state(x, "log_prob")
    check_generator(generator, "log_prob")
    bad = describe_nonfinite(x)  # one sync, next to a solve that takes many
    if bad:
        raise DataError(f"log_prob: x {bad}; a density is defined at finite points only: drop or fix those samples")
    if divergence_mode not in ("exact", "hutchinson"):
        raise ConfigError(f"divergence_mode must be 'exact' or 'hutchinson'; got {divergence_mode!r}")
    solver = get_solver(solver)
    if solver.stochastic:
        raise ConfigError(f"likelihoods need an ODE solver; {solver.name!r} is stochastic")
    v = as_velocity(field)
    path = field.path
    t0 = path.t_min if t_min is None else float(t_min)
    n = steps if solver.fixed_step else 1
    times = validate_grid(torch.linspace(t0, float(t_max), n + 1, dtype=torch.float64))
    shape, d = x.shape, x[0].numel()
    probe = None
    if divergence_mode == "hutchinson":
        probe = torch.randint(0, 2, shape, generator=generator, device=x.device).to(x.dtype) * 2 - 1

    def augmented(state: Tensor, t: Tensor) -> Tensor:
        with torch.enable_grad():
            y = state[:, :d].reshape(shape).detach().requires_grad_(True)
            out = v(y, t, **cond)
            div = divergence(out, y, noise=probe)
        return torch.cat([out.detach().flatten(1), div.detach()[:, None]], dim=1)

    state = torch.cat([x.flatten(1), x.new_zeros(x.shape[0], 1)], dim=1)
    aug = FunctionField(lambda s, t: augmented(s, broadcast_time(t, s)), path, "velocity")
    try:
        end = solver.solve(aug, state, times).samples
    except TypeError as e:  # e.g. exakt=True, which reached the field as conditioning
        if cond and ("keyword argument" in str(e) or "multiple values for argument" in str(e)):
            raise ConfigError(f"log_prob passed {sorted(cond)} to the field as conditioning, and it refused them "
                              f"({e}); its options are {', '.join(LOG_PROB_OPTIONS)} (divergence_mode: 'exact' or "
                              "'hutchinson')") from e
        raise
    except AssertionError as e:  # torchdiffeq's step-size underflow
        raise SolverError(f"the likelihood ODE could not be integrated with {solver!r} ({e}); the field is likely "
                          "singular on [t_min, t_max]: narrow the range or use a fixed-step solver") from None
    x1, integral = end[:, :d], end[:, d]
    std = float(path.sigma(torch.tensor(float(t_max), dtype=torch.float64)))
    log_prior = -0.5 * (x1 / std).pow(2).sum(1) - d * (math.log(std) + 0.5 * math.log(2 * math.pi))
    return log_prior + integral
