"""SVDD: soft value-based decoding of masked discrete diffusion, reward-guided sampling without fine-tuning (Li et
al. 2024, "Derivative-Free Guidance in Continuous and Discrete Diffusion Models with Soft Value-Based Decoding",
arXiv 2408.08252, Algorithm 1; METHODS.md section 8). Registered in :data:`genkit.sampling.SAMPLERS` as ``svdd``
when :mod:`genkit.finetune` is imported.

The target is ``p*(x_0) ∝ p_pre(x_0) exp(r(x_0) / alpha)``. At every reverse step ``t -> s`` of the pretrained
model's ancestral sampler, each sample draws ``M`` candidates ``x_s^(m) ~ p_pre(x_s | x_t)``, scores them with a
value estimate ``v(x_s^(m))`` and keeps one with probability ``softmax(v / alpha)`` over the ``M``: ``alpha = 0``
keeps the best (ties broken by the generator; the paper's DNA/RNA decoders), ``alpha = inf`` a uniform one (plain
ancestral sampling). ``M = 1`` is the pretrained sampler, draw for draw.

Values are SVDD-PM's (posterior mean): ``v(x_s) = r(x0_hat(x_s))``, where ``x0_hat`` keeps the unmasked tokens of
``x_s`` and fills its masked positions from the denoiser's ``p(x_0 | x_s)`` at time ``s``: by the argmax
(``value="posterior_mean"``, the official code's decode, standing in for the posterior mean the paper writes) or by
one draw per position (``value="sample"``, a one-sample Monte-Carlo value). The reward needs no gradient (it is
called under ``no_grad``, on long tokens ``[B * M, L]``). The regression-trained value network (SVDD-MC) and the
continuous-model variant are not implemented.

Why a sampler object and not a family: :mod:`genkit.sampling` may not import :mod:`genkit.finetune` (samplers see no
family), so this module registers itself; a masked model accepts it as ``model.sample(n, sampler=SVDDSampler(...))``
because it declares ``guides = "masked_ancestral"``, the sampler whose step it reweights. By name alone it cannot be
built (it needs a reward): ``get_sampler("svdd", reward=r, candidates=8)``.

Cost (``Solution.nfe``, denoiser evaluations per sample): one call on the prior, then at each step but the last one
call on the ``B * M`` candidates (batched into a single network call, counted ``M``); the kept candidate's
log-probabilities at ``s`` are exactly the next step's own call, so they are reused. The last step's candidates are
fully unmasked and score without the denoiser: ``nfe = 1 + (steps - 1) * M``. The reward is called once per step on
``B * M`` sequences.

>>> import torch
>>> from genkit.models import MaskedDiffusion
>>> model, _ = MaskedDiffusion.example()
>>> sampler = SVDDSampler(Reward(lambda x: (x == 0).sum(-1).float()), candidates=4, alpha=0.0, steps=3)
>>> sol = model.sample(2, sampler=sampler, generator=torch.Generator().manual_seed(0), return_solution=True)
>>> sol.samples.shape, sol.nfe
(torch.Size([2, 3]), 9)
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..errors import ConfigError
from ..sampling import SAMPLERS, MaskedAncestralSampler, Sampler, _check_steps, masked_reverse_step
from ..solvers import Solution
from .checks import is_mdlm
from .rewards import Reward, as_reward

__all__ = ["SVDDSampler", "VALUES"]

#: the value estimates: argmax decode of the masked positions, or one draw from p(x_0 | x_s) per position
VALUES = ("posterior_mean", "sample")


@SAMPLERS.register("svdd")
class SVDDSampler(Sampler):
    """``SVDDSampler(reward, candidates=10, alpha=0.0, steps=None, value="posterior_mean")``.

    Args:
        reward: a :class:`~genkit.finetune.Reward` (or a callable, wrapped non-differentiable) on long tokens
            ``[batch, L] -> [batch]``.
        candidates: ``M >= 1``, the candidates per sample and step (the paper's README uses 10).
        alpha: the temperature ``>= 0`` of the selection ``softmax(v / alpha)``; 0 is the argmax, ``math.inf``
            the uniform choice.
        steps: the uniform grid's step count from ``t = 1`` to 0 (None: 64, the ancestral sampler's default).
        value: ``"posterior_mean"`` or ``"sample"`` (see the module docstring).
    """

    name = "svdd"
    guides: ClassVar[str] = "masked_ancestral"
    needs = "a masked discrete diffusion model with logits(x_t, t), schedule and mask_id (--family mdlm)"

    def __init__(self, reward: Reward | Callable[[Tensor], Tensor], candidates: int = 10, alpha: float = 0.0,
                 steps: int | None = None, value: str = "posterior_mean"):
        self.reward = as_reward(reward)
        if isinstance(candidates, bool) or not isinstance(candidates, numbers.Integral) or candidates < 1:
            raise ConfigError(f"candidates must be a positive integer (M, the draws per sample and step; 1 is plain "
                              f"ancestral sampling); got {candidates!r}")
        if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or math.isnan(alpha) or alpha < 0:
            raise ConfigError(f"alpha must be a number >= 0 (the selection temperature: 0 keeps the best candidate, "
                              f"math.inf a uniform one); got {alpha!r}")
        if value not in VALUES:
            raise ConfigError(f"value must be one of {VALUES}; got {value!r}")
        self.candidates, self.alpha, self.value = int(candidates), float(alpha), value
        self.steps = _check_steps(steps)

    def times(self) -> Tensor:
        """The grid ``[steps + 1]`` (float64) from 1 down to 0, the ancestral sampler's."""
        return MaskedAncestralSampler(self.steps).times()

    def _values(self, model: Any, x: Tensor, logp: Tensor, generator: torch.Generator | None) -> Tensor:
        """``r(x0_hat(x))`` for candidates ``x [N, L]`` with SUBS log-probabilities ``logp [N, L, V + 1]``."""
        if self.value == "posterior_mean":
            fill = logp.argmax(-1)
        else:
            cdf = logp.exp().cumsum(-1)
            on = generator.device if generator is not None else x.device
            u = torch.rand(x.shape, generator=generator, device=on, dtype=cdf.dtype).to(x.device) * cdf[..., -1]
            fill = (cdf <= u[..., None]).sum(-1).clamp(max=model.mask_id - 1)
        return self.reward(torch.where(x == model.mask_id, fill, x)).double()

    def _choose(self, v: Tensor, generator: torch.Generator | None) -> Tensor:
        """One index per row of ``v [B, M]``, drawn with probability ``softmax(v / alpha)``."""
        if self.alpha == 0:
            w = (v == v.max(-1, keepdim=True).values).double()  # the best, ties uniformly
        elif math.isinf(self.alpha):
            w = torch.ones_like(v)
        else:
            w = torch.softmax(v / self.alpha, -1)
        cdf = w.cumsum(-1)
        on = generator.device if generator is not None else v.device
        u = torch.rand(v.shape[0], generator=generator, device=on, dtype=cdf.dtype).to(v.device) * cdf[:, -1]
        return (cdf <= u[:, None]).sum(-1).clamp(max=v.shape[1] - 1)

    @torch.no_grad()
    def sample(self, model: Any, x: Tensor, *, generator: torch.Generator | None = None, **cond: Any) -> Solution:
        if not is_mdlm(model):
            raise ConfigError(f"SVDD needs {self.needs}; {type(model).__name__} is not one. Reward-guided sampling "
                              "of continuous models is not available")
        if cond:
            raise ConfigError(f"SVDD takes no conditioning; got {sorted(cond)}")
        times, m, b = self.times(), self.candidates, x.shape[0]
        logp = model.logits(x, torch.full((b,), float(times[0]), device=x.device))
        nfe = 1
        for k in range(len(times) - 1):
            t, s = float(times[k]), float(times[k + 1])
            cand = masked_reverse_step(model, x.repeat_interleave(m, 0), logp.repeat_interleave(m, 0), t, s,
                                       generator)  # row b * M + j: candidate j of sample b
            last = k == len(times) - 2
            if last:  # s = 0: every position is unmasked, the value is the reward itself
                v, cand_logp = self.reward(cand).double(), None
            else:
                cand_logp = model.logits(cand, torch.full((b * m,), s, device=x.device))
                nfe += m
                v = self._values(model, cand, cand_logp, generator)
            pick = torch.zeros(b, dtype=torch.long, device=x.device) if m == 1 else \
                self._choose(v.view(b, m), generator)  # M = 1 draws nothing more: the ancestral sampler's draws
            rows = torch.arange(b, device=x.device) * m + pick
            x = cand[rows]
            if cand_logp is not None:
                logp = cand_logp[rows]
        return Solution(x, nfe, times)

    def describe(self) -> str:
        steps = "default (64)" if self.steps is None else self.steps
        return (f"SVDD ({self.value}), {self.candidates} candidates, alpha {self.alpha:g}, {steps} steps, reward "
                f"{self.reward.name}")

    def with_steps(self, steps: int | None) -> SVDDSampler:
        return SVDDSampler(self.reward, self.candidates, self.alpha, steps, self.value)
