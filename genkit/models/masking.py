"""Masking schedules of absorbing-state (masked) discrete diffusion (MDLM: Sahoo et al. 2024, arXiv 2406.07524).

A schedule gives ``alpha(t)``, the probability that a token is still unmasked at time ``t`` (``t = 0`` data,
``t = 1`` all MASK: ``alpha(0) = 1``, ``alpha(1) = 0``, decreasing), its derivative ``dalpha(t)`` and the
continuous-time ELBO weight ``weight(t) = alpha'(t) / (1 - alpha(t))`` (<= 0; the loss weighs each masked
token's ``-log p(x_0 | x_t)`` by ``-weight(t)``). Registered in :data:`MASK_SCHEDULES`:

- ``log_linear``: ``alpha = 1 - t`` (masking probability ``t``), ``weight = -1 / t``;
- ``cosine``: ``alpha = cos(pi t / 2)`` (masking probability ``1 - cos(pi t / 2)``),
  ``weight = -(pi / 2) sin(pi t / 2) / (1 - cos(pi t / 2))``.

Each schedule checks its endpoints and monotonicity when built. Arithmetic follows the dtype of ``t``
(float32 at least).

>>> import torch
>>> s = get_schedule("log_linear")
>>> s.mask_prob(torch.tensor([0.25])), s.weight(torch.tensor([0.5]))
(tensor([0.2500]), tensor([-2.]))
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import Tensor

from ..errors import ConfigError
from ..registry import Registry

__all__ = ["MASK_SCHEDULES", "MaskSchedule", "LogLinear", "Cosine", "get_schedule"]

MASK_SCHEDULES: Registry = Registry("mask schedule")


def _time(t: Tensor | float) -> Tensor:
    t = torch.as_tensor(t)
    return t.to(torch.promote_types(t.dtype, torch.float32))


class MaskSchedule:
    """Base of masking schedules: subclasses set ``name`` and implement :meth:`alpha` and :meth:`dalpha`."""

    name: ClassVar[str] = "schedule"

    def __init__(self) -> None:
        t = torch.linspace(0, 1, 65, dtype=torch.float64)
        a = self.alpha(t)
        if abs(float(a[0]) - 1) > 1e-12 or abs(float(a[-1])) > 1e-12 or not bool((a[1:] < a[:-1]).all()):
            raise ConfigError(f"mask schedule {self.name!r} must fall from alpha(0) = 1 to alpha(1) = 0; got "
                              f"alpha(0) = {float(a[0]):g}, alpha(1) = {float(a[-1]):g}")

    def alpha(self, t: Tensor | float) -> Tensor:
        """The probability that a token is unmasked at time ``t`` (any shape)."""
        raise NotImplementedError

    def dalpha(self, t: Tensor | float) -> Tensor:
        """``d alpha / dt`` (<= 0)."""
        raise NotImplementedError

    def mask_prob(self, t: Tensor | float) -> Tensor:
        """The probability ``1 - alpha(t)`` that a token is MASK at time ``t``."""
        return 1 - self.alpha(t)

    def weight(self, t: Tensor | float) -> Tensor:
        """The continuous-time ELBO weight ``alpha'(t) / (1 - alpha(t))`` (<= 0, undefined at ``t = 0``)."""
        return self.dalpha(t) / (1 - self.alpha(t))

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


@MASK_SCHEDULES.register("log_linear")
class LogLinear(MaskSchedule):
    """``alpha(t) = 1 - t``: MDLM's log-linear schedule (the masking probability is ``t``); weight ``-1 / t``."""

    name = "log_linear"

    def alpha(self, t: Tensor | float) -> Tensor:
        return 1 - _time(t)

    def dalpha(self, t: Tensor | float) -> Tensor:
        return torch.full_like(_time(t), -1.0)

    def weight(self, t: Tensor | float) -> Tensor:
        return -1 / _time(t)


@MASK_SCHEDULES.register("cosine")
class Cosine(MaskSchedule):
    """``alpha(t) = cos(pi t / 2)``: masking probability ``1 - cos(pi t / 2)``."""

    name = "cosine"

    def alpha(self, t: Tensor | float) -> Tensor:
        return torch.cos(math.pi / 2 * _time(t)).clamp(min=0)  # float32 cos(pi / 2) is -4e-8, not 0

    def dalpha(self, t: Tensor | float) -> Tensor:
        return -math.pi / 2 * torch.sin(math.pi / 2 * _time(t))

    def weight(self, t: Tensor | float) -> Tensor:
        # 1 - cos(u) = 2 sin^2(u / 2): no cancellation at small t
        u = math.pi / 2 * _time(t)
        return -math.pi / 2 * torch.sin(u) / (2 * torch.sin(u / 2) ** 2)


def get_schedule(schedule: str | MaskSchedule) -> MaskSchedule:
    """A :class:`MaskSchedule`, or one built from its :data:`MASK_SCHEDULES` name."""
    if isinstance(schedule, MaskSchedule):
        return schedule
    if not isinstance(schedule, str):
        raise ConfigError(f"a mask schedule is a name ({', '.join(MASK_SCHEDULES.names())}) or a MaskSchedule; "
                          f"got {schedule!r}")
    return MASK_SCHEDULES.get(schedule)()
