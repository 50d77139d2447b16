"""Networks of the score-of-mixture families (:mod:`genkit.models.smt`): the amortised mixture-score network
conditioned on ``alpha``, a tap on a network's bottleneck feature, and the logit head read from it.

- :class:`AlphaNet` is ``f_psi(x, t, alpha)``: a two-time genkit network (:mod:`genkit.nets.two_time`) fed
  ``s = t - alpha``, so that its zero-initialised embedding of the gap ``t - s`` is an embedding of ``alpha``
  added to the time embedding, the paper's design (Fourier features of alpha added to the noise embedding;
  the paper's random features have scale 16, the MLP's gap embedding is sinusoidal with log-spaced
  frequencies 1..1000, the UNet's is diffusers' timestep embedding of ``999 alpha``). Made from a one-time
  ``MLP`` / ``UNet`` it starts as that network for every ``alpha`` (the weights are copied).
- :class:`FeatureTap` records a network's bottleneck feature on each call (a forward hook; no network code is
  changed): an MLP's residual stream before its output norm ``[B, hidden]``, a UNet's mid-block output
  mean-pooled ``[B, C]``.
- :class:`LogitHead` maps that feature to one logit ``[B]``: the discriminator of the GAN head (SMT) and the
  density-ratio logit ``l(x_t; t)`` of the explicit mixture (SMD).

>>> import torch
>>> from genkit.nets import MLP
>>> net = AlphaNet(MLP(2, hidden=16, depth=1))
>>> x, t = torch.randn(4, 2), torch.rand(4)
>>> torch.equal(net(x, t, torch.zeros(4)), net(x, t, torch.ones(4)))  # the alpha embedding starts at zero
True
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from ..errors import ConfigError
from ..nets import MLP, FourierTimeEmbedding, UNet
from ..nets.two_time import build as build_two_time
from ..nets.two_time import to_two_time
from ..paths import broadcast_time

__all__ = ["AlphaNet", "FeatureTap", "LogitHead", "feature_dim"]


class AlphaNet(nn.Module):
    """``net(x, t, alpha, **cond) -> Tensor`` shaped like ``x``: a two-time network evaluated at ``(t, t - alpha)``.

    ``net`` is a two-time genkit network, or an ``MLP`` / unconditional ``UNet`` (copied into one that equals it
    for every ``alpha`` until trained). ``alpha`` is ``[B]`` (or a float) in ``[0, 1]``.
    """

    def __init__(self, net: nn.Module, max_freq: float = 16.0):
        super().__init__()
        self.net = to_two_time(net)
        self.max_freq = float(max_freq)
        if not self.max_freq >= 1.0:
            raise ConfigError(f"max_freq (the alpha embedding's highest frequency) must be >= 1; got {max_freq!r}")
        embed = getattr(self.net, "gap_embed", None)  # a two-time MLP: its gap features at alpha's frequencies
        if isinstance(embed, nn.Sequential) and isinstance(embed[0], FourierTimeEmbedding):
            dim = embed[1].in_features
            embed[0] = FourierTimeEmbedding(dim, 1.0, self.max_freq).to(embed[1].weight.device)

    def forward(self, x: Tensor, t: Tensor | float, alpha: Tensor | float, **cond: Any) -> Tensor:
        t, alpha = broadcast_time(t, x), broadcast_time(alpha, x)
        return self.net(x, t, t - alpha, **cond)

    def config(self) -> dict[str, Any]:
        return {"name": "alpha", "net": self.net.config(), "max_freq": self.max_freq}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> AlphaNet:
        if not isinstance(config, dict) or config.get("name") != "alpha" or "net" not in config:
            raise ConfigError("an alpha-conditioned network config is {'name': 'alpha', 'net': a two-time net's "
                              f"config}}; got {config!r}")
        return cls(build_two_time(config["net"]), config.get("max_freq", 16.0))


def _site(net: nn.Module) -> tuple[nn.Module, int, str]:
    """``(module, feature size, kind)`` of ``net``'s bottleneck: through two-time / alpha wrappers to the MLP
    (the input of its output norm) or the UNet (its mid block's output)."""
    base = net
    for _ in range(3):  # AlphaNet -> two-time net -> one-time net
        inner = getattr(base, "net", None) if isinstance(base, AlphaNet) else getattr(base, "base", None)
        if inner is None or isinstance(base, (MLP, UNet)):
            break
        base = inner
    if isinstance(base, MLP):
        return base.out_norm, base.hidden, "input"
    if isinstance(base, UNet) and getattr(base.unet, "mid_block", None) is not None:
        return base.unet.mid_block, int(base.unet.config.block_out_channels[-1]), "output"
    raise ConfigError(f"cannot find the bottleneck feature of a {type(base).__name__} for the logit head; use a genkit "
                      "MLP or UNet (with a mid block) as the score network, or turn the GAN head off (gan=False)")


def feature_dim(net: nn.Module) -> int:
    """The size of the feature :class:`FeatureTap` records for ``net``."""
    return _site(net)[1]


class FeatureTap:
    """Records the bottleneck feature of ``net`` on each call: ``tap.take()`` returns the last one ``[B, F]`` (and
    forgets it). A forward hook, kept out of ``state_dict``; ``tap.remove()`` detaches it."""

    def __init__(self, net: nn.Module):
        module, self.dim, kind = _site(net)
        self._feature: Tensor | None = None
        if kind == "input":
            self._handle = module.register_forward_pre_hook(self._record_input)
        else:
            self._handle = module.register_forward_hook(self._record_output)

    def _record_input(self, module: nn.Module, args: tuple) -> None:
        self._feature = args[0]

    def _record_output(self, module: nn.Module, args: tuple, out: Any) -> None:
        out = out[0] if isinstance(out, tuple) else out
        self._feature = out.flatten(2).mean(-1) if out.ndim > 2 else out

    def take(self) -> Tensor:
        if self._feature is None:
            raise ConfigError("no bottleneck feature recorded: call the score network before reading its feature")
        feature, self._feature = self._feature, None
        return feature

    def remove(self) -> None:
        self._handle.remove()

    def __getstate__(self) -> dict[str, Any]:  # a deepcopy / pickle of the model keeps no stale feature
        state = dict(self.__dict__)
        state["_feature"] = None
        return state


class LogitHead(nn.Module):
    """``head(feature [B, F]) -> logit [B]``: ``Linear(F, F) - SiLU - Linear(F, 1)``."""

    def __init__(self, dim: int):
        super().__init__()
        if not isinstance(dim, int) or dim < 1:
            raise ConfigError(f"the logit head's feature size must be a positive int; got {dim!r}")
        self.dim = dim
        self.layers = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, 1))

    def forward(self, feature: Tensor) -> Tensor:
        return self.layers(feature.to(self.layers[0].weight.dtype)).squeeze(-1)
