"""The reward interface every fine-tuning and reward-guided method in genkit takes (DRAKES, SEPO, SVDD, VARD, and
GFlowNets' terminal rewards): a callable on a batch returning one number per sample, ``[batch]``, declared
differentiable or not.

- A **differentiable** reward takes what the model's relaxed samples are: for token sequences a float soft one-hot
  ``[B, L, V]`` (DRAKES backpropagates through it; hard one-hots are the same call), for continuous samples the
  sample tensor itself, and its output has a gradient with respect to that input.
- A **non-differentiable** reward (an oracle, a black box, a count) takes the samples as they are (long tokens
  ``[B, L]`` for sequences) and is only ever called under ``torch.no_grad()``; SEPO and SVDD need nothing more.

:class:`Reward` wraps a callable with that declaration and checks every call: a ``[batch]`` floating tensor, finite
everywhere, else a :class:`~genkit.errors.ShapeError` / :class:`~genkit.errors.DataError` naming the reward, what
it returned and the fix. A reward that is an ``nn.Module`` (a trained predictor) is frozen: no gradient to its
parameters, eval mode; an objective holds it among its frozen parts (:class:`genkit.frozen.Frozen`), so it is
recorded by reference and never trained or saved with the model.

>>> r = Reward(lambda x: x.sum(-1), name="sum")
>>> r(torch.ones(3, 2))
tensor([2., 2., 2.])
>>> r.differentiable
False
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ConfigError, DataError, ShapeError

__all__ = ["Reward", "as_reward"]


class Reward:
    """``Reward(fn, *, differentiable=False, name=None)``: ``fn(x) -> [batch]``, checked on every call.

    Args:
        fn: the reward: a function or an ``nn.Module`` (frozen here: ``requires_grad_(False)``, ``eval()``).
        differentiable: whether gradients flow from the reward to its input (soft one-hots for sequences); a
            non-differentiable reward is evaluated under ``torch.no_grad()``.
        name: how errors and logs call it (default: the function's or module's name).
    """

    def __init__(self, fn: Callable[[Tensor], Tensor], *, differentiable: bool = False, name: str | None = None):
        if isinstance(fn, Reward):
            raise ConfigError("fn is already a Reward; pass it as is (as_reward(r) returns it unchanged)")
        if not callable(fn):
            raise ConfigError(f"a reward must be callable on a batch, returning [batch]; got {type(fn).__name__}")
        if not isinstance(differentiable, bool):
            raise ConfigError(f"differentiable must be True or False; got {differentiable!r}")
        if isinstance(fn, nn.Module):
            fn.requires_grad_(False).eval()
        self.fn, self.differentiable = fn, differentiable
        self.name = name or getattr(fn, "__name__", None) or type(fn).__name__

    @property
    def module(self) -> nn.Module | None:
        """The reward's network when it is one (for an objective's frozen parts), else None."""
        return self.fn if isinstance(self.fn, nn.Module) else None

    def __call__(self, x: Tensor, **kwargs: Any) -> Tensor:
        """``[batch]`` rewards of ``x`` (``[batch, ...]``), checked; gradients to ``x`` only when differentiable."""
        if not isinstance(x, Tensor) or x.ndim < 1:
            raise ShapeError(f"reward {self.name!r} takes a batch tensor [batch, ...]; got "
                             f"{type(x).__name__ if not isinstance(x, Tensor) else tuple(x.shape)}")
        if self.differentiable:
            out = self.fn(x, **kwargs)
        else:
            with torch.no_grad():
                out = self.fn(x, **kwargs)
        return self._check(out, x)

    def _check(self, out: Any, x: Tensor) -> Tensor:
        b = x.shape[0]
        if not isinstance(out, Tensor):
            raise ShapeError(f"reward {self.name!r} returned {type(out).__name__}; it must return a tensor of shape "
                             f"[batch] = [{b}], one reward per sample")
        if out.shape != (b,):
            fix = " (squeeze its last dimension)" if out.shape == (b, 1) else ""
            raise ShapeError(f"reward {self.name!r} returned shape {tuple(out.shape)} for a batch of {b}; it must "
                             f"return [batch] = [{b}], one reward per sample{fix}")
        if not out.is_floating_point():
            raise ShapeError(f"reward {self.name!r} returned dtype {out.dtype}; return floating-point rewards "
                             "(e.g. .float())")
        bad = ~torch.isfinite(out.detach())
        if bool(bad.any()):
            first = int(bad.nonzero()[0, 0])
            raise DataError(f"reward {self.name!r} returned {int(bad.sum())} non-finite value(s) of {b} (first at "
                            f"sample {first}: {float(out[first])}); rewards must be finite: clamp or guard the "
                            "reward (e.g. torch.nan_to_num) or drop the offending samples")
        return out

    def __repr__(self) -> str:
        return f"Reward({self.name!r}, differentiable={self.differentiable})"


def as_reward(reward: Reward | Callable[[Tensor], Tensor], *, differentiable: bool | None = None) -> Reward:
    """``reward`` as a :class:`Reward`: returned as is (a ``differentiable`` that contradicts its declaration is a
    ConfigError), or a plain callable wrapped (non-differentiable unless ``differentiable=True``)."""
    if isinstance(reward, Reward):
        if differentiable is not None and differentiable != reward.differentiable:
            raise ConfigError(f"reward {reward.name!r} is declared differentiable={reward.differentiable}, but "
                              f"differentiable={differentiable} was asked for; build it with Reward(fn, "
                              f"differentiable={differentiable})")
        return reward
    return Reward(reward, differentiable=bool(differentiable))
