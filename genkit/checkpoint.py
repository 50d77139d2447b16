"""Checkpoints: safetensors weights + JSON config, optional EMA and resume state. Never pickled, written atomically.

A checkpoint is a directory::

    config.json            model.config() plus format, genkit_version, torch_version, genkit_files (byte sizes)
    model.safetensors      raw weights (``model.state_dict()``)
    ema.safetensors        EMA weights in float32 (optional)
    optimizer.safetensors  optimizer state tensors            } resume state (optional)
    optimizer.json         optimizer scalars and param_groups  }
    scheduler.json         LR scheduler ``state_dict()``       }
    trainer_state.json     step count and other JSON trainer state (frozen parts' records included)
    objective.safetensors  trained weights of an objective outside its model (e.g. a critic), optional

With several named optimizers (``optimizer={"gen": ..., "critic": ...}``) each has its own
``optimizer.<name>.safetensors``, ``optimizer.<name>.json`` and ``scheduler.<name>.json``; one optimizer keeps
the plain names, so checkpoints of either kind written before still load.

``save`` writes into a hidden sibling directory, fsyncs, then swaps it into place (old one renamed
aside, new one renamed in, old one removed), so a crash leaves either the old or the new checkpoint. It
replaces a missing or empty folder or an earlier checkpoint, and refuses any other folder (whose files the
swap would delete). Readers also take a training run folder (``TrainConfig.out_dir``) holding ``checkpoint/``.

This module knows the format only; rebuilding a model from its config (``genkit.load``) lives in
:mod:`genkit.loading`, above the families.

>>> # save(out / "checkpoint", model, ema=ema_state)   then   model = genkit.load(out / "checkpoint")
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Union

import torch
from torch import Tensor, nn

from . import io
from .checks import check_device
from .errors import CheckpointError, ConfigError
from .frozen import EMA_ATTR, FINGERPRINT_ATTR, SOURCE_ATTR, fingerprint_state

__all__ = ["FORMAT_VERSION", "save", "load_weights", "load_training_state", "read_trainer_state", "has_resume_state",
           "read_config", "split_config", "is_checkpoint", "resolve", "model_config", "unwrap", "fingerprint", "tag"]

FORMAT_VERSION = 1
_RESERVED = ("format", "genkit_version", "torch_version", "genkit_files")
PathLike = Union[str, "os.PathLike[str]"]
_DIFFUSERS_MARKERS = ("model_index.json", "genkit_export.json", "unet")  # what a diffusers pipeline folder holds
_STATE_KEYS = ("ema", "objective_state")  # what load_training_state adds to the trainer state it returns


def unwrap(model: nn.Module) -> nn.Module:
    """The module whose state_dict keys are canonical: no DDP ``module.`` and no ``_orig_mod.`` prefixes."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


# ----------------------------------------------------------------------------------------------- writing
def is_checkpoint(directory: Path) -> bool:
    """Whether ``directory`` holds a genkit checkpoint: a ``config.json`` with an integer format and a family."""
    try:
        config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and isinstance(config.get("format"), int) and isinstance(config.get("family"), str)


def _write_tensors(path: Path, tensors: dict[str, Tensor], meta: dict[str, str] | None = None) -> None:
    """One safetensors file, fsynced (tests patch this to simulate a crash mid-save)."""
    io.write_tensors(path, tensors, meta)


def _write_state(path: Path, state: dict[str, Tensor]) -> None:
    _write_tensors(path, *io.shared_state(state))


def model_config(model: nn.Module) -> dict[str, Any]:
    """``model.config()`` checked for what a checkpoint needs: a dict, a string ``"family"``, JSON values."""
    model = unwrap(model)
    config = model.config() if callable(getattr(model, "config", None)) else None
    if not isinstance(config, dict) or not isinstance(config.get("family"), str):
        raise ConfigError(f"{type(model).__name__}.config() must return a dict with a string 'family' key; "
                          f"got {config!r}")
    clash = [k for k in _RESERVED if k in config]
    if clash:
        raise ConfigError(f"{type(model).__name__}.config() uses reserved keys {clash}; rename them")
    try:
        io.encode_json(config, f"{type(model).__name__}.config()", keep_tuples=False)
    except CheckpointError as e:
        raise ConfigError(str(e)) from None
    return dict(config)


def _named(what: Any, kind: str) -> dict[str, Any]:
    """One object (the plain file names) as ``{"": obj}``, or a dict of named ones; names checked."""
    if what is None:
        return {}
    if not isinstance(what, dict):
        return {"": what}
    for name in what:
        if not (isinstance(name, str) and name and name.replace("_", "a").replace("-", "a").isalnum()):
            raise ConfigError(f"{kind} name {name!r} is invalid in a checkpoint: use letters, digits, _ and -")
    return dict(what)


def _file(stem: str, name: str, suffix: str) -> str:
    return f"{stem}.{name}{suffix}" if name else f"{stem}{suffix}"


def _write_optimizer(tmp: Path, name: str, optimizer: torch.optim.Optimizer) -> None:
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, per_param in sd["state"].items():
        for key, value in per_param.items():
            if isinstance(value, Tensor):
                tensors[f"{idx}/{key}"] = value.detach().contiguous()
            else:
                scalars.setdefault(str(idx), {})[key] = value
    _write_tensors(tmp / _file("optimizer", name, ".safetensors"), tensors, {})
    io.write_json(tmp / _file("optimizer", name, ".json"), {"param_groups": sd["param_groups"], "scalars": scalars,
                                                          "ids": list(sd["state"])}, "optimizer")


def save(directory: PathLike, model: nn.Module, *, ema: dict[str, Tensor] | None = None,
         optimizer: torch.optim.Optimizer | dict[str, torch.optim.Optimizer] | None = None,
         scheduler: Any | dict[str, Any] | None = None, trainer_state: dict[str, Any] | None = None,
         objective_state: dict[str, Tensor] | None = None) -> Path:
    """Write a checkpoint of ``model`` (and optionally EMA weights and a resume state) atomically.

    ``ema`` maps state_dict keys to tensors (stored float32). ``optimizer`` / ``scheduler`` (one each, or dicts
    of named ones) are saved through their ``state_dict()``; ``trainer_state`` must be JSON-able (tuples are
    kept); ``objective_state`` holds trained tensors of an objective outside ``model`` and the run state of
    both (:func:`genkit.objective.objective_state`). Call it on one process only. Returns the checkpoint path.

    ``directory`` must be missing, empty or an earlier checkpoint (replaced whole); any other folder is a
    CheckpointError, as saving would delete its files.
    """
    _check_save_arguments(directory, model)
    directory = Path(directory)
    model = unwrap(model)
    config = model_config(model)
    clash = [k for k in _STATE_KEYS if trainer_state is not None and k in trainer_state]
    if clash:
        raise ConfigError(f"trainer_state key {clash[0]!r} is reserved (load_training_state returns it); rename it")
    optimizers, schedulers = _named(optimizer, "optimizer"), _named(scheduler, "scheduler")
    with io.atomic_folder(directory, "checkpoint", is_checkpoint, "model") as tmp:
        _write_state(tmp / "model.safetensors", model.state_dict())
        if ema is not None:
            _write_state(tmp / "ema.safetensors",
                         {k: v.float() if v.is_floating_point() else v for k, v in ema.items()})
        if objective_state is not None:
            _write_state(tmp / "objective.safetensors", objective_state)
        for name, opt in optimizers.items():
            _write_optimizer(tmp, name, opt)
        for name, sched in schedulers.items():
            io.write_json(tmp / _file("scheduler", name, ".json"), sched.state_dict(), "scheduler")
        if trainer_state is not None:
            io.write_json(tmp / "trainer_state.json", trainer_state, "trainer_state")
        meta = {"format": FORMAT_VERSION, "genkit_version": io.genkit_version(),
                "torch_version": torch.__version__, "genkit_files": io.file_sizes(tmp)}
        io.write_json(tmp / "config.json", {**config, **meta}, "config", keep_tuples=False)
    return directory


def _check_save_arguments(directory: Any, model: Any) -> None:
    """The folder first, then the model (``torch.save`` takes them the other way round)."""
    if isinstance(directory, nn.Module) and isinstance(model, (str, os.PathLike)):
        raise ConfigError(f"genkit.save(directory, model) takes the folder first; got save({type(directory).__name__}"
                          f", {str(model)!r}): swap the arguments, genkit.save({str(model)!r}, model)")
    if not isinstance(directory, (str, os.PathLike)):
        raise ConfigError(f"genkit.save(directory, model): directory must be a path (str or pathlib.Path); got "
                          f"{type(directory).__name__}")
    if not isinstance(model, nn.Module):
        raise ConfigError(f"genkit.save(directory, model): model must be an nn.Module with config(); got "
                          f"{type(model).__name__}")


# ----------------------------------------------------------------------------------------------- reading
def _resolve(directory: Path) -> Path:
    """``directory``, its ``checkpoint/`` if it is a training run folder, or the previous checkpoint a crash left
    renamed aside during the swap."""
    if directory.is_dir() and not (directory / "config.json").exists():
        inner = directory / "checkpoint"  # a run folder (TrainConfig.out_dir), as genkit.cli.checkpoint_dir reads
        if inner.is_dir() or io.siblings(inner, ".old-"):
            return _resolve(inner)
    if directory.is_dir():
        return directory
    asides = [p for p in io.siblings(directory, ".old-") if (p / "config.json").is_file()]
    return max(asides, key=lambda p: p.stat().st_mtime) if asides else directory


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise CheckpointError(f"{path} is missing; the checkpoint is incomplete. Re-save it or use an earlier one")
    return io.read_json(path)


def read_config(directory: PathLike) -> dict[str, Any]:
    """The checkpoint's ``config.json`` (model config plus format metadata), checked for a readable format."""
    directory = Path(directory)
    path = _resolve(directory)
    if not path.is_dir():
        raise CheckpointError(f"no checkpoint at {directory}: the directory does not exist; check the path")
    if not (path / "config.json").exists() and any((path / name).exists() for name in _DIFFUSERS_MARKERS):
        raise CheckpointError(f"{path} is a diffusers pipeline folder, not a genkit checkpoint; load it with "
                              f"genkit.from_diffusers({str(path)!r})")
    if not (path / "config.json").exists() and (path / "solver.json").is_file():
        raise CheckpointError(f"{path} is a searched-solver folder (solver.json), not a model checkpoint; use it as "
                              f"a solver: genkit.get_solver({str(path)!r}), or solver={str(path)!r} in genkit.solve "
                              "/ model.sample (genkit.solvers.load_searched_solver reads it too)")
    config = _read_json(path / "config.json")
    fmt = config.get("format") if isinstance(config, dict) else None
    if not isinstance(fmt, int) and isinstance(config, dict) and "_class_name" in config:
        raise CheckpointError(f"{path} holds a diffusers {config['_class_name']}, not a genkit checkpoint; load it "
                              f"with genkit.from_diffusers({str(path)!r}, scheduler) and the scheduler it was "
                              "trained with")
    if not isinstance(fmt, int):
        raise CheckpointError(f"{path / 'config.json'} has no integer 'format' key (got {fmt!r}); "
                              "it was not written by genkit.checkpoint.save")
    if fmt > FORMAT_VERSION:
        raise CheckpointError(f"{path} has checkpoint format {fmt} (genkit {config.get('genkit_version')}); "
                              f"this genkit ({io.genkit_version()}) reads format <= {FORMAT_VERSION}. Upgrade genkit")
    return config


def _read_tensors(path: Path, config: dict[str, Any], device: str | torch.device = "cpu") -> dict[str, Tensor]:
    return io.read_tensors(path, config.get("genkit_files", {}).get(path.name), device)


def _check_keys(model: nn.Module, state: dict[str, Tensor], path: Path) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [f"{k}: saved {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
              for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or shapes:
        parts = [f"missing keys {missing[:8]}" if missing else "",
                 f"unexpected keys {unexpected[:8]}" if unexpected else "",
                 f"shape mismatches {shapes[:8]}" if shapes else ""]
        raise CheckpointError(f"{path} does not match the {type(model).__name__} model: "
                              + "; ".join(p for p in parts if p)
                              + ". Build the model with the checkpoint's config.json (genkit.load does)")


def resolve(directory: PathLike) -> Path:
    """The checkpoint folder ``directory`` names: itself, the ``checkpoint/`` of a training run folder
    (``TrainConfig.out_dir``), or the previous checkpoint a crash left renamed aside during a save."""
    return _resolve(Path(directory))


def split_config(config: dict[str, Any]) -> dict[str, Any]:
    """The model's own ``config()`` out of a checkpoint's ``config.json`` (the format metadata dropped)."""
    return {k: v for k, v in config.items() if k not in _RESERVED}


def load_weights(directory: PathLike, model: nn.Module, *, ema: bool = True,
                 map_location: str | torch.device = "cpu") -> nn.Module:
    """Move ``model`` to ``map_location`` and load the checkpoint's EMA weights into it (``ema=True`` and saved),
    else its raw weights; every key and shape is checked first. Returns the model (mode unchanged)."""
    directory = Path(directory)
    config = read_config(directory)
    path = _resolve(directory)
    device = check_device(map_location, "genkit.load", "map_location")
    map_location = "cpu" if device.type == "cpu" else str(device)  # safetensors rejects "cpu:0"
    model.to(map_location)
    name = "ema.safetensors" if ema and (path / "ema.safetensors").is_file() else "model.safetensors"
    state = _read_tensors(path / name, config, map_location)
    _check_keys(model, state, path / name)
    model.load_state_dict(state)
    tag(model, path, fingerprint_state(split_config(config), state), ema=name == "ema.safetensors")
    return model


def __getattr__(name: str) -> Any:
    # ``genkit.checkpoint.load`` moved to ``genkit.load`` (genkit/loading.py, above the families); kept one release.
    # No import here: genkit/__init__ has imported genkit.loading before anyone can ask for this attribute.
    if name == "load":
        warnings.warn("genkit.checkpoint.load is deprecated; use genkit.load (genkit.loading.load)",
                      DeprecationWarning, stacklevel=2)
        return sys.modules["genkit.loading"].load
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def fingerprint(directory: PathLike, *, ema: bool = True) -> str:
    """sha256 (hex) of a checkpoint's model config and of the weights ``load(directory, ema=ema)`` loads (EMA
    when saved and ``ema``, else raw): what identifies a frozen part loaded from it, whatever device or dtype
    it is later moved to. Equal for equal config and weights, whatever the folder."""
    directory = Path(directory)
    config = read_config(directory)
    path = _resolve(directory)
    name = "ema.safetensors" if ema and (path / "ema.safetensors").is_file() else "model.safetensors"
    state = _read_tensors(path / name, config)
    return fingerprint_state({k: v for k, v in config.items() if k not in _RESERVED}, state)


def tag(module: nn.Module, directory: PathLike, fingerprint: str, *, ema: bool | None = None) -> nn.Module:
    """Mark ``module`` as loaded from checkpoint ``directory`` with that folder's ``fingerprint`` (of the EMA
    weights when ``ema``, else the raw ones): a frozen part is then recorded by reference (:mod:`genkit.frozen`)
    and reloaded with the same weights. ``genkit.load`` calls it; returns ``module``."""
    setattr(module, SOURCE_ATTR, str(Path(directory).resolve()))
    setattr(module, FINGERPRINT_ATTR, str(fingerprint))
    setattr(module, EMA_ATTR, ema)
    return module


def has_resume_state(directory: PathLike) -> bool:
    """Whether ``directory`` holds a checkpoint with a trainer resume state."""
    return (_resolve(Path(directory)) / "trainer_state.json").is_file()


def read_trainer_state(directory: PathLike) -> dict[str, Any]:
    """The checkpoint's ``trainer_state.json`` (step, the run's ``train_config``, ...) without loading weights."""
    return _read_json(_resolve(Path(directory)) / "trainer_state.json")


def _load_optimizer(path: Path, name: str, optimizer: torch.optim.Optimizer, config: dict[str, Any]) -> None:
    json_path = path / _file("optimizer", name, ".json")
    info = _read_json(json_path)
    tensors = _read_tensors(path / _file("optimizer", name, ".safetensors"), config)
    per_param: dict[int, dict[str, Any]] = {int(i): {} for i in info["ids"]}
    for key, value in tensors.items():
        idx, entry = key.split("/", 1)
        per_param[int(idx)][entry] = value
    for idx, values in info["scalars"].items():
        per_param[int(idx)].update(values)
    try:
        optimizer.load_state_dict({"state": per_param, "param_groups": list(info["param_groups"])})
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"{json_path} does not fit this optimizer ({e}); "
                              "resume with the same parameters and optimizer") from e


def load_training_state(directory: PathLike, model: nn.Module,
                        optimizer: torch.optim.Optimizer | dict[str, torch.optim.Optimizer] | None = None,
                        scheduler: Any | dict[str, Any] | None = None) -> dict[str, Any]:
    """Load raw weights, optimizer and scheduler state in place; return ``trainer_state`` plus ``"ema"`` and
    ``"objective_state"``.

    ``"ema"`` is the saved EMA state dict (float32 tensors on the CPU) or None; ``"objective_state"``, present
    when saved, the objective's own tensors (CPU). ``optimizer`` / ``scheduler``: one each or dicts by name.
    """
    directory = Path(directory)
    config = read_config(directory)
    path = _resolve(directory)
    model = unwrap(model)
    family = model_config(model)["family"]
    if config.get("family") != family:
        raise CheckpointError(f"{path} holds a {config.get('family')!r} model, not {family!r}; "
                              "resume with the same model family or start a fresh run")
    state = _read_json(path / "trainer_state.json")
    weights = _read_tensors(path / "model.safetensors", config)
    _check_keys(model, weights, path / "model.safetensors")
    model.load_state_dict(weights)
    for name, opt in _named(optimizer, "optimizer").items():
        _load_optimizer(path, name, opt, config)
    for name, sched in _named(scheduler, "scheduler").items():
        sched.load_state_dict(_read_json(path / _file("scheduler", name, ".json")))
    state["ema"] = _read_tensors(path / "ema.safetensors", config) if (path / "ema.safetensors").is_file() else None
    if (path / "objective.safetensors").is_file():
        state["objective_state"] = _read_tensors(path / "objective.safetensors", config)
    return state
