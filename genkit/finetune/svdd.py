"""SVDD: soft value-based decoding, reward-guided sampling without fine-tuning, of masked discrete diffusion and of
continuous models with a stochastic solver (Li et al. 2024, "Derivative-Free Guidance in Continuous and Discrete
Diffusion Models with Soft Value-Based Decoding", arXiv 2408.08252, Algorithm 1; METHODS.md section 8). Registered
in :data:`genkit.sampling.SAMPLERS` as ``svdd`` when :mod:`genkit.finetune` is imported.

The target is ``p*(x_0) ∝ p_pre(x_0) exp(r(x_0) / alpha)``. At every reverse step ``t -> s`` of the pretrained
sampler, each sample draws ``M`` candidates ``x_s^(m) ~ p_pre(x_s | x_t)``, scores them with a value estimate
``v(x_s^(m))`` and keeps one with probability ``softmax(v / alpha)`` over the ``M``: ``alpha = 0`` keeps the best
(ties broken by the generator; the paper's DNA/RNA decoders), ``alpha = inf`` a uniform one (plain sampling). ``M =
1`` is the pretrained sampler, draw for draw (nothing is scored or chosen). There is no resampling across samples.

**The pretrained step.** For a masked model (``mdlm``; ``solver=None``), the ancestral sampler's reverse step
(:func:`genkit.sampling.masked_reverse_step`, unmasked tokens carried over). For a continuous model or field
(``solver=`` a stochastic solver with Gaussian transitions: ``ancestral`` (DDPM, any ``eta > 0``),
``euler_maruyama`` with fresh noise), the step's Gaussian ``N(mean, std^2)`` (``Solver.transition``, one field
evaluation on the ``B`` states), from which the ``B * M`` candidates are drawn exactly as the solver's own step
draws (``Transition.sample``); the grid is the ODE sampler's (:meth:`genkit.sampling.ODESampler.plan`: the model's
time range, a diffusion model's final denoising step ``E[x_0 | x_{t_eps}]``). A deterministic solver is refused; a
deterministic step (onto ``t = 0``) has one candidate.

**Values** (``value=``), and what each costs (``Solution.nfe`` counts denoiser / field evaluations per sample, a
batched call on ``B * M`` candidates counted ``M``; the reward is called once a step on ``B * M`` candidates):

- ``"posterior_mean"`` (SVDD-PM), ``v(x_s) = r(x0_hat(x_s))``. Masked: ``x0_hat`` keeps the unmasked tokens of
  ``x_s`` and fills its masked positions by the argmax of the denoiser's ``p(x_0 | x_s)`` (the official code's
  decode, standing in for the posterior mean the paper writes); continuous: the model's denoiser ``E[x_0 | x_s]``
  (:func:`genkit.fields.as_x0`). ``M`` denoiser calls a step. Masked: the kept candidate's log-probabilities are the
  next step's own call, so ``nfe = 1 + (steps - 1) * M``; continuous: ``nfe = steps + M * (noisy steps before the
  last)``, plus ``M + 1`` when a final denoising step follows the last step (the solver's transition does not take
  the kept candidate's ``x0``, so that call is not shared with the next step).
- ``"sample"`` (masked only), one draw per masked position from ``p(x_0 | x_s)``: a one-sample Monte-Carlo value,
  the same cost.
- a value network ``value(x_s, s) -> [N]`` (SVDD-MC: :class:`~genkit.finetune.ValueNetwork` regressed on pretrained
  rollouts by :func:`~genkit.finetune.fit_value`, approximating ``E[r(x_0) | x_s]``; any callable of that form, e.g.
  exact soft values in a test). One value-network call on the ``B * M`` candidates a step and no denoiser call on
  them: masked ``nfe = steps`` (one call on the kept sample a step), continuous ``nfe = steps`` (+ ``M + 1`` as
  above with a final denoising step, where the reward of ``x0_hat`` is the exact value).

At the last step the candidates are the samples (or become them through the final denoising step), so they are
scored by the reward itself whatever ``value`` is. The reward needs no gradient (it is called under ``no_grad``, on
long tokens ``[B * M, L]`` or the samples ``[B * M, *shape]``).

Why a sampler object and not a family: :mod:`genkit.sampling` may not import :mod:`genkit.finetune` (samplers see no
family), so this module registers itself; a model accepts it as ``model.sample(n, sampler=SVDDSampler(...))``
because it declares ``guides``, the sampler whose step it reweights (``"masked_ancestral"``, or ``"ode"`` with a
solver). By name alone it cannot be built (it needs a reward): ``get_sampler("svdd", reward=r, candidates=8)``.

>>> import torch
>>> from genkit.models import MaskedDiffusion
>>> model, _ = MaskedDiffusion.example()
>>> sampler = SVDDSampler(Reward(lambda x: (x == 0).sum(-1).float()), candidates=4, alpha=0.0, steps=3)
>>> sol = model.sample(2, sampler=sampler, generator=torch.Generator().manual_seed(0), return_solution=True)
>>> sol.samples.shape, sol.nfe
(torch.Size([2, 3]), 9)
>>> from genkit.models import FAMILIES
>>> flow, _ = FAMILIES.get("flow_matching").example()
>>> guided = SVDDSampler(Reward(lambda x: -x.square().sum(-1)), candidates=4, steps=8, solver="ancestral")
>>> flow.sample(2, sampler=guided, generator=torch.Generator().manual_seed(0), return_solution=True).nfe
36
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from ..checks import check_generator, check_state
from ..errors import ConfigError, ShapeError
from ..fields import as_x0, check_field
from ..sampling import SAMPLERS, MaskedAncestralSampler, ODESampler, Sampler, _check_steps, masked_reverse_step
from ..solvers import Solution, Solver, TimeGrid
from ..solvers.base import check_finite_result, solve_times
from ..solvers.state import Transition
from .checks import is_mdlm
from .rewards import Reward, as_reward

__all__ = ["SVDDSampler", "VALUES"]

#: the value estimates by name: the argmax decode (posterior mean) and, for masked models, one draw per position
VALUES = ("posterior_mean", "sample")

_MASKED_NEEDS = ("a masked discrete diffusion model with logits(x_t, t), schedule and mask_id (--family mdlm), or "
                 "solver= a stochastic solver for a continuous model")
_CONTINUOUS_NEEDS = "a continuous model or field (a network read through a path) and a stochastic solver"


def _repeat(value: Any, m: int, b: int) -> Any:
    """``value`` with each of its ``b`` batch rows repeated ``m`` times in place (row ``i * m + j`` is copy ``j``
    of row ``i``); scalars and tensors without a batch dimension are returned as they are."""
    if torch.is_tensor(value) and value.ndim > 0 and value.shape[0] == b:
        return value.repeat_interleave(m, 0)
    return value


@SAMPLERS.register("svdd")
class SVDDSampler(Sampler):
    """``SVDDSampler(reward, candidates=10, alpha=0.0, steps=None, value="posterior_mean", *, solver=None,
    grid="uniform", trajectory=False)``.

    Args:
        reward: a :class:`~genkit.finetune.Reward` (or a callable, wrapped non-differentiable) on samples: long
            tokens ``[batch, L]`` for a masked model, the sample tensor ``[batch, *shape]`` for a continuous one.
        candidates: ``M >= 1``, the candidates per sample and step (the paper's README uses 10).
        alpha: the temperature ``>= 0`` of the selection ``softmax(v / alpha)``; 0 is the argmax, ``math.inf``
            the uniform choice.
        steps: the step count (None: 64 for a masked model, the ancestral sampler's; 32 with a solver, the ODE
            sampler's).
        value: ``"posterior_mean"``, ``"sample"`` (masked models only) or a value network ``value(x_s, s) ->
            [N]`` (:class:`~genkit.finetune.ValueNetwork` fitted by :func:`~genkit.finetune.fit_value`, SVDD-MC).
        solver: None for a masked model; for a continuous model a stochastic solver with Gaussian transitions
            (``"ancestral"``, ``"euler_maruyama"`` or such a Solver), whose steps propose the candidates.
        grid: the solver's time grid (a name, a TimeGrid or explicit times), as for
            :class:`~genkit.sampling.ODESampler`.
        trajectory: also return the kept states at the grid times (``Solution.trajectory``; what
            :func:`~genkit.finetune.collect_rollouts` records).
    """

    name = "svdd"

    def __init__(self, reward: Reward | Callable[[Tensor], Tensor], candidates: int = 10, alpha: float = 0.0,
                 steps: int | None = None, value: str | Callable[[Tensor, Tensor], Tensor] = "posterior_mean", *,
                 solver: str | Solver | None = None, grid: str | TimeGrid | Tensor | Sequence[float] = "uniform",
                 trajectory: bool = False):
        self.reward = as_reward(reward)
        if isinstance(candidates, bool) or not isinstance(candidates, numbers.Integral) or candidates < 1:
            raise ConfigError(f"candidates must be a positive integer (M, the draws per sample and step; 1 is plain "
                              f"ancestral sampling); got {candidates!r}")
        if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or math.isnan(alpha) or alpha < 0:
            raise ConfigError(f"alpha must be a number >= 0 (the selection temperature: 0 keeps the best candidate, "
                              f"math.inf a uniform one); got {alpha!r}")
        if isinstance(value, str) and value not in VALUES or not isinstance(value, str) and not callable(value):
            raise ConfigError(f"value must be one of {VALUES} or a value network value(x_s, s) -> [N] (SVDD-MC: "
                              f"ValueNetwork fitted by genkit.finetune.fit_value, passed itself); got {value!r}")
        if not isinstance(trajectory, bool):
            raise ConfigError(f"trajectory must be True or False; got {trajectory!r}")
        self.candidates, self.alpha, self.value, self.trajectory = int(candidates), float(alpha), value, trajectory
        self.steps, self.solver, self.grid = _check_steps(steps), solver, grid
        self._ode = None
        if solver is not None:
            self._ode = ODESampler(solver, steps, grid)  # the same solver and grid checks, and later the same grid
            s = self._ode._solver
            if not (s.gaussian_transitions and s.stepwise):
                raise ConfigError(f"SVDD draws its M candidates from each step's Gaussian transition; solver "
                                  f"{s.name!r} has none (it is {'stochastic' if s.stochastic else 'deterministic'} "
                                  "without an exposed transition). Use solver='ancestral' (DDPM) or 'euler_maruyama'")
            if getattr(s, "noise", "fresh") != "fresh":
                raise ConfigError(f"SVDD draws M independent candidates per step with fresh noise; {s!r} follows one "
                                  "Brownian path per sample. Use noise='fresh'")
            if value == "sample":
                raise ConfigError("value='sample' draws x_0 from a masked model's p(x_0 | x_s); a continuous model has "
                                  "no such draw: use value='posterior_mean' (r(E[x_0 | x_s])) or a value network")
        #: the sampler whose steps SVDD reweights, so a model that runs that one accepts this one
        self.guides = "masked_ancestral" if solver is None else "ode"
        self.needs = _MASKED_NEEDS if solver is None else _CONTINUOUS_NEEDS

    def times(self) -> Tensor:
        """The masked model's grid ``[steps + 1]`` (float64) from 1 down to 0, the ancestral sampler's (with a
        solver, the grid depends on the model: :meth:`genkit.sampling.ODESampler.plan`)."""
        return MaskedAncestralSampler(self.steps).times()

    def _score(self, x: Tensor, s: float, where: str) -> Tensor:
        """A value network's ``value(x [N, ...], s [N]) -> [N]``, checked, as float64."""
        v = self.value(x, torch.full((x.shape[0],), s, device=x.device))
        if not torch.is_tensor(v) or v.shape != (x.shape[0],) or not v.is_floating_point():
            got = f"{v.dtype} {tuple(v.shape)}" if torch.is_tensor(v) else type(v).__name__
            raise ShapeError(f"the value network must return one floating value per {where}, [{x.shape[0]}]; got "
                             f"{got} (squeeze its last dimension?)")
        return v.double()

    def _fill(self, model: Any, x: Tensor, logp: Tensor, generator: torch.Generator | None) -> Tensor:
        """``x0_hat``: the masked positions of candidates ``x [N, L]`` filled from their SUBS log-probabilities
        ``logp [N, L, V + 1]``, by the argmax (``posterior_mean``) or one draw per position (``sample``)."""
        if self.value == "posterior_mean":
            fill = logp.argmax(-1)
        else:
            cdf = logp.exp().cumsum(-1)
            on = generator.device if generator is not None else x.device
            u = torch.rand(x.shape, generator=generator, device=on, dtype=cdf.dtype).to(x.device) * cdf[..., -1]
            fill = (cdf <= u[..., None]).sum(-1).clamp(max=model.mask_id - 1)
        return torch.where(x == model.mask_id, fill, x)

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

    def _keep(self, cand: Tensor, v: Tensor | None, b: int, generator: torch.Generator | None) -> Tensor:
        """The kept rows of ``cand [B * M, ...]``: one per sample by :meth:`_choose` on ``v [B * M]``; M = 1
        draws nothing (the pretrained sampler's own draws)."""
        if self.candidates == 1:
            return torch.arange(b, device=cand.device)
        pick = self._choose(v.view(b, self.candidates), generator)
        return torch.arange(b, device=cand.device) * self.candidates + pick

    @torch.no_grad()
    def sample(self, model: Any, x: Tensor, *, generator: torch.Generator | None = None, **cond: Any) -> Solution:
        if self._ode is not None:
            if is_mdlm(model):
                raise ConfigError("SVDD with solver= guides a continuous model; a masked model has its own reverse "
                                  "step: drop solver= (and grid=)")
            return self._continuous(model, x, generator, cond)
        if not is_mdlm(model):
            raise ConfigError(f"SVDD needs {self.needs}; {type(model).__name__} is not a masked model. For a "
                              "continuous model give a stochastic solver: SVDDSampler(reward, solver='ancestral')")
        if cond:
            raise ConfigError(f"SVDD takes no conditioning for a masked model; got {sorted(cond)}")
        return self._masked(model, x, generator)

    def _masked(self, model: Any, x: Tensor, generator: torch.Generator | None) -> Solution:
        times, m, b = self.times(), self.candidates, x.shape[0]
        network = not isinstance(self.value, str)
        logp = model.logits(x, torch.full((b,), float(times[0]), device=x.device))
        nfe, traj = 1, [x] if self.trajectory else None
        for k in range(len(times) - 1):
            t, s = float(times[k]), float(times[k + 1])
            cand = masked_reverse_step(model, _repeat(x, m, b), _repeat(logp, m, b), t, s,
                                       generator)  # row b * M + j: candidate j of sample b
            last = k == len(times) - 2
            v, cand_logp = None, None
            if m > 1 and last:  # s = 0: every position is unmasked, the value is the reward itself
                v = self.reward(cand).double()
            elif m > 1 and network:
                v = self._score(cand, s, "candidate")
            elif m > 1:  # SVDD-PM: the denoiser on every candidate; the kept one's call is the next step's
                cand_logp = model.logits(cand, torch.full((b * m,), s, device=x.device))
                nfe += m
                v = self.reward(self._fill(model, cand, cand_logp, generator)).double()
            rows = self._keep(cand, v, b, generator)
            x = cand[rows]
            if not last:
                if cand_logp is None:
                    logp = model.logits(x, torch.full((b,), s, device=x.device))
                    nfe += 1
                else:
                    logp = cand_logp[rows]
            if traj is not None:
                traj.append(x)
        return Solution(x, nfe, times, None if traj is None else torch.stack(traj))

    def _continuous(self, model: Any, x: Tensor, generator: torch.Generator | None, cond: dict[str, Any]) -> Solution:
        field, grid, steps, cut = self._ode.plan(model)
        check_field(field)
        check_state(x, "SVDD")
        check_generator(generator, "SVDD")
        denoise = as_x0(field)
        if cut is not None and len(cut) == 2:  # one step onto t = 0: the final denoising step alone, nothing to pick
            return Solution(denoise(x, float(cut[0]), **cond), 1, cut)
        solver, m, b = self._ode._solver, self.candidates, x.shape[0]
        times = solve_times(field, solver, steps, grid)
        end_x0 = float(times[-1]) > 0 and getattr(model, "denoise_end", False)
        network = not isinstance(self.value, str)
        rep = {k: _repeat(c, m, b) for k, c in cond.items()}
        state = solver.init(field, x, times, generator=generator, **cond)
        nfe, traj = 0, [x] if self.trajectory else None
        while not state.done:
            n = state.n
            tr = solver.transition(field, state, **cond)
            nfe += 1
            if tr.deterministic:
                if n == 0:
                    raise ConfigError(f"the first step of {solver!r} adds no noise (std 0: eta = 0, or a single step "
                                      "onto t = 0), so all M candidates would be the same; SVDD needs a stochastic "
                                      "step (eta > 0, more steps)")
                new = tr.mean  # a deterministic step (e.g. onto t = 0) has one candidate
            else:
                cand = Transition(_repeat(tr.mean, m, b), _repeat(tr.std, m, b)).sample(generator)
                v, s, last = None, float(times[n + 1]), n == len(times) - 2
                if m > 1 and last and not end_x0:  # s = 0: the candidate is the sample, its value its reward
                    v = self.reward(cand).double()
                elif m > 1 and network and not last:
                    v = self._score(cand, s, "candidate")
                elif m > 1:  # SVDD-PM (and the exact value at a last step the final denoising step follows)
                    v = self.reward(denoise(cand, torch.full((b * m,), s, device=x.device), **rep)).double()
                    nfe += m
                new = cand[self._keep(cand, v, b, generator)]
            state = state.advance(new, 1, (), tr)
            if traj is not None:
                traj.append(state.x)
        out = state.x
        if end_x0:
            out = denoise(out, float(times[-1]), **cond)
            nfe += 1
        check_finite_result(out, solver, times)
        return Solution(out, nfe, times, None if traj is None else torch.stack(traj))

    def describe(self) -> str:
        steps = ("default (64)" if self._ode is None else "default (32)") if self.steps is None else self.steps
        value = self.value if isinstance(self.value, str) else f"value network {type(self.value).__name__}"
        solver = "" if self._ode is None else f", solver {self._ode._solver.name}"
        return (f"SVDD ({value}), {self.candidates} candidates, alpha {self.alpha:g}, {steps} steps{solver}, reward "
                f"{self.reward.name}")

    def with_steps(self, steps: int | None) -> SVDDSampler:
        return SVDDSampler(self.reward, self.candidates, self.alpha, steps, self.value, solver=self.solver,
                           grid=self.grid, trajectory=self.trajectory)
