"""Score-of-Mixture Training and Distillation (Jayashankar, Ryu, Wornell, ICML 2025): one-step generators trained
by the alpha-skew Jensen-Shannon divergence, from scratch on data (``smt``) or from a frozen teacher (``smd``).

**The generator.** ``x = g(z)`` is the x0-prediction of a network at the top time ``t_top`` of the path, ``z``
the prior draw (``path.sample_prior``); the model is that network read as a genkit field (``model(x, t)`` is
its ``prediction``, ``as_x0(model)`` its denoiser), so SMD starts it from the teacher's network: ``g(z)`` is then
the teacher's x0-prediction at ``t_top``. ``model.sample(n)`` is one network evaluation (``JumpSampler(1)`` on
:meth:`flow_map`). Several steps: ``sampler="restart"`` (:class:`genkit.sampling.RestartSampler`, the multistep
sampler of consistency models / DMD2: ``x0 = g(x_t, t)``, re-noised to the next grid time with fresh noise),
or ``sampler="jumps", steps=k`` (the same grid with the noise re-used, DDIM-like). The generator is trained at
``t_top`` only (the SMT warm-up also trains it as a denoiser at every noise level), so ``g(x_t, t)`` at lower
times is what the warm-up (SMT) or the teacher (SMD) taught it, fine-tuned at ``t_top``.

**The path and the noise levels.** The paper uses EDM's variance-exploding noise ``x + sigma n``; here the
families live on a genkit path (``x_t = a x_0 + s eps``, t = 0 data, t = 1 noise; SMT default ``linear``, SMD
the teacher's). The noise levels are EDM's: the ``levels`` (1000) Karras sigmas between ``sigma_min`` and
``sigma_max`` (``rho`` 7), each mapped to the path time of that VE sigma (``sigma = s / a``,
``path.t_from_ve_sigma``; on the linear path ``t = sigma / (1 + sigma)``). The score network trains on all
levels (uniform index), the generator direction uses the indices in ``generator_levels`` (2%..98%), as in the
official code. Denoisers are compared in x0 space, where the path does not matter: the DSM weight is EDM's
``sigma^-2 + sigma_data^-2`` of that VE sigma, and scores are read from denoisers through the path only
(``score = (a f - x) / s^2``, :meth:`genkit.paths.Path.convert`). Networks see ``x_t / sqrt(a^2 sigma_data^2 +
s^2)`` (EDM's ``c_in``) and output ``prediction`` (default ``velocity``: well conditioned at every level of the
linear path), read as x0 through the path.

**Training** alternates two optimizers through the objective contract (:mod:`genkit.objective`): groups
``"generator"`` (learning rate ``generator_lr_scale * lr``) and ``"score"`` (``score_lr_scale * lr``; the paper's
generator 1e-4 and score 5e-4 are ``TrainConfig(lr=1e-4)`` with the default scales 1 and 5). ``update(step)`` is
a pure function of the step (so resume is exact): the first ``warmup_steps`` steps update the generator (SMT:
its warm-up), then each cycle of ``score_updates + 1`` steps runs ``score_updates`` score updates and one
generator update (the official loop: the score model every step, the generator every 5th).
``loss(batch, generator=..., update=name)`` computes that update's loss only; without ``update`` it is a
ConfigError. Each update leaves the other optimizer's parameters without gradient; under DDP the trainer's
accelerator finds unused parameters for an objective with several optimizers (``genkit.train.make_accelerator``).
In ``train/train.py`` pass ``--lr 1e-4`` for the
paper's rates (the script's default 2e-3 is flow matching's).

**The generator direction** (both families; Prop. 3.1): with ``p_a = x - f(x_t; a)`` (x the clean generator
sample, ``f(.; a)`` the denoiser of the mixture ``a p + (1 - a) q``), ``p_a - p_0 = (s^2 / a_t)(s_0 - s_a)`` is
the paper's ``s_0 - s_alpha`` in denoiser units. It is computed under ``no_grad``, ``nan_to_num``-ed, and
applied through the surrogate ``0.5 ||x - sg(x - g)||^2 / N`` (``N`` the element count: the gradient w.r.t.
``x`` is ``g / N``).

- SMT: ``g = (p_alpha - p_0) / w`` with ``w = mean|p_1| * sqrt(mean (p_alpha - p_0)^2 / (mean (p_1 - p_0)^2 +
  1e-6))`` per sample: the paper's adaptive weight ``w_alpha w_DMD`` (``alpha ||s_0 - s_1|| / ||s_0 - s_alpha||``
  times DMD's ``1 / mean|x - f_real|``; the ``1 / alpha`` of Prop. 3.1 cancels). The official repository's first
  commit multiplied by ``w``; its "Update weight factor" commit (f1b1fbf) divides, as here. With exact scores
  ``p_alpha - p_0 = D (p_1 - p_0)`` for the posterior weight ``D`` of p, so the normalised direction is DMD's
  ``(p_1 - p_0) / mean|p_1|`` for every alpha; alpha acts through the learned score's errors.
- SMD: ``g = D (p_1 - p_0) / (alpha mean|p_1|)`` with ``D = sigmoid(l(x_t; t) + log(alpha / (1 - alpha)))``,
  ``p_1`` from the frozen teacher and ``p_0`` from the fake score: the paper's ``D (s_fake - s_p) / alpha`` with
  DMD's normalisation, as the official ``sjsd_dist`` code. (SMT's alpha-ratio factor would cancel ``D / alpha``
  exactly and make SMD DMD.) Unnormalised, the two directions are equal when ``D`` is exact.

**alpha.** Score updates draw alpha from a point mass with probability ``alpha_point_prob`` (uniform over
``alpha_points``), else uniformly on the ``alpha_grid`` (1001) points of [0, 1]; the generator draws from the grid
without 0 (SMT, ``generator_alpha="zeroless"``: alpha = 0 gives a zero direction) or from its upper half [1/2, 1]
(SMD, ``"upper"``, the official distillation script). The point masses follow each official code: SMT's
(``sjsd/utils.py``) is {0, 1/2, 1} with probability 1/2: every generator step reads ``s(.; 0)`` and ``s(.; 1)``
(and the GAN head ``1/2``), and without the mass at 1 the alpha = 1 score, sharp in alpha where q dominates,
is learned slowly (measured: 10% relative error where {0, 1/2, 1} gives under 5%, tests/test_smt.py); SMD's
(``sjsd_dist/utils.py``) is 0 exactly with probability 1/4 (METHODS.md's "25% exactly 0"), since its alpha = 1
is the frozen teacher.
"""

from __future__ import annotations

import argparse
import math
import numbers
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checks import check_generator
from ..errors import ConfigError, ShapeError
from ..nets import build as build_net
from ..objective import ParamGroup
from ..paths import Path, broadcast_time, path_from_config
from ..sampling import JumpSampler, Sampler
from ..solvers import Uniform
from .continuous import ContinuousModel
from .registry import FAMILIES
from .smt_nets import AlphaNet, FeatureTap, LogitHead

__all__ = ["SMT", "karras_sigmas", "sample_alpha", "smt_direction", "smd_direction", "GENERATOR_ALPHAS"]

GENERATOR_ALPHAS = ("zeroless", "upper")
UPDATES = ("generator", "score")


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float) -> Tensor:
    """EDM's ``n`` noise levels, ascending (float64): ``(max^(1/rho) + r (min^(1/rho) - max^(1/rho)))^rho``
    flipped, ``r`` on ``linspace(0, 1, n)``."""
    r = torch.linspace(0, 1, n, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return torch.flip((hi + r * (lo - hi)) ** rho, dims=[0])


def sample_alpha(n: int, grid: int, generator: torch.Generator | None, device: Any, *, point_prob: float = 0.0,
                 points: Sequence[float] = (0.0,), low: str = "all") -> Tensor:
    """``n`` alphas on the ``grid``-point grid of [0, 1] (float64): ``low="all"`` every point, ``"zeroless"``
    all but 0, ``"upper"`` those >= 1/2; then each is, with probability ``point_prob``, one of ``points``
    (uniformly): the point masses."""
    start = {"all": 0, "zeroless": 1, "upper": (grid - 1) // 2}[low]
    u = torch.rand(3, n, generator=generator, device=device, dtype=torch.float64)
    k = start + torch.floor(u[0] * (grid - start)).clamp(max=grid - 1 - start)
    alpha = k / (grid - 1)
    if point_prob <= 0:
        return alpha
    support = torch.tensor([float(p) for p in points], dtype=torch.float64, device=device)
    mass = support[torch.floor(u[2] * len(support)).clamp(max=len(support) - 1).long()]
    return torch.where(u[1] < point_prob, mass, alpha)


def _mean(x: Tensor) -> Tensor:
    """Per-sample mean over the non-batch dimensions, shaped to broadcast against ``x``."""
    return x.flatten(1).mean(1).reshape((-1,) + (1,) * (x.ndim - 1))


def smt_direction(x: Tensor, f0: Tensor, fa: Tensor, f1: Tensor, normalise: bool = True) -> Tensor:
    """SMT's generator direction from the clean samples ``x`` and the denoisers at alpha = 0, alpha, 1 (module
    docstring): ``(p_alpha - p_0) / w`` (``normalise=False``: ``p_alpha - p_0``), non-finite entries zeroed."""
    p0, pa, p1 = x - f0, x - fa, x - f1
    g = pa - p0
    if normalise:
        w = _mean(p1.abs()) * torch.sqrt(_mean(g ** 2) / (_mean((p1 - p0) ** 2) + 1e-6))
        g = g / w
    return torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0)


def smd_direction(x: Tensor, f_fake: Tensor, f_real: Tensor, d: Tensor, alpha: Tensor,
                  normalise: bool = True) -> Tensor:
    """SMD's generator direction ``D (p_1 - p_0) / (alpha mean|p_1|)`` (``normalise=False``: without
    ``mean|p_1|``), ``d`` and ``alpha`` per sample ``[B]``, non-finite entries zeroed."""
    shape = (-1,) + (1,) * (x.ndim - 1)
    p0, p1 = x - f_fake, x - f_real
    g = d.reshape(shape) * (p1 - p0) / alpha.reshape(shape)
    if normalise:
        g = g / _mean(p1.abs())
    return torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0)


def _surrogate(x: Tensor, g: Tensor) -> Tensor:
    """``0.5 ||x - sg(x - g)||^2 / N``: its gradient w.r.t. ``x`` is ``g / N``."""
    return 0.5 * F.mse_loss(x, (x - g).detach(), reduction="mean")


def _positive_int(name: str, value: Any, fix: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ConfigError(f"{name} must be a positive integer; got {value!r}. {fix}")
    return int(value)


def _nonneg_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ConfigError(f"{name} must be an integer >= 0; got {value!r}")
    return int(value)


def _real(name: str, value: Any, lo: float, hi: float, *, open_lo: bool = False, open_hi: bool = False) -> float:
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > lo if open_lo else value >= lo) and (value < hi if open_hi else value <= hi)
    if not ok:
        span = f"{'(' if open_lo else '['}{lo}, {hi}{')' if open_hi else ']'}"
        raise ConfigError(f"{name} must be a number in {span}; got {value!r}")
    return float(value)


class _ScoreOfMixture(ContinuousModel):
    """What SMT and SMD share: the one-step generator (the model's own network, a genkit field), the noise levels,
    the alternating schedule, sampling, config. Subclasses define the score side."""

    family = "score_of_mixture"
    #: why a one-step generator is no distillation teacher (:func:`~genkit.models.teachers.refuse_one_step_teacher`)
    not_a_teacher: ClassVar[str] = (
        "its field is its one-step generator read as a denoiser, not the score of the data; distil from the "
        "flow-matching or diffusion model the data was learned by")
    _score_modules: ClassVar[tuple[str, ...]] = ()
    #: why there is no likelihood (eval/evaluate.py writes it beside ``"nll": null``; ``log_prob`` raises it).
    no_likelihood: ClassVar[str] = (
        "none: a one-step generator (smt, smd) has no tractable density; its field is the generator read as a "
        "denoiser, not the score of the distribution it samples, so a probability-flow ODE on it would score "
        "another distribution (for smd mostly the teacher's)")

    def __init__(self, net: nn.Module, path: Path | str, *, sample_shape: Sequence[int], prediction: str,
                 input_sigma_data: float | None, score_updates: int, warmup_steps: int, sigma_min: float,
                 sigma_max: float, rho: float, levels: int, sigma_data: float, generator_levels: Sequence[float],
                 alpha_grid: int, alpha_points: Sequence[float], alpha_point_prob: float, generator_alpha: str,
                 generator_lr_scale: float,
                 score_lr_scale: float, t_top: float | None, t_bottom: float | None):
        super().__init__(net, path, prediction, sample_shape)
        if prediction == "score":
            raise ConfigError("the generator network cannot predict the score (unbounded at t = 0); use 'x0', 'eps', "
                              "'v' or 'velocity'")
        self.score_updates = _positive_int("score_updates", score_updates,
                                           "It is the number of score updates per generator update (paper: 5).")
        self.warmup_steps = _nonneg_int("warmup_steps", warmup_steps)
        self.sigma_min = _real("sigma_min", sigma_min, 0.0, math.inf, open_lo=True, open_hi=True)
        self.sigma_max = _real("sigma_max", sigma_max, self.sigma_min, math.inf, open_lo=True, open_hi=True)
        self.rho = _real("rho", rho, 0.0, math.inf, open_lo=True, open_hi=True)
        self.levels = _positive_int("levels", levels, "EDM uses 1000 noise levels.")
        self.sigma_data = _real("sigma_data", sigma_data, 0.0, math.inf, open_lo=True, open_hi=True)
        self.input_sigma_data = (None if input_sigma_data is None else
                                 _real("input_sigma_data", input_sigma_data, 0.0, math.inf, open_lo=True,
                                       open_hi=True))
        lo, hi = (tuple(generator_levels) + (None, None))[:2] if isinstance(generator_levels, (list, tuple)) else (
            None, None)
        if lo is None or hi is None or len(generator_levels) != 2 or not (
                isinstance(lo, numbers.Real) and isinstance(hi, numbers.Real) and 0 <= lo <= hi <= 1):
            raise ConfigError(f"generator_levels must be two fractions 0 <= lo <= hi <= 1 of the noise levels the "
                              f"generator direction uses (official: (0.02, 0.98)); got {generator_levels!r}")
        self.generator_levels = (float(lo), float(hi))
        self.alpha_grid = _positive_int("alpha_grid", alpha_grid, "The paper's grid has 1001 points.")
        if self.alpha_grid < 3:
            raise ConfigError(f"alpha_grid must have at least 3 points (0, 1/2, 1); got {alpha_grid}. The paper uses "
                              "1001")
        self.alpha_point_prob = _real("alpha_point_prob", alpha_point_prob, 0.0, 1.0)
        points = alpha_points if isinstance(alpha_points, (list, tuple)) else None
        if not points or not all(isinstance(a, numbers.Real) and not isinstance(a, bool) and 0 <= a <= 1
                                 for a in points):
            raise ConfigError(f"alpha_points must be a non-empty list of alphas in [0, 1] (the score updates' point "
                              f"masses, e.g. [0.0] or [0.0, 0.5, 1.0]); got {alpha_points!r}")
        self.alpha_points = tuple(float(a) for a in points)
        if generator_alpha not in GENERATOR_ALPHAS:
            raise ConfigError(f"generator_alpha must be one of {GENERATOR_ALPHAS} (zeroless: the grid without 0, "
                              f"as SMT; upper: [1/2, 1], as SMD); got {generator_alpha!r}")
        self.generator_alpha = generator_alpha
        self.generator_lr_scale = _real("generator_lr_scale", generator_lr_scale, 0.0, math.inf, open_lo=True,
                                        open_hi=True)
        self.score_lr_scale = _real("score_lr_scale", score_lr_scale, 0.0, math.inf, open_lo=True, open_hi=True)
        self.t_top = 1.0 if t_top is None else _real("t_top", t_top, 0.0, 1.0, open_lo=True)
        self.t_bottom = self.path.t_min if t_bottom is None else _real("t_bottom", t_bottom, 0.0, self.t_top,
                                                                         open_hi=True)
        sigmas = karras_sigmas(self.levels, self.sigma_min, self.sigma_max, self.rho)
        times = self.path.t_from_ve_sigma(sigmas).to(torch.float64).clamp(self.t_bottom, self.t_top)
        self.register_buffer("_sigmas", sigmas, persistent=False)
        self.register_buffer("_times", times, persistent=False)

    # --- the generator as a field and a flow map ---------------------------------------------------------
    def net_input(self, x: Tensor, t: Tensor) -> Tensor:
        """EDM's ``c_in``: ``x / sqrt(a^2 sigma_data^2 + s^2)`` (identity when ``input_sigma_data`` is None)."""
        return _scaled(self.path, x, t, self.input_sigma_data)

    def generate(self, z: Tensor, t: Tensor | float | None = None) -> Tensor:
        """``g(z)``: the generator's x0-prediction at ``t`` (default ``t_top``), with gradients."""
        t = broadcast_time(self.t_top if t is None else t, z)
        return self.path.convert(self(z, t), z, t, self.prediction, "x0")

    def flow_map(self, x: Tensor, t: Tensor | float, s: Tensor | float, **cond: Any) -> Tensor:
        """The jump ``t -> s`` through the generator's x0-prediction: ``x0 = g(x, t)``, then ``a_s x0 + s_s eps``
        with the ``eps`` that ``(x, x0)`` imply (DDIM's step). From ``t_top`` to 0 it is ``g(z)``."""
        if cond:
            raise ConfigError(f"one-step models here are unconditional; got {sorted(cond)}")
        t, s = broadcast_time(t, x), broadcast_time(s, x)
        x0 = self.generate(x, t)
        eps = self.path.convert(x0, x, t, "x0", "eps")
        return self.path.sample(x0, s, eps)

    def denoise(self, x: Tensor, t: Tensor | float, **cond: Any) -> Tensor:
        """``E[x_0 | x_t]`` as the generator predicts it (what :class:`~genkit.sampling.RestartSampler` reads)."""
        if cond:
            raise ConfigError(f"one-step models here are unconditional; got {sorted(cond)}")
        return self.generate(x, t)

    def log_prob(self, x: Tensor, **kwargs: Any) -> Tensor:
        """Not available: a ConfigError saying why (:attr:`no_likelihood`)."""
        raise ConfigError(f"log_prob of the {self.family} model: {self.no_likelihood}")

    def samplers(self) -> tuple[str, ...]:
        """One jump (the default), the restart sampler with fresh noise, and deterministic jumps."""
        return ("jumps", "restart")

    def default_sampler(self) -> Sampler:
        """One network evaluation: ``JumpSampler(1)`` from ``t_top`` to 0."""
        return JumpSampler(1)

    def time_range(self) -> tuple[float, float]:
        """``(0, t_top)``: the generator jumps from ``t_top`` to the data."""
        return 0.0, self.t_top

    def default_grid(self, grid):
        return Uniform(self.t_top, 0.0) if grid == "uniform" else grid

    # --- the alternating schedule ---------------------------------------------------------------------------
    def update(self, step: int) -> str:
        """The optimizer training step ``step`` (0-based) updates: ``"generator"`` for the first ``warmup_steps``
        steps, then ``score_updates`` times ``"score"`` and once ``"generator"``, repeated."""
        if step < self.warmup_steps:
            return "generator"
        return "generator" if (step - self.warmup_steps) % (self.score_updates + 1) == self.score_updates else "score"

    def _generator_last(self) -> None:
        """Register the generator's network after the score side, so that ``parameters()`` ends with the
        generator's output layer, the parameters sampling depends on."""
        self._modules["net"] = self._modules.pop("net")

    def _score_parameters(self) -> list[nn.Parameter]:
        return [p for name in self._score_modules if getattr(self, name, None) is not None
                for p in getattr(self, name).parameters() if p.requires_grad]

    def param_groups(self) -> list[ParamGroup]:
        """``"generator"`` (the model's own network) and ``"score"`` (score network(s) and logit head)."""
        return [ParamGroup("generator", [p for p in self.net.parameters() if p.requires_grad],
                           lr_scale=self.generator_lr_scale),
                ParamGroup("score", self._score_parameters(), lr_scale=self.score_lr_scale)]

    def optimizers(self) -> dict[str, list[str]]:
        return {"generator": ["generator"], "score": ["score"]}

    # --- shared pieces of the losses ---------------------------------------------------------------------
    def _levels(self, b: int, like: Tensor, g: torch.Generator | None, generator_side: bool) -> tuple[Tensor, Tensor]:
        """Per-sample ``(t, weight)``: a noise level (all of them, or the generator's range) as a path time and
        EDM's weight ``sigma^-2 + sigma_data^-2``."""
        lo, hi = 0, self.levels - 1
        if generator_side:
            lo = int(self.generator_levels[0] * self.levels)
            hi = max(lo, min(int(self.generator_levels[1] * self.levels), self.levels - 1))
        u = torch.rand(b, generator=g, device=like.device, dtype=torch.float64)
        k = (lo + torch.floor(u * (hi - lo + 1))).clamp(max=hi).long()
        sigma = self._sigmas.to(like.device)[k]
        t = self._times.to(like.device)[k]
        return t.to(like.dtype), (sigma ** -2 + self.sigma_data ** -2).to(like.dtype)

    def _alpha(self, b: int, like: Tensor, g: torch.Generator | None, generator_side: bool) -> Tensor:
        if generator_side:
            return sample_alpha(b, self.alpha_grid, g, like.device, low=self.generator_alpha).to(like.dtype)
        return sample_alpha(b, self.alpha_grid, g, like.device, point_prob=self.alpha_point_prob,
                            points=self.alpha_points).to(like.dtype)

    def _fake(self, b: int, like: Tensor, g: torch.Generator | None) -> Tensor:
        """``b`` generator samples ``g(z)`` (with gradients)."""
        z = self.path.sample_prior((b, *self.sample_shape), generator=g, device=like.device, dtype=like.dtype)
        return self.generate(z)

    def _noise(self, x: Tensor, g: torch.Generator | None) -> Tensor:
        return torch.randn(x.shape, generator=g, device=x.device, dtype=x.dtype)

    def _check_update(self, update: str | None) -> str:
        if update is None:
            raise ConfigError(f"{self.family}.loss trains two optimizers in turn: pass update='generator' or "
                              f"update='score' (model.update(step) names the one of each step; genkit.train.Trainer "
                              "does this)")
        if update not in UPDATES:
            raise ConfigError(f"unknown update {update!r}; {self.family} has optimizers {UPDATES}")
        return update

    # --- config -----------------------------------------------------------------------------------------
    def _shared_config(self) -> dict[str, Any]:
        return {"input_sigma_data": self.input_sigma_data, "score_updates": self.score_updates,
                "warmup_steps": self.warmup_steps, "sigma_min": self.sigma_min, "sigma_max": self.sigma_max,
                "rho": self.rho, "levels": self.levels, "sigma_data": self.sigma_data,
                "generator_levels": list(self.generator_levels), "alpha_grid": self.alpha_grid,
                "alpha_points": list(self.alpha_points), "alpha_point_prob": self.alpha_point_prob,
                "generator_alpha": self.generator_alpha,
                "generator_lr_scale": self.generator_lr_scale, "score_lr_scale": self.score_lr_scale,
                "t_top": self.t_top, "t_bottom": self.t_bottom}

    @staticmethod
    def _shared_kwargs(c: dict[str, Any]) -> dict[str, Any]:
        keys = ("input_sigma_data", "score_updates", "warmup_steps", "sigma_min", "sigma_max", "rho", "levels",
                "sigma_data", "generator_levels", "alpha_grid", "alpha_points", "alpha_point_prob", "generator_alpha",
                "generator_lr_scale", "score_lr_scale", "t_top", "t_bottom")
        return {"sample_shape": c["sample_shape"], "prediction": c["prediction"], **{k: c[k] for k in keys}}


def _scaled(path: Path, x: Tensor, t: Tensor, sigma_data: float | None) -> Tensor:
    if sigma_data is None:
        return x
    a, s, _, _ = path.coefficients(t, x)
    return x * torch.rsqrt(a * a * sigma_data ** 2 + s * s)


def _read_x0(path: Path, out: Tensor, x: Tensor, t: Tensor, prediction: str) -> Tensor:
    return path.convert(out, x, t, prediction, "x0")


# ============================================================================================== SMT
@FAMILIES.register("smt")
class SMT(_ScoreOfMixture):
    """Score-of-Mixture Training from scratch: ``SMT(net, score_net, path="linear", *, sample_shape, ...)``.

    Args:
        net: the generator's network (a genkit ``MLP`` / ``UNet``), read as ``prediction`` at ``t_top``.
        score_net: the amortised mixture-score network ``f_psi(x_t; alpha, t)``: an :class:`AlphaNet`, a two-time
            network, or a one-time ``MLP`` / ``UNet`` (wrapped; see :mod:`genkit.models.smt_nets`). Default: a
            network of ``net``'s configuration with its own initialisation.
        path: the genkit path (default ``linear``).
        prediction: what both networks output, read as x0 through the path (default ``velocity``).
        score_updates: score updates per generator update (paper: 5).
        warmup_steps: the generator's warm-up: the first ``warmup_steps`` training steps train the generator alone
            as a denoiser (EDM-weighted DSM on the data, half of each batch at ``t_top``, half over the noise
            levels), as the paper does before SMT from scratch (40k steps on ImageNet).
        sigma_min, sigma_max, rho, levels, sigma_data: EDM's noise levels and weight (module docstring).
        generator_levels: the fractions of the levels the generator direction uses (official 2%..98%).
        alpha_grid, alpha_points, alpha_point_prob, generator_alpha: alpha sampling (module docstring; default the
            official SMT code's: point masses {0, 1/2, 1} half of the time).
        gan: the GAN head (a logit on the score network's bottleneck feature at alpha = 1/2): discriminator loss
            ``gan_weight * [alpha softplus(-l(real)) + (1 - alpha) softplus(l(fake))]`` in the score update,
            generator loss ``gen_gan_weight * softplus(-l(fake))``. Off by default: the official SMT scripts turn
            it on (weights 1e-2 and 3e-3) but the released ``sjsd_guidance.py`` cannot run that path (its calls do
            not match the signatures), so the setting behind the reported numbers is unverified.
        generator_lr_scale, score_lr_scale: the two groups' learning-rate factors (paper: 1e-4 and 5e-4).
        t_top: the generator's time (default 1); t_bottom: the lowest noise time (default the path's t_min).

    >>> import torch
    >>> from genkit.nets import MLP
    >>> model = SMT(MLP(2, hidden=16, depth=1), sample_shape=(2,))  # the score network: another MLP like it
    >>> [model.update(k) for k in range(7)]
    ['score', 'score', 'score', 'score', 'score', 'generator', 'score']
    >>> loss, _ = model.loss(torch.randn(8, 2), generator=torch.Generator().manual_seed(0), update="score")
    >>> model.sample(4).shape
    torch.Size([4, 2])
    """

    family = "smt"
    _score_modules = ("score_net", "head")

    def __init__(self, net: nn.Module, score_net: nn.Module | None = None, path: Path | str = "linear", *,
                 sample_shape: Sequence[int] = (2,), prediction: str = "velocity",
                 input_sigma_data: float | None = 0.5, score_updates: int = 5, warmup_steps: int = 0,
                 sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0, levels: int = 1000,
                 sigma_data: float = 0.5, generator_levels: Sequence[float] = (0.02, 0.98), alpha_grid: int = 1001,
                 alpha_points: Sequence[float] = (0.0, 0.5, 1.0), alpha_point_prob: float = 0.5,
                 generator_alpha: str = "zeroless", gan: bool = False,
                 gan_weight: float = 1e-2, gen_gan_weight: float = 3e-3, generator_lr_scale: float = 1.0,
                 score_lr_scale: float = 5.0, t_top: float | None = None, t_bottom: float | None = None):
        super().__init__(net, path, sample_shape=sample_shape, prediction=prediction,
                         input_sigma_data=input_sigma_data, score_updates=score_updates, warmup_steps=warmup_steps,
                         sigma_min=sigma_min, sigma_max=sigma_max, rho=rho, levels=levels, sigma_data=sigma_data,
                         generator_levels=generator_levels, alpha_grid=alpha_grid, alpha_points=alpha_points,
                         alpha_point_prob=alpha_point_prob,
                         generator_alpha=generator_alpha, generator_lr_scale=generator_lr_scale,
                         score_lr_scale=score_lr_scale, t_top=t_top, t_bottom=t_bottom)
        if score_net is None:
            score_net = build_net(net.config())  # the generator's architecture, its own initialisation
        if score_net is net:
            raise ConfigError("the score network must be another module than the generator's network; pass a "
                              "second network (e.g. MLP(dim) again) or none (one of the same configuration)")
        self.score_net = score_net if isinstance(score_net, AlphaNet) else AlphaNet(score_net)
        if not isinstance(gan, bool):
            raise ConfigError(f"gan must be True or False; got {gan!r}")
        self.gan = gan
        self.gan_weight = _real("gan_weight", gan_weight, 0.0, math.inf)
        self.gen_gan_weight = _real("gen_gan_weight", gen_gan_weight, 0.0, math.inf)
        self.head = None
        if gan:
            self._tap = FeatureTap(self.score_net)
            self.head = LogitHead(self._tap.dim)
        self._generator_last()

    # --- the mixture score ------------------------------------------------------------------------------
    def mixture_x0(self, x: Tensor, t: Tensor | float, alpha: Tensor | float) -> Tensor:
        """The denoiser ``f_psi(x_t; alpha, t)`` of the mixture ``alpha p + (1 - alpha) q`` (``[B, *shape]``)."""
        t, alpha = broadcast_time(t, x), broadcast_time(alpha, x)
        out = self.score_net(_scaled(self.path, x, t, self.input_sigma_data), t, alpha)
        return _read_x0(self.path, out, x, t, self.prediction)

    def mixture_score(self, x: Tensor, t: Tensor | float, alpha: Tensor | float) -> Tensor:
        """``s_psi(x_t; alpha, t)``, the score of the alpha-mixture of the noised data and generator marginals."""
        t = broadcast_time(t, x)
        return self.path.convert(self.mixture_x0(x, t, alpha), x, t, "x0", "score")

    def _logit(self, x: Tensor, t: Tensor) -> Tensor:
        self.score_net(_scaled(self.path, x, t, self.input_sigma_data), t, torch.full_like(t, 0.5))
        return self.head(self._tap.take())

    # --- losses ------------------------------------------------------------------------------------------
    def score_loss(self, real: Tensor, fake: Tensor, generator: torch.Generator | None = None,
                   t: float | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """The mixture DSM loss ``E[w (alpha |f(x_t; alpha) - x|^2 on real + (1 - alpha) |f - x|^2 on fake)]``
        (one level and one alpha per pair, EDM's weight ``w``), plus the GAN head's discriminator loss; ``t``
        fixes one time for all (tests). ``fake`` is detached."""
        fake = fake.detach()
        b = real.shape[0]
        if fake.shape != real.shape:
            raise ShapeError(f"real and fake batches must match; got {tuple(real.shape)} and {tuple(fake.shape)}")
        times, w = self._levels(b, real, generator, generator_side=False)
        if t is not None:
            times = torch.full_like(times, float(t))
            sigma = self.path.ve_sigma(times.to(torch.float64))
            w = (sigma ** -2 + self.sigma_data ** -2).to(real.dtype)
        alpha = self._alpha(b, real, generator, generator_side=False)
        x_fake = self.path.sample(fake, times, self._noise(fake, generator))
        x_real = self.path.sample(real, times, self._noise(real, generator))
        err_fake = (self.mixture_x0(x_fake, times, alpha) - fake).pow(2).flatten(1).mean(1)
        err_real = (self.mixture_x0(x_real, times, alpha) - real).pow(2).flatten(1).mean(1)
        loss_fake, loss_real = (w * (1 - alpha) * err_fake).mean(), (w * alpha * err_real).mean()
        loss = loss_fake + loss_real
        logs = {"score_real": loss_real.detach(), "score_fake": loss_fake.detach()}
        if self.gan:
            gt, _ = self._levels(b, real, generator, generator_side=False)
            ga = self._alpha(b, real, generator, generator_side=True)
            l_real = self._logit(self.path.sample(real, gt, self._noise(real, generator)), gt)
            l_fake = self._logit(self.path.sample(fake, gt, self._noise(fake, generator)), gt)
            disc = (ga * F.softplus(-l_real)).mean() + ((1 - ga) * F.softplus(l_fake)).mean()
            logs["disc"] = disc.detach()
            loss = loss + self.gan_weight * disc
        return loss, logs

    def generator_loss(self, b: int, like: Tensor, generator: torch.Generator | None = None
                       ) -> tuple[Tensor, dict[str, Tensor]]:
        """The surrogate loss of the SMT direction on ``b`` fresh generator samples (plus the GAN term)."""
        x = self._fake(b, like, generator)
        t, _ = self._levels(b, x, generator, generator_side=True)
        alpha = self._alpha(b, x, generator, generator_side=True)
        xt = self.path.sample(x.detach(), t, self._noise(x, generator))
        with torch.no_grad():
            f0 = self.mixture_x0(xt, t, torch.zeros_like(alpha))
            fa = self.mixture_x0(xt, t, alpha)
            f1 = self.mixture_x0(xt, t, torch.ones_like(alpha))
            g = smt_direction(x.detach(), f0, fa, f1)
        loss = _surrogate(x, g)
        logs = {"direction_norm": g.flatten(1).norm(dim=1).mean()}
        if self.gan:
            gt, _ = self._levels(b, x, generator, generator_side=False)
            gen = F.softplus(-self._logit(self.path.sample(x, gt, self._noise(x, generator)), gt)).mean()
            logs["gen_gan"] = gen.detach()
            loss = loss + self.gen_gan_weight * gen
        return loss, logs

    def warmup_loss(self, batch: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """The generator's warm-up: EDM-weighted denoising ``w |g(x_t, t) - x_0|^2`` on the data, the first half of
        the batch at ``t_top`` (where the generator is used), the rest over the noise levels."""
        b = batch.shape[0]
        t, w = self._levels(b, batch, generator, generator_side=False)
        top = torch.arange(b, device=batch.device) < (b + 1) // 2
        t = torch.where(top, torch.full_like(t, self.t_top), t)
        sigma_top = float(self.path.ve_sigma(torch.tensor(self.t_top, dtype=torch.float64)))
        w = torch.where(top, torch.full_like(w, sigma_top ** -2 + self.sigma_data ** -2), w)
        xt = self.path.sample(batch, t, self._noise(batch, generator))
        err = (self.generate(xt, t) - batch).pow(2).flatten(1).mean(1)
        loss = (w * err).mean()
        return loss, {"warmup": loss.detach()}

    def loss(self, batch: Tensor, generator: torch.Generator | None = None, update: str | None = None
             ) -> tuple[Tensor, dict[str, Tensor]]:
        """The loss of update ``update`` (``"generator"`` or ``"score"``, as :meth:`update` names it) on a data
        batch ``[B, *sample_shape]``: the score update's mixture DSM on the batch and ``B`` generator samples; the
        generator update's SMT direction on ``B`` generator samples, or during the warm-up its denoising loss
        (:meth:`update` of a warm-up step marks the next generator loss as a warm-up one; the trainer calls it
        before every step's loss, so a resumed run marks the same steps)."""
        x0 = self.check_batch(batch)
        check_generator(generator, f"{self.family}.loss")
        update = self._check_update(update)
        if update == "score":
            with torch.no_grad():
                fake = self._fake(x0.shape[0], x0, generator)
            loss, logs = self.score_loss(x0, fake, generator)
        elif self._warming:
            loss, logs = self.warmup_loss(x0, generator)
        else:
            loss, logs = self.generator_loss(x0.shape[0], x0, generator)
        return loss, logs

    #: Whether the next generator update is a warm-up one: set by :meth:`update` (the trainer calls it right
    #: before the loss of each step); :meth:`loss` reads it.
    _warming = False

    def update(self, step: int) -> str:
        name = super().update(step)
        self._warming = step < self.warmup_steps
        return name

    # --- config -------------------------------------------------------------------------------------------
    def extra_config(self) -> dict[str, Any]:
        return {"score_net": self.score_net.config(), "gan": self.gan, "gan_weight": self.gan_weight,
                "gen_gan_weight": self.gen_gan_weight, **self._shared_config()}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> SMT:
        c = dict(config)
        return cls(build_net(c["net"]), AlphaNet.from_config(c["score_net"]), path_from_config(c["path"]),
                   gan=c["gan"], gan_weight=c["gan_weight"], gen_gan_weight=c["gen_gan_weight"],
                   **cls._shared_kwargs(c))

    # --- registry hooks -----------------------------------------------------------------------------------
    @classmethod
    def example(cls) -> tuple[SMT, Tensor]:
        """A 2-D model (generator and score MLPs 16 x 1, seeded; the score network's alpha embedding perturbed
        off zero so that the direction is not zero) and 32 points of a Gaussian."""
        from ..nets import MLP

        with torch.random.fork_rng():
            torch.manual_seed(0)
            model = cls(MLP(2, hidden=16, depth=1, time_dim=8), MLP(2, hidden=16, depth=1, time_dim=8),
                        sample_shape=(2,))
            last = model.score_net.net.gap_embed[-1]
            with torch.no_grad():
                last.weight.normal_(0.0, 0.3)
        g = torch.Generator().manual_seed(0)
        return model, 0.5 * torch.randn(32, 2, generator=g) + 0.5

    cli_defaults: ClassVar[dict[str, Any]] = {"path": "linear", "score_updates": 5, "smt_warmup": 0,
                                              "gan": "off"}

    @classmethod
    def add_arguments(cls, group: argparse._ArgumentGroup) -> None:
        group.add_argument("--score-updates", type=int, help="score updates per generator update (default 5)")
        group.add_argument("--smt-warmup", type=int, help="generator warm-up steps (denoising) before SMT "
                                                          "(default 0)")
        group.add_argument("--gan", help="the GAN head on the score network: on or off (default off)")

    @classmethod
    def from_args(cls, args: argparse.Namespace, net: nn.Module, sample_shape: Sequence[int]) -> SMT:
        """The generator network ``net`` and a score network of the same configuration."""
        if args.gan not in ("on", "off"):
            raise ConfigError(f"--gan must be on or off; got {args.gan!r}")
        return cls(net, None, args.path, sample_shape=sample_shape, score_updates=args.score_updates,
                   warmup_steps=args.smt_warmup, gan=args.gan == "on")
