"""Two-time networks ``net(x, t, s, **cond) -> Tensor`` shaped like ``x``: the backbones of flow-map models.

A secant / average-velocity model (Liu & Yue 2025, arXiv 2505.14502; MeanFlow, Geng et al. 2025) needs the
start time ``t`` and the end time ``s`` of a jump. These networks are the one-time genkit networks plus an
embedding of the signed gap ``t - s`` that is added to the time embedding. Its last layer starts at zero, so
a net made from a trained one-time net (:meth:`TwoTimeMLP.from_net`, :func:`to_two_time`) returns exactly
that net's output for every ``s``: a velocity teacher is a flow map that is right at ``s = t`` from step 0.

- :class:`TwoTimeMLP` wraps :class:`~genkit.nets.MLP` (vectors ``[B, dim]``);
- :class:`TwoTimeUNet` wraps :class:`~genkit.nets.UNet` (images), feeding the gap (and, with ``num_classes``,
  the labels) through diffusers' class-embedding slot, so no diffusers code is changed.

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
from .mlp import MLP, FourierTimeEmbedding, check_labels, layer_norm_jvp, linear_jvp, silu_jvp, tangent_grad
from .unet import UNet

__all__ = ["TWO_TIME_NETS", "TwoTimeMLP", "TwoTimeUNet", "build", "to_two_time", "is_two_time"]

#: Two-time networks by name. Their calling convention differs from :data:`genkit.nets.NETS` (``net(x, t)``),
#: so they have their own registry, test matrix and :func:`build`.
TWO_TIME_NETS: Registry = Registry("two-time network")


def is_two_time(net: Any) -> bool:
    """Whether ``net`` takes two times, ``net(x, t, s, **cond)`` (it declares ``two_times = True``)."""
    return bool(getattr(net, "two_times", False))


class TwoTimeMLP(nn.Module):
    """``net(x, t, s, y=None) -> [B, dim]``: :class:`~genkit.nets.MLP` (same arguments, ``num_classes``,
    ``dropout`` and ``max_freq`` included; the gap's Fourier features share ``max_freq``) whose time embedding
    gains a zero-initialised embedding of ``t - s``; shapes
    ``x [B, dim]``, ``t, s [B]`` (or scalars), labels ``y [B]`` for a class-conditional net.

    >>> net = TwoTimeMLP(2, hidden=32, depth=1)
    >>> net(torch.randn(3, 2), 0.5, 0.25).shape
    torch.Size([3, 2])
    """

    name: ClassVar[str] = "two_time_mlp"
    two_times: ClassVar[bool] = True

    def __init__(self, dim: int, hidden: int = 256, depth: int = 3, time_dim: int = 64, num_classes: int | None = None,
                 dropout: float = 0.0, max_freq: float = 1000.0):
        super().__init__()
        self.base = MLP(dim, hidden, depth, time_dim, num_classes, dropout, max_freq)
        self.gap_embed = nn.Sequential(FourierTimeEmbedding(time_dim, max_freq=self.base.max_freq),
                                       nn.Linear(time_dim, hidden), nn.SiLU(),
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

    def _check_x(self, x: Tensor) -> None:
        if x.ndim != 2 or x.shape[1] != self.base.dim:
            raise ShapeError(f"TwoTimeMLP expects x of shape [B, {self.base.dim}], got {list(x.shape)}; flatten x "
                             "or build TwoTimeMLP(dim=...)")

    def forward(self, x: Tensor, t: Tensor | float, s: Tensor | float, y: Tensor | None = None) -> Tensor:
        """``x [B, dim]``, ``t [B]``, ``s [B]``, labels ``y [B]`` -> ``[B, dim]``."""
        b = self.base
        self._check_x(x)
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

    def forward_jvp(self, primals: tuple[Tensor, Tensor, Tensor], tangents: tuple[Tensor, Tensor, Tensor], *,
                    tangent_graph: bool = False, y: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(net(x, t, s, y), d/de net(x + e dx, t + e dt, s + e ds, y))`` in one pass, by the layers' own JVP
        rules (:func:`genkit.nets.mlp.linear_jvp` and its neighbours): the exact JVP that
        :func:`torch.func.jvp` computes, at about twice a forward's cost. The output carries the parameters'
        graph (as :meth:`forward`'s); the tangent carries it only with ``tangent_graph`` (a stop-gradient target
        records nothing). ``primals = (x [B, dim], t [B], s [B])``, ``tangents`` of the same shapes; labels
        ``y`` have no tangent. In ``train()`` mode with dropout, output and tangent share one mask."""
        b = self.base
        (x, t, s), (dx, dt, ds) = primals, tangents
        self._check_x(x)
        t, s = broadcast_time(t, x), broadcast_time(s, x)
        dt, ds = broadcast_time(dt, x), broadcast_time(ds, x)
        if dx.shape != x.shape or dt.shape != t.shape or ds.shape != s.shape:
            raise ShapeError(f"tangents of shapes {[tuple(dx.shape), tuple(dt.shape), tuple(ds.shape)]} for primals "
                             f"{[tuple(x.shape), tuple(t.shape), tuple(s.shape)]}; give each primal a tangent of its "
                             "own shape")
        check_labels(y, x, b.num_classes, "TwoTimeMLP")
        keep = tangent_graph

        def embed(mlp: nn.Sequential, tau: Tensor, dtau: Tensor) -> tuple[Tensor, Tensor]:
            fourier, lin1, _, lin2 = mlp
            e, de = fourier.forward_jvp(tau, dtau, keep)
            return linear_jvp(lin2, *silu_jvp(*linear_jvp(lin1, e, de, keep), keep), keep)

        e1, de1 = embed(b.time_embed, t, dt)
        with tangent_grad(keep):
            dgap = dt - ds
        e2, de2 = embed(self.gap_embed, t - s, dgap)
        temb = (e1 + e2).to(x.dtype)
        with tangent_grad(keep):
            dtemb = (de1 + de2).to(x.dtype)
        if b.label_embed is not None:
            temb = temb + b.label_embed(y)
        h, dh = linear_jvp(b.inp, x, dx, keep)
        for block in b.blocks:
            h, dh = block.forward_jvp(h, dh, temb, dtemb, keep)
        return linear_jvp(b.out, *silu_jvp(*layer_norm_jvp(b.out_norm, h, dh, keep), keep), keep)

    def config(self) -> dict[str, Any]:
        """JSON constructor arguments; :func:`build` rebuilds the net from them."""
        return {**self.base.config(), "name": self.name}


def _to_weight_dtype(module: nn.Module, args: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    return (args[0].to(module.linear_1.weight.dtype), *args[1:])


class TwoTimeUNet(nn.Module):
    """``net(x, t, s, y=None) -> [B, C, H, W]``: :class:`~genkit.nets.UNet` (same arguments) plus a
    zero-initialised embedding of the gap ``t - s``, added to diffusers' time embedding; no diffusers code
    is changed. The gap is scaled like ``t`` (``(t - s) * time_scale``) and goes through the UNet's own
    sinusoidal projection, then a two-layer embedding whose last layer starts at zero.

    - Unconditional (``num_classes=None``): the gap embedding is diffusers' ``class_embed_type="timestep"``
      embedding (``base.unet.class_embedding``), the layout of every TwoTimeUNet checkpoint so far.
    - Class-conditional (``num_classes=K``, integer labels ``y [B]``): diffusers' one class-embedding slot is
      ``class_embed_type="identity"``, fed ``gap_embed(t - s) + label_embed(y)`` (``label_embed`` an
      ``nn.Embedding(K, time_embed_dim)``, as the one-time UNet's ``num_classes`` embedding).

    ``unet2d_kwargs`` takes any other ``UNet2DModel`` argument, ``{"dropout": p}`` included (active in
    ``train()`` mode); ``class_embed_type`` is set here and cannot be given.

    >>> net = TwoTimeUNet(8, block_out_channels=(8, 16), norm_num_groups=4, num_classes=3)
    >>> net(torch.randn(2, 1, 8, 8), 0.5, 0.25, y=torch.tensor([0, 2])).shape
    torch.Size([2, 1, 8, 8])
    """

    name: ClassVar[str] = "two_time_unet"
    two_times: ClassVar[bool] = True

    def __init__(self, sample_size: int | list[int], in_channels: int = 1, out_channels: int | None = None,
                 block_out_channels: list[int] | tuple[int, ...] = (32, 64), layers_per_block: int = 1,
                 down_block_types: list[str] | None = None, up_block_types: list[str] | None = None,
                 norm_num_groups: int = 8, time_scale: float = 999.0, unet2d_kwargs: dict[str, Any] | None = None,
                 time_shift: float = 0.0, num_classes: int | None = None):
        super().__init__()
        if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int)
                                        or num_classes < 1):
            raise ConfigError(f"num_classes must be a positive int or None, got {num_classes!r}")
        self.num_classes = num_classes
        slot = "timestep" if num_classes is None else "identity"
        extra = dict(unet2d_kwargs or {})
        if extra.get("class_embed_type", slot) != slot:
            raise ConfigError(f"TwoTimeUNet sets class_embed_type={slot!r} itself (the time gap"
                              f"{'' if num_classes is None else ' and the labels'} use it); drop "
                              f"class_embed_type={extra['class_embed_type']!r} from unet2d_kwargs")
        extra["class_embed_type"] = slot
        self.base = UNet(sample_size, in_channels, out_channels, block_out_channels, layers_per_block,
                         down_block_types, up_block_types, norm_num_groups, time_scale, None, extra, time_shift)
        unet = self.base.unet
        if num_classes is None:
            self.gap_embed, self.label_embed = None, None
            # diffusers hands this embedding its float32 projection as is: cast it to the weights' dtype.
            unet.class_embedding.register_forward_pre_hook(_to_weight_dtype)
            last = unet.class_embedding.linear_2
        else:
            from diffusers.models.embeddings import TimestepEmbedding

            proj_dim, embed_dim = unet.time_embedding.linear_1.in_features, unet.time_embedding.linear_2.out_features
            self.gap_embed = TimestepEmbedding(proj_dim, embed_dim)
            self.label_embed = nn.Embedding(num_classes, embed_dim)
            last = self.gap_embed.linear_2
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)

    @classmethod
    def from_net(cls, net: UNet) -> TwoTimeUNet:
        """A two-time copy of a trained ``UNet`` (unconditional, or class-conditional through ``num_classes``,
        whose label embedding is copied): equal to it for every ``s`` until trained."""
        if not isinstance(net, UNet):
            raise ConfigError(f"TwoTimeUNet.from_net needs a genkit UNet; got {type(net).__name__}")
        config = {k: v for k, v in net.config().items() if k != "name"}
        embedding = net.unet.class_embedding
        if embedding is not None and not (config["num_classes"] is not None and isinstance(embedding, nn.Embedding)):
            raise ConfigError(f"TwoTimeUNet cannot extend a UNet whose class embedding is "
                              f"class_embed_type={net.unet.config.class_embed_type!r} (the gap needs diffusers' "
                              "class-embedding slot); use an unconditional UNet or one built with num_classes=K")
        two = cls(**config).to(next(net.parameters()))
        weights = dict(net.state_dict())
        if two.label_embed is not None:
            two.label_embed.weight.data.copy_(weights.pop("unet.class_embedding.weight"))
        missing, unexpected = two.base.load_state_dict(weights, strict=False)
        if unexpected or any(not k.startswith("unet.class_embedding.") for k in missing):
            raise ConfigError(f"UNet weights do not fit TwoTimeUNet (missing {missing[:4]}, unexpected "
                              f"{unexpected[:4]}); rebuild the UNet with genkit.nets.UNet")
        return two

    def _check_x(self, x: Tensor) -> None:
        if x.ndim != 2 or x.shape[1] != self.base.dim:
            raise ShapeError(f"TwoTimeMLP expects x of shape [B, {self.base.dim}], got {list(x.shape)}; flatten x "
                             "or build TwoTimeMLP(dim=...)")

    def forward(self, x: Tensor, t: Tensor | float, s: Tensor | float, y: Tensor | None = None) -> Tensor:
        """``x [B, C, H, W]``, ``t [B]``, ``s [B]``, labels ``y [B]`` (class-conditional only) ->
        ``[B, C_out, H, W]``."""
        t, s = broadcast_time(t, x), broadcast_time(s, x)
        check_labels(y, x, self.num_classes, "TwoTimeUNet")
        b = self.base
        gap = (t - s) * b.time_scale
        if self.gap_embed is None:
            # UNet.forward passes y on as diffusers' class_labels; here they carry the scaled gap, not a label.
            return b(x, t, y=gap)
        # class_embed_type="identity": diffusers adds this [B, time_embed_dim] tensor to its time embedding.
        dtype = self.gap_embed.linear_1.weight.dtype
        cond = self.gap_embed(b.unet.time_proj(gap).to(dtype)) + self.label_embed(y)
        return b(x, t, y=cond)

    def config(self) -> dict[str, Any]:
        """JSON constructor arguments; :func:`build` rebuilds the net from them. An unconditional net's has no
        ``num_classes`` key (as before conditional TwoTimeUNets existed)."""
        c = {k: v for k, v in self.base.config().items() if k != "num_classes"}
        c["unet2d_kwargs"] = {k: v for k, v in c.get("unet2d_kwargs", {}).items() if k != "class_embed_type"}
        if self.num_classes is not None:
            c["num_classes"] = self.num_classes
        return {**c, "name": self.name}


def to_two_time(net: nn.Module) -> nn.Module:
    """A two-time network made from ``net``: a two-time net is returned as is, an ``MLP`` or ``UNet``
    (unconditional or with ``num_classes``) becomes a :class:`TwoTimeMLP` / :class:`TwoTimeUNet` holding a
    copy of its weights."""
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
