"""Denoiser backbones for masked discrete diffusion over sequences: ``net(x, t) -> logits [B, L, V]``.

The vocabulary has ``V`` tokens and one mask token with id ``V``, so an input has ``V + 1`` symbols. ``x`` is
either a long tensor ``[B, L]`` of ids in ``0..V`` or a float soft one-hot ``[B, L, V + 1]`` (DRAKES backpropagates
through Gumbel-softmax states, arXiv:2410.13643). Both go through the same table: ids by lookup, soft one-hots as
``x @ embedding.weight``, which for a hard one-hot is exactly the lookup. ``t`` is a float or a ``[B]`` tensor in
``[0, 1]`` (t = 0 data, t = 1 all masked), fed through a :class:`~genkit.nets.mlp.FourierTimeEmbedding`.

- :class:`SequenceTransformer`: bidirectional pre-norm transformer with DiT-style adaptive LayerNorm
  (arXiv:2212.09748), rotary (arXiv:2104.09864), learned or no positions; the MDLM / SEDD backbone at small size.
- :class:`ConvDNA`: dilated 1-D convolutional residual net, the DRAKES / DirichletFM DNA model (arXiv:2402.05841).

>>> net = SequenceTransformer(4, 8, dim=16, depth=1, heads=2)
>>> net(torch.randint(0, 5, (3, 8)), 0.5).shape
torch.Size([3, 8, 4])
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from ..errors import ConfigError, ShapeError
from ..paths import broadcast_time
from .mlp import FourierTimeEmbedding, _check_dropout, _check_positive

__all__ = ["SequenceTransformer", "ConvDNA", "rotary", "embed_tokens"]

POSITIONS = ("rotary", "learned", "none")


def rotary(x: Tensor, base: float = 10000.0) -> Tensor:
    """Rotary position embedding (RoFormer, arXiv:2104.09864) of ``x`` ``[..., L, D]`` (``D`` even).

    Channel pair ``(2k, 2k + 1)`` at position ``i`` is rotated by the angle ``i * base ** (-2k / D)``, so
    ``rotary(q)[i] . rotary(k)[j]`` depends on ``q``, ``k`` and ``i - j`` only: attention sees relative offsets.
    The angles are computed in fp32 at least (fp64 for fp64 ``x``) and the result has ``x``'s dtype.
    """
    length, d = x.shape[-2], x.shape[-1]
    if d % 2:
        raise ShapeError(f"rotary needs an even last dimension, got {d}; use an even head dimension (dim / heads)")
    dtype = torch.promote_types(x.dtype, torch.float32)
    inv_freq = base ** (-torch.arange(0, d, 2, device=x.device, dtype=dtype) / d)
    angle = torch.arange(length, device=x.device, dtype=dtype)[:, None] * inv_freq  # [L, D / 2]
    cos, sin = angle.cos(), angle.sin()
    x1, x2 = x[..., 0::2].to(dtype), x[..., 1::2].to(dtype)
    out = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return out.flatten(-2).to(x.dtype)


def embed_tokens(x: Tensor, embedding: nn.Embedding, net: str) -> Tensor:
    """Embed ids ``[B, L]`` in ``0..V`` or a soft one-hot ``[B, L, V + 1]`` with the table ``[V + 1, dim]``."""
    symbols = embedding.num_embeddings
    if x.dtype in (torch.int64, torch.int32):
        if x.ndim != 2:
            raise ShapeError(f"{net} expects token ids of shape [B, L], got {list(x.shape)}")
        if x.numel() and (int(x.min()) < 0 or int(x.max()) >= symbols):
            raise ShapeError(
                f"{net} token ids must lie in 0..{symbols - 1} ({symbols - 1} is the mask token), got ids in "
                f"{int(x.min())}..{int(x.max())}; build the net with vocab_size covering the data"
            )
        return embedding(x)
    if x.is_floating_point():
        if x.ndim != 3 or x.shape[-1] != symbols:
            raise ShapeError(
                f"{net} expects a soft one-hot of shape [B, L, {symbols}] (vocab_size + 1, the last channel is the "
                f"mask), got {list(x.shape)}; add the mask channel or pass ids [B, L] instead"
            )
        weight = embedding.weight
        # Outside autocast, like the lookup (which returns rows in the table's dtype), so a hard one-hot embeds
        # exactly as its ids do (in fp32; TF32 matmuls would round the table).
        with torch.autocast(x.device.type, enabled=False):
            return x.to(weight.dtype) @ weight
    raise ShapeError(f"{net} takes long ids [B, L] or a float soft one-hot [B, L, {symbols}], got dtype {x.dtype}")


def _check_common(vocab_size: Any, length: Any, dropout: Any) -> float:
    _check_positive(vocab_size=vocab_size, length=length)
    return _check_dropout(dropout)


class _Attention(nn.Module):
    """Bidirectional multi-head self-attention ``[B, L, dim] -> [B, L, dim]`` (``scaled_dot_product_attention``)."""

    def __init__(self, dim: int, heads: int, rope: bool, dropout: float):
        super().__init__()
        self.heads, self.rope, self.dropout = heads, rope, dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, h: Tensor) -> Tensor:
        q, k, v = rearrange(self.qkv(h), "b l (three h d) -> three b h l d", three=3, h=self.heads)
        if self.rope:
            q, k = rotary(q), rotary(k)
        p = self.dropout if self.training else 0.0
        a = F.scaled_dot_product_attention(q, k, v, dropout_p=p)
        return self.out(rearrange(a, "b h l d -> b l (h d)"))


class _Block(nn.Module):
    """Pre-norm block with adaptive LayerNorm: ``h + attn(ada1(h))``, then ``h + mlp(ada2(h))``.

    ``ada(h) = LayerNorm(h) * (1 + scale) + shift`` with ``(shift, scale)`` a linear map of the time embedding
    (DiT's adaLN, arXiv:2212.09748). The map is zero-initialised, so a fresh block is a plain pre-norm transformer
    block (identity plus attention, identity plus MLP) that does not depend on ``t`` yet.
    """

    def __init__(self, dim: int, heads: int, mlp_ratio: int, rope: bool, dropout: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False)
        self.attn = _Attention(dim, heads, rope, dropout)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(approximate="tanh"), nn.Dropout(dropout),
                                 nn.Linear(mlp_ratio * dim, dim))
        self.modulation = nn.Linear(dim, 4 * dim)
        nn.init.zeros_(self.modulation.weight)
        nn.init.zeros_(self.modulation.bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, h: Tensor, temb: Tensor) -> Tensor:
        shift1, scale1, shift2, scale2 = self.modulation(temb)[:, None].chunk(4, dim=-1)
        h = h + self.dropout(self.attn(self.norm1(h) * (1 + scale1) + shift1))
        return h + self.dropout(self.mlp(self.norm2(h) * (1 + scale2) + shift2))


class SequenceTransformer(nn.Module):
    """Bidirectional transformer denoiser ``net(x, t) -> logits [B, L, vocab_size]``.

    Args:
        vocab_size: ``V``, the number of real tokens; the mask token is id ``V`` (inputs have ``V + 1`` symbols).
        length: sequence length ``L``. Learned positions need exactly this length; rotary and no positions
            accept any length.
        dim, depth, heads, mlp_ratio: width, number of blocks, attention heads (``dim / heads`` even for rotary),
            MLP hidden width as a multiple of ``dim``.
        positions: ``"rotary"`` (relative, in the attention), ``"learned"`` (a table added to the token
            embeddings) or ``"none"`` (the net is then permutation-equivariant over positions).
        dropout: on attention weights and residual branches, active in ``train()`` mode only.

    The blocks' adaLN modulation starts at zero (see ``_Block``); the final norm's modulation does not, so ``t``
    conditions the logits from the first step and every parameter has a gradient at initialisation.

    With rotary or no positions, an input that is the same token everywhere (all masked, at t = 1) gives the
    same logits at every position: attention scores depend on offsets but the values are all equal. The first
    unmasking step then draws every position from one marginal; use learned positions when the per-position
    marginals differ (as in aligned DNA or protein data).
    """

    name: ClassVar[str] = "sequence_transformer"

    def __init__(self, vocab_size: int, length: int, dim: int = 128, depth: int = 4, heads: int = 4,
                 mlp_ratio: int = 4, positions: str = "rotary", dropout: float = 0.0):
        super().__init__()
        self.dropout = _check_common(vocab_size, length, dropout)
        _check_positive(dim=dim, depth=depth, heads=heads, mlp_ratio=mlp_ratio)
        if positions not in POSITIONS:
            raise ConfigError(f"positions must be one of {POSITIONS}, got {positions!r}")
        if dim % heads or (positions == "rotary" and (dim // heads) % 2) or dim % 2:
            raise ConfigError(
                f"dim={dim} must be even and divisible by heads={heads} (with an even head dim for rotary positions); "
                "e.g. dim=128, heads=4"
            )
        self.vocab_size, self.length, self.dim, self.depth = vocab_size, length, dim, depth
        self.heads, self.mlp_ratio, self.positions = heads, mlp_ratio, positions
        self.embed = nn.Embedding(vocab_size + 1, dim)
        self.pos = nn.Parameter(0.02 * torch.randn(length, dim)) if positions == "learned" else None
        self.time_embed = nn.Sequential(FourierTimeEmbedding(dim), nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.blocks = nn.ModuleList(
            _Block(dim, heads, mlp_ratio, positions == "rotary", self.dropout) for _ in range(depth)
        )
        self.out_norm = nn.LayerNorm(dim, elementwise_affine=False)
        self.out_modulation = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, vocab_size)

    def forward(self, x: Tensor, t: Tensor | float) -> Tensor:
        """``x``: ids ``[B, L]`` or soft one-hot ``[B, L, V + 1]``; ``t``: float or ``[B]`` -> ``[B, L, V]``."""
        h = embed_tokens(x, self.embed, "SequenceTransformer")
        if self.pos is not None:
            if h.shape[1] != self.length:
                raise ShapeError(
                    f"SequenceTransformer with learned positions was built for length {self.length}, got length "
                    f"{h.shape[1]}; build it with length={h.shape[1]} or use positions='rotary' (any length)"
                )
            h = h + self.pos
        temb = F.silu(self.time_embed(broadcast_time(t, x, dtype=h.dtype)).to(h.dtype))
        for block in self.blocks:
            h = block(h, temb)
        shift, scale = self.out_modulation(temb)[:, None].chunk(2, dim=-1)
        return self.out(self.out_norm(h) * (1 + scale) + shift)

    def config(self) -> dict[str, Any]:
        """JSON-serialisable constructor arguments; ``genkit.nets.build(net.config())`` rebuilds the net."""
        return {"name": self.name, "vocab_size": self.vocab_size, "length": self.length, "dim": self.dim,
                "depth": self.depth, "heads": self.heads, "mlp_ratio": self.mlp_ratio, "positions": self.positions,
                "dropout": self.dropout}


class ConvDNA(nn.Module):
    """Dilated 1-D convolutional denoiser ``net(x, t) -> logits [B, L, vocab_size]``, the DRAKES DNA model.

    Token embedding (``V + 1 -> channels``), then ``depth`` residual blocks, block ``i`` with dilation
    ``dilations[i % len(dilations)]``::

        feat = feat + relu(conv_i(LayerNorm(dropout(feat) + W_i temb)))

    (time embedding added per block, LayerNorm over channels at each position, "same" zero padding), then a
    two-layer 1x1 convolution head. The defaults (128 channels, kernel 9, dilations 1, 1, 4, 16, 64 repeated to
    20 blocks) are the DRAKES / DirichletFM enhancer model (``num_cnn_stacks=4``); the receptive field of one
    pass through the dilations is 1 + 8 * (1 + 1 + 4 + 16 + 64) = 689 positions. Convolutions accept any length;
    ``length`` is the length the model samples.
    """

    name: ClassVar[str] = "conv_dna"

    def __init__(self, vocab_size: int, length: int, channels: int = 128, depth: int = 20, kernel_size: int = 9,
                 dilations: tuple[int, ...] | list[int] = (1, 1, 4, 16, 64), dropout: float = 0.0):
        super().__init__()
        self.dropout = _check_common(vocab_size, length, dropout)
        _check_positive(channels=channels, depth=depth, kernel_size=kernel_size)
        if channels % 2:
            raise ConfigError(f"channels must be even (it is the Fourier time-embedding size), got {channels}")
        if kernel_size % 2 == 0:
            raise ConfigError(f"kernel_size must be odd so 'same' padding keeps the length, got {kernel_size}; e.g. 9")
        dilations = list(dilations)
        if not dilations or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in dilations):
            raise ConfigError(f"dilations must be a non-empty list of positive ints, got {dilations!r}")
        self.vocab_size, self.length, self.channels, self.depth = vocab_size, length, channels, depth
        self.kernel_size, self.dilations = kernel_size, dilations
        self.embed = nn.Embedding(vocab_size + 1, channels)
        self.time_embed = nn.Sequential(
            FourierTimeEmbedding(channels), nn.Linear(channels, channels), nn.SiLU(), nn.Linear(channels, channels)
        )
        block_dilations = [dilations[i % len(dilations)] for i in range(depth)]
        self.time_layers = nn.ModuleList(nn.Linear(channels, channels) for _ in range(depth))
        self.norms = nn.ModuleList(nn.LayerNorm(channels) for _ in range(depth))
        self.convs = nn.ModuleList(
            nn.Conv1d(channels, channels, kernel_size, dilation=d, padding=d * (kernel_size - 1) // 2)
            for d in block_dilations
        )
        self.drop = nn.Dropout(self.dropout)
        self.head = nn.Sequential(nn.Conv1d(channels, channels, 1), nn.ReLU(), nn.Conv1d(channels, vocab_size, 1))

    def forward(self, x: Tensor, t: Tensor | float) -> Tensor:
        """``x``: ids ``[B, L]`` or soft one-hot ``[B, L, V + 1]``; ``t``: float or ``[B]`` -> ``[B, L, V]``."""
        feat = embed_tokens(x, self.embed, "ConvDNA")  # [B, L, C]
        temb = F.silu(self.time_embed(broadcast_time(t, x, dtype=feat.dtype)).to(feat.dtype))
        for time_layer, norm, conv in zip(self.time_layers, self.norms, self.convs):
            h = norm(self.drop(feat) + time_layer(temb)[:, None])
            feat = feat + F.relu(conv(h.transpose(1, 2))).transpose(1, 2)
        return self.head(feat.transpose(1, 2)).transpose(1, 2)

    def config(self) -> dict[str, Any]:
        """JSON-serialisable constructor arguments; ``genkit.nets.build(net.config())`` rebuilds the net."""
        return {"name": self.name, "vocab_size": self.vocab_size, "length": self.length, "channels": self.channels,
                "depth": self.depth, "kernel_size": self.kernel_size, "dilations": list(self.dilations),
                "dropout": self.dropout}
