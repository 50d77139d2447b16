"""What training reports: :class:`LogRecord` (each log step), :class:`TrainResult` (what ``fit`` returns), and the
``metrics.jsonl`` file (one JSON line per log step; NaN written as null)."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

__all__ = ["LogRecord", "TrainResult", "empty_window", "append_metrics", "trim_metrics", "short"]


@dataclass(frozen=True)
class LogRecord:
    """One logged point. ``loss`` is averaged over all ranks and the steps since the last log, ``logs`` (the
    model's own) over this process's steps that reported each key (e.g. a critic's on critic steps); ``lr`` and
    ``grad_norm`` are the last step's; ``skipped`` counts all non-finite steps dropped so far."""

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

    def __repr__(self) -> str:
        """One line: the losses and EMA weights are summarised, not printed (``result.losses`` has them all)."""
        last = (f"last loss {self.losses[-1][1]:.4g} at step {self.losses[-1][0]}, {len(self.losses)} logged"
                if self.losses else "no loss logged")
        ema = "none" if self.ema is None else f"{len(self.ema)} tensors"
        return (f"TrainResult(step={self.step}, {last}, checkpoint={str(self.checkpoint)!r}, ema: {ema}, "
                f"skipped={self.skipped})")

    __str__ = __repr__


def empty_window() -> dict[str, Any]:
    """The log window: summed loss over ``n`` kept steps; each logged key's sum and how many steps gave it."""
    return {"loss": 0.0, "n": 0, "logs": {}, "counts": {}}


def append_metrics(path: Path, record: LogRecord) -> None:
    """Append ``record`` (its own logs flattened in) to ``metrics.jsonl`` as strict JSON."""
    row = {k: v for k, v in dataclasses.asdict(record).items() if k not in ("logs", "is_main_process")}
    row = {k: None if isinstance(v, float) and not math.isfinite(v) else v  # NaN is not JSON: null
           for k, v in {**row, **record.logs}.items()}
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")


def trim_metrics(path: Path, start: int) -> None:
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


def short(v: float) -> str:
    """A rate for the progress bar: 3 significant digits, never in exponent notation."""
    return f"{v:.0f}" if v >= 100 else f"{v:.3g}"
