"""Adapter from diffusers' ``UNet2DModel`` to genkit's ``net(x, t, **cond)`` convention.

genkit does not hand-write a UNet: the backbone is diffusers' own, so a
diffusers checkpoint can be wrapped (:meth:`UNet.from_unet2d`) and a genkit
UNet exported (``net.unet.save_pretrained(folder)``; a whole ddpm-path model with
``genkit.interop.to_diffusers``). The only conversion is time: genkit's ``t in [0, 1]`` is fed
to diffusers as ``t * time_scale + time_shift``.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError, ShapeError
from ..paths import broadcast_time
from .mlp import check_labels

if TYPE_CHECKING:
    from diffusers import UNet2DModel

__all__ = ["UNet"]

# UNet2DModel arguments that UNet names itself; every other one goes through ``unet2d_kwargs``.
_OWN = {
    "sample_size", "in_channels", "out_channels", "block_out_channels", "layers_per_block",
    "down_block_types", "up_block_types", "norm_num_groups", "num_class_embeds",
}  # fmt: skip


def _unet2d_class() -> type[UNet2DModel]:
    # diffusers takes seconds to import, so only networks that use it pay for it.
    from diffusers import UNet2DModel

    return UNet2DModel


def _unet2d_defaults() -> dict[str, Any]:
    params = inspect.signature(_unet2d_class().__init__).parameters
    return {k: p.default for k, p in params.items() if k != "self" and p.default is not p.empty}


def _jsonable(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _tuple_or_int(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


class _Timesteps(nn.Module):
    """diffusers' sinusoidal ``Timesteps`` projection (same settings, same float32 result), except that
    float64 times are projected in float64: diffusers rounds every time to float32 first, so a float64 UNet
    would only resolve ``t`` to float32 precision and finite differences in ``t`` would be noise."""

    def __init__(self, num_channels: int, flip_sin_to_cos: bool, downscale_freq_shift: float, scale: float = 1):
        super().__init__()
        self.num_channels, self.flip_sin_to_cos = num_channels, flip_sin_to_cos
        self.downscale_freq_shift, self.scale = downscale_freq_shift, scale

    def forward(self, timesteps: Tensor) -> Tensor:
        if timesteps.dtype != torch.float64:
            from diffusers.models.embeddings import get_timestep_embedding

            return get_timestep_embedding(timesteps, self.num_channels, flip_sin_to_cos=self.flip_sin_to_cos,
                                          downscale_freq_shift=self.downscale_freq_shift, scale=self.scale)
        half = self.num_channels // 2
        exponent = -math.log(10000) * torch.arange(half, dtype=torch.float64, device=timesteps.device)
        emb = self.scale * (timesteps[:, None] * torch.exp(exponent / (half - self.downscale_freq_shift))[None])
        emb = torch.cat([emb.sin(), emb.cos()], dim=-1)
        if self.flip_sin_to_cos:
            emb = torch.cat([emb[:, half:], emb[:, :half]], dim=-1)
        return F.pad(emb, (0, 1, 0, 0)) if self.num_channels % 2 else emb


class _Dropout(nn.Dropout):
    """``nn.Dropout`` whose mask is drawn in the row-major layout of the input's shape, whatever its strides.

    torch draws the mask in the input's memory order, and a forward-mode AD pass (``torch.func.jvp``) can lay
    a non-contiguous activation out differently from a plain pass, so the same RNG state gave two different
    masks in diffusers' UNet (its middle blocks see permuted activations). Drawn like this, a plain pass and
    a JVP pass from the same RNG state drop the same units. On CPU, for contiguous inputs, the result is
    torch's own, bit for bit.
    """

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0:
            return x
        if self.p == 1:
            return x * 0
        noise = torch.empty(x.shape, dtype=x.dtype, device=x.device).bernoulli_(1 - self.p).div_(1 - self.p)
        return x * noise


def _float64_timesteps(proj: nn.Module) -> nn.Module:
    from diffusers.models.embeddings import Timesteps

    if type(proj) is not Timesteps:  # fourier / learned projections are left as they are
        return proj
    return _Timesteps(proj.num_channels, proj.flip_sin_to_cos, proj.downscale_freq_shift, proj.scale)


class UNet(nn.Module):
    """Image network ``net(x, t, y=None) -> [B, out_channels, H, W]`` backed by diffusers' ``UNet2DModel``.

    ``x`` has shape ``[B, in_channels, H, W]`` with ``H`` and ``W`` divisible by
    ``2 ** (len(block_out_channels) - 1)``; ``t`` has shape ``[B]`` in ``[0, 1]``.
    The defaults (two levels, 32/64 channels, attention at the lowest level)
    suit 8x8 digits and train a batch of 128 in about 0.2 s on two CPU cores.

    Args:
        sample_size: image side (int) or ``(H, W)``; diffusers keeps it as metadata.
        in_channels, out_channels: image channels (``out_channels`` defaults to ``in_channels``).
        block_out_channels: channels per resolution level; each divisible by ``norm_num_groups``.
        layers_per_block: resnet layers per level.
        down_block_types, up_block_types: diffusers block names; by default plain
            blocks with attention at the lowest resolution only.
        norm_num_groups: GroupNorm groups.
        time_scale, time_shift: diffusers receives ``t * time_scale + time_shift`` (999 and 0 by default;
            a DDPM checkpoint trained on integer steps ``i = N t - 1`` uses ``N`` and ``-1``).
        num_classes: if set, ``y`` (integer labels ``[B]``) is required (diffusers' ``num_class_embeds``).
        unet2d_kwargs: any other ``UNet2DModel`` argument (e.g. ``{"dropout": 0.1}``).

    Two of diffusers' parameter-free modules are swapped for equivalents (same float32 results, same
    ``state_dict``): the sinusoidal time projection projects float64 times in float64 (diffusers rounds them
    to float32, so a float64 net could not resolve ``t``), and dropout draws its mask in the row-major layout
    of its input, so a plain pass and a ``torch.func.jvp`` pass from the same RNG state drop the same units.

    >>> import torch
    >>> net = UNet(8)
    >>> net(torch.randn(2, 1, 8, 8), torch.rand(2)).shape
    torch.Size([2, 1, 8, 8])
    """

    name: ClassVar[str] = "unet"

    def __init__(
        self,
        sample_size: int | Sequence[int],
        in_channels: int = 1,
        out_channels: int | None = None,
        block_out_channels: Sequence[int] = (32, 64),
        layers_per_block: int = 1,
        down_block_types: Sequence[str] | None = None,
        up_block_types: Sequence[str] | None = None,
        norm_num_groups: int = 8,
        time_scale: float = 999.0,
        num_classes: int | None = None,
        unet2d_kwargs: dict[str, Any] | None = None,
        time_shift: float = 0.0,
    ):
        super().__init__()
        levels = len(block_out_channels)
        if not isinstance(norm_num_groups, int) or norm_num_groups < 1:
            raise ConfigError(f"norm_num_groups must be a positive int, got {norm_num_groups!r}")
        if levels < 1 or any(c % norm_num_groups for c in block_out_channels):
            raise ConfigError(
                f"block_out_channels={list(block_out_channels)} must be non-empty and each divisible by "
                f"norm_num_groups={norm_num_groups}; change one of them"
            )
        factor = 2 ** (levels - 1)  # every level but the last halves the image
        sides = [sample_size] if isinstance(sample_size, int) else list(sample_size)
        if any(not isinstance(s, int) or s < 1 or s % factor for s in sides):
            raise ConfigError(
                f"sample_size={sample_size!r} must be positive and divisible by {factor}: the {levels} levels of "
                f"block_out_channels={list(block_out_channels)} halve the image {levels - 1} time(s); use a size "
                f"divisible by {factor} or fewer levels"
            )
        down = tuple(down_block_types or ("DownBlock2D",) * (levels - 1) + ("AttnDownBlock2D",))
        up = tuple(up_block_types or ("AttnUpBlock2D",) + ("UpBlock2D",) * (levels - 1))
        if len(down) != levels or len(up) != levels:
            raise ConfigError(
                f"need one down and one up block type per level ({levels}), got {len(down)} and {len(up)}; "
                "give as many block types as block_out_channels"
            )
        extra = dict(unet2d_kwargs or {})
        bad = sorted((set(extra) - set(_unet2d_defaults())) | (set(extra) & _OWN))
        if bad:
            raise ConfigError(
                f"unet2d_kwargs has keys {bad} that are not free UNet2DModel arguments; "
                "pass UNet's own arguments directly and see diffusers.UNet2DModel for the rest"
            )
        try:
            model = _unet2d_class()(
                sample_size=_tuple_or_int(sample_size),
                in_channels=in_channels,
                out_channels=in_channels if out_channels is None else out_channels,
                block_out_channels=tuple(block_out_channels),
                layers_per_block=layers_per_block,
                down_block_types=down,
                up_block_types=up,
                norm_num_groups=norm_num_groups,
                num_class_embeds=num_classes,
                **extra,
            )
        except (ValueError, TypeError) as err:
            raise ConfigError(f"diffusers rejected this UNet configuration: {err}; fix the named argument") from err
        self._attach(model, time_scale, extra, time_shift)

    def _attach(self, model: UNet2DModel, time_scale: float, extra: dict[str, Any], time_shift: float = 0.0) -> None:
        if not isinstance(time_scale, (int, float)) or time_scale <= 0:
            raise ConfigError(f"time_scale must be a positive number, got {time_scale!r}")
        if not isinstance(time_shift, (int, float)):
            raise ConfigError(f"time_shift must be a number, got {time_shift!r}")
        model.time_proj = _float64_timesteps(model.time_proj)
        for module in list(model.modules()):  # dropout masks that do not depend on memory layout
            for key, child in module.named_children():
                if type(child) is nn.Dropout:
                    setattr(module, key, _Dropout(child.p))
        self.unet = model
        self.time_scale = float(time_scale)
        self.time_shift = float(time_shift)
        self.unet2d_kwargs = {k: _jsonable(v) for k, v in extra.items()}

    @classmethod
    def from_unet2d(cls, model: UNet2DModel, time_scale: float = 999.0, time_shift: float = 0.0) -> UNet:
        """Wrap an existing diffusers ``UNet2DModel`` (weights shared, not copied).

        Its non-default settings are kept in ``config()["unet2d_kwargs"]``, so
        ``build(net.config())`` makes an identical architecture. Its time projection and dropout modules are
        swapped in place for genkit's equivalents (see the class docstring).
        """
        if not isinstance(model, _unet2d_class()):
            raise ConfigError(f"from_unet2d expects a diffusers UNet2DModel, got {type(model).__name__}")
        defaults = _unet2d_defaults()
        extra = {
            k: v
            for k, v in model.config.items()
            if not k.startswith("_") and k not in _OWN and k in defaults and _jsonable(v) != _jsonable(defaults[k])
        }
        net = cls.__new__(cls)
        nn.Module.__init__(net)
        net._attach(model, time_scale, extra, time_shift)
        return net

    @property
    def in_channels(self) -> int:
        return self.unet.config.in_channels

    def forward(self, x: Tensor, t: Tensor | float, y: Tensor | None = None) -> Tensor:
        """``x``: ``[B, C, H, W]``, ``t``: ``[B]`` (or scalar), ``y``: ``[B]`` labels -> ``[B, C_out, H, W]``."""
        factor = 2 ** (len(self.unet.config.block_out_channels) - 1)
        if x.ndim != 4 or x.shape[1] != self.in_channels or x.shape[2] % factor or x.shape[3] % factor:
            raise ShapeError(
                f"UNet expects x of shape [B, {self.in_channels}, H, W] with H and W divisible by {factor}, "
                f"got {list(x.shape)}; resize or pad the images"
            )
        t = broadcast_time(t, x)
        num_classes = self.unet.config.num_class_embeds
        if self.unet.class_embedding is None or num_classes is not None:
            check_labels(y, x, num_classes, "UNet")
        return self.unet(x, t * self.time_scale + self.time_shift, class_labels=y).sample

    def config(self) -> dict[str, Any]:
        """JSON-serialisable constructor arguments; ``genkit.nets.build(net.config())`` rebuilds the net."""
        c = self.unet.config
        return {
            "name": self.name,
            "sample_size": _jsonable(c.sample_size),
            "in_channels": c.in_channels,
            "out_channels": c.out_channels,
            "block_out_channels": list(c.block_out_channels),
            "layers_per_block": c.layers_per_block,
            "down_block_types": list(c.down_block_types),
            "up_block_types": list(c.up_block_types),
            "norm_num_groups": c.norm_num_groups,
            "time_scale": self.time_scale,
            "time_shift": self.time_shift,
            "num_classes": c.num_class_embeds,
            "unet2d_kwargs": dict(self.unet2d_kwargs),
        }
