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

from .errors import ConfigError, ShapeError
from .paths import PREDICTIONS, Path, X0Limit, broadcast_time, get_path

__all__ = [
    "Field",
    "FlowMap",
    "FunctionField",
    "FieldView",
    "LimitedX0",
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
    """``flow_map(x, t, s) -> x_s``: transports samples ``x [B, ...]`` at time ``t`` to time ``s``; ``t`` and ``s``
    are floats or per-sample times ``[B]`` (any other shape is a ShapeError)."""

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

    ``path`` is a genkit Path or its name. Functions written for other conventions wrap with two flags:
    ``time_first=True`` calls ``fn(t, x)`` with a 0-d ``t`` (torchdiffeq's ``func(t, y)``, torchdyn, torchcfm's
    ``torch_wrapper``), and ``data_at=1`` reads a field whose time runs the other way (t = 0 noise, t = 1
    data: torchcfm, Meta's flow_matching): it is called at ``1 - t``, and a velocity is negated. The output
    must have the shape of ``x``.

    >>> import torch
    >>> f = FunctionField(lambda x, t: -x, "linear", "velocity")
    >>> f(torch.ones(2, 3), 0.5).shape
    torch.Size([2, 3])
    >>> g = FunctionField(lambda t, x: 2 - x, "linear", time_first=True, data_at=1)  # noise -> data at 2
    >>> g(torch.zeros(1, 1), 0.5)   # genkit's velocity points from data to noise
    tensor([[-2.]])
    """

    def __init__(self, fn: Callable[..., Tensor], path: Path | str, prediction: str = "velocity", *,
                 time_first: bool = False, data_at: int = 0):
        if prediction not in PREDICTIONS:
            raise ConfigError(f"unknown prediction {prediction!r}; choose one of {PREDICTIONS}")
        if isinstance(path, str):
            path = get_path(path)
        if not isinstance(path, Path):
            raise ConfigError(f"path must be a genkit Path or its name (e.g. 'linear'); got {path!r}")
        if data_at not in (0, 1):
            raise ConfigError(f"data_at must be 0 (genkit's convention: t = 0 data) or 1 (t = 1 data, as in "
                              f"torchcfm and flow_matching); got {data_at!r}")
        if not callable(fn):
            raise ConfigError(f"fn must be callable; got {type(fn).__name__}")
        self.fn, self.path, self.prediction = fn, path, prediction
        self.time_first, self.data_at = bool(time_first), data_at

    def __call__(self, x: Tensor, t: Tensor | float, **cond: Any) -> Tensor:
        t = broadcast_time(t, x)
        if self.data_at == 1:
            t = 1 - t
        if self.time_first:
            if t.numel() and not bool((t == t[0]).all()):
                raise ShapeError(f"{self!r} calls fn(t, x) with one time for the batch, but the batch's times "
                                 "differ; use a solver that steps all samples together")
            out = self.fn(t[0] if t.numel() else t.new_zeros(()), x, **cond)
        else:
            out = self.fn(x, t, **cond)
        if not isinstance(out, Tensor) or out.shape != x.shape:
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ShapeError(f"{self!r} returned {got} for x of shape {tuple(x.shape)}; a field returns the "
                             "shape of x")
        return -out if self.data_at == 1 and self.prediction == "velocity" else out

    def __repr__(self) -> str:
        flags = (", time_first=True" if self.time_first else "") + (", data_at=1" if self.data_at else "")
        return f"FunctionField({self.fn!r}, {self.path!r}, {self.prediction!r}{flags})"


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


class SamplesLikeBase:
    """What samplers ask a model (``denoise_end``, ``default_grid``, ``time_range``, ``check_grid``), delegated
    to ``self.base``: a wrapper of a model (x0-limited, guided) then samples over the model's own range."""

    base: Any
    path: Any

    @property
    def denoise_end(self) -> bool:
        return bool(getattr(self.base, "denoise_end", False))

    def default_grid(self, grid: Any) -> Any:
        fill = getattr(self.base, "default_grid", None)
        return fill(grid) if callable(fill) else grid

    def time_range(self) -> tuple[float, float]:
        own = getattr(self.base, "time_range", None)
        return own() if callable(own) else (self.path.t_min, 1.0)

    def check_grid(self, times: Tensor) -> None:
        check = getattr(self.base, "check_grid", None)
        if callable(check):
            check(times)


class LimitedX0(SamplesLikeBase):
    """``field`` with its data prediction limited (x0 clipping or dynamic thresholding, :class:`genkit.paths.X0Limit`):
    an ``x0`` field, so every solver reads the limited ``x0`` through the path (first-order solvers and DDIM step
    exactly as diffusers' schedulers with ``clip_sample`` / ``thresholding``). ``limit`` is an X0Limit or its
    keywords.

    >>> import torch
    >>> f = FunctionField(lambda x, t: x, "cosine", "x0")
    >>> LimitedX0(f, clip_sample=True)(torch.full((1, 2), 5.0), 0.5)
    tensor([[1., 1.]])
    """

    prediction = "x0"

    def __init__(self, base: Field, limit: X0Limit | None = None, **options: Any):
        check_field(base)
        if limit is not None and options:
            raise ConfigError(f"give an X0Limit or its options, not both; got {limit!r} and {sorted(options)}")
        self.base, self.path = base, base.path
        self.limit = limit if limit is not None else X0Limit(**options)

    def __call__(self, x: Tensor, t: Tensor | float, **cond: Any) -> Tensor:
        t = broadcast_time(t, x)
        return self.limit(self.path.convert(self.base(x, t, **cond), x, t, self.base.prediction, "x0"))

    def __repr__(self) -> str:
        return f"LimitedX0({self.base!r}, {self.limit!r})"


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
