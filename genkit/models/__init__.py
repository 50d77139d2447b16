"""Model families. Each is an ``nn.Module`` registered in :data:`FAMILIES` with

- ``loss(batch, generator=None) -> (loss, logs)``, ``config() -> dict`` (JSON, with a ``"family"`` key) and
  ``from_config(config)``;
- sampling: ``sample(n, *, sampler=None, generator=None, device=None, return_solution=False, **cond)`` (and
  ``rsample`` with gradients), ``samplers()`` (supported :data:`genkit.sampling.SAMPLERS` names, default
  first) and ``default_sampler()``;
- ``example() -> (model, batch)``: a tiny seeded instance, run by the registry-generated property suite;
- train/train.py hooks: ``cli_defaults``, ``add_arguments(group)``, ``from_args(args, net, sample_shape)`` and
  ``net_options(args, kind)`` (see :class:`ContinuousModel`).
"""

from __future__ import annotations

from .continuous import ContinuousModel
from .diffusion import Diffusion
from .flow_matching import FlowMatching, ot_pairing
from .registry import FAMILIES, build
from .secant import Secant

__all__ = ["FAMILIES", "build", "ContinuousModel", "Diffusion", "FlowMatching", "Secant", "ot_pairing"]
