"""The baselines VARD is compared with, through the same interface: DRaFT-style direct reward backpropagation
through the sampler, truncated to the last K steps (Clark et al. 2024, "Directly Fine-Tuning Diffusion Models on
Differentiable Rewards", arXiv 2309.17400), and DDPO-style policy gradients with importance-ratio clipping (Black
et al. 2024, "Training Diffusion Models with Reinforcement Learning", arXiv 2305.13301).

Both are data-free objectives (``data_free = True``) for :class:`genkit.train.Trainer` on a continuous genkit model
sampled by a stochastic solver with Gaussian steps ``p_theta(x_{n+1} | x_n) = N(mu_theta(x_n), std_n^2 I)``
(:class:`~genkit.finetune.gaussian_steps.GaussianChain`: ``ancestral``, ``euler_maruyama``), with the pretrained
model and the reward as frozen parts. Both take the KL penalty VARD takes, ``eta * sum_n ||mu_theta(x_n) -
mu_pre(x_n)||^2 / (2 std_n^2)`` over the Gaussian steps (0 by default: the papers' plain objectives). For DRaFT
``eta > 0`` makes the target the same tilted law ``p_pre exp(r / eta)`` as VARD's (as in DPOK, arXiv 2305.16381).
DDPO's policy gradient follows the *normalised* advantages, the gradient of ``E[r] / std(r)`` (batch statistics),
so its effective temperature is ``eta * std(r)``, which changes as training goes: the same ``eta`` constrains DDPO
less (eval/results/bench_finetune.md: path KL 11.5 for DDPO against 2.9 for VARD at eta 0.1).

**DRaFT** (:class:`DRaFT`). One trajectory per sample from the prior; the first ``N - K`` steps without gradients,
the state detached, the last ``K`` steps (and a diffusion model's final denoising step) with gradients through the
solver's own reparameterised draws ``x_{n+1} = mu_theta(x_n) + std_n z_n``:

    ``L = -mean r(x_0) + eta * mean sum_n KL_n``

``K = N`` is full backpropagation, ``K = 1`` DRaFT-1. The KL terms carry gradients at every step (the states only
in the last ``K``; an earlier step's mean is recomputed on its detached state). ``KL_n`` is a function of the state
``x_n``: in the last ``K`` steps its gradient through ``x_n`` moves both means (the reference's network is frozen,
not its input). Truncation has a price on multimodal targets: on the 2-D two-component toy of tests/test_vard.py
(10 steps), ``K = 10`` moved the right component's weight from 0.50 to 0.60 (target 0.66) and ``K = 3`` to 0.51
in as many updates; pathwise gradients through the last steps move samples within a component, not between them.
The reward must be differentiable (a non-differentiable one is refused: use VARD or DDPO).

**DDPO** (:class:`DDPO`). A ``rollout`` step draws ``batch_size`` trajectories of the current model without
gradients, its rewards and the old log-probabilities ``log p_old(x_{n+1} | x_n)`` of every Gaussian step (the
solver's :meth:`~genkit.solvers.Transition.log_prob`, exactly the log-probability the solver's states record), and
the advantages ``A``: ``"batch"`` ``(r - mean r) / (std r + 1e-8)`` over the batch; ``"per_prompt"`` the same within
each label's samples of the batch (DDPO's per-prompt statistics; a label with one sample uses the batch's).
Each loss call then is the clipped surrogate summed, not averaged, over the Gaussian steps:

    ``L = mean_b sum_n max(-A_b rho_bn, -A_b clip(rho_bn, 1 - clip, 1 + clip)) + eta * mean sum_n KL_n``
    ``rho_bn = exp(log p_theta(x_{n+1} | x_n) - log p_old(x_{n+1} | x_n))``

A rollout serves ``reuse`` consecutive loss calls (DDPO's several gradient steps per sampling round, during which
``rho`` moves away from 1 and clipping acts); it is kept in buffers, so a resumed run continues exactly.
:attr:`DDPO.reward_queries` counts the reward calls (one per sample per rollout).

>>> import copy, torch
>>> from genkit.models import FAMILIES
>>> from genkit.finetune import Reward
>>> pre, _ = FAMILIES.get("diffusion").example()
>>> reward = Reward(lambda x: -(x - 1).square().sum(-1), differentiable=True, name="near1")
>>> a, b = copy.deepcopy(pre), copy.deepcopy(pre)
>>> loss, logs = DRaFT(a, pre, reward, truncate=2, steps=4, batch_size=8).loss(
...     None, torch.Generator().manual_seed(0))
>>> sorted(logs)
['kl', 'reward']
>>> loss, logs = DDPO(b, pre, reward, steps=4, batch_size=8).loss(None, torch.Generator().manual_seed(0))
>>> float(logs["ratio"])   # the first call on a fresh rollout: the policy is the old one
1.0
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..checks import check_generator
from ..errors import ConfigError
from ..solvers import Solver, SolverState, TimeGrid
from .checks import _int, _real
from .gaussian_steps import ChainObjective, ChainRollout, draw_cond, draw_prior, step_kl
from .rewards import Reward, as_reward

__all__ = ["DRaFT", "DDPO", "ADVANTAGES", "advantages"]

ADVANTAGES = ("batch", "per_prompt")


def _no_batch(batch: Any, method: str) -> None:
    if batch is not None:
        raise ConfigError(f"{method} is data-free (its rollouts are its samples); call loss(None, generator) and "
                          "Trainer.fit() without data")


def advantages(r: Tensor, labels: Tensor | None, how: str = "batch") -> Tensor:
    """Normalised advantages ``[B]`` of rewards ``r [B]``: ``(r - mean) / (std + 1e-8)`` over the batch
    (``"batch"``) or within each label's samples (``"per_prompt"``; a label with a single sample uses the batch
    statistics). ``std`` is the population standard deviation."""
    if how not in ADVANTAGES:
        raise ConfigError(f"advantages must be one of {ADVANTAGES}; got {how!r}")
    out = (r - r.mean()) / (r.std(unbiased=False) + 1e-8)
    if how == "batch":
        return out
    if labels is None:
        raise ConfigError("per-prompt advantages group the samples by their labels; this model is unconditional: "
                          "use advantages='batch'")
    for c in labels.unique():
        sel = labels == c
        if int(sel.sum()) > 1:
            rc = r[sel]
            out[sel] = (rc - rc.mean()) / (rc.std(unbiased=False) + 1e-8)
    return out


class _Chained(ChainObjective):
    """What DRaFT and DDPO share beyond :class:`~genkit.finetune.gaussian_steps.ChainObjective`: the KL terms
    along a rollout."""

    def kl_terms(self, roll: ChainRollout) -> Tensor:
        """``sum_n KL_n`` per sample ``[B]`` over the Gaussian steps of ``roll``, with gradients to the model at
        every step (a step whose transition has no graph is recomputed on its detached state)."""
        field = self.chain.field(self.model)
        ref_field = self.chain.field(self.reference)
        total = 0.0
        for n in roll.noisy:
            tr, state = roll.states[n + 1].transition, roll.states[n]
            if not tr.mean.requires_grad:  # a step taken without gradients: its mean again, on its (detached) state
                tr = self.chain.transition(field, self.chain.at(roll, n), roll.cond)
            # KL_n is a function of x_n: where x_n carries gradients (the last K steps), so does the reference mean
            with torch.set_grad_enabled(state.x.requires_grad):
                ref = self.chain.transition(ref_field, state, roll.cond)
            total = total + step_kl(tr.mean, ref.mean, tr.std)
        return total


class DRaFT(_Chained):
    """``DRaFT(model, reference, reward, *, truncate=1, eta=0.0, solver="ancestral", steps=None, grid="uniform",
    batch_size=64, labels=None)``; see the module docstring.

    Args:
        model, reference, solver, steps, grid, batch_size, labels: as for :class:`~genkit.finetune.VARD`.
        reward: a differentiable :class:`~genkit.finetune.Reward` on the samples ``[B, *sample_shape]``.
        truncate: ``K``, how many of the last steps carry gradients (1..N; N is full backpropagation).
        eta: the KL weight (>= 0).
    """

    def __init__(self, model: nn.Module, reference: Any, reward: Reward, *, truncate: int = 1, eta: float = 0.0,
                 solver: str | Solver = "ancestral", steps: int | None = None,
                 grid: str | TimeGrid | Tensor | Sequence[float] = "uniform", batch_size: int = 64,
                 labels: Tensor | Sequence[int] | None = None):
        if not isinstance(reward, Reward) or not reward.differentiable:
            name = reward.name if isinstance(reward, Reward) else type(reward).__name__
            raise ConfigError(f"DRaFT backpropagates through the reward, but reward {name!r} is not declared "
                              "differentiable; use Reward(fn, differentiable=True) if fn has gradients with respect "
                              "to the samples, else use VARD (only its value network is differentiated) or DDPO")
        super().__init__("DRaFT", model, reference, reward, eta, solver, steps, grid, batch_size, labels)
        self.truncate = _int("truncate", truncate, 1, "It is how many of the last steps carry gradients (DRaFT-K).")
        n = len(self.chain.plan(model)[1]) - 1
        if self.truncate > n:
            raise ConfigError(f"truncate={truncate} exceeds the {n} steps of the grid; use 1 <= truncate <= {n}")

    def config(self) -> dict[str, Any]:
        return {"truncate": self.truncate, "eta": self.eta, "batch_size": self.batch_size,
                "labels": None if self.labels is None else self.labels.tolist(), **self.chain.config()}

    def rollout(self, n: int, generator: torch.Generator | None = None) -> ChainRollout:
        """``n`` trajectories of the model, the last ``truncate`` steps (and the final denoising) with gradients."""
        field, times, end_x0 = self.chain.plan(self.model)
        x = draw_prior(self.model, n, generator)
        cond = draw_cond(self.labels, n, generator, x.device)
        return self.chain.rollout(field, x, times, end_x0, cond, generator=generator, grad_steps=self.truncate)

    def loss(self, batch: Any, generator: torch.Generator | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """``-mean r(x_0) + eta * mean sum_n KL_n`` on ``batch_size`` trajectories drawn from ``generator``."""
        check_generator(generator, "DRaFT.loss")
        _no_batch(batch, "DRaFT")
        roll = self.rollout(self.batch_size, generator)
        r = self.reward(roll.samples)
        self._count(r.shape[0])
        loss = -r.mean()
        kl = torch.zeros((), dtype=r.dtype, device=r.device)
        if self.eta > 0:
            kl = self.kl_terms(roll).mean()
            loss = loss + self.eta * kl
        return loss, {"reward": r.detach().mean(), "kl": kl.detach()}


class DDPO(_Chained):
    """``DDPO(model, reference, reward, *, clip=1e-4, reuse=1, advantages="batch", eta=0.0, solver="ancestral",
    steps=None, grid="uniform", batch_size=64, labels=None)``; see the module docstring (DDPO's defaults: clip
    range 1e-4, per-prompt advantages for prompted models).

    Args:
        model, reference, solver, steps, grid, batch_size, labels: as for :class:`~genkit.finetune.VARD`.
        reward: a :class:`~genkit.finetune.Reward` (or callable, wrapped non-differentiable), queried under
            ``no_grad``.
        clip: the importance-ratio clip range (> 0); reuse: loss calls per rollout (>= 1).
        advantages: ``"batch"`` or ``"per_prompt"`` (needs labels).
        eta: the KL weight (>= 0).
    """

    def __init__(self, model: nn.Module, reference: Any, reward: Reward | Any, *, clip: float = 1e-4,
                 reuse: int = 1, advantages: str = "batch", eta: float = 0.0, solver: str | Solver = "ancestral",
                 steps: int | None = None, grid: str | TimeGrid | Tensor | Sequence[float] = "uniform",
                 batch_size: int = 64, labels: Tensor | Sequence[int] | None = None):
        super().__init__("DDPO", model, reference, as_reward(reward), eta, solver, steps, grid, batch_size, labels)
        self.clip = _real("clip", clip, "It is the importance-ratio clip range (DDPO: 1e-4).", positive=True)
        self.reuse = _int("reuse", reuse, 1, "It is the loss calls per rollout.")
        if advantages not in ADVANTAGES:
            raise ConfigError(f"advantages must be one of {ADVANTAGES}; got {advantages!r}")
        if advantages == "per_prompt" and self.labels is None:
            raise ConfigError("per-prompt advantages group the samples by their labels; this model is unconditional: "
                              "use advantages='batch'")
        self.advantages = advantages
        _, times, _ = self.chain.plan(model)
        p = next(model.parameters())
        shape = (len(times), self.batch_size, *model.sample_shape)
        self.register_buffer("loss_steps", torch.zeros((), dtype=torch.int64))
        self.register_buffer("buffer_x", torch.zeros(shape, dtype=p.dtype, device=p.device))
        self.register_buffer("buffer_logp", torch.zeros(len(times) - 1, self.batch_size, dtype=p.dtype,
                                                        device=p.device))
        self.register_buffer("buffer_adv", torch.zeros(self.batch_size, dtype=p.dtype, device=p.device))
        self.register_buffer("buffer_labels", torch.zeros(self.batch_size, dtype=torch.long, device=p.device))
        self.register_buffer("buffer_noisy", torch.zeros(len(times) - 1, dtype=torch.bool, device=p.device))

    def config(self) -> dict[str, Any]:
        return {"clip": self.clip, "reuse": self.reuse, "advantages": self.advantages, "eta": self.eta,
                "batch_size": self.batch_size, "labels": None if self.labels is None else self.labels.tolist(),
                **self.chain.config()}

    def rollout(self, n: int, generator: torch.Generator | None = None) -> ChainRollout:
        """``n`` trajectories of the current model, without gradients."""
        field, times, end_x0 = self.chain.plan(self.model)
        x = draw_prior(self.model, n, generator)
        cond = draw_cond(self.labels, n, generator, x.device)
        with torch.no_grad():
            return self.chain.rollout(field, x, times, end_x0, cond, generator=generator)

    @torch.no_grad()
    def refresh(self, generator: torch.Generator | None = None, *, count: bool = True) -> Tensor:
        """A new rollout into the buffers: states, old log-probabilities, advantages; returns its rewards (counted
        in :attr:`reward_queries` when ``count``)."""
        roll = self.rollout(self.batch_size, generator)
        r = self.reward(roll.samples).to(self.buffer_adv.dtype)
        if count:
            self.reward_queries += r.shape[0]
        labels = roll.cond.get("labels")
        self.buffer_x.copy_(torch.stack([s.x for s in roll.states]))
        self.buffer_noisy.zero_()
        self.buffer_logp.zero_()
        for n in roll.noisy:
            self.buffer_noisy[n] = True
            self.buffer_logp[n] = roll.states[n + 1].log_prob
        self.buffer_adv.copy_(advantages(r, labels, self.advantages))
        if labels is not None:
            self.buffer_labels.copy_(labels)
        self._last_reward = r.mean()
        return r

    def stored(self) -> tuple[list[SolverState], dict[str, Any]]:
        """The buffered rollout's states (restartable: ``x``, ``n`` and the solver's plan) and conditioning."""
        field, times, _ = self.chain.plan(self.model)
        cond = {} if self.labels is None else {"labels": self.buffer_labels}
        base = self.chain.init(field, self.buffer_x[0], times, None, cond)
        return [base._replace(x=self.buffer_x[n], n=n) for n in range(len(times))], cond

    def step_terms(self) -> tuple[Tensor, Tensor]:
        """On the buffered rollout, at its Gaussian steps: ``log p_theta(x_{n+1} | x_n)`` ``[S, B]`` and ``sum_n
        KL_n`` ``[B]`` (zeros when ``eta = 0``), both with gradients to the model (one model call a step)."""
        field = self.chain.field(self.model)
        ref_field = self.chain.field(self.reference) if self.eta > 0 else None
        states, cond = self.stored()
        logps, kl = [], torch.zeros(self.batch_size, dtype=self.buffer_x.dtype, device=self.buffer_x.device)
        for n in map(int, self.buffer_noisy.nonzero().flatten()):
            tr = self.chain.transition(field, states[n], cond)
            logps.append(tr.log_prob(self.buffer_x[n + 1]))
            if ref_field is not None:
                with torch.no_grad():
                    ref = self.chain.transition(ref_field, states[n], cond)
                kl = kl + step_kl(tr.mean, ref.mean, tr.std)
        return torch.stack(logps), kl

    def loss(self, batch: Any, generator: torch.Generator | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """The clipped surrogate summed over steps (+ the KL) on the buffered rollout; a new rollout every
        ``reuse`` training calls (drawn from ``generator``). An evaluation call (eval mode or no grad) scores a fresh
        rollout of its own and leaves the buffers as they were."""
        check_generator(generator, "DDPO.loss")
        _no_batch(batch, "DDPO")
        training = self.training and torch.is_grad_enabled()
        if not training:  # an evaluation call scores a fresh rollout and leaves the training one in the buffers
            kept = {name: b.clone() for name, b in self.named_buffers() if name.startswith("buffer_")}
            try:
                self.refresh(generator, count=False)
                return self._surrogate({"reward": self._last_reward})
            finally:
                for name, b in kept.items():
                    getattr(self, name).copy_(b)
        logs: dict[str, Tensor] = {}
        if int(self.loss_steps) % self.reuse == 0:
            self.refresh(generator)
            logs["reward"] = self._last_reward
        self.loss_steps += 1
        return self._surrogate(logs)

    def _surrogate(self, logs: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        logp, kl = self.step_terms()
        ratio = torch.exp(logp - self.buffer_logp[self.buffer_noisy])
        adv = self.buffer_adv[None]
        surrogate = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - self.clip, 1 + self.clip))
        loss = surrogate.sum(0).mean() + self.eta * kl.mean()
        logs.update(ratio=ratio.detach().mean(), kl=kl.detach().mean(),
                    clipped=((ratio.detach() - 1).abs() > self.clip).to(loss.dtype).mean())
        return loss, logs
