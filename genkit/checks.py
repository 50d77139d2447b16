"""The argument checks every entry point shares: the state ``x`` (``solve``, ``log_prob``), ``generator=`` and
``device=`` / ``map_location=``, so a NumPy array, an integer tensor, a seed or a device name that cannot run here
gets one genkit error naming the value and the fix wherever it is passed, not a torch error from deep inside.

>>> import torch
>>> check_device("cpu", "f")
device(type='cpu')
>>> try:
...     check_generator(7, "f")
... except ConfigError as e:
...     print(e)
f: generator must be a torch.Generator, not an int (got 7); pass generator=torch.Generator().manual_seed(7)
"""

from __future__ import annotations

import difflib
import numbers
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .errors import ConfigError, ShapeError

__all__ = ["check_state", "check_generator", "check_device", "describe_nonfinite", "check_class_names", "class_ids"]

_DEVICE_KINDS = ("cpu", "cuda", "mps", "xpu", "meta")


def check_state(x: Any, where: str, name: str = "x") -> Tensor:
    """``x`` itself when it is a floating-point tensor; a ShapeError naming ``name`` and the conversion otherwise
    (a NumPy array: ``torch.as_tensor``; an integer tensor: ``.float()``, as continuous states are real)."""
    if not torch.is_tensor(x):
        kind = f"{type(x).__module__}.{type(x).__name__}" if type(x).__module__ != "builtins" else type(x).__name__
        shape = f" of shape {tuple(x.shape)} and dtype {x.dtype}" if hasattr(x, "shape") and hasattr(x, "dtype") else ""
        raise ShapeError(f"{where}: {name} must be a torch.Tensor; got a {kind}{shape}. Convert it first: "
                         f"{name} = torch.as_tensor({name}, dtype=torch.float32)")
    if not x.is_floating_point():
        raise ShapeError(f"{where}: {name} must be a floating-point tensor (a continuous state); got dtype {x.dtype}. "
                         f"Convert it: {name}.float() (or {name}.to(torch.float64))")
    return x


def check_generator(generator: Any, where: str) -> torch.Generator | None:
    """``generator`` when it is None or a ``torch.Generator``; a ConfigError saying how to make one otherwise."""
    if generator is None or isinstance(generator, torch.Generator):
        return generator
    if isinstance(generator, int) and not isinstance(generator, bool):
        raise ConfigError(f"{where}: generator must be a torch.Generator, not an int (got {generator}); pass "
                          f"generator=torch.Generator().manual_seed({generator})")
    raise ConfigError(f"{where}: generator must be a torch.Generator or None; got {generator!r} "
                      f"({type(generator).__name__}). Seed one: generator=torch.Generator().manual_seed(0)")


def check_device(device: Any, where: str, name: str = "device") -> torch.device:
    """``device`` (a name such as ``"cuda:1"``, an index or a ``torch.device``) as a ``torch.device`` that this
    machine has; a ConfigError for a name torch does not know (``"gpu"``) or a device that is not available
    (``"cuda"`` without CUDA, ``"cuda:3"`` on a 2-GPU machine, ``"mps"`` off Apple silicon)."""
    if not isinstance(device, (str, int, torch.device)) or isinstance(device, bool):
        raise ConfigError(f"{where}: {name}={device!r} is not a device; use 'cpu', 'cuda', 'cuda:0' or a torch.device")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        kind = str(device).split(":")[0].lower()
        close = difflib.get_close_matches(kind, _DEVICE_KINDS, n=1)
        hint = {"gpu": "cuda"}.get(kind) or (close[0] if close else None)
        raise ConfigError(f"{where}: unknown {name} {device!r}; use 'cpu', 'cuda', 'cuda:0' (or 'mps') or a "
                          "torch.device" + (f" (did you mean {hint!r}?)" if hint else "")) from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"{where}: {name}={str(device)!r} but CUDA is not available on this machine "
                              f"(torch.cuda.is_available() is False; torch {torch.__version__}, built for CUDA "
                              f"{torch.version.cuda}); use {name}='cpu', or run where an NVIDIA GPU, its driver and a "
                              "CUDA build of torch are installed")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise ConfigError(f"{where}: {name}={str(device)!r} but this machine has {count} CUDA device(s) "
                              f"(cuda:0 to cuda:{count - 1}); pick one of them")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError(f"{where}: {name}={str(device)!r} but MPS (Apple silicon) is not available here; use "
                          f"{name}='cpu'" + (" or 'cuda'" if torch.cuda.is_available() else ""))
    return dev


def describe_nonfinite(x: Tensor) -> str | None:
    """``"holds 3 NaN/inf value(s) (first in sample 1)"`` when ``x`` ``[batch, ...]`` has any, else None (one
    host sync; always None for non-float tensors)."""
    if not (x.is_floating_point() or x.is_complex()):
        return None
    bad = ~torch.isfinite(x)
    count = int(bad.sum())
    if not count:
        return None
    first = int(bad.reshape(len(x), -1).any(1).nonzero()[0]) if x.ndim else 0
    return f"holds {count} NaN/inf value(s) (first in sample {first})"


def check_class_names(class_names: Any, k: int) -> list[str] | None:
    """``class_names`` as a list of ``k`` strings (None stays None); anything else is a ConfigError."""
    if class_names is None:
        return None
    if isinstance(class_names, str) or not all(isinstance(c, str) for c in class_names):
        raise ConfigError(f"class_names must be a list of {k} strings; got {class_names!r}")
    class_names = list(class_names)
    if len(class_names) != k:
        raise ConfigError(f"class_names has {len(class_names)} names for num_classes={k}")
    return class_names


def class_ids(labels: Any, n: int, num_classes: int, *, null_label: int | None = None,
              class_names: Sequence[str] | None = None, what: str = "model") -> Tensor:
    """``labels`` given to ``sample`` / ``log_prob`` (one class id for all ``n``, a list of ``n`` ids or a 1-D
    integer tensor) as ``[n]`` int64 ids in ``0..num_classes - 1`` (or ``null_label``), on the tensor's device."""
    if isinstance(labels, numbers.Integral) and not isinstance(labels, bool):
        labels = torch.full((n,), int(labels), dtype=torch.long)
    elif isinstance(labels, (list, tuple)):
        labels = torch.tensor(labels, dtype=torch.long) if len(labels) else torch.zeros(0, dtype=torch.long)
    integer = torch.is_tensor(labels) and not (labels.is_floating_point() or labels.is_complex())
    if not integer or labels.dtype is torch.bool:
        kind = labels.dtype if torch.is_tensor(labels) else type(labels).__name__
        raise ShapeError(f"labels must be a class id (int), a list of n ids or a 1-D integer tensor; got {kind}")
    if labels.shape != (n,):
        raise ShapeError(f"labels must hold one class id per sample, shape [{n}]; got {tuple(labels.shape)}")
    bad = ((labels < 0) | (labels >= num_classes)) & (labels != (-1 if null_label is None else null_label))
    if bool(bad.any()):
        known = f" ({', '.join(map(str, class_names))})" if class_names else ""
        raise ConfigError(f"labels {labels[bad][:5].tolist()} are not classes of this {what}: "
                          f"0..{num_classes - 1}{known}")
    return labels.long()
