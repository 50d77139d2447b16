"""What the two-time flow-map families (secant models, MeanFlow) share: a two-time network read as a learned
jump ``x_s = x_t + (s - t) net(x_t, t, s)``, its velocity view ``net(x, t, t)``, the jump sampler and a time
range (the checks of a frozen teacher are in :mod:`genkit.models.teachers`).

``net(x, t, s)`` is the average velocity over ``[t, s]`` (a secant; MeanFlow's ``u(z, r, t) = net(z, t, r)``);
``net(x, t, t)`` is the instantaneous velocity, so a flow-map model is also a genkit field (prediction
``velocity``) that every ODE solver runs on.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from ..errors import ConfigError, ShapeError
from ..paths import broadcast_time
from ..sampling import JumpSampler, Sampler
from ..solvers import Solution, Uniform
from .continuous import ContinuousModel, _check_label_range, _explain_integer

__all__ = ["FlowMapModel"]


class FlowMapModel(ContinuousModel):
    """Base of two-time flow-map families. Subclasses set ``self.t_min``, ``self.t_max`` and define
    :attr:`default_jumps` (the jump count of the default sampler), ``loss`` and the config hooks."""

    family = "flow_map"
    #: why a flow-map model is no distillation teacher (:func:`~genkit.models.teachers.refuse_one_step_teacher`)
    not_a_teacher: ClassVar[str] = (
        "its velocity view is only the short-jump limit of its learned jumps (and from_teacher would share its "
        "network); distil from the flow-matching or diffusion model it was trained from, or sample it with its "
        "own jumps")

    @property
    def default_jumps(self) -> int:
        """Jumps of :meth:`default_sampler` and :meth:`integrate` without ``steps``."""
        raise NotImplementedError

    # --- field and flow map -------------------------------------------------------------------------------
    def _check(self, x: Tensor, t: Tensor | float, s: Tensor | float) -> tuple[Tensor, Tensor]:
        if tuple(x.shape[1:]) != self.sample_shape:
            raise ShapeError(f"{self.family} model expects inputs of shape [batch, "
                             f"{', '.join(map(str, self.sample_shape))}]; got {tuple(x.shape)}")
        _explain_integer(x, "x", self.family)  # a dtype test, no sync
        t, s = broadcast_time(t, x), broadcast_time(s, x)
        if bool(((t < 0) | (t > 1) | (s < 0) | (s > 1)).any()):
            raise ConfigError(f"times must lie in [0, 1] (0 = data, 1 = noise); got t in [{float(t.min()):.4g}, "
                              f"{float(t.max()):.4g}], s in [{float(s.min()):.4g}, {float(s.max()):.4g}]")
        return t, s

    def _cond(self, labels: Tensor | None, cond: dict[str, Any]) -> dict[str, Any]:
        """The network's keyword conditioning: ``labels`` become its ``y`` (checked as :meth:`forward` of
        :class:`ContinuousModel` checks them)."""
        if labels is not None:
            if self.num_classes is None:
                raise ConfigError(f"this {self.family} model is unconditional (num_classes None) and takes no labels; "
                                  "drop labels=, or train a class-conditional model (num_classes=K)")
            return {**cond, "y": labels}
        if self.num_classes is not None and "y" not in cond:
            null = ("" if self.null_label is None else
                    f", or labels=model.null_label ({self.null_label}) for the unconditional model")
            raise ConfigError(f"this {self.family} model is class-conditional ({self.num_classes} classes) and needs "
                              f"labels: model(x, t, labels=...) / model.sample(n, labels=...) with class ids "
                              f"0..{self.num_classes - 1}{null}")
        return cond

    def _net(self, x: Tensor, t: Tensor, s: Tensor, cond: dict[str, Any]) -> Tensor:
        try:
            return self.net(x, t, s, **cond)
        except IndexError as e:  # an embedding lookup out of range: name the labels
            if torch.is_tensor(cond.get("y")):
                _check_label_range(cond["y"], self.num_classes, self.null_label, self.class_names, e)
            raise

    def secant(self, x: Tensor, t: Tensor | float, s: Tensor | float, labels: Tensor | None = None,
               **cond: Any) -> Tensor:
        """The average velocity ``f(x, t, s)`` over ``[t, s]``: ``x [B, *sample_shape]``, ``t, s [B]`` or floats
        (``labels [B]`` for a class-conditional model)."""
        t, s = self._check(x, t, s)
        return self._net(x, t, s, self._cond(labels, cond))

    def forward(self, x: Tensor, t: Tensor | float, labels: Tensor | None = None, **cond: Any) -> Tensor:
        """The velocity view ``f(x, t, t)`` (a genkit field with prediction ``velocity``)."""
        return self.secant(x, t, t, labels, **cond)

    def flow_map(self, x: Tensor, t: Tensor | float, s: Tensor | float, steps: int = 1,
                 labels: Tensor | None = None, **cond: Any) -> Tensor:
        """Jump from ``t`` to ``s`` in ``steps`` equal learned jumps; ``x`` and the result ``[B, *sample_shape]``."""
        if not isinstance(steps, int) or steps < 1:
            raise ConfigError(f"steps must be a positive integer; got {steps!r}")
        t, s = self._check(x, t, s)
        cond = self._cond(labels, cond)
        shape = (-1,) + (1,) * (x.ndim - 1)
        for k in range(steps):
            a, b = t + (s - t) * (k / steps), t + (s - t) * ((k + 1) / steps)
            x = x + (b - a).reshape(shape) * self._net(x, a, b, cond)
        return x

    def samplers(self) -> tuple[str, ...]:
        """Learned jumps first (the default), and any ODE solver on the velocity view."""
        return ("jumps", "ode")

    def default_sampler(self) -> Sampler:
        """The learned jumps (:attr:`default_jumps` of them), uniform over ``[t_min, t_max]`` (NFE = jumps)."""
        return JumpSampler(self.default_jumps)

    @torch.no_grad()
    def integrate(self, x: Tensor, steps: int | None = None, **cond: Any) -> Solution:
        """``steps`` uniform learned jumps from ``t_max`` to ``t_min`` starting at ``x [B, *sample_shape]`` (noise
        at ``t_max``); returns a :class:`~genkit.solvers.Solution` with ``nfe = steps`` and the trajectory.
        The same as ``JumpSampler(steps).sample(model, x)``."""
        steps = self.default_jumps if steps is None else steps
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
            raise ConfigError(f"steps must be a positive integer; got {steps!r}")
        return JumpSampler(steps).sample(self, x, **cond)

    def default_grid(self, grid):
        """A solver's ``"uniform"`` grid runs over the model's range ``[t_min, t_max]``."""
        return Uniform(self.t_max, self.t_min) if grid == "uniform" else grid

    def time_range(self) -> tuple[float, float]:
        """``(t_min, t_max)`` the model was trained on and samples over."""
        return self.t_min, self.t_max

    @staticmethod
    def _check_range(t_min: float, t_max: float) -> None:
        if not 0.0 <= t_min < t_max <= 1.0:
            raise ConfigError(f"need 0 <= t_min < t_max <= 1; got t_min={t_min}, t_max={t_max}")
