"""Parameter groups, optimizers (AdamW, one or several by name) and the LR schedule of the trainer.

The schedule factor warms up linearly over ``warmup_steps`` (reaching 1 at the last of them), then follows a
cosine down to ``min_lr_ratio`` at the final step; a group's LR is ``TrainConfig.lr * lr_scale * factor(k)``.
Every optimizer's scheduler steps every training step, so the LR is a function of the step alone.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from ..objective import ParamGroup, default_groups
from .config import TrainConfig

__all__ = ["Optimizers", "lr_factor", "resolve_groups", "resolve_optimizers", "build_optimizers"]

_FUSED_ADAMW_DEVICES = ("cpu", "cuda") if torch.__version__ >= "2.4" else ("cuda",)  # TorchVersion: a version compare
DEFAULT = "main"  # the name of the one optimizer of an objective that declares none


def lr_factor(cfg: TrainConfig) -> Callable[[int], float]:
    """The schedule factor of step ``k`` (0-based): linear warm-up, then cosine to ``min_lr_ratio``."""
    warmup, total, floor = cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio

    def factor(k: int) -> float:
        if k < warmup:
            return (k + 1) / warmup
        progress = min(1.0, (k + 1 - warmup) / max(1, total - warmup))  # min_lr at the last step
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def _trainable(*modules: nn.Module) -> list[nn.Parameter]:
    seen: set[int] = set()
    out = []
    for m in modules:
        for p in m.parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    return out


def resolve_groups(objective: nn.Module, model: nn.Module) -> list[ParamGroup]:
    """``objective.param_groups()`` (or :func:`~genkit.objective.default_groups`), checked: unique names, each
    trainable parameter in exactly one group, no frozen one."""
    name = type(objective).__name__
    params = _trainable(objective, model)
    if not params:
        raise ConfigError(f"{name} has no parameters with requires_grad=True; nothing to train")
    declared = getattr(objective, "param_groups", None)
    groups = list(declared()) if callable(declared) else default_groups(params)
    if not groups or not all(isinstance(g, ParamGroup) for g in groups):
        raise ConfigError(f"{name}.param_groups() must return a non-empty list of genkit.objective.ParamGroup; "
                          f"got {groups!r}")
    names = [g.name for g in groups]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"{name}.param_groups() names {dup} more than once; give each group its own name")
    owner: dict[int, str] = {}
    for g in groups:
        for p in g.params:
            if not p.requires_grad:
                raise ConfigError(f"group {g.name!r} of {name} holds a parameter with requires_grad=False (shape "
                                  f"{tuple(p.shape)}); leave frozen parameters out of param_groups()")
            if id(p) in owner:
                raise ConfigError(f"a parameter (shape {tuple(p.shape)}) is in groups {owner[id(p)]!r} and "
                                  f"{g.name!r} of {name}; put each parameter in one group")
            owner[id(p)] = g.name
    left = [tuple(p.shape) for p in params if id(p) not in owner]
    if left:
        raise ConfigError(f"{len(left)} trainable parameter(s) of {name} are in no group (shapes {left[:4]}); add "
                          "them to a group of param_groups() or set requires_grad=False")
    return groups


def resolve_optimizers(objective: nn.Module, groups: Sequence[ParamGroup]) -> dict[str, list[ParamGroup]]:
    """``objective.optimizers()`` (``{name: [group names]}``, default one optimizer over all groups), checked:
    known group names, each group in exactly one optimizer, ``update(step)`` declared for several."""
    name = type(objective).__name__
    declared = getattr(objective, "optimizers", None)
    if not callable(declared):
        return {DEFAULT: list(groups)}
    spec = declared()
    by_name = {g.name: g for g in groups}
    if not isinstance(spec, dict) or not spec:
        raise ConfigError(f"{name}.optimizers() must return a non-empty dict {{optimizer name: [group names]}}; "
                          f"got {spec!r}")
    out: dict[str, list[ParamGroup]] = {}
    used: dict[str, str] = {}
    for opt, members in spec.items():
        if not (isinstance(opt, str) and opt and opt.replace("_", "a").replace("-", "a").isalnum()):
            raise ConfigError(f"{name}.optimizers(): optimizer name {opt!r} is invalid; use letters, digits, _, -")
        if isinstance(members, str) or not members:
            raise ConfigError(f"{name}.optimizers()[{opt!r}] must list group names, e.g. ['critic']; got "
                              f"{members!r}")
        for g in members:
            if g not in by_name:
                raise ConfigError(f"{name}.optimizers()[{opt!r}] names unknown parameter group {g!r}; known "
                                  f"groups: {sorted(by_name)}")
            if g in used:
                raise ConfigError(f"parameter group {g!r} is in optimizers {used[g]!r} and {opt!r} of {name}; "
                                  "give each group one optimizer")
            used[g] = opt
        out[opt] = [by_name[g] for g in members]
    left = sorted(set(by_name) - set(used))
    if left:
        raise ConfigError(f"parameter group(s) {left} of {name} are in no optimizer; add them to optimizers()")
    if len(out) > 1 and not callable(getattr(objective, "update", None)):
        raise ConfigError(f"{name} declares optimizers {sorted(out)} but no update(step) -> name saying which "
                          "one each step updates; add it")
    return out


@dataclass
class Optimizers:
    """The trainer's optimizers by name (raw torch ones), their LR schedulers, each group's spec and params."""

    raw: dict[str, torch.optim.Optimizer]
    schedulers: dict[str, Any]
    groups: dict[str, list[ParamGroup]]  # the non-empty groups, in each optimizer's param_groups order
    params: dict[str, list[nn.Parameter]] = field(default_factory=dict)
    fused: bool = False

    def check_update(self, name: Any, step: int, objective: Any) -> str:
        if name not in self.raw:
            raise ConfigError(f"{type(objective).__name__}.update({step}) returned {name!r}, not one of its "
                              f"optimizers {sorted(self.raw)}")
        return name

    def apply_settings(self, cfg: TrainConfig, factor: Callable[[int], float], step: int) -> None:
        """Put ``cfg``'s lr, betas and weight decay into loaded optimizers (resume with new settings)."""
        for name, opt in self.raw.items():
            specs = self.groups[name]
            self.schedulers[name].base_lrs = [cfg.lr * g.lr_scale for g in specs]
            for group, g in zip(opt.param_groups, specs):
                base = cfg.lr * g.lr_scale
                group["initial_lr"], group["lr"], group["betas"] = base, base * factor(step), cfg.betas
                group["weight_decay"] = cfg.weight_decay if g.weight_decay is None else g.weight_decay

    def specs(self) -> dict[str, list[dict[str, Any]]]:
        """What each optimizer's groups are (name, lr_scale, weight_decay, parameter count): recorded with the
        resume state, so a resume whose ``param_groups()`` / ``optimizers()`` changed is caught."""
        return {name: [{"group": g.name, "lr_scale": float(g.lr_scale), "weight_decay": g.weight_decay,
                        "params": len(g.params)} for g in groups] for name, groups in self.groups.items()}

    def set_kernels(self) -> None:
        for opt in self.raw.values():  # loaded groups keep the saving run's kernel choice: e.g. a fused run
            for group in opt.param_groups:  # resumed under fp16, whose scaler can't use it
                group["fused"] = True if self.fused else None


def build_optimizers(objective: nn.Module, model: nn.Module, cfg: TrainConfig, device: torch.device) -> Optimizers:
    """AdamW per declared optimizer over its groups, with a LambdaLR of :func:`lr_factor` each."""
    spec = resolve_optimizers(objective, resolve_groups(objective, model))
    params = [p for groups in spec.values() for g in groups for p in g.params]
    # One fused AdamW kernel: the same update, ~3x faster than torch's CPU default. Not under fp16, where the
    # grad scaler calls a fused step even on overflow and accelerate could not tell the EMA it was skipped.
    fused = (cfg.mixed_precision != "fp16" and device.type in _FUSED_ADAMW_DEVICES
             and all(p.is_floating_point() for p in params))
    factor = lr_factor(cfg)
    raw, schedulers, kept, per_opt = {}, {}, {}, {}
    for name, groups in spec.items():
        kept[name] = [g for g in groups if g.params]
        if not kept[name]:
            raise ConfigError(f"optimizer {name!r} of {type(objective).__name__} has no parameters (its groups "
                              f"{[g.name for g in groups]} are empty)")
        torch_groups = [{"params": list(g.params), "lr": cfg.lr * g.lr_scale,
                         "weight_decay": cfg.weight_decay if g.weight_decay is None else g.weight_decay}
                        for g in kept[name]]
        raw[name] = torch.optim.AdamW(torch_groups, lr=cfg.lr, betas=cfg.betas, fused=fused or None)
        schedulers[name] = torch.optim.lr_scheduler.LambdaLR(raw[name], factor)
        per_opt[name] = [p for g in kept[name] for p in g.params]
    return Optimizers(raw, schedulers, kept, per_opt, fused)
