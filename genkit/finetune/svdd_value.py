"""SVDD-MC: a value network ``V(x_t, t) ≈ E[r(x_0) | x_t]`` regressed on the pretrained sampler's own rollouts (Li
et al. 2024, arXiv 2408.08252, Section 4.1 "Monte Carlo regression"; METHODS.md section 8), the value
:class:`~genkit.finetune.SVDDSampler` takes as ``value=``.

**Rollouts** (:func:`collect_rollouts`). ``n`` trajectories of the pretrained sampler (``SVDDSampler`` with one
candidate, draw for draw the pretrained sampler: the masked ancestral sampler, or a stochastic solver's steps for a
continuous model) on the grid the guided sampler will use, each with its final sample's reward ``r(x_0)``. The
pairs are ``(x_{t_k}, t_k, r(x_0))`` at the interior grid times ``t_1 .. t_{K-1}``, the only times SVDD scores
candidates at (at ``t_0`` nothing is chosen; at the last time the candidates are, or deterministically become, the
samples, and SVDD scores them with the reward itself). ``steps >= 2`` so that there is an interior time.

**Regression** (:func:`fit_value`). Plain least squares, ``min_V mean (V(x_t, t) - r(x_0))^2`` over the pairs, with
Adam on shuffled mini-batches (the shuffling drawn from ``generator``). Its minimiser over all functions is the
conditional expectation ``E[r(x_0) | x_t, t]`` under the pretrained sampler's joint law, the ``alpha -> 0`` value
the paper's SVDD-MC approximates (not the soft value ``alpha log E[exp(r / alpha) | x_t]``). The states a
trajectory visits are correlated along it; regression on them is still unbiased for that minimiser.

**The network** (:class:`ValueNetwork`). Any genkit backbone ``net(x, t)`` (``TokenMLP`` / ``SequenceTransformer``
for tokens with MASK, ``MLP`` for vectors) read through a linear head on its flattened output: ``V = w .
flatten(net(x, t)) + c``. A backbone's last layer is linear, so the head adds no bottleneck: ``V`` is any linear
functional of the backbone's last hidden features.

Cost: the rollouts are ``n`` pretrained samples (the sampler's NFE each); guided sampling with a value network then
scores ``B * M`` candidates a step with one value-network call and spends one denoiser call on the kept sample
only (masked: ``nfe = steps``; continuous: ``nfe = steps``, plus ``M + 1`` when a final denoising step follows the
last step), against ``M`` denoiser calls a step for SVDD-PM.

>>> import torch
>>> from genkit.models import MaskedDiffusion
>>> from genkit.nets import TokenMLP
>>> from genkit.finetune import Reward, SVDDSampler
>>> model, _ = MaskedDiffusion.example()
>>> reward = Reward(lambda x: (x == 0).sum(-1).double(), name="zeros")
>>> data = collect_rollouts(model, reward, 64, steps=3, generator=torch.Generator().manual_seed(0))
>>> data.x.shape, data.t.shape, data.r.shape   # 64 rollouts x 2 interior times
(torch.Size([128, 3]), torch.Size([128]), torch.Size([128]))
>>> value = ValueNetwork(TokenMLP(model.vocab_size, model.length, hidden=16, depth=1))
>>> losses = fit_value(value, data, epochs=2, generator=torch.Generator().manual_seed(0))
>>> sampler = SVDDSampler(reward, candidates=4, steps=3, value=value)
>>> model.sample(2, sampler=sampler, generator=torch.Generator().manual_seed(0), return_solution=True).nfe
3
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ConfigError, ShapeError
from ..solvers import Solver, TimeGrid
from .rewards import Reward, as_reward
from .svdd import SVDDSampler

__all__ = ["ValueNetwork", "Rollouts", "collect_rollouts", "fit_value"]


class ValueNetwork(nn.Module):
    """``ValueNetwork(net, features=None)``: ``V(x, t) = head(flatten(net(x, t))) -> [B]``.

    Args:
        net: a backbone ``net(x, t) -> [B, ...]`` (a genkit network: ``TokenMLP(V, L)`` for tokens ``[B, L]`` in
            ``0..V`` with MASK ``= V``, ``MLP(dim)`` for vectors ``[B, dim]``).
        features: the number of values ``net`` returns per sample; None reads it from ``net.config()``
            (``length * vocab_size`` for a sequence net, ``dim`` for an MLP).
    """

    def __init__(self, net: nn.Module, features: int | None = None):
        super().__init__()
        if not isinstance(net, nn.Module):
            raise ConfigError(f"net must be an nn.Module backbone net(x, t); got {type(net).__name__}")
        if features is None:
            config = net.config() if callable(getattr(net, "config", None)) else {}
            if "vocab_size" in config and "length" in config:
                features = int(config["vocab_size"]) * int(config["length"])
            elif "dim" in config:
                features = int(config["dim"])
            else:
                raise ConfigError(f"cannot tell how many values {type(net).__name__} returns per sample; pass "
                                  "features= (the size of its flattened output)")
        if isinstance(features, bool) or not isinstance(features, numbers.Integral) or features < 1:
            raise ConfigError(f"features must be a positive integer (the backbone's flattened output size); got "
                              f"{features!r}")
        self.net, self.features = net, int(features)
        self.head = nn.Linear(self.features, 1)

    def forward(self, x: Tensor, t: Tensor | float, labels: Tensor | None = None) -> Tensor:
        """``x [B, ...]`` at times ``t [B]`` (or a float) -> values ``[B]``; ``labels [B]`` (class ids) go to a
        class-conditional backbone as its ``y``."""
        h = (self.net(x, t) if labels is None else self.net(x, t, y=labels)).flatten(1)
        if h.shape[1] != self.features:
            raise ShapeError(f"the backbone returned {h.shape[1]} values per sample, the head takes {self.features}; "
                             "build ValueNetwork with features= its flattened output size")
        return self.head(h).squeeze(-1)

    def config(self) -> dict[str, Any]:
        """The backbone's config and the head's width (JSON-serialisable)."""
        return {"net": self.net.config(), "features": self.features}


@dataclass
class Rollouts:
    """Regression pairs from the pretrained sampler: states ``x [N, ...]`` at times ``t [N]`` (float64) and the
    reward ``r [N]`` (float64) of the final sample of the trajectory each state lies on; ``samples`` are the
    ``n`` final samples, ``rewards [n]`` theirs."""

    x: Tensor
    t: Tensor
    r: Tensor
    samples: Tensor
    rewards: Tensor


def collect_rollouts(model: Any, reward: Reward | Callable[[Tensor], Tensor], n: int | None = None, *,
                     prior: Tensor | None = None, steps: int | None = None, solver: str | Solver | None = None,
                     grid: str | TimeGrid | Tensor | Sequence[float] = "uniform",
                     generator: torch.Generator | None = None) -> Rollouts:
    """``n`` pretrained trajectories of ``model`` and their rewards, as :class:`Rollouts` (see the module docstring).

    ``model`` is sampled through ``model.sample(n, sampler=...)``; a field that is no genkit model (an analytic field)
    takes its prior draw as ``prior [n, ...]`` instead of ``n``. ``steps``, ``solver`` and ``grid`` are those of
    the :class:`~genkit.finetune.SVDDSampler` the value will guide (``solver`` None for a masked model).
    """
    reward = as_reward(reward)
    if (n is None) == (prior is None):
        raise ConfigError("give either n (the model draws its prior) or prior= (a prior draw [n, ...]), not "
                          f"{'both' if n is not None else 'neither'}")
    sampler = SVDDSampler(reward, candidates=1, steps=steps, solver=solver, grid=grid, trajectory=True)
    if prior is None:
        if not callable(getattr(model, "samplers", None)):  # a genkit model draws its own prior
            raise ConfigError(f"{type(model).__name__} is not a genkit model that draws its prior; pass its prior draw "
                              "as prior=")
        sol = model.sample(n, sampler=sampler, generator=generator, return_solution=True)
    else:
        sol = sampler.sample(model, prior, generator=generator)
    traj, times = sol.trajectory, sol.times
    if len(times) < 3:
        raise ConfigError(f"a value network is fitted at the interior grid times, and {len(times) - 1} step(s) "
                          "have none; use steps >= 2")
    rewards = reward(sol.samples).double()
    inner = traj[1:-1]  # [K - 1, n, ...]
    k, b = inner.shape[:2]
    t = times[1:-1].to(torch.float64).repeat_interleave(b)
    return Rollouts(inner.reshape(k * b, *inner.shape[2:]), t, rewards.repeat(k), sol.samples, rewards)


def fit_value(value: nn.Module, data: Rollouts, *, epochs: int = 50, batch_size: int = 512, lr: float = 1e-3,
              generator: torch.Generator | None = None) -> list[float]:
    """Least-squares regression of ``data.r`` on ``value(data.x, data.t)``: Adam (``lr``) over ``epochs`` passes of
    shuffled mini-batches of ``batch_size`` (the order drawn from ``generator``). Trains ``value`` in place and
    returns each epoch's mean squared error (leaves ``value`` in eval mode)."""
    for name, v, low in (("epochs", epochs, 1), ("batch_size", batch_size, 1)):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < low:
            raise ConfigError(f"{name} must be a positive integer; got {v!r}")
    if isinstance(lr, bool) or not isinstance(lr, numbers.Real) or not math.isfinite(lr) or lr <= 0:
        raise ConfigError(f"lr must be a finite number > 0 (1e-3 is usual for Adam); got {lr!r}")
    if not isinstance(data, Rollouts):
        raise ConfigError(f"data must be Rollouts (collect_rollouts(...)); got {type(data).__name__}")
    params = [p for p in value.parameters() if p.requires_grad]
    if not params:
        raise ConfigError(f"{type(value).__name__} has no trainable parameters to fit")
    dtype = params[0].dtype
    x = data.x if not data.x.is_floating_point() else data.x.to(dtype)
    t, r = data.t.to(dtype), data.r.to(dtype)
    opt = torch.optim.Adam(params, lr=float(lr))
    value.train()
    losses = []
    for _ in range(int(epochs)):
        order = torch.randperm(len(r), generator=generator, device=generator.device if generator is not None else
                               "cpu").to(r.device)
        total = 0.0
        for i in range(0, len(r), int(batch_size)):
            idx = order[i:i + int(batch_size)]
            loss = (value(x[idx], t[idx]) - r[idx]).square().mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
        losses.append(total / len(r))
    value.eval()
    return losses
