"""The generic trainer: anything with ``loss(batch, generator=None) -> (loss, logs)`` whose model has ``config()``.

Built on ``accelerate`` (one device or DDP, launched by ``python``, ``torchrun`` or ``accelerate launch``).
Everything random is a pure function of ``(seed, step, rank)``: batch ``k`` of rank ``r`` is a slice of
the epoch's permutation (or a batch source's draw with a generator seeded from ``(seed, k, r)``), and ``loss``
gets a generator seeded from ``(seed, k, r)``, so resuming from a checkpoint reproduces the uninterrupted run
exactly. The objective contract is in :mod:`genkit.objective`, frozen parts in :mod:`genkit.frozen`.

Modules: ``config`` (TrainConfig, resume_changes), ``batching`` (batches and seeds), ``optim`` (parameter
groups, optimizers, LR schedule), ``resume`` (the resume policy), ``signals``, ``loop`` (Trainer).

>>> # result = Trainer(model, TrainConfig(steps=1000, batch_size=256, out_dir="runs/x")).fit(data)
"""

from .batching import _Batches, _derive_seed  # noqa: F401  (private names importable as before the split)
from .config import TrainConfig, make_accelerator, resume_changes
from .loop import LogRecord, Trainer, TrainResult
from .signals import _ignore_signals, _Interrupt  # noqa: F401

__all__ = ["TrainConfig", "Trainer", "TrainResult", "LogRecord", "resume_changes", "make_accelerator"]
