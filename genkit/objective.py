"""What the trainer asks of the thing it trains: the objective contract.

An **objective** is anything with ``loss(batch, generator=None) -> (loss, logs)``; every genkit family is one.
Everything else is optional and read by :class:`genkit.train.Trainer`:

- ``model: nn.Module``: the model the objective trains, what the checkpoint saves (``config()``, weights, EMA)
  and ``genkit.load`` rebuilds. Default: the objective itself (a family is its own model). Trained tensors of
  the objective outside ``model`` (e.g. a critic) are part of the resume state, not of the model.
- ``data_free: bool = False``: ``True`` when ``loss(None, generator)`` makes its own samples (an energy, an
  environment, a teacher); then ``fit()`` takes no data, and data given to it is an error. Such an objective's
  ``batch_size`` (an int, optional) is the samples each loss call draws, what the trainer's logs count.
- ``param_groups() -> Sequence[ParamGroup]``: how the trainable parameters are grouped. Default
  :func:`default_groups`: ``"decay"`` (tensors with 2+ dims, ``TrainConfig.weight_decay``) and ``"no_decay"``
  (biases, norm gains: 0). Every trainable parameter must be in exactly one group.
- ``optimizers() -> Mapping[str, Sequence[str]]``: several optimizers, by name, each over the named groups.
  Default: one optimizer over every group. With two or more, ``update(step) -> str`` names the optimizer step
  ``step`` (0-based) updates, and the trainer calls ``loss(batch, generator=..., update=name)``.
- ``config() -> dict`` on an objective other than its model: its settings (JSON values), recorded with the
  resume state; a resumed run with other settings is refused.
- ``run_state() -> dict[str, Tensor]`` and ``load_run_state(state)`` (on the objective or its model): training
  state that is not weights and may change size (a replay buffer, the modes found so far), saved with the
  resume state and handed back on resume (an empty dict when the checkpoint has none), so a resumed run goes
  on as the uninterrupted one. Under several processes each rank's run state is gathered to the main process
  and saved (rank ``r >= 1`` under ``run_state.rank{r}.``; the trainer state records how many ranks'), and each
  rank resumes from its own; a rank the checkpoint holds none for (a run resumed on more processes, or one saved
  before each rank's was kept) resumes from the main process's.
- frozen parts (teacher, reference, reward) in a :class:`genkit.frozen.Frozen` holder attribute.

A **batch source** replaces a dataset: ``source.batch(step, rank, generator) -> batch``, where ``generator``
is seeded from ``(seed, step, rank)`` alone, so a resumed or multi-process run draws the same batches.

With ``TrainConfig.gradient_accumulation_steps = A`` the trainer calls ``loss`` ``A`` times per optimizer step
(``update(step)`` once, with the optimizer step): ``step`` of a batch source and the seed of ``loss``'s generator
are then the micro-batch number ``k * A + i``, and an objective that counts its loss calls counts micro-batches.

>>> import torch
>>> net = torch.nn.Sequential(torch.nn.Linear(2, 4), torch.nn.LayerNorm(4))
>>> [(g.name, len(g.params), g.weight_decay) for g in default_groups(net.parameters())]
[('decay', 1, None), ('no_decay', 3, 0.0)]
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from .errors import ConfigError

__all__ = ["ParamGroup", "BatchSource", "default_groups", "model_of", "is_data_free", "is_batch_source",
           "objective_weights", "objective_state", "objective_config", "split_run_state", "load_run_state",
           "run_state", "has_run_state",
           "RUN_STATE_PREFIXES"]


@dataclass(frozen=True)
class ParamGroup:
    """A named group of parameters: the learning rate is ``lr_scale * TrainConfig.lr`` (times the schedule),
    the weight decay ``weight_decay`` (``None``: ``TrainConfig.weight_decay``)."""

    name: str
    params: Sequence[nn.Parameter]
    lr_scale: float = 1.0
    weight_decay: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ConfigError(f"ParamGroup name must be a non-empty string; got {self.name!r}")
        object.__setattr__(self, "params", tuple(self.params))
        if not all(isinstance(p, Tensor) for p in self.params):
            raise ConfigError(f"ParamGroup {self.name!r}: params must be tensors (model.parameters())")
        s = self.lr_scale
        if isinstance(s, bool) or not isinstance(s, numbers.Real) or not (math.isfinite(s) and s > 0):
            raise ConfigError(f"ParamGroup {self.name!r}: lr_scale={s!r} is invalid; use a finite number > 0")
        d = self.weight_decay
        if d is not None and (isinstance(d, bool) or not isinstance(d, numbers.Real) or not (0 <= d < math.inf)):
            raise ConfigError(f"ParamGroup {self.name!r}: weight_decay={d!r} is invalid; use a number >= 0 or None")


@runtime_checkable
class BatchSource(Protocol):
    """Makes training batches on demand (a teacher's samples, a replay buffer, an environment's rollouts)."""

    def batch(self, step: int, rank: int, generator: torch.Generator) -> Any:
        """The batch of training step ``step`` (0-based) on process ``rank``, drawn with ``generator`` only."""


def default_groups(params: Iterable[nn.Parameter]) -> list[ParamGroup]:
    """Weight decay on tensors with 2+ dimensions (``"decay"``), none on biases and norm gains (``"no_decay"``)."""
    params = [p for p in params if p.requires_grad]
    return [ParamGroup("decay", [p for p in params if p.dim() >= 2]),
            ParamGroup("no_decay", [p for p in params if p.dim() < 2], weight_decay=0.0)]


def model_of(objective: nn.Module) -> nn.Module:
    """The model ``objective`` trains: its ``model`` attribute when that is a module, else the objective."""
    model = getattr(objective, "model", None)
    return model if isinstance(model, nn.Module) else objective


def is_data_free(objective: Any) -> bool:
    """Whether ``objective`` declares ``data_free = True`` (its loss makes its own samples)."""
    flag = getattr(objective, "data_free", False)
    if not isinstance(flag, bool):
        raise ConfigError(f"{type(objective).__name__}.data_free must be True or False; got {flag!r}")
    return flag


def is_batch_source(data: Any) -> bool:
    """A batch source has a callable ``batch`` and is not a tensor or a map-style dataset."""
    return (not isinstance(data, Tensor) and callable(getattr(data, "batch", None))
            and not (hasattr(data, "__len__") and hasattr(data, "__getitem__")))


_RUN_STATE = "run_state."
#: Key prefix of the ``run_state()`` tensors in :func:`objective_state`, by owner (the main process's; rank ``r >=
#: 1``'s under ``run_state.rank{r}.`` + the owner).
RUN_STATE_PREFIXES = {"model": "run_state.model.", "objective": "run_state.objective."}


def _run_state_owners(objective: nn.Module, model: nn.Module) -> dict[str, Any]:
    owners = {"model": model} if objective is model else {"objective": objective, "model": model}
    return {k: o for k, o in owners.items() if callable(getattr(o, "run_state", None))}


def objective_weights(objective: nn.Module, model: nn.Module) -> dict[str, Tensor]:
    """The objective's ``state_dict`` entries outside ``model`` (a critic, log Z); empty when the objective is its
    own model."""
    if objective is model:
        return {}
    prefixes = tuple(f"{name}." for name, m in objective.named_modules() if m is model and name)
    return {k: v for k, v in objective.state_dict().items() if not k.startswith(prefixes)}


def has_run_state(objective: nn.Module, model: nn.Module) -> bool:
    """Whether the objective or its model keeps a ``run_state()``."""
    return bool(_run_state_owners(objective, model))


def run_state(objective: nn.Module, model: nn.Module) -> dict[str, Tensor]:
    """The ``run_state()`` of the objective and of the model, under :data:`RUN_STATE_PREFIXES` (detached)."""
    out: dict[str, Tensor] = {}
    for owner, module in _run_state_owners(objective, model).items():
        state = module.run_state()
        if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, Tensor)
                                                  for k, v in state.items()):
            raise ConfigError(f"{type(module).__name__}.run_state() must return a dict of name -> tensor; got "
                              f"{type(state).__name__}")
        out.update({RUN_STATE_PREFIXES[owner] + k: v.detach() for k, v in state.items()})
    return out


def _rank_prefix(rank: int) -> str:
    return f"{_RUN_STATE}rank{rank}."


def objective_state(objective: nn.Module, model: nn.Module,
                    ranks: Sequence[dict[str, Tensor]] | None = None) -> dict[str, Tensor] | None:
    """:func:`objective_weights` and the run state (:func:`run_state`); None when the objective is its own model
    and there is no run state. ``ranks``: every process's :func:`run_state`, by rank (rank ``r >= 1`` saved
    under ``run_state.rank{r}.``), in place of this process's. These are trained state: saved with the resume
    state, not with the model."""
    out = objective_weights(objective, model)
    for r, state in enumerate([run_state(objective, model)] if ranks is None else ranks):
        out.update(state if r == 0 else {_rank_prefix(r) + k[len(_RUN_STATE):]: v for k, v in state.items()})
    return out if out or objective is not model else None


def split_run_state(saved: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """``(weights, run state)`` of an :func:`objective_state`: the entries outside and under ``run_state.``
    (every rank's)."""
    return ({k: v for k, v in saved.items() if not k.startswith(_RUN_STATE)},
            {k: v for k, v in saved.items() if k.startswith(_RUN_STATE)})


def load_run_state(objective: nn.Module, model: nn.Module, saved: dict[str, Tensor], rank: int = 0) -> None:
    """Hand the ``run_state`` tensors ``saved`` (an :func:`objective_state`) holds for rank ``rank`` (the main
    process's for 0, those under ``run_state.rank{rank}.`` otherwise) to their owners' ``load_run_state`` (an
    empty dict to an owner it holds none for)."""
    if rank:
        own = _rank_prefix(rank)
        saved = {_RUN_STATE + k[len(own):]: v for k, v in saved.items() if k.startswith(own)}
    else:
        saved = {k: v for k, v in saved.items() if not k.startswith(f"{_RUN_STATE}rank")}
    for owner, module in _run_state_owners(objective, model).items():
        prefix = RUN_STATE_PREFIXES[owner]
        module.load_run_state({k[len(prefix):]: v for k, v in saved.items() if k.startswith(prefix)})


def objective_config(objective: nn.Module, model: nn.Module) -> dict[str, Any] | None:
    """The settings of an objective other than its model (its ``config()``), or None (none, or it is the model,
    whose config the checkpoint holds already)."""
    if objective is model or not callable(getattr(objective, "config", None)):
        return None
    config = objective.config()
    if not isinstance(config, dict):
        raise ConfigError(f"{type(objective).__name__}.config() must return a dict of JSON values; got {config!r}")
    return config
