"""A tiny denoiser for token sequences: :class:`TokenMLP`, the default network of masked diffusion (``mdlm``).

The calling convention of sequence denoisers: ``net(x_t, t) -> logits [B, L, V]`` where ``x_t`` is either a
long tensor ``[B, L]`` of tokens in ``0..V`` (``V`` is the MASK token) or a float soft one-hot ``[B, L, V + 1]``
(relaxed states, as DRAKES feeds back), and ``t`` is ``[B]`` (or a float) in ``[0, 1]``. The logits are over
the ``V`` data tokens only (a denoiser never predicts MASK).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ShapeError
from ..paths import broadcast_time
from .mlp import FourierTimeEmbedding, _check_positive, _ResidualBlock

__all__ = ["TokenMLP", "token_one_hot"]


def token_one_hot(x: Tensor, vocab_size: int, length: int, where: str) -> Tensor:
    """``x`` as a float one-hot ``[B, L, V + 1]``: tokens ``[B, L]`` in ``0..V`` are one-hot encoded, a float
    ``[B, L, V + 1]`` soft one-hot is returned as it is; anything else is a ShapeError naming the fix."""
    width = vocab_size + 1
    if x.is_floating_point():
        if x.ndim != 3 or x.shape[1] != length or x.shape[2] != width:
            raise ShapeError(f"{where}: a float x_t is a soft one-hot [B, {length}, {width}] (V = {vocab_size} "
                             f"tokens + MASK); got shape {tuple(x.shape)}. Pass token ids [B, {length}] as a long "
                             f"tensor, or a one-hot with last dimension vocab_size + 1 = {width}")
        return x
    if x.dtype not in (torch.int64, torch.int32) or x.ndim != 2 or x.shape[1] != length:
        raise ShapeError(f"{where}: x_t must be token ids [B, {length}] (long, in 0..{vocab_size}, {vocab_size} = "
                         f"MASK) or a float soft one-hot [B, {length}, {width}]; got {x.dtype} of shape "
                         f"{tuple(x.shape)}")
    if x.numel() and (int(x.min()) < 0 or int(x.max()) > vocab_size):
        raise ShapeError(f"{where}: token ids must lie in 0..{vocab_size} ({vocab_size} = MASK); got values in "
                         f"{int(x.min())}..{int(x.max())}. Remap the data to 0..{vocab_size - 1} or build the model "
                         f"with a larger vocab_size")
    return F.one_hot(x.long(), width).to(torch.get_default_dtype())


class TokenMLP(nn.Module):
    """``net(x_t, t) -> logits [B, L, V]``: token (and MASK) embeddings as ``one_hot @ weight`` (so soft one-hots
    go through the same weights), flattened over the ``L`` positions, a residual SiLU MLP with a Fourier time
    embedding, and per-position logits. It sees the whole sequence, so it can learn correlations between
    positions; meant for short sequences (tests, examples, toy tasks).

    >>> net = TokenMLP(vocab_size=4, length=3, hidden=16, depth=1)
    >>> net(torch.tensor([[0, 4, 2]]), torch.tensor([0.5])).shape
    torch.Size([1, 3, 4])
    """

    name: ClassVar[str] = "token_mlp"

    def __init__(self, vocab_size: int, length: int, hidden: int = 128, depth: int = 2, embed_dim: int = 16,
                 time_dim: int = 32):
        super().__init__()
        _check_positive(vocab_size=vocab_size, length=length, hidden=hidden, depth=depth, embed_dim=embed_dim)
        self.vocab_size, self.length, self.hidden, self.depth = vocab_size, length, hidden, depth
        self.embed_dim, self.time_dim = embed_dim, time_dim
        self.embed = nn.Parameter(torch.randn(vocab_size + 1, embed_dim) / embed_dim ** 0.5)
        self.time_embed = nn.Sequential(
            FourierTimeEmbedding(time_dim), nn.Linear(time_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden)
        )
        self.inp = nn.Linear(length * embed_dim, hidden)
        self.blocks = nn.ModuleList(_ResidualBlock(hidden) for _ in range(depth))
        self.out_norm = nn.LayerNorm(hidden)
        self.out = nn.Linear(hidden, length * vocab_size)

    def forward(self, x: Tensor, t: Tensor | float) -> Tensor:
        """``x``: tokens ``[B, L]`` or a soft one-hot ``[B, L, V + 1]``; ``t``: ``[B]`` -> logits ``[B, L, V]``."""
        h = token_one_hot(x, self.vocab_size, self.length, "TokenMLP").to(self.embed.dtype) @ self.embed
        t = broadcast_time(t, h)
        h = self.inp(h.flatten(1))
        temb = self.time_embed(t).to(h.dtype)
        for block in self.blocks:
            h = block(h, temb)
        return self.out(F.silu(self.out_norm(h))).view(-1, self.length, self.vocab_size)

    def config(self) -> dict[str, Any]:
        """JSON-serialisable constructor arguments; ``genkit.nets.build(net.config())`` rebuilds the net."""
        return {"name": self.name, "vocab_size": self.vocab_size, "length": self.length, "hidden": self.hidden,
                "depth": self.depth, "embed_dim": self.embed_dim, "time_dim": self.time_dim}
