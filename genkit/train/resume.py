"""The resume policy: what a checkpoint must agree with before a run continues from it, and what is restored.

A resumed run continues the saved one exactly. It is refused when the model's config differs, when settings
that change what each step computes differ (:func:`~genkit.train.config.resume_changes`; allowed with
``allow_new_settings``), or when a frozen part differs from the one the run was trained with (by fingerprint).
A frozen part recorded with a checkpoint folder and missing now is reloaded from that folder with ``loader``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .. import checkpoint
from ..errors import CheckpointError, ConfigError
from ..frozen import Frozen, holders, reload
from ..objective import load_run_state, objective_config, objective_weights, split_run_state
from .config import resume_changes

__all__ = ["restore", "check_frozen", "frozen_records"]
log = logging.getLogger("genkit.train")


def frozen_records(*modules: torch.nn.Module) -> dict[str, dict[str, Any]]:
    """``{"<holder path>.<name>": {"source": ..., "fingerprint": ...}}`` of every frozen part in ``modules``."""
    return {f"{path}.{name}" if path else name: record
            for path, holder in holders(*modules) for name, record in holder.records().items()}


def check_frozen(source: Path, saved: dict[str, Any] | None, modules: tuple[torch.nn.Module, ...],
                 loader: Callable[[str], Any] | None) -> None:
    """Refuse changed, added or lost frozen parts; reload a missing one from its recorded folder."""
    if saved is None:  # a checkpoint from before frozen parts were recorded
        return
    found: dict[str, tuple[Frozen, str]] = {}
    for path, holder in holders(*modules):
        for name in [*holder.names(), *(k.rsplit(".", 1)[-1] for k in saved)]:
            found.setdefault(f"{path}.{name}" if path else name, (holder, name))
    now = frozen_records(*modules)
    for key, record in saved.items():
        if key in now:
            if now[key]["fingerprint"] != record["fingerprint"]:
                raise CheckpointError(
                    f"frozen part {key!r} changed: {source} was trained with fingerprint {record['fingerprint']} "
                    f"(from {record['source']}), the one attached now has fingerprint {now[key]['fingerprint']} "
                    f"(from {now[key]['source']}); attach the run's own part, or start a fresh run")
            continue
        if key not in found:
            raise CheckpointError(f"{source} records frozen part {key!r} but the objective has no Frozen holder "
                                  "for it; resume with the same objective")
        if record["source"] is None:
            raise CheckpointError(f"{source} was trained with frozen part {key!r} (fingerprint "
                                  f"{record['fingerprint']}), not loaded from a checkpoint; attach the same part "
                                  "before resuming")
        if loader is None:
            raise CheckpointError(f"{source} was trained with frozen part {key!r} from {record['source']}; attach it "
                                  "(e.g. genkit.load of that folder) or pass fit(frozen_loader=genkit.load) to "
                                  "reload it")
        holder, name = found[key]
        holder.set(name, reload(record, loader, key))
        log.info("reloaded frozen part %s from %s", key, record["source"])
    extra = sorted(set(now) - set(saved))
    if extra:
        raise CheckpointError(f"{source} was trained without frozen part(s) {extra}; detach them to resume, or "
                              "start a fresh run")


def restore(trainer: Any, source: Path, allow_new_settings: bool = False,
            loader: Callable[[str], Any] | None = None) -> dict[str, Any]:
    """Check ``source`` against ``trainer``'s objective and settings, load every state into it, return the run."""
    saved = {k: v for k, v in checkpoint.read_config(source).items() if k not in checkpoint._RESERVED}
    ours = checkpoint.model_config(trainer.model)
    if saved != ours:  # same weight shapes can hide another path, weighting or family
        diff = sorted(k for k in set(saved) | set(ours) if saved.get(k) != ours.get(k))
        raise CheckpointError(
            f"{source} holds a different model (config differs in {diff}); resume it with the same model, "
            "or choose a new out_dir / resume=False to start a fresh run"
        )
    trainer_state = checkpoint.read_trainer_state(source)
    saved_config = trainer_state.get("train_config") or {}
    cfg = trainer.config
    changes = resume_changes(saved_config, cfg)
    listing = "; ".join(f"{k} {a!r} there, {b!r} now" for k, (a, b) in changes.items())
    if changes and not allow_new_settings:
        raise ConfigError(
            f"{source} was trained with other settings ({listing}); resume with that run's settings to continue "
            "it exactly, or pass fit(allow_new_settings=True) (train/train.py: --allow-new-settings) to go on "
            "with the new ones"
        )
    saved_objective = trainer_state.get("objective_config")
    now = json.loads(json.dumps(objective_config(trainer.objective, trainer.model)))
    if "objective_config" in trainer_state and saved_objective != now:
        a, b = saved_objective or {}, now or {}
        diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        raise CheckpointError(f"{source} was trained by a {type(trainer.objective).__name__} with other settings "
                              f"(config differs in {diff}: {saved_objective} there, {now} now); resume with the same "
                              "objective, or choose a new out_dir / resume=False to start a fresh run")
    check_frozen(source, trainer_state.get("frozen"), trainer._modules_with_parts(), loader)
    opts = trainer._opts
    saved_groups, groups_now = trainer_state.get("optimizer_groups"), json.loads(json.dumps(opts.specs()))
    regrouped = saved_groups is not None and saved_groups != groups_now
    if regrouped and (not allow_new_settings or set(saved_groups) != set(groups_now)
                      or any(len(saved_groups[k]) != len(groups_now[k]) for k in groups_now)):
        raise ConfigError(
            f"{source} was trained with other optimizers or parameter groups ({saved_groups} there, {groups_now} "
            "now); resume with the same param_groups() / optimizers() to continue it exactly"
            + ("" if allow_new_settings else ", or pass fit(allow_new_settings=True) (train/train.py: "
               "--allow-new-settings) for a new lr_scale / weight_decay of the same groups"))
    single = len(opts.raw) == 1
    state = checkpoint.load_training_state(source, trainer.model, next(iter(opts.raw.values())) if single
                                           else opts.raw, next(iter(opts.schedulers.values())) if single
                                           else opts.schedulers)
    _load_objective_state(trainer, state.pop("objective_state", None), source, int(state.get("run_state_ranks", 1)))
    step, saved_lr = int(state["step"]), trainer.optimizer.param_groups[0]["lr"]
    if changes or regrouped:  # the loaded optimizer and schedule carry the old values: put the new ones in
        log.warning("resuming %s with new settings: %s", source,
                    "; ".join(x for x in (listing, "parameter groups changed" if regrouped else "") if x))
        opts.apply_settings(cfg, trainer._lr_factor, step)
    ema = state.pop("ema")
    if trainer.ema is not None:
        if ema is None:
            raise CheckpointError(f"{source} has no EMA weights but ema_decay={cfg.ema_decay}; "
                                  "resume with ema_decay=None or start a fresh run")
        try:
            trainer.ema.load_state_dict(ema, int(state.get("ema_updates", 0)))
        except CheckpointError as e:
            raise CheckpointError(f"{source}/ema.safetensors: {e}") from e
    opts.set_kernels()
    if trainer.accelerator.scaler is not None and state.get("grad_scaler"):
        trainer.accelerator.scaler.load_state_dict(state["grad_scaler"])
    old_steps = saved_config.get("steps", cfg.steps)
    if old_steps != cfg.steps and step < cfg.steps:
        log.warning("steps changed from %d to %d: the LR schedule (warm-up, then cosine to the final step) is "
                    "recomputed for %d steps, so after step %d the LR moves from %.3g to %.3g",
                    old_steps, cfg.steps, cfg.steps, step, saved_lr, cfg.lr * trainer._lr_factor(step))
    if state.get("world_size") != trainer.accelerator.num_processes:
        log.info("resuming a %s-process run on %d processes: batches from here on differ from the original run",
                 state.get("world_size"), trainer.accelerator.num_processes)
    window = state["window"]
    window.setdefault("counts", {k: window["n"] for k in window["logs"]})  # before counts: every step logged all
    return {"step": step, "skipped": int(state["skipped"]), "window": window, "streak": int(state.get("streak", 0))}


def _load_objective_state(trainer: Any, saved: dict[str, torch.Tensor] | None, source: Path,
                          saved_ranks: int = 1) -> None:
    """The objective's own weights, and to each rank the run state saved for it: its own when the checkpoint holds
    ``saved_ranks`` > its rank (an empty one included), else the main process's (a run resumed on more
    processes, or saved before each rank's was kept)."""
    ours = objective_weights(trainer.objective, trainer.model)
    weights, run_state = split_run_state(saved or {})
    if set(weights) != set(ours):
        diff = sorted(set(weights) ^ set(ours))[:8]
        raise CheckpointError(f"{source}/objective.safetensors does not match {type(trainer.objective).__name__}'s "
                              f"own tensors (differing keys {diff}); resume with the same objective")
    with torch.no_grad():
        for key, value in weights.items():
            ours[key].copy_(value)
    rank = trainer.accelerator.process_index
    source_rank = rank if rank < saved_ranks else 0
    if source_rank != rank and run_state:
        log.info("rank %d resumes from the main process's run state: %s holds none of its own", rank, source)
    load_run_state(trainer.objective, trainer.model, run_state, source_rank)
