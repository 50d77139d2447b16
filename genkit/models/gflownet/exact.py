"""Exact evaluation of a GFlowNet on an enumerable environment (METHODS.md section 10).

- :func:`true_distribution`: ``R(x) / Z`` over :meth:`~genkit.models.gflownet.Environment.all_states` (0 where
  exit is not allowed), and :func:`exact_log_z` = ``log sum_x R(x)``;
- :func:`terminal_distribution`: the policy's own terminal distribution ``P_T(x)`` by dynamic programming over
  the DAG: ``P(s_0) = 1``, ``P(s') = sum_{p -> s'} P(p) P_F(s' | p)`` level by level (a state's level is its
  longest distance from ``s_0``), and ``P_T(x) = P(x) P_F(exit | x)``, from a table of forward log-probabilities
  at every state (one batched pass of the policy, :func:`forward_log_prob_table`);
- :func:`l1`: the L1 distance in both conventions (METHODS.md: they coexist): ``"sum"`` = ``sum_x |p - q|``, in
  ``[0, 2]``, torchgfn's; ``"mean"`` = the sum over the number of terminal objects, the GFlowNet papers'
  original code's (scale ``1 / |X|``);
- :func:`jsd` (nats) and :func:`empirical_distribution` of samples;
- :func:`modes_found`: the number of distinct modes among the first ``k`` sampled objects, for every ``k``.

>>> from genkit.models.gflownet import HyperGrid
>>> env = HyperGrid(ndim=2, height=3)
>>> p = true_distribution(env)
>>> round(float(p.sum()), 12), round(exact_log_z(env), 4)   # Z = 9 * 0.1 + 4 corners * 0.5 = 2.9
(1.0, 1.0647)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ...errors import ConfigError, ShapeError
from .env import Environment
from .policy import Policy, masked_log_softmax

__all__ = ["true_distribution", "exact_log_z", "forward_log_prob_table", "terminal_distribution",
           "empirical_distribution", "l1", "jsd", "modes_found", "report", "L1_CONVENTIONS"]

#: The two conventions of the L1 distance between terminal distributions.
L1_CONVENTIONS = ("sum", "mean")


def _enumerable(env: Environment) -> Tensor:
    if not env.enumerable:
        raise ConfigError(f"exact evaluation lists every state, and this {env.name} environment "
                          f"({env.describe()}) is not enumerable; use a smaller one or empirical metrics")
    return env.all_states()


def true_distribution(env: Environment) -> Tensor:
    """float64 ``[n_states]``: ``R(x) / Z`` at terminating states of :meth:`all_states`, 0 elsewhere."""
    states = _enumerable(env)
    term = env.terminating(states)
    log_r = torch.full((len(states),), -torch.inf, dtype=torch.float64)
    log_r[term] = env.log_reward(states[term]).double()
    return (log_r - log_r.logsumexp(0)).exp()


def exact_log_z(env: Environment) -> float:
    """``log sum_x R(x)`` over the terminal objects."""
    states = _enumerable(env)
    states = states[env.terminating(states)]
    return float(env.log_reward(states).double().logsumexp(0))


@torch.no_grad()
def forward_log_prob_table(env: Environment, policy: Policy, *, batch: int = 65536) -> Tensor:
    """float64 ``[n_states, n_actions]``: ``log P_F(a | s)`` at every state of :meth:`all_states` (``-inf`` where
    masked), from the policy's forward logits."""
    states = _enumerable(env)
    device = next(policy.parameters()).device
    rows = []
    for chunk in states.split(batch):
        chunk = chunk.to(device)
        logits = policy(env.to_input(chunk)).forward_logits
        rows.append(masked_log_softmax(logits.double(), env.forward_mask(chunk)).cpu())
    return torch.cat(rows)


def terminal_distribution(env: Environment, log_pf: Tensor | Policy) -> Tensor:
    """float64 ``[n_states]``: ``P_T`` of the forward policy by dynamic programming over the DAG; ``log_pf`` is a
    :class:`Policy` or its table ``[n_states, n_actions]`` (:func:`forward_log_prob_table`)."""
    if isinstance(log_pf, Policy):
        log_pf = forward_log_prob_table(env, log_pf)
    states = _enumerable(env)
    if log_pf.shape != (len(states), env.n_actions):
        raise ShapeError(f"log_pf must be [n_states, n_actions] = [{len(states)}, {env.n_actions}] (a row per "
                         f"state of env.all_states()); got {tuple(log_pf.shape)}")
    pf = log_pf.double().exp()
    # every (parent, forward action, child) edge, found from the children's backward actions
    bmask = env.backward_mask(states)
    child, back = bmask.nonzero().T
    parent = env.index(env.backward_step(states[child], back))
    action = env.forward_action(states[child], back)
    reach = torch.zeros(len(states), dtype=torch.float64)
    reach[env.index(env.initial(1))] = 1.0
    weight = pf[parent, action]
    level = _levels(len(states), child, parent)
    for k in range(1, int(level.max()) + 1):
        sel = level[child] == k
        reach.index_add_(0, child[sel], reach[parent[sel]] * weight[sel])
    return reach * pf[:, env.exit]


def _levels(n: int, child: Tensor, parent: Tensor) -> Tensor:
    """``[n]`` the longest distance of each state from a root (a state with no parent) along the edges: every
    parent of a state has a smaller level, so the DP can sweep the levels in order."""
    level = torch.zeros(n, dtype=torch.long)
    for _ in range(n):
        new = level.scatter_reduce(0, child, level[parent] + 1, "amax", include_self=True)
        if torch.equal(new, level):
            return level
        level = new
    raise ConfigError("the environment's edges contain a cycle; a GFlowNet's states must form a DAG")


def empirical_distribution(env: Environment, samples: Tensor) -> Tensor:
    """float64 ``[n_states]``: the share of ``samples`` (terminal objects) at each state of :meth:`all_states`."""
    _enumerable(env)
    env.check_states(samples, "samples")
    counts = torch.bincount(env.index(samples).cpu(), minlength=len(env.all_states())).double()
    return counts / counts.sum()


def l1(p: Tensor, q: Tensor, env: Environment | None = None, *, convention: str = "sum") -> float:
    """L1 distance of two distributions over :meth:`all_states`: ``"sum"`` (torchgfn's, in [0, 2]) or
    ``"mean"`` (the sum over the number of terminal objects, the original GFlowNet code's; needs ``env``)."""
    if convention not in L1_CONVENTIONS:
        raise ConfigError(f"unknown L1 convention {convention!r}; choose one of {L1_CONVENTIONS} (sum: torchgfn, "
                          "in [0, 2]; mean: the GFlowNet papers' code, sum / number of terminal objects)")
    if p.shape != q.shape:
        raise ShapeError(f"the two distributions differ in shape: {tuple(p.shape)} and {tuple(q.shape)}")
    total = float((p.double() - q.double()).abs().sum())
    if convention == "sum":
        return total
    if env is None:
        raise ConfigError("l1(..., convention='mean') divides by the number of terminal objects: pass env=")
    return total / int(env.terminating(env.all_states()).sum())


def jsd(p: Tensor, q: Tensor) -> float:
    """Jensen-Shannon divergence in nats (in ``[0, log 2]``)."""
    p, q = p.double(), q.double()
    m = (p + q) / 2

    def kl(a: Tensor) -> Tensor:
        pos = a > 0
        return (a[pos] * (a[pos].log() - m[pos].log())).sum()

    return float((kl(p) + kl(q)) / 2)


def modes_found(env: Environment, samples: Tensor) -> Tensor:
    """long ``[n]``: the number of distinct modes (``env.modes``) among the first ``k + 1`` of ``samples`` (in the
    order they were drawn), e.g. the visited terminal objects of training against the trajectories so far."""
    is_mode = env.modes(samples).cpu()
    if not is_mode.any():
        return torch.zeros(len(samples), dtype=torch.long)
    keys = _keys(samples.cpu())
    first = torch.zeros(len(samples), dtype=torch.bool)
    seen: set[Any] = set()
    for k in is_mode.nonzero()[:, 0].tolist():
        if keys[k] not in seen:
            seen.add(keys[k])
            first[k] = True
    return first.long().cumsum(0)


def _keys(samples: Tensor) -> list[tuple[int, ...]]:
    return [tuple(row) for row in samples.flatten(1).tolist()]


def log_z_error(env: Environment, log_z: float) -> float:
    """``log Z_learned - log Z_exact``."""
    value = exact_log_z(env)
    if not math.isfinite(log_z):
        raise ConfigError(f"the learned log Z is {log_z}; it must be finite")
    return log_z - value


def report(env: Environment, terminal: Callable[[], Tensor], log_z: float, samples: Tensor | None = None
           ) -> dict[str, Any]:
    """A sampler's report against its target (``GFlowNet.target_report``): the learned ``log_z``; for
    ``samples`` (terminal objects) their reward statistics, unique share and modes (where ``env`` defines them);
    on an enumerable ``env`` the exact ``log Z``, the L1 (both conventions) and JSD of the exact terminal
    distribution ``terminal()`` (and of the samples' histogram) to ``R / Z``, and the number of modes."""
    out: dict[str, Any] = {"log_z_learned": log_z}
    has_modes = type(env).modes is not Environment.modes  # the environment says what a mode is
    if samples is not None:
        env.check_states(samples, "samples")
        log_r = env.log_reward(samples).double()
        out.update({"n_samples": len(samples), "mean_log_reward": float(log_r.mean()),
                    "mean_reward": float(log_r.exp().mean()),
                    "unique_fraction": len(set(_keys(samples.cpu()))) / len(samples)})
        if has_modes:
            out["modes_in_samples"] = int(modes_found(env, samples)[-1])
    if not env.enumerable:
        out["note"] = (f"the {env.name} environment is not enumerable: no exact distribution, reward statistics "
                       "only")
        return out
    target, p_t = true_distribution(env), terminal()
    out.update({"log_z_exact": exact_log_z(env), "l1_exact_sum": l1(p_t, target),
                "l1_exact_mean": l1(p_t, target, env, convention="mean"), "jsd_exact": jsd(p_t, target),
                "l1_conventions": "sum: sum_x |p - q| in [0, 2] (torchgfn); mean: that sum over the number of "
                                  "terminal objects (the GFlowNet papers' code)"})
    if has_modes:
        out["modes_total"] = int(env.modes(env.all_states()).sum())
    if samples is not None:
        emp = empirical_distribution(env, samples)
        out.update({"l1_samples_sum": l1(emp, target), "l1_samples_mean": l1(emp, target, env, convention="mean"),
                    "jsd_samples": jsd(emp, target)})
    return out
