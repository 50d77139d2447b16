"""Exact fields of Gaussian and Gaussian-mixture data under any path: the ground truth for solvers.

For data ``x_0 ~ sum_k w_k N(m_k, C_k)`` and ``x_t = alpha x_0 + sigma eps`` the marginal is
``sum_k w_k N(alpha m_k, alpha^2 C_k + sigma^2 I)``. With ``S_k = alpha^2 C_k + sigma^2 I`` and
responsibilities ``r_k(x)``, the posterior means are
``E[x_0 | x] = sum_k r_k (m_k + alpha C_k S_k^-1 (x - alpha m_k))`` and
``E[eps | x] = sum_k r_k sigma S_k^-1 (x - alpha m_k)``; the score is ``-sum_k r_k S_k^-1 (x - alpha m_k)``.
Every other prediction follows through the path. Covariances are eigendecomposed once.

>>> import torch
>>> from genkit.paths import get_path
>>> g = Gaussian(torch.zeros(2), torch.eye(2), get_path("linear"))
>>> round(g.log_prob(torch.zeros(1, 2)).item(), 4)  # -log(2 pi)
-1.8379
>>> g.exact_flow(torch.ones(1, 2), 1.0, 0.0)  # N(0, I) -> N(0, I): the linear path's flow is the identity
tensor([[1., 1.]])
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .errors import ConfigError, ShapeError
from .paths import PREDICTIONS, Path, broadcast_time

__all__ = ["GaussianMixture", "Gaussian", "ClassConditionalMixture"]


class GaussianMixture:
    """Exact field of a Gaussian mixture: ``weights [K]``, ``means [K, D]``, ``covs [K, D, D]``.

    Call it like any field: ``gm(x, t) -> [B, D]`` in the parametrization ``prediction``.
    """

    def __init__(self, weights: Tensor, means: Tensor, covs: Tensor, path: Path, prediction: str = "velocity"):
        weights, means, covs = (torch.as_tensor(v, dtype=torch.float64) for v in (weights, means, covs))
        if means.ndim != 2 or weights.shape != (means.shape[0],) or covs.shape != means.shape + means.shape[1:]:
            raise ShapeError(
                f"need weights [K], means [K, D], covs [K, D, D]; got {tuple(weights.shape)}, "
                f"{tuple(means.shape)}, {tuple(covs.shape)}"
            )
        if (weights < 0).any() or not torch.isclose(weights.sum(), torch.tensor(1.0, dtype=torch.float64)):
            raise ConfigError(f"mixture weights must be >= 0 and sum to 1; got {weights.tolist()}")
        if prediction not in PREDICTIONS:
            raise ConfigError(f"unknown prediction {prediction!r}; choose one of {PREDICTIONS}")
        covs = 0.5 * (covs + covs.transpose(-1, -2))
        lam, U = torch.linalg.eigh(covs)
        if (lam <= 0).any():
            raise ConfigError(
                f"covariances must be positive definite; smallest eigenvalue {lam.min().item():.3g}. "
                "Add a small multiple of the identity."
            )
        self.weights, self.means, self.covs, self.eigvals, self.eigvecs = weights, means, covs, lam, U
        self.path, self.prediction = path, prediction

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def with_prediction(self, prediction: str) -> GaussianMixture:
        """The same mixture seen as another parametrization."""
        return GaussianMixture(self.weights, self.means, self.covs, self.path, prediction)

    def _parts(self, x: Tensor, t: Tensor | float):
        """Per-component whitened coordinates and the log responsibilities, in float64."""
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ShapeError(f"x must have shape [batch, {self.dim}]; got {tuple(x.shape)}")
        t64 = broadcast_time(t, x).to(torch.float64)
        xd = x.to(torch.float64)
        a = self.path.alpha(t64)[:, None, None]  # [B, 1, 1]
        s = self.path.sigma(t64)[:, None, None]
        var = a ** 2 * self.eigvals[None] + s ** 2  # [B, K, D]
        diff = xd[:, None, :] - a * self.means[None]  # [B, K, D]
        proj = torch.einsum("bkd,kde->bke", diff, self.eigvecs)  # coordinates in each eigenbasis
        logn = -0.5 * (proj ** 2 / var).sum(-1) - 0.5 * torch.log(2 * math.pi * var).sum(-1)
        logw = torch.log(self.weights)[None] + logn  # [B, K]
        return a, s, var, proj, logw

    def _rotate(self, coords: Tensor) -> Tensor:
        return torch.einsum("bke,kde->bkd", coords, self.eigvecs)

    def __call__(self, x: Tensor, t: Tensor | float, **cond) -> Tensor:
        if cond:
            raise ConfigError(f"an analytic field takes no conditioning; got {sorted(cond)}")
        return self._predict(x, t)

    def _predict(self, x: Tensor, t: Tensor | float, keep: Tensor | None = None) -> Tensor:
        """The field of the mixture restricted to the components ``keep [B, K]`` (bool) of each sample, their
        weights renormalised; all components where ``keep`` is None."""
        a, s, var, proj, logw = self._parts(x, t)
        if keep is not None:
            logw = logw.masked_fill(~keep, -math.inf)
        r = torch.softmax(logw, dim=-1)[..., None]  # [B, K, 1]
        inv = proj / var
        if self.prediction == "score":
            out = -(r * self._rotate(inv)).sum(1)
        else:
            x0 = (r * (self.means[None] + self._rotate(a * self.eigvals[None] * inv))).sum(1)
            eps = (r * self._rotate(s * inv)).sum(1)
            out = self.path.from_x0_eps(x0, eps, x.to(torch.float64), broadcast_time(t, x).to(torch.float64),
                                        self.prediction)
        return out.to(x.dtype)

    def log_prob(self, x: Tensor, t: Tensor | float = 0.0) -> Tensor:
        """Exact ``log p_t(x)``, shape ``[batch]`` (in x's dtype)."""
        return torch.logsumexp(self._parts(x, t)[-1], dim=-1).to(x.dtype)

    def sample(self, n: int, t: float = 0.0, *, generator: torch.Generator | None = None,
               dtype: torch.dtype = torch.float32) -> Tensor:
        """``n`` exact samples of the marginal at time ``t`` (data at ``t = 0``)."""
        dev = generator.device if generator is not None else torch.device("cpu")
        k = torch.multinomial(self.weights.to(dev), n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, device=dev, dtype=torch.float64)
        U, lam = self.eigvecs.to(dev)[k], self.eigvals.to(dev)[k]
        x0 = self.means.to(dev)[k] + torch.einsum("nde,ne->nd", U, lam.sqrt() * z)
        if t != 0.0:
            eps = torch.randn(n, self.dim, generator=generator, device=dev, dtype=torch.float64)
            x0 = self.path.sample(x0, float(t), eps)
        return x0.to(dtype)

    def mean(self, t: float = 0.0) -> Tensor:
        """Exact mean of the marginal at ``t``."""
        return float(self.path.alpha(torch.tensor(float(t), dtype=torch.float64))) * (self.weights @ self.means)

    def covariance(self, t: float = 0.0) -> Tensor:
        """Exact covariance of the marginal at ``t``."""
        t64 = torch.tensor(float(t), dtype=torch.float64)
        a, s = float(self.path.alpha(t64)), float(self.path.sigma(t64))
        mu = self.weights @ self.means
        second = (self.weights[:, None, None] * (self.covs + self.means[:, :, None] * self.means[:, None, :])).sum(0)
        return a ** 2 * (second - mu[:, None] * mu[None, :]) + s ** 2 * torch.eye(self.dim, dtype=torch.float64)

    def exact_flow(self, x: Tensor, t: float, s: float) -> Tensor:
        """The probability-flow ODE map from time ``t`` to ``s`` in closed form (one Gaussian only):
        ``x_s = alpha_s m + S_s^(1/2) S_t^(-1/2) (x_t - alpha_t m)`` (all ``S`` share eigenvectors)."""
        if len(self.weights) != 1:
            raise ConfigError("exact_flow needs a single Gaussian; a mixture's ODE flow has no closed form")
        ts = torch.tensor([float(t), float(s)], dtype=torch.float64)
        (at, as_), (st, ss) = self.path.alpha(ts), self.path.sigma(ts)
        m, U, lam = self.means[0], self.eigvecs[0], self.eigvals[0]
        scale = torch.sqrt((as_ ** 2 * lam + ss ** 2) / (at ** 2 * lam + st ** 2))
        y = (x.to(torch.float64) - at * m) @ U
        return (as_ * m + (y * scale) @ U.T).to(x.dtype)

    def __repr__(self) -> str:
        return (f"GaussianMixture(K={len(self.weights)}, D={self.dim}, path={self.path!r}, "
                f"prediction={self.prediction!r})")


def Gaussian(mean: Tensor, cov: Tensor, path: Path, prediction: str = "velocity") -> GaussianMixture:
    """Exact field of Gaussian data ``N(mean [D], cov [D, D])`` (a one-component mixture)."""
    mean, cov = torch.as_tensor(mean, dtype=torch.float64), torch.as_tensor(cov, dtype=torch.float64)
    if mean.ndim != 1 or cov.shape != (mean.shape[0], mean.shape[0]):
        raise ShapeError(f"need mean [D] and cov [D, D]; got {tuple(mean.shape)} and {tuple(cov.shape)}")
    return GaussianMixture(torch.ones(1), mean[None], cov[None], path, prediction)


class ClassConditionalMixture:
    """Exact class-conditional field of a Gaussian mixture whose components carry classes: ``weights [K]``,
    ``means [K, D]``, ``covs [K, D, D]``, ``classes [K]`` (class id of each component, ``0..C-1``; several
    components may share one).

    ``field(x, t, labels=c)`` is the exact field of ``p(x_t | c) = sum_{k: class k = c} w_k N(alpha m_k, S_k) /
    sum_{k: class k = c} w_k``; the null label (``C`` unless given) gives the field of the whole mixture
    ``p(x_t)``, as a network trained with class dropout learns it. Any prediction type, like
    :class:`GaussianMixture` (``with_prediction``); ``num_classes``, ``class_names`` and ``null_label`` are what
    a conditional model exposes, so :func:`genkit.guidance.guide` guides it.

    >>> import torch
    >>> from genkit.paths import get_path
    >>> f = ClassConditionalMixture(torch.tensor([0.5, 0.5]), torch.tensor([[-2.0], [2.0]]),
    ...                             0.1 * torch.ones(2, 1, 1), torch.tensor([0, 1]), get_path("linear"), "x0")
    >>> f(torch.zeros(2, 1), 1.0, labels=torch.tensor([1, 2]))   # t = 1: class 1's mean; null: the mixture's
    tensor([[2.],
            [0.]])
    """

    def __init__(self, weights: Tensor, means: Tensor, covs: Tensor, classes: Tensor, path: Path,
                 prediction: str = "velocity", *, null_label: int | None = None,
                 class_names: list[str] | None = None):
        self.mixture = GaussianMixture(weights, means, covs, path, prediction)
        classes = torch.as_tensor(classes)
        if classes.shape != self.mixture.weights.shape or classes.is_floating_point() or classes.dtype == torch.bool:
            raise ShapeError(f"classes must be integer class ids [K]={list(self.mixture.weights.shape)}, one per "
                             f"component; got {classes.dtype} {list(classes.shape)}")
        classes = classes.long()
        if (classes < 0).any():
            raise ConfigError(f"class ids must be >= 0; got {classes.tolist()}")
        self.num_classes = int(classes.max()) + 1
        missing = sorted(set(range(self.num_classes)) - set(classes.tolist()))
        if missing:
            raise ConfigError(f"classes {missing} own no component; number the classes 0..C-1 without gaps")
        self.null_label = self.num_classes if null_label is None else int(null_label)
        if 0 <= self.null_label < self.num_classes:
            raise ConfigError(f"null_label {self.null_label} is a real class (0..{self.num_classes - 1}); pick one "
                              "outside them, e.g. the default C")
        if class_names is not None and len(class_names) != self.num_classes:
            raise ConfigError(f"class_names has {len(class_names)} names for {self.num_classes} classes")
        self.classes, self.class_names = classes, class_names
        self.path, self.prediction = path, prediction

    def with_prediction(self, prediction: str) -> ClassConditionalMixture:
        """The same mixture seen as another parametrization."""
        m = self.mixture
        return ClassConditionalMixture(m.weights, m.means, m.covs, self.classes, self.path, prediction,
                                       null_label=self.null_label, class_names=self.class_names)

    def component_mask(self, labels: Tensor) -> Tensor:
        """``[B, K]`` bool: the components of each label's class (all of them for the null label)."""
        labels = labels.to(self.classes.device)
        return (self.classes[None] == labels[:, None]) | (labels == self.null_label)[:, None]

    def __call__(self, x: Tensor, t: Tensor | float, *, labels: Tensor) -> Tensor:
        if not torch.is_tensor(labels) or labels.shape != (x.shape[0],) or labels.is_floating_point():
            got = f"{labels.dtype} {list(labels.shape)}" if torch.is_tensor(labels) else type(labels).__name__
            raise ShapeError(f"labels must be integer class ids [{x.shape[0]}]; got {got}")
        ok = ((labels >= 0) & (labels < self.num_classes)) | (labels == self.null_label)
        if not bool(ok.all()):
            raise ConfigError(f"labels {labels[~ok][:5].tolist()} are neither classes 0..{self.num_classes - 1} nor "
                              f"the null label {self.null_label}")
        return self.mixture._predict(x, t, self.component_mask(labels))

    def __repr__(self) -> str:
        return (f"ClassConditionalMixture(K={len(self.classes)}, classes={self.num_classes}, D={self.mixture.dim}, "
                f"path={self.path!r}, prediction={self.prediction!r})")
