"""The family registry: each family registers itself here, and ``build`` rebuilds one from its ``config()``.

It sits below the families (they import it to register) and below ``genkit/models/__init__`` (which imports
the families), so registering creates no import cycle.
"""

from __future__ import annotations

from typing import Any

from ..errors import ConfigError
from ..registry import Registry

__all__ = ["FAMILIES", "build"]

FAMILIES: Registry = Registry("model family")


def build(config: dict[str, Any]):
    """Rebuild a family (with freshly initialised weights) from its ``config()``."""
    if not isinstance(config, dict) or "family" not in config:
        raise ConfigError(f"a model config needs a 'family' key; got {config!r}")
    return FAMILIES.get(config["family"]).from_config(config)
