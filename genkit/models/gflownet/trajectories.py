"""Whole batches of GFlowNet trajectories: vectorised rollouts (one loop over time, none over environments), and
the policy's log-probabilities along them.

A :class:`Trajectories` holds ``n`` trajectories padded to ``T`` actions: ``states [T + 1, n, *state_shape]``
(after its end a trajectory repeats its terminal object), ``actions [T, n]`` (``-1`` after the exit action),
``lengths [n]`` (actions taken, exit included) and ``log_reward [n]`` of the terminal objects.
:func:`sample_trajectories` rolls the forward policy out with optional exploration: ``epsilon``-uniform mixing over
the allowed actions and a ``temperature`` on the logits. :func:`score_trajectories` then evaluates the policy on
the trajectories (fresh ones, or a replay buffer's) in one batched pass, with gradients: its log-probabilities
(:class:`Scores`) are always those of the policy itself, never of the exploration distribution, so off-policy
trajectory balance stays unbiased (torchgfn#148).

>>> from genkit.models.gflownet import HyperGrid, Policy
>>> env = HyperGrid(ndim=2, height=4)
>>> policy = Policy(env.input_dim, env.n_actions, env.n_backward, hidden=8)
>>> traj = sample_trajectories(env, policy, 3, generator=torch.Generator().manual_seed(0))
>>> scores = score_trajectories(env, policy, traj)
>>> traj.states.shape[1:], traj.terminal.shape, scores.log_pf.shape == traj.actions.shape
(torch.Size([3, 2]), torch.Size([3, 2]), True)
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ...errors import ConfigError, ShapeError
from .env import Environment
from .policy import Policy, PolicyOutput, at_least_float32, masked_log_softmax, uniform_log_prob

__all__ = ["Trajectories", "Scores", "sample_trajectories", "score_trajectories", "check_exploration"]


@dataclass
class Trajectories:
    """``n`` trajectories padded to ``T`` actions (see the module docstring)."""

    states: Tensor
    actions: Tensor
    lengths: Tensor
    log_reward: Tensor

    @property
    def n(self) -> int:
        return self.actions.shape[1]

    @property
    def terminal(self) -> Tensor:
        """``[n, *state_shape]``: the state each trajectory exits from, its object."""
        return self.states[self.lengths - 1, torch.arange(self.n, device=self.lengths.device)]

    @property
    def valid(self) -> Tensor:
        """bool ``[T, n]``: the action slots each trajectory uses (its exit included)."""
        t = torch.arange(self.actions.shape[0], device=self.lengths.device)[:, None]
        return t < self.lengths[None]

    def select(self, index: Tensor) -> Trajectories:
        """The trajectories ``index`` (along the batch)."""
        return Trajectories(self.states[:, index], self.actions[:, index], self.lengths[index],
                            self.log_reward[index])

    def to(self, device: Any) -> Trajectories:
        return Trajectories(self.states.to(device), self.actions.to(device), self.lengths.to(device),
                            self.log_reward.to(device))


@dataclass
class Scores:
    """A policy's view of :class:`Trajectories`, with gradients: ``log_pf [T, n]`` of each action taken (exit
    included; 0 after the end), ``log_pb [T, n]`` of each step back ``log P_B(s_t | s_{t+1})`` (0 at the exit and
    after), ``log_flow [T + 1, n]`` the flow head at each state (None without one; 0 after the end)."""

    log_pf: Tensor
    log_pb: Tensor
    log_flow: Tensor | None


def check_exploration(epsilon: Any, temperature: Any) -> tuple[float, float]:
    if isinstance(epsilon, bool) or not isinstance(epsilon, numbers.Real) or not (0 <= epsilon <= 1):
        raise ConfigError(f"epsilon must be a probability in [0, 1] (the share of uniform random actions; 0: "
                          f"on-policy); got {epsilon!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) or not (0 < temperature < 1e6):
        raise ConfigError(f"temperature must be a number > 0 (1: the policy itself; > 1 explores more); got "
                          f"{temperature!r}")
    return float(epsilon), float(temperature)


def _draw(log_probs: Tensor, generator: torch.Generator | None) -> Tensor:
    """One action per row of ``log_probs [n, A]`` by the Gumbel-max trick, ``argmax(log p - log E)`` with ``E ~
    Exp(1)`` drawn from ``generator`` (on its device); masked actions (``-inf``) are never drawn."""
    on = generator.device if generator is not None else log_probs.device
    e = torch.empty(log_probs.shape, device=on, dtype=log_probs.dtype).exponential_(generator=generator)
    return (log_probs - e.to(log_probs.device).log()).argmax(-1)


def _backward_log_prob(env: Environment, out_logits: Tensor | None, states: Tensor, actions: Tensor) -> Tensor:
    """``log P_B(b | states)`` for backward actions ``b``: the learned head's, or uniform over the parents."""
    mask = env.backward_mask(states)
    if out_logits is None:
        return uniform_log_prob(mask).to(states.device)
    return masked_log_softmax(out_logits, mask).gather(1, actions[:, None])[:, 0]


@torch.no_grad()
def sample_trajectories(env: Environment, policy: Policy, n: int, *, generator: torch.Generator | None = None,
                        epsilon: float = 0.0, temperature: float = 1.0, device: Any = None,
                        start: Tensor | None = None) -> Trajectories:
    """``n`` trajectories of ``policy`` from ``env.initial``, all stepped together (``epsilon`` / ``temperature``
    explore). ``start [n, *state_shape]`` (default: ``env.initial(n)``) must be the initial state, which the
    samplers hand over as their prior draw. No gradients: :func:`score_trajectories` scores the batch afterwards in
    one pass, which is cheaper than keeping a graph per step.

    Actions are drawn from the environment's own masks, so they are allowed by construction and the rollout steps
    them with ``env.advance`` (``_step`` on the moving rows) directly; with ``env.validate`` it checks the states it
    reaches (and the masks' shapes) once per batch instead of once per step."""
    epsilon, temperature = check_exploration(epsilon, temperature)
    if device is None:
        device = next(policy.parameters()).device
    T = env.max_actions
    s = env.initial(n, device)
    if start is not None and (start.shape != s.shape or not torch.equal(start.to(device), s)):
        raise ConfigError(f"a GFlowNet trajectory starts at the initial state env.initial(n) {s[:1].tolist()}; got "
                          f"start of shape {tuple(start.shape)} holding other states")
    states = [s]
    actions = []
    done = torch.zeros(n, dtype=torch.bool, device=device)
    for _ in range(T):
        mask = env.forward_mask(s)
        logits = policy(env.to_input(s)).forward_logits
        if env.validate and mask.shape != logits.shape:
            raise ShapeError(f"the {env.name} environment's forward_mask gave shape {tuple(mask.shape)}; it must be "
                             f"[n, n_actions] = {tuple(logits.shape)}")
        logp = masked_log_softmax(logits / temperature if temperature != 1 else logits, mask)
        if epsilon > 0:
            logp = ((1 - epsilon) * logp.exp() + epsilon * mask / mask.sum(1, keepdim=True)).log()
        a = torch.where(done, -1, _draw(logp, generator))
        s = env.advance(s, a, (a >= 0) & (a != env.exit))
        done = done | (a == env.exit)
        actions.append(a)
        states.append(s)
        if done.all():
            break
    if not done.all():
        raise ConfigError(f"the {env.name} environment let a trajectory run past max_actions={T} without exiting; "
                          "its max_actions must bound every trajectory (exit included)")
    states_t, actions_t = torch.stack(states), torch.stack(actions)
    if env.validate:
        env.check_states(states_t.flatten(0, 1), "the states a rollout reached")
    lengths = (actions_t >= 0).sum(0)
    dtype = next(policy.parameters()).dtype
    return Trajectories(states_t, actions_t, lengths, env.log_reward(s).to(dtype))


def _float(out: PolicyOutput) -> PolicyOutput:
    """The outputs in at least float32 (:func:`~genkit.models.gflownet.policy.at_least_float32`)."""
    def up(t: Tensor | None) -> Tensor | None:
        return None if t is None else at_least_float32(t)

    return PolicyOutput(up(out.forward_logits), up(out.backward_logits), up(out.log_flow))


def score_trajectories(env: Environment, policy: Policy, traj: Trajectories) -> Scores:
    """The :class:`Scores` of ``policy`` on stored trajectories, from one network pass over their states."""
    T, n = traj.actions.shape
    valid = traj.valid  # [T, n]: states 0..T-1 where an action was taken
    flat = traj.states[:T][valid]  # [m, *shape]
    acts = traj.actions[valid]
    out = _float(policy(env.to_input(flat)))
    logp = masked_log_softmax(out.forward_logits, env.forward_mask(flat)).gather(1, acts[:, None])[:, 0]
    log_pf = torch.zeros(T, n, dtype=logp.dtype, device=logp.device).index_put(tuple(valid.nonzero().T), logp)
    moved = valid & (traj.actions != env.exit)  # transitions s_t -> s_{t+1} with t + 1 a state acting again
    log_pb = torch.zeros_like(log_pf)
    if moved.any():
        t_idx, b_idx = moved.nonzero().T
        before, after = traj.states[t_idx, b_idx], traj.states[t_idx + 1, b_idx]
        back = env.backward_action(before, traj.actions[t_idx, b_idx])
        # the states after a move act at t + 1, so their rows of the pass above hold their backward logits
        pos = torch.full((T, n), -1, dtype=torch.long, device=logp.device)
        pos[valid] = torch.arange(len(flat), device=logp.device)
        logits = None if out.backward_logits is None else out.backward_logits[pos[t_idx + 1, b_idx]]
        log_pb = log_pb.index_put((t_idx, b_idx), _backward_log_prob(env, logits, after, back).to(log_pb.dtype))
    flow = None
    if out.log_flow is not None:
        flow = torch.zeros(T + 1, n, dtype=out.log_flow.dtype, device=logp.device).index_put(
            tuple(valid.nonzero().T), out.log_flow)
    return Scores(log_pf, log_pb, flow)
