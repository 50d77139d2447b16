"""Sample-quality and likelihood metrics. They take samples, features and densities, never model families.

Scalar metrics return Python floats (ready for JSON); two-sample metrics take
``x`` (model samples) and ``y`` (reference samples), both ``[N, ...]``, and
compute on the inputs' device.

>>> g = torch.Generator().manual_seed(0)
>>> x, y = torch.randn(500, 2, generator=g), torch.randn(500, 2, generator=g)
>>> energy_distance(x, x), energy_distance(x, y + 1.0) > energy_distance(x, y)
(0.0, True)
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import ConfigError, DataError, ShapeError

__all__ = [
    "sliced_wasserstein", "energy_distance", "mmd", "endpoint_rms", "ENDPOINT_ERROR", "NLL", "nll",
    "frechet_gaussians", "frechet_distance", "fid",
    "DigitsClassifier", "train_digits_classifier", "inception_features",
    "effective_sample_size", "log_z", "reweighted_mean", "reweighted_free_energy",
    "kmer_frequencies", "kmer_correlation", "sequence_diversity", "unique_fraction",
]  # fmt: skip


def _pair(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Flatten ``x [N, ...]`` and ``y [M, ...]`` to ``[N, D]``, ``[M, D]`` in a common float dtype."""
    if x.ndim < 2 or y.ndim < 2 or x.shape[1:] != y.shape[1:]:
        raise ShapeError(
            f"x and y must be batches [N, ...] with equal sample shapes, got {list(x.shape)} and {list(y.shape)}"
        )
    if x.shape[0] < 2 or y.shape[0] < 2:
        raise ShapeError(f"need at least 2 samples in each set, got {x.shape[0]} and {y.shape[0]}")
    dtype = torch.promote_types(torch.promote_types(x.dtype, y.dtype), torch.float32)
    return x.flatten(1).to(dtype), y.flatten(1).to(dtype)


def _dist(a: Tensor, b: Tensor) -> Tensor:
    # The exact (non-matmul) form keeps d(a, a) = 0, so a set's distance to itself is exactly 0.
    return torch.cdist(a, b, compute_mode="donot_use_mm_for_euclid_dist")


def sliced_wasserstein(
    x: Tensor, y: Tensor, n_projections: int = 256, p: int = 2, generator: torch.Generator | None = None
) -> float:
    """Monte-Carlo sliced p-Wasserstein distance ``(E_theta W_p^p(theta.x, theta.y))^(1/p)`` (POT).

    Directions ``theta`` are uniform on the sphere; POT's seed is drawn from
    ``generator``. For a pure shift ``y = x + m`` in ``D`` dimensions,
    ``SW_2 = |m| / sqrt(D)``.
    """
    import ot  # POT imports in seconds; only this metric needs it

    if not isinstance(n_projections, int) or n_projections < 1 or not p >= 1:
        raise ConfigError(f"need an int n_projections >= 1 and p >= 1, got n_projections={n_projections!r}, p={p!r}")
    x, y = _pair(x, y)
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
    return float(ot.sliced_wasserstein_distance(x, y, n_projections=n_projections, p=p, seed=seed))


def energy_distance(x: Tensor, y: Tensor) -> float:
    """Energy distance ``2 E|X-Y| - E|X-X'| - E|Y-Y'|`` (Szekely & Rizzo), V-statistic.

    The V-statistic (diagonal included) is >= 0 and exactly 0 when ``x`` and
    ``y`` are the same set; it is the square of scipy's ``energy_distance``
    in 1D. Memory is O(N M).
    """
    x, y = _pair(x, y)
    return float(2 * _dist(x, y).mean() - _dist(x, x).mean() - _dist(y, y).mean())


def mmd(
    x: Tensor, y: Tensor, bandwidths: Sequence[float] | None = None, *, unbiased: bool = False
) -> float:
    """Squared maximum mean discrepancy with a mixture of RBF kernels (Gretton et al., JMLR 2012).

    ``k(a, b) = mean_h exp(-|a - b|^2 / (2 h^2))`` over ``bandwidths``; the
    default ``None`` uses 0.5, 1 and 2 times the median pairwise distance of
    the reference set ``y`` (so comparing many ``x`` to one ``y`` keeps one
    kernel). The biased V-statistic (default) is >= 0 and 0 for identical
    sets; ``unbiased=True`` drops the diagonals and can be slightly negative.
    """
    x, y = _pair(x, y)
    if bandwidths is None:
        ref = y[:1000]
        pairwise = _dist(ref, ref)
        median = pairwise[~torch.eye(ref.shape[0], dtype=torch.bool, device=ref.device)].median()
        bandwidths = [float(median) * s for s in (0.5, 1.0, 2.0)]
    if len(bandwidths) == 0 or any(not h > 0 for h in bandwidths):
        raise ConfigError(f"bandwidths must be positive numbers, got {list(bandwidths)}")

    def kernel_mean(a: Tensor, b: Tensor, drop_diagonal: bool) -> Tensor:
        sq = _dist(a, b).square()
        k = torch.stack([torch.exp(-sq / (2 * h * h)) for h in bandwidths]).mean(0)
        if not drop_diagonal:
            return k.mean()
        n = a.shape[0]
        return (k.sum() - k.diagonal().sum()) / (n * (n - 1))

    return float(kernel_mean(x, x, unbiased) + kernel_mean(y, y, unbiased) - 2 * kernel_mean(x, y, False))


#: The name of :func:`endpoint_rms` in every table that reports it (compare.py, secant.py, search_solver.py).
ENDPOINT_ERROR = "per-sample L2 RMS to the reference"


def endpoint_rms(x: Tensor, ref: Tensor) -> float:
    """Per-sample L2 RMS to the reference, ``sqrt(mean_i |x_i - ref_i|^2)`` over the samples ``i`` of ``x`` and
    ``ref`` (both ``[N, ...]``, paired: sample ``i`` of each comes from the same prior noise), in float64.

    The error measure of every solver table in genkit's scripts (:data:`ENDPOINT_ERROR`). It is the RMS of the
    per-sample Euclidean distances, not the per-element RMS (which is smaller by ``sqrt(D)`` for ``D`` numbers
    per sample), nor the per-element MSE.

    >>> endpoint_rms(torch.zeros(2, 4), torch.ones(2, 4))   # each sample is |1| * sqrt(4) = 2 away
    2.0
    """
    if x.shape != ref.shape or x.ndim < 1 or x.shape[0] < 1:
        raise ShapeError(f"x and ref must be paired batches [N, ...] of one shape; got {list(x.shape)} and "
                         f"{list(ref.shape)}")
    diff = (x.double() - ref.to(x.device).double()).reshape(x.shape[0], -1)
    return float(diff.square().sum(1).mean().sqrt())


@dataclass(frozen=True)
class NLL:
    """Mean negative log-likelihood: ``nats``, ``bits_per_dim = nats / (D ln 2)``, and its standard error in nats."""

    nats: float
    bits_per_dim: float
    stderr_nats: float


def nll(log_prob_fn: Callable[[Tensor], Tensor], x: Tensor, *, batch_size: int | None = None) -> NLL:
    """Mean NLL of ``x [N, ...]`` under ``log_prob_fn: [n, ...] -> [n]`` (log-density in nats).

    ``batch_size`` evaluates in chunks (gradients stay enabled, for densities
    that need autograd, e.g. continuous normalizing flows). ``-inf`` log
    densities give an infinite NLL; NaN raises :class:`DataError`.
    """
    chunks = [x] if batch_size is None else list(x.split(batch_size))
    logp = []
    for chunk in chunks:
        out = log_prob_fn(chunk)
        if not torch.is_tensor(out) or out.shape != (chunk.shape[0],):
            got = list(out.shape) if torch.is_tensor(out) else type(out).__name__
            raise ShapeError(f"log_prob_fn must return one log-density per sample, shape [{chunk.shape[0]}], got {got}")
        logp.append(out.detach().double())
    logp = torch.cat(logp)
    n_nan = int(torch.isnan(logp).sum())
    if n_nan:
        raise DataError(f"log_prob_fn returned NaN for {n_nan} of {logp.numel()} samples; check the model and inputs")
    nats = float(-logp.mean())
    stderr = float(logp.std() / math.sqrt(logp.numel())) if logp.numel() > 1 else float("nan")
    return NLL(nats=nats, bits_per_dim=nats / (x[0].numel() * math.log(2)), stderr_nats=stderr)


def _sqrtm_psd(c: Tensor) -> Tensor:
    w, v = torch.linalg.eigh(c)
    return (v * w.clamp(min=0).sqrt()) @ v.mT


def frechet_gaussians(mean1: Tensor, cov1: Tensor, mean2: Tensor, cov2: Tensor) -> float:
    """Squared Frechet (W2) distance between ``N(mean1, cov1)`` and ``N(mean2, cov2)``, in float64.

    ``|m1 - m2|^2 + tr(C1 + C2 - 2 (C1^1/2 C2 C1^1/2)^1/2)``, with symmetric
    eigen-decompositions instead of a general ``sqrtm`` (stable for singular ``C``).
    """
    m1, c1, m2, c2 = (a.double() for a in (mean1, cov1, mean2, cov2))
    f = m1.shape[-1]
    if m1.shape != (f,) or m2.shape != (f,) or c1.shape != (f, f) or c2.shape != (f, f):
        raise ShapeError(f"need means [F] and covariances [F, F], got {[list(a.shape) for a in (m1, c1, m2, c2)]}")
    s1 = _sqrtm_psd(c1)
    middle = s1 @ c2 @ s1
    cross = torch.linalg.eigvalsh((middle + middle.mT) / 2).clamp(min=0).sqrt().sum()
    return float((m1 - m2).square().sum() + c1.trace() + c2.trace() - 2 * cross)


def frechet_distance(x_feats: Tensor, y_feats: Tensor) -> float:
    """Frechet distance between Gaussians fitted to features ``[N, F]`` and ``[M, F]`` (FID's formula)."""
    x, y = _pair(x_feats, y_feats)

    def moments(a: Tensor) -> tuple[Tensor, Tensor]:
        a = a.double()
        return a.mean(0), torch.cov(a.T).reshape(a.shape[1], a.shape[1])

    return frechet_gaussians(*moments(x), *moments(y))


@torch.no_grad()
def _embed(images: Tensor, features: Callable[[Tensor], Tensor], batch_size: int) -> Tensor:
    out = torch.cat([features(chunk) for chunk in images.split(batch_size)])
    if out.ndim != 2 or out.shape[0] != images.shape[0]:
        raise ShapeError(f"features must map [N, ...] images to [N, F], got {list(out.shape)} for N={images.shape[0]}")
    return out


def fid(x: Tensor, y: Tensor, features: Callable[[Tensor], Tensor], *, batch_size: int = 256) -> float:
    """Frechet distance of ``features(x)`` and ``features(y)``; ``features`` maps images ``[N, C, H, W]`` to ``[N, F]``.

    With :func:`inception_features` this is the FID of Heusel et al.
    (arXiv:1706.08500); with ``DigitsClassifier.features`` a digits analogue.
    """
    return frechet_distance(_embed(x, features, batch_size), _embed(y, features, batch_size))


class DigitsClassifier(nn.Module):
    """Small CNN for 8x8 digits ``[N, 1, 8, 8]`` in ``[-1, 1]``.

    ``features(x) -> [N, feature_dim]`` (penultimate layer, for :func:`fid`);
    ``forward(x) -> logits [N, 10]``.
    """

    def __init__(self, width: int = 16, feature_dim: int = 64):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.SiLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.SiLU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.SiLU(),
            nn.Flatten(), nn.Linear(2 * width * 16, feature_dim), nn.SiLU(),
        )  # fmt: skip
        self.head = nn.Linear(feature_dim, 10)

    def features(self, x: Tensor) -> Tensor:
        """Penultimate activations ``[N, feature_dim]`` of images ``[N, 1, 8, 8]``."""
        if x.ndim != 4 or x.shape[1:] != (1, 8, 8):
            raise ShapeError(f"DigitsClassifier expects images [N, 1, 8, 8] in [-1, 1], got {list(x.shape)}")
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def train_digits_classifier(
    images: Tensor | None = None, labels: Tensor | None = None, steps: int = 300, *, batch_size: int = 64,
    lr: float = 3e-3, generator: torch.Generator | None = None
) -> DigitsClassifier:
    """Train :class:`DigitsClassifier` on ``images [N, 1, 8, 8]`` in ``[-1, 1]`` with integer ``labels [N]``
    (``genkit.data.digits("train")``, ``genkit.data.digits_labels("train")``) with Adam; returned in eval mode.
    Metrics take data, they load none.

    The defaults take about 3 s on one CPU core and reach about 97% accuracy on
    ``digits("test")``. Initialisation and batches come from ``generator``.
    """
    if images is None or labels is None:
        raise ConfigError("train_digits_classifier needs the training images and labels: "
                          "train_digits_classifier(digits('train'), digits_labels('train')) with "
                          "from genkit.data import digits, digits_labels")
    if images.ndim != 4 or tuple(images.shape[1:]) != (1, 8, 8) or labels.shape != images.shape[:1]:
        raise ShapeError(f"need images [N, 1, 8, 8] and labels [N]; got {tuple(images.shape)} and "
                         f"{tuple(labels.shape)}")
    x = images
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
    with torch.random.fork_rng(devices=[]):  # seeded init without touching the global RNG
        torch.manual_seed(seed)
        model = DigitsClassifier()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        idx = torch.randint(0, x.shape[0], (batch_size,), generator=generator)
        loss = F.cross_entropy(model(x[idx]), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval()


class _InceptionFeatures(nn.Module):
    """Images ``[N, 1 or 3, H, W]`` in ``[-1, 1]`` -> Inception-v3 pool features ``[N, 2048]``."""

    def __init__(self, inception: nn.Module):
        super().__init__()
        self.inception = inception

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 4 or x.shape[1] not in (1, 3):
            raise ShapeError(f"inception features need images [N, 1 or 3, H, W] in [-1, 1], got {list(x.shape)}")
        x = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        return self.inception(x.expand(-1, 3, -1, -1))


def inception_features(weights_path: str | None = None) -> nn.Module:
    """torchmetrics' FID Inception-v3 as a feature extractor for :func:`fid`.

    Needs ``torchmetrics`` and ``torch-fidelity`` (``pip install "torchmetrics[image]"``)
    and the weights ``pt_inception-2015-12-05-6726825d.pth``: downloaded by
    torch-fidelity on first use, or given as ``weights_path``. Raises
    :class:`ConfigError` saying what is missing.
    """
    missing = [m for m in ("torchmetrics", "torch_fidelity") if importlib.util.find_spec(m) is None]
    if missing:
        raise ConfigError(
            f"inception_features needs {' and '.join(missing)}: pip install 'torchmetrics[image]' "
            "(or pass any images -> [N, F] callable, e.g. DigitsClassifier.features, to fid)"
        )
    from torchmetrics.image.fid import NoTrainInceptionV3

    try:
        net = NoTrainInceptionV3(
            name="inception-v3-compat", features_list=["2048"], feature_extractor_weights_path=weights_path
        )
    except Exception as err:  # a failed download surfaces as URLError, OSError or RuntimeError
        raise ConfigError(
            f"could not load the FID Inception weights ({type(err).__name__}: {err}); download "
            "pt_inception-2015-12-05-6726825d.pth from the torch-fidelity GitHub releases and pass "
            "inception_features(weights_path=...)"
        ) from err
    return _InceptionFeatures(net)


# ---- importance weights (stochastic normalizing flows, Boltzmann generators) --------------------------------------

def _log_w(log_w: Tensor) -> Tensor:
    if not isinstance(log_w, Tensor) or log_w.dim() != 1 or log_w.shape[0] < 2:
        raise ShapeError(f"log weights must be a 1-D tensor of >= 2 values; got "
                         f"{tuple(log_w.shape) if isinstance(log_w, Tensor) else type(log_w).__name__}")
    if bool(torch.isnan(log_w).any()) or bool((log_w == math.inf).any()):
        raise DataError("log weights contain NaN or +inf; check the energy and the sampler for non-finite values")
    return log_w.detach().double()


def effective_sample_size(log_w: Tensor) -> float:
    """Kish's ``(sum w)^2 / sum w^2`` from log weights ``[n]`` (between 1 and n; n for equal weights)."""
    lw = _log_w(log_w)
    return float(torch.exp(2 * torch.logsumexp(lw, 0) - torch.logsumexp(2 * lw, 0)))


def log_z(log_w: Tensor) -> tuple[float, float]:
    """``(log Z, standard error)`` with ``Z = mean(w)``; the error by the delta method,
    ``se(log Z) = std(w) / (sqrt(n) mean(w))``."""
    lw = _log_w(log_w)
    n = lw.shape[0]
    est = torch.logsumexp(lw, 0) - math.log(n)
    r = torch.exp(lw - est)  # w / mean(w)
    se = torch.sqrt(((r - 1) ** 2).sum() / (n - 1) / n)
    return float(est), float(se)


def reweighted_mean(values: Tensor, log_w: Tensor) -> Tensor:
    """Self-normalised importance estimate ``sum w f / sum w`` of ``values`` ``[n]`` or ``[n, ...]``."""
    lw = _log_w(log_w)
    if values.shape[0] != lw.shape[0]:
        raise ShapeError(f"values [{values.shape[0]}, ...] and log weights [{lw.shape[0]}] need the same length")
    p = torch.softmax(lw, 0).to(values.dtype)
    return (p.reshape(-1, *([1] * (values.dim() - 1))) * values).sum(0)


def reweighted_free_energy(coord: Tensor, log_w: Tensor | None, edges: Tensor, *, shift: bool = True
                           ) -> tuple[Tensor, Tensor]:
    """``(bin centres, F)`` with ``F = -log p`` (kT) of the (re)weighted histogram of ``coord`` ``[n]`` over bin
    ``edges`` ``[m + 1]``; ``log_w=None`` gives the unweighted profile; empty bins are ``inf``; shifted to a
    minimum of 0 unless ``shift=False`` (then normalised as a density on the bins)."""
    c = coord.detach().double().reshape(-1).contiguous()
    e = edges.detach().double()
    lw = torch.zeros_like(c) if log_w is None else _log_w(log_w)
    if lw.shape[0] != c.shape[0]:
        raise ShapeError(f"coord [{c.shape[0]}] and log weights [{lw.shape[0]}] need the same length")
    if e.dim() != 1 or e.shape[0] < 2 or not bool((e[1:] > e[:-1]).all()):
        raise ConfigError("edges must be a 1-D increasing tensor of >= 2 values, e.g. torch.linspace(-2, 2, 41)")
    idx = torch.bucketize(c, e, right=True) - 1
    keep = (idx >= 0) & (idx < e.shape[0] - 1)
    w = torch.exp(lw - lw.max())
    h = torch.zeros(e.shape[0] - 1, dtype=torch.float64).index_add_(0, idx[keep], w[keep])
    p = h / (w.sum() * (e[1:] - e[:-1]))
    f = -torch.log(p)
    if shift:
        f = f - f[torch.isfinite(f)].min()
    return 0.5 * (e[1:] + e[:-1]), f


# --- token sequences ---------------------------------------------------------------------------------------------
def _tokens(x: Tensor, what: str) -> Tensor:
    if not torch.is_tensor(x) or x.ndim != 2 or x.is_floating_point():
        raise ShapeError(f"{what} takes token ids [N, L] (long); got "
                         f"{tuple(x.shape) if torch.is_tensor(x) else type(x).__name__}")
    if x.numel() and int(x.min()) < 0:
        raise DataError(f"{what}: token ids must be >= 0; got {int(x.min())}")
    return x.long().cpu()


def kmer_frequencies(x: Tensor, k: int, vocab_size: int) -> Tensor:
    """The frequencies ``[vocab_size ** k]`` (float64, summing to 1) of the ``k``-mers of ids ``x [N, L]``, over
    all ``N * (L - k + 1)`` windows; the k-mer ``(a_1, ..., a_k)`` has index ``sum_j a_j vocab_size ** (k - j)``."""
    x = _tokens(x, "kmer_frequencies")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= x.shape[1]:
        raise ConfigError(f"k must be an int in [1, L = {x.shape[1]}]; got {k!r}")
    if x.numel() and int(x.max()) >= vocab_size:
        raise DataError(f"kmer_frequencies: token id {int(x.max())} is outside the vocabulary of {vocab_size} "
                        "(a MASK id means the sequences are not fully sampled)")
    powers = vocab_size ** torch.arange(k - 1, -1, -1)
    index = (x.unfold(1, k, 1) * powers).sum(-1).flatten()
    counts = torch.bincount(index, minlength=vocab_size ** k).double()
    return counts / counts.sum()


def kmer_correlation(x: Tensor, y: Tensor, *, k: int = 3, vocab_size: int | None = None) -> float:
    """Pearson correlation between the ``k``-mer frequencies of samples ``x`` and data ``y`` (ids ``[N, L]``), the
    DRAKES benchmark's "3-mer Corr" naturalness measure: 1 for the same k-mer spectrum. ``vocab_size`` defaults to
    one more than the largest id in either."""
    x, y = _tokens(x, "kmer_correlation"), _tokens(y, "kmer_correlation")
    v = vocab_size if vocab_size is not None else int(max(x.max(), y.max())) + 1
    fx, fy = kmer_frequencies(x, k, v), kmer_frequencies(y, k, v)
    return float(torch.corrcoef(torch.stack([fx, fy]))[0, 1])


def sequence_diversity(x: Tensor) -> float:
    """The mean normalised Hamming distance between two different sequences of ``x [N, L]`` (``N >= 2``), over
    all ``N (N - 1)`` ordered pairs, computed exactly from per-position counts: ``1 - sum_l sum_v c_lv (c_lv - 1)
    / (N (N - 1) L)``. 0 when every sequence is the same; ``1 - 1 / V`` on average for uniform random ones."""
    x = _tokens(x, "sequence_diversity")
    n, length = x.shape
    if n < 2:
        raise DataError(f"sequence_diversity needs at least 2 sequences; got {n}")
    counts = F.one_hot(x).double().sum(0)  # [L, V]
    same = (counts * (counts - 1)).sum() / (n * (n - 1))
    return float(1 - same / length)


def unique_fraction(x: Tensor) -> float:
    """The share of distinct sequences among ``x [N, L]``."""
    x = _tokens(x, "unique_fraction")
    return float(torch.unique(x, dim=0).shape[0] / x.shape[0])
