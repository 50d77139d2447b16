"""The GFlowNet environment protocol: a DAG of states, batched, with a terminal reward (Bengio et al. 2021, arXiv
2106.04399; METHODS.md section 10).

An :class:`Environment` is stateless: its methods take a batch of states ``[n, *state_shape]`` (integer tensors)
and return new tensors. A trajectory starts at :meth:`~Environment.initial` and takes forward actions; the last
forward action, ``exit = n_actions - 1``, ends it, and the state it leaves from is the *terminal object* ``x``
whose reward ``R(x) = exp(log_reward(x))`` the sampler is to be proportional to. A subclass implements

- ``state_shape``, ``n_actions`` (exit included, last), ``n_backward`` (backward actions), ``max_actions`` (the
  most forward actions of any trajectory, exit included), ``input_dim`` and ``config()``;
- ``initial(n, device)``, ``forward_mask(states)``, ``backward_mask(states)`` (bool ``[n, n_actions]`` /
  ``[n, n_backward]``; the initial state has no backward action; a state is terminating where exit is allowed);
- ``_step(states, actions)`` and ``_backward_step(states, backward_actions)`` for allowed non-exit actions,
  ``backward_action(states, actions)`` (the backward action that undoes forward ``actions`` from ``states``) and
  ``forward_action(states, backward_actions)`` (the forward action from the parent that leads to ``states``);
- ``_log_reward(x)`` and ``to_input(states)`` (the float features a policy network reads);
- ``_contains(states)`` (bool ``[n]``: the states exist), and for enumerable environments ``all_states()`` (every
  state, each after all its parents) and ``index(states)``.

:meth:`Environment.step` / :meth:`~Environment.backward_step` check every action against its mask by default
(``validate=True``, an :class:`~genkit.errors.ActionError` naming the state and action); ``validate=False`` skips
the check for speed, explicitly. The registry :data:`ENVIRONMENTS` rebuilds an environment from its ``config()``,
and the property suite in tests/test_gflownet_envs.py runs on every registered one.

>>> env = get_env({"name": "hypergrid", "ndim": 2, "height": 4})
>>> s = env.initial(2)
>>> env.step(s, torch.tensor([0, 1])).tolist()
[[1, 0], [0, 1]]
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from ...errors import ActionError, ConfigError, DataError, ShapeError
from ...registry import Registry

__all__ = ["Environment", "ENVIRONMENTS", "get_env", "check_linear_reward"]

ENVIRONMENTS: Registry = Registry("GFlowNet environment")


class Environment:
    """Base of GFlowNet environments (see the module docstring for what a subclass implements)."""

    name: ClassVar[str] = "environment"
    #: Whether every state can be listed (:meth:`all_states`): exact evaluation needs it.
    enumerable: ClassVar[bool] = False
    #: Whether ``log_reward`` is defined on every state, not only terminal objects (forward-looking DB needs it).
    intermediate_reward: ClassVar[bool] = False
    state_shape: tuple[int, ...]
    n_actions: int
    n_backward: int
    max_actions: int
    input_dim: int

    def __init__(self, *, validate: bool = True):
        if not isinstance(validate, bool):
            raise ConfigError(f"validate must be True or False; got {validate!r}")
        self.validate = validate

    # --- to implement ---------------------------------------------------------------------------------------
    def initial(self, n: int, device: Any = None) -> Tensor:
        raise NotImplementedError

    def forward_mask(self, states: Tensor) -> Tensor:
        raise NotImplementedError

    def backward_mask(self, states: Tensor) -> Tensor:
        raise NotImplementedError

    def _step(self, states: Tensor, actions: Tensor) -> Tensor:
        raise NotImplementedError

    def _backward_step(self, states: Tensor, actions: Tensor) -> Tensor:
        raise NotImplementedError

    def backward_action(self, states: Tensor, actions: Tensor) -> Tensor:
        """The backward action that undoes forward non-exit ``actions`` taken from ``states``."""
        raise NotImplementedError

    def forward_action(self, states: Tensor, backward_actions: Tensor) -> Tensor:
        """The forward action from the parent ``backward_step(states, backward_actions)`` that leads to ``states``."""
        raise NotImplementedError

    def _log_reward(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def to_input(self, states: Tensor) -> Tensor:
        raise NotImplementedError

    def _contains(self, states: Tensor) -> Tensor:
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        raise NotImplementedError

    def all_states(self) -> Tensor:
        """Every state ``[n_states, *state_shape]``, each after all of its parents (enumerable environments)."""
        raise ConfigError(f"the {self.name} environment is not enumerable (too many states to list); exact "
                          "evaluation needs a small one, e.g. hypergrid or a short bitseq")

    def index(self, states: Tensor) -> Tensor:
        """``[n]`` positions of ``states`` in :meth:`all_states` (enumerable environments)."""
        raise ConfigError(f"the {self.name} environment is not enumerable, so its states have no index")

    def modes(self, states: Tensor) -> Tensor:
        """bool ``[n]``: which terminal objects count as modes (for mode-discovery curves); none by default."""
        return torch.zeros(len(states), dtype=torch.bool, device=states.device)

    # --- shared ---------------------------------------------------------------------------------------------
    @property
    def exit(self) -> int:
        """The exit action's index: the last forward action."""
        return self.n_actions - 1

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Environment:
        options = {k: v for k, v in config.items() if k != "name"}
        try:
            return cls(**options)
        except TypeError as e:
            raise ConfigError(f"the {cls.name} environment does not take {sorted(options)} ({e}); see "
                              f"help({cls.__module__}.{cls.__name__})") from None

    def check_states(self, states: Any, where: str = "states") -> Tensor:
        """``states`` as given when they are an integer tensor ``[n, *state_shape]`` of states of this environment;
        a ShapeError / DataError naming the problem otherwise."""
        if not isinstance(states, Tensor):
            raise ShapeError(f"{where} must be a tensor [n, {', '.join(map(str, self.state_shape))}] of {self.name} "
                             f"states; got {type(states).__name__}")
        if states.is_floating_point() or states.is_complex() or states.dtype == torch.bool:
            raise ShapeError(f"{where} must be an integer tensor (states are discrete); got {states.dtype}. Use "
                             ".long()")
        if tuple(states.shape[1:]) != tuple(self.state_shape) or states.ndim != 1 + len(self.state_shape):
            raise ShapeError(f"{where} must have shape [n, {', '.join(map(str, self.state_shape))}] for this "
                             f"{self.name} environment; got {tuple(states.shape)}")
        bad = ~self._contains(states)
        if bad.any():
            i = int(bad.nonzero()[0, 0])
            raise DataError(f"{where}[{i}] = {states[i].tolist()} is not a state of this {self.name} environment "
                            f"({self.describe()}); states come from env.initial() and env.step()")
        return states

    def _check_actions(self, states: Tensor, actions: Any, mask: Tensor, kind: str) -> Tensor:
        if not isinstance(actions, Tensor) or actions.is_floating_point() or actions.dtype == torch.bool:
            raise ShapeError(f"{kind} actions must be an integer tensor [n]; got "
                             f"{getattr(actions, 'dtype', type(actions).__name__)}")
        if actions.shape != (len(states),):
            raise ShapeError(f"{kind} actions must have shape [{len(states)}] (one per state); got "
                             f"{tuple(actions.shape)}")
        width = mask.shape[1]
        out = (actions < 0) | (actions >= width)
        if out.any():
            i = int(out.nonzero()[0, 0])
            raise ActionError(f"{kind} action {int(actions[i])} (row {i}) is outside 0..{width - 1} of the "
                              f"{self.name} environment")
        allowed = mask.gather(1, actions[:, None])[:, 0]
        if not allowed.all():
            i = int((~allowed).nonzero()[0, 0])
            raise ActionError(f"{kind} action {int(actions[i])} is not allowed in state {states[i].tolist()} (row "
                              f"{i}) of the {self.name} environment; allowed there: "
                              f"{mask[i].nonzero()[:, 0].tolist()} (see env.{kind}_mask)")
        return actions

    def step(self, states: Tensor, actions: Tensor) -> Tensor:
        """The states after forward non-exit ``actions [n]`` (exit ends a trajectory and has no next state)."""
        if self.validate:
            self.check_states(states)
            if isinstance(actions, Tensor) and actions.shape == (len(states),) and (actions == self.exit).any():
                i = int((actions == self.exit).nonzero()[0, 0])
                raise ActionError(f"forward action {self.exit} (row {i}) is the exit, which ends a trajectory: it has "
                                  "no next state, so step() does not take it (the state itself is the object)")
            mask = self.forward_mask(states).clone()
            mask[:, self.exit] = False
            self._check_actions(states, actions, mask, "forward")
        return self._step(states, actions)

    def backward_step(self, states: Tensor, actions: Tensor) -> Tensor:
        """The parents of ``states`` reached by ``backward actions [n]``."""
        if self.validate:
            self.check_states(states)
            self._check_actions(states, actions, self.backward_mask(states), "backward")
        return self._backward_step(states, actions)

    def advance(self, states: Tensor, actions: Tensor, moving: Tensor) -> Tensor:
        """The rollout's step of a whole batch: ``_step`` on the rows where ``moving`` (their actions allowed
        non-exit ones), the other rows unchanged. No checks; an environment may override it with a faster
        batched form that gives the same states."""
        if not moving.any():
            return states
        out = states.clone()
        out[moving] = self._step(states[moving], actions[moving])
        return out

    def log_reward(self, x: Tensor) -> Tensor:
        """``[n]`` ``log R(x)`` of terminal objects (of any state where ``intermediate_reward``)."""
        if self.validate:
            self.check_states(x, "x")
            if not self.intermediate_reward:
                ok = self.forward_mask(x)[:, self.exit]
                if not ok.all():
                    i = int((~ok).nonzero()[0, 0])
                    raise DataError(f"x[{i}] = {x[i].tolist()} is not a terminal object of this {self.name} "
                                    "environment (exit is not allowed there), so it has no reward")
        return self._log_reward(x)

    def is_initial(self, states: Tensor) -> Tensor:
        """bool ``[n]``: the states are the initial state."""
        s0 = self.initial(1, states.device)
        return (states == s0).flatten(1).all(1)

    def terminating(self, states: Tensor) -> Tensor:
        """bool ``[n]``: exit is allowed in ``states`` (they can be terminal objects)."""
        return self.forward_mask(states)[:, self.exit]

    def describe(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.config().items() if k != "name")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.describe()})"


def check_linear_reward(r: Tensor, where: str) -> Tensor:
    """``log r`` of a reward given in linear space, which must be finite and > 0 (a GFlowNet samples in proportion
    to it)."""
    if not torch.isfinite(r).all() or (r <= 0).any():
        bad = (~torch.isfinite(r)) | (r <= 0)
        i = int(bad.nonzero()[0, 0])
        raise DataError(f"{where}: a reward in linear space must be finite and > 0 (a GFlowNet samples x with "
                        f"probability R(x) / Z and trains on log R); got {float(r[i])} at row {i}. Shift it to be "
                        "positive (e.g. R0 > 0 for the hypergrid) or give log R directly")
    return r.log()


def get_env(env: str | dict[str, Any] | Environment, **options: Any) -> Environment:
    """An Environment, one built from its registry name with ``options``, or from its ``config()``."""
    if isinstance(env, Environment):
        if options:
            raise ConfigError(f"{sorted(options)} were given beside the environment object {env!r}; build it with "
                              "them instead")
        return env
    if isinstance(env, dict):
        if "name" not in env:
            raise ConfigError(f"an environment config needs a 'name' key (one of {ENVIRONMENTS.names()}); got {env}")
        return ENVIRONMENTS.get(env["name"]).from_config({**env, **options})
    if isinstance(env, str):
        return ENVIRONMENTS.get(env).from_config({"name": env, **options})
    raise ConfigError(f"env must be an Environment, a registry name ({', '.join(ENVIRONMENTS.names())}) or a config "
                      f"dict; got {type(env).__name__}")
