"""A residual MLP with a Fourier time embedding: the backbone for toy 2D / nD data.

Every genkit network has the signature ``net(x, t, **cond) -> Tensor`` shaped
like ``x``, with ``t`` a float tensor of shape ``[B]`` in ``[0, 1]`` (t = 0 is
data, t = 1 noise). :func:`genkit.paths.broadcast_time` is the one place that checks ``t``.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError, ShapeError
from ..paths import broadcast_time

__all__ = ["MLP", "FourierTimeEmbedding", "check_labels"]


# ---------------------------------------------------------------------------------------------- JVP rules
# Forward-mode derivatives of the layers these nets are made of, written with ordinary (reverse-mode
# differentiable) ops: ``(y, dy)`` for an input ``x`` and its tangent ``dx``. The primal ``y`` is computed as
# the layer's own forward does (same graph); the tangent under ``tangent_grad(keep)``, so that a stop-gradient
# JVP records no graph for it. TwoTimeMLP.forward_jvp chains them: one pass gives the output with its graph
# and its JVP, about twice a forward's work, where torch.func.jvp pays PyTorch's forward-mode overhead per op.


def tangent_grad(keep: bool) -> torch.autograd.grad_mode.set_grad_enabled:
    """The grad mode of a tangent computation: recorded only when ``keep`` and grad mode is on."""
    return torch.set_grad_enabled(keep and torch.is_grad_enabled())


def linear_jvp(layer: nn.Linear, x: Tensor, dx: Tensor, keep: bool) -> tuple[Tensor, Tensor]:
    """``y = x W^T + b``, ``dy = dx W^T``."""
    y = layer(x)
    with tangent_grad(keep):
        return y, F.linear(dx, layer.weight)


def silu_jvp(x: Tensor, dx: Tensor, keep: bool) -> tuple[Tensor, Tensor]:
    """``y = x sigmoid(x)``, ``dy = dx s (1 + x (1 - s))`` with ``s = sigmoid(x)``. SiLU's Jacobian is diagonal,
    so without a tangent graph ``dy`` is its backward kernel applied to ``dx`` (one fused op, for one dtype; that
    kernel has no derivative of its own, so a recorded tangent takes the formula)."""
    y = F.silu(x)
    with tangent_grad(keep):
        if not torch.is_grad_enabled() and x.dtype == dx.dtype:
            return y, torch.ops.aten.silu_backward(dx, x)
        s = torch.sigmoid(x)
        return y, dx * s * (1 + x * (1 - s))


def layer_norm_jvp(layer: nn.LayerNorm, x: Tensor, dx: Tensor, keep: bool) -> tuple[Tensor, Tensor]:
    """``n = (x - mean) r`` with ``r = (var + eps)^(-1/2)`` over the normalised axes, ``y = n gamma + beta``;
    ``dn = r (dxc - n mean(n dxc))`` with ``dxc = dx - mean(dx)``, ``dy = dn gamma``. The normalisation's
    Jacobian ``r (I - 11^T / N - n n^T / N)`` is symmetric, so without a tangent graph ``dn`` is its backward
    kernel applied to ``dx`` (one fused op; where that kernel's dtypes would mix, e.g. bf16 inputs with fp32
    statistics under CPU autocast, the formula)."""
    y, mean, rstd = torch.native_layer_norm(x, layer.normalized_shape, layer.weight, layer.bias, layer.eps)
    with tangent_grad(keep):
        if not torch.is_grad_enabled() and mean.dtype == x.dtype == dx.dtype:
            dn = torch.ops.aten.native_layer_norm_backward(dx, x, layer.normalized_shape, mean, rstd, None, None,
                                                           [True, False, False])[0]
            return y, dn if layer.weight is None else dn * layer.weight
        axes = tuple(range(-len(layer.normalized_shape), 0))
        n = (x - mean) * rstd
        dxc = dx - dx.mean(axes, keepdim=True)
        dn = rstd * (dxc - n * (n * dxc).mean(axes, keepdim=True))
        return y, dn if layer.weight is None else dn * layer.weight


def check_labels(y: Tensor | None, x: Tensor, num_classes: int | None, net: str) -> None:
    """Check class labels ``y`` of shape ``[B]`` against a net built with ``num_classes``."""
    if num_classes is None:
        if y is not None:
            raise ConfigError(f"{net} got class labels y but was built without classes; build it with num_classes=K")
        return
    if y is None:
        raise ConfigError(
            f"{net} was built with num_classes={num_classes} and needs labels: call net(x, t, y=labels) "
            "(reserve one class as 'no label' for classifier-free guidance)"
        )
    if y.shape != (x.shape[0],) or y.dtype not in (torch.int32, torch.int64):
        raise ShapeError(f"y must be an integer tensor of shape [{x.shape[0]}], got {y.dtype} {list(y.shape)}")


def _check_positive(**values: Any) -> None:
    for key, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{key} must be a positive int, got {value!r}")


class FourierTimeEmbedding(nn.Module):
    """Sinusoidal features of ``t``: ``[B] -> [B, dim]``.

    Frequencies are log-spaced over ``[min_freq, max_freq]`` (1..1000 by
    default), so both coarse and fine differences of ``t in [0, 1]`` are
    resolved, as in the transformer positional encoding (arXiv:1706.03762).
    """

    def __init__(self, dim: int, min_freq: float = 1.0, max_freq: float = 1000.0):
        super().__init__()
        if not isinstance(dim, int) or dim < 2 or dim % 2:
            raise ConfigError(f"time_dim must be an even int >= 2, got {dim!r}")
        freqs = torch.exp(torch.linspace(math.log(min_freq), math.log(max_freq), dim // 2))
        self.register_buffer("freqs", freqs, persistent=False)

    def forward(self, t: Tensor) -> Tensor:
        # Embedding arithmetic runs in fp32 at least whatever the training dtype (bf16 / fp16 times are
        # promoted), and in fp64 for fp64 times, so a float64 net resolves t to float64 precision.
        arg = t.to(torch.promote_types(t.dtype, torch.float32))[:, None] * self.freqs
        return torch.cat([arg.sin(), arg.cos()], dim=-1)

    def forward_jvp(self, t: Tensor, dt: Tensor, keep: bool) -> tuple[Tensor, Tensor]:
        """``(features, d features)`` for times ``t [B]`` with tangent ``dt [B]``."""
        arg = t.to(torch.promote_types(t.dtype, torch.float32))[:, None] * self.freqs
        sin, cos = arg.sin(), arg.cos()
        out = torch.cat([sin, cos], dim=-1)
        with tangent_grad(keep):
            darg = dt.to(arg.dtype)[:, None] * self.freqs
            return out, torch.cat([cos * darg, -sin * darg], dim=-1)


def _check_dropout(dropout: Any) -> float:
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise ConfigError(f"dropout must be a probability in [0, 1) (0 turns it off; 0.1 is usual); got {dropout!r}")
    return float(dropout)


class _ResidualBlock(nn.Module):
    """``h + W2 dropout(silu(W1 silu(norm h) + W_t temb))``, shapes ``[B, hidden]``.

    The dropout has no parameters, so the ``state_dict`` is the same for every ``dropout``.
    """

    def __init__(self, hidden: int, dropout: float = 0.0):
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.lin1 = nn.Linear(hidden, hidden)
        self.time = nn.Linear(hidden, hidden)
        self.dropout = nn.Dropout(dropout)
        self.lin2 = nn.Linear(hidden, hidden)

    def forward(self, h: Tensor, temb: Tensor) -> Tensor:
        z = self.lin1(F.silu(self.norm(h))) + self.time(temb)
        return h + self.lin2(self.dropout(F.silu(z)))

    def forward_jvp(self, h: Tensor, dh: Tensor, temb: Tensor, dtemb: Tensor,
                    keep: bool) -> tuple[Tensor, Tensor]:
        """``(block(h, temb), its JVP along (dh, dtemb))``; dropout (train mode) applies one mask to both."""
        a, da = silu_jvp(*layer_norm_jvp(self.norm, h, dh, keep), keep)
        z, dz = linear_jvp(self.lin1, a, da, keep)
        zt, dzt = linear_jvp(self.time, temb, dtemb, keep)
        zz = z + zt
        with tangent_grad(keep):
            dzz = dz + dzt
        a, da = silu_jvp(zz, dzz, keep)
        if self.dropout.p and self.training:
            mask = F.dropout(torch.ones_like(a), self.dropout.p, training=True)  # the scaled keep mask, 0 or 1/(1-p)
            a = a * mask
            with tangent_grad(keep):
                da = da * mask
        out, dout = linear_jvp(self.lin2, a, da, keep)
        y = h + out
        with tangent_grad(keep):  # a tangent without a graph records none here, even from tangents that need grad
            return y, dh + dout


class MLP(nn.Module):
    """Residual SiLU MLP ``net(x, t, y=None) -> [B, dim]`` for vector data ``x`` of shape ``[B, dim]``.

    Args:
        dim: data dimension.
        hidden: width of the residual stream.
        depth: number of residual blocks.
        time_dim: size of the Fourier embedding of ``t`` (even).
        num_classes: if set, the net is class-conditional and takes integer
            labels ``y`` of shape ``[B]`` in ``[0, num_classes)``.
        dropout: dropout probability inside each residual block (before its last layer), active in
            ``train()`` mode only; 0 (the default) adds nothing. A JVP or finite difference of a net with
            dropout needs the same mask in every pass: fork and reset the RNG around each
            (``torch.random.fork_rng``).
        max_freq: the highest frequency of the Fourier time features (log-spaced from 1). The default 1000
            resolves fine differences of ``t``, which a velocity / noise net can use; a loss that
            differentiates the net in ``t`` (MeanFlow's target holds ``d_t u``) wants smooth time features:
            there the derivative of a feature of frequency ``w`` is ``w`` times larger, and with ``w = 1000``
            the target is dominated by it (measured in :class:`~genkit.models.MeanFlow`'s docstring), so
            MeanFlow's nets use 5.

    >>> net = MLP(2, hidden=32, depth=2)
    >>> net(torch.randn(5, 2), torch.rand(5)).shape
    torch.Size([5, 2])
    """

    name: ClassVar[str] = "mlp"

    def __init__(self, dim: int, hidden: int = 256, depth: int = 3, time_dim: int = 64, num_classes: int | None = None,
                 dropout: float = 0.0, max_freq: float = 1000.0):
        super().__init__()
        _check_positive(dim=dim, hidden=hidden, depth=depth)
        if isinstance(max_freq, bool) or not isinstance(max_freq, (int, float)) or not 1.0 <= max_freq < math.inf:
            raise ConfigError(f"max_freq must be a number >= 1 (the highest frequency of the time features; 1000 "
                              f"is the default, 5 MeanFlow's); got {max_freq!r}")
        self.max_freq = float(max_freq)
        self.dropout = _check_dropout(dropout)
        if num_classes is not None:
            _check_positive(num_classes=num_classes)
        self.dim, self.hidden, self.depth, self.time_dim = dim, hidden, depth, time_dim
        self.num_classes = num_classes
        self.time_embed = nn.Sequential(
            FourierTimeEmbedding(time_dim, max_freq=self.max_freq), nn.Linear(time_dim, hidden), nn.SiLU(),
            nn.Linear(hidden, hidden)
        )
        self.label_embed = nn.Embedding(num_classes, hidden) if num_classes is not None else None
        self.inp = nn.Linear(dim, hidden)
        self.blocks = nn.ModuleList(_ResidualBlock(hidden, self.dropout) for _ in range(depth))
        self.out_norm = nn.LayerNorm(hidden)
        self.out = nn.Linear(hidden, dim)

    def forward(self, x: Tensor, t: Tensor | float, y: Tensor | None = None) -> Tensor:
        """``x``: ``[B, dim]``, ``t``: ``[B]`` (or scalar), ``y``: ``[B]`` labels -> ``[B, dim]``."""
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ShapeError(
                f"MLP expects x of shape [B, {self.dim}], got {list(x.shape)}; flatten x or build MLP(dim=...)"
            )
        t = broadcast_time(t, x)
        check_labels(y, x, self.num_classes, "MLP")
        temb = self.time_embed(t).to(x.dtype)
        if self.label_embed is not None:
            temb = temb + self.label_embed(y)
        h = self.inp(x)
        for block in self.blocks:
            h = block(h, temb)
        return self.out(F.silu(self.out_norm(h)))

    def config(self) -> dict[str, Any]:
        """JSON-serialisable constructor arguments; ``genkit.nets.build(net.config())`` rebuilds the net.
        ``dropout`` (``max_freq``) appears only when it is not 0 (1000), so configs written before it existed are
        unchanged."""
        config = {
            "name": self.name,
            "dim": self.dim,
            "hidden": self.hidden,
            "depth": self.depth,
            "time_dim": self.time_dim,
            "num_classes": self.num_classes,
        }
        if self.dropout:
            config["dropout"] = self.dropout
        if self.max_freq != 1000.0:
            config["max_freq"] = self.max_freq
        return config
