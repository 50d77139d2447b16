"""The common interface: fields (a network output read through a path) and flow maps.

A **field** is any callable ``field(x, t, **cond) -> Tensor`` (same shape as ``x``, ``t`` of shape
``[batch]``) with two attributes: ``field.path`` (a :class:`genkit.paths.Path`) and
``field.prediction`` (one of ``eps``, ``x0``, ``velocity``, ``v``, ``score``). Diffusion and
flow-matching models are fields; so are the exact fields of :mod:`genkit.analytic` and any function
wrapped with :class:`FunctionField`. ``as_velocity(field)`` and friends give the other views; all
conversions go through the path.

A **flow map** jumps ``flow_map(x, t, s) -> x_s`` from time ``t`` to time ``s``. Any field plus an ODE
solver is one (:class:`genkit.solvers.ODEFlowMap`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

from torch import Tensor

from .errors import ConfigError
from .paths import PREDICTIONS, Path, broadcast_time

__all__ = [
    "Field",
    "FlowMap",
    "FunctionField",
    "FieldView",
    "as_prediction",
    "as_velocity",
    "as_score",
    "as_x0",
    "as_eps",
    "check_field",
]


@runtime_checkable
class Field(Protocol):
    """``field(x, t, **cond) -> Tensor`` interpreted through ``field.path`` as ``field.prediction``."""

    path: Path
    prediction: str

    def __call__(self, x: Tensor, t: Tensor, **cond: Any) -> Tensor: ...


@runtime_checkable
class FlowMap(Protocol):
    """``flow_map(x, t, s) -> x_s``: transports samples at time ``t`` to time ``s``."""

    def __call__(self, x: Tensor, t: Tensor | float, s: Tensor | float, **cond: Any) -> Tensor: ...


def check_field(field: Any) -> None:
    """Raise ConfigError unless ``field`` has a path and a known prediction."""
    path = getattr(field, "path", None)
    pred = getattr(field, "prediction", None)
    if not isinstance(path, Path) or pred not in PREDICTIONS or not callable(field):
        raise ConfigError(
            f"{type(field).__name__} is not a genkit Field: it needs a .path (genkit Path; got {path!r}), a "
            f".prediction in {PREDICTIONS} (got {pred!r}) and a __call__(x, t). Wrap a plain function with "
            "genkit.FunctionField(fn, path, prediction)."
        )


class FunctionField:
    """Wrap a plain callable ``fn(x, t, **cond)`` as a field.

    >>> import torch
    >>> from genkit.paths import get_path
    >>> f = FunctionField(lambda x, t: -x, get_path("linear"), "velocity")
    >>> f(torch.ones(2, 3), 0.5).shape
    torch.Size([2, 3])
    """

    def __init__(self, fn: Callable[..., Tensor], path: Path, prediction: str = "velocity"):
        if prediction not in PREDICTIONS:
            raise ConfigError(f"unknown prediction {prediction!r}; choose one of {PREDICTIONS}")
        if not isinstance(path, Path):
            raise ConfigError(f"path must be a genkit Path (use genkit.get_path(name)); got {path!r}")
        self.fn, self.path, self.prediction = fn, path, prediction

    def __call__(self, x: Tensor, t: Tensor | float, **cond: Any) -> Tensor:
        return self.fn(x, broadcast_time(t, x), **cond)

    def __repr__(self) -> str:
        return f"FunctionField({self.fn!r}, {self.path!r}, {self.prediction!r})"


class FieldView:
    """A field seen in another parametrization; made by :func:`as_prediction` and the ``as_*`` helpers."""

    def __init__(self, base: Field, prediction: str):
        self.base, self.path, self.prediction = base, base.path, prediction

    def __call__(self, x: Tensor, t: Tensor | float, **cond: Any) -> Tensor:
        t = broadcast_time(t, x)
        out = self.base(x, t, **cond)
        return self.path.convert(out, x, t, self.base.prediction, self.prediction)

    def __repr__(self) -> str:
        return f"FieldView({self.base!r}, {self.prediction!r})"


def as_prediction(field: Field, prediction: str) -> Field:
    """View ``field`` as ``prediction``; returns ``field`` itself when it already is one."""
    check_field(field)
    if prediction not in PREDICTIONS:
        raise ConfigError(f"unknown prediction {prediction!r}; choose one of {PREDICTIONS}")
    if field.prediction == prediction:
        return field
    if isinstance(field, FieldView):
        field = field.base
        if field.prediction == prediction:
            return field
    return FieldView(field, prediction)


def as_velocity(field: Field) -> Field:
    """The probability-flow ODE velocity ``dx/dt`` of ``field``."""
    return as_prediction(field, "velocity")


def as_score(field: Field) -> Field:
    """The score ``grad_x log p_t(x)`` of ``field``."""
    return as_prediction(field, "score")


def as_x0(field: Field) -> Field:
    """The denoiser ``E[x_0 | x_t = x]`` of ``field``."""
    return as_prediction(field, "x0")


def as_eps(field: Field) -> Field:
    """The noise prediction ``E[eps | x_t = x]`` of ``field``."""
    return as_prediction(field, "eps")
