"""SEPO: policy-gradient fine-tuning of masked discrete diffusion for non-differentiable rewards through the
concrete score (Zekri & Boullé 2025; METHODS.md section 4). A first version (issue 12, item 4).

:class:`SEPO` is a data-free objective (``data_free = True``; ``loss(None, generator) -> (loss, logs)``) for
:class:`genkit.train.Trainer`; the module it trains (``model``) is an ``mdlm`` model, the reward (and the optional
KL reference) are frozen parts (:class:`genkit.frozen.Frozen`). The reward only ever sees long tokens ``[N, L]``
under ``no_grad`` (a differentiable reward is accepted and used the same way).

**The identity.** For an exact concrete score ``s(x)_y = q(y) / q(x)`` of a normalised ``q_theta``,
``grad log q(x) = -sum_y q(y) grad log s(x)_y`` (because ``sum_y q(y) grad log q(y) = 0``), summed over *all*
``y``. genkit, like the code, sums over the Hamming-1 neighbours only, which is not exact (``tests/test_sepo.py``
measures the gap on an enumerable table).

**The concrete score of an mdlm model** (:func:`neighbour_log_scores`): for a clean ``x`` and the neighbour ``y``
that puts token ``v`` at position ``l``, ``log s(x)_y = log p(x_0^l = v | x^{-l}) - log p(x_0^l = x^l | x^{-l})``,
the SUBS log-probabilities with position ``l`` alone masked, at time ``score_time`` (default ``1 / L``). This is
``log q(y) - log q(x)`` exactly when the denoiser's conditional is exact. (The code's "full_scores" path instead
reads the per-position softmax on the clean sequence at ``t = dt``; SUBS carries clean tokens over, so genkit
masks one position at a time: ``L`` network calls per sequence, batched.)

**Neighbour weights by SNIS** (:func:`snis_weights`). ``pi(y) ~ q_theta(y)`` over the neighbours is estimated
from ``snis`` (``M``) neighbours ``z_m`` drawn uniformly from the ``L (V - 1)`` Hamming-1 neighbours: weights
``w_m = s(x)_{z_m} / r(z_m)`` (target over proposal; ``r`` uniform), normalised over ``m``. (The code draws ``z``
from the model's own transition; genkit's uniform proposal keeps the weights exact target/proposal ratios.) The
weights are normalised over the neighbourhood, so they estimate ``q(y) / q(N(x))``, a positive per-sample scale of
the identity's ``q(y)``.

**The ratio** per drawn neighbour: ``ratio = [pi_theta(z)/pi_old(z)] * [s_old(x)_z / s_theta(x)_z]``, scores
clamped ``>= 1e-8`` before inversion, everything detached (for exact scores it is ``q_theta(x) / q_old(x)``). The
gradient is carried by ``rho = ratio * (1 - (log s_theta - sg(log s_theta)))``: its value is ``ratio``, its
gradient ``-ratio grad log s_theta``, so ``sum_m pi_theta(z_m) rho_m`` has the gradient the identity gives to
``q_theta(x) / q_old(x)`` and the minus sign of the identity is folded in. Gradients flow only through
``log s_theta``. Per sample ``u_i = sum_m pi_m rho_m`` (unclipped) and ``c_i = sum_m pi_m clip(rho_m, 1 - eps,
1 + eps)`` (``torch.clamp``: zero gradient for a neighbour whose ratio is outside the range).

**The clipped objective** (``reduction``):

- ``"batch"`` (default, **the code's** ``_compute_loss_sepo``): ``J = min(mean_i A_i u_i, mean_i A_i c_i)``, the min
  taken *after* the batch reduction. (The code's two branches are ``A . sum pi ratio log s`` values; genkit
  compares the ratio-valued surrogates, whose gradients are the same as the code's.)
- ``"sample"`` (**textbook PPO**): ``J = mean_i min(A_i u_i, A_i c_i)``, the min per sample.

``loss = -J + kl * KL``; ``KL`` (only with ``kl > 0`` and a ``reference``) is a pseudo-likelihood estimate on the
rollouts, ``mean_i sum_l KL(p_theta(x^l | x^{-l}) || p_ref(x^l | x^{-l}))`` at ``score_time`` (not the code's
DRAKES-style truncated path KL, and the reference is not re-synced: it stays the model given).

**GRPO groups and inner passes.** A rollout batch is ``batch_size`` groups of ``group`` (``G``) samples of the
model from all-MASK (:class:`~genkit.sampling.MaskedAncestralSampler`, ``steps`` steps); advantages are
``(R - mean) / (std + 1e-8)`` within each group (unbiased std; a constant group gets advantage 0). The Trainer
asks for one loss per step, so the objective draws a new rollout batch at every training loss call whose count
``loss_steps`` is a multiple of ``inner`` (``mu``), from that step's generator and the current weights, which
are then the "old" policy; the next ``inner - 1`` steps are the inner passes on the same batch. At the draw, the
samples, advantages and the old log-scores ``log s_old(x)`` ``[N, L, V]`` are stored in buffers (the old model
is needed for nothing else, so no copy is kept). **On resume** these buffers and ``loss_steps`` are restored
with the objective state, so a run resumed at any step (inside an inner cycle too) sees the same rollout batch,
advantages and old scores: bit-exact given the same per-step generators and deterministic kernels. What is *not*
covered: the neighbour draws use each step's generator (exact when the trainer seeds generators by step, as
genkit's does), and nondeterministic device kernels are outside genkit's control.

Official DNA settings: lr 1e-4, grad-clip 1.0, batch 16, 128 sampling steps, G = 8, mu = 5, eps = 0.2, M = 2,
KL off (1e-4 when on).

>>> import torch
>>> from genkit.models import MaskedDiffusion
>>> from genkit.finetune import Reward
>>> model, _ = MaskedDiffusion.example()
>>> reward = Reward(lambda x: (x[:, 0] == 1).float(), name="first_is_1")
>>> obj = SEPO(model, reward, group=4, inner=2, steps=3, batch_size=2)
>>> loss, logs = obj.loss(None, torch.Generator().manual_seed(0))
>>> sorted(logs)
['clip_frac', 'kl', 'ratio', 'reward']
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from ..checks import check_generator
from ..errors import ConfigError
from ..frozen import Frozen
from ..sampling import MaskedAncestralSampler
from .checks import _int, _real, check_policy, check_reference
from .rewards import Reward, as_reward

__all__ = ["SEPO", "group_advantages", "neighbour_log_scores", "snis_weights", "sepo_surrogate", "REDUCTIONS"]

REDUCTIONS = ("batch", "sample")
_LOG_SCORE_FLOOR = math.log(1e-8)  # scores clamped >= 1e-8 before inversion


def group_advantages(r: Tensor, group: int) -> Tensor:
    """GRPO advantages ``(R - mean) / (std + 1e-8)`` within consecutive groups of ``group`` rewards ``[N]``
    (unbiased std); a group of equal rewards gets 0."""
    g = r.reshape(-1, group)
    return ((g - g.mean(1, keepdim=True)) / (g.std(1, keepdim=True) + 1e-8)).reshape(-1)


def neighbour_log_scores(model: nn.Module, x: Tensor, t: float) -> tuple[Tensor, Tensor]:
    """``(log_s [N, L, V], logp [N, L, V])`` for clean tokens ``x [N, L]``: ``logp[i, l]`` the SUBS
    log-probabilities of position ``l`` with that position alone masked, ``log_s[i, l, v] = logp[i, l, v] -
    logp[i, l, x_i^l]`` (0 at ``v = x^l``), the log concrete score of the Hamming-1 neighbours."""
    n, length = x.shape
    v = model.vocab_size
    eye = torch.eye(length, dtype=torch.bool, device=x.device)
    xm = torch.where(eye[None], torch.full_like(x, model.mask_id)[:, None, :], x[:, None, :])  # [N, L(pos), L]
    lp = model.logits(xm.reshape(n * length, length), t)[..., :v].reshape(n, length, length, v)
    logp = lp.diagonal(dim1=1, dim2=2).permute(0, 2, 1)  # [N, L, V]: position l of the copy that masks l
    own = logp.gather(-1, x[..., None])
    return logp - own, logp


def snis_weights(log_target: Tensor, log_proposal: Tensor | float = 0.0) -> Tensor:
    """Self-normalised importance weights over the last dimension (the ``M`` draws): ``w_m = target(z_m) /
    proposal(z_m)`` normalised to sum to 1, from unnormalised log-target and log-proposal values."""
    return (log_target - log_proposal).softmax(-1)


def sepo_surrogate(adv: Tensor, log_s: Tensor, log_s_old: Tensor, *, clip: float,
                   reduction: str = "batch") -> tuple[Tensor, dict[str, Tensor]]:
    """The clipped SEPO objective ``J`` (to maximise) from advantages ``adv [N]`` and the log-scores of ``M``
    drawn neighbours ``log_s [N, M]`` (with gradients) and ``log_s_old [N, M]`` (the module docstring), with
    uniform-proposal SNIS weights. Returns ``(J, {"ratio": mean ratio, "clip_frac": fraction outside the
    range})``."""
    ls = log_s.clamp(min=_LOG_SCORE_FLOOR)
    lo = log_s_old.detach().clamp(min=_LOG_SCORE_FLOOR)
    pi, pi_old = snis_weights(ls.detach()), snis_weights(lo)
    ratio = (pi / pi_old) * (lo - ls.detach()).exp()
    rho = ratio * (1 - (ls - ls.detach()))
    u = (pi * rho).sum(-1)
    c = (pi * rho.clamp(1 - clip, 1 + clip)).sum(-1)
    if reduction == "batch":
        j = torch.minimum((adv * u).mean(), (adv * c).mean())
    else:
        j = torch.minimum(adv * u, adv * c).mean()
    out = ((ratio < 1 - clip) | (ratio > 1 + clip)).to(ratio.dtype).mean()
    return j, {"ratio": ratio.mean(), "clip_frac": out}


class SEPO(nn.Module):
    """``SEPO(model, reward, *, reference=None, group=8, inner=5, clip=0.2, snis=2, steps=128, kl=0.0,
    batch_size=16, reduction="batch", score_time=None)`` (official DNA settings); see the module docstring.

    Args:
        model: the ``mdlm`` model to fine-tune (trained in place; pass a copy to keep the pretrained one).
        reward: a :class:`~genkit.finetune.Reward` (or a callable, wrapped non-differentiable) on long tokens.
        reference: the frozen ``mdlm`` model of the KL (needed when ``kl > 0``).
        group: rollouts per GRPO group (>= 2); inner: training steps per rollout batch (``mu``, >= 1);
        clip: the PPO ``eps`` (> 0); snis: neighbours drawn per sample (``M``, >= 1); steps: sampling steps of
        the rollouts; kl: the KL weight (>= 0); batch_size: groups per rollout batch; reduction: ``"batch"``
        (the code's min after the batch mean) or ``"sample"`` (textbook PPO); score_time: the time of the
        one-masked-position score (None: ``1 / length``).
    """

    data_free = True

    def __init__(self, model: nn.Module, reward: Reward | Any, *, reference: nn.Module | None = None, group: int = 8,
                 inner: int = 5, clip: float = 0.2, snis: int = 2, steps: int = 128, kl: float = 0.0,
                 batch_size: int = 16, reduction: str = "batch", score_time: float | None = None):
        super().__init__()
        check_policy(model, "SEPO")
        if not isinstance(reward, Reward) and not callable(reward):
            raise ConfigError(f"reward must be a genkit Reward or a callable on long tokens [N, L] returning [N]; "
                              f"got {type(reward).__name__}. Wrap it: Reward(fn)")
        reward = as_reward(reward)
        self.group = _int("group", group, 2, "GRPO normalises rewards within a group of rollouts (official: 8).")
        self.inner = _int("inner", inner, 1, "It is mu, the training steps per rollout batch (official: 5).")
        self.clip = _real("clip", clip, "It is the PPO clipping eps (official: 0.2).", positive=True)
        self.snis = _int("snis", snis, 1, "It is M, the neighbours drawn per sample for SNIS (official: 2).")
        self.steps = _int("steps", steps, 1, "It is the number of sampling steps of a rollout (official: 128).")
        self.kl = _real("kl", kl, "It is the KL weight (official: 0, 1e-4 when on).", positive=False)
        self.batch_size = _int("batch_size", batch_size, 1, "It is the number of groups per rollout batch.")
        if reduction not in REDUCTIONS:
            raise ConfigError(f"reduction must be one of {REDUCTIONS} (the code's min after the batch mean, or "
                              f"textbook PPO's per-sample min); got {reduction!r}")
        self.reduction = reduction
        if score_time is None:
            score_time = 1.0 / model.length
        if isinstance(score_time, bool) or not isinstance(score_time, (int, float)) or not 0 < score_time <= 1:
            raise ConfigError(f"score_time must be in (0, 1] (the time of the one-masked-position score); got "
                              f"{score_time!r}")
        self.score_time = float(score_time)
        if reference is not None:
            check_reference(model, reference, "SEPO",
                            "SEPO(copy.deepcopy(pretrained), reward, reference=pretrained, ...)")
        if self.kl > 0 and reference is None:
            raise ConfigError(f"kl={kl} needs a reference model: SEPO(model, reward, reference=pretrained, kl=...)"
                              ", or set kl=0")
        self.model = model
        self.frozen = Frozen(reward=reward) if reference is None else Frozen(reward=reward, reference=reference)
        n, length, v = self.batch_size * self.group, model.length, model.vocab_size
        self.register_buffer("loss_steps", torch.zeros((), dtype=torch.int64))
        self.register_buffer("rollout_at", torch.full((), -1, dtype=torch.int64))  # loss step of the last draw
        self.register_buffer("rollout_x", torch.zeros(n, length, dtype=torch.int64))
        self.register_buffer("rollout_adv", torch.zeros(n))
        self.register_buffer("rollout_reward", torch.zeros(n))
        self.register_buffer("rollout_log_s", torch.zeros(n, length, v))

    @property
    def reward(self) -> Reward:
        return self.frozen.reward

    @property
    def reference(self) -> nn.Module | None:
        return self.frozen.get("reference")

    def config(self) -> dict[str, Any]:
        return {"group": self.group, "inner": self.inner, "clip": self.clip, "snis": self.snis,
                "steps": self.steps, "kl": self.kl, "batch_size": self.batch_size, "reduction": self.reduction,
                "score_time": self.score_time}

    def _device(self) -> torch.device:
        return self.loss_steps.device

    @torch.no_grad()
    def draw_rollouts(self, generator: torch.Generator | None = None) -> None:
        """A new rollout batch from the current weights (then the old policy): samples, rewards, group
        advantages and old log-scores, into the buffers."""
        m = self.model
        x = m.sample(self.batch_size * self.group, sampler=MaskedAncestralSampler(self.steps), generator=generator,
                     device=self._device())
        r = self.reward(x).to(self.rollout_adv.dtype)
        self.rollout_x.copy_(x)
        self.rollout_reward.copy_(r)
        self.rollout_adv.copy_(group_advantages(r, self.group))
        self.rollout_log_s.copy_(neighbour_log_scores(m, x, self.score_time)[0])
        self.rollout_at.fill_(int(self.loss_steps))

    def draw_neighbours(self, x: Tensor, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
        """``snis`` neighbours per sample, uniform over the ``L (V - 1)`` Hamming-1 ones: ``(pos, tok) [N, M]``."""
        n, length = x.shape
        v = self.model.vocab_size
        on = generator.device if generator is not None else x.device
        pos = torch.randint(length, (n, self.snis), generator=generator, device=on).to(x.device)
        other = torch.randint(v - 1, (n, self.snis), generator=generator, device=on).to(x.device)
        own = x.gather(1, pos)
        return pos, other + (other >= own).long()

    def loss(self, batch: Any, generator: torch.Generator | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """``-J + kl * KL`` on the current rollout batch (drawn anew every ``inner`` training loss calls);
        ``batch`` must be None (data-free). Logs the rollout batch's mean reward, the mean ratio, the clip
        fraction and the KL."""
        check_generator(generator, "SEPO.loss")
        if batch is not None:
            raise ConfigError("SEPO is data-free (its rollouts are its samples); call loss(None, generator) and "
                              "Trainer.fit() without data")
        if self.model.vocab_size < 2:
            raise ConfigError("SEPO needs vocab_size >= 2 (a sequence needs Hamming-1 neighbours)")
        training = self.training and torch.is_grad_enabled()
        step = int(self.loss_steps)
        if int(self.rollout_at) < 0 or (training and step % self.inner == 0 and int(self.rollout_at) != step):
            self.draw_rollouts(generator)
        x, adv = self.rollout_x, self.rollout_adv
        log_s, logp = neighbour_log_scores(self.model, x, self.score_time)
        pos, tok = self.draw_neighbours(x, generator)
        idx = (pos * self.model.vocab_size + tok)
        ls = log_s.flatten(1).gather(1, idx)
        lo = self.rollout_log_s.flatten(1).gather(1, idx)
        j, logs = sepo_surrogate(adv, ls, lo, clip=self.clip, reduction=self.reduction)
        kl = torch.zeros((), dtype=j.dtype, device=j.device)
        if self.kl > 0:
            with torch.no_grad():
                ref = neighbour_log_scores(self.reference, x, self.score_time)[1]
            kl = (logp.exp() * (logp - ref)).sum(-1).sum(-1).mean()
        loss = -j + self.kl * kl
        if training:
            self.loss_steps += 1
        return loss, {"reward": self.rollout_reward.mean(), "ratio": logs["ratio"].detach(),
                      "clip_frac": logs["clip_frac"], "kl": kl.detach()}
