"""Classifier-free guidance as a field wrapper: every solver and every family that is a field gets it.

``guide(field, guidance, labels, null_label)`` returns a :class:`GuidedField`, a normal field (same ``.path`` and
``.prediction`` as ``field``) whose output at ``(x, t)`` is, in the parametrization ``p`` the guidance names
(Ho & Salimans 2022, arXiv 2207.12598),

    ``p_guided = p_null + s (p_cond - p_null)``,

``p_cond = field(x, t, labels=c)`` and ``p_null = field(x, t, labels=null_label)``, then converted through the path
(:meth:`genkit.paths.Path.convert`) into the field's own prediction. Scale ``s = 0`` is the unconditional (null)
output and ``s = 1`` the conditional one, exactly: those return the one branch they need from one network call on
the batch. Otherwise both halves come from ONE batched call, ``field([x, x], [t, t], labels=[c, null])``, split in
two. Every conversion is affine in the output with coefficients that depend on ``(x, t)`` only, so plain guidance
(and its interval) is the same in every parametrization (in score terms ``grad log p(x_t) + s (grad log p(x_t|c) -
grad log p(x_t))``); the parametrization matters only for the rescaling:

- **interval** ``(t_lo, t_hi)`` (Kynkaenniemi et al. 2024, arXiv 2404.07724): guidance is applied where
  ``t_lo < t <= t_hi`` (their ``sigma in (sigma_lo, sigma_hi]`` read as times); elsewhere the output is the
  conditional one (scale 1), from the conditional half alone when no sample of the batch is inside.
- **rescale** ``phi`` (Lin et al. 2023, arXiv 2305.08891, Alg. 2, eqs. 15-16), applied in ``p``:
  ``p_rescaled = p_guided * std(p_cond) / std(p_guided)`` with per-sample standard deviations over all non-batch
  dimensions, and ``p_final = phi p_rescaled + (1 - phi) p_guided``; ``phi = 0`` is plain guidance. A guided
  output with zero spread is left unscaled. At ``s = 0`` the rescaled output is the null output with the
  conditional spread (the formula, not a special case); ``s = 1`` is the conditional output for every ``phi``.

``parametrization=None`` (default) applies the rescaling in the field's own prediction, as diffusers'
``rescale_noise_cfg`` does on the network output; Lin et al. rescale the ``v`` / ``x0`` prediction.

>>> import torch
>>> from genkit.fields import FunctionField
>>> f = FunctionField(lambda x, t, labels: x + labels[:, None].to(x.dtype), "linear", "velocity")
>>> g = guide(f, Guidance(3.0), labels=1, null_label=0)
>>> g(torch.zeros(2, 1), 0.5)   # 0 + 3 (1 - 0)
tensor([[3.],
        [3.]])
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .errors import ConfigError, ShapeError
from .fields import Field, SamplesLikeBase, check_field
from .paths import PREDICTIONS, broadcast_time

__all__ = ["Guidance", "GuidedField", "guide"]


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise ConfigError(f"guidance {name} must be a finite number; got {value!r}")
    return float(value)


@dataclass(frozen=True)
class Guidance:
    """How to guide: ``Guidance(scale, interval=None, rescale=0.0, parametrization=None)``.

    scale: ``s >= 0``; 0 unconditional, 1 conditional, > 1 guided (diffusers' ``guidance_scale``, k-diffusion's
        ``cond_scale``).
    interval: ``(t_lo, t_hi)`` with ``0 <= t_lo < t_hi <= 1``: guide only where ``t_lo < t <= t_hi``
        (arXiv 2404.07724); None guides at every time.
    rescale: ``phi in [0, 1]`` of rescaled guidance (arXiv 2305.08891); 0 is off.
    parametrization: where the rescaling is applied (one of ``eps``, ``x0``, ``velocity``, ``v``, ``score``);
        None: the field's own prediction.
    """

    scale: float
    interval: tuple[float, float] | None = None
    rescale: float = 0.0
    parametrization: str | None = None

    def __post_init__(self) -> None:
        scale = _number("scale", self.scale)
        if scale < 0:
            raise ConfigError(f"guidance scale must be >= 0 (0 unconditional, 1 conditional, > 1 guided); got {scale}")
        object.__setattr__(self, "scale", scale)
        if self.interval is not None:
            pair = not isinstance(self.interval, (str, bytes)) and hasattr(self.interval, "__len__")
            if not pair or len(self.interval) != 2:
                raise ConfigError(f"guidance interval must be a pair (t_lo, t_hi) of times in [0, 1]; got "
                                  f"{self.interval!r}")
            lo, hi = (_number("interval end", v) for v in self.interval)
            if not 0.0 <= lo < hi <= 1.0:
                raise ConfigError(f"guidance interval needs 0 <= t_lo < t_hi <= 1 (t = 0 data, t = 1 noise); got "
                                  f"({lo:g}, {hi:g})")
            object.__setattr__(self, "interval", (lo, hi))
        phi = _number("rescale", self.rescale)
        if not 0.0 <= phi <= 1.0:
            raise ConfigError(f"guidance rescale phi must be in [0, 1] (0 off; Lin et al. use 0.7); got {phi}")
        object.__setattr__(self, "rescale", phi)
        if self.parametrization is not None and self.parametrization not in PREDICTIONS:
            raise ConfigError(f"unknown guidance parametrization {self.parametrization!r}; choose one of "
                              f"{PREDICTIONS} or None (the field's own)")

    @classmethod
    def of(cls, guidance: Guidance | float) -> Guidance:
        """``guidance`` itself, or ``Guidance(scale)`` for a number."""
        return guidance if isinstance(guidance, Guidance) else cls(guidance)

    def inside(self, t: Tensor) -> Tensor:
        """``[B]`` bool: where guidance applies (``t_lo < t <= t_hi``; everywhere without an interval)."""
        if self.interval is None:
            return torch.ones(t.shape, dtype=torch.bool, device=t.device)
        lo, hi = self.interval
        return (t > lo) & (t <= hi)

    def combine(self, cond: Tensor, null: Tensor) -> Tensor:
        """``null + s (cond - null)``, rescaled with ``phi`` (both in the parametrization they are given in)."""
        if self.scale == 0.0 and self.rescale == 0.0:
            return null
        out = null + self.scale * (cond - null)
        if self.rescale == 0.0:
            return out
        dims = tuple(range(1, out.ndim))
        std_cond = cond.std(dim=dims, keepdim=True, correction=0) if dims else cond.abs()
        std_out = out.std(dim=dims, keepdim=True, correction=0) if dims else out.abs()
        ratio = torch.where(std_out > 0, std_cond / torch.where(std_out > 0, std_out, 1.0), 1.0)
        return self.rescale * (out * ratio) + (1 - self.rescale) * out


class GuidedField(SamplesLikeBase):
    """``field`` under classifier-free guidance: a field with the same ``path`` and ``prediction`` (see the module
    docstring for the math). Made by :func:`guide`."""

    def __init__(self, field: Field, guidance: Guidance | float, labels: Tensor | int | None = None,
                 null_label: int | None = None):
        check_field(field)
        base = getattr(field, "base", field)
        if getattr(field, "num_classes", getattr(base, "num_classes", 0)) is None:
            raise ConfigError(f"{field!r} is unconditional (num_classes is None): classifier-free guidance needs a "
                              "class-conditional model (num_classes set) trained with class dropout to a "
                              "null label")
        if null_label is None:
            null_label = getattr(field, "null_label", getattr(base, "null_label", None))
        if null_label is None:
            raise ConfigError(f"{field!r} has no null label, so it cannot be guided: classifier-free guidance needs "
                              "the 'no class' label a model learns with class dropout; "
                              "pass null_label= if the network has one")
        if isinstance(null_label, bool) or not isinstance(null_label, numbers.Integral) or null_label < 0:
            raise ConfigError(f"null_label must be a non-negative integer class id; got {null_label!r}")
        self.base, self.guidance, self.null_label = field, Guidance.of(guidance), int(null_label)
        self.path, self.prediction = field.path, field.prediction
        self.num_classes = getattr(field, "num_classes", getattr(base, "num_classes", None))
        self.labels = None if labels is None else self._check_labels(labels, None)

    # --- labels ------------------------------------------------------------------------------------------
    def _check_labels(self, labels: Any, x: Tensor | None) -> Tensor | int:
        if isinstance(labels, numbers.Integral) and not isinstance(labels, bool):
            labels = int(labels)
            self._check_range(torch.tensor([labels]))
            return labels
        if isinstance(labels, (list, tuple)):
            labels = torch.tensor(labels) if len(labels) else torch.zeros(0, dtype=torch.long)
        integer = torch.is_tensor(labels) and not (labels.is_floating_point() or labels.is_complex())
        if not integer or labels.dtype is torch.bool:
            what = labels.dtype if torch.is_tensor(labels) else type(labels).__name__
            raise ShapeError(f"labels must be an int or an integer tensor of class ids [batch]; got {what}")
        if labels.ndim != 1:
            raise ShapeError(f"labels must be a 1-D tensor [batch] of class ids (or one int); got shape "
                             f"{tuple(labels.shape)}")
        if x is not None:
            self._match(labels, x)
        self._check_range(labels)
        return labels

    def _check_range(self, labels: Tensor) -> None:
        k = self.num_classes if isinstance(self.num_classes, int) else None
        ok = labels >= 0 if k is None else ((labels >= 0) & (labels < k)) | (labels == self.null_label)
        if not bool(ok.all()):
            classes = "non-negative ids" if k is None else f"0..{k - 1}"
            raise ConfigError(f"labels {labels[~ok][:5].tolist()} are not class ids: the classes are {classes} "
                              f"(and the null label {self.null_label})")

    @staticmethod
    def _match(labels: Tensor, x: Tensor) -> None:
        if labels.shape[0] != x.shape[0]:
            raise ShapeError(f"labels has {labels.shape[0]} entries but the batch x has {x.shape[0]}; pass one label "
                             "per sample (or one int for all)")
        if labels.device != x.device:
            raise ShapeError(f"labels are on {labels.device} but x is on {x.device}; move them: labels.to(x.device)")

    def _labels(self, x: Tensor, cond: dict[str, Any]) -> Tensor:
        given = cond.pop("labels", None)
        if given is not None and self.labels is not None:
            raise ConfigError("labels were given twice: to guide(...) and to the call; give them once")
        labels = self.labels if given is None else self._check_labels(given, x)
        if labels is None:
            raise ConfigError("a guided field needs class labels: guide(field, guidance, labels=...) or "
                              "guided(x, t, labels=...)")
        if isinstance(labels, int):
            return torch.full((x.shape[0],), labels, dtype=torch.long, device=x.device)
        self._match(labels, x)
        return labels

    # --- the field -----------------------------------------------------------------------------------------
    def __call__(self, x: Tensor, t: Tensor | float, **cond: Any) -> Tensor:
        t = broadcast_time(t, x)
        labels = self._labels(x, cond)
        g, field = self.guidance, self.base
        inside = g.inside(t)
        some = bool(inside.any())
        if g.scale == 1.0 or not some:  # conditional everywhere: one call on the batch
            return field(x, t, labels=labels, **cond)
        everywhere = bool(inside.all())
        if g.scale == 0.0 and g.rescale == 0.0 and everywhere:  # unconditional: one call on the batch
            return field(x, t, labels=torch.full_like(labels, self.null_label), **cond)
        b = x.shape[0]
        twice = {k: torch.cat([v, v]) if torch.is_tensor(v) and v.ndim and v.shape[0] == b else v
                 for k, v in cond.items()}
        out = field(torch.cat([x, x]), torch.cat([t, t]),
                    labels=torch.cat([labels, torch.full_like(labels, self.null_label)]), **twice)
        c, n = out[:b], out[b:]
        p = g.parametrization or self.prediction
        if p == self.prediction:
            guided = g.combine(c, n)
        else:
            convert = self.path.convert
            guided = convert(g.combine(convert(c, x, t, self.prediction, p), convert(n, x, t, self.prediction, p)),
                             x, t, p, self.prediction)
        if not everywhere:
            guided = torch.where(inside.reshape((-1,) + (1,) * (x.ndim - 1)), guided, c)
        return guided

    @property
    def x0_limit(self) -> Any:
        return getattr(self.base, "x0_limit", None)

    def __repr__(self) -> str:
        return f"GuidedField({self.base!r}, {self.guidance!r}, null_label={self.null_label})"


def guide(field: Field, guidance: Guidance | float, labels: Tensor | int | None = None,
          null_label: int | None = None) -> GuidedField:
    """``field`` under classifier-free guidance (a :class:`Guidance` or its scale), see the module docstring.

    ``labels`` (one int for the batch or ``[B]`` class ids) may instead be given at each call (``labels=``, as
    ``genkit.solve(guided, x, labels=...)`` passes them); ``null_label`` defaults to ``field.null_label``.
    """
    return GuidedField(field, guidance, labels, null_label)
