"""SEPO: policy-gradient fine-tuning of masked discrete diffusion for non-differentiable rewards through the
concrete score (Zekri & Boullé 2025, arXiv 2502.01384; METHODS.md section 4).

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

``loss = -J + kl * KL - entropy * H``.

**The KL** (only with ``kl > 0``), ``kl_form``:

- ``"pseudo"`` (default): the paper's objective, ``E r - kl * KL(q_theta || q_pre)`` with the *pretrained*
  model as the fixed ``reference``, through genkit's pseudo-likelihood estimate on the rollouts, ``mean_i
  sum_l KL(p_theta(x^l | x^{-l}) || p_ref(x^l | x^{-l}))`` at ``score_time`` (the conditionals the concrete
  score is made of; 0 exactly when the two conditionals agree everywhere).
- ``"code"``: the released code's (``grpo_train.py``, ``put_kl``): the reference is the model's own weights,
  re-copied every ``ref_sync`` training loss calls (official: every epoch of 10 GRPO steps x ``mu`` 5 = 50),
  so the KL is a trust region to a recent iterate, not a pull to the pretrained model; it is DRAKES' code
  estimator (:func:`genkit.finetune.drakes.kl_terms`, form ``"code"``) on a fresh relaxed rollout of
  ``batch_size`` sequences of the current model (:func:`~genkit.finetune.drakes.relaxed_rollout`, the last
  ``kl_truncate`` steps Gumbel-softmax at tau 1), summed over those last ``kl_truncate`` steps only (official:
  50 of 128; ``truncate_kl=True``). That estimator is exactly 0 at the hard (detached) steps, where both
  models are the same one-hot at unmasked positions under SUBS, so with the relaxation and the KL truncated to
  the same last steps (the code's two settings, both 50) the sum drops only zeros. No ``reference`` is passed:
  the re-synced copy is the objective's own state (saved with the resume state, not a frozen part).

**Entropy bonus** (``entropy > 0``; the code's ``entropy``, coefficient 1e-5 when on): ``H = mean_{i, l}
H(p_theta(. | x_i^{-l}))`` at ``score_time`` on the rollout batch, the entropy of the conditionals the scores
are made of (the code's is of the per-position softmax on a clean fresh sample at ``t = dt``, its "full_scores"
proxy); it costs no extra network call and is logged (``"entropy"``) whatever the coefficient.

**GRPO groups and inner passes.** A rollout batch is ``batch_size`` groups of ``group`` (``G``) samples of the
model from all-MASK (:class:`~genkit.sampling.MaskedAncestralSampler`, ``steps`` steps); ``scaling`` sets the
advantages and the batch reduction:

- ``"grpo"`` (default, the code's): ``A = (R - mean) / (std + 1e-8)`` within each group (unbiased std; a
  constant group gets 0), ``J`` a mean over the ``G * batch_size`` samples.
- ``"dr_grpo"`` (Dr. GRPO, Liu et al. 2025, arXiv 2503.20783): ``A = R - mean``, without the std normalisation
  (which over-weights groups of small reward spread); the paper's other change, no ``1 / |o|`` length
  normalisation, has nothing to remove here (sequences have one length ``L``, and ``J`` sums over neighbours).
- ``"code_dr_grpo"``: the released code's ``dr_grpo`` flag, which keeps the std-normalised advantages and
  multiplies the reward loss by its batch size (``unb * _compute_loss_sepo``): ``J`` times ``batch_size``, a
  sum over each group index's batch instead of a mean. (Under Adam a constant factor mostly matters against
  ``kl``, ``entropy`` and the gradient clip.)

The Trainer
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
KL off (1e-4 when on, the code form), entropy off (1e-5 when on), ``scaling="grpo"``.

With ``TrainConfig(gradient_accumulation_steps=A)`` every micro-batch is one loss call: ``inner`` and ``ref_sync``
count loss calls, so a rollout batch serves ``inner`` micro-batches (choose ``inner`` a multiple of ``A`` for
whole optimizer steps per rollout batch).

**What the enumerable toy shows** (``tests/test_sepo.py``, exact sampler laws, non-differentiable bigram reward,
the KL to the pretrained model): the reward rises and the law moves toward ``p* ∝ p_pre exp(r / kl)``, the TV
to ``p*`` falling to 0.4-0.5 of ``TV(p_pre, p*)`` (to a quarter with ``scaling="dr_grpo"`` at V = L = 3, to
0.6-0.7 at V = L = 4), with a clip fraction of 0.16-0.22 at ``eps = 0.2`` and lr 3e-3; but ``p*`` is not a
fixed point. With GRPO's std-normalised advantages the reward overshoots ``E_p* r`` (the std rescales the
reward), and with either scaling the pseudo-likelihood KL holds the one-masked conditionals the scores are made
of, not the ancestral sampler's law, so long runs drift (TV back up to 0.5-0.7 of ``TV(p_pre, p*)``). A KL on
the sampler's path (DRAKES' paper form on the rollout trajectories) was tried and pinned the law at ``p_pre``:
the SEPO update moves the sampler only through the one-masked conditionals, which that KL also holds; it is not
offered.

>>> import torch
>>> from genkit.models import MaskedDiffusion
>>> from genkit.finetune import Reward
>>> model, _ = MaskedDiffusion.example()
>>> reward = Reward(lambda x: (x[:, 0] == 1).float(), name="first_is_1")
>>> obj = SEPO(model, reward, group=4, inner=2, steps=3, batch_size=2)
>>> loss, logs = obj.loss(None, torch.Generator().manual_seed(0))
>>> sorted(logs)
['clip_frac', 'entropy', 'kl', 'ratio', 'reward']
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import Tensor, nn

from ..checks import check_generator
from ..errors import ConfigError
from ..frozen import Frozen
from ..sampling import MaskedAncestralSampler
from .checks import _int, _real, check_policy, check_reference
from .drakes import kl_terms, relaxed_rollout
from .rewards import Reward, as_reward

__all__ = ["SEPO", "group_advantages", "neighbour_log_scores", "snis_weights", "sepo_surrogate", "conditional_entropy",
           "REDUCTIONS", "SCALINGS", "KL_FORMS"]

REDUCTIONS = ("batch", "sample")
SCALINGS = ("grpo", "dr_grpo", "code_dr_grpo")
KL_FORMS = ("pseudo", "code")
_LOG_SCORE_FLOOR = math.log(1e-8)  # scores clamped >= 1e-8 before inversion


def group_advantages(r: Tensor, group: int, normalise: bool = True) -> Tensor:
    """GRPO advantages ``(R - mean) / (std + 1e-8)`` within consecutive groups of ``group`` rewards ``[N]``
    (unbiased std); a group of equal rewards gets 0. ``normalise=False``: Dr. GRPO's ``R - mean``."""
    g = r.reshape(-1, group)
    centred = g - g.mean(1, keepdim=True)
    return (centred / (g.std(1, keepdim=True) + 1e-8) if normalise else centred).reshape(-1)


def conditional_entropy(logp: Tensor) -> Tensor:
    """``mean_{i, l} H(p_i^l)`` of log-probabilities ``logp [N, L, V]`` (a zero probability contributes 0)."""
    p = logp.exp()
    return -(p * logp.clamp(min=-1e4)).sum(-1).mean()


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
    batch_size=16, reduction="batch", score_time=None, scaling="grpo", entropy=0.0, kl_form="pseudo",
    kl_truncate=None, ref_sync=None)`` (official DNA settings); see the module docstring.

    Args:
        model: the ``mdlm`` model to fine-tune (trained in place; pass a copy to keep the pretrained one).
        reward: a :class:`~genkit.finetune.Reward` (or a callable, wrapped non-differentiable) on long tokens.
        reference: the frozen ``mdlm`` model of the KL (needed when ``kl > 0``).
        group: rollouts per GRPO group (>= 2); inner: training steps per rollout batch (``mu``, >= 1);
        clip: the PPO ``eps`` (> 0); snis: neighbours drawn per sample (``M``, >= 1); steps: sampling steps of
        the rollouts; kl: the KL weight (>= 0); batch_size: groups per rollout batch; reduction: ``"batch"``
        (the code's min after the batch mean) or ``"sample"`` (textbook PPO); score_time: the time of the
        one-masked-position score (None: ``1 / length``); scaling: ``"grpo"``, ``"dr_grpo"`` or
        ``"code_dr_grpo"``; entropy: the entropy bonus weight (>= 0); kl_form: ``"pseudo"`` (to the pretrained
        ``reference``) or ``"code"`` (to a re-synced copy, no ``reference``); kl_truncate: the last steps of
        the code-form KL (None: ``min(50, steps)``); ref_sync: loss calls between re-syncs of the code form's
        reference (None: 50). The last two only with ``kl_form="code"``.
    """

    data_free = True

    def __init__(self, model: nn.Module, reward: Reward | Any, *, reference: nn.Module | None = None, group: int = 8,
                 inner: int = 5, clip: float = 0.2, snis: int = 2, steps: int = 128, kl: float = 0.0,
                 batch_size: int = 16, reduction: str = "batch", score_time: float | None = None,
                 scaling: str = "grpo", entropy: float = 0.0, kl_form: str = "pseudo", kl_truncate: int | None = None,
                 ref_sync: int | None = None):
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
        if scaling not in SCALINGS:
            raise ConfigError(f"scaling must be one of {SCALINGS} (GRPO's std-normalised advantages, Dr. GRPO's "
                              f"R - mean, or the released code's dr_grpo flag); got {scaling!r}")
        self.scaling = scaling
        self.entropy = _real("entropy", entropy, "It is the entropy bonus weight (official: 0, 1e-5 when on).",
                             positive=False)
        if kl_form not in KL_FORMS:
            raise ConfigError(f"kl_form must be one of {KL_FORMS} (the KL to the pretrained reference, or the "
                              f"released code's KL to a re-synced copy); got {kl_form!r}")
        self.kl_form = kl_form
        if kl_form == "pseudo":
            for name, value in (("kl_truncate", kl_truncate), ("ref_sync", ref_sync)):
                if value is not None:
                    raise ConfigError(f"{name}={value!r} is a setting of the code-form KL; pass kl_form='code' "
                                      f"with it, or leave {name} out")
            self.kl_truncate, self.ref_sync = 0, 0
        else:
            if reference is not None:
                raise ConfigError("kl_form='code' keeps its own reference, a copy of the model re-synced every "
                                  "ref_sync loss calls; pass reference=None (or kl_form='pseudo' for the KL to "
                                  "the pretrained reference)")
            self.kl_truncate = _int("kl_truncate", min(50, steps) if kl_truncate is None else kl_truncate, 1,
                                    "It is how many of the last rollout steps the code-form KL sums (official: "
                                    "50).")
            if self.kl_truncate > self.steps:
                raise ConfigError(f"kl_truncate={kl_truncate} exceeds steps={steps}; use 1 <= kl_truncate <= "
                                  "steps (official: 50 of 128)")
            self.ref_sync = _int("ref_sync", 50 if ref_sync is None else ref_sync, 1, "It is the loss calls "
                                 "between re-syncs of the reference (official: 10 GRPO steps x mu 5 = 50).")
        if reference is not None:
            check_reference(model, reference, "SEPO",
                            "SEPO(copy.deepcopy(pretrained), reward, reference=pretrained, ...)")
        if self.kl > 0 and reference is None and kl_form == "pseudo":
            raise ConfigError(f"kl={kl} needs a reference model: SEPO(model, reward, reference=pretrained, kl=...)"
                              ", or set kl=0 (or kl_form='code', the KL to a re-synced copy of the model)")
        self.model = model
        self.frozen = Frozen(reward=reward) if reference is None else Frozen(reward=reward, reference=reference)
        # the code form's reference: trained state (re-synced), so saved with the objective, never trained
        self.synced = copy.deepcopy(model).requires_grad_(False).eval() if kl_form == "code" else None
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
                "score_time": self.score_time, "scaling": self.scaling, "entropy": self.entropy,
                "kl_form": self.kl_form, "kl_truncate": self.kl_truncate, "ref_sync": self.ref_sync}

    def train(self, mode: bool = True) -> SEPO:
        super().train(mode)
        if self.synced is not None:  # the re-synced reference is evaluated, never trained
            self.synced.eval()
        return self

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
        self.rollout_adv.copy_(group_advantages(r, self.group, normalise=self.scaling != "dr_grpo"))
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
        """``-J + kl * KL - entropy * H`` on the current rollout batch (drawn anew every ``inner`` training loss
        calls); ``batch`` must be None (data-free). Logs the rollout batch's mean reward, the mean ratio, the
        clip fraction (the share of drawn neighbours whose ratio is outside ``[1 - clip, 1 + clip]``), the KL
        and the entropy ``H``."""
        check_generator(generator, "SEPO.loss")
        if batch is not None:
            raise ConfigError("SEPO is data-free (its rollouts are its samples); call loss(None, generator) and "
                              "Trainer.fit() without data")
        if self.model.vocab_size < 2:
            raise ConfigError("SEPO needs vocab_size >= 2 (a sequence needs Hamming-1 neighbours)")
        training = self.training and torch.is_grad_enabled()
        step = int(self.loss_steps)
        if self.synced is not None and training and step % self.ref_sync == 0:
            self.sync_reference()
        if int(self.rollout_at) < 0 or (training and step % self.inner == 0 and int(self.rollout_at) != step):
            self.draw_rollouts(generator)
        x, adv = self.rollout_x, self.rollout_adv
        log_s, logp = neighbour_log_scores(self.model, x, self.score_time)
        pos, tok = self.draw_neighbours(x, generator)
        idx = (pos * self.model.vocab_size + tok)
        ls = log_s.flatten(1).gather(1, idx)
        lo = self.rollout_log_s.flatten(1).gather(1, idx)
        j, logs = sepo_surrogate(adv, ls, lo, clip=self.clip, reduction=self.reduction)
        if self.scaling == "code_dr_grpo":
            j = j * self.batch_size
        kl = self.kl_estimate(x, logp, generator) if self.kl > 0 else torch.zeros((), dtype=j.dtype,
                                                                                  device=j.device)
        h = conditional_entropy(logp)
        loss = -j + self.kl * kl
        if self.entropy > 0:
            loss = loss - self.entropy * h
        if training:
            self.loss_steps += 1
        return loss, {"reward": self.rollout_reward.mean(), "ratio": logs["ratio"].detach(),
                      "clip_frac": logs["clip_frac"], "kl": kl.detach(), "entropy": h.detach()}

    @torch.no_grad()
    def sync_reference(self) -> None:
        """Copy the model's current weights into the code-form KL's reference."""
        self.synced.load_state_dict(self.model.state_dict())

    def kl_estimate(self, x: Tensor, logp: Tensor, generator: torch.Generator | None) -> Tensor:
        """The KL term (``kl_form``; the module docstring): ``"pseudo"`` from the rollouts ``x`` and their
        conditionals ``logp [N, L, V]``, ``"code"`` on a fresh relaxed rollout drawn from ``generator``."""
        if self.kl_form == "pseudo":
            with torch.no_grad():
                ref = neighbour_log_scores(self.reference, x, self.score_time)[1]
            return (logp.exp() * (logp - ref)).sum(-1).sum(-1).mean()
        roll = relaxed_rollout(self.model, self.batch_size, self.steps, self.kl_truncate, 1.0, generator)
        return kl_terms(self.model, self.synced, roll, "code")[-self.kl_truncate:].sum(0).mean()
