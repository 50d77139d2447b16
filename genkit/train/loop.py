"""The training loop: :class:`Trainer` trains any objective (see :mod:`genkit.objective`) with AdamW on one
device or DDP, through ``accelerate``, with EMA, exact resume and a one-collective-per-step non-finite policy.

>>> # result = Trainer(model, TrainConfig(steps=1000, batch_size=256, out_dir="runs/x")).fit(data)
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset
from tqdm import tqdm

from .. import checkpoint
from ..data.labelled import LabelledData
from ..ema import EMA
from ..errors import CheckpointError, ConfigError, DataError, NonFiniteLossError, ShapeError, TrainingInterrupted
from ..objective import BatchSource, has_run_state, model_of, objective_config, objective_state, run_state
from .batching import (
    GLOBAL,
    NOISE,
    check_data,
    derive_seed,
    finite,
    make_batches,
    seed_global,
    tensors,
    to_device,
    warn_scale,
)
from .config import TrainConfig, check_accelerator, make_accelerator
from .optim import build_optimizers, lr_factor
from .records import LogRecord, TrainResult, append_metrics, empty_window, short, trim_metrics
from .resume import frozen_records, restore
from .signals import Interrupt

__all__ = ["Trainer", "TrainResult", "LogRecord"]
log = logging.getLogger("genkit.train")


class _LossForward(nn.Module):
    """Routes ``objective.loss`` through ``forward``: DDP synchronises gradients and accelerate autocasts there.
    A model outside the objective is a submodule too, so DDP sees its parameters."""

    def __init__(self, objective: nn.Module, model: nn.Module):
        super().__init__()
        self.model = objective
        if model is not objective:
            self.trained = model

    def forward(self, batch: Any, generator: torch.Generator, update: str | None = None) -> Any:
        if update is None:
            return self.model.loss(batch, generator=generator)
        return self.model.loss(batch, generator=generator, update=update)


Callback = Callable[["Trainer", LogRecord], None]


def _mean_logs(micro: list[dict[str, Any]]) -> dict[str, float]:
    """Each key's mean over the micro-batches of a step that reported it."""
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for logs in micro:
        for key, value in logs.items():
            sums[key] = sums.get(key, 0.0) + float(value)
            counts[key] = counts.get(key, 0) + 1
    return {key: v / counts[key] for key, v in sums.items()}


def _check_classes(data: LabelledData, model: nn.Module) -> None:
    """A DataError when labelled data does not fit the model's classes (read by attribute: no family import)."""
    k = getattr(model, "num_classes", None)
    if k is None:
        raise DataError(f"the data is labelled ({data.num_classes} classes) but {type(model).__name__} is not "
                        "class-conditional (num_classes None); pass the samples alone (data.data) or build a "
                        f"class-conditional model (num_classes={data.num_classes})")
    if k != data.num_classes:
        raise DataError(f"the data has {data.num_classes} classes but the model was built for num_classes={k}; "
                        "build it with the data's class count")
    names = getattr(model, "class_names", None)
    if names is not None and data.class_names is not None and list(names) != list(data.class_names):
        raise DataError(f"the model's class_names {list(names)[:4]}... differ from the data's "
                        f"{data.class_names[:4]}...; build the model with class_names=data.class_names")



class Trainer:
    """Trains ``objective`` (an ``nn.Module`` with ``loss(batch, generator=None)``; its model has ``config()``).

    The objective contract (a separate ``model``, ``data_free``, ``param_groups()``, several ``optimizers()``
    with ``update(step)``, frozen parts) is in :mod:`genkit.objective`. ``trainer.model`` is the raw model (what
    the checkpoint saves), ``trainer.objective`` the objective; ``trainer.optimizer`` / ``trainer.scheduler``
    the first optimizer and its schedule, ``trainer.optimizers`` / ``trainer.schedulers`` all by name.

    ``callbacks`` run on every process at each log step as ``callback(trainer, record)``: they may use
    collectives (e.g. sharded sampling) and should write files only when ``record.is_main_process``.
    Supports one device and DDP; a loss that leaves parameters unused needs an ``accelerator`` built with
    ``DistributedDataParallelKwargs(find_unused_parameters=True)``, which the trainer's own accelerator has for an
    objective with several optimizers (:func:`~genkit.train.make_accelerator`).
    """

    def __init__(self, model: nn.Module, config: TrainConfig, *, accelerator: Any = None,
                 callbacks: Sequence[Callback] = ()):
        if not isinstance(model, nn.Module) or not callable(getattr(model, "loss", None)):
            raise ConfigError(
                f"Trainer needs an nn.Module with loss(batch, generator=None); got {type(model).__name__}")
        if not isinstance(config, TrainConfig):
            raise ConfigError(f"config must be a TrainConfig; got {type(config).__name__} (use TrainConfig.from_dict)")
        self.objective = checkpoint.unwrap(model)
        self.model = checkpoint.unwrap(model_of(self.objective))
        self.family = checkpoint.model_config(self.model)["family"]  # fail now, not at the first save
        self.config, self.callbacks, self._fitted = config, list(callbacks), False
        self.accelerator = accelerator if accelerator is not None else make_accelerator(config, self.objective)
        check_accelerator(self.accelerator, config, self.objective)
        acc = self.accelerator
        self._opts = build_optimizers(self.objective, self.model, config, acc.device)
        self._fused, self._lr_factor = self._opts.fused, lr_factor(config)
        names = list(self._opts.raw)
        prepared = acc.prepare(_LossForward(self.objective, self.model), *self._opts.raw.values())
        self._forward, wrapped = prepared[0], prepared[1:]
        self.optimizers = dict(zip(names, wrapped))
        self.schedulers = self._opts.schedulers
        self.optimizer, self.scheduler = wrapped[0], self._opts.schedulers[names[0]]
        self._multi = len(names) > 1
        self.ema = EMA(self.model, config.ema_decay) if config.ema_decay is not None else None
        model_params = {id(p) for p in self.model.parameters()}
        self._moves_model = {n: any(id(p) in model_params for p in ps) for n, ps in self._opts.params.items()}
        self._params = self._opts.params[names[0]]
        # Without a grad scaler accelerate's optimizer wrapper only forwards step/zero_grad (after per-call
        # package look-ups and signature inspection); call the optimizer itself then.
        self._raw = {n: (o.optimizer if acc.scaler is None else o) for n, o in self.optimizers.items()}
        self._raw_opt = self._raw[names[0]]
        self._lr, self._last_grad_norm, self._clock = config.lr, math.nan, (time.perf_counter(), 0)
        self._interrupt, self._stop, self._skipped_logged = Interrupt(), False, 0

    def _modules_with_parts(self) -> tuple[nn.Module, ...]:
        return (self.objective,) if self.model is self.objective else (self.objective, self.model)

    def fit(self, data: Tensor | Dataset | BatchSource | None = None, *, resume: bool = True,
            resume_from: str | Path | None = None, allow_new_settings: bool = False,
            frozen_loader: Callable[[str], Any] | None = None) -> TrainResult:
        """Train until ``config.steps`` and return a :class:`TrainResult`; puts the objective in train mode.

        ``data`` is a Tensor ``[n, ...]`` (any dtype: integer tokens too), a map-style Dataset, a
        :class:`~genkit.data.LabelledData` (batches ``(x, labels)`` for a class-conditional model), a batch source
        (``batch(step, rank, generator)``), or None for an objective that declares ``data_free = True``.
        Resumes from ``out_dir/checkpoint`` when it holds a resume state (``resume=False`` starts afresh and
        overwrites it), or from ``resume_from``. A resumed run continues the saved one exactly; settings that
        would change that (:func:`resume_changes`) are a ConfigError unless ``allow_new_settings=True``, a
        changed frozen part a CheckpointError; a frozen part recorded by folder and not attached is reloaded
        with ``frozen_loader`` (e.g. ``genkit.load``). Raising ``steps`` is allowed and recomputes the LR
        schedule for the new total (logged with the LR jump). Each log step appends to ``out_dir/metrics.jsonl``,
        then the checkpoint (if due) is written, then the callbacks run. SIGINT / SIGTERM save a checkpoint
        after the current step and raise :class:`~genkit.errors.TrainingInterrupted`.
        """
        if self._fitted:
            raise ConfigError("Trainer.fit was already called; build a new Trainer for another run")
        self._fitted = True
        cfg, acc = self.config, self.accelerator
        out = Path(cfg.out_dir)
        ckpt = out / "checkpoint"
        batches = make_batches(data, self.objective, cfg, acc.num_processes, acc.process_index)
        if isinstance(data, Tensor):
            check_data(data, acc)
        if isinstance(data, LabelledData):
            _check_classes(data, self.model)
            if isinstance(data.data, Tensor):
                check_data(data.data, acc)
        run: dict[str, Any] = {"step": 0, "skipped": 0, "window": empty_window()}
        source = Path(resume_from) if resume_from is not None else ckpt
        if resume_from is not None and not checkpoint.has_resume_state(source):
            raise CheckpointError(
                f"resume_from={str(source)!r} holds no checkpoint with a resume state; check the path")
        if resume or resume_from is not None:
            if checkpoint.has_resume_state(source):
                run = restore(self, source, allow_new_settings, frozen_loader)
            elif source.exists():
                raise ConfigError(f"{source} exists but holds no resume state; pass resume=False to overwrite it "
                                  "or choose another out_dir")
        start = run["step"]
        if start > cfg.steps:
            raise ConfigError(f"the checkpoint is at step {start}, past TrainConfig.steps={cfg.steps}; raise steps "
                              "or start a fresh run (resume=False or another out_dir)")
        if acc.is_main_process:
            out.mkdir(parents=True, exist_ok=True)
            trim_metrics(out / "metrics.jsonl", start)
        log.info("training %s: steps %d..%d, global batch %d (%d x %d processes x %d accumulated), precision %s, "
                 "device %s", self.family, start, cfg.steps, batches.glob * cfg.gradient_accumulation_steps,
                 cfg.batch_size, acc.num_processes, cfg.gradient_accumulation_steps, cfg.mixed_precision, acc.device)
        self._forward.train()  # a family that keeps parts frozen in eval mode does so in its own train()
        bar = tqdm(total=cfg.steps, initial=start, desc="train", dynamic_ncols=True,
                   disable=not (acc.is_main_process and cfg.progress))
        losses: list[tuple[int, float]] = []
        self._clock, self._skipped_logged = (time.perf_counter(), start), run["skipped"]
        try:
            with self._interrupt:
                micro = cfg.gradient_accumulation_steps
                it = batches.iterate(start * micro, cfg.steps * micro, acc.device)  # micro-batches
                for k in range(start, cfg.steps):
                    self._step(k, it, run, first=k == start)
                    bar.update(1)
                    s = run["step"] = k + 1
                    record = None
                    if s % cfg.log_every == 0 or s == cfg.steps:
                        record = self._log(s, run, batches.glob * micro, out / "metrics.jsonl")
                        losses.append((s, record.loss))
                        bar.set_postfix(loss=f"{record.loss:.4g}", samples_s=short(record.samples_per_s))
                    saved = (cfg.checkpoint_every and s % cfg.checkpoint_every == 0) or s == cfg.steps
                    if saved or self._stop:
                        self._save(ckpt, run)
                    if self._stop:
                        break
                    for callback in self.callbacks if record is not None else ():
                        callback(self, record)
        finally:
            bar.close()
        signum = self._interrupt.signum
        if self._stop:
            name = signal.Signals(signum).name if signum is not None else "a signal on another rank"
            step = run["step"]
            raise TrainingInterrupted(f"training stopped by {name} at step {step} of {cfg.steps}; the checkpoint "
                                      f"{ckpt} holds step {step}: run the same command (or fit again) to resume",
                                      step, ckpt, signum)
        if signum is not None:  # it came after the last step was agreed on: the run is complete and saved, so
            signal.raise_signal(signum)  # the signal now does what it would have done without the trainer
        return TrainResult(step=run["step"], losses=losses, checkpoint=ckpt if start < cfg.steps else source,
                           ema=self.ema.state_dict() if self.ema is not None else None, skipped=run["skipped"])

    # --- one step: loss, the collective, the non-finite policy, backward, update, log window ---------------
    def _step(self, k: int, it: Iterator[Any], run: dict[str, Any], first: bool = False) -> None:
        """Optimizer step ``k`` over ``gradient_accumulation_steps`` micro-batches drawn from ``it``: each but the
        last is backpropagated at once (``loss / A``, no DDP gradient sync); the last waits for the step's one
        collective, which judges the mean micro-batch loss, then syncs the accumulated gradients."""
        cfg, acc = self.config, self.accelerator
        micro = cfg.gradient_accumulation_steps
        name = self._opts.check_update(self.objective.update(k), k, self.objective) if self._multi else None
        done: list[Tensor] = []
        micro_logs: list[dict[str, Any]] = []
        ok = torch.ones((), dtype=torch.bool, device=acc.device)
        for i in range(micro):
            m = k * micro + i
            seed_global(derive_seed(cfg.seed, GLOBAL, m, acc.process_index), acc.device)  # dropout etc.
            batch = to_device(next(it), acc.device)
            if first and i == 0 and acc.is_main_process:
                warn_scale(batch)  # once per fit, on its first batch
            last = i == micro - 1
            with contextlib.nullcontext() if last else acc.no_sync(self._forward):
                loss, logs = self._loss(m, batch, name)
                ok = ok & finite(batch, acc.device)
                micro_logs.append(logs)
                if not last:
                    acc.backward(loss / micro)
                    done.append(loss.detach())
        if micro > 1:
            logs = _mean_logs(micro_logs)
            step_loss = torch.stack([*done, loss.detach()]).float().mean()
            loss = loss / micro
        else:
            step_loss = loss
        per_rank = self._agree(k, step_loss, ok)
        what, grad_norm = ("loss" if not all(map(math.isfinite, per_rank)) else None), math.nan
        if what is None:
            grad_norm = self._backward(loss, name)
            if self.config.mixed_precision != "fp16" and not math.isfinite(grad_norm):  # fp16: the scaler skips
                what = "gradient norm"
        self._lr = (self.optimizers[name] if name else self.optimizer).param_groups[0]["lr"]
        if what is not None:
            self._drop(k, what, per_rank, grad_norm, run)
        else:
            self._update(name)
            self._window(run, per_rank, logs, grad_norm)
        if self._multi:
            with warnings.catch_warnings():  # an optimizer whose turn has not come yet is not a misordered step
                warnings.filterwarnings("ignore", "Detected call of `lr_scheduler", UserWarning)
                for scheduler in self.schedulers.values():
                    scheduler.step()
        else:
            self.scheduler.step()  # the schedule is a function of the step, skipped or not

    def _loss(self, k: int, batch: Any, update: str | None) -> tuple[Tensor, dict[str, Any]]:
        """The objective's loss on ``batch`` with the step's generator, checked for shape."""
        cfg, acc = self.config, self.accelerator
        device = acc.device if batch is None else next(tensors(batch), torch.empty(0, device=acc.device)).device
        gen = torch.Generator(device=device).manual_seed(derive_seed(cfg.seed, NOISE, k, acc.process_index))
        out = self._forward(batch, gen) if update is None else self._forward(batch, gen, update)
        if not (isinstance(out, (tuple, list)) and len(out) == 2 and isinstance(out[1], dict)):
            raise ShapeError(f"{type(self.objective).__name__}.loss must return (loss, logs: dict); got "
                             f"{type(out).__name__}")
        loss, logs = out
        if not isinstance(loss, Tensor) or loss.dim() != 0:
            raise ShapeError(f"{type(self.objective).__name__}.loss must return a scalar tensor; got "
                             f"{tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__}")
        return loss, logs

    def _agree(self, k: int, loss: Tensor, ok: Tensor) -> list[float]:
        """The one collective (and host sync) of a step: every rank's loss, whether its batches were finite
        (``ok``) and whether a signal is pending. Sets ``_stop``; returns the losses per rank; bad data is a
        DataError."""
        acc = self.accelerator
        parts = [loss.detach().float(), ok.to(loss.device).float()]
        if acc.num_processes > 1:  # one collective decides for all ranks, a pending signal included
            parts.append(torch.full((), float(self._interrupt.signum is not None), device=loss.device))
            stats = acc.gather(torch.stack(parts)).tolist()
            self._stop = any(stats[2::3])
        else:
            stats = torch.stack(parts).tolist()
            self._stop = self._interrupt.signum is not None
        n = len(parts)
        per_rank, oks = stats[0::n], stats[1::n]
        if min(oks) < 1:
            raise DataError(f"the batch of step {k + 1} contains NaN/inf values (rank(s) "
                            f"{[r for r, o in enumerate(oks) if o < 1]}); clean or filter the data")
        return per_rank

    def _backward(self, loss: Tensor, update: str | None) -> float:
        """Backward, then clip the updated optimizer's gradients; returns their global norm."""
        self.accelerator.backward(loss)
        return self._clip_grads(self._params if update is None else self._opts.params[update])

    def _clip_grads(self, params: Sequence[Tensor] | None = None) -> float:
        """Clip (if configured) and return the global gradient norm; NaN when unknown (fp16 without clipping)."""
        cfg, params = self.config, self._params if params is None else params
        if cfg.grad_clip is not None:
            # accelerate's clip_grad_norm_ is unscale + torch's for the distributed types Trainer accepts
            self.accelerator.unscale_gradients()
            return float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip))
        if cfg.mixed_precision == "fp16":
            return math.nan
        grads = [p.grad.detach().float() for p in params if p.grad is not None]
        return float(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))) if grads else 0.0

    def _zero_grad(self) -> None:
        if self._multi:  # a step's loss may reach every optimizer's parameters: clear them all
            for opt in self._raw.values():
                opt.zero_grad(set_to_none=True)
        else:
            self._raw_opt.zero_grad(set_to_none=True)

    def _drop(self, k: int, what: str, per_rank: list[float], grad_norm: float, run: dict[str, Any]) -> None:
        """The non-finite policy: drop the step, or raise (``nonfinite="stop"``, or ``nonfinite_patience`` hit)."""
        cfg = self.config
        self._zero_grad()
        streak = run["streak"] = run.get("streak", 0) + 1
        if cfg.nonfinite == "stop" or streak >= cfg.nonfinite_patience:
            ckpt = Path(cfg.out_dir) / "checkpoint"
            kept = (f"the checkpoint {ckpt} (step {run['step']} or earlier) is intact"
                    if checkpoint.has_resume_state(ckpt) else "no checkpoint had been written yet")
            why = ("" if cfg.nonfinite == "stop" else
                   f", {streak} such steps in a row (nonfinite_patience={cfg.nonfinite_patience}): "
                   "the run has diverged")
            raise NonFiniteLossError(
                f"non-finite {what} at step {k + 1}{why} (loss per rank: {per_rank}, grad norm {grad_norm}); "
                f"lower lr (now {self._lr:.3g}), check the data and the model"
                + (", or drop such steps with TrainConfig(nonfinite='skip') (train/train.py: --nonfinite skip)"
                   if cfg.nonfinite == "stop" else "") + f"; {kept}")
        run["skipped"] += 1

    def _update(self, update: str | None) -> None:
        """The optimizer step (the one ``update`` names), then the EMA when the model moved."""
        if update is None:
            self._raw_opt.step()
            self._raw_opt.zero_grad(set_to_none=True)
            if self.ema is not None and not self.optimizer.step_was_skipped:
                self.ema.update()
            return
        self._raw[update].step()
        self._zero_grad()
        if self.ema is not None and self._moves_model[update] and not self.optimizers[update].step_was_skipped:
            self.ema.update()

    def _window(self, run: dict[str, Any], per_rank: list[float], logs: dict[str, Any], grad_norm: float) -> None:
        """Add a kept step to the log window."""
        run["streak"] = 0
        w = run["window"]
        w["loss"] += sum(per_rank) / len(per_rank)
        w["n"] += 1
        sums, counts = w["logs"], w["counts"]
        for key, value in logs.items():
            sums[key] = sums.get(key, 0.0) + float(value)
            counts[key] = counts.get(key, 0) + 1
        self._last_grad_norm = grad_norm

    # --- logs and checkpoints -------------------------------------------------------------------------------
    def _log(self, s: int, run: dict[str, Any], glob: int, path: Path) -> LogRecord:
        w, acc = run["window"], self.accelerator
        now, (then, since) = time.perf_counter(), self._clock
        self._clock = (now, s)
        record = LogRecord(step=s, loss=w["loss"] / w["n"] if w["n"] else math.nan, lr=self._lr,
                           grad_norm=self._last_grad_norm,
                           samples_per_s=(s - since) * glob / max(now - then, 1e-9), skipped=run["skipped"],
                           logs={k: v / w["counts"][k] for k, v in w["logs"].items()},
                           is_main_process=acc.is_main_process)
        run["window"] = empty_window()
        if run["skipped"] > self._skipped_logged and acc.is_main_process:
            log.warning("skipped %d non-finite step(s) of the last %d (%d in all); lower lr if this goes on",
                        run["skipped"] - self._skipped_logged, s - since, run["skipped"])
        self._skipped_logged = run["skipped"]
        if acc.is_main_process:
            append_metrics(path, record)
        return record

    def _save(self, ckpt: Path, run: dict[str, Any]) -> None:
        acc = self.accelerator
        ranks = None
        if acc.num_processes > 1 and has_run_state(self.objective, self.model):  # every rank's, to the main one
            ranks = [None] * acc.num_processes
            mine = {k: v.cpu() for k, v in run_state(self.objective, self.model).items()}
            torch.distributed.all_gather_object(ranks, mine)
        if acc.is_main_process:
            import accelerate

            state = {**run, "ema_updates": self.ema.updates if self.ema is not None else 0,
                     "grad_scaler": acc.scaler.state_dict() if acc.scaler is not None else None,
                     "world_size": acc.num_processes, "train_config": self.config.to_dict(),
                     "accelerate_version": accelerate.__version__,
                     "frozen": frozen_records(*self._modules_with_parts()),
                     "objective_config": objective_config(self.objective, self.model),
                     "optimizer_groups": self._opts.specs(),
                     "run_state_ranks": 1 if ranks is None else len(ranks)}  # whose run state the checkpoint holds
            single = not self._multi
            checkpoint.save(ckpt, self.model, ema=self.ema.state_dict() if self.ema is not None else None,
                            optimizer=self.optimizer if single else self.optimizers,
                            scheduler=self.scheduler if single else self.schedulers, trainer_state=state,
                            objective_state=objective_state(self.objective, self.model, ranks))
        acc.wait_for_everyone()
