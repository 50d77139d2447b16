"""Sequence design: a GFlowNet environment that writes DNA-like sequences one base at a time and is rewarded by a
genkit reward (by default the DNA-like task's oracle of the discrete fine-tuning work,
:func:`genkit.finetune.oracles.dna_oracle`), so the same reward object serves DRAKES, SEPO, SVDD and GFlowNets.

A state is ``length`` positions, each empty (``-1``) or a base ``0..3`` (A, C, G, T), filled left to right:
forward action ``b < 4`` appends base ``b``; exit is allowed, and is the only action, once the sequence is full;
one backward action removes the last base (a tree, so ``P_B = 1``). The reward is ``R(x) = exp(beta * r(x))`` for
the reward ``r`` (any :func:`genkit.finetune.oracles.get_reward` spec: ``"dna_oracle"``, ``"dna_eval_oracle"``,
``"dna_activity"``, ``module:attr`` or ``file.py:attr``), so ``beta`` is the inverse temperature of the target
``p(x) ∝ exp(beta r(x))``. The reward is built at its first use (the named oracles train once, about 2 minutes on
a CPU, then load from the cache). Short sequences (``4^length`` up to about 4 million) are enumerable.

>>> env = SequenceDesign(length=12, reward="dna_activity")
>>> x = env.initial(1)
>>> for b in (0, 1, 2): x = env.step(x, torch.tensor([b]))
>>> x[0, :4].tolist()
[0, 1, 2, -1]
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ...errors import ConfigError, ShapeError
from .env import ENVIRONMENTS, Environment

__all__ = ["SequenceDesign"]

_BASES = 4
_MAX_ENUMERATED = 1 << 22


@ENVIRONMENTS.register("sequence_design")
class SequenceDesign(Environment):
    """``SequenceDesign(length=100, reward="dna_oracle", beta=1.0, validate=True)``."""

    name = "sequence_design"

    def __init__(self, length: int = 100, *, reward: str = "dna_oracle", beta: float = 1.0, validate: bool = True):
        super().__init__(validate=validate)
        if isinstance(length, bool) or not isinstance(length, numbers.Integral) or length < 1:
            raise ConfigError(f"sequence_design length must be a positive integer; got {length!r}")
        if not isinstance(reward, str) or not reward:
            raise ConfigError(f"sequence_design reward must be a reward spec string (a name such as 'dna_oracle', "
                              f"'module:attr' or 'file.py:attr'), recorded in the config; got {reward!r}")
        if isinstance(beta, bool) or not isinstance(beta, numbers.Real) or not (0 < beta < math.inf):
            raise ConfigError(f"sequence_design beta must be a finite number > 0 (R = exp(beta * r)); got {beta!r}")
        self.length, self.reward_spec, self.beta = int(length), reward, float(beta)
        self.state_shape = (self.length,)
        self.n_actions, self.n_backward = _BASES + 1, 1
        self.max_actions = self.length + 1
        self.input_dim = self.length * (_BASES + 1)
        self.enumerable = sum(_BASES ** k for k in range(self.length + 1)) <= _MAX_ENUMERATED
        self._reward: Any = None

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "length": self.length, "reward": self.reward_spec, "beta": self.beta}

    def reward(self) -> Any:
        """The reward object (built at first use)."""
        if self._reward is None:
            from ...finetune.oracles import get_reward

            self._reward = get_reward(self.reward_spec)
        return self._reward

    def initial(self, n: int, device: Any = None) -> Tensor:
        return torch.full((n, self.length), -1, dtype=torch.long, device=device)

    def _filled(self, states: Tensor) -> Tensor:
        return (states >= 0).sum(1)

    def forward_mask(self, states: Tensor) -> Tensor:
        full = (states >= 0).all(1, keepdim=True)
        return torch.cat([(~full).expand(-1, _BASES), full], dim=1)

    def backward_mask(self, states: Tensor) -> Tensor:
        return (states >= 0).any(1, keepdim=True)

    def _step(self, states: Tensor, actions: Tensor) -> Tensor:
        return states.scatter(1, self._filled(states)[:, None], actions[:, None])

    def _backward_step(self, states: Tensor, actions: Tensor) -> Tensor:
        return states.scatter(1, (self._filled(states) - 1)[:, None], -1)

    def backward_action(self, states: Tensor, actions: Tensor) -> Tensor:
        return torch.zeros_like(actions)

    def forward_action(self, states: Tensor, backward_actions: Tensor) -> Tensor:
        return states.gather(1, (self._filled(states) - 1)[:, None])[:, 0]

    def _contains(self, states: Tensor) -> Tensor:
        filled = states >= 0
        return ((states >= -1) & (states < _BASES)).all(1) & (filled[:, 1:] <= filled[:, :-1]).all(1)

    def _log_reward(self, x: Tensor) -> Tensor:
        r = self.reward()
        device = next(r.module.parameters()).device if r.module is not None and any(
            True for _ in r.module.parameters()) else x.device
        with torch.no_grad():
            value = r(x.to(device)).to(x.device)
        if value.shape != (len(x),):
            raise ShapeError(f"sequence_design reward {self.reward_spec!r} returned shape {tuple(value.shape)} for "
                             f"{len(x)} sequences; a reward returns [batch]")
        return self.beta * value.double()

    def to_input(self, states: Tensor) -> Tensor:
        return F.one_hot(states + 1, _BASES + 1).flatten(1).float()

    # --- enumeration (short sequences) ----------------------------------------------------------------------
    def _table(self) -> tuple[Tensor, Tensor]:
        if not self.enumerable:
            raise ConfigError(f"sequence_design of length {self.length} has about 4^{self.length} states, too many to "
                              "list; exact evaluation needs length <= 10")
        if not hasattr(self, "_states"):
            parts = [torch.full((1, self.length), -1, dtype=torch.long)]
            for k in range(1, self.length + 1):
                idx = torch.arange(_BASES ** k)
                digits = torch.stack([(idx // _BASES ** (k - 1 - i)) % _BASES for i in range(k)], dim=1)
                parts.append(torch.cat([digits, torch.full((len(idx), self.length - k), -1)], dim=1))
            states = torch.cat(parts)
            self._states, self._offsets = states, [sum(_BASES ** j for j in range(k)) for k in range(self.length + 1)]
        return self._states, torch.tensor(self._offsets)

    def all_states(self) -> Tensor:
        return self._table()[0]

    def index(self, states: Tensor) -> Tensor:
        _, offsets = self._table()
        k = self._filled(states)
        weights = _BASES ** (k[:, None] - 1 - torch.arange(self.length, device=states.device)[None]).clamp(min=0)
        value = (states.clamp(min=0) * weights * (states >= 0)).sum(1)
        return offsets.to(states.device)[k] + value
