"""The checks every fine-tuning objective makes of its arguments: the model to fine-tune (an ``mdlm`` model with
trainable parameters), its frozen reference (the pretrained model it was copied from) and plain numbers."""

from __future__ import annotations

import math
import numbers
from typing import Any

from torch import nn

from ..errors import ConfigError

__all__ = ["is_mdlm", "check_policy", "check_reference"]


def _int(name: str, value: Any, low: int, hint: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ConfigError(f"{name} must be an integer >= {low}; got {value!r}. {hint}")
    return int(value)


def _real(name: str, value: Any, hint: str, *, positive: bool) -> float:
    ok = not isinstance(value, bool) and isinstance(value, numbers.Real) and math.isfinite(value) \
        and (value > 0 if positive else value >= 0)
    if not ok:
        raise ConfigError(f"{name} must be a finite number {'> 0' if positive else '>= 0'}; got {value!r}. {hint}")
    return float(value)


def is_mdlm(m: Any) -> bool:
    """Whether ``m`` is a masked discrete diffusion model (``logits``, ``mask_id`` and ``schedule``)."""
    return isinstance(m, nn.Module) and callable(getattr(m, "logits", None)) \
        and getattr(m, "mask_id", None) is not None and getattr(m, "schedule", None) is not None


def check_policy(model: Any, method: str) -> None:
    """``model`` must be an ``mdlm`` model with trainable parameters (a copy of a reference another objective froze
    carries its ``requires_grad=False`` flags and would train nothing)."""
    if not is_mdlm(model):
        raise ConfigError(f"{method} fine-tunes masked diffusion: model must be an mdlm model "
                          f"(genkit.models.MaskedDiffusion); got {type(model).__name__}")
    if not any(p.requires_grad for p in model.parameters()):
        raise ConfigError("model has no trainable parameters (all requires_grad=False), so fine-tuning would "
                          "change nothing; a copy.deepcopy of a reference already frozen by another objective "
                          "copies its frozen flags: pass copy.deepcopy(pretrained).requires_grad_(True)")


def check_reference(model: Any, reference: Any, method: str, usage: str) -> None:
    """``reference`` must be the pretrained ``mdlm`` model ``model`` was copied from: another object of the same
    vocabulary, length and schedule. ``usage`` shows the right call in the error for the same object."""
    if not is_mdlm(reference):
        raise ConfigError(f"{method}: reference must be an mdlm model (the pretrained one); got "
                          f"{type(reference).__name__}")
    if reference is model:
        raise ConfigError(f"model and reference are the same object; fine-tune a copy: {usage}")
    for attr in ("vocab_size", "length"):
        if getattr(model, attr) != getattr(reference, attr):
            raise ConfigError(f"reference has {attr}={getattr(reference, attr)} but model has {attr}="
                              f"{getattr(model, attr)}; the reference must be the pretrained model the fine-tuned "
                              "one was copied from (same vocabulary and length)")
    if getattr(model.schedule, "name", None) != getattr(reference.schedule, "name", None):
        raise ConfigError(f"reference uses the {reference.schedule.name!r} schedule but model uses "
                          f"{model.schedule.name!r}; use the reference's schedule for the model")
