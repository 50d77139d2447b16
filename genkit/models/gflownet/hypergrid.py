"""The hypergrid environment (Bengio et al. 2021, arXiv 2106.04399; Malkin et al. 2022, arXiv 2201.13259;
METHODS.md section 10).

States are points ``x`` of ``{0, ..., H-1}^D`` (``H = height``, ``D = ndim``), starting at the origin; forward
action ``i < D`` adds 1 to coordinate ``i`` (allowed while ``x_i < H - 1``), action ``D`` exits (always allowed,
so every state is a terminal object); backward action ``i`` subtracts 1 from coordinate ``i``. The reward is

    R(x) = R0 + R1 prod_i 1[0.25 < |x_i / (H-1) - 0.5| <= 0.5] + R2 prod_i 1[0.3 < |x_i / (H-1) - 0.5| < 0.4]

with ``R1 = 0.5``, ``R2 = 2`` and ``R0`` in {0.1, 0.01, 0.001} (smaller: modes harder to find); ``R0`` must be
> 0. The modes are the states of the highest reward, ``R0 + R1 + R2`` (``2^D`` corner regions).

The policy reads ``encoding="khot"`` (the default: one one-hot of ``H`` values per coordinate, ``D * H``
features, as torchgfn's hypergrid examples), ``"onehot"`` (one of ``H^D``) or ``"identity"`` (the coordinates).

>>> env = HyperGrid(ndim=2, height=3)
>>> env.forward_mask(torch.tensor([[2, 0]])).tolist()
[[False, True, True]]
>>> env.all_states().shape, env.max_actions
(torch.Size([9, 2]), 5)
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ...errors import ConfigError
from .env import ENVIRONMENTS, Environment, check_linear_reward

__all__ = ["HyperGrid", "ENCODINGS"]

ENCODINGS = ("khot", "onehot", "identity")


def _int_at_least(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ConfigError(f"hypergrid {name} must be an integer >= {low}; got {value!r}")
    return int(value)


@ENVIRONMENTS.register("hypergrid")
class HyperGrid(Environment):
    """``HyperGrid(ndim=2, height=8, r0=0.1, r1=0.5, r2=2.0, encoding="khot", validate=True)``."""

    name = "hypergrid"
    enumerable = True
    intermediate_reward = True  # every state is a terminal object

    def __init__(self, ndim: int = 2, height: int = 8, *, r0: float = 0.1, r1: float = 0.5, r2: float = 2.0,
                 encoding: str = "khot", validate: bool = True):
        super().__init__(validate=validate)
        self.ndim = _int_at_least("ndim", ndim, 1)
        self.height = _int_at_least("height", height, 2)
        for key, value in (("r0", r0), ("r1", r1), ("r2", r2)):
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0:
                raise ConfigError(f"hypergrid {key} must be a finite number >= 0; got {value!r}")
        if r0 <= 0:
            raise ConfigError(f"hypergrid r0 must be > 0 (R(x) >= r0 everywhere; a GFlowNet needs R > 0 to train on "
                              f"log R); got r0={r0!r}. The papers use 0.1, 0.01 or 0.001")
        self.r0, self.r1, self.r2 = float(r0), float(r1), float(r2)
        if encoding not in ENCODINGS:
            raise ConfigError(f"unknown hypergrid encoding {encoding!r}; choose one of {ENCODINGS}")
        self.encoding = encoding
        self.state_shape = (self.ndim,)
        self.n_actions = self.ndim + 1
        self.n_backward = self.ndim
        self.max_actions = self.ndim * (self.height - 1) + 1
        self.n_states = self.height ** self.ndim
        self.input_dim = {"khot": self.ndim * self.height, "onehot": self.n_states, "identity": self.ndim}[encoding]

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "ndim": self.ndim, "height": self.height, "r0": self.r0, "r1": self.r1,
                "r2": self.r2, "encoding": self.encoding}

    def initial(self, n: int, device: Any = None) -> Tensor:
        return torch.zeros(n, self.ndim, dtype=torch.long, device=device)

    def forward_mask(self, states: Tensor) -> Tensor:
        exit_ = torch.ones(len(states), 1, dtype=torch.bool, device=states.device)
        return torch.cat([states < self.height - 1, exit_], dim=1)

    def backward_mask(self, states: Tensor) -> Tensor:
        return states > 0

    def _step(self, states: Tensor, actions: Tensor) -> Tensor:
        return states + F.one_hot(actions, self.ndim)

    def advance(self, states: Tensor, actions: Tensor, moving: Tensor) -> Tensor:
        """``+1`` in each moving row's coordinate, in one batched op (the exit column of the one-hot is dropped)."""
        return states + F.one_hot(torch.where(moving, actions, self.ndim), self.ndim + 1)[:, :self.ndim]

    def _backward_step(self, states: Tensor, actions: Tensor) -> Tensor:
        return states - F.one_hot(actions, self.ndim)

    def backward_action(self, states: Tensor, actions: Tensor) -> Tensor:
        return actions

    def forward_action(self, states: Tensor, backward_actions: Tensor) -> Tensor:
        return backward_actions

    def _log_reward(self, x: Tensor) -> Tensor:
        return check_linear_reward(self.reward(x), "hypergrid reward")

    def reward(self, x: Tensor) -> Tensor:
        """``[n]`` ``R(x)`` in linear space (float64). The bands are decided in integers, ``a = |x_i / (H-1) - 0.5|
        = d / D`` with ``d = |2 x_i - (H-1)|`` and ``D = 2 (H-1)``, so a point on a band's edge (``a = 0.3`` at
        ``x_i = 3`` and ``12`` of ``H = 16``) is outside it exactly as the strict inequality says; in floating point
        ``12 / 15 - 0.5`` rounds to ``0.30000000000000004`` and would fall inside (``x_i = 3`` would not)."""
        d = (2 * x - (self.height - 1)).abs()
        D = 2 * (self.height - 1)
        band1 = ((4 * d > D) & (2 * d <= D)).all(1)
        band2 = ((10 * d > 3 * D) & (10 * d < 4 * D)).all(1)
        return self.r0 + self.r1 * band1.double() + self.r2 * band2.double()

    def to_input(self, states: Tensor) -> Tensor:
        if self.encoding == "khot":
            return F.one_hot(states, self.height).flatten(1).float()
        if self.encoding == "onehot":
            return F.one_hot(self.index(states), self.n_states).float()
        return states.float()

    def _contains(self, states: Tensor) -> Tensor:
        return ((states >= 0) & (states < self.height)).all(1)

    def index(self, states: Tensor) -> Tensor:
        weights = self.height ** torch.arange(self.ndim - 1, -1, -1, device=states.device)
        return (states * weights).sum(1)

    def all_states(self) -> Tensor:
        """Every grid point, in row-major index order (a point's parents have smaller coordinate sums, and the
        order is topological because each parent ``x - e_i`` has a smaller index)."""
        idx = torch.arange(self.n_states)
        digits = [(idx // self.height ** (self.ndim - 1 - i)) % self.height for i in range(self.ndim)]
        return torch.stack(digits, dim=1)

    def modes(self, states: Tensor) -> Tensor:
        """The states of the highest reward ``r0 + r1 + r2`` (both bands in every coordinate)."""
        return self.reward(states) >= self.r0 + self.r1 + self.r2 - 1e-12
