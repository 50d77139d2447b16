"""A GFlowNet's networks: the forward policy ``P_F(a | s)``, the backward policy ``P_B`` (uniform over parents or
learned), a state-flow head ``log F(s)`` (detailed and sub-trajectory balance) and the learned ``log Z``.

:class:`Policy` reads an environment's features (``env.to_input(states)``) and returns a :class:`PolicyOutput`:
raw forward logits (under flow matching these are the log edge flows ``log F(s -> s')``), backward logits or None
(uniform ``P_B``), the state log-flow or None. With ``tied=True`` the heads share one trunk; by default each is its
own MLP of ``depth`` hidden layers of ``hidden`` units (ReLU), as torchgfn builds separate estimators.
``log_z`` is a scalar parameter in its own parameter group (trained at a larger learning rate, METHODS.md section
10: 0.1 against 1e-3 for the policy).

>>> policy = Policy(4, 3, 2, hidden=8, backward="learned", flow=True)
>>> out = policy(torch.zeros(5, 4))
>>> out.forward_logits.shape, out.backward_logits.shape, out.log_flow.shape
(torch.Size([5, 3]), torch.Size([5, 2]), torch.Size([5]))
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...errors import ConfigError, ShapeError

__all__ = ["Policy", "PolicyOutput", "BACKWARD", "mlp", "masked_log_softmax", "uniform_log_prob", "at_least_float32"]

#: How ``P_B`` is given: uniform over a state's parents, or learned.
BACKWARD = ("uniform", "learned")


def mlp(inputs: int, outputs: int, hidden: int, depth: int) -> nn.Sequential:
    """``depth`` hidden layers of ``hidden`` units with ReLU, then a linear output layer."""
    layers: list[nn.Module] = []
    width = inputs
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), nn.ReLU()]
        width = hidden
    layers.append(nn.Linear(width, outputs))
    return nn.Sequential(*layers)


def _run(net: nn.Module, x: Tensor) -> Tensor:
    """``net(x)`` for a Linear or an :func:`mlp`, by the functional ops directly: a rollout calls the policy once per
    step on a small batch, where nn.Module's call machinery is a visible share of the time."""
    if isinstance(net, nn.Linear):
        return F.linear(x, net.weight, net.bias)
    for layer in net:
        x = F.linear(x, layer.weight, layer.bias) if isinstance(layer, nn.Linear) else torch.relu(x)
    return x


@dataclass
class PolicyOutput:
    """The networks' outputs at ``n`` states: ``forward_logits [n, n_actions]``, ``backward_logits [n,
    n_backward]`` (None: uniform ``P_B``) and ``log_flow [n]`` (None: no flow head)."""

    forward_logits: Tensor
    backward_logits: Tensor | None
    log_flow: Tensor | None


def at_least_float32(x: Tensor) -> Tensor:
    """``x`` as float32 when it is in half precision (bf16 / fp16 autocast), else unchanged: the balance losses sum
    log-probabilities and flows along whole trajectories, where half precision loses what they train on."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def masked_log_softmax(logits: Tensor, mask: Tensor) -> Tensor:
    """``log softmax`` over the allowed entries of each row (``-inf`` elsewhere); a row must allow one."""
    if mask.shape != logits.shape:
        raise ShapeError(f"an action mask must match the logits' shape {tuple(logits.shape)}; got "
                         f"{tuple(mask.shape)} (env.forward_mask / backward_mask return [n, n_actions] / [n, "
                         "n_backward])")
    return logits.masked_fill(~mask, -torch.inf).log_softmax(-1)


def uniform_log_prob(mask: Tensor) -> Tensor:
    """``[n]`` ``-log(#allowed)`` of each row of ``mask`` (the uniform distribution over its allowed entries), in
    float64: the caller casts to its policy's dtype (a float64 policy keeps full precision)."""
    return -mask.sum(1).clamp(min=1).double().log()


class Policy(nn.Module):
    """``Policy(input_dim, n_actions, n_backward, *, hidden=256, depth=2, backward="uniform", flow=False,
    log_z=True, tied=False)``."""

    def __init__(self, input_dim: int, n_actions: int, n_backward: int, *, hidden: int = 256, depth: int = 2,
                 backward: str = "uniform", flow: bool = False, log_z: bool = True, tied: bool = False):
        super().__init__()
        if backward not in BACKWARD:
            raise ConfigError(f"unknown backward policy {backward!r}; choose one of {BACKWARD}")
        self.backward, self.tied = backward, tied
        heads = {"pf": n_actions, **({"pb": n_backward} if backward == "learned" else {}),
                 **({"log_flow": 1} if flow else {})}
        if tied:
            self.trunk = mlp(input_dim, hidden, hidden, depth - 1) if depth > 1 else nn.Linear(input_dim, hidden)
            self.heads = nn.ModuleDict({k: nn.Linear(hidden, v) for k, v in heads.items()})
        else:
            self.trunk = None
            self.heads = nn.ModuleDict({k: mlp(input_dim, v, hidden, depth) for k, v in heads.items()})
        self.log_z = nn.Parameter(torch.zeros(())) if log_z else None

    def forward(self, inputs: Tensor) -> PolicyOutput:
        h = torch.relu(_run(self.trunk, inputs)) if self.trunk is not None else inputs
        out = {k: _run(head, h) for k, head in self.heads.items()}
        flow = out.get("log_flow")
        return PolicyOutput(out["pf"], out.get("pb"), None if flow is None else flow[:, 0])
