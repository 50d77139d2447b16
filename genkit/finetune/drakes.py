"""DRAKES: reward fine-tuning of masked discrete diffusion by backpropagating a differentiable reward through a
Gumbel-softmax relaxation of the reverse process (Wang et al., ICLR 2025; METHODS.md section 3).

:class:`DRAKES` is a data-free objective (``data_free = True``; ``loss(None, generator) -> (loss, logs)``) for
:class:`genkit.train.Trainer`. The module it trains (``model``) is an ``mdlm`` model, a copy of the pretrained
one; the pretrained model itself (``reference``) and the reward are frozen parts (:class:`genkit.frozen.Frozen`).

**The rollout** (:meth:`DRAKES.rollout`). From the all-MASK prior, over the uniform grid ``1 = t_0 > ... >
t_steps = 0``, each reverse step ``t -> s`` draws every masked position from ``q(y) ∝ p_theta(x_0 = y | x_t)
(alpha_s - alpha_t)`` for a token ``y`` and ``∝ 1 - alpha_s`` for MASK (:func:`genkit.sampling.masked_reverse_step`).

- The first ``steps - truncate`` steps draw hard tokens, as the ancestral sampler does, and are detached.
- The last ``truncate`` steps replace the draw by a Gumbel-softmax sample ``softmax((log(q + 1e-8) + g) / tau)``
  (``g`` standard Gumbel, ``1e-10`` inside its logs), and the new state is ``soft_copy * x + (1 - soft_copy) *
  sample`` with ``soft_copy = 1 - x[..., MASK]``. The soft one-hots ``[B, L, V + 1]`` are fed back to the network
  (``states="soft"``, the paper's and the released code's). With ``states="straight_through"`` the sample is
  ``hard + (sample - sg(sample))``, ``hard`` the one-hot of ``argmax(log(q + 1e-8) + g)`` over the entries with
  ``q > 0``: a Gumbel-max draw, so every state is exactly one-hot in the forward pass and the rollout's law is the
  ancestral sampler's, while the gradient is the Gumbel-softmax sample's (a genkit option, not in the paper).
- The final sample is straight-through: ``hard + (soft - sg(soft))`` over the ``V`` token columns, so the
  forward value is exactly the one-hot of the argmax (the reward sees hard tokens) and the gradient is the soft
  sample's. With ``truncate = 0`` the whole path is hard and the reward term has no gradient at all.

**The loss** is ``-mean r(x_0) + alpha(step) * mean over the batch of KL``, where ``alpha(step) = alpha *
min(1, (step + 1) / alpha_warmup)`` (constant ``alpha`` when ``alpha_warmup = 0``; the official code's linear
warm-up) and ``step`` is the buffer :attr:`DRAKES.loss_steps`, the training-mode loss calls with gradients so far
(part of the objective's resume state, saved by the trainer beside the model's weights).

``kl="paper"`` (default), the paper's path KL of the two CTMCs: the rate out of MASK into ``y`` is ``-alpha'(t) /
(1 - alpha(t)) * p(x_0 = y | x_t)`` (``1 / t`` for the log-linear schedule), so the path KL is ``int_0^1
-alpha'(t) / (1 - alpha(t)) * sum over masked positions of KL(p_theta(.|x_t) || p_ref(.|x_t)) dt``. On the
sampling grid genkit takes the exact KL of the two discrete-time chains that the rollout samples from: a step
moves a masked position to ``y`` with probability ``c_k p(y | x_t)``, ``c_k = (alpha(t_{k+1}) - alpha(t_k)) / (1 -
alpha(t_k))``, and keeps it MASK with ``1 - c_k`` under both models, so the per-step KL factorises into

    ``KL = sum_k c_k * sum_{l: x_t^l = MASK} sum_y p_theta(y) log(p_theta(y) / p_ref(y))``

(a position counts as masked when the argmax of its soft one-hot is MASK, which is where SUBS gives the
network's probabilities; at unmasked positions both models are the same one-hot and contribute 0). For the
log-linear schedule ``c_k = (t_k - t_{k+1}) / t_k`` is exactly the left Riemann sum ``dt * 1 / t`` of the
continuous integral; for the cosine schedule the Riemann sum is not the chains' KL (its last step weighs
``dt * -w(dt) -> 2`` where the chains have ``c = 1``), and both tend to the integral as ``steps`` grows.

``kl="code"``, the estimator of the released code (``drakes_dna/finetune_reward_bp.py``): per step ``k``, with
``copy = 1 - x_t[..., MASK]`` (1 at *unmasked* inputs) and the current state's token part ``x_t[..., :V]``,

    ``KL_k = sum_l copy_l * sum_y x_t^l(y) * [p_ref(y) - p_theta(y) + p_theta(y) log(p_theta(y) / p_ref(y))]
    / (1 - alpha(t_k))``

summed over all steps with no ``dt``. Under SUBS both models are the same one-hot at unmasked positions, so this
picks up only the "leakage" of soft states (METHODS.md section 3, pitfalls); it is offered for comparison.

In both forms the KL is evaluated at every step (the official default ``truncate_kl=False``): the network's
probabilities carry gradients at every step, the states only in the last ``truncate`` steps.

**What the toy shows** (METHODS.md section 3's faithful test, ``tests/test_drakes.py``; vocabulary 4, length 4,
4 sampling steps = truncate, a linear reward, alpha 1; every law computed exactly by enumerating the sampler's
chain, no histograms). The target is ``p* ∝ p_pre exp(r / alpha)`` with ``p_pre`` the pretrained model's own
4-step law, ``TV(p_pre, p*) = 0.567``.

- The discretised objective is not the obstacle: maximising the exact ``E r - alpha KL`` of the 4-step chains
  (the expectation and the KL above by enumeration) reaches ``TV(., p*) = 0.021``, with a free table of
  per-state logits as with the same small network after 200 Adam steps (the factorised chain cannot represent
  the tilted path law exactly, but nearly).
- The estimator is. With the default ``states="soft", tau=1`` DRAKES ends at ``TV = 0.37`` after 200 steps,
  above half of 0.567, and its law is instead close to the tilted target of a larger alpha: ``TV(., p_pre exp(r
  / 2.5)) = 0.07``. It is a fixed point, not slow progress: at V = L = 3 the TV is 0.218, 0.214 and 0.215 after
  60 steps, 300 steps, and 300 steps at lr 3e-3 with batch 256. Averaged over 25600 rollouts (V = L = 3), its
  reward gradient is ``0.43`` (at ``p_pre``) to ``0.52`` (at the exact optimum) times the exact one along it
  (cosine 0.96) and its KL gradient ``1.29`` times: the Gumbel-softmax relaxation damps the reward's pull and
  the soft states (inputs the network never saw in pretraining, partly masked positions) inflate the KL's, so
  the fixed point is that of ``alpha * ~2.5``. Smaller ``tau`` with soft states helps some and gets noisy
  (``tau = 0.3``: 0.27 at V = L = 4, just under half; ``tau = 0.1`` at V = L = 3: 0.09 and 0.19 after 300 and
  600 steps).
- ``states="straight_through"`` (the states the network sees are the sampler's own) makes the KL gradient
  right (projection 1.00, cosine 1.000 at the optimum, V = L = 3) and damps the reward's less, ``0.73`` at
  ``tau = 1`` and ``0.87`` at ``tau = 0.3``: ``TV = 0.25`` and ``0.10`` at V = L = 4, both below half, which
  is the issue's quality bar; a large alpha still stays at ``p_pre`` and alpha = 0 still collapses onto the
  argmax. The default stays the paper's and code's soft states; the official DNA and protein runs use them at
  ``tau = 1`` and ``0.5``, so on this evidence their alpha acts as a larger one.
- ``kl="code"`` is no regulariser here: it sees only the leakage of soft states (0 at one-hot states), and
  alpha = 1 collapses onto the argmax of r as alpha = 0 does.

Gradient accumulation (the official runs accumulate 4 (DNA) or 8 (protein) batches of 32 or 16):
``TrainConfig(batch_size=..., gradient_accumulation_steps=4)``. The trainer then calls :meth:`DRAKES.loss` 4 times
per optimizer step, each with its own generator, and steps on the gradient of the mean of the 4 losses, as the
code's ``loss / num_accum_steps`` does; ``batch_size`` here is the rollouts of one call (the code's 32). The
loss calls count micro-batches, so :attr:`loss_steps` advances ``A`` per optimizer step and ``alpha_warmup`` is
in loss calls: the code's warm-up over ``W`` updates ("epochs") is ``alpha_warmup = W * A`` (the code keeps alpha
constant over an update's micro-batches; here it also rises within one).

>>> import copy, torch
>>> from genkit.models import MaskedDiffusion
>>> from genkit.finetune import Reward
>>> pre, _ = MaskedDiffusion.example()
>>> reward = Reward(lambda x: x[..., 0].sum(-1), differentiable=True, name="count0")
>>> obj = DRAKES(copy.deepcopy(pre), pre, reward, steps=4, truncate=2, batch_size=8)
>>> loss, logs = obj.loss(None, torch.Generator().manual_seed(0))
>>> sorted(logs)
['alpha', 'kl', 'reward']
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checks import check_generator
from ..errors import ConfigError
from ..frozen import Frozen
from ..sampling import masked_reverse_step
from .checks import _int, _real, check_policy, check_reference
from .rewards import Reward

__all__ = ["DRAKES", "Rollout", "gumbel_softmax", "kl_terms", "relaxed_rollout"]

KL_FORMS = ("paper", "code")
STATES = ("soft", "straight_through")
_LOG_FLOOR = -1e4  # stands in for log 0 (SUBS's -inf) in the KL, so 0 * (log 0 - log 0) is 0, not nan


def gumbel_softmax(logits: Tensor, tau: float, generator: torch.Generator | None = None) -> Tensor:
    """A Gumbel-softmax sample ``softmax((logits + g) / tau)`` over the last dimension, ``g = -log(-log(u +
    1e-10) + 1e-10)`` with ``u`` uniform from ``generator`` (as tau -> 0 its argmax is a draw from
    ``softmax(logits)``: the Gumbel-max trick)."""
    return ((logits + _gumbel(logits, generator)) / tau).softmax(-1)


def _gumbel(like: Tensor, generator: torch.Generator | None) -> Tensor:
    """Standard Gumbel noise of ``like``'s shape, dtype and device, ``-log(-log(u + 1e-10) + 1e-10)``."""
    on = generator.device if generator is not None else like.device
    u = torch.rand(like.shape, generator=generator, device=on, dtype=like.dtype).to(like.device)
    return -torch.log(-torch.log(u + 1e-10) + 1e-10)


class Rollout(NamedTuple):
    """One relaxed trajectory: ``x0`` the straight-through final sample ``[B, L, V]``; per step ``k`` (from
    ``t = 1``), ``states[k]`` the state ``x_{t_k}`` ``[B, L, V + 1]`` fed to the network, ``logp[k]`` the model's
    SUBS log-probabilities there ``[B, L, V + 1]`` (with gradients), ``times`` the grid ``[steps + 1]``."""

    x0: Tensor
    states: list[Tensor]
    logp: list[Tensor]
    times: Tensor


def relaxed_rollout(model: nn.Module, n: int, steps: int, truncate: int, tau: float,
                    generator: torch.Generator | None = None, *, states: str = "soft") -> Rollout:
    """``n`` relaxed trajectories of ``model`` from all-MASK over ``steps`` reverse steps, the last ``truncate``
    of them Gumbel-softmax at temperature ``tau`` (the module docstring's rollout), drawn from ``generator``;
    ``states`` ``"soft"`` (the paper's and code's soft one-hots) or ``"straight_through"`` (the exact one-hot
    Gumbel-max draw forward, the Gumbel-softmax gradient backward)."""
    if states not in STATES:
        raise ConfigError(f"states must be one of {STATES} (soft one-hot states as in the paper and code, or "
                          f"hard one-hot states with straight-through gradients); got {states!r}")
    m = model
    v, mask_id = m.vocab_size, m.mask_id
    device = next((p.device for p in m.parameters()), torch.device("cpu"))
    times = torch.linspace(1, 0, steps + 1, dtype=torch.float64)
    x = F.one_hot(torch.full((n, m.length), mask_id, dtype=torch.long, device=device), v + 1)
    x = x.to(torch.get_default_dtype())
    path, logps = [], []
    first_soft = steps - truncate
    for k in range(steps):
        t, s = float(times[k]), float(times[k + 1])
        logp = m.logits(x, t)
        path.append(x)
        logps.append(logp)
        if k < first_soft:  # hard and detached, exactly the ancestral sampler's step
            tokens = masked_reverse_step(m, x.argmax(-1), logp.detach(), t, s, generator)
            x = F.one_hot(tokens, v + 1).to(x.dtype)
            continue
        a_t, a_s = (float(m.schedule.alpha(torch.tensor(u, dtype=torch.float64))) for u in (t, s))
        p = logp.exp()[..., :v] * ((a_s - a_t) / (1 - a_t))
        q = torch.cat([p, torch.full_like(p[..., :1], (1 - a_s) / (1 - a_t))], -1)
        z = torch.log(q + 1e-8) + _gumbel(q, generator)
        sample = (z / tau).softmax(-1)
        if states == "straight_through":  # argmax z is a Gumbel-max draw from q (q = 0 excluded: exact law)
            hard = F.one_hot(z.masked_fill(q == 0, -torch.inf).argmax(-1), v + 1).to(sample.dtype)
            sample = hard + (sample - sample.detach())
        soft_copy = 1 - x[..., mask_id:]
        x = soft_copy * x + (1 - soft_copy) * sample
    soft = x[..., :v]
    hard = F.one_hot(soft.argmax(-1), v).to(soft.dtype)
    x0 = hard + (soft - soft.detach())  # exactly the one-hot forward, the soft sample's gradient
    return Rollout(x0, path, logps, times)


def kl_terms(model: nn.Module, reference: nn.Module, roll: Rollout, form: str = "paper") -> Tensor:
    """The KL of ``model`` to ``reference`` at each step and sample of ``roll``, ``[steps, B]``, in ``form``
    ``"paper"`` or ``"code"`` (the module docstring; its sum over steps is the KL)."""
    v, mask_id = model.vocab_size, model.mask_id
    out = []
    for k, (x, logp) in enumerate(zip(roll.states, roll.logp)):
        t, s = roll.times[k], roll.times[k + 1]
        logq = reference.logits(x, float(t))
        lp, lq = logp[..., :v].clamp(min=_LOG_FLOOR), logq[..., :v].clamp(min=_LOG_FLOOR)
        p = lp.exp()
        if form == "paper":
            a_t, a_s = float(model.schedule.alpha(t)), float(model.schedule.alpha(s))
            masked = (x.argmax(-1) == mask_id).to(p.dtype)
            per_pos = (p * (lp - lq)).sum(-1) * masked
            out.append((a_s - a_t) / (1 - a_t) * per_pos.sum(-1))
        else:
            move = float(1 - model.schedule.alpha(t))
            copy = 1 - x[..., mask_id]
            term = (lq.exp() - p + p * (lp - lq)) * x[..., :v]
            out.append((copy * term.sum(-1)).sum(-1) / move)
    return torch.stack(out)


class DRAKES(nn.Module):
    """``DRAKES(model, reference, reward, *, steps=128, truncate=50, tau=1.0, alpha=1e-3, alpha_warmup=0,
    kl="paper", states="soft", batch_size=32)`` (official DNA settings); see the module docstring.

    Args:
        model: the ``mdlm`` model to fine-tune (a copy of ``reference``, e.g. ``copy.deepcopy(pretrained)``).
        reference: the frozen pretrained ``mdlm`` model (same vocabulary, length and schedule).
        reward: a differentiable :class:`~genkit.finetune.Reward` on soft one-hots ``[B, L, V]``.
        steps: reverse steps of the rollout; truncate: how many of the last steps carry gradients (0..steps).
        tau: the Gumbel-softmax temperature (> 0); alpha: the KL weight (>= 0); alpha_warmup: loss steps of its
            linear warm-up (0: none); kl: ``"paper"`` or ``"code"``; states: ``"soft"`` (the paper's and code's
            soft one-hot states) or ``"straight_through"`` (hard states forward, soft gradients; closer to the
            objective's optimum on the toy, see "What the toy shows"); batch_size: rollouts per loss.
    """

    data_free = True

    def __init__(self, model: nn.Module, reference: nn.Module, reward: Reward, *, steps: int = 128,
                 truncate: int = 50, tau: float = 1.0, alpha: float = 1e-3, alpha_warmup: int = 0,
                 kl: str = "paper", states: str = "soft", batch_size: int = 32):
        super().__init__()
        check_policy(model, "DRAKES")
        check_reference(model, reference, "DRAKES", "DRAKES(copy.deepcopy(pretrained), pretrained, reward, ...)")
        if not isinstance(reward, Reward):
            raise ConfigError(f"reward must be a genkit Reward; got {type(reward).__name__}. Wrap it: "
                              "Reward(fn, differentiable=True) with fn taking soft one-hots [B, L, V]")
        if not reward.differentiable:
            raise ConfigError(f"DRAKES backpropagates through the reward, but reward {reward.name!r} is not "
                              "differentiable; declare Reward(fn, differentiable=True) if fn has gradients on "
                              "soft one-hots [B, L, V], else use SEPO or SVDD (genkit.finetune.SVDDSampler), "
                              "which need only reward values")
        self.steps = _int("steps", steps, 1, "It is the number of reverse steps of the rollout (official: 128).")
        self.truncate = _int("truncate", truncate, 0, "It is how many of the last steps carry gradients.")
        if self.truncate > self.steps:
            raise ConfigError(f"truncate={truncate} exceeds steps={steps}; use 0 <= truncate <= steps (official: "
                              "50 of 128)")
        self.tau = _real("tau", tau, "It is the Gumbel-softmax temperature (official: 1.0 DNA, 0.5 protein).",
                         positive=True)
        self.alpha = _real("alpha", alpha, "It is the KL weight (official: 1e-3; 0 disables the KL).",
                           positive=False)
        self.alpha_warmup = _int("alpha_warmup", alpha_warmup, 0, "It is the loss steps of alpha's linear warm-up "
                                 "(0: none).")
        if kl not in KL_FORMS:
            raise ConfigError(f"kl must be one of {KL_FORMS} (the paper's masked-position KL, or the released "
                              f"code's estimator); got {kl!r}")
        self.kl = kl
        if states not in STATES:
            raise ConfigError(f"states must be one of {STATES} (the paper's and code's soft one-hot states, or "
                              f"hard one-hot states with straight-through gradients at every step); got {states!r}")
        self.states = states
        self.batch_size = _int("batch_size", batch_size, 1, "It is the number of rollouts per loss.")
        self.model = model
        self.frozen = Frozen(reference=reference, reward=reward)
        self.register_buffer("loss_steps", torch.zeros((), dtype=torch.int64))

    @property
    def reference(self) -> nn.Module:
        return self.frozen.reference

    @property
    def reward(self) -> Reward:
        return self.frozen.reward

    def config(self) -> dict[str, Any]:
        return {"steps": self.steps, "truncate": self.truncate, "tau": self.tau, "alpha": self.alpha,
                "alpha_warmup": self.alpha_warmup, "kl": self.kl, "states": self.states,
                "batch_size": self.batch_size}

    def alpha_at(self, step: int) -> float:
        """The KL weight at loss step ``step`` (0-based): ``alpha * min(1, (step + 1) / alpha_warmup)``."""
        if self.alpha_warmup == 0:
            return self.alpha
        return self.alpha * min(1.0, (step + 1) / self.alpha_warmup)

    def times(self) -> Tensor:
        """The grid ``[steps + 1]`` (float64) from 1 down to 0, the masked ancestral sampler's."""
        return torch.linspace(1, 0, self.steps + 1, dtype=torch.float64)

    # --- the relaxed trajectory -------------------------------------------------------------------------------
    def rollout(self, n: int, generator: torch.Generator | None = None) -> Rollout:
        """``n`` relaxed trajectories of the model from all-MASK (the module docstring's rollout), drawn from
        ``generator``."""
        return relaxed_rollout(self.model, n, self.steps, self.truncate, self.tau, generator, states=self.states)

    def kl_terms(self, roll: Rollout) -> Tensor:
        """The KL of each step and sample, ``[steps, B]`` (``kl`` form; its sum over steps is the KL)."""
        return kl_terms(self.model, self.reference, roll, self.kl)

    def loss(self, batch: Any, generator: torch.Generator | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """``-mean r(x_0) + alpha(step) * mean KL`` over ``batch_size`` rollouts drawn from ``generator``;
        ``batch`` must be None (data-free). Logs the mean reward (of the hard samples), KL and alpha."""
        check_generator(generator, "DRAKES.loss")
        if batch is not None:
            raise ConfigError("DRAKES is data-free (its rollouts are its samples); call loss(None, generator) and "
                              "Trainer.fit() without data")
        training = self.training and torch.is_grad_enabled()
        alpha = self.alpha_at(int(self.loss_steps))
        roll = self.rollout(self.batch_size, generator)
        r = self.reward(roll.x0)
        kl = self.kl_terms(roll).sum(0).mean()
        loss = -r.mean() + alpha * kl
        if training:
            self.loss_steps += 1
        logs = {"reward": r.detach().mean(), "kl": kl.detach(), "alpha": torch.tensor(alpha)}
        return loss, logs
