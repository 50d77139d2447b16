"""Exponential moving average (EMA) of a model's weights, kept in float32 whatever the training dtype.

The average ``avg <- d avg + (1 - d) w`` uses the warm-up decay ``d_n = min(decay, (1 + n) / (10 + n))``
at the ``n``-th update (n = 0, 1, ...), so early averages are not dominated by the random initialisation
(the schedule of TensorFlow's ``ExponentialMovingAverage(num_updates=...)``). Floating-point parameters
are averaged; buffers and integer tensors are copied. Tied weights share one average.

>>> import torch
>>> net = torch.nn.Linear(2, 1)
>>> ema = EMA(net, decay=0.999)
>>> with torch.no_grad():
...     _ = net.weight.add_(1.0)
>>> ema.update()                      # first update: d = 1/10
>>> torch.allclose(ema.state_dict()["weight"], 0.1 * (net.weight - 1) + 0.9 * net.weight)
True
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .errors import CheckpointError, ConfigError

__all__ = ["EMA"]


class EMA:
    """fp32 EMA of ``model``'s floating-point parameters with warm-up (see the module docstring).

    ``state_dict()`` maps the model's ``state_dict`` keys to the averaged tensors (float32 for floating
    point entries), the layout of a checkpoint's ``ema.safetensors``; ``updates`` counts the updates so far
    and, with ``decay``, fixes the next decay, so a resumed average needs both (``load_state_dict``).
    The averages live on the device the model had when the EMA was built.
    """

    def __init__(self, model: nn.Module, decay: float):
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not (0.0 < decay < 1.0):
            raise ConfigError(f"EMA decay={decay!r} is invalid: use a number in (0, 1), e.g. 0.999")
        self.decay, self.updates = float(decay), 0
        self._state: dict[str, Tensor] = {}
        averaged: list[tuple[Tensor, Tensor]] = []
        self._copied: list[tuple[Tensor, Tensor]] = []
        by_id: dict[int, Tensor] = {}
        for key, live in model.state_dict(keep_vars=True).items():
            if id(live) not in by_id:  # tied weights share one average
                dtype = torch.float32 if live.is_floating_point() else live.dtype
                by_id[id(live)] = live.detach().to(dtype=dtype, copy=True)
                is_param = isinstance(live, nn.Parameter) and live.is_floating_point()
                (averaged if is_param else self._copied).append((by_id[id(live)], live))
            self._state[key] = by_id[id(live)]
        self._avg = [a for a, _ in averaged]
        self._live = [w for _, w in averaged]

    def current_decay(self) -> float:
        """The decay the next :meth:`update` uses."""
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self) -> None:
        """Move the averages towards the model's current weights (one fused op for all parameters)."""
        weight = 1.0 - self.current_decay()
        if self._avg:
            live = [w.detach() if w.dtype == torch.float32 else w.detach().float() for w in self._live]
            # torch's multi-tensor lerp (what torch.optim uses internally): same arithmetic as a per-tensor
            # lerp_, without one Python-level kernel launch per parameter.
            torch._foreach_lerp_(self._avg, live, weight)
        for avg, live in self._copied:
            avg.copy_(live.detach())
        self.updates += 1

    def state_dict(self) -> dict[str, Tensor]:
        """The averaged tensors by the model's ``state_dict`` keys (the live averages, not copies)."""
        return dict(self._state)

    def load_state_dict(self, state: dict[str, Tensor], updates: int | None = None) -> None:
        """Copy saved averages in place (keys must match the model's); ``updates`` restores the warm-up."""
        if set(state) != set(self._state):
            diff = sorted(set(state) ^ set(self._state))[:8]
            raise CheckpointError(f"EMA state keys differ from the model's (e.g. {diff}); load the EMA of the "
                                  "same model")
        for key, value in state.items():
            self._state[key].copy_(value)
        if updates is not None:
            if isinstance(updates, bool) or not isinstance(updates, int) or updates < 0:
                raise CheckpointError(f"EMA updates={updates!r} is invalid: use a count >= 0")
            self.updates = updates

    def __repr__(self) -> str:
        return f"EMA(decay={self.decay}, updates={self.updates}, tensors={len(self._state)})"

