"""Backbone networks with the one calling convention ``net(x, t, **cond) -> Tensor`` shaped like ``x``.

The sequence denoisers (:mod:`genkit.nets.sequence`) are the exception by nature: they take token ids
``[B, L]`` or a soft one-hot ``[B, L, V + 1]`` and return logits ``[B, L, V]``.

``t`` is a float tensor of shape ``[B]`` in ``[0, 1]`` (t = 0 data, t = 1
noise). Every network has ``config() -> dict`` (JSON-serialisable, with
``"name"``), and :func:`build` makes the network back from it, so checkpoints
store a config plus a ``state_dict`` and never pickled code.

>>> net = build({"name": "mlp", "dim": 2, "hidden": 32})
>>> build(net.config()).config() == net.config()
True
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

from torch import nn

from ..errors import ConfigError
from ..registry import Registry
from .mlp import MLP, FourierTimeEmbedding
from .sequence import ConvDNA, SequenceTransformer
from .tokens import TokenMLP
from .unet import UNet

__all__ = ["NETS", "build", "MLP", "UNet", "FourierTimeEmbedding", "SequenceTransformer", "ConvDNA", "TokenMLP"]

NETS: Registry[type[nn.Module]] = Registry("network")
for _cls in (MLP, UNet, SequenceTransformer, ConvDNA, TokenMLP):
    NETS.register(_cls.name)(_cls)


def build(config: Mapping[str, Any]) -> nn.Module:
    """Construct a network from ``config`` (as returned by ``net.config()``).

    ``config["name"]`` picks the class in :data:`NETS`; the other keys are its
    constructor arguments. Unknown names, unknown keys and missing required
    keys raise :class:`~genkit.errors.ConfigError`.
    """
    if not isinstance(config, Mapping) or "name" not in config:
        raise ConfigError(
            f"a network config must be a dict with a 'name' key (one of: {', '.join(NETS.names())}), got {config!r}"
        )
    kwargs = dict(config)
    name = kwargs.pop("name")
    cls = NETS.get(name)
    params = {k: p for k, p in inspect.signature(cls).parameters.items() if p.kind is p.POSITIONAL_OR_KEYWORD}
    unknown = sorted(set(kwargs) - set(params))
    if unknown:
        raise ConfigError(f"network {name!r} has no option(s) {unknown}; valid options: {sorted(params)}")
    missing = sorted(k for k, p in params.items() if p.default is p.empty and k not in kwargs)
    if missing:
        raise ConfigError(f"network {name!r} needs option(s) {missing}; add them to the config")
    return cls(**kwargs)
from .two_time import TWO_TIME_NETS, TwoTimeMLP, TwoTimeUNet, to_two_time  # noqa: E402  (two-time nets keep their own registry)

__all__ += ["TWO_TIME_NETS", "TwoTimeMLP", "TwoTimeUNet", "to_two_time"]
