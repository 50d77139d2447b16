"""GFlowNet training objectives on batches of trajectories (METHODS.md section 10): flow matching (FM; Bengio et
al. 2021, arXiv 2106.04399), detailed balance (DB; Bengio et al. 2023, arXiv 2111.09266) with its forward-looking
variant (FL-DB; Pan et al. 2023, arXiv 2302.01687), trajectory balance (TB; Malkin et al. 2022, arXiv 2201.13259)
and sub-trajectory balance (SubTB(lambda); Madan et al. 2023, arXiv 2209.12782).

All balance losses read one array of node log-flows along each trajectory of ``L`` actions (exit included):
``log F(s_0) = log Z`` (the learned scalar: the flow through the initial state *is* the partition function), the
flow head ``log F(s_t)`` at ``0 < t < L``, and ``log F(s_f) = log R(x)`` at the sink after the exit. With the
per-action terms ``log P_F(s_{t+1} | s_t) - log P_B(s_t | s_{t+1})`` (``P_B = 1`` at the exit) the residual of
a sub-trajectory ``i < j <= L`` is

    d_ij = log F(s_i) + sum_{t=i}^{j-1} [log P_F(s_{t+1}|s_t) - log P_B(s_t|s_{t+1})] - log F(s_j),

so TB is ``d_0L^2``, DB the mean of ``d_{t,t+1}^2`` over all transitions of the batch, and SubTB the
``lambda^(j-i)``-weighted mean of ``d_ij^2`` within each trajectory (Madan et al. eq. 9), averaged over
trajectories; ``weighting="tb"`` keeps only ``d_0L`` (SubTB equals TB), ``"db"`` the single steps. Forward-looking
flows (an environment with a reward on every state) parameterise ``log F(s) = log F~(s) + log R(s)``, so the head
learns ``log F~`` and the exit residual becomes ``log F~(s) + log P_F(exit | s)``.

Flow matching needs no ``P_B`` and no ``log Z``: the forward logits are the log edge flows, and at each visited
state ``s' != s_0`` the in-flow ``log sum_{p -> s'} F(p -> s')`` (parents enumerated by the backward actions) must
equal the out-flow ``log sum_{s' -> c} F(s' -> c)`` (exit edge included), while the exit edge of each terminating
state must carry its reward: ``log F(s' -> s_f) = log R(s')`` (the "reward matching" term, as in torchgfn's FM).
"""

from __future__ import annotations

import numbers
from typing import Any

import torch
from torch import Tensor

from ...errors import ConfigError
from .env import Environment
from .policy import Policy, at_least_float32
from .trajectories import Scores, Trajectories

__all__ = ["LOSSES", "WEIGHTINGS", "node_log_flows", "trajectory_balance", "detailed_balance",
           "subtrajectory_balance", "flow_matching", "check_lambda"]

#: The losses a GFlowNet trains by.
LOSSES = ("tb", "db", "subtb", "fm")
#: SubTB's weightings of its sub-trajectories.
WEIGHTINGS = ("geometric", "tb", "db")


def check_lambda(lamda: Any) -> float:
    if isinstance(lamda, bool) or not isinstance(lamda, numbers.Real) or not (0 < lamda < 1e6):
        raise ConfigError(f"SubTB lambda must be a number > 0 (0.9 is usual; < 1 favours short sub-trajectories); "
                          f"got {lamda!r}")
    return float(lamda)


def node_log_flows(traj: Trajectories, scores: Scores, log_z: Tensor,
                   state_log_reward: Tensor | None = None) -> Tensor:
    """``[T + 2, n]`` node log-flows: ``log Z`` at 0, the flow head (plus ``state_log_reward [T + 1, n]``: the
    forward-looking parameterisation) at ``0 < t < L``, ``log R(x)`` at ``L`` and 0 after."""
    T, n = traj.actions.shape
    if scores.log_flow is None:
        raise ConfigError("these losses need a flow head (Policy(..., flow=True)); TB alone needs none")
    head = scores.log_flow
    if state_log_reward is not None:
        head = head + state_log_reward
    t = torch.arange(T + 2, device=head.device)[:, None]
    lengths = traj.lengths[None]
    inner = torch.cat([head, torch.zeros_like(head[:1])])
    flows = torch.where((t > 0) & (t < lengths), inner, torch.zeros_like(inner))
    flows = torch.where(t == 0, log_z.expand_as(flows), flows)
    return torch.where(t == lengths, traj.log_reward[None].to(flows.dtype).expand_as(flows), flows)


def _steps(scores: Scores) -> Tensor:
    return scores.log_pf - scores.log_pb


def trajectory_balance(traj: Trajectories, scores: Scores, log_z: Tensor) -> Tensor:
    """``mean_tau (log Z + sum log P_F - log R(x) - sum log P_B)^2`` (padding terms are 0)."""
    d = log_z + _steps(scores).sum(0) - traj.log_reward.to(scores.log_pf.dtype)
    return d.square().mean()


def detailed_balance(traj: Trajectories, scores: Scores, log_z: Tensor,
                     state_log_reward: Tensor | None = None) -> Tensor:
    """The mean of ``(log F(s) + log P_F(s'|s) - log F(s') - log P_B(s|s'))^2`` over every transition of the
    batch, the exit's ``log F(s_f) = log R(x)``; ``state_log_reward`` makes it forward-looking (FL-DB)."""
    flows = node_log_flows(traj, scores, log_z, state_log_reward)
    d = flows[:-2] + _steps(scores) - flows[1:-1]  # [T, n]: transitions t -> t + 1
    return d[traj.valid].square().mean()


def subtrajectory_balance(traj: Trajectories, scores: Scores, log_z: Tensor, *, lamda: float = 0.9,
                          weighting: str = "geometric", state_log_reward: Tensor | None = None) -> Tensor:
    """SubTB(lambda): ``sum_{i<j<=L} w_ij d_ij^2 / sum w_ij`` per trajectory (``w_ij = lambda^(j-i)`` for
    ``"geometric"``; only ``(0, L)`` for ``"tb"``; only ``j = i + 1`` for ``"db"``), averaged over trajectories."""
    if weighting not in WEIGHTINGS:
        raise ConfigError(f"unknown SubTB weighting {weighting!r}; choose one of {WEIGHTINGS}")
    lamda = check_lambda(lamda)
    flows = node_log_flows(traj, scores, log_z, state_log_reward)[:-1]  # [T + 1, n]: nodes 0..T
    c = torch.cat([torch.zeros_like(flows[:1]), _steps(scores).cumsum(0)])  # [T + 1, n]
    # d[i, j] = F_i - c_i + c_j - F_j
    a = flows - c
    d = a[:, None] - a[None]  # [i, j, n] = (F_i - c_i) - (F_j - c_j)
    k = torch.arange(flows.shape[0], device=flows.device)
    i, j = k[:, None, None], k[None, :, None]
    lengths = traj.lengths[None, None]
    pair = (i < j) & (j <= lengths)
    if weighting == "geometric":
        w = torch.where(pair, torch.tensor(lamda, dtype=flows.dtype, device=flows.device).pow((j - i).to(
            flows.dtype)), torch.zeros((), dtype=flows.dtype, device=flows.device))
    elif weighting == "tb":
        w = ((i == 0) & (j == lengths)).to(flows.dtype)
    else:
        w = (pair & (j == i + 1)).to(flows.dtype)
    per = (w * d.square()).sum((0, 1)) / w.sum((0, 1))
    return per.mean()


def flow_matching(env: Environment, policy: Policy, traj: Trajectories) -> Tensor:
    """FM on the states the trajectories visit: ``mean (log in-flow - log out-flow)^2`` over non-initial states
    plus ``mean (log F(s -> s_f) - log R(s))^2`` over terminating ones (the policy's forward logits are the log
    edge flows)."""
    states = traj.states[:-1][traj.valid]  # every state an action was taken from
    out = at_least_float32(policy(env.to_input(states)).forward_logits)
    mask = env.forward_mask(states)
    out_flow = out.masked_fill(~mask, -torch.inf).logsumexp(-1)
    inner = ~env.is_initial(states)
    fm = torch.zeros((), dtype=out.dtype, device=out.device)
    if inner.any():
        child = states[inner]
        bmask = env.backward_mask(child)
        rows, acts = bmask.nonzero().T
        parents = env.backward_step(child[rows], acts)
        fwd = env.forward_action(child[rows], acts)
        edge = at_least_float32(policy(env.to_input(parents)).forward_logits).gather(1, fwd[:, None])[:, 0]
        table = torch.full(bmask.shape, -torch.inf, dtype=edge.dtype, device=edge.device).index_put((rows, acts),
                                                                                                   edge)
        fm = (table.logsumexp(-1) - out_flow[inner]).square().mean()
    term = mask[:, env.exit]
    rm = (out[term, env.exit] - env.log_reward(states[term]).to(out.dtype)).square().mean()
    return fm + rm
