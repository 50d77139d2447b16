"""Ground-floor I/O shared by every artifact genkit writes: checkpoints, searched-solver folders, diffusers exports.

- :func:`atomic_folder` writes a folder aside and swaps it into place whole (a crash leaves the old or the new
  folder, never a mix) after refusing a target that holds anything but an earlier artifact of the same kind;
- :func:`write_json` / :func:`read_json` with genkit's encoding (string keys only, tuples kept as
  ``{"__tuple__": [...]}`` when asked, nothing that is not JSON), fsynced;
- :func:`write_tensors` / :func:`read_tensors`: safetensors files whose byte sizes are recorded and checked,
  so a truncated file is named instead of half-read;
- :func:`genkit_version`.

It imports nothing of genkit but the errors: everything else may stand on it.

>>> import tempfile, pathlib
>>> root = pathlib.Path(tempfile.mkdtemp())
>>> with atomic_folder(root / "art", "artifact", lambda d: (d / "a.json").is_file()) as tmp:
...     write_json(tmp / "a.json", {"pair": (1, 2)}, "a.json")
>>> read_json(root / "art" / "a.json")
{'pair': (1, 2)}
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from importlib import metadata as _metadata
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import CheckpointError

__all__ = ["genkit_version", "fsync_path", "encode_json", "write_json", "read_json", "write_tensors",
           "read_tensors", "shared_state", "file_sizes", "check_save_target", "atomic_folder", "siblings"]

_ALIASES = "genkit_aliases"  # safetensors metadata: tied keys dropped on save -> the key they share storage with


def genkit_version() -> str:
    """The installed genkit's version, or ``"unknown"`` when running from a source tree that is not installed."""
    try:
        return _metadata.version("genkit")
    except _metadata.PackageNotFoundError:
        return "unknown"


def fsync_path(path: Path) -> None:
    """fsync a file or a folder (folders cannot be opened on some platforms: then nothing happens)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------------------------- JSON
def encode_json(obj: Any, where: str, keep_tuples: bool) -> Any:
    """``obj`` as plain JSON values; a non-string key or a non-JSON value is a CheckpointError naming ``where``."""
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            if not isinstance(k, str):
                raise CheckpointError(f"{where}: key {k!r} is not a string; JSON would turn it into {str(k)!r}. "
                                      "Use string keys in state saved to a checkpoint")
            out[k] = encode_json(v, f"{where}.{k}", keep_tuples)
        return out
    if isinstance(obj, tuple) and keep_tuples:
        return {"__tuple__": [encode_json(v, f"{where}[{i}]", keep_tuples) for i, v in enumerate(obj)]}
    if isinstance(obj, (list, tuple)):
        return [encode_json(v, f"{where}[{i}]", keep_tuples) for i, v in enumerate(obj)]
    raise CheckpointError(f"{where} has type {type(obj).__name__}, which is not JSON-serialisable; "
                          "store numbers, strings, lists and dicts only (tensors belong in safetensors files)")


def write_json(path: Path, obj: Any, where: str, keep_tuples: bool = True) -> None:
    """Write ``obj`` (checked by :func:`encode_json`) as indented, key-sorted JSON and fsync it."""
    text = json.dumps(encode_json(obj, where, keep_tuples), indent=2, sort_keys=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def read_json(path: Path, hint: str = "re-save the checkpoint or use an earlier one") -> Any:
    """The JSON at ``path`` with tuples restored; CheckpointError (ending in ``hint``) if missing or unreadable."""
    if not path.is_file():
        raise CheckpointError(f"{path} is missing; the artifact is incomplete. {hint[:1].upper()}{hint[1:]}")
    try:
        text = path.read_text(encoding="utf-8")
        return json.loads(text, object_hook=lambda d: tuple(d["__tuple__"]) if set(d) == {"__tuple__"} else d)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path} is unreadable or not valid JSON ({e}); {hint}") from e


# ----------------------------------------------------------------------------------------------- tensors
def _dedupe(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """safetensors refuses tensors that share storage: keep tied weights once and remember the aliases."""
    tensors: dict[str, torch.Tensor] = {}
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


def shared_state(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A state dict made writable by safetensors: tied tensors kept once, plus the metadata recording the
    aliases, which :func:`read_tensors` restores. ``write_tensors(path, *shared_state(model.state_dict()))``."""
    tensors, aliases = _dedupe(state)
    return tensors, {_ALIASES: json.dumps(aliases)}


def write_tensors(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, str] | None = None) -> None:
    """Write one safetensors file (string ``meta`` in its header) and fsync it."""
    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(path),
              metadata={"format": "pt", **(meta or {})})
    fsync_path(path)


def read_tensors(path: Path, expected_size: int | None = None, device: str | torch.device = "cpu",
                 hint: str = "re-save the checkpoint or use an earlier one") -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file (aliases restored), checked against the byte size recorded when it was
    written; CheckpointError (ending in ``hint``) if missing, truncated or corrupt."""
    if not path.is_file():
        raise CheckpointError(f"{path} is missing; {hint}")
    size = path.stat().st_size
    if expected_size is not None and size != expected_size:
        raise CheckpointError(f"{path} is {size} bytes but was written with {expected_size}: truncated or corrupt; "
                              f"{hint}")
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


def file_sizes(folder: Path) -> dict[str, int]:
    """``{file name: byte size}`` of the files directly in ``folder`` (recorded so truncation is detected)."""
    return {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file()}


# ----------------------------------------------------------------------------------------------- folders
def check_save_target(directory: Path, what: str, same_kind: Callable[[Path], bool], example: str) -> None:
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


def siblings(directory: Path, *kinds: str) -> list[Path]:
    """The hidden siblings ``.<name>.old-*`` / ``.<name>.tmp-*`` an atomic save leaves while (or if) it runs."""
    if not directory.parent.is_dir():
        return []
    prefixes = tuple(f".{directory.name}{kind}" for kind in kinds)
    return [p for p in directory.parent.iterdir() if p.name.startswith(prefixes) and p.is_dir()]


@contextmanager
def atomic_folder(directory: Path, what: str, same_kind: Callable[[Path], bool],
                  example: str = "new") -> Iterator[Path]:
    """Yield a fresh hidden sibling folder to write ``directory``'s contents into; on success fsync everything
    in it and swap it into place (an existing ``directory`` is renamed aside first, then removed), on failure
    remove it and leave ``directory`` as it was. The target is checked by :func:`check_save_target` first.
    Leftovers of earlier crashed saves are removed after a successful swap."""
    directory = Path(directory)
    check_save_target(directory, what, same_kind, example)
    parent = directory.parent
    parent.mkdir(parents=True, exist_ok=True)
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp, old = parent / f".{directory.name}.tmp-{tag}", parent / f".{directory.name}.old-{tag}"
    tmp.mkdir()
    try:
        yield tmp
        for written in sorted(tmp.rglob("*"), reverse=True):  # files before their folders
            fsync_path(written)
        fsync_path(tmp)
        if directory.exists():
            os.rename(directory, old)
        os.rename(tmp, directory)
        fsync_path(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for stale in siblings(directory, ".old-", ".tmp-"):  # our old copy, and leftovers of crashed saves
        shutil.rmtree(stale, ignore_errors=True)
