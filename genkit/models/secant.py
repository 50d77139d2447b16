"""Secant models: a learned few-step integrator of a probability-flow ODE (Liu & Yue, "Learning to Integrate
Diffusion ODEs by Averaging the Derivatives", NeurIPS 2025, arXiv 2505.14502).

A two-time network ``f(x, t, s)`` predicts the *secant*, the average velocity over ``[t, s]``, so that
``x_s = x_t + (s - t) f(x_t, t, s)``; ``f(x, t, t)`` is the velocity itself. Since the secant is
``E_{r ~ U[t, s]} v(x_r, r)``, it is regressed on the velocity at a random interior time ``r``, the unknown
point ``x_r`` (or ``x_t``) being estimated by the model itself, without gradient. Four losses
(genkit time: t = 0 data, t = 1 noise; ``h = (t_max - t_min) / N`` is one inference step of ``N``):

- ``sdei``: ``t`` on the step grid ``t_max - k h``, ``s = t - d``, ``d ~ U[0, h]`` (toward the data);
  ``x_t`` from the path, ``x^_r = x_t + (r - t) f(x_t, t, r)``; target ``v_teacher(x^_r, r)``.
- ``stei``: as ``sdei`` with ``t`` anywhere, plus flow matching ``|f(x_tau, tau, tau) - u_tau|^2`` (as coded).
- ``sdee``: exact ``x_r`` from the path, ``x^_t = x_r + (t - r) f(x_r, r, t)``; ``|f(x^_t, t, s) - v_teacher(x_r,
  r)|^2``, with ``t`` and ``s`` swapped at random so both directions are trained.
- ``stee``: as ``sdee`` with the conditional velocity ``alpha'(r) x_0 + sigma'(r) eps`` as target: no teacher.

``steps`` may list several ``N`` (each training sample draws one), e.g. ``(1, 2, 4)`` for a model sampled
at 1, 2 and 4 steps. The model is also a field (``model(x, t) = f(x, t, t)``, prediction ``velocity``), so
every genkit solver runs on it; ``model.flow_map(x, t, s)`` is the learned jump.

>>> import torch
>>> from genkit.analytic import Gaussian
>>> from genkit.nets import MLP
>>> from genkit.paths import get_path
>>> g = Gaussian(torch.ones(2), torch.eye(2) * 0.25, get_path("linear"))
>>> model = Secant(MLP(2, hidden=32), teacher=g, loss="sdei", steps=4, sample_shape=(2,))
>>> loss, _ = model.loss(g.sample(16), generator=torch.Generator().manual_seed(0))
>>> model.sample(8, steps=4).shape
torch.Size([8, 2])
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..checks import check_generator
from ..errors import ConfigError, ShapeError
from ..fields import Field, as_velocity, check_field
from ..frozen import Frozen
from ..nets.two_time import build as build_net
from ..nets.two_time import to_two_time
from ..paths import Path, path_from_config
from .continuous import ContinuousModel
from .flow_map import FlowMapModel
from .registry import FAMILIES
from .teachers import check_teacher, refuse_one_step_teacher, teacher_range, teacher_shape

__all__ = ["Secant", "LOSSES", "TEACHER_FREE"]

LOSSES = ("sdei", "stei", "sdee", "stee")
TEACHER_FREE = ("stee",)


def _refuse_secant_teacher(teacher: Any) -> None:
    """A secant model is no teacher: its field ``f(x, t, t)`` is the short-jump limit of its learned jumps, not the
    velocity it was distilled from; and ``from_teacher`` would share (and freeze) its network."""
    base = getattr(teacher, "base", teacher)  # through as_* views
    if isinstance(base, Secant):
        own = base.teacher
        source = f" (this one's is a {getattr(own, 'family', type(own).__name__)} field: pass that)" if own else ""
        raise ConfigError("a secant model as the teacher: the secant losses need the teacher's velocity, and a "
                          "secant model's f(x, t, t) is only the short-jump limit of its learned jumps, not the "
                          "velocity it was distilled from, so distilling it again compounds both errors (and "
                          "from_teacher would share, and freeze, its network); distil from the flow-matching or "
                          "diffusion model it was trained from" + source + ". To sample it in fewer steps use its "
                          "own jumps: model.sample(n, steps=k) with k in model.steps")


@FAMILIES.register("secant")
class Secant(FlowMapModel):
    """``Secant(net, path=None, *, sample_shape, loss="sdei", steps=4, teacher=None, tangent_weight=None,
    t_min=None, t_max=None)``.

    Args:
        net: a two-time network, or an ``MLP`` / ``UNet`` (copied into one that equals it for every ``s``).
        path: the teacher's path by default (else ``linear``); a teacher on another path is an error.
        sample_shape: shape of one sample; a teacher's must agree.
        loss: one of :data:`LOSSES`; all but ``stee`` need a teacher.
        steps: the inference step count ``N`` the jumps are sized for, or several.
        teacher: any genkit field (flow matching, diffusion, analytic), frozen; never saved with the model.
        tangent_weight: weight of the flow-matching term on ``f(x, t, t)``; default 1 for ``stei``, else 0.
        t_min, t_max: time range of training and sampling; default the teacher's sampling range, else the path's.
    """

    family = "secant"

    def __init__(self, net: nn.Module, path: Path | str | None = None, *, sample_shape: Sequence[int] = (2,),
                 loss: str = "sdei", steps: int | Sequence[int] = 4, teacher: Field | None = None,
                 tangent_weight: float | None = None, t_min: float | None = None, t_max: float | None = None):
        if loss not in LOSSES:
            raise ConfigError(f"unknown secant loss {loss!r}; choose one of {LOSSES} (stee needs no teacher)")
        if teacher is not None:
            check_field(teacher)
            path = teacher.path if path is None else path  # set_teacher checks that they agree
        super().__init__(to_two_time(net), "linear" if path is None else path, "velocity", sample_shape)
        steps = (steps,) if isinstance(steps, int) else tuple(steps)
        if not steps or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in steps):
            raise ConfigError(f"steps must be a positive int or a list of them (inference step counts); got {steps!r}")
        if tangent_weight is None:
            tangent_weight = 1.0 if loss == "stei" else 0.0
        if not float(tangent_weight) >= 0:
            raise ConfigError(f"tangent_weight must be >= 0; got {tangent_weight}")
        if teacher is not None and t_min is None and t_max is None:
            t_min, t_max = teacher_range(teacher)
        t_max = 1.0 if t_max is None else float(t_max)
        t_min = self.path.t_min if t_min is None else float(t_min)
        self._check_range(t_min, t_max)
        self.loss_name, self.steps, self.tangent_weight = loss, steps, float(tangent_weight)
        self.t_min, self.t_max = t_min, t_max
        # the frozen teacher: never trained nor saved, moved by .to() / .double(), recorded by reference
        self.frozen = Frozen()
        if teacher is not None:
            self.set_teacher(teacher)

    # --- the teacher ----------------------------------------------------------------------------------
    def set_teacher(self, teacher: Field | None) -> None:
        """Attach (or with None detach) the frozen teacher field of the distillation losses."""
        if teacher is None:
            self.frozen.set("teacher", None)
            return
        check_field(teacher)
        _refuse_secant_teacher(teacher)
        refuse_one_step_teacher(teacher, "secant")
        if self.loss_name in TEACHER_FREE:
            raise ConfigError(f"loss {self.loss_name!r} trains without a teacher; drop teacher= or use one of "
                              f"{[n for n in LOSSES if n not in TEACHER_FREE]}")
        check_teacher(teacher, self.path, self.sample_shape, self.family)
        self.frozen.set("teacher", teacher)

    @classmethod
    def from_teacher(cls, teacher: Field, net: nn.Module | None = None, **kwargs: Any) -> Secant:
        """A secant model of ``teacher``'s path, sample shape and time range, distilling it (a teacher-free loss
        like ``stee`` only starts from it). Without ``net`` the network is a copy of the teacher's, which needs
        a velocity network on unscaled inputs (flow matching); other keyword arguments go to :class:`Secant`."""
        check_field(teacher)
        _refuse_secant_teacher(teacher)
        refuse_one_step_teacher(teacher, "secant")
        shape = teacher_shape(teacher)
        if shape is None:
            raise ConfigError(f"cannot tell the sample shape of teacher {type(teacher).__name__}; build "
                              "Secant(net, sample_shape=..., teacher=teacher) directly")
        if net is None:
            plain = isinstance(teacher, ContinuousModel) and type(teacher).net_input is ContinuousModel.net_input
            if not (plain and teacher.prediction == "velocity"):
                raise ConfigError(f"the {getattr(teacher, 'family', type(teacher).__name__)} teacher's network does "
                                  f"not output the velocity of its input (prediction "
                                  f"{getattr(teacher, 'prediction', None)!r}, scaled inputs), so its weights are no "
                                  "starting secant; pass net= (e.g. genkit.nets.two_time.TwoTimeMLP) to train from "
                                  "scratch")
            net = teacher.net
        t_min, t_max = teacher_range(teacher)
        kwargs = {"path": teacher.path, "t_min": t_min, "t_max": t_max, **kwargs}
        if kwargs.get("loss", "sdei") in TEACHER_FREE:  # the teacher gave the start, the loss needs no more
            return cls(net, sample_shape=shape, **kwargs)
        return cls(net, sample_shape=shape, teacher=teacher, **kwargs)

    @property
    def teacher(self) -> Field | None:
        return self.frozen.get("teacher")

    @property
    def _teacher(self) -> list:
        """``[teacher, its velocity view]``, or ``[]`` without a teacher."""
        teacher = self.frozen.get("teacher")
        return [] if teacher is None else [teacher, as_velocity(teacher)]

    @property
    def default_jumps(self) -> int:
        """The first trained step count."""
        return self.steps[0]

    # --- training ---------------------------------------------------------------------------------------
    def _times(self, b: int, like: Tensor, g: torch.Generator | None) -> tuple[Tensor, Tensor, Tensor]:
        """``(t, s, r)`` for one batch, each ``[b]``: intervals of at most one inference step, ``r`` inside."""
        u = torch.rand(4, b, generator=g, device=like.device, dtype=torch.float64)
        counts = torch.tensor(self.steps, dtype=torch.float64, device=like.device)
        cdf = torch.cumsum(counts, 0) / counts.sum()  # every (N, k) inference step equally often
        n = counts[torch.searchsorted(cdf, u[0], right=True).clamp(max=len(self.steps) - 1)]
        span = self.t_max - self.t_min
        h = span / n
        d = u[1] * h
        if self.loss_name == "sdei":  # t on the step grid, s toward the data
            t = self.t_max - torch.floor(u[2] * n).clamp(max=n - 1) * h
            s = t - d
        elif self.loss_name == "stei":
            t = self.t_min + d + u[2] * (span - d)
            s = t - d
        else:  # an interval anywhere, either direction
            lo = self.t_min + u[2] * (span - d)
            flip = u[3] < 0.5
            t, s = torch.where(flip, lo + d, lo), torch.where(flip, lo, lo + d)
        r = t + torch.rand(b, generator=g, device=like.device, dtype=torch.float64) * (s - t)
        return t.to(like.dtype), s.to(like.dtype), r.to(like.dtype)

    def loss(self, batch: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """The chosen secant loss on data ``batch [B, *sample_shape]``; ``generator`` draws times and noise."""
        x0 = self.check_batch(batch)
        check_generator(generator, f"{self.family}.loss")
        name = self.loss_name
        if name not in TEACHER_FREE and not self._teacher:
            raise ConfigError(f"loss {name!r} distils a teacher: pass teacher= (any genkit field, e.g. "
                              "genkit.load(checkpoint)) or use loss='stee', which needs none")
        v_teacher = self._teacher[1] if self._teacher else None
        eps = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        t, s, r = self._times(x0.shape[0], x0, generator)
        shape = (-1,) + (1,) * (x0.ndim - 1)
        if name in ("sdei", "stei"):
            xt = self.path.sample(x0, t, eps)
            with torch.no_grad():
                xr = xt + (r - t).reshape(shape) * self.net(xt, t, r)
                target = v_teacher(xr, r)
            pred = self.net(xt, t, s)
        else:
            xr = self.path.sample(x0, r, eps)
            with torch.no_grad():
                xt = xr + (t - r).reshape(shape) * self.net(xr, r, t)
                target = v_teacher(xr, r) if name == "sdee" else self.path.from_x0_eps(x0, eps, xr, r, "velocity")
            pred = self.net(xt, t, s)
        if target.shape != pred.shape:
            raise ShapeError(f"the teacher returned shape {tuple(target.shape)} for inputs {tuple(pred.shape)}; "
                             "use a teacher trained on samples of this model's sample_shape")
        loss = (pred - target).pow(2).flatten(1).mean(1).mean()
        logs: dict[str, Tensor] = {}
        if self.tangent_weight > 0:  # flow matching on f(x, tau, tau)
            tau = self.t_min + (self.t_max - self.t_min) * torch.rand(x0.shape[0], generator=generator,
                                                                      device=x0.device, dtype=x0.dtype)
            x_tau = self.path.sample(x0, tau, eps)
            u = self.path.from_x0_eps(x0, eps, x_tau, tau, "velocity")
            tangent = (self.net(x_tau, tau, tau) - u).pow(2).flatten(1).mean(1).mean()
            logs = {"secant_loss": loss.detach(), "tangent_loss": tangent.detach()}
            loss = loss + self.tangent_weight * tangent
        return loss, logs

    # --- config -----------------------------------------------------------------------------------------
    def extra_config(self) -> dict[str, Any]:
        return {"loss": self.loss_name, "steps": list(self.steps), "tangent_weight": self.tangent_weight,
                "t_min": self.t_min, "t_max": self.t_max}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Secant:
        """Rebuild without a teacher (attach one with :meth:`set_teacher` to train further)."""
        c = dict(config)
        return cls(build_net(c["net"]), path_from_config(c["path"]), sample_shape=c["sample_shape"], loss=c["loss"],
                   steps=c["steps"], tangent_weight=c["tangent_weight"], t_min=c["t_min"], t_max=c["t_max"])

    # --- registry hooks ---------------------------------------------------------------------------------
    @classmethod
    def example(cls) -> tuple[Secant, Tensor]:
        """A teacher-free (``stee``) 2-D model sized for 1 and 2 jumps (two-time MLP 16 x 1, seeded) and 32
        points of a Gaussian."""
        from ..nets import MLP

        with torch.random.fork_rng():
            torch.manual_seed(0)
            model = cls(MLP(2, hidden=16, depth=1, time_dim=8), sample_shape=(2,), loss="stee", steps=(1, 2))
        g = torch.Generator().manual_seed(0)
        return model, 0.5 * torch.randn(32, 2, generator=g) + 0.5

    cli_defaults: ClassVar[dict[str, Any]] = {"path": "linear", "loss": "stee", "jumps": "4"}

    @classmethod
    def add_arguments(cls, group: argparse._ArgumentGroup) -> None:
        group.add_argument("--loss", help=f"secant loss, one of {', '.join(LOSSES)} (default: stee, the only one "
                                          "without a teacher; the others distil a checkpoint with train/secant.py)")
        group.add_argument("--jumps", help="inference step counts the jumps are sized for, comma separated, e.g. "
                                           "1,2,4 (default: 4)")
        group.add_argument("--tangent-weight", type=float, help="weight of flow matching on f(x, t, t) (default: 0)")

    @classmethod
    def from_args(cls, args: argparse.Namespace, net: nn.Module, sample_shape: Sequence[int]) -> Secant:
        """A teacher-free secant model; a distillation loss is refused with a pointer to train/secant.py."""
        if args.loss not in TEACHER_FREE:
            if args.loss not in LOSSES:
                raise ConfigError(f"unknown --loss {args.loss!r}; choose one of {', '.join(LOSSES)}")
            raise ConfigError(f"--loss {args.loss} distils a teacher, which train/train.py does not load: run "
                              f"python train/secant.py --teacher CHECKPOINT --loss {args.loss}, or use --loss stee")
        try:
            jumps = [int(n) for n in str(args.jumps).split(",")]
        except ValueError:
            raise ConfigError(f"--jumps must be comma-separated positive integers like 1,2,4; got {args.jumps!r}"
                              ) from None
        if not all(n >= 1 for n in jumps):
            raise ConfigError(f"--jumps must be comma-separated positive integers like 1,2,4; got {args.jumps!r}")
        return cls(net, args.path, sample_shape=sample_shape, loss=args.loss, steps=jumps,
                   tangent_weight=args.tangent_weight)
