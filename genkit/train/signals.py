"""Signals while training: SIGINT / SIGTERM end the run cleanly after the current step (a checkpoint is saved
first), and DataLoader workers leave both to the training process."""

from __future__ import annotations

import signal
import threading
from typing import Any

__all__ = ["Interrupt", "ignore_signals"]


class Interrupt:
    """While training, SIGINT (Ctrl-C) and SIGTERM (a scheduler's preemption) only set ``signum``; the loop
    reads it after the step it is in (all ranks agree through that step's one collective), saves a checkpoint
    and raises TrainingInterrupted. A second signal acts as it would without the trainer. Handlers are installed
    only in the main thread (Python allows no other)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> Interrupt:
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


def ignore_signals(worker_id: int) -> None:
    """DataLoader workers leave SIGINT / SIGTERM to the training process, which saves a checkpoint and then
    shuts them down (a terminal's Ctrl-C and a scheduler's preemption signal the whole process group)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


_Interrupt = Interrupt  # the names genkit.train used before the split
_ignore_signals = ignore_signals
