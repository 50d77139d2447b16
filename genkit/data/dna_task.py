"""The DNA-like task ``dna``: enhancer-like sequences from a known generator, with a known activity.

A stand-in, shipped with genkit and computable without downloads, for the DRAKES enhancer benchmark (Gosai et al.
sequences, an Enformer activity oracle): sequences over ``ACGT`` (ids ``A=0, C=1, G=2, T=3``, V = 4) of length
``L`` (default :data:`LENGTH` = 100), drawn as

1. a **background** from a first-order Markov chain (:data:`TRANSITIONS`, start distribution :data:`START`; CpG
   depleted as in vertebrate genomes: ``P(G | C) = 0.08``);
2. ``n ~ Poisson(rate)`` motif **instances**, ``n <= max_sites`` (``rate`` = 2 for the natural set), each a
   motif ``k`` with probability :data:`MOTIF_PROBS` drawn position by position from its position weight matrix
   (consensus :data:`MOTIFS` with probability :data:`PWM_MATCH`, each other letter ``(1 - PWM_MATCH) / 3``), written
   over the background at a uniform start (later instances may overwrite earlier ones).

Its **activity** (:func:`activity`, the ground truth an oracle learns) is a sum of motif occupancies: the log-odds
score of motif ``k`` at start ``i`` is ``s_ki = sum_j log(PWM_k[j, x_{i+j}] / 0.25)``, the occupancy ``o_k =
sum_i sigmoid(BETA * (s_ki - tau_k))`` with ``tau_k = max_score_k - 3`` (an exact instance scores ``sigmoid(3 *
BETA)``, one mismatch 0.26 of that; background windows about 0), and

    ``activity(x) = sum_k WEIGHTS[k] * o_k + COOPERATIVITY * tanh(o_0) * tanh(o_1)``

so motifs 0 to 2 activate, motif 3 represses, and the first two act together. On a soft one-hot ``[B, L, V]`` the
scores are the expected log-odds (a 1-D convolution of the one-hot with the log-odds), so the activity is
differentiable there and equals the token version exactly on hard one-hots: it can serve as an exact
differentiable reward.

:func:`labelled` gives ``(x, y)`` pairs for training activity oracles: a mix of natural sequences and enriched
ones (up to 8 planted motifs on average, mostly activators, so the labels cover the high activities a
fine-tuned model reaches),
``y = activity(x) + noise``, in two disjoint splits ``"finetune"`` and ``"eval"`` (different seeds), as the DRAKES
benchmark trains its fine-tuning and evaluation oracles on different data. :mod:`genkit.finetune.oracles` trains
the oracles.

>>> x = dna(8, generator=torch.Generator().manual_seed(0))
>>> x.shape, x.dtype
(torch.Size([8, 100]), torch.int64)
>>> bool(torch.allclose(activity(x), activity(torch.nn.functional.one_hot(x, 4).float()).double()))
True
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import ConfigError, DataError, ShapeError
from .sequences import DNA, TOKEN_STATISTICS, encode

__all__ = ["LENGTH", "TRANSITIONS", "START", "MOTIFS", "MOTIF_PROBS", "WEIGHTS", "COOPERATIVITY", "PWM_MATCH",
           "BETA", "SPLITS", "dna", "activity", "occupancy", "log_odds", "labelled", "motif_counts",
           "dna_statistics"]

#: The default sequence length.
LENGTH = 100
#: The background chain's transition probabilities ``P(next | current)``, rows and columns in ``ACGT`` order.
TRANSITIONS = ((0.32, 0.18, 0.22, 0.28),
               (0.30, 0.28, 0.08, 0.34),
               (0.26, 0.24, 0.28, 0.22),
               (0.20, 0.22, 0.26, 0.32))  # fmt: skip
#: The background chain's first-letter distribution.
START = (0.28, 0.22, 0.22, 0.28)
#: The motifs' consensus sequences (CRE-like, NF-kB-like, C/EBP-like activators; a GC-rich repressor).
MOTIFS = ("TGACGTCA", "GGGAATTTCC", "TTGCGCAA", "CCGCGGAC")
#: How often each motif is planted.
MOTIF_PROBS = (0.3, 0.3, 0.2, 0.2)
#: Each motif's contribution to the activity per occupied site.
WEIGHTS = (1.0, 1.0, 0.5, -1.5)
#: The weight of the motif 0 / motif 1 interaction ``tanh(o_0) tanh(o_1)``.
COOPERATIVITY = 1.0
#: The probability of the consensus letter at each motif position.
PWM_MATCH = 0.92
#: The slope of the occupancy sigmoid (per nat of log-odds).
BETA = 2.0
#: The two disjoint oracle-training splits and their seeds.
SPLITS = {"finetune": 1_000_003, "eval": 2_000_003}
_MARGIN = 3.0  # tau_k = max score - _MARGIN
_ENRICHED = (0.4, 0.4, 0.15, 0.05)  # the enriched oracle-training sequences' motif probabilities


def _pwm(motif: str) -> Tensor:
    """The position weight matrix ``[m, 4]`` (float64) of a consensus."""
    other = (1 - PWM_MATCH) / (len(DNA) - 1)
    pwm = torch.full((len(motif), len(DNA)), other, dtype=torch.float64)
    pwm[torch.arange(len(motif)), encode(motif)] = PWM_MATCH
    return pwm


def log_odds(k: int) -> Tensor:
    """Motif ``k``'s log-odds ``[m, 4]`` (float64) against the uniform background, ``log(PWM / 0.25)``."""
    return (_pwm(MOTIFS[k]) * len(DNA)).log()


def _check_n(n: object, what: str = "n") -> int:
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
        raise ConfigError(f"{what} must be a positive int, got {n!r}")
    return int(n)


def dna(n: int, *, generator: torch.Generator | None = None, length: int = LENGTH, rate: float = 2.0,
        max_sites: int = 4, motif_probs: tuple[float, ...] = MOTIF_PROBS) -> Tensor:
    """``n`` sequences ``[n, length]`` (long, ids of ``ACGT``) of the ``dna`` task (see the module): a Markov
    background with ``Poisson(rate)`` planted motif instances (at most ``max_sites``), motif ``k`` with probability
    ``motif_probs[k]``."""
    n = _check_n(n)
    m = max(len(s) for s in MOTIFS)
    if isinstance(length, bool) or not isinstance(length, numbers.Integral) or length < m:
        raise ConfigError(f"length must be an int >= {m} (the longest motif), got {length!r}")
    if isinstance(rate, bool) or not isinstance(rate, numbers.Real) or not 0 <= rate < math.inf:
        raise ConfigError(f"rate must be a finite number >= 0 (the mean number of planted motifs), got {rate!r}")
    max_sites = _check_n(max_sites + 1, "max_sites + 1") - 1
    trans = torch.tensor(TRANSITIONS, dtype=torch.float64)
    x = torch.empty(n, length, dtype=torch.long)
    x[:, 0] = torch.multinomial(torch.tensor(START, dtype=torch.float64), n, replacement=True, generator=generator)
    u = torch.rand(n, length, generator=generator, dtype=torch.float64)
    cdf = trans.cumsum(-1)
    for i in range(1, length):  # inverse-CDF draws, one column at a time
        x[:, i] = (u[:, i, None] > cdf[x[:, i - 1]]).sum(-1).clamp(max=len(DNA) - 1)
    sites = torch.poisson(torch.full((n,), float(rate), dtype=torch.float64), generator=generator)
    sites = sites.clamp(max=max_sites).long()
    probs = torch.tensor(motif_probs, dtype=torch.float64)
    if probs.shape != (len(MOTIFS),) or not bool((probs >= 0).all()) or not float(probs.sum()) > 0:
        raise ConfigError(f"motif_probs must be {len(MOTIFS)} non-negative weights, one per motif; got {motif_probs!r}")
    pwms = [_pwm(s) for s in MOTIFS]
    for j in range(max_sites):
        k = torch.multinomial(probs, n, replacement=True, generator=generator)
        start_u = torch.rand(n, generator=generator, dtype=torch.float64)
        letters_u = torch.rand(n, m, generator=generator, dtype=torch.float64)
        for kk, pwm in enumerate(pwms):
            rows = ((k == kk) & (sites > j)).nonzero().flatten()
            if rows.numel() == 0:
                continue
            w = len(MOTIFS[kk])
            start = (start_u[rows] * (length - w + 1)).long().clamp(max=length - w)
            letters = (letters_u[rows, :w, None] > pwm.cumsum(-1)).sum(-1).clamp(max=len(DNA) - 1)
            cols = start[:, None] + torch.arange(w)
            x[rows[:, None], cols] = letters
    return x


def _one_hot(x: Tensor, what: str) -> Tensor:
    """Long ids ``[B, L]`` or a (soft) one-hot ``[B, L, 4]`` (``[B, L, 5]`` with a MASK column, dropped) as a
    float one-hot ``[B, L, 4]``."""
    if not torch.is_tensor(x):
        raise ShapeError(f"{what} takes token ids [B, L] or a one-hot [B, L, 4]; got {type(x).__name__}")
    if not x.is_floating_point():
        if x.ndim != 2:
            raise ShapeError(f"{what} takes token ids [B, L]; got shape {tuple(x.shape)}")
        if x.numel() and (int(x.min()) < 0 or int(x.max()) >= len(DNA)):
            raise DataError(f"{what}: token ids must be in 0..3 (A C G T); got ids from {int(x.min())} to "
                            f"{int(x.max())} (a MASK id of 4 means the sequence is not fully sampled)")
        return F.one_hot(x.long(), len(DNA)).double()
    if x.ndim != 3 or x.shape[-1] not in (len(DNA), len(DNA) + 1):
        raise ShapeError(f"{what} takes a one-hot [B, L, 4] (or [B, L, 5] with the MASK column); got "
                         f"{tuple(x.shape)}")
    return x[..., :len(DNA)]


def occupancy(x: Tensor) -> Tensor:
    """The motif occupancies ``o [B, K]`` of ids ``[B, L]`` or a (soft) one-hot ``[B, L, 4]`` (module formula);
    float64 for ids, the one-hot's dtype otherwise (differentiable)."""
    h = _one_hot(x, "occupancy")
    feats = h.transpose(1, 2)  # [B, 4, L]
    out = []
    for k, motif in enumerate(MOTIFS):
        lo = log_odds(k).to(feats)  # [m, 4]
        if h.shape[1] < len(motif):
            raise ShapeError(f"occupancy: sequences of length {h.shape[1]} are shorter than motif {motif}")
        score = F.conv1d(feats, lo.T[None])[:, 0]  # [B, L - m + 1]
        tau = float(lo.max(-1).values.sum()) - _MARGIN
        out.append(torch.sigmoid(BETA * (score - tau)).sum(-1))
    return torch.stack(out, -1)


def activity(x: Tensor) -> Tensor:
    """The ground-truth activity ``[B]`` of ids ``[B, L]`` or a (soft) one-hot ``[B, L, 4]`` (module formula)."""
    o = occupancy(x)
    w = torch.tensor(WEIGHTS, dtype=o.dtype, device=o.device)
    return o @ w + COOPERATIVITY * torch.tanh(o[:, 0]) * torch.tanh(o[:, 1])


def motif_counts(x: Tensor) -> Tensor:
    """Exact-consensus motif counts ``[B, K]`` (long) of ids ``x [B, L]``."""
    x = x.long().cpu()
    out = []
    for motif in MOTIFS:
        m = encode(motif)
        out.append((x.unfold(1, len(m), 1) == m).all(-1).sum(-1) if x.shape[1] >= len(m)
                   else torch.zeros(x.shape[0], dtype=torch.long))
    return torch.stack(out, -1)


def labelled(n: int, split: str, *, length: int = LENGTH, noise: float = 0.1) -> tuple[Tensor, Tensor]:
    """``(x [n, length], y [n])``: oracle-training pairs of the ``split`` (``"finetune"`` or ``"eval"``, disjoint:
    each split's seed is its own, see :data:`SPLITS`). Half are natural sequences (``rate = 2``), half enriched
    (four groups, ``rate`` 2, 4, 6 and 8, up to 10 sites, motifs 0 to 3 with probabilities 0.4, 0.4, 0.15,
    0.05), and ``y = activity(x) + noise * N(0, 1)``."""
    if split not in SPLITS:
        raise ConfigError(f"split must be one of {sorted(SPLITS)} (disjoint oracle-training sets); got {split!r}")
    n = _check_n(n)
    gen = torch.Generator().manual_seed(SPLITS[split])
    half = n // 2
    parts = [dna(half, generator=gen, length=length)] if half else []
    rest = n - half
    for g, rate in enumerate((2.0, 4.0, 6.0, 8.0)):
        size = rest // 4 + (g < rest % 4)
        if size:
            parts.append(dna(size, generator=gen, length=length, rate=rate, max_sites=10, motif_probs=_ENRICHED))
    x = torch.cat(parts)[torch.randperm(n, generator=gen)]
    y = activity(x) + float(noise) * torch.randn(n, generator=gen, dtype=torch.float64)
    return x, y.float()


def dna_statistics(x: Tensor) -> dict[str, float]:
    """The ``dna`` set's own statistics of ids ``x [N, L]``: mean activity and the share of sequences holding each
    motif's exact consensus (``motif_<k>``)."""
    counts = motif_counts(x)
    stats = {"activity_mean": float(activity(x.cpu()).mean())}
    stats.update({f"motif_{MOTIFS[k]}": float((counts[:, k] > 0).double().mean()) for k in range(len(MOTIFS))})
    return stats


TOKEN_STATISTICS["dna"] = dna_statistics
