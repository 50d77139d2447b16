"""Training settings: :class:`TrainConfig` (validated when built) and :func:`resume_changes` (which settings a
resumed run may not change without ``allow_new_settings``)."""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import numbers
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from ..errors import ConfigError

__all__ = ["TrainConfig", "resume_changes", "check_accelerator", "make_accelerator", "alternates"]


def _bad(name: str, value: Any, need: str) -> ConfigError:
    return ConfigError(f"TrainConfig.{name}={value!r} is invalid: {need}")


@dataclass
class TrainConfig:
    """What to train for and how. Batch size is per process: the global batch is ``batch_size * world_size``.

    The LR warms up linearly over ``warmup_steps`` (reaching ``lr`` at the last of them) then follows a cosine
    down to ``lr * min_lr_ratio`` at the final step. Weight decay
    applies to tensors with 2+ dimensions (not biases or norm gains). ``checkpoint_every=None`` saves only at
    the end. ``num_workers`` feeds a ``Dataset`` through a DataLoader (Tensor data is indexed in place); its
    transforms should be deterministic, randomness belongs in ``loss(batch, generator)``.
    ``nonfinite="skip"`` drops a step whose loss or gradient is NaN/inf, and still stops (NonFiniteLossError)
    after ``nonfinite_patience`` such steps in a row: a run that only skips has diverged.

    ``gradient_accumulation_steps`` (``A``) makes each training step ``A`` micro-batches of ``batch_size``: the
    gradient of the mean of their losses, then one optimizer step, one gradient clip, one EMA update and one
    scheduler step, so ``steps``, ``warmup_steps``, ``checkpoint_every`` and ``log_every`` count optimizer steps
    and the global batch is ``batch_size * world_size * A``. Micro-batch ``i`` of step ``k`` is batch number ``k
    * A + i`` of the data (a batch source's ``step`` argument) and its ``loss`` generator is seeded from ``(seed,
    k * A + i, rank)``; with ``A = 1`` everything is as before. Under DDP the gradients are synchronised only on
    the last micro-batch (``accelerator.no_sync`` on the others).
    """

    steps: int = 1000
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    grad_clip: float | None = 1.0
    ema_decay: float | None = 0.999
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    seed: int = 0
    checkpoint_every: int | None = 1000
    log_every: int = 50
    out_dir: str | Path = "runs/genkit"
    nonfinite: Literal["stop", "skip"] = "stop"
    nonfinite_patience: int = 100
    num_workers: int = 0
    progress: bool = True
    cpu: bool = False
    gradient_accumulation_steps: int = 1

    def __new__(cls, *args: Any, **kwargs: Any) -> TrainConfig:
        # the dataclass __init__ would raise a bare TypeError for TrainConfig(stepz=10); name the close field
        _check_names(cls, kwargs)
        return super().__new__(cls)

    def __post_init__(self) -> None:
        def integer(name: str, low: int, none_ok: bool = False) -> None:
            v = getattr(self, name)
            if (v is None and none_ok) or (isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= low):
                return
            raise _bad(name, v, f"use an integer >= {low}" + (" or None" if none_ok else ""))

        def real(name: str, low: float, high: float, none_ok: bool = False, open_low: bool = False) -> None:
            v = getattr(self, name)
            if v is None and none_ok:
                return
            ok = isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)
            if not (ok and (v > low if open_low else v >= low) and v <= high):
                span = f"{'(' if open_low else '['}{low}, {high}]"
                raise _bad(name, v, f"use a finite number in {span}" + (" or None" if none_ok else ""))

        for name in ("steps", "batch_size", "log_every", "nonfinite_patience", "gradient_accumulation_steps"):
            integer(name, 1)
        for name in ("warmup_steps", "num_workers", "seed"):
            integer(name, 0)
        integer("checkpoint_every", 1, none_ok=True)
        real("lr", 0.0, math.inf, open_low=True)
        real("weight_decay", 0.0, math.inf)
        real("min_lr_ratio", 0.0, 1.0)
        real("grad_clip", 0.0, math.inf, none_ok=True, open_low=True)
        d = self.ema_decay
        if d is not None and not (isinstance(d, numbers.Real) and not isinstance(d, bool) and 0.0 < d < 1.0):
            raise _bad("ema_decay", d, "use a number in (0, 1), e.g. 0.999 (1 would never move), or None for no EMA")
        if self.warmup_steps > self.steps:
            raise _bad("warmup_steps", self.warmup_steps, f"it exceeds steps={self.steps}; lower it")
        b = self.betas
        if not (isinstance(b, (tuple, list)) and len(b) == 2 and all(
                isinstance(x, numbers.Real) and not isinstance(x, bool) and 0.0 <= x < 1.0 for x in b)):
            raise _bad("betas", b, "use two numbers in [0, 1), e.g. (0.9, 0.999)")
        self.betas = (float(b[0]), float(b[1]))
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise _bad("mixed_precision", self.mixed_precision, "use 'no', 'bf16' or 'fp16'")
        if self.nonfinite not in ("stop", "skip"):
            raise _bad("nonfinite", self.nonfinite, "use 'stop' (raise) or 'skip' (drop the step)")
        for name in ("progress", "cpu"):
            if not isinstance(getattr(self, name), bool):
                raise _bad(name, getattr(self, name), "use True or False")
        if not isinstance(self.out_dir, (str, Path)) or not str(self.out_dir):
            raise _bad("out_dir", self.out_dir, "use a non-empty directory path")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """Build from a plain dict (YAML/CLI); unknown keys are an error, not ignored."""
        _check_names(cls, values)
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["out_dir"] = str(self.out_dir)
        return d


def _check_names(cls: type, values: dict[str, Any]) -> None:
    """A ConfigError naming each unknown field with its closest known one (difflib), and the known fields."""
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in values if k not in known]
    if unknown:
        close = {k: difflib.get_close_matches(str(k), known, 1) for k in unknown}
        hints = [f"did you mean {c[0]!r} for {k!r}?" for k, c in close.items() if c]
        raise ConfigError(f"unknown TrainConfig keys {unknown}" + (f" ({'; '.join(hints)})" if hints else "")
                          + f"; the fields are {', '.join(known)}")


# What a resumed run may change without changing what it computes step by step: when it stops (``steps``: the
# LR schedule is then recomputed, which fit() logs), how often it logs and saves, where it runs and how it
# treats non-finite steps. Every other setting must match the checkpoint's (see resume_changes).
_RESUME_FREE = frozenset({"steps", "checkpoint_every", "log_every", "out_dir", "nonfinite", "nonfinite_patience",
                          "num_workers", "progress", "cpu"})


def resume_changes(saved: dict[str, Any], config: TrainConfig) -> dict[str, tuple[Any, Any]]:
    """``{name: (saved value, new value)}`` for the settings of ``config`` that differ from a checkpoint's saved
    ``train_config`` and would make the resumed run differ from the uninterrupted one (lr, batch size, seed,
    EMA, ...). Settings the checkpoint predates are not compared.

    >>> resume_changes(TrainConfig(lr=1e-3).to_dict(), TrainConfig(lr=5e-4, steps=2000))
    {'lr': (0.001, 0.0005)}
    """
    saved, now = json.loads(json.dumps(saved)), json.loads(json.dumps(config.to_dict()))  # tuples as lists
    return {k: (saved[k], v) for k, v in now.items() if k not in _RESUME_FREE and k in saved and saved[k] != v}


def alternates(objective: Any) -> bool:
    """Whether ``objective`` declares several optimizers (``optimizers()`` with two or more): each step's loss
    then reaches only the parameters of its update, the others' are unused in that step."""
    optimizers = getattr(objective, "optimizers", None)
    return callable(optimizers) and len(optimizers()) > 1


def _finds_unused(acc: Any) -> bool:
    handler = getattr(acc, "ddp_handler", None)
    return bool(getattr(handler, "find_unused_parameters", False))


def check_accelerator(acc: Any, config: TrainConfig, objective: Any = None) -> None:
    """The accelerator must agree with ``config`` and be of a kind the trainer supports (one device or DDP); for
    an ``objective`` with several optimizers under DDP, find unused parameters (an update leaves the others'
    parameters without gradient, which DDP otherwise refuses at the next step)."""
    if acc.mixed_precision != config.mixed_precision:
        raise ConfigError(f"the accelerator uses mixed_precision={acc.mixed_precision!r} but TrainConfig has "
                          f"{config.mixed_precision!r}; make them agree")
    if acc.gradient_accumulation_steps != 1:
        raise ConfigError(f"the accelerator has gradient_accumulation_steps={acc.gradient_accumulation_steps}; "
                          "build it with 1 and set TrainConfig(gradient_accumulation_steps="
                          f"{acc.gradient_accumulation_steps}) instead (the trainer accumulates micro-batches itself)")
    if acc.distributed_type.value in ("FSDP", "DEEPSPEED", "MEGATRON_LM", "XLA"):
        raise ConfigError(f"Trainer supports one device and DDP; got distributed_type={acc.distributed_type.value}")
    if objective is not None and acc.num_processes > 1 and alternates(objective) and not _finds_unused(acc):
        raise ConfigError(f"{type(objective).__name__} alternates optimizers {sorted(objective.optimizers())}: each "
                          "update leaves the other parameters without gradient, which DDP refuses; build the "
                          "accelerator with genkit.train.make_accelerator(config, objective), or pass "
                          "kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)]")


def make_accelerator(cfg: TrainConfig, objective: Any = None) -> Any:
    """An Accelerator for ``cfg`` (the CPU when asked or without CUDA); for an ``objective`` with several
    optimizers its DDP finds unused parameters (see :func:`check_accelerator`). A ConfigError when an
    Accelerator of other settings exists already."""
    from accelerate import Accelerator, DistributedDataParallelKwargs

    handlers = [DistributedDataParallelKwargs(find_unused_parameters=True)] if alternates(objective) else None
    try:
        return Accelerator(cpu=cfg.cpu or not torch.cuda.is_available(), mixed_precision=cfg.mixed_precision,
                           kwargs_handlers=handlers)
    except ValueError as e:  # accelerate's state is a per-process singleton
        raise ConfigError(f"cannot create an Accelerator with mixed_precision={cfg.mixed_precision!r} ({e}); "
                          "pass the existing one as Trainer(accelerator=...) or restart the process") from e
