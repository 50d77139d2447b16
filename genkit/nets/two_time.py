"""Two-time networks ``net(x, t, s, **cond) -> Tensor`` shaped like ``x``: the backbones of flow-map models.

A secant / average-velocity model (Liu & Yue 2025, arXiv 2505.14502; MeanFlow, Geng et al. 2025) needs the
start time ``t`` and the end time ``s`` of a jump. These networks are the one-time genkit networks plus an
embedding of the signed gap ``t - s`` that is added to the time embedding. Its last layer starts at zero, so
a net made from a trained one-time net (:meth:`TwoTimeMLP.from_net`, :func:`to_two_time`) returns exactly
that net's output for every ``s``: a velocity teacher is a flow map that is right at ``s = t`` from step 0.

- :class:`TwoTimeMLP` wraps :class:`~genkit.nets.MLP` (vectors ``[B, dim]``);
- :class:`TwoTimeUNet` wraps :class:`~genkit.nets.UNet` (images), feeding the gap through diffusers'
  ``class_embed_type="timestep"`` embedding, so no diffusers code is changed.

They are registered in :data:`TWO_TIME_NETS` and rebuilt from ``config()`` by :func:`build`.

Times are float tensors ``[B]`` in ``[0, 1]`` (t = 0 data, t = 1 noise); ``s`` may be on either side of ``t``.

>>> import torch
>>> mlp = MLP(2, hidden=32, depth=2)
>>> net = to_two_time(mlp)  # a copy: training it leaves mlp unchanged
>>> x, t = torch.randn(5, 2), torch.rand(5)
>>> torch.equal(net(x, t, torch.zeros(5)), mlp(x, t))
True
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any, ClassVar

import torch  # noqa: F401  (the class doctests use it)
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError, ShapeError
from ..paths import broadcast_time
from ..registry import Registry
from .mlp import MLP, FourierTimeEmbedding, check_labels
from .unet import UNet

__all__ = ["TWO_TIME_NETS", "TwoTimeMLP", "TwoTimeUNet", "build", "to_two_time", "is_two_time"]

#: Two-time networks by name. Their calling convention differs from :data:`genkit.nets.NETS` (``net(x, t)``),
#: so they have their own registry, test matrix and :func:`build`.
TWO_TIME_NETS: Registry = Registry("two-time network")


def is_two_time(net: Any) -> bool:
    """Whether ``net`` takes two times, ``net(x, t, s, **cond)`` (it declares ``two_times = True``)."""
    return bool(getattr(net, "two_times", False))


class TwoTimeMLP(nn.Module):
    """``net(x, t, s, y=None) -> [B, dim]``: :class:`~genkit.nets.MLP` (same arguments) whose time embedding
    gains a zero-initialised embedding of ``t - s``; shapes ``x [B, dim]``, ``t, s [B]`` (or scalars).

    >>> net = TwoTimeMLP(2, hidden=32, depth=1)
    >>> net(torch.randn(3, 2), 0.5, 0.25).shape
    torch.Size([3, 2])
    """

    name: ClassVar[str] = "two_time_mlp"
    two_times: ClassVar[bool] = True

    def __init__(self, dim: int, hidden: int = 256, depth: int = 3, time_dim: int = 64, num_classes: int | None = None):
        super().__init__()
        self.base = MLP(dim, hidden, depth, time_dim, num_classes)
        self.gap_embed = nn.Sequential(FourierTimeEmbedding(time_dim), nn.Linear(time_dim, hidden), nn.SiLU(),
                                       nn.Linear(hidden, hidden))
        nn.init.zeros_(self.gap_embed[-1].weight)
        nn.init.zeros_(self.gap_embed[-1].bias)

    @classmethod
    def from_net(cls, net: MLP) -> TwoTimeMLP:
        """A two-time copy of a trained ``MLP``: equal to it for every ``s`` until trained."""
        if not isinstance(net, MLP):
            raise ConfigError(f"TwoTimeMLP.from_net needs a genkit MLP; got {type(net).__name__}")
        config = {k: v for k, v in net.config().items() if k != "name"}
        two = cls(**config).to(next(net.parameters()))
        two.base.load_state_dict(net.state_dict())
        return two

    def forward(self, x: Tensor, t: Tensor | float, s: Tensor | float, y: Tensor | None = None) -> Tensor:
        """``x [B, dim]``, ``t [B]``, ``s [B]``, labels ``y [B]`` -> ``[B, dim]``."""
        b = self.base
        if x.ndim != 2 or x.shape[1] != b.dim:
            raise ShapeError(f"TwoTimeMLP expects x of shape [B, {b.dim}], got {list(x.shape)}; flatten x or "
                             "build TwoTimeMLP(dim=...)")
        t, s = broadcast_time(t, x), broadcast_time(s, x)
        check_labels(y, x, b.num_classes, "TwoTimeMLP")
        # MLP.forward with one more term in the embedding; the layers are MLP's own, so from_net copies them 1:1.
        temb = (b.time_embed(t) + self.gap_embed(t - s)).to(x.dtype)
        if b.label_embed is not None:
            temb = temb + b.label_embed(y)
        h = b.inp(x)
        for block in b.blocks:
            h = block(h, temb)
        return b.out(F.silu(b.out_norm(h)))

    def config(self) -> dict[str, Any]:
        """JSON constructor arguments; :func:`build` rebuilds the net from them."""
        return {**self.base.config(), "name": self.name}


class TwoTimeUNet(nn.Module):
    """``net(x, t, s) -> [B, C, H, W]``: :class:`~genkit.nets.UNet` (same arguments) with the gap ``t - s`` fed
    to diffusers' ``class_embed_type="timestep"`` embedding (zero-initialised). Unconditional only: diffusers
    has one class-embedding slot and the gap uses it.
    """

    name: ClassVar[str] = "two_time_unet"
    two_times: ClassVar[bool] = True

    def __init__(self, sample_size: int | list[int], in_channels: int = 1, out_channels: int | None = None,
                 block_out_channels: list[int] | tuple[int, ...] = (32, 64), layers_per_block: int = 1,
                 down_block_types: list[str] | None = None, up_block_types: list[str] | None = None,
                 norm_num_groups: int = 8, time_scale: float = 999.0, unet2d_kwargs: dict[str, Any] | None = None,
                 time_shift: float = 0.0):
        super().__init__()
        extra = dict(unet2d_kwargs or {})
        if extra.get("class_embed_type", "timestep") != "timestep":
            raise ConfigError("TwoTimeUNet feeds the time gap through class_embed_type='timestep'; drop "
                              f"class_embed_type={extra['class_embed_type']!r} from unet2d_kwargs")
        extra["class_embed_type"] = "timestep"
        self.base = UNet(sample_size, in_channels, out_channels, block_out_channels, layers_per_block,
                         down_block_types, up_block_types, norm_num_groups, time_scale, None, extra, time_shift)
        last = self.base.unet.class_embedding.linear_2
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)

    @classmethod
    def from_net(cls, net: UNet) -> TwoTimeUNet:
        """A two-time copy of a trained unconditional ``UNet``: equal to it for every ``s`` until trained."""
        if not isinstance(net, UNet):
            raise ConfigError(f"TwoTimeUNet.from_net needs a genkit UNet; got {type(net).__name__}")
        config = {k: v for k, v in net.config().items() if k != "name"}
        if config.pop("num_classes", None) is not None or net.unet.class_embedding is not None:
            raise ConfigError("TwoTimeUNet cannot extend a class-conditional UNet (the gap needs diffusers' one "
                              "class-embedding slot); train the flow map from scratch on an unconditional net")
        two = cls(**config).to(next(net.parameters()))
        missing, unexpected = two.base.load_state_dict(net.state_dict(), strict=False)
        if unexpected or any(not k.startswith("unet.class_embedding.") for k in missing):
            raise ConfigError(f"UNet weights do not fit TwoTimeUNet (missing {missing[:4]}, unexpected "
                              f"{unexpected[:4]}); rebuild the UNet with genkit.nets.UNet")
        return two

    def forward(self, x: Tensor, t: Tensor | float, s: Tensor | float) -> Tensor:
        """``x [B, C, H, W]``, ``t [B]``, ``s [B]`` -> ``[B, C_out, H, W]``."""
        t, s = broadcast_time(t, x), broadcast_time(s, x)
        b = self.base
        # UNet.forward passes y on as diffusers' class_labels; here they carry the scaled gap, not a label.
        return b(x, t, y=(t - s) * b.time_scale)

    def config(self) -> dict[str, Any]:
        """JSON constructor arguments; :func:`build` rebuilds the net from them."""
        c = {k: v for k, v in self.base.config().items() if k != "num_classes"}
        c["unet2d_kwargs"] = {k: v for k, v in c.get("unet2d_kwargs", {}).items() if k != "class_embed_type"}
        return {**c, "name": self.name}


def to_two_time(net: nn.Module) -> nn.Module:
    """A two-time network made from ``net``: a two-time net is returned as is, an ``MLP`` or unconditional
    ``UNet`` becomes a :class:`TwoTimeMLP` / :class:`TwoTimeUNet` holding a copy of its weights."""
    if is_two_time(net):
        return net
    if isinstance(net, MLP):
        return TwoTimeMLP.from_net(net)
    if isinstance(net, UNet):
        return TwoTimeUNet.from_net(net)
    raise ConfigError(f"cannot make a two-time network from {type(net).__name__}; pass a genkit MLP or UNet, or a "
                      "network with two_times = True and forward(x, t, s, **cond)")


for _cls in (TwoTimeMLP, TwoTimeUNet):
    TWO_TIME_NETS.register(_cls.name)(_cls)


def build(config: Mapping[str, Any]) -> nn.Module:
    """Construct a two-time network from ``config`` (``net.config()``); unknown names and keys are errors."""
    if not isinstance(config, Mapping) or config.get("name") not in TWO_TIME_NETS:
        raise ConfigError(f"a two-time network config needs a 'name' among {TWO_TIME_NETS.names()}; got {config!r}")
    kwargs = dict(config)
    cls = TWO_TIME_NETS.get(kwargs.pop("name"))
    params = {k: p for k, p in inspect.signature(cls).parameters.items() if p.kind is p.POSITIONAL_OR_KEYWORD}
    unknown = sorted(set(kwargs) - set(params))
    missing = sorted(k for k, p in params.items() if p.default is p.empty and k not in kwargs)
    if unknown or missing:
        raise ConfigError(f"two-time network {cls.name!r}: unknown option(s) {unknown}, missing option(s) {missing}; "
                          f"valid options: {sorted(params)}")
    return cls(**kwargs)
