"""Score-of-Mixture Distillation (``smd``): a one-step generator distilled from a frozen teacher by the alpha-skew
Jensen-Shannon divergence, with the explicit mixture ``s_ext(x; alpha) = D s_p + (1 - D) s_fake``. The shared
design (generator, path, noise levels, schedule, directions) is in :mod:`genkit.models.smt`.

>>> import torch
>>> model, _ = SMD.example()   # an analytic Gaussian teacher, data-free
>>> loss, logs = model.loss(None, generator=torch.Generator().manual_seed(0), update="score")
>>> sorted(logs)
['fake_dsm', 'ratio_fake', 'ratio_real']
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checks import check_generator
from ..errors import ConfigError
from ..fields import Field, as_x0, check_field
from ..frozen import Frozen
from ..nets import build as build_net
from ..paths import Path, broadcast_time, path_from_config
from .continuous import ContinuousModel
from .registry import FAMILIES
from .smt import _positive_int, _read_x0, _real, _scaled, _ScoreOfMixture, _surrogate, smd_direction
from .smt_nets import FeatureTap, LogitHead
from .teachers import check_teacher, refuse_one_step_teacher, teacher_shape

__all__ = ["SMD"]


@FAMILIES.register("smd")
class SMD(_ScoreOfMixture):
    """Score-of-Mixture Distillation: ``SMD(net, fake_net, path=None, *, teacher, sample_shape, ...)``; usually
    :meth:`from_teacher`.

    Args:
        net: the generator's network, read as ``prediction`` at ``t_top`` (from_teacher: a copy of the teacher's).
        fake_net: the fake score's network (a one-time genkit ``MLP`` / ``UNet``, same reading; default a copy of
            ``net``; from_teacher: a copy of the teacher's). The density-ratio logit ``l(x_t; t)`` is a head on its
            bottleneck feature, trained jointly with it (the official ``--joint_training``).
        path: the teacher's (a teacher on another path is an error).
        teacher: the frozen real score, any genkit field (``genkit.load(folder)``, ``genkit.from_diffusers(...)``,
            an analytic field): never trained nor saved, recorded by reference; ``set_teacher`` attaches one.
        batch_size: samples per data-free loss (generator and teacher samples; use TrainConfig.batch_size).
        real: where the samples of ``p`` that train ``l`` come from: ``"teacher"`` (default; ``data_free``: the
            teacher's own samples, ``teacher.sample(n, steps=teacher_steps)`` or exact for an analytic field,
            drawn each score update) or ``"data"`` (the training batch, as the official SMD code uses real
            images; then ``fit(data)``).
        gen_gan_weight: the generator's GAN term ``softplus(-(l + log(alpha / (1 - alpha))))`` (official 3e-3).
        Other arguments as :class:`SMT` (``generator_alpha`` defaults to ``"upper"``, alpha in [1/2, 1]; the point
        mass to 0 exactly a quarter of the time, as the official SMD code).

    The score update trains the fake score by DSM on generator samples and ``l`` by the explicit mixture's DSM
    loss ``alpha w |D f_p + (1 - D) f_q - f_p|^2`` on real and ``(1 - alpha) w |... - f_q|^2`` on fake samples
    (the denoisers ``f`` detached, the same noise for both, as the official code), whose minimiser is
    ``l = log p_t / q_t``.
    """

    family = "smd"
    _score_modules = ("fake_net", "head")
    REALS: ClassVar[tuple[str, ...]] = ("teacher", "data")

    def __init__(self, net: nn.Module, fake_net: nn.Module | None = None, path: Path | str | None = None, *,
                 teacher: Field | None = None, sample_shape: Sequence[int] = (2,), prediction: str = "velocity",
                 input_sigma_data: float | None = None, real: str = "teacher", teacher_steps: int = 16,
                 batch_size: int = 64, score_updates: int = 5, sigma_min: float = 0.002, sigma_max: float = 80.0,
                 rho: float = 7.0, levels: int = 1000, sigma_data: float = 0.5,
                 generator_levels: Sequence[float] = (0.02, 0.98),
                 alpha_grid: int = 1001, alpha_points: Sequence[float] = (0.0,), alpha_point_prob: float = 0.25,
                 generator_alpha: str = "upper",
                 gen_gan_weight: float = 3e-3, generator_lr_scale: float = 1.0, score_lr_scale: float = 5.0,
                 t_top: float | None = None, t_bottom: float | None = None, warmup_steps: int = 0):
        if teacher is not None:
            check_field(teacher)
            path = teacher.path if path is None else path
        super().__init__(net, "linear" if path is None else path, sample_shape=sample_shape, prediction=prediction,
                         input_sigma_data=input_sigma_data, score_updates=score_updates, warmup_steps=warmup_steps,
                         sigma_min=sigma_min, sigma_max=sigma_max, rho=rho, levels=levels, sigma_data=sigma_data,
                         generator_levels=generator_levels, alpha_grid=alpha_grid, alpha_points=alpha_points,
                         alpha_point_prob=alpha_point_prob,
                         generator_alpha=generator_alpha, generator_lr_scale=generator_lr_scale,
                         score_lr_scale=score_lr_scale, t_top=t_top, t_bottom=t_bottom)
        if self.warmup_steps:
            raise ConfigError("SMD starts from the teacher and has no warm-up; drop warmup_steps (SMT from scratch "
                              "has one)")
        if fake_net is None:
            fake_net = copy.deepcopy(net)  # the fake score starts where the generator does (from_teacher: both teacher)
        if fake_net is net:
            raise ConfigError("the fake score's network must be another module than the generator's; pass a copy "
                              "(SMD.from_teacher makes one)")
        if real not in self.REALS:
            raise ConfigError(f"real must be one of {self.REALS} (where the samples of p that train the density "
                              f"ratio come from); got {real!r}")
        self.real = real
        self.teacher_steps = _positive_int("teacher_steps", teacher_steps, "It is the teacher's sampling steps.")
        self.batch_size = _positive_int("batch_size", batch_size, "It is the number of samples per data-free loss.")
        self.gen_gan_weight = _real("gen_gan_weight", gen_gan_weight, 0.0, math.inf)
        self.fake_net = fake_net
        self._tap = FeatureTap(self.fake_net)
        self.head = LogitHead(self._tap.dim)
        self.frozen = Frozen()
        self._generator_last()
        if teacher is not None:
            self.set_teacher(teacher)

    @property
    def data_free(self) -> bool:
        """True with ``real="teacher"``: the loss makes its own samples (generator and teacher)."""
        return self.real == "teacher"

    # --- the teacher ------------------------------------------------------------------------------------
    def set_teacher(self, teacher: Field | None) -> None:
        """Attach (or with None detach) the frozen teacher, checked: a genkit field on the model's path whose
        samples have the model's shape."""
        if teacher is None:
            self.frozen.set("teacher", None)
            return
        refuse_one_step_teacher(teacher, "SMD")
        check_teacher(teacher, self.path, self.sample_shape, "SMD")
        self.frozen.set("teacher", teacher)

    @property
    def teacher(self) -> Field | None:
        return self.frozen.get("teacher")

    @classmethod
    def from_teacher(cls, teacher: Field, net: nn.Module | None = None, fake_net: nn.Module | None = None,
                     **kwargs: Any) -> SMD:
        """An SMD model of ``teacher``'s path, sample shape and time range whose generator and fake score start as
        copies of the teacher's network (so ``g(z)`` is the teacher's x0-prediction at ``t_top``), with its
        prediction and input scaling. ``teacher`` is a genkit flow-matching or diffusion model (``genkit.load``,
        ``genkit.from_diffusers``); for another field pass ``net`` and ``fake_net``. Keywords go to :class:`SMD`."""
        check_field(teacher)
        refuse_one_step_teacher(teacher, "SMD")
        shape = teacher_shape(teacher)
        if shape is None:
            raise ConfigError(f"cannot tell the sample shape of teacher {type(teacher).__name__}; build "
                              "SMD(net, fake_net, sample_shape=..., teacher=teacher) directly")
        options: dict[str, Any] = {}
        if net is None or fake_net is None:
            from .diffusion import Diffusion

            if not isinstance(teacher, ContinuousModel) or getattr(teacher, "num_classes", None) is not None:
                raise ConfigError(f"cannot copy the network of a {type(teacher).__name__} teacher (an unconditional "
                                  "genkit flow-matching or diffusion model is needed); pass net= and fake_net=")
            if type(teacher).net_input is ContinuousModel.net_input:
                scale = None
            elif isinstance(teacher, Diffusion):
                scale = None if (teacher.path.variance_preserving and teacher.sigma_data == 1.0) else teacher.sigma_data
            else:
                raise ConfigError(f"the {teacher.family} teacher scales its network's input in its own way; pass net= "
                                  "and fake_net=")
            if teacher.prediction == "score":
                raise ConfigError("a score-predicting teacher network is no generator; pass net= and fake_net=")
            options = {"prediction": teacher.prediction, "input_sigma_data": scale}
            net = copy.deepcopy(teacher.net) if net is None else net
            fake_net = copy.deepcopy(teacher.net) if fake_net is None else fake_net
            for module in (net, fake_net):
                module.requires_grad_(True).train()
        t_min, t_max = teacher.time_range() if callable(getattr(teacher, "time_range", None)) else (None, None)
        kwargs = {**options, "path": teacher.path, "t_top": t_max, "t_bottom": t_min, **kwargs}
        return cls(net, fake_net, sample_shape=shape, teacher=teacher, **kwargs)

    def _need_teacher(self) -> Field:
        teacher = self.teacher
        if teacher is None:
            raise ConfigError("SMD trains against a frozen teacher and has none (a loaded checkpoint keeps only the "
                              "generator and score networks): model.set_teacher(genkit.load(teacher_folder)) or "
                              "genkit.from_diffusers(folder)")
        return teacher

    def _teacher_samples(self, n: int, like: Tensor, g: torch.Generator | None) -> Tensor:
        teacher = self._need_teacher()
        if isinstance(teacher, ContinuousModel):
            x = teacher.sample(n, steps=self.teacher_steps, generator=g, device=like.device)
        elif callable(getattr(teacher, "sample", None)):  # analytic fields: exact samples
            x = teacher.sample(n, generator=g, dtype=like.dtype)
        else:
            raise ConfigError(f"the {type(teacher).__name__} teacher cannot draw samples; use real='data' and train on "
                              "data")
        return x.to(device=like.device, dtype=like.dtype)

    # --- the explicit mixture -----------------------------------------------------------------------------
    def fake_x0(self, x: Tensor, t: Tensor | float) -> Tensor:
        """The fake score's denoiser ``f_q(x_t)`` (the bottleneck feature is recorded for :meth:`logit`)."""
        t = broadcast_time(t, x)
        return _read_x0(self.path, self.fake_net(_scaled(self.path, x, t, self.input_sigma_data), t), x, t,
                        self.prediction)

    def logit(self, x: Tensor, t: Tensor | float) -> tuple[Tensor, Tensor]:
        """``(l(x_t; t) [B], f_q(x_t))``: the density-ratio logit (at the optimum ``log p_t / q_t``) and the fake
        denoiser of the same evaluation."""
        f = self.fake_x0(x, t)
        return self.head(self._tap.take()), f

    def mixture_weight(self, x: Tensor, t: Tensor | float, alpha: Tensor) -> Tensor:
        """``D = sigmoid(l(x_t; t) + log(alpha / (1 - alpha)))`` ``[B]``: p's posterior weight in the mixture."""
        logit, _ = self.logit(x, t)
        return torch.sigmoid(logit + torch.log(alpha) - torch.log1p(-alpha))

    def mixture_x0(self, x: Tensor, t: Tensor | float, alpha: Tensor | float) -> Tensor:
        """The explicit mixture's denoiser ``D f_p + (1 - D) f_q``."""
        t, alpha = broadcast_time(t, x), broadcast_time(alpha, x)
        logit, f_q = self.logit(x, t)
        d = torch.sigmoid(logit + torch.log(alpha) - torch.log1p(-alpha)).reshape((-1,) + (1,) * (x.ndim - 1))
        f_p = as_x0(self._need_teacher())(x, t)
        return d * f_p + (1 - d) * f_q

    # --- losses -------------------------------------------------------------------------------------------
    def score_loss(self, real: Tensor, fake: Tensor, generator: torch.Generator | None = None
                   ) -> tuple[Tensor, dict[str, Tensor]]:
        """The fake score's DSM on ``fake`` plus the explicit mixture's DSM that trains the logit head."""
        teacher_x0 = as_x0(self._need_teacher())
        fake = fake.detach()
        b = fake.shape[0]
        t, w = self._levels(b, fake, generator, generator_side=False)
        x_fake = self.path.sample(fake, t, self._noise(fake, generator))
        dsm = (w * (self.fake_x0(x_fake, t) - fake).pow(2).flatten(1).mean(1)).mean()
        self._tap.take()
        t, w = self._levels(b, fake, generator, generator_side=False)
        alpha = self._alpha(b, fake, generator, generator_side=False)
        eps = self._noise(fake, generator)
        x_fake, x_real = self.path.sample(fake, t, eps), self.path.sample(real, t, eps)
        shape = (-1,) + (1,) * (fake.ndim - 1)
        with torch.no_grad():
            fp_fake, fp_real = teacher_x0(x_fake, t), teacher_x0(x_real, t)
        log_odds = torch.log(alpha) - torch.log1p(-alpha)
        l_fake, fq_fake = self.logit(x_fake, t)
        l_real, fq_real = self.logit(x_real, t)
        fq_fake, fq_real = fq_fake.detach(), fq_real.detach()
        d_fake = torch.sigmoid(l_fake + log_odds).reshape(shape)
        d_real = torch.sigmoid(l_real + log_odds).reshape(shape)
        mix_fake = d_fake * fp_fake + (1 - d_fake) * fq_fake
        mix_real = d_real * fp_real + (1 - d_real) * fq_real
        loss_fake = (w * (1 - alpha) * (mix_fake - fq_fake).pow(2).flatten(1).mean(1)).mean()
        loss_real = (w * alpha * (mix_real - fp_real).pow(2).flatten(1).mean(1)).mean()
        loss = dsm + loss_fake + loss_real
        return loss, {"fake_dsm": dsm.detach(), "ratio_fake": loss_fake.detach(), "ratio_real": loss_real.detach()}

    def generator_loss(self, b: int, like: Tensor, generator: torch.Generator | None = None
                       ) -> tuple[Tensor, dict[str, Tensor]]:
        """The surrogate loss of the SMD direction on ``b`` fresh generator samples plus the GAN term."""
        teacher_x0 = as_x0(self._need_teacher())
        x = self._fake(b, like, generator)
        t, _ = self._levels(b, x, generator, generator_side=True)
        alpha = self._alpha(b, x, generator, generator_side=True)
        xt = self.path.sample(x, t, self._noise(x, generator))  # with gradients, for the GAN term
        logit, f_fake = self.logit(xt, t)
        log_odds = torch.log(alpha) - torch.log1p(-alpha)
        with torch.no_grad():
            f_real = teacher_x0(xt.detach(), t)
            g = smd_direction(x.detach(), f_fake.detach(), f_real, torch.sigmoid(logit.detach() + log_odds), alpha)
        gan = F.softplus(-(logit + log_odds)).mean()
        loss = _surrogate(x, g) + self.gen_gan_weight * gan
        return loss, {"direction_norm": g.flatten(1).norm(dim=1).mean(), "gen_gan": gan.detach()}

    def loss(self, batch: Tensor | None, generator: torch.Generator | None = None, update: str | None = None
             ) -> tuple[Tensor, dict[str, Tensor]]:
        """The loss of update ``update`` (``"generator"`` or ``"score"``): without data (``real="teacher"``) the
        batch is None and its size is ``batch_size``; with ``real="data"`` the batch is the real samples."""
        check_generator(generator, f"{self.family}.loss")
        if self.data_free:
            if batch is not None:
                raise ConfigError("this SMD model is data_free (real='teacher': the teacher gives the real samples) "
                                  "and trains without data: call loss(None, ...) / Trainer.fit() with no data, or "
                                  "build it with real='data'")
            like = next(self.net.parameters()).detach()
            like = torch.empty((self.batch_size, *self.sample_shape), device=like.device, dtype=like.dtype)
        else:
            like = self.check_batch(batch)
        update = self._check_update(update)
        self._need_teacher()
        b = like.shape[0]
        if update == "score":
            with torch.no_grad():
                fake = self._fake(b, like, generator)
                real = self._teacher_samples(b, like, generator) if self.data_free else like
            loss, logs = self.score_loss(real, fake, generator)
        else:
            loss, logs = self.generator_loss(b, like, generator)
        return loss, logs

    # --- config -------------------------------------------------------------------------------------------
    def extra_config(self) -> dict[str, Any]:
        return {"fake_net": self.fake_net.config(), "real": self.real, "teacher_steps": self.teacher_steps,
                "batch_size": self.batch_size, "gen_gan_weight": self.gen_gan_weight, **self._shared_config()}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> SMD:
        """Rebuild without a teacher (attach one with :meth:`set_teacher` to train further)."""
        c = dict(config)
        kwargs = cls._shared_kwargs(c)
        kwargs.pop("warmup_steps")
        return cls(build_net(c["net"]), build_net(c["fake_net"]), path_from_config(c["path"]), real=c["real"],
                   teacher_steps=c["teacher_steps"], batch_size=c["batch_size"], gen_gan_weight=c["gen_gan_weight"],
                   **kwargs)

    @classmethod
    def example(cls) -> tuple[SMD, None]:
        """A data-free 2-D model distilling an analytic Gaussian teacher (generator and fake MLPs 16 x 1, seeded;
        8 samples per loss)."""
        from ..analytic import Gaussian
        from ..nets import MLP
        from ..paths import get_path

        teacher = Gaussian(torch.tensor([0.5, -0.5]), 0.25 * torch.eye(2), get_path("linear"))
        with torch.random.fork_rng():
            torch.manual_seed(0)
            model = cls(MLP(2, hidden=16, depth=1, time_dim=8), MLP(2, hidden=16, depth=1, time_dim=8),
                        teacher=teacher, sample_shape=(2,), batch_size=8)
        return model, None
