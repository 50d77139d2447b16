"""Reward against naturalness, side by side: the numbers a user watches while fine-tuning or steering sequences
(user story 4), so they can stop before the model forgets what natural looks like.

:func:`sequence_report` scores token samples ``[N, L]`` by

- each named reward: mean and median (a fine-tuning oracle, an evaluation oracle trained on other data, the exact
  activity where the task has one);
- naturalness: the ``k``-mer correlation with the data (:func:`genkit.metrics.kmer_correlation`, the DRAKES
  benchmark's 3-mer Corr) and, given the pretrained model, the mean log-likelihood bound under it
  (``-nll_bound``: the ELBO in nats per sequence, a lower bound on ``log p_pre(x)``). The likelihood alone is not
  a drift measure: steered samples can be *more* likely than typical data (on the DNA-like task motif-rich
  sequences are, eval/results/bench_discrete.md: -132 -> -114 nats as the reward rises), so read it beside the
  k-mer correlation, which falls as samples drift;
- diversity: the mean normalised Hamming distance between samples and the share of distinct ones;
- the data set's own statistics (:func:`genkit.data.sequences.sequence_statistics`: mean activity and motif
  shares for ``dna``, the motif rate for ``motifs``).

Every value is a float, ready for JSON.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from ..data.sequences import sequence_statistics
from ..errors import ShapeError
from ..metrics import kmer_correlation, sequence_diversity, unique_fraction
from .rewards import Reward, as_reward

__all__ = ["sequence_report"]


@torch.no_grad()
def sequence_report(samples: Tensor, data: Tensor, *, rewards: Mapping[str, Reward | Any] | None = None,
                    pretrained: Any = None, k: int = 3, n_mc: int = 16, task: str | None = None,
                    generator: torch.Generator | None = None) -> dict[str, float]:
    """Reward and naturalness of ``samples [N, L]`` against ``data [M, L]`` (see the module). ``rewards`` maps a
    name to a reward (called on the long samples); ``pretrained`` is the pretrained masked diffusion model (its
    ``nll_bound`` with ``n_mc`` times from ``generator``); ``task`` names the data set for its statistics."""
    if not torch.is_tensor(samples) or samples.ndim != 2 or samples.is_floating_point():
        raise ShapeError(f"sequence_report takes token samples [N, L]; got "
                         f"{tuple(samples.shape) if torch.is_tensor(samples) else type(samples).__name__}")
    if not torch.is_tensor(data) or data.ndim != 2 or data.shape[1] != samples.shape[1]:
        raise ShapeError(f"sequence_report: data must be token ids [M, L = {samples.shape[1]}]; got "
                         f"{tuple(data.shape) if torch.is_tensor(data) else type(data).__name__}")
    out: dict[str, float] = {}
    for name, reward in (rewards or {}).items():
        r = as_reward(reward)(samples).double().cpu()
        out[f"{name}_mean"], out[f"{name}_median"] = float(r.mean()), float(r.median())
    out[f"kmer{k}_corr"] = kmer_correlation(samples, data, k=k)
    if pretrained is not None:
        nll = pretrained.nll_bound(samples.to(next(pretrained.parameters()).device), n_mc=n_mc, generator=generator)
        out["log_likelihood"] = float(-nll.double().mean())
    out["diversity"] = sequence_diversity(samples)
    out["unique"] = unique_fraction(samples)
    out.update(sequence_statistics(task, samples))
    return out
