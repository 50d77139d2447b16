"""The optimisation loop of :func:`genkit.solvers.searched.search_solver`, with selection on a held-out batch.

A solver search is noisy: on a multimodal field the endpoint error of a minibatch is dominated by the few
samples that sit near a boundary between modes, so the last iterate is one draw from a rough loss surface
and can be clearly worse than an iterate a few steps earlier. :func:`optimise` therefore measures the
held-out endpoint error (noise the optimiser never trains on) of the starting point and every
``check_every`` iterations, and returns the best of those, not the last. Because the starting point is a
candidate, a search never ends worse on the held-out batch than where it started.

The optimisers are written out (Adam, betas 0.9 / 0.999; Lion, betas 0.9 / 0.99): torch.optim's first step
imports torch._dynamo, seconds on a CPU for a handful of parameters.

>>> import torch
>>> target = torch.tensor([1.0, -2.0], dtype=torch.float64)
>>> p = torch.zeros(2, dtype=torch.float64, requires_grad=True)
>>> run = optimise(lambda idx: (p - target).pow(2).sum(), lambda: float((p.detach() - target).pow(2).sum()), [p],
...                iters=200, batch=1, pool=1, lr=0.1, check_every=10)
>>> bool(torch.allclose(run.params[0], target, atol=1e-2)), run.holdout <= run.holdout_curve[0]
(True, True)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = ["Optimised", "optimise", "OPTIMISERS", "LR_SCHEDULES", "loss_curve"]

OPTIMISERS = ("adam", "lion")
LR_SCHEDULES = ("constant", "cosine")


@dataclass
class Optimised:
    """What :func:`optimise` found.

    params: the unknowns (detached clones) at the best held-out check; holdout: their held-out error;
    best_iter: the iteration count at that check (0 = the starting point); losses: the minibatch loss of every
    iteration; holdout_curve: the held-out error at each check (the start first); checked_at: iteration counts
    of the checks.
    """

    params: list[Tensor]
    holdout: float
    best_iter: int
    losses: list[float] = field(default_factory=list)
    holdout_curve: list[float] = field(default_factory=list)
    checked_at: list[int] = field(default_factory=list)


def _step(kind: str, params: list[Tensor], grads: tuple[Tensor, ...], state: list[list[Tensor]], lr: float,
          it: int) -> None:
    """One in-place Adam or Lion update of ``params``."""
    with torch.no_grad():
        for p, g, (m, v) in zip(params, grads, state):
            if kind == "lion":
                p -= lr * torch.sign(0.9 * m + 0.1 * g)
                m.mul_(0.99).add_(0.01 * g)
            else:
                m.mul_(0.9).add_(0.1 * g)
                v.mul_(0.999).add_(0.001 * g * g)
                p -= lr * (m / (1 - 0.9 ** (it + 1))) / ((v / (1 - 0.999 ** (it + 1))).sqrt() + 1e-8)


def optimise(loss: Callable[[Tensor], Tensor], holdout: Callable[[], float], params: list[Tensor], *, iters: int,
             batch: int, pool: int, lr: float, optimiser: str = "adam", lr_schedule: str = "constant",
             check_every: int = 10, generator: torch.Generator | None = None,
             device: torch.device | str | None = None,
             on_nonfinite: Callable[[int, float], Exception] | None = None,
             per_sample: Callable[[], Tensor] | None = None, importance: float = 0.0) -> Optimised:
    """Minimise ``loss(idx)`` (``idx [batch]``: indices into a pool of ``pool`` samples, a fresh permutation each
    epoch) over ``params`` (leaf tensors with ``requires_grad``, updated in place) for ``iters`` steps; keep the
    iterate with the lowest ``holdout()`` among the start and every ``check_every``-th iterate (and the last).

    ``on_nonfinite(it, value)`` builds the exception raised on a non-finite loss (default: ArithmeticError).
    Returns an :class:`Optimised`; ``params`` are left at the last iterate.

    Importance sampling (``importance = m > 0`` with ``per_sample()``, the ``[pool]`` losses of every pool sample
    at the current parameters, refreshed at each check): minibatches are drawn with replacement with
    probabilities ``p_i = (1 - m) / pool + m e_i / sum(e)`` and ``loss(idx, w)`` gets the weights
    ``w = 1 / (pool p_idx)``, so that ``mean(w * loss_idx)`` is an unbiased estimate of the pool's mean loss
    with far less variance when a few samples carry most of it (the uniform part keeps every ``w <= 1 / (1 - m)``).
    """
    def snapshot() -> list[Tensor]:
        return [p.detach().clone() for p in params]

    state = [[torch.zeros_like(p), torch.zeros_like(p)] for p in params]
    best_params, best, best_iter = snapshot(), holdout(), 0
    run = Optimised(best_params, best, 0, holdout_curve=[best], checked_at=[0])
    order = torch.empty(0, dtype=torch.long, device=device)
    on = generator.device if generator is not None else None  # randperm draws on the generator's device
    weighted = importance > 0 and per_sample is not None
    probs = _probabilities(per_sample(), importance, pool, on) if weighted else None
    for it in range(iters):
        if weighted:
            idx = torch.multinomial(probs, batch, replacement=True, generator=generator).to(device)
            value = loss(idx, (1.0 / (pool * probs[idx.to(probs.device)])).to(device))
        else:
            if len(order) < batch:
                order = torch.randperm(pool, generator=generator, device=on).to(device)
            idx, order = order[:batch], order[batch:]
            value = loss(idx)
        if not torch.isfinite(value):
            raise (on_nonfinite or (lambda i, v: ArithmeticError(f"loss {v} at iteration {i}")))(it, value.item())
        step_lr = lr if lr_schedule == "constant" else 0.5 * lr * (1 + math.cos(math.pi * it / iters))
        _step(optimiser, params, torch.autograd.grad(value, params), state, step_lr, it)
        run.losses.append(value.item())
        if (it + 1) % check_every == 0 or it + 1 == iters:
            h = holdout()
            run.holdout_curve.append(h)
            run.checked_at.append(it + 1)
            if h < best:  # NaN never wins
                best_params, best, best_iter = snapshot(), h, it + 1
            if weighted and it + 1 < iters:
                probs = _probabilities(per_sample(), importance, pool, on)
    run.params, run.holdout, run.best_iter = best_params, best, best_iter
    return run


def _probabilities(errors: Tensor, mix: float, pool: int, device: torch.device | None) -> Tensor:
    """``(1 - mix) / pool + mix * errors / sum(errors)`` (float64; uniform where the errors are all 0 or not finite)."""
    e = errors.detach().to(device=device, dtype=torch.float64).reshape(-1)
    if e.numel() != pool:
        raise ValueError(f"per_sample() gave {e.numel()} losses for a pool of {pool}")
    total = float(e.sum())
    uniform = torch.full((pool,), 1.0 / pool, dtype=torch.float64, device=device)
    if not (math.isfinite(total) and total > 0 and bool((e >= 0).all())):
        return uniform
    return (1 - mix) * uniform + mix * e / total


def loss_curve(losses: list[float], points: int = 20) -> list[float]:
    """A loss history in at most ``points`` chunk means (to judge convergence from an artifact)."""
    k = max(1, math.ceil(len(losses) / points))
    return [sum(losses[i:i + k]) / len(losses[i:i + k]) for i in range(0, len(losses), k)]
