"""Where each step's batch comes from, and the seeds: everything random is a pure function of
``(seed, step, rank)``.

Batch ``k`` of rank ``r`` is a slice of the epoch's permutation (a Tensor or map-style Dataset; a
:class:`~genkit.data.LabelledData` over a tensor gives ``(x, labels)``, indexed in place), or
``source.batch(k, r, generator)`` with a generator seeded from ``(seed, k, r)`` (a batch source), or
``None`` (a data-free objective). ``loss`` gets its own generator seeded from ``(seed, k, r)``.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset

from ..data.labelled import LabelledData
from ..errors import ConfigError, DataError, DataWarning
from ..objective import is_batch_source, is_data_free
from .config import TrainConfig
from .signals import ignore_signals

__all__ = ["check_data", "derive_seed", "seed_global", "make_batches", "TensorBatches", "SourceBatches", "NoBatches",
           "to_device", "tensors", "finite", "warn_scale", "SCALE_LIMIT"]

NOISE, GLOBAL, PERM, LOADER, SOURCE = 1, 2, 3, 4, 5  # tags keep the derived seed streams apart


def derive_seed(*parts: int) -> int:
    h = hashlib.blake2b(digest_size=8)
    for p in parts:
        h.update(int(p).to_bytes(16, "little", signed=True))
    return int.from_bytes(h.digest(), "little") & ((1 << 63) - 1)


def seed_global(seed: int, device: torch.device) -> None:
    """``torch.manual_seed`` for the CPU and the training device only (the full call re-queues lazy seeding of
    every uninitialised backend, with a captured stack trace: 0.3-2 ms a step)."""
    torch.default_generator.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.manual_seed_all(seed)  # CUDA is initialised by now, so this seeds directly
    elif device.type != "cpu":
        torch.manual_seed(seed)


class TensorBatches:
    """Batch ``k`` of rank ``r``: slice ``r`` of global batch ``k mod per_epoch`` of epoch ``k // per_epoch``."""

    def __init__(self, data: Any, cfg: TrainConfig, world: int, rank: int):
        if isinstance(data, Tensor):
            if data.dim() == 0:
                raise DataError("training data is a 0-d tensor; pass a tensor of samples [n, ...] or a Dataset")
        elif isinstance(data, IterableDataset) or not (hasattr(data, "__len__") and hasattr(data, "__getitem__")):
            raise DataError(f"training data must be a Tensor [n, ...], a map-style Dataset with __len__ or a batch "
                            f"source with batch(step, rank, generator); got {type(data).__name__}")
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
            g = torch.Generator().manual_seed(derive_seed(self.cfg.seed, PERM, epoch))
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=g)
        start = j * self.glob + self.rank * self.cfg.batch_size
        return self._perm[start:start + self.cfg.batch_size]

    def iterate(self, start: int, stop: int, device: torch.device) -> Iterator[Any]:
        if isinstance(self.data, Tensor):
            return (self.data[self.indices(k).to(self.data.device)] for k in range(start, stop))
        if isinstance(self.data, LabelledData) and isinstance(self.data.data, Tensor):
            return (self.data.take(self.indices(k)) for k in range(start, stop))  # (x, labels), no DataLoader
        steps = (self.indices(k).tolist() for k in range(start, stop))  # DataLoader iterates it once
        loader = DataLoader(self.data, batch_sampler=steps, num_workers=self.cfg.num_workers,
                            worker_init_fn=ignore_signals if self.cfg.num_workers else None,
                            pin_memory=device.type == "cuda",
                            generator=torch.Generator().manual_seed(derive_seed(self.cfg.seed, LOADER, start)))
        return iter(loader)


class SourceBatches:
    """Batch ``k`` of rank ``r`` is ``source.batch(k, r, generator)``, the generator (on the training device)
    seeded from ``(seed, k, r)`` alone."""

    def __init__(self, source: Any, cfg: TrainConfig, world: int, rank: int):
        self.source, self.cfg, self.rank, self.glob = source, cfg, rank, cfg.batch_size * world

    def iterate(self, start: int, stop: int, device: torch.device) -> Iterator[Any]:
        for k in range(start, stop):
            g = torch.Generator(device=device).manual_seed(derive_seed(self.cfg.seed, SOURCE, k, self.rank))
            yield self.source.batch(k, self.rank, g)


class NoBatches:
    """A data-free objective: every batch is ``None``. Its samples per step (for the logs) are its own
    ``batch_size`` where it declares one (the trajectories of a GFlowNet), else ``TrainConfig.batch_size``."""

    def __init__(self, cfg: TrainConfig, world: int, objective: Any = None):
        own = getattr(objective, "batch_size", None)
        per = own if isinstance(own, int) and not isinstance(own, bool) and own > 0 else cfg.batch_size
        self.glob = per * world

    def iterate(self, start: int, stop: int, device: torch.device) -> Iterator[None]:
        return (None for _ in range(start, stop))


def make_batches(data: Any, objective: Any, cfg: TrainConfig, world: int, rank: int) -> Any:
    """The batches of ``data`` for ``objective``: checked against its ``data_free`` declaration."""
    name = type(objective).__name__
    free = is_data_free(objective)
    if data is None:
        if not free:
            raise DataError(f"{name} needs training data: pass fit(data) with a Tensor [n, ...], a Dataset or a batch "
                            "source (batch(step, rank, generator)); an objective whose loss(None, generator) makes "
                            "its own samples declares data_free = True")
        return NoBatches(cfg, world, objective)
    if free:
        raise ConfigError(f"{name} declares data_free = True (its loss makes its own samples) but fit() was given "
                          f"{type(data).__name__} data; call fit() without data")
    if is_batch_source(data):
        return SourceBatches(data, cfg, world, rank)
    return TensorBatches(data, cfg, world, rank)


def check_data(data: Tensor, accelerator: Any) -> None:
    """A DataError when a Tensor data set holds NaN/inf on any rank (all ranks decide together)."""
    bad = ~torch.isfinite(data) if (data.is_floating_point() or data.is_complex()) else None
    count = bad.sum() if bad is not None else torch.zeros((), dtype=torch.long)
    counts = accelerator.gather(count.reshape(1).to(accelerator.device)).tolist()  # all ranks decide
    ranks = [r for r, c in enumerate(counts) if c]
    if ranks:
        first = bad.reshape(len(data), -1).any(1).nonzero()[0].item() if bad is not None and count else None
        where = f"; first in sample {first}" if first is not None else ""
        raise DataError(f"training data contains NaN/inf values (on rank(s) {ranks}: {int(count)} here{where}); "
                        "clean or filter the data before training")


def tensors(obj: Any) -> Iterator[Tensor]:
    if isinstance(obj, Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for x in obj:
            yield from tensors(x)
    elif isinstance(obj, dict):
        for x in obj.values():
            yield from tensors(x)


def to_device(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, Tensor):
        return obj if obj.device == device else obj.to(device, non_blocking=True)
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(x, device) for x in obj)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


def finite(batch: Any, device: torch.device) -> Tensor:
    """A bool scalar on ``device``: whether every floating-point tensor in ``batch`` is finite (integer tensors,
    e.g. tokens, are always finite)."""
    ok = torch.ones((), dtype=torch.bool, device=device)
    for t in tensors(batch):
        if t.is_floating_point() or t.is_complex():
            ok = ok & torch.isfinite(t).all().to(device)
    return ok


#: Root mean square of a batch's values above which :func:`warn_scale` warns. genkit's paths start from N(0, I)
#: noise and its networks are initialised for unit-scale inputs, so data is meant to be about unit scale (images
#: in [-1, 1], toy sets near the origin): 0..255 pixels or raw physical units (1e6) sit far above it.
SCALE_LIMIT = 20.0


def warn_scale(batch: Any, limit: float = SCALE_LIMIT) -> None:
    """Warn (:class:`~genkit.errors.DataWarning`) when the floating-point data of ``batch`` has a root mean square
    above ``limit``, naming the scale and how to normalise; integer tensors (labels, tokens) are not data scales.
    ``Trainer.fit`` calls it on its first batch: once per fit, one host sync."""
    floats = [t for t in tensors(batch) if t.is_floating_point() and t.numel()]
    if not floats:
        return
    rms = float(floats[0].detach().double().pow(2).mean().sqrt())
    if rms > limit:
        warnings.warn(f"the training data has a scale of {rms:.3g} (root mean square of the first batch), far from the "
                      f"unit scale genkit's paths and networks assume (N(0, I) noise; warned above {limit:g}); "
                      "normalise it, e.g. data = (data - data.mean(0)) / data.std(0), or images to [-1, 1] "
                      "(x / 127.5 - 1), and map samples back with the inverse", DataWarning, stacklevel=3)


_Batches = TensorBatches  # the names genkit.train used before the split
_derive_seed = derive_seed
