"""Reward oracles for sequences, and the named rewards scripts take (``train/finetune.py --reward NAME``).

:class:`SequenceOracle` is a small 1-D convolutional regressor ``[B, L] ids or [B, L, V] (soft) one-hots -> [B]``,
differentiable in the one-hot (DRAKES backpropagates into it) and usable on hard tokens (SEPO, SVDD).
:func:`train_oracle` fits it to labelled pairs by mean squared error with Adam.

:func:`dna_oracle` is the DNA-like task's oracle (:mod:`genkit.data.dna_task`): trained on the task's ``"finetune"`` or
``"eval"`` split (disjoint data, separate initialisations), as the DRAKES benchmark fine-tunes against one oracle
and scores against another, trained on different data, to expose over-optimisation: a fine-tuned model that
exploits the fine-tuning oracle's errors scores worse under the evaluation oracle (and under the ground truth,
:func:`genkit.data.dna_task.activity`, which this synthetic task also has). The trained weights are cached (safetensors,
keyed by every setting) under ``$GENKIT_CACHE`` or ``~/.cache/genkit``, written atomically, so a second call loads
them; training the default takes about a minute on one CPU core.

:data:`REWARDS` names the rewards (each a function of no arguments returning a :class:`Reward`):

- ``dna_oracle``: the fine-tuning oracle (differentiable);
- ``dna_eval_oracle``: the evaluation oracle (differentiable; for scoring, not for fine-tuning);
- ``dna_activity``: the task's exact activity (differentiable);

and :func:`get_reward` resolves a name or the user's own ``module:attribute`` / ``path/to/file.py:attribute``
(a :class:`Reward`, an ``nn.Module`` or a function; a function is wrapped non-differentiable unless it carries
``differentiable = True``, a module differentiable).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data import dna_task
from ..errors import ConfigError, DataError, ShapeError
from ..io import read_tensors, write_tensors
from ..registry import Registry
from .rewards import Reward

__all__ = ["SequenceOracle", "train_oracle", "dna_oracle", "REWARDS", "get_reward", "cache_dir"]


class SequenceOracle(nn.Module):
    """``SequenceOracle(vocab_size=4, channels=64, kernel_size=9, depth=3)``: a convolutional regressor.

    ``depth`` "same"-padded convolutions with ReLU over the one-hot ``[B, V, L]`` (the first of width
    ``kernel_size``, the rest dilated 2, 4, ...), then mean and max pooling over positions and a two-layer head to
    one number. Ids ``[B, L]`` are one-hot encoded; a float input ``[B, L, V]`` (or ``[B, L, V + 1]`` with a MASK
    column, which is dropped) is used as is, so gradients reach a relaxed sample.
    """

    def __init__(self, vocab_size: int = 4, channels: int = 64, kernel_size: int = 9, depth: int = 3):
        super().__init__()
        for key, value in (("vocab_size", vocab_size), ("channels", channels), ("kernel_size", kernel_size),
                           ("depth", depth)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"SequenceOracle: {key} must be a positive int, got {value!r}")
        if kernel_size % 2 == 0:
            raise ConfigError(f"SequenceOracle: kernel_size must be odd ('same' padding), got {kernel_size}")
        self.vocab_size, self.channels, self.kernel_size, self.depth = vocab_size, channels, kernel_size, depth
        convs, width = [], vocab_size
        for i in range(depth):
            d = 1 if i == 0 else 2 ** i
            convs.append(nn.Conv1d(width, channels, kernel_size, dilation=d, padding=d * (kernel_size - 1) // 2))
            width = channels
        self.convs = nn.ModuleList(convs)
        self.head = nn.Sequential(nn.Linear(2 * channels, channels), nn.ReLU(), nn.Linear(channels, 1))

    def config(self) -> dict[str, int]:
        return {"vocab_size": self.vocab_size, "channels": self.channels, "kernel_size": self.kernel_size,
                "depth": self.depth}

    def forward(self, x: Tensor) -> Tensor:
        v = self.vocab_size
        if not torch.is_tensor(x):
            raise ShapeError(f"SequenceOracle takes ids [B, L] or a one-hot [B, L, {v}]; got {type(x).__name__}")
        if not x.is_floating_point():
            if x.ndim != 2:
                raise ShapeError(f"SequenceOracle takes ids [B, L]; got shape {tuple(x.shape)}")
            if x.numel() and (int(x.min()) < 0 or int(x.max()) >= v):
                raise DataError(f"SequenceOracle: ids must be in 0..{v - 1}; got {int(x.min())}..{int(x.max())} "
                                "(an id of V is the MASK: score fully sampled sequences)")
            h = F.one_hot(x.long(), v).to(self.head[0].weight.dtype)
        else:
            if x.ndim != 3 or x.shape[-1] not in (v, v + 1):
                raise ShapeError(f"SequenceOracle takes a one-hot [B, L, {v}] (or [B, L, {v + 1}] with the MASK "
                                 f"column); got {tuple(x.shape)}")
            h = x[..., :v].to(self.head[0].weight.dtype)
        feat = h.transpose(1, 2)
        for conv in self.convs:
            feat = F.relu(conv(feat))
        pooled = torch.cat([feat.mean(-1), feat.amax(-1)], -1)
        return self.head(pooled)[:, 0]


def train_oracle(x: Tensor, y: Tensor, *, steps: int = 2000, batch_size: int = 128, lr: float = 2e-3,
                 seed: int = 0, **net: Any) -> SequenceOracle:
    """A :class:`SequenceOracle` (keywords ``net``) fitted to ids ``x [N, L]`` and targets ``y [N]`` by mean squared
    error: Adam at ``lr`` with cosine decay, ``steps`` batches of ``batch_size`` drawn with replacement; the
    initialisation and the batches are seeded by ``seed``. Returned frozen (``eval()``, no gradients)."""
    if not torch.is_tensor(x) or x.ndim != 2 or x.is_floating_point():
        raise ShapeError(f"train_oracle needs token ids x [N, L]; got {getattr(x, 'shape', type(x).__name__)}")
    if not torch.is_tensor(y) or y.shape != x.shape[:1]:
        raise ShapeError(f"train_oracle needs targets y [N] = [{x.shape[0]}]; got {getattr(y, 'shape', y)}")
    for key, value in (("steps", steps), ("batch_size", batch_size), ("seed", seed + 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"train_oracle: {key} must be a positive int, got {value!r}")
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SequenceOracle(**net)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    y = y.float()
    for _ in range(steps):
        idx = torch.randint(0, x.shape[0], (batch_size,), generator=gen)
        loss = F.mse_loss(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    opt.zero_grad(set_to_none=True)
    return model.requires_grad_(False).eval()


def cache_dir() -> Path:
    """Where trained oracles are cached: ``$GENKIT_CACHE`` or ``~/.cache/genkit``."""
    return Path(os.environ.get("GENKIT_CACHE") or Path.home() / ".cache" / "genkit").expanduser()


def dna_oracle(split: str = "finetune", *, n: int = 20_000, steps: int = 2000, length: int = dna_task.LENGTH,
               cache: bool = True, **net: Any) -> SequenceOracle:
    """The DNA-like task's oracle trained on ``n`` labelled pairs of ``split`` (:func:`genkit.data.dna_task.labelled`;
    ``"finetune"`` or ``"eval"``, disjoint) for ``steps`` steps, loaded from the cache when it holds one trained
    with the same settings (``cache=False`` always trains and writes nothing)."""
    if split not in dna_task.SPLITS:
        raise ConfigError(f"split must be one of {sorted(dna_task.SPLITS)}; got {split!r}")
    settings = {"split": split, "n": n, "steps": steps, "length": length, "net": SequenceOracle(**net).config(),
                "task": [dna_task.MOTIFS, dna_task.WEIGHTS, dna_task.PWM_MATCH, dna_task.TRANSITIONS], "version": 1}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    path = cache_dir() / "oracles" / f"dna_{split}_{key}.safetensors"
    model = SequenceOracle(**net)
    if cache and path.is_file():
        model.load_state_dict(read_tensors(path, hint=f"delete {path} to retrain the oracle"))
        return model.requires_grad_(False).eval()
    x, y = dna_task.labelled(n, split, length=length)
    model = train_oracle(x, y, steps=steps, seed=dna_task.SPLITS[split] % 9973, **net)
    if cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        write_tensors(tmp, model.state_dict(), {"settings": json.dumps(settings)})
        os.replace(tmp, path)
    return model


#: Named rewards: name -> a function of no arguments returning a :class:`Reward`.
REWARDS: Registry[Callable[[], Reward]] = Registry("reward")


@REWARDS.register("dna_oracle")
def _dna_finetune_oracle() -> Reward:
    """The DNA-like task's fine-tuning oracle (differentiable; trained on the ``finetune`` split)."""
    return Reward(dna_oracle("finetune"), differentiable=True, name="dna_oracle")


@REWARDS.register("dna_eval_oracle")
def _dna_eval_oracle() -> Reward:
    """The DNA-like task's evaluation oracle (differentiable; trained on the ``eval`` split)."""
    return Reward(dna_oracle("eval"), differentiable=True, name="dna_eval_oracle")


@REWARDS.register("dna_activity")
def _dna_activity() -> Reward:
    """The DNA-like task's exact activity, :func:`genkit.data.dna_task.activity` (differentiable)."""
    return Reward(lambda x: dna_task.activity(x).float(), differentiable=True, name="dna_activity")


def _load_attribute(spec: str) -> Any:
    target, _, attr = spec.rpartition(":")
    if target.endswith(".py"):
        path = Path(target).expanduser()
        if not path.is_file():
            raise ConfigError(f"reward {spec!r}: file {path} does not exist")
        module_spec = importlib.util.spec_from_file_location(f"_genkit_reward_{path.stem}", path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[module_spec.name] = module
        module_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as e:
            raise ConfigError(f"reward {spec!r}: cannot import module {target!r} ({e}); give a registered name "
                              f"({', '.join(REWARDS.names())}), module:attribute or path/to/file.py:attribute"
                              ) from None
    if not hasattr(module, attr):
        raise ConfigError(f"reward {spec!r}: {target} has no attribute {attr!r}")
    return getattr(module, attr)


def get_reward(spec: str | Reward | Callable[[Tensor], Tensor]) -> Reward:
    """A :class:`Reward` from a registered name (:data:`REWARDS`), ``module:attribute``,
    ``path/to/file.py:attribute`` (the attribute a Reward, an ``nn.Module`` (wrapped differentiable) or a function
    (wrapped differentiable only if it has ``differentiable = True``)), or a Reward / callable given directly."""
    if isinstance(spec, Reward):
        return spec
    if isinstance(spec, str):
        if ":" not in spec:
            return REWARDS.get(spec)()
        obj = _load_attribute(spec)
        name = spec.rpartition(":")[2]
    else:
        obj, name = spec, None
    if isinstance(obj, Reward):
        return obj
    if isinstance(obj, nn.Module):
        return Reward(obj, differentiable=True, name=name)
    if callable(obj):
        return Reward(obj, differentiable=bool(getattr(obj, "differentiable", False)), name=name)
    raise ConfigError(f"reward {spec!r} is a {type(obj).__name__}; it must be a Reward, an nn.Module or a function "
                      "of a batch returning [batch]")
