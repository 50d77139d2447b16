"""The generic trainer: anything with ``loss(batch, generator=None) -> (loss, logs)`` and ``config()``.

Built on ``accelerate`` (one device or DDP, launched by ``python``, ``torchrun`` or ``accelerate launch``).
Everything random is a pure function of ``(seed, step, rank)``: batch ``k`` of rank ``r`` is a slice of
the epoch's permutation, and ``loss`` gets a generator seeded from ``(seed, k, r)``, so resuming from a
checkpoint reproduces the uninterrupted run exactly.

>>> # result = Trainer(model, TrainConfig(steps=1000, batch_size=256, out_dir="runs/x")).fit(data)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import numbers
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, IterableDataset
from tqdm import tqdm

from . import checkpoint
from .ema import EMA
from .errors import CheckpointError, ConfigError, DataError, NonFiniteLossError, ShapeError, TrainingInterrupted

__all__ = ["TrainConfig", "Trainer", "TrainResult", "LogRecord", "resume_changes"]
log = logging.getLogger(__name__)
_NOISE, _GLOBAL, _PERM, _LOADER = 1, 2, 3, 4  # tags keep the derived seed streams apart
_FUSED_ADAMW_DEVICES = ("cpu", "cuda") if torch.__version__ >= "2.4" else ("cuda",)  # TorchVersion: a version compare


def _derive_seed(*parts: int) -> int:
    h = hashlib.blake2b(digest_size=8)
    for p in parts:
        h.update(int(p).to_bytes(16, "little", signed=True))
    return int.from_bytes(h.digest(), "little") & ((1 << 63) - 1)


def _seed_global(seed: int, device: torch.device) -> None:
    """``torch.manual_seed`` for the CPU and the training device only (the full call re-queues lazy seeding of
    every uninitialised backend, with a captured stack trace: 0.3-2 ms a step)."""
    torch.default_generator.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.manual_seed_all(seed)  # CUDA is initialised by now, so this seeds directly
    elif device.type != "cpu":
        torch.manual_seed(seed)


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

        for name in ("steps", "batch_size", "log_every", "nonfinite_patience"):
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
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown TrainConfig keys {unknown}; known keys: {sorted(known)}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["out_dir"] = str(self.out_dir)
        return d


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


class _Interrupt:
    """While training, SIGINT (Ctrl-C) and SIGTERM (a scheduler's preemption) only set ``signum``; the loop
    reads it after the step it is in (all ranks agree through that step's one collective), saves a checkpoint
    and raises TrainingInterrupted. A second signal acts as it would without the trainer. Handlers are installed
    only in the main thread (Python allows no other)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _Interrupt:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, getattr(signal, "SIGTERM", None)):
                if sig is not None:
                    self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.signum = signum
        self.__exit__()

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old if old is not None else signal.SIG_DFL)
        self._old = {}


@dataclass(frozen=True)
class LogRecord:
    """One logged point. ``loss`` is averaged over all ranks and the steps since the last log, ``logs`` (the
    model's own) over this process's steps; ``lr`` and ``grad_norm`` are the last step's; ``skipped`` counts
    all non-finite steps dropped so far."""

    step: int
    loss: float
    lr: float
    grad_norm: float
    samples_per_s: float
    skipped: int
    logs: dict[str, float]
    is_main_process: bool


@dataclass
class TrainResult:
    """What ``fit`` returns: the final step, ``(step, loss)`` of every log in this call, the checkpoint, the EMA."""

    step: int
    losses: list[tuple[int, float]]
    checkpoint: Path | None
    ema: dict[str, Tensor] | None
    skipped: int


class _LossForward(nn.Module):
    """Routes ``model.loss`` through ``forward``: DDP synchronises gradients and accelerate autocasts there."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: Any, generator: torch.Generator) -> Any:
        return self.model.loss(batch, generator=generator)


class _Batches:
    """Batch ``k`` of rank ``r``: slice ``r`` of global batch ``k mod per_epoch`` of epoch ``k // per_epoch``."""

    def __init__(self, data: Any, cfg: TrainConfig, world: int, rank: int):
        if isinstance(data, Tensor):
            if data.dim() == 0:
                raise DataError("training data is a 0-d tensor; pass a tensor of samples [n, ...] or a Dataset")
        elif isinstance(data, IterableDataset) or not (hasattr(data, "__len__") and hasattr(data, "__getitem__")):
            raise DataError(f"training data must be a Tensor [n, ...] or a map-style Dataset with __len__; "
                            f"got {type(data).__name__}")
        self.data, self.cfg, self.rank = data, cfg, rank
        self.n, self.glob = len(data), cfg.batch_size * world
        self.per_epoch = self.n // self.glob
        if self.per_epoch == 0:
            raise DataError(f"the data has {self.n} samples, fewer than one global batch of {self.glob} "
                            f"(batch_size={cfg.batch_size} x {world} processes); lower batch_size or add data")
        self._epoch, self._perm = -1, torch.empty(0, dtype=torch.long)

    def indices(self, k: int) -> Tensor:
        epoch, j = divmod(k, self.per_epoch)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(_derive_seed(self.cfg.seed, _PERM, epoch))
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=g)
        start = j * self.glob + self.rank * self.cfg.batch_size
        return self._perm[start:start + self.cfg.batch_size]

    def iterate(self, start: int, stop: int, device: torch.device) -> Iterator[Any]:
        if isinstance(self.data, Tensor):
            return (self.data[self.indices(k).to(self.data.device)] for k in range(start, stop))
        steps = (self.indices(k).tolist() for k in range(start, stop))  # DataLoader iterates it once
        loader = DataLoader(self.data, batch_sampler=steps, num_workers=self.cfg.num_workers,
                            worker_init_fn=_ignore_signals if self.cfg.num_workers else None,
                            pin_memory=device.type == "cuda",
                            generator=torch.Generator().manual_seed(_derive_seed(self.cfg.seed, _LOADER, start)))
        return iter(loader)


def _ignore_signals(worker_id: int) -> None:
    """DataLoader workers leave SIGINT / SIGTERM to the training process, which saves a checkpoint and then
    shuts them down (a terminal's Ctrl-C and a scheduler's preemption signal the whole process group)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _short(v: float) -> str:
    """A rate for the progress bar: 3 significant digits, never in exponent notation."""
    return f"{v:.0f}" if v >= 100 else f"{v:.3g}"


def _tensors(obj: Any) -> Iterator[Tensor]:
    if isinstance(obj, Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for x in obj:
            yield from _tensors(x)
    elif isinstance(obj, dict):
        for x in obj.values():
            yield from _tensors(x)


def _to_device(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, Tensor):
        return obj if obj.device == device else obj.to(device, non_blocking=True)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_device(x, device) for x in obj)
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    return obj


def _finite(batch: Any, device: torch.device) -> Tensor:
    ok = torch.ones((), dtype=torch.bool, device=device)
    for t in _tensors(batch):
        if t.is_floating_point() or t.is_complex():
            ok = ok & torch.isfinite(t).all().to(device)
    return ok


Callback = Callable[["Trainer", LogRecord], None]


class Trainer:
    """Trains ``model`` (an ``nn.Module`` with ``loss(batch, generator=None)`` and ``config()``) with AdamW.

    ``callbacks`` run on every process at each log step as ``callback(trainer, record)``: they may use
    collectives (e.g. sharded sampling) and should write files only when ``record.is_main_process``.
    Supports one device and DDP; a loss that leaves parameters unused needs an ``accelerator`` built with
    ``DistributedDataParallelKwargs(find_unused_parameters=True)``. ``trainer.model`` is the raw model.
    """

    def __init__(self, model: nn.Module, config: TrainConfig, *, accelerator: Any = None,
                 callbacks: Sequence[Callback] = ()):
        if not isinstance(model, nn.Module) or not callable(getattr(model, "loss", None)):
            raise ConfigError(
                f"Trainer needs an nn.Module with loss(batch, generator=None); got {type(model).__name__}")
        if not isinstance(config, TrainConfig):
            raise ConfigError(f"config must be a TrainConfig; got {type(config).__name__} (use TrainConfig.from_dict)")
        self.model = checkpoint.unwrap(model)
        self.family = checkpoint.model_config(self.model)["family"]  # fail now, not at the first save
        self.config, self.callbacks, self._fitted = config, list(callbacks), False
        self.accelerator = accelerator if accelerator is not None else self._make_accelerator(config)
        acc = self.accelerator
        if acc.mixed_precision != config.mixed_precision:
            raise ConfigError(f"the accelerator uses mixed_precision={acc.mixed_precision!r} but TrainConfig has "
                              f"{config.mixed_precision!r}; make them agree")
        if acc.gradient_accumulation_steps != 1:
            raise ConfigError(f"gradient_accumulation_steps={acc.gradient_accumulation_steps} is not supported; "
                              "use 1 and raise batch_size (or add processes)")
        if acc.distributed_type.value in ("FSDP", "DEEPSPEED", "MEGATRON_LM", "XLA"):
            raise ConfigError(f"Trainer supports one device and DDP; got distributed_type={acc.distributed_type.value}")
        params = [p for p in self.model.parameters() if p.requires_grad]
        if not params:
            raise ConfigError(
                f"{type(self.model).__name__} has no parameters with requires_grad=True; nothing to train")
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": config.weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        # One fused AdamW kernel: the same update, ~3x faster than torch's CPU default. Not under fp16, where the
        # grad scaler calls a fused step even on overflow and accelerate could not tell the EMA it was skipped.
        self._fused = (config.mixed_precision != "fp16" and acc.device.type in _FUSED_ADAMW_DEVICES
                       and all(p.is_floating_point() for p in params))
        opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=config.lr, betas=config.betas,
                                fused=self._fused or None)
        warmup, total, floor = config.warmup_steps, config.steps, config.min_lr_ratio

        def factor(k: int) -> float:
            if k < warmup:
                return (k + 1) / warmup
            progress = min(1.0, (k + 1 - warmup) / max(1, total - warmup))  # min_lr at the last step
            return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

        self._lr_factor = factor
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        self._forward, self.optimizer = acc.prepare(_LossForward(model), opt)
        self.ema = EMA(self.model, config.ema_decay) if config.ema_decay is not None else None
        self._params = list(self.model.parameters())
        # Without a grad scaler accelerate's optimizer wrapper only forwards step/zero_grad (after per-call
        # package look-ups and signature inspection); call the optimizer itself then.
        self._raw_opt = self.optimizer.optimizer if acc.scaler is None else self.optimizer
        self._lr, self._last_grad_norm, self._clock = config.lr, math.nan, (time.perf_counter(), 0)
        self._interrupt, self._stop, self._skipped_logged = _Interrupt(), False, 0

    @staticmethod
    def _make_accelerator(cfg: TrainConfig) -> Any:
        from accelerate import Accelerator

        try:
            return Accelerator(cpu=cfg.cpu or not torch.cuda.is_available(), mixed_precision=cfg.mixed_precision)
        except ValueError as e:  # accelerate's state is a per-process singleton
            raise ConfigError(f"cannot create an Accelerator with mixed_precision={cfg.mixed_precision!r} ({e}); "
                              "pass the existing one as Trainer(accelerator=...) or restart the process") from e

    def _check_data(self, data: Tensor) -> None:
        bad = ~torch.isfinite(data) if (data.is_floating_point() or data.is_complex()) else None
        count = bad.sum() if bad is not None else torch.zeros((), dtype=torch.long)
        counts = self.accelerator.gather(count.reshape(1).to(self.accelerator.device)).tolist()  # all ranks decide
        ranks = [r for r, c in enumerate(counts) if c]
        if ranks:
            first = bad.reshape(len(data), -1).any(1).nonzero()[0].item() if bad is not None and count else None
            where = f"; first in sample {first}" if first is not None else ""
            raise DataError(f"training data contains NaN/inf values (on rank(s) {ranks}: {int(count)} here{where}); "
                            "clean or filter the data before training")

    def fit(self, data: Tensor | Dataset, *, resume: bool = True, resume_from: str | Path | None = None,
            allow_new_settings: bool = False) -> TrainResult:
        """Train until ``config.steps`` and return a :class:`TrainResult`; puts the model in train mode.

        Resumes from ``out_dir/checkpoint`` when it holds a resume state (``resume=False`` starts afresh and
        overwrites it), or from ``resume_from``. A resumed run continues the saved one exactly; settings that
        would change that (:func:`resume_changes`) are a ConfigError unless ``allow_new_settings=True``. Raising
        ``steps`` is allowed and recomputes the LR schedule for the new total (logged with the LR jump). Each
        log step appends to ``out_dir/metrics.jsonl``, then the checkpoint (if due) is written, then the
        callbacks run. SIGINT / SIGTERM save a checkpoint after the current step and raise
        :class:`~genkit.errors.TrainingInterrupted`.
        """
        if self._fitted:
            raise ConfigError("Trainer.fit was already called; build a new Trainer for another run")
        self._fitted = True
        cfg, acc = self.config, self.accelerator
        out = Path(cfg.out_dir)
        ckpt = out / "checkpoint"
        if isinstance(data, Tensor):
            self._check_data(data)
        batches = _Batches(data, cfg, acc.num_processes, acc.process_index)
        run: dict[str, Any] = {"step": 0, "skipped": 0, "window": {"loss": 0.0, "n": 0, "logs": {}}}
        source = Path(resume_from) if resume_from is not None else ckpt
        if resume_from is not None and not checkpoint.has_resume_state(source):
            raise CheckpointError(
                f"resume_from={str(source)!r} holds no checkpoint with a resume state; check the path")
        if resume or resume_from is not None:
            if checkpoint.has_resume_state(source):
                run = self._restore(source, allow_new_settings)
            elif source.exists():
                raise ConfigError(f"{source} exists but holds no resume state; pass resume=False to overwrite it "
                                  "or choose another out_dir")
        start = run["step"]
        if start > cfg.steps:
            raise ConfigError(f"the checkpoint is at step {start}, past TrainConfig.steps={cfg.steps}; raise steps "
                              "or start a fresh run (resume=False or another out_dir)")
        if acc.is_main_process:
            out.mkdir(parents=True, exist_ok=True)
            self._trim_metrics(out / "metrics.jsonl", start)
        log.info("training %s: steps %d..%d, global batch %d (%d x %d processes), precision %s, device %s",
                 self.family, start, cfg.steps, batches.glob, cfg.batch_size,
                 acc.num_processes, cfg.mixed_precision, acc.device)
        self._forward.train()  # a family that keeps parts frozen in eval mode does so in its own train()
        bar = tqdm(total=cfg.steps, initial=start, desc="train", dynamic_ncols=True,
                   disable=not (acc.is_main_process and cfg.progress))
        losses: list[tuple[int, float]] = []
        self._clock, self._skipped_logged = (time.perf_counter(), start), run["skipped"]
        try:
            with self._interrupt:
                it = batches.iterate(start, cfg.steps, acc.device)
                for k in range(start, cfg.steps):
                    _seed_global(_derive_seed(cfg.seed, _GLOBAL, k, acc.process_index), acc.device)  # dropout etc.
                    self._step(k, _to_device(next(it), acc.device), run)
                    bar.update(1)
                    s = run["step"] = k + 1
                    record = None
                    if s % cfg.log_every == 0 or s == cfg.steps:
                        record = self._log(s, run, batches.glob, out / "metrics.jsonl")
                        losses.append((s, record.loss))
                        bar.set_postfix(loss=f"{record.loss:.4g}", samples_s=_short(record.samples_per_s))
                    saved = (cfg.checkpoint_every and s % cfg.checkpoint_every == 0) or s == cfg.steps
                    if saved or self._stop:
                        self._save(ckpt, run)
                    if self._stop:
                        break
                    for callback in self.callbacks if record is not None else ():
                        callback(self, record)
        finally:
            bar.close()
        signum = self._interrupt.signum
        if self._stop:
            name = signal.Signals(signum).name if signum is not None else "a signal on another rank"
            step = run["step"]
            raise TrainingInterrupted(f"training stopped by {name} at step {step} of {cfg.steps}; the checkpoint "
                                      f"{ckpt} holds step {step}: run the same command (or fit again) to resume",
                                      step, ckpt, signum)
        if signum is not None:  # it came after the last step was agreed on: the run is complete and saved, so
            signal.raise_signal(signum)  # the signal now does what it would have done without the trainer
        return TrainResult(step=run["step"], losses=losses, checkpoint=ckpt if start < cfg.steps else source,
                           ema=self.ema.state_dict() if self.ema is not None else None, skipped=run["skipped"])

    def _step(self, k: int, batch: Any, run: dict[str, Any]) -> None:
        cfg, acc = self.config, self.accelerator
        device = next(_tensors(batch), torch.empty(0, device=acc.device)).device
        gen = torch.Generator(device=device).manual_seed(_derive_seed(cfg.seed, _NOISE, k, acc.process_index))
        out = self._forward(batch, gen)
        if not (isinstance(out, (tuple, list)) and len(out) == 2 and isinstance(out[1], dict)):
            raise ShapeError(
                f"{type(self.model).__name__}.loss must return (loss, logs: dict); got {type(out).__name__}")
        loss, logs = out
        if not isinstance(loss, Tensor) or loss.dim() != 0:
            raise ShapeError(f"{type(self.model).__name__}.loss must return a scalar tensor; got "
                             f"{tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__}")
        parts = [loss.detach().float(), _finite(batch, loss.device).float()]
        if acc.num_processes > 1:  # one collective decides for all ranks, a pending signal included
            parts.append(torch.full((), float(self._interrupt.signum is not None), device=loss.device))
            stats = acc.gather(torch.stack(parts)).tolist()
            self._stop = any(stats[2::3])
        else:
            stats = torch.stack(parts).tolist()
            self._stop = self._interrupt.signum is not None
        n = len(parts)  # the one host sync before backward
        per_rank, oks = stats[0::n], stats[1::n]
        if min(oks) < 1:
            raise DataError(f"the batch of step {k + 1} contains NaN/inf values (rank(s) "
                            f"{[r for r, o in enumerate(oks) if o < 1]}); clean or filter the data")
        what, grad_norm = ("loss" if not all(map(math.isfinite, per_rank)) else None), math.nan
        if what is None:
            acc.backward(loss)
            grad_norm = self._clip_grads()
            if cfg.mixed_precision != "fp16" and not math.isfinite(grad_norm):  # fp16: the grad scaler skips
                what = "gradient norm"
        self._lr = self.optimizer.param_groups[0]["lr"]
        if what is not None:
            self._raw_opt.zero_grad(set_to_none=True)
            streak = run["streak"] = run.get("streak", 0) + 1
            if cfg.nonfinite == "stop" or streak >= cfg.nonfinite_patience:
                ckpt = Path(cfg.out_dir) / "checkpoint"
                kept = (f"the checkpoint {ckpt} (step {run['step']} or earlier) is intact"
                        if checkpoint.has_resume_state(ckpt) else "no checkpoint had been written yet")
                why = ("" if cfg.nonfinite == "stop" else
                       f", {streak} such steps in a row (nonfinite_patience={cfg.nonfinite_patience}): "
                       "the run has diverged")
                raise NonFiniteLossError(
                    f"non-finite {what} at step {k + 1}{why} (loss per rank: {per_rank}, grad norm {grad_norm}); "
                    f"lower lr (now {self._lr:.3g}), check the data and the model"
                    + (", or drop such steps with TrainConfig(nonfinite='skip') (train/train.py: --nonfinite skip)"
                       if cfg.nonfinite == "stop" else "") + f"; {kept}")
            run["skipped"] += 1
        else:
            run["streak"] = 0
            self._raw_opt.step()
            self._raw_opt.zero_grad(set_to_none=True)
            if self.ema is not None and not self.optimizer.step_was_skipped:
                self.ema.update()
            w = run["window"]
            w["loss"] += sum(per_rank) / len(per_rank)
            w["n"] += 1
            for key, value in logs.items():
                w["logs"][key] = w["logs"].get(key, 0.0) + float(value)
            self._last_grad_norm = grad_norm
        self.scheduler.step()  # the schedule is a function of the step, skipped or not

    def _clip_grads(self) -> float:
        """Clip (if configured) and return the global gradient norm; NaN when unknown (fp16 without clipping)."""
        cfg = self.config
        if cfg.grad_clip is not None:
            # accelerate's clip_grad_norm_ is unscale + torch's for the distributed types Trainer accepts
            self.accelerator.unscale_gradients()
            return float(torch.nn.utils.clip_grad_norm_(self._params, cfg.grad_clip))
        if cfg.mixed_precision == "fp16":
            return math.nan
        grads = [p.grad.detach().float() for p in self._params if p.grad is not None]
        return float(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))) if grads else 0.0

    def _log(self, s: int, run: dict[str, Any], glob: int, path: Path) -> LogRecord:
        w, acc = run["window"], self.accelerator
        now, (then, since) = time.perf_counter(), self._clock
        self._clock = (now, s)
        n = max(w["n"], 1)
        record = LogRecord(step=s, loss=w["loss"] / w["n"] if w["n"] else math.nan, lr=self._lr,
                           grad_norm=self._last_grad_norm,
                           samples_per_s=(s - since) * glob / max(now - then, 1e-9), skipped=run["skipped"],
                           logs={k: v / n for k, v in w["logs"].items()}, is_main_process=acc.is_main_process)
        run["window"] = {"loss": 0.0, "n": 0, "logs": {}}
        if run["skipped"] > self._skipped_logged and acc.is_main_process:
            log.warning("skipped %d non-finite step(s) of the last %d (%d in all); lower lr if this goes on",
                        run["skipped"] - self._skipped_logged, s - since, run["skipped"])
        self._skipped_logged = run["skipped"]
        if acc.is_main_process:
            row = {k: v for k, v in dataclasses.asdict(record).items() if k not in ("logs", "is_main_process")}
            row = {k: None if isinstance(v, float) and not math.isfinite(v) else v  # NaN is not JSON: null
                   for k, v in {**row, **record.logs}.items()}
            with open(path, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
        return record

    @staticmethod
    def _trim_metrics(path: Path, start: int) -> None:
        """Drop log lines past the resumed step (left by an interrupted run), or all of them for a fresh run."""
        if not path.is_file():
            return
        keep = []
        for line in path.read_text(encoding="utf-8").splitlines() if start else ():
            try:
                if json.loads(line)["step"] <= start:
                    keep.append(line + "\n")
            except (ValueError, KeyError, TypeError):  # a line cut short by a crash
                continue
        path.write_text("".join(keep), encoding="utf-8")

    def _save(self, ckpt: Path, run: dict[str, Any]) -> None:
        acc = self.accelerator
        if acc.is_main_process:
            import accelerate

            state = {**run, "ema_updates": self.ema.updates if self.ema is not None else 0,
                     "grad_scaler": acc.scaler.state_dict() if acc.scaler is not None else None,
                     "world_size": acc.num_processes, "train_config": self.config.to_dict(),
                     "accelerate_version": accelerate.__version__}
            checkpoint.save(ckpt, self.model, ema=self.ema.state_dict() if self.ema is not None else None,
                            optimizer=self.optimizer, scheduler=self.scheduler, trainer_state=state)
        acc.wait_for_everyone()

    def _restore(self, source: Path, allow_new_settings: bool = False) -> dict[str, Any]:
        saved = {k: v for k, v in checkpoint.read_config(source).items() if k not in checkpoint._RESERVED}
        ours = checkpoint.model_config(self.model)
        if saved != ours:  # same weight shapes can hide another path, weighting or family
            diff = sorted(k for k in set(saved) | set(ours) if saved.get(k) != ours.get(k))
            raise CheckpointError(
                f"{source} holds a different model (config differs in {diff}); resume it with the same model, "
                "or choose a new out_dir / resume=False to start a fresh run"
            )
        saved_config = checkpoint.read_trainer_state(source).get("train_config") or {}
        changes = resume_changes(saved_config, self.config)
        listing = "; ".join(f"{k} {a!r} there, {b!r} now" for k, (a, b) in changes.items())
        if changes and not allow_new_settings:
            raise ConfigError(
                f"{source} was trained with other settings ({listing}); resume with that run's settings to continue "
                "it exactly, or pass fit(allow_new_settings=True) (train/train.py: --allow-new-settings) to go on "
                "with the new ones"
            )
        state = checkpoint.load_training_state(source, self.model, self.optimizer, self.scheduler)
        step, saved_lr = int(state["step"]), self.optimizer.param_groups[0]["lr"]
        if changes:  # the loaded optimizer and schedule carry the old values: put the new ones in
            log.warning("resuming %s with new settings: %s", source, listing)
            cfg = self.config
            self.scheduler.base_lrs = [cfg.lr] * len(self.optimizer.param_groups)
            for group in self.optimizer.param_groups:
                group["initial_lr"], group["lr"], group["betas"] = cfg.lr, cfg.lr * self._lr_factor(step), cfg.betas
                decayed = all(p.dim() >= 2 for p in group["params"])
                group["weight_decay"] = cfg.weight_decay if decayed else 0.0
        ema = state.pop("ema")
        if self.ema is not None:
            if ema is None:
                raise CheckpointError(f"{source} has no EMA weights but ema_decay={self.config.ema_decay}; "
                                      "resume with ema_decay=None or start a fresh run")
            try:
                self.ema.load_state_dict(ema, int(state.get("ema_updates", 0)))
            except CheckpointError as e:
                raise CheckpointError(f"{source}/ema.safetensors: {e}") from e
        for group in self.optimizer.param_groups:  # the loaded groups keep the saving run's kernel choice: e.g. a
            group["fused"] = True if self._fused else None  # fused run resumed under fp16, whose scaler can't use it
        if self.accelerator.scaler is not None and state.get("grad_scaler"):
            self.accelerator.scaler.load_state_dict(state["grad_scaler"])
        old_steps = saved_config.get("steps", self.config.steps)
        if old_steps != self.config.steps and step < self.config.steps:
            log.warning("steps changed from %d to %d: the LR schedule (warm-up, then cosine to the final step) is "
                        "recomputed for %d steps, so after step %d the LR moves from %.3g to %.3g",
                        old_steps, self.config.steps, self.config.steps, step, saved_lr,
                        self.config.lr * self._lr_factor(step))
        if state.get("world_size") != self.accelerator.num_processes:
            log.info("resuming a %s-process run on %d processes: batches from here on differ from the original run",
                     state.get("world_size"), self.accelerator.num_processes)
        return {"step": step, "skipped": int(state["skipped"]), "window": state["window"],
                "streak": int(state.get("streak", 0))}
