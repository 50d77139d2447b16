"""What the scripts in train/, samplers/ and eval/ share: finding a checkpoint and reporting genkit errors
as one line. The library itself never imports this module."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from .errors import ConfigError, GenkitError, TrainingInterrupted

__all__ = ["checkpoint_dir", "script_device", "run_main"]


def script_device(name: str):
    """The ``--device`` of a script as a ``torch.device``; a GPU asked for where CUDA is missing is a ConfigError.

    >>> script_device("cpu")
    device(type='cpu')
    """
    import torch

    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name} asked for a GPU but CUDA is not available here; use --device cpu")
    return device


def checkpoint_dir(path: str | Path) -> Path:
    """A checkpoint folder, or a run folder (``--out`` of train/train.py) holding ``checkpoint/``."""
    p = Path(path)
    return p / "checkpoint" if not (p / "config.json").exists() and (p / "checkpoint").is_dir() else p


def run_main(main: Callable[[Sequence[str] | None], None], argv: Sequence[str] | None = None) -> int:
    """Run a script's ``main``; a genkit error becomes one ``error: ...`` line on stderr and status 2.

    >>> def main(argv):
    ...     raise GenkitError("bad --steps 0; use a positive integer")
    >>> run_main(main, [])
    2
    """
    try:
        main(argv)
    except GenkitError as e:
        print("error: " + " ".join(line.strip() for line in str(e).splitlines()), file=sys.stderr)
        signum = getattr(e, "signum", None)  # TrainingInterrupted: the shell's status for that signal (130, 143)
        return 128 + signum if isinstance(e, TrainingInterrupted) and signum is not None else 2
    return 0
