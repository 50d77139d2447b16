"""A replay buffer of GFlowNet trajectories for off-policy training (trajectory balance and its kin stay unbiased
off-policy: their scores are always the current policy's, recomputed by
:func:`~genkit.models.gflownet.trajectories.score_trajectories`).

It holds up to ``capacity`` trajectories, padded to the environment's ``max_actions``, first in first out;
``sample(k, generator)`` draws ``k`` of them uniformly, or with ``prioritized=True`` in proportion to their reward
``R(x)`` (so high-reward objects are revisited more often). The buffer lives in memory on the device its
trajectories come from; :meth:`ReplayBuffer.state_dict` / :meth:`ReplayBuffer.load_state_dict` give and take its
contents as tensors, which the GFlowNet family saves with a checkpoint's resume state (so a resumed run replays
what the uninterrupted one would). Each process of a multi-process run keeps its own, and each resumes from
its own.

>>> from genkit.models.gflownet import HyperGrid, Policy, sample_trajectories
>>> env = HyperGrid(ndim=2, height=4)
>>> policy = Policy(env.input_dim, env.n_actions, env.n_backward, hidden=8)
>>> buffer = ReplayBuffer(env, capacity=10)
>>> buffer.add(sample_trajectories(env, policy, 6)); len(buffer)
6
>>> buffer.sample(4, generator=torch.Generator().manual_seed(0)).n
4
"""

from __future__ import annotations

import numbers
from typing import Any

import torch
from torch import Tensor

from ...errors import ConfigError
from .env import Environment
from .trajectories import Trajectories

__all__ = ["ReplayBuffer", "pad", "concat"]


def pad(traj: Trajectories, T: int) -> Trajectories:
    """``traj`` padded to ``T`` actions (the terminal object repeated, actions ``-1``)."""
    extra = T - traj.actions.shape[0]
    if extra < 0:
        raise ConfigError(f"cannot pad trajectories of {traj.actions.shape[0]} actions to {T}")
    if extra == 0:
        return traj
    states = torch.cat([traj.states, traj.states[-1:].expand(extra, *traj.states.shape[1:])])
    actions = torch.cat([traj.actions, traj.actions.new_full((extra, traj.n), -1)])
    return Trajectories(states, actions, traj.lengths, traj.log_reward)


def concat(parts: list[Trajectories]) -> Trajectories:
    """One batch of trajectories from several (padded to the longest)."""
    T = max(p.actions.shape[0] for p in parts)
    parts = [pad(p, T) for p in parts]
    return Trajectories(torch.cat([p.states for p in parts], 1), torch.cat([p.actions for p in parts], 1),
                        torch.cat([p.lengths for p in parts]), torch.cat([p.log_reward for p in parts]))


class ReplayBuffer:
    """``ReplayBuffer(env, capacity, *, prioritized=False)``."""

    def __init__(self, env: Environment, capacity: int, *, prioritized: bool = False):
        if isinstance(capacity, bool) or not isinstance(capacity, numbers.Integral) or capacity < 1:
            raise ConfigError(f"replay buffer capacity must be a positive integer (trajectories kept); got "
                              f"{capacity!r}")
        if not isinstance(prioritized, bool):
            raise ConfigError(f"prioritized must be True or False; got {prioritized!r}")
        self.env, self.capacity, self.prioritized = env, int(capacity), prioritized
        self._data: Trajectories | None = None

    def __len__(self) -> int:
        return 0 if self._data is None else self._data.n

    def add(self, traj: Trajectories) -> None:
        """Keep ``traj`` (detached), dropping the oldest beyond ``capacity``."""
        T = self.env.max_actions
        traj = pad(Trajectories(traj.states.detach(), traj.actions.detach(), traj.lengths.detach(),
                                traj.log_reward.detach()), T)
        data = traj if self._data is None else concat([self._data, traj])
        if data.n > self.capacity:
            data = data.select(torch.arange(data.n - self.capacity, data.n, device=data.lengths.device))
        self._data = data

    def sample(self, k: int, generator: torch.Generator | None = None) -> Trajectories:
        """``k`` stored trajectories (with replacement), uniformly or in proportion to ``R(x)``."""
        if self._data is None:
            raise ConfigError("the replay buffer is empty; add trajectories before sampling it")
        data = self._data
        on: Any = generator.device if generator is not None else "cpu"
        if self.prioritized:
            w = (data.log_reward.double() - data.log_reward.double().max()).exp().to(on)
            idx = torch.multinomial(w, k, replacement=True, generator=generator)
        else:
            idx = torch.randint(data.n, (k,), generator=generator, device=on)
        return data.select(idx.to(data.lengths.device))

    def state(self) -> Tensor | None:
        """The terminal objects held (for inspection)."""
        return None if self._data is None else self._data.terminal

    def state_dict(self) -> dict[str, Tensor]:
        """The trajectories held, as tensors (``states``, ``actions``, ``lengths``, ``log_reward``; empty when
        the buffer is)."""
        if self._data is None:
            return {}
        d = self._data
        return {"states": d.states, "actions": d.actions, "lengths": d.lengths, "log_reward": d.log_reward}

    def load_state_dict(self, state: dict[str, Tensor], device: Any = None) -> None:
        """Hold the trajectories of :meth:`state_dict` (an empty dict empties the buffer), on ``device``."""
        keys = {"states", "actions", "lengths", "log_reward"}
        if not state:
            self._data = None
            return
        if set(state) != keys:
            raise ConfigError(f"a replay buffer state has the tensors {sorted(keys)}; got {sorted(state)}")
        traj = Trajectories(state["states"], state["actions"], state["lengths"], state["log_reward"])
        T, n = self.env.max_actions, traj.n
        if traj.actions.shape != (T, n) or traj.states.shape[:2] != (T + 1, n) or traj.lengths.shape != (n,) \
                or traj.log_reward.shape != (n,) or n > self.capacity:
            raise ConfigError(f"the replay buffer state does not fit this buffer (capacity {self.capacity}, "
                              f"{T} actions per trajectory): actions {tuple(traj.actions.shape)}, states "
                              f"{tuple(traj.states.shape)}; resume with the same environment and replay capacity")
        self._data = traj if device is None else traj.to(device)
