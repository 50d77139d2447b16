"""Force matching: train a flow's density ``q`` so that its force ``grad_x log q(x)`` matches known forces
``F(x) = -grad U(x)`` (units of kT) on given configurations (Köhler, Krämer, Noé 2021, "Smooth Normalizing
Flows"). The loss ``mean_i |grad log q(x_i) - F(x_i)|^2`` differentiates ``log q`` in ``x`` with
``create_graph=True`` and then in the parameters (double backprop), so the flow needs continuous second
derivatives: use the smooth transforms (:class:`SmoothCoupling`, :class:`CircularSmoothCoupling`); an RQ
spline's force jumps at its knots.

>>> import torch
>>> from genkit.models.flows import CircularSmoothCoupling, CompactFlow, Permutation
>>> from genkit.energies import get_energy
>>> flow = CompactFlow([CircularSmoothCoupling(2, components=2, hidden=8)], 2).double()
>>> x = (2 * torch.rand(16, 2, dtype=torch.float64) - 1) * 3.14
>>> loss, logs = ForceMatchingObjective(flow, get_energy("torus_dihedral")).loss(x)
>>> loss.backward(); sorted(logs)
['force_mse']
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ...errors import ConfigError, DataError, ShapeError

__all__ = ["flow_force", "force_matching_loss", "ForceMatchingObjective"]


def flow_force(model: Any, x: Tensor, context: Tensor | None = None, *, create_graph: bool = False) -> Tensor:
    """``grad_x log q(x)`` ``[batch, features]`` of a flow with ``log_prob(x, context)`` (the force of
    ``-log q``); ``create_graph=True`` keeps it differentiable in the flow's parameters."""
    with torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        logq = model.log_prob(xg, context) if context is not None else model.log_prob(xg)
        (g,) = torch.autograd.grad(logq.sum(), xg, create_graph=create_graph)
    return g


def force_matching_loss(model: Any, x: Tensor, forces: Tensor, context: Tensor | None = None) -> Tensor:
    """``mean_i |grad_x log q(x_i) - forces_i|^2`` (summed over features), differentiable in the parameters."""
    if x.dim() != 2 or forces.shape != x.shape:
        raise ShapeError(f"force matching needs x [batch, features] and forces of the same shape; got "
                         f"{tuple(x.shape)} and {tuple(forces.shape)}")
    if not bool(torch.isfinite(forces).all()):
        raise DataError("force matching got non-finite forces; drop those configurations or check the energy "
                        "(e.g. x outside its domain)")
    g = flow_force(model, x, context, create_graph=True)
    return ((g - forces.to(g)) ** 2).sum(1).mean()


class ForceMatchingObjective(nn.Module):
    """Objective (``loss(batch) -> (loss, logs)``, as genkit's trainer expects) for force matching. A batch is
    ``x`` (forces from ``target.force(x)``, ``target`` a genkit Energy) or ``(x, forces)``; logs ``force_mse``."""

    def __init__(self, model: nn.Module, target: Any = None):
        super().__init__()
        if not hasattr(model, "log_prob"):
            raise ConfigError(f"ForceMatchingObjective trains a model with log_prob(x); got {type(model).__name__}")
        self.model, self.target = model, target

    def loss(self, batch: Any, generator: torch.Generator | None = None, **_: Any) -> tuple[Tensor, dict[str, float]]:
        if isinstance(batch, (tuple, list)) and len(batch) == 2:
            x, forces = batch
        else:
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            if self.target is None:
                raise ConfigError("ForceMatchingObjective without a target needs batches (x, forces); pass "
                                  "target=an Energy or give the forces")
            forces = self.target.force(x)
        loss = force_matching_loss(self.model, x, forces)
        return loss, {"force_mse": float(loss.detach())}
