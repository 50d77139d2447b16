"""``genkit.load``: rebuild a model from a checkpoint. It stands above the families (it asks their registry to
rebuild the config), while :mod:`genkit.checkpoint` below knows only the format.

>>> # model = genkit.load("runs/default")   # a run folder or its checkpoint/; EMA weights when saved
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Union

import torch
from torch import nn

from . import checkpoint
from .checks import check_device
from .errors import CheckpointError
from .models import build

__all__ = ["load"]

PathLike = Union[str, "os.PathLike[str]"]


def load(directory: PathLike, *, ema: bool = True, map_location: str | torch.device = "cpu",
         expect_family: str | None = None) -> nn.Module:
    """Rebuild the model with ``genkit.models.build(config)`` and load its weights; returned in eval mode.

    ``directory`` is a checkpoint folder or a training run folder (``TrainConfig.out_dir``, ``--out`` of
    train/train.py), whose ``checkpoint/`` is loaded. A diffusers folder is refused with a pointer to
    ``genkit.from_diffusers``. EMA weights are loaded when saved and ``ema=True``; otherwise the raw weights.
    ``expect_family`` makes loading a checkpoint of another family an error. ``map_location`` must name a
    device this machine has (``"cuda"`` without CUDA is a ConfigError saying so).
    """
    check_device(map_location, "genkit.load", "map_location")  # before reading anything
    config = checkpoint.read_config(directory)
    path = checkpoint.resolve(directory)
    family = config.get("family")
    if expect_family is not None and family != expect_family:
        raise CheckpointError(f"{path} holds a {family!r} model but {expect_family!r} was expected; "
                              "pass the right checkpoint or change expect_family")
    try:
        model = build(checkpoint.split_config(config))
    except Exception as e:
        raise CheckpointError(f"cannot rebuild the model of {Path(path) / 'config.json'}: {e}") from e
    return checkpoint.load_weights(path, model, ema=ema, map_location=map_location).eval()
