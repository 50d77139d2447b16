"""Bit sequences built ``k`` bits at a time (Malkin et al. 2022, arXiv 2201.13259, section 5; torchgfn's
``BitSequence``).

A state is ``n / k`` word slots, each empty (``-1``) or holding a ``k``-bit word ``0 .. 2^k - 1``; the object is
the ``n``-bit string of a full state. ``order="append"`` (the default) fills the slots left to right (forward
action ``w`` appends word ``w``; one backward action removes the last word: a tree, so ``P_B = 1``);
``order="any"`` fills any empty slot (forward action ``j * 2^k + w`` puts ``w`` in slot ``j``, backward action
``j`` empties slot ``j``: a DAG with ``(n/k)!`` orders to every object). Exit is allowed, and is the only action,
exactly when every slot is full, so every trajectory has ``n / k`` word actions and one exit.

The reward is ``R(x) = exp(-beta * min_m d(x, m) / n)``: ``d`` is the Hamming distance to the nearest of
``n_modes`` mode strings ``m`` (drawn from ``seed``: when ``8`` divides ``n``, each is ``n / 8`` blocks drawn from
the TB paper's 8-bit blocks 00000000, 11111111, 11110000, 00001111, 00111100; else uniform random bits). The modes
(``env.modes``) are the mode strings themselves.

>>> env = BitSequence(length=4, word=2, n_modes=2)
>>> s = env.step(env.initial(1), torch.tensor([3]))
>>> s.tolist(), env.forward_mask(s).tolist()
([[3, -1]], [[True, True, True, True, False]])
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ...errors import ConfigError
from .env import ENVIRONMENTS, Environment

__all__ = ["BitSequence", "ORDERS"]

ORDERS = ("append", "any")
_BLOCKS = ("00000000", "11111111", "11110000", "00001111", "00111100")
_MAX_ENUMERATED = 1 << 22


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ConfigError(f"bitseq {name} must be a positive integer; got {value!r}")
    return int(value)


@ENVIRONMENTS.register("bitseq")
class BitSequence(Environment):
    """``BitSequence(length=8, word=2, order="append", n_modes=4, beta=3.0, seed=0, validate=True)``."""

    name = "bitseq"

    def __init__(self, length: int = 8, word: int = 2, *, order: str = "append", n_modes: int = 4,
                 beta: float = 3.0, seed: int = 0, validate: bool = True):
        super().__init__(validate=validate)
        self.length, self.word = _positive_int("length", length), _positive_int("word", word)
        if self.length % self.word:
            raise ConfigError(f"bitseq word={word} must divide length={length} (the sequence is built k bits at a "
                              "time)")
        if order not in ORDERS:
            raise ConfigError(f"unknown bitseq order {order!r}; choose one of {ORDERS}")
        self.order, self.n_modes = order, _positive_int("n_modes", n_modes)
        if isinstance(beta, bool) or not isinstance(beta, numbers.Real) or not (0 < beta < math.inf):
            raise ConfigError(f"bitseq beta must be a finite number > 0 (the reward's sharpness); got {beta!r}")
        self.beta = float(beta)
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
            raise ConfigError(f"bitseq seed must be an integer; got {seed!r}")
        self.seed = int(seed)
        self.slots, self.words = self.length // self.word, 1 << self.word
        self.state_shape = (self.slots,)
        self.n_actions = (self.words if order == "append" else self.slots * self.words) + 1
        self.n_backward = 1 if order == "append" else self.slots
        self.max_actions = self.slots + 1
        self.input_dim = self.slots * (self.words + 1)
        self.mode_bits = self._draw_modes()
        size = (self.words + 1) ** self.slots
        self.enumerable = size <= _MAX_ENUMERATED  # an instance attribute: short sequences can be listed

    def _draw_modes(self) -> Tensor:
        g = torch.Generator().manual_seed(self.seed)
        if self.length % 8 == 0:
            blocks = torch.tensor([[int(b) for b in s] for s in _BLOCKS])
            pick = torch.randint(len(_BLOCKS), (self.n_modes, self.length // 8), generator=g)
            return blocks[pick].flatten(1)
        return torch.randint(2, (self.n_modes, self.length), generator=g)

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "length": self.length, "word": self.word, "order": self.order,
                "n_modes": self.n_modes, "beta": self.beta, "seed": self.seed}

    # --- structure ------------------------------------------------------------------------------------------
    def initial(self, n: int, device: Any = None) -> Tensor:
        return torch.full((n, self.slots), -1, dtype=torch.long, device=device)

    def _filled(self, states: Tensor) -> Tensor:
        return (states >= 0).sum(1)

    def forward_mask(self, states: Tensor) -> Tensor:
        full = (states >= 0).all(1, keepdim=True)
        if self.order == "append":
            words = (~full).expand(-1, self.words)
        else:
            words = (states < 0)[:, :, None].expand(-1, -1, self.words).flatten(1)
        return torch.cat([words, full], dim=1)

    def backward_mask(self, states: Tensor) -> Tensor:
        if self.order == "append":
            return (states >= 0).any(1, keepdim=True)
        return states >= 0

    def _step(self, states: Tensor, actions: Tensor) -> Tensor:
        if self.order == "append":
            slot, word = self._filled(states), actions
        else:
            slot, word = actions // self.words, actions % self.words
        return states.scatter(1, slot[:, None], word[:, None])

    def _backward_step(self, states: Tensor, actions: Tensor) -> Tensor:
        slot = self._filled(states) - 1 if self.order == "append" else actions
        return states.scatter(1, slot[:, None], -1)

    def backward_action(self, states: Tensor, actions: Tensor) -> Tensor:
        return torch.zeros_like(actions) if self.order == "append" else actions // self.words

    def forward_action(self, states: Tensor, backward_actions: Tensor) -> Tensor:
        slot = self._filled(states) - 1 if self.order == "append" else backward_actions
        word = states.gather(1, slot[:, None])[:, 0]
        return word if self.order == "append" else slot * self.words + word

    def _contains(self, states: Tensor) -> Tensor:
        ok = ((states >= -1) & (states < self.words)).all(1)
        if self.order == "append":  # filled slots form a prefix
            filled = states >= 0
            ok &= (filled[:, 1:] <= filled[:, :-1]).all(1)
        return ok

    # --- reward ---------------------------------------------------------------------------------------------
    def bits(self, x: Tensor) -> Tensor:
        """``[n, length]`` the bits of full states ``x [n, slots]`` (most significant bit of each word first)."""
        shifts = torch.arange(self.word - 1, -1, -1, device=x.device)
        return ((x[:, :, None] >> shifts) & 1).flatten(1)

    def distance(self, x: Tensor) -> Tensor:
        """``[n]`` Hamming distance of full states to the nearest mode string."""
        return (self.bits(x)[:, None, :] != self.mode_bits.to(x.device)[None]).sum(-1).min(1).values

    def _log_reward(self, x: Tensor) -> Tensor:
        return -self.beta * self.distance(x).double() / self.length

    def modes(self, states: Tensor) -> Tensor:
        full = (states >= 0).all(1)
        d = self.distance(states.clamp(min=0))
        return full & (d == 0)

    def to_input(self, states: Tensor) -> Tensor:
        return F.one_hot(states + 1, self.words + 1).flatten(1).float()

    # --- enumeration ----------------------------------------------------------------------------------------
    def _radix(self, states: Tensor) -> Tensor:
        base = (self.words + 1) ** torch.arange(self.slots - 1, -1, -1, device=states.device)
        return ((states + 1) * base).sum(1)

    def _table(self) -> tuple[Tensor, Tensor]:
        if not self.enumerable:
            raise ConfigError(f"bitseq with {self.slots} slots of {self.word} bits has "
                              f"{(self.words + 1) ** self.slots} slot patterns, too many to list for exact "
                              "evaluation; use a shorter length")
        if not hasattr(self, "_states"):
            size = (self.words + 1) ** self.slots
            idx = torch.arange(size)
            digits = torch.stack([(idx // (self.words + 1) ** (self.slots - 1 - i)) % (self.words + 1)
                                  for i in range(self.slots)], dim=1) - 1
            states = digits[self._contains(digits)]
            states = states[torch.argsort(self._filled(states), stable=True)]  # parents have fewer words
            rank = torch.full((size,), -1, dtype=torch.long)
            rank[self._radix(states)] = torch.arange(len(states))
            self._states, self._rank = states, rank
        return self._states, self._rank

    def all_states(self) -> Tensor:
        return self._table()[0]

    def index(self, states: Tensor) -> Tensor:
        return self._table()[1].to(states.device)[self._radix(states)]
