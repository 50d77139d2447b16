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
swap would delete). ``load`` also takes a training run folder (``TrainConfig.out_dir``) holding ``checkpoint/``.

>>> # save(out / "checkpoint", model, ema=ema_state)   then   model = load(out / "checkpoint")
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Callable
from importlib import metadata as _metadata
from pathlib import Path
from typing import Any, Union

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from .errors import CheckpointError, ConfigError
from .frozen import FINGERPRINT_ATTR, SOURCE_ATTR, fingerprint_state

__all__ = ["FORMAT_VERSION", "save", "load", "load_training_state", "read_trainer_state", "has_resume_state",
           "read_config", "model_config", "unwrap", "fingerprint", "tag"]

FORMAT_VERSION = 1
_RESERVED = ("format", "genkit_version", "torch_version", "genkit_files")
_ALIASES = "genkit_aliases"  # safetensors metadata: tied keys dropped on save -> the key they share storage with
PathLike = Union[str, "os.PathLike[str]"]
_DIFFUSERS_MARKERS = ("model_index.json", "genkit_export.json", "unet")  # what a diffusers pipeline folder holds
_STATE_KEYS = ("ema", "objective_state")  # what load_training_state adds to the trainer state it returns


def _genkit_version() -> str:
    try:
        return _metadata.version("genkit")
    except _metadata.PackageNotFoundError:
        return "unknown"


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
def _fsync_path(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # directories cannot be opened on some platforms (Windows)
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _is_checkpoint(directory: Path) -> bool:
    """Whether ``directory`` holds a genkit checkpoint: a ``config.json`` with an integer format and a family."""
    try:
        config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and isinstance(config.get("format"), int) and isinstance(config.get("family"), str)


def _check_save_target(directory: Path, what: str, same_kind: Callable[[Path], bool], example: str) -> None:
    """Refuse to save over ``directory`` unless it is missing, empty, or already a ``what`` (which is replaced).

    Saving swaps a whole folder into place, so whatever else a non-empty folder holds would be deleted.
    ``example`` names a subfolder to suggest instead (``runs/x`` -> ``runs/x/<example>``).
    """
    if not directory.exists():
        return
    if not directory.is_dir():
        raise CheckpointError(f"cannot save the {what} to {directory}: it is a file, not a folder. Pick a new or "
                              "empty folder")
    entries = sorted(p.name for p in directory.iterdir())
    if entries and not same_kind(directory):
        shown = ", ".join(entries[:6]) + (", ..." if len(entries) > 6 else "")
        raise CheckpointError(f"cannot save the {what} to {directory}: the folder holds other files ({shown}), which "
                              f"saving would delete (it replaces the whole folder). Pick a new or empty folder "
                              f"(e.g. {directory / example})")


def _swap_in(tmp: Path, directory: Path, old: Path) -> None:
    """Rename the fully written folder ``tmp`` to ``directory``. An existing ``directory`` is renamed aside to ``old``
    first (the caller removes it), so a crash leaves the old or the new folder whole, never a mix."""
    if directory.exists():
        os.rename(directory, old)
    os.rename(tmp, directory)
    _fsync_path(directory.parent)


def _write_tensors(path: Path, tensors: dict[str, Tensor], meta: dict[str, str]) -> None:
    """Write one safetensors file and fsync it (tests patch this to simulate a crash mid-save)."""
    save_file(tensors, str(path), metadata=meta)
    _fsync_path(path)


def _encode(obj: Any, where: str, keep_tuples: bool) -> Any:
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            if not isinstance(k, str):
                raise CheckpointError(f"{where}: key {k!r} is not a string; JSON would turn it into {str(k)!r}. "
                                      "Use string keys in state saved to a checkpoint")
            out[k] = _encode(v, f"{where}.{k}", keep_tuples)
        return out
    if isinstance(obj, tuple) and keep_tuples:
        return {"__tuple__": [_encode(v, f"{where}[{i}]", keep_tuples) for i, v in enumerate(obj)]}
    if isinstance(obj, (list, tuple)):
        return [_encode(v, f"{where}[{i}]", keep_tuples) for i, v in enumerate(obj)]
    raise CheckpointError(f"{where} has type {type(obj).__name__}, which is not JSON-serialisable; "
                          "store numbers, strings, lists and dicts only (tensors belong in safetensors files)")


def _write_json(path: Path, obj: Any, where: str, keep_tuples: bool = True) -> None:
    text = json.dumps(_encode(obj, where, keep_tuples), indent=2, sort_keys=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _dedupe(state: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, str]]:
    """safetensors refuses tensors that share storage: keep tied weights once and remember the aliases."""
    tensors: dict[str, Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    storages: set[int] = set()
    for key, t in state.items():
        t = t.detach()
        ptr = t.untyped_storage().data_ptr()
        ident = (ptr, t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if t.numel() and ident in seen:
            aliases[key] = seen[ident]
            continue
        if t.numel() and ptr in storages:  # overlapping but different view: store a copy
            t = t.clone()
        else:
            seen[ident] = key
            storages.add(ptr)
        tensors[key] = t.contiguous()
    return tensors, aliases


def _write_state(path: Path, state: dict[str, Tensor]) -> None:
    tensors, aliases = _dedupe(state)
    _write_tensors(path, tensors, {"format": "pt", _ALIASES: json.dumps(aliases)})


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
        _encode(config, f"{type(model).__name__}.config()", keep_tuples=False)
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
    _write_tensors(tmp / _file("optimizer", name, ".safetensors"), tensors, {"format": "pt"})
    _write_json(tmp / _file("optimizer", name, ".json"), {"param_groups": sd["param_groups"], "scalars": scalars,
                                                          "ids": list(sd["state"])}, "optimizer")


def save(directory: PathLike, model: nn.Module, *, ema: dict[str, Tensor] | None = None,
         optimizer: torch.optim.Optimizer | dict[str, torch.optim.Optimizer] | None = None,
         scheduler: Any | dict[str, Any] | None = None, trainer_state: dict[str, Any] | None = None,
         objective_state: dict[str, Tensor] | None = None) -> Path:
    """Write a checkpoint of ``model`` (and optionally EMA weights and a resume state) atomically.

    ``ema`` maps state_dict keys to tensors (stored float32). ``optimizer`` / ``scheduler`` (one each, or dicts
    of named ones) are saved through their ``state_dict()``; ``trainer_state`` must be JSON-able (tuples are
    kept); ``objective_state`` holds trained tensors of an objective outside ``model``. Call it on one
    process only. Returns the checkpoint path.

    ``directory`` must be missing, empty or an earlier checkpoint (replaced whole); any other folder is a
    CheckpointError, as saving would delete its files.
    """
    directory = Path(directory)
    model = unwrap(model)
    config = model_config(model)
    clash = [k for k in _STATE_KEYS if trainer_state is not None and k in trainer_state]
    if clash:
        raise ConfigError(f"trainer_state key {clash[0]!r} is reserved (load_training_state returns it); rename it")
    optimizers, schedulers = _named(optimizer, "optimizer"), _named(scheduler, "scheduler")
    _check_save_target(directory, "checkpoint", _is_checkpoint, "model")
    parent = directory.parent
    parent.mkdir(parents=True, exist_ok=True)
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp = parent / f".{directory.name}.tmp-{tag}"
    tmp.mkdir()
    try:
        _write_state(tmp / "model.safetensors", model.state_dict())
        if ema is not None:
            _write_state(tmp / "ema.safetensors",
                         {k: v.float() if v.is_floating_point() else v for k, v in ema.items()})
        if objective_state is not None:
            _write_state(tmp / "objective.safetensors", objective_state)
        for name, opt in optimizers.items():
            _write_optimizer(tmp, name, opt)
        for name, sched in schedulers.items():
            _write_json(tmp / _file("scheduler", name, ".json"), sched.state_dict(), "scheduler")
        if trainer_state is not None:
            _write_json(tmp / "trainer_state.json", trainer_state, "trainer_state")
        files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir())}
        meta = {"format": FORMAT_VERSION, "genkit_version": _genkit_version(),
                "torch_version": torch.__version__, "genkit_files": files}
        _write_json(tmp / "config.json", {**config, **meta}, "config", keep_tuples=False)
        _fsync_path(tmp)
        _swap_in(tmp, directory, parent / f".{directory.name}.old-{tag}")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for stale in _siblings(directory, ".old-", ".tmp-"):  # our old copy, and leftovers of crashed saves
        shutil.rmtree(stale, ignore_errors=True)
    return directory


# ----------------------------------------------------------------------------------------------- reading
def _siblings(directory: Path, *kinds: str) -> list[Path]:
    if not directory.parent.is_dir():
        return []
    prefixes = tuple(f".{directory.name}{kind}" for kind in kinds)
    return [p for p in directory.parent.iterdir() if p.name.startswith(prefixes) and p.is_dir()]


def _resolve(directory: Path) -> Path:
    """``directory``, its ``checkpoint/`` if it is a training run folder, or the previous checkpoint a crash left
    renamed aside during the swap."""
    if directory.is_dir() and not (directory / "config.json").exists():
        inner = directory / "checkpoint"  # a run folder (TrainConfig.out_dir), as genkit.cli.checkpoint_dir reads
        if inner.is_dir() or _siblings(inner, ".old-"):
            return _resolve(inner)
    if directory.is_dir():
        return directory
    asides = [p for p in _siblings(directory, ".old-") if (p / "config.json").is_file()]
    return max(asides, key=lambda p: p.stat().st_mtime) if asides else directory


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise CheckpointError(f"{path} is missing; the checkpoint is incomplete. Re-save it or use an earlier one")
    try:
        text = path.read_text(encoding="utf-8")
        return json.loads(text, object_hook=lambda d: tuple(d["__tuple__"]) if set(d) == {"__tuple__"} else d)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path} is unreadable or not valid JSON ({e}); "
                              "re-save the checkpoint or use an earlier one") from e


def read_config(directory: PathLike) -> dict[str, Any]:
    """The checkpoint's ``config.json`` (model config plus format metadata), checked for a readable format."""
    directory = Path(directory)
    path = _resolve(directory)
    if not path.is_dir():
        raise CheckpointError(f"no checkpoint at {directory}: the directory does not exist; check the path")
    if not (path / "config.json").exists() and any((path / name).exists() for name in _DIFFUSERS_MARKERS):
        raise CheckpointError(f"{path} is a diffusers pipeline folder, not a genkit checkpoint; load it with "
                              f"genkit.from_diffusers({str(path)!r})")
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
                              f"this genkit ({_genkit_version()}) reads format <= {FORMAT_VERSION}. Upgrade genkit")
    return config


def _read_tensors(path: Path, config: dict[str, Any], device: str | torch.device = "cpu") -> dict[str, Tensor]:
    hint = "re-save the checkpoint or use an earlier one"
    if not path.is_file():
        raise CheckpointError(f"{path} is missing; {hint}")
    expected = config.get("genkit_files", {}).get(path.name)
    size = path.stat().st_size
    if expected is not None and size != expected:
        raise CheckpointError(f"{path} is {size} bytes but was written with {expected}: truncated or corrupt; {hint}")
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
        aliases = json.loads(meta.get(_ALIASES, "{}"))
    except Exception as e:  # safetensors raises its own SafetensorError on bad headers and short files
        raise CheckpointError(f"{path} is truncated or corrupt ({e}); {hint}") from e
    for key, target in aliases.items():
        state[key] = state[target]
    return state


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
                              + ". Build the model with the checkpoint's config.json (genkit.checkpoint.load does)")


def load(directory: PathLike, *, ema: bool = True, map_location: str | torch.device = "cpu",
         expect_family: str | None = None) -> nn.Module:
    """Rebuild the model with ``genkit.models.build(config)`` and load its weights; returned in eval mode.

    ``directory`` is a checkpoint folder or a training run folder (``TrainConfig.out_dir``, ``--out`` of
    train/train.py), whose ``checkpoint/`` is loaded. A diffusers folder is refused with a pointer to
    ``genkit.from_diffusers``. EMA weights are loaded when saved and ``ema=True``; otherwise the raw weights.
    ``expect_family`` makes loading a checkpoint of another family an error.
    """
    from .models import build  # the checkpoint module stays importable without any family

    directory = Path(directory)
    config = read_config(directory)
    path = _resolve(directory)
    family = config.get("family")
    if expect_family is not None and family != expect_family:
        raise CheckpointError(f"{path} holds a {family!r} model but {expect_family!r} was expected; "
                              "pass the right checkpoint or change expect_family")
    model_config = {k: v for k, v in config.items() if k not in _RESERVED}
    try:
        model = build(model_config)
    except Exception as e:
        raise CheckpointError(f"cannot rebuild the model of {path / 'config.json'}: {e}") from e
    device = torch.device(map_location)
    map_location = "cpu" if device.type == "cpu" else str(device)  # safetensors rejects "cpu:0"
    model.to(map_location)
    name = "ema.safetensors" if ema and (path / "ema.safetensors").is_file() else "model.safetensors"
    state = _read_tensors(path / name, config, map_location)
    _check_keys(model, state, path / name)
    model.load_state_dict(state)
    tag(model, path, fingerprint_state(model_config, state))
    return model.eval()


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


def tag(module: nn.Module, directory: PathLike, fingerprint: str) -> nn.Module:
    """Mark ``module`` as loaded from checkpoint ``directory`` with that folder's ``fingerprint``: a frozen part
    is then recorded by reference (:mod:`genkit.frozen`). ``genkit.load`` calls it; returns ``module``."""
    setattr(module, SOURCE_ATTR, str(Path(directory).resolve()))
    setattr(module, FINGERPRINT_ATTR, str(fingerprint))
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
