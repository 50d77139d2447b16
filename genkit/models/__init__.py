"""Model families. Each is an ``nn.Module`` with ``loss(batch, generator=None) -> (loss, logs)``,
``config() -> dict`` (JSON, with a ``"family"`` key) and ``from_config(config)``."""

from __future__ import annotations

from .continuous import ContinuousModel
from .diffusion import Diffusion
from .flow_matching import FlowMatching, ot_pairing
from .registry import FAMILIES, build
from .secant import Secant

__all__ = ["FAMILIES", "build", "ContinuousModel", "Diffusion", "FlowMatching", "Secant", "ot_pairing"]
