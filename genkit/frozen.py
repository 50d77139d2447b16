"""Frozen parts of an objective (a teacher, a reference model, a reward network) in one holder.

A :class:`Frozen` holder is an ``nn.Module`` attribute of an objective whose parts are kept *outside*
``_modules``: they get no gradients (``requires_grad_(False)``), stay in eval mode whatever ``train()`` says, are
not in ``parameters()`` (so never in an optimizer) nor in ``state_dict()`` (so never in the trained weights), yet
``.to(device)`` / ``.double()`` move them with the module that holds the holder.

Each part is recorded by where it came from: ``{"source": folder or None, "fingerprint": hex, "ema": bool or
None}``. A module loaded from a checkpoint by ``genkit.load`` carries its folder, which of its weights it holds
(``ema``: the EMA or the raw weights) and their fingerprint (a hash of the model config and those weights,
:func:`genkit.checkpoint.fingerprint`); any other part (an analytic field, a plain module)
has source None and a fingerprint of its config and tensors. The trainer saves these records with the resume
state and, on resume, refuses a changed part and reloads a missing one from its folder (:func:`reload`).

>>> import torch
>>> holder = Frozen(teacher=torch.nn.Linear(2, 2))
>>> list(holder.parameters()), list(holder.state_dict()), holder.teacher.weight.requires_grad
([], [], False)
>>> holder.double().teacher.weight.dtype
torch.float64
"""

from __future__ import annotations

import hashlib
import inspect
import json
import numbers
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .errors import CheckpointError, ConfigError

__all__ = ["Frozen", "fingerprint", "fingerprint_state", "source_of", "ema_of", "reload", "holders"]

SOURCE_ATTR, FINGERPRINT_ATTR = "genkit_source", "genkit_fingerprint"  # set on a module by genkit.load
EMA_ATTR = "genkit_ema"  # which of the folder's weights genkit.load gave it: True (EMA), False (raw), None


def _feed_tensor(h: Any, t: Tensor) -> None:
    t = t.detach().to("cpu").contiguous()
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def fingerprint_state(config: Mapping[str, Any] | None, state: Mapping[str, Tensor]) -> str:
    """sha256 (hex) of a JSON config and named tensors (key, dtype, shape, bytes, in key order): what
    :func:`genkit.checkpoint.fingerprint` computes for a checkpoint folder."""
    h = hashlib.sha256(json.dumps(config, sort_keys=True, default=repr).encode())
    for key in sorted(state):
        h.update(key.encode())
        _feed_tensor(h, state[key])
    return h.hexdigest()


def _feed(h: Any, obj: Any, depth: int) -> None:
    """Feed what determines ``obj``'s outputs: tensors, numbers, configs; objects through their attributes."""
    if isinstance(obj, Tensor):
        _feed_tensor(h, obj)
    elif obj is None or isinstance(obj, (bool, numbers.Number, str)):
        h.update(repr(obj).encode())
    elif isinstance(obj, (list, tuple)):
        for x in obj:
            _feed(h, x, depth)
    elif isinstance(obj, dict):
        for k in sorted(obj, key=repr):
            h.update(repr(k).encode())
            _feed(h, obj[k], depth)
    elif depth > 0:
        h.update(type(obj).__qualname__.encode())
        config = getattr(obj, "config", None)
        if callable(config):
            h.update(json.dumps(config(), sort_keys=True, default=repr).encode())
        if isinstance(obj, nn.Module):
            _feed(h, obj.state_dict(), depth)
        elif not callable(config) and hasattr(obj, "__dict__"):
            _feed(h, {k: v for k, v in vars(obj).items() if not callable(v) or isinstance(v, nn.Module)}, depth - 1)


def fingerprint(part: Any) -> str:
    """The fingerprint of a frozen part: the one ``genkit.load`` tagged it with, else sha256 (hex) of its
    config and tensors. For a module without a tag, ``fingerprint_state(module.config(), module.state_dict())``
    when it has ``config()``, so a plain copy of a checkpoint's model gets the folder's fingerprint."""
    tag = getattr(part, FINGERPRINT_ATTR, None)
    if isinstance(tag, str):
        return tag
    if isinstance(part, nn.Module) and callable(getattr(part, "config", None)):
        return fingerprint_state(part.config(), part.state_dict())
    h = hashlib.sha256()
    _feed(h, part, depth=4)
    return h.hexdigest()


def source_of(part: Any) -> str | None:
    """The checkpoint folder ``part`` was loaded from (``genkit.load``'s tag), else None."""
    source = getattr(part, SOURCE_ATTR, None)
    return source if isinstance(source, str) else None


def ema_of(part: Any) -> bool | None:
    """Whether ``part`` holds its checkpoint's EMA weights (True) or raw ones (False); None when not loaded."""
    ema = getattr(part, EMA_ATTR, None)
    return ema if isinstance(ema, bool) else None


def _module_of(part: Any) -> nn.Module | None:
    """The module whose weights ``part`` computes with: itself, or the ``base`` of a view (``as_velocity``)."""
    module = part if isinstance(part, nn.Module) else getattr(part, "base", None)
    return module if isinstance(module, nn.Module) else None


class Frozen(nn.Module):
    """Holder of named frozen parts: ``Frozen(teacher=field)``, ``holder.set(name, part)`` (or ``holder.teacher =
    part``), ``holder.teacher`` or ``holder.get(name)``, ``name in holder``, ``holder.records()``. See the module
    docstring for what it keeps out (gradients, train mode, parameters, state_dict) and in (``.to``, ``.double``)."""

    def __init__(self, **parts: Any):
        super().__init__()
        object.__setattr__(self, "_parts", {})  # a plain dict: nn.Module never looks inside it
        object.__setattr__(self, "_fingerprints", {})
        for name, part in parts.items():
            self.set(name, part)

    def set(self, name: str, part: Any) -> None:
        """Attach ``part`` (any field or module, frozen here) as ``name``; ``None`` detaches it."""
        if not isinstance(name, str) or not name.isidentifier():
            raise ConfigError(f"a frozen part's name must be an identifier like 'teacher'; got {name!r}")
        self._fingerprints.pop(name, None)
        if part is None:
            self._parts.pop(name, None)
            return
        if isinstance(part, Frozen):
            raise ConfigError(f"frozen part {name!r} is itself a Frozen holder; attach its parts one by one")
        module = _module_of(part)
        if module is not None:
            module.requires_grad_(False).eval()
        self._parts[name] = part

    def get(self, name: str, default: Any = None) -> Any:
        return self._parts.get(name, default)

    def __setattr__(self, name: str, value: Any) -> None:
        if name.startswith("_") or name == "training":  # nn.Module's own state
            super().__setattr__(name, value)
        else:  # holder.teacher = part means holder.set("teacher", part), never a submodule
            self.set(name, value)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            parts = self.__dict__.get("_parts", {})
            if name in parts:
                return parts[name]
            raise AttributeError(f"no frozen part {name!r}; the holder has {sorted(parts)}") from None

    def __getitem__(self, name: str) -> Any:
        if name not in self._parts:
            raise KeyError(f"no frozen part {name!r}; the holder has {sorted(self._parts)}")
        return self._parts[name]

    def __contains__(self, name: object) -> bool:
        return name in self._parts

    def __len__(self) -> int:
        return len(self._parts)

    def names(self) -> list[str]:
        return list(self._parts)

    def fingerprint(self, name: str) -> str:
        """The part's fingerprint, computed once when first asked (parts are frozen)."""
        if name not in self._fingerprints:
            self._fingerprints[name] = fingerprint(self[name])
        return self._fingerprints[name]

    def records(self) -> dict[str, dict[str, Any]]:
        """``{name: {"source": folder or None, "fingerprint": hex, "ema": True / False / None}}``, what a
        checkpoint records (``ema``: which weights of the folder the part holds; None when not loaded)."""
        return {name: {"source": source_of(part), "fingerprint": self.fingerprint(name), "ema": ema_of(part)}
                for name, part in self._parts.items()}

    def train(self, mode: bool = True) -> Frozen:
        self.training = mode  # the parts stay in eval mode
        return self

    def _apply(self, fn: Callable[..., Any], recurse: bool = True) -> Frozen:
        # .to(device) / .double() reach the parts as they would a buffer
        super()._apply(fn, recurse)
        seen: set[int] = set()
        for part in self._parts.values():
            module = _module_of(part)
            if module is not None and id(module) not in seen:
                seen.add(id(module))
                module._apply(fn)
        return self

    def extra_repr(self) -> str:
        return ", ".join(f"{name}={type(part).__name__}" for name, part in self._parts.items())


def holders(*modules: nn.Module) -> Iterator[tuple[str, Frozen]]:
    """``(path, holder)`` of every Frozen holder inside ``modules`` (each once; ``path`` as in named_modules)."""
    seen: set[int] = set()
    for module in modules:
        for path, sub in module.named_modules():
            if isinstance(sub, Frozen) and id(sub) not in seen:
                seen.add(id(sub))
                yield path, sub


def _takes_ema(loader: Callable[..., Any]) -> bool:
    try:
        params = inspect.signature(loader).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == "ema" or p.kind is p.VAR_KEYWORD for p in params)


def reload(record: Mapping[str, Any], loader: Callable[..., Any], name: str = "part") -> Any:
    """The part a checkpoint recorded, loaded again from its folder with ``loader`` (e.g. ``genkit.load``, given
    ``ema=`` as recorded, so a part loaded with raw weights comes back with them); a CheckpointError when the
    folder is gone or now holds another model (both fingerprints named)."""
    source = record.get("source")
    if not isinstance(source, str):
        raise CheckpointError(f"frozen part {name!r} was not loaded from a checkpoint (source None, fingerprint "
                              f"{record.get('fingerprint')}); attach the same part before resuming")
    ema = record.get("ema")
    try:  # the same weights of the folder (EMA or raw) as the run used, where the loader takes ema= (genkit.load)
        part = loader(source, ema=ema) if isinstance(ema, bool) and _takes_ema(loader) else loader(source)
    except Exception as e:
        raise CheckpointError(f"cannot reload frozen part {name!r} from {source} ({e}); restore that checkpoint "
                              "or attach the part yourself") from e
    got = fingerprint(part)
    if got != record.get("fingerprint"):
        raise CheckpointError(f"frozen part {name!r}: {source} now holds fingerprint {got}, but the run was trained "
                              f"with fingerprint {record.get('fingerprint')}; restore that checkpoint or start a "
                              "fresh run")
    return part
