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

from typing import Any

from ..errors import ConfigError
from ..registry import Registry

FAMILIES: Registry = Registry("model family")


def build(config: dict[str, Any]):
    """Rebuild a family (with freshly initialised weights) from its ``config()``."""
    if not isinstance(config, dict) or "family" not in config:
        raise ConfigError(f"a model config needs a 'family' key; got {config!r}")
    return FAMILIES.get(config["family"]).from_config(config)


from .continuous import ContinuousModel  # noqa: E402  (FAMILIES must exist before families register)
from .diffusion import Diffusion  # noqa: E402
from .flow_matching import FlowMatching, ot_pairing  # noqa: E402
from .secant import Secant  # noqa: E402

__all__ = ["FAMILIES", "build", "ContinuousModel", "Diffusion", "FlowMatching", "Secant", "ot_pairing"]
