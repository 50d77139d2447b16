"""Token sequences: the synthetic DNA-like set ``motifs`` and a loader for the user's own token file.

Token data are long tensors ``[N, L]`` of ids in ``0..V-1`` (what :class:`genkit.models.MaskedDiffusion`
trains on), never floats: nothing rescales them, and :func:`genkit.train.batching.warn_scale` skips integer data.

``motifs`` (:func:`motifs`), over the alphabet ``ACGT`` (ids ``A=0, C=1, G=2, T=3``, V = 4), length ``L``
(default 32). Each sequence is drawn, independently, as

1. a background of ``L`` tokens i.i.d. uniform over the 4 letters;
2. one motif ``k`` uniform over :data:`MOTIFS` (``TATAAT``, the -10 box, and ``CACGTG``, the E-box; each of
   length ``m = 6``), written over the background at a start ``s`` uniform in ``0..L-m``.

So every sequence holds at least one motif, while a uniform random sequence of length 32 holds one with
probability about 1.3 %: :func:`motif_rate` tells the two apart. The entropy ``H`` of a sequence is bounded in
closed form (:func:`motifs_entropy_bounds`): ``H >= H(X | k, s) = (L - m) log 4`` and ``H <= H(X, k, s) = (L - m)
log 4 + log 2 + log(L - m + 1)`` nats. Any model's expected negative log-likelihood (a cross-entropy), and so
any upper bound on it such as an ELBO, is at least ``H``, hence at least the lower bound.

The draw is seeded by the generator and unlimited (like the toy sets), so :func:`genkit.data.held_out` gives two
fresh held-out draws.

:func:`load_tokens` reads the user's own sequences: a ``.npy`` of integers ``[N, L]`` (ids ``0..V-1``), or a
text file of one sequence per line, all of the same length, over an alphabet (given, e.g. ``"ACGT"``, or the
sorted set of the file's characters); blank lines are skipped.

>>> x = motifs(4, generator=torch.Generator().manual_seed(0))
>>> x.shape, x.dtype, float(motif_rate(x))
(torch.Size([4, 32]), torch.int64, 1.0)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..errors import ConfigError, DataError

__all__ = ["DNA", "MOTIFS", "motifs", "motif_rate", "motifs_entropy_bounds", "encode", "decode", "load_tokens",
           "token_frequencies", "TOKEN_SETS", "TOKEN_STATISTICS", "sequence_statistics"]

#: The ``motifs`` alphabet: token id ``i`` is ``DNA[i]``.
DNA = "ACGT"
#: The planted motifs of ``motifs``.
MOTIFS = ("TATAAT", "CACGTG")
#: Named token sets: name -> vocabulary size (their samples are long tensors [N, L]).
TOKEN_SETS: dict[str, int] = {"motifs": len(DNA), "dna": len(DNA)}
#: Each named token set's own statistics of samples ``[N, L]`` (:func:`sequence_statistics`); a set's module
#: adds its entry (:mod:`genkit.data.dna_task` adds ``dna``).
TOKEN_STATISTICS: dict[str, Callable[[Tensor], dict[str, float]]] = {
    "motifs": lambda x: {"motif_rate": motif_rate(x)}}


def encode(text: str, alphabet: str = DNA) -> Tensor:
    """The token ids ``[len(text)]`` of a string over ``alphabet``."""
    index = {c: i for i, c in enumerate(alphabet)}
    bad = sorted(set(text) - set(index))
    if bad:
        raise DataError(f"{text!r} holds characters {bad} outside the alphabet {alphabet!r}")
    return torch.tensor([index[c] for c in text], dtype=torch.long)


def decode(x: Tensor, alphabet: str = DNA) -> list[str]:
    """The strings of token ids ``x [N, L]`` over ``alphabet``."""
    return ["".join(alphabet[int(i)] for i in row) for row in x]


def motifs(n: int, *, generator: torch.Generator | None = None, length: int = 32) -> Tensor:
    """``n`` sequences ``[n, length]`` (long, ids of :data:`DNA`) of the ``motifs`` set (see the module)."""
    m = max(len(s) for s in MOTIFS)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"n must be a positive int (number of sequences), got {n!r}")
    if isinstance(length, bool) or not isinstance(length, int) or length < m:
        raise ConfigError(f"length must be an int >= {m} (the motif length), got {length!r}")
    x = torch.randint(0, len(DNA), (n, length), generator=generator)
    k = torch.randint(0, len(MOTIFS), (n,), generator=generator)
    s = torch.randint(0, length - m + 1, (n,), generator=generator)
    table = torch.stack([encode(motif) for motif in MOTIFS])  # [K, m]
    cols = s[:, None] + torch.arange(m)
    x.scatter_(1, cols, table[k])
    return x


def motif_rate(x: Tensor) -> float:
    """The share of sequences ``x [N, L]`` that hold at least one of :data:`MOTIFS` anywhere."""
    if not torch.is_tensor(x) or x.ndim != 2 or x.is_floating_point():
        raise DataError(f"motif_rate needs token ids [N, L]; got {getattr(x, 'shape', type(x).__name__)}")
    x = x.long().cpu()
    found = torch.zeros(x.shape[0], dtype=torch.bool)
    for motif in MOTIFS:
        m = encode(motif)
        if x.shape[1] >= len(m):
            windows = x.unfold(1, len(m), 1)  # [N, L - m + 1, m]
            found |= (windows == m).all(-1).any(-1)
    return float(found.double().mean())


def motifs_entropy_bounds(length: int = 32) -> tuple[float, float]:
    """``(lower, upper)`` bounds in nats on the entropy of one ``motifs`` sequence of ``length`` (the module's
    derivation): ``(L - m) log 4`` and ``(L - m) log 4 + log K + log(L - m + 1)``."""
    m = len(MOTIFS[0])
    low = (length - m) * math.log(len(DNA))
    return low, low + math.log(len(MOTIFS)) + math.log(length - m + 1)


def token_frequencies(x: Tensor, vocab_size: int) -> Tensor:
    """Per-position token frequencies ``[L, V]`` of ``x [N, L]`` (each row sums to 1)."""
    x = x.long().cpu()
    counts = torch.nn.functional.one_hot(x, vocab_size).double().sum(0)
    return counts / x.shape[0]


def sequence_statistics(name: str | None, x: Tensor) -> dict[str, float]:
    """The data set ``name``'s own statistics of token samples ``x`` (:data:`TOKEN_STATISTICS`: ``motif_rate``
    for ``motifs``, mean activity and motif shares for ``dna``; ``{}`` for other sets)."""
    stats = TOKEN_STATISTICS.get(name) if name is not None else None
    return stats(x) if stats is not None else {}


def load_tokens(path: str | Path, alphabet: str | None = None) -> tuple[Tensor, str | None]:
    """``(tokens [N, L] long, alphabet)`` from a ``.npy`` of integer ids ``[N, L]`` (alphabet None) or a text file
    of equal-length lines over ``alphabet`` (default: the sorted set of its characters)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"token file {path} does not exist")
    if path.suffix == ".npy":
        if alphabet is not None:
            raise ConfigError(f"{path} holds token ids already; an alphabet applies to text files only")
        try:
            arr = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise DataError(f"cannot read {path} as a .npy array ({e})") from None
        if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.integer) or arr.size == 0:
            raise DataError(f"{path} must hold integer token ids [N, L]; got {arr.dtype} of shape {arr.shape}")
        if arr.min() < 0:
            raise DataError(f"{path} holds a negative token id ({arr.min()}); ids are 0..V-1")
        return torch.from_numpy(arr.astype(np.int64)), None
    try:
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read {path} as text ({e})") from None
    lines = [line for line in lines if line]
    if not lines:
        raise DataError(f"{path} holds no sequences (one per line)")
    lengths = sorted({len(line) for line in lines})
    if len(lengths) > 1:
        first = next(i for i, line in enumerate(lines) if len(line) != len(lines[0]))
        raise DataError(f"{path}: sequences must all have the same length; line {first + 1} has {len(lines[first])} "
                        f"characters, the first {len(lines[0])} (lengths seen: {lengths[:5]}); pad or crop them")
    alphabet = alphabet if alphabet is not None else "".join(sorted(set("".join(lines))))
    return torch.stack([encode(line, alphabet) for line in lines]), alphabet
