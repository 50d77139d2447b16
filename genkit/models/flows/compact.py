"""A flow on a compact domain: a uniform base on the torus ``[-pi, pi)^D`` or the box ``[0, 1]^D``.

:class:`genkit.models.flows.Flow` has a standard Normal base on ``R^D``; transforms whose ``domain`` is
``"circle"`` or ``"interval"`` map their domain onto itself, so their flow starts from the uniform density
there: ``log q(x) = -D log(2 pi)`` (torus) or ``0`` (box) ``+ sum log |det dz/dx|``.

>>> import torch
>>> from genkit.models.flows import CircularCoupling, Permutation
>>> flow = CompactFlow([CircularCoupling(2, bins=4), Permutation.reverse(2), CircularCoupling(2, bins=4)], 2)
>>> x, logq = flow.sample_and_log_prob(3, generator=torch.Generator().manual_seed(0))
>>> x.shape, bool((flow.log_prob(x) - logq).abs().max() < 1e-5)
(torch.Size([3, 2]), True)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ...errors import ConfigError, ShapeError
from .transforms import Permutation, Transform

__all__ = ["CompactFlow"]

_DOMAINS = ("circle", "interval")


class CompactFlow(nn.Module):
    """``CompactFlow(transforms, features, context_features=0, domain="circle")`` with ``log_prob(x, context)``,
    ``sample``, ``rsample`` and ``sample_and_log_prob`` like :class:`Flow`. Every transform must act on
    ``domain``, or be a domain-free permutation (:class:`Permutation`, whose ``domain`` is ``"real"`` but
    which maps any box onto itself).

    >>> from genkit.models.flows import SmoothCoupling
    >>> flow = CompactFlow([SmoothCoupling(2, components=3)], 2, domain="interval")
    >>> u = (torch.arange(100) + 0.5) / 100
    >>> grid = torch.cartesian_prod(u, u)
    >>> round(float(flow.log_prob(grid).detach().exp().mean()), 4)  # integrates to 1 on [0, 1]^2
    1.0
    """

    def __init__(self, transforms: Sequence[Transform], features: int, context_features: int = 0, *,
                 domain: str = "circle"):
        super().__init__()
        if domain not in _DOMAINS:
            raise ConfigError(f"CompactFlow domain must be one of {_DOMAINS}; got {domain!r}")
        if not (isinstance(features, int) and features >= 1):
            raise ConfigError(f"a CompactFlow needs features >= 1; got features={features!r}")
        for i, t in enumerate(transforms):
            if not isinstance(t, Transform):
                raise ConfigError(f"CompactFlow transform {i} is a {type(t).__name__}, not a genkit flow Transform")
            if t.domain != domain and not isinstance(t, Permutation):
                raise ConfigError(f"CompactFlow transform {i} ({type(t).__name__}) acts on domain {t.domain!r}, "
                                  f"the flow on {domain!r}; use transforms of that domain (e.g. CircularCoupling, "
                                  "CircularSmoothCoupling for 'circle', SmoothCoupling for 'interval')")
            if t.features != features:
                raise ConfigError(f"CompactFlow transform {i} ({type(t).__name__}) acts on {t.features} features, "
                                  f"the flow on {features}; build every transform with features={features}")
            if t.context_features not in (0, context_features):
                raise ConfigError(f"CompactFlow transform {i} ({type(t).__name__}) takes context_features="
                                  f"{t.context_features}, the flow {context_features}; build them alike")
        self.transforms = nn.ModuleList(transforms)
        self.features, self.context_features, self.domain = features, context_features, domain
        self.register_buffer("_ref", torch.zeros(()), persistent=False)

    def _context(self, context: Tensor | None, n: int) -> Tensor | None:
        if not self.context_features:
            if context is not None:
                raise ShapeError("this CompactFlow was built without a context (context_features=0); pass "
                                 "context=None")
            return None
        if context is None:
            raise ShapeError(f"this CompactFlow is conditional; pass context=[batch, {self.context_features}]")
        if context.dim() == 1:
            context = context.expand(n, -1)
        if context.shape != (n, self.context_features):
            raise ShapeError(f"CompactFlow expects context [{n}, {self.context_features}] (or "
                             f"[{self.context_features}]); got {tuple(context.shape)}")
        return context

    def base_log_prob(self) -> float:
        """The uniform base's log density: ``-features * log(2 pi)`` on the torus, 0 on ``[0, 1]^features``."""
        return -self.features * math.log(2 * math.pi) if self.domain == "circle" else 0.0

    def log_prob(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """``log q(x | context)``, shape ``[batch]``, in nats (inputs outside the domain are a DataError)."""
        if x.dim() != 2 or x.shape[1] != self.features:
            raise ShapeError(f"CompactFlow.log_prob expects x [batch, {self.features}]; got {tuple(x.shape)}")
        context = self._context(context, x.shape[0])
        total = x.new_zeros(x.shape[0])
        for t in self.transforms:
            x, ld = t(x, context if t.context_features else None)
            total = total + ld
        return total + self.base_log_prob()

    def _run(self, n: int, context: Tensor | None, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
        if not (isinstance(n, int) and n >= 1):
            raise ConfigError(f"number of samples must be an int >= 1; got n={n!r}")
        context = self._context(context, n)
        z = torch.rand(n, self.features, generator=generator, dtype=self._ref.dtype,
                       device=self._ref.device if generator is None else generator.device).to(self._ref.device)
        if self.domain == "circle":
            z = (2 * z - 1) * math.pi
        logq = z.new_full((n,), self.base_log_prob())
        for t in reversed(self.transforms):
            z, ld = t.inverse(z, context if t.context_features else None)
            logq = logq - ld
        return z, logq

    def rsample(self, n: int, context: Tensor | None = None, *,
                generator: torch.Generator | None = None) -> Tensor:
        """``n`` samples, differentiable in the flow's parameters (implicit gradients through root solves)."""
        return self._run(n, context, generator)[0]

    @torch.no_grad()
    def sample(self, n: int, context: Tensor | None = None, *, generator: torch.Generator | None = None) -> Tensor:
        """``n`` samples ``[n, features]`` without gradients."""
        return self._run(n, context, generator)[0]

    def sample_and_log_prob(self, n: int, context: Tensor | None = None, *,
                            generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Samples and their ``log q`` from one pass through the inverses."""
        return self._run(n, context, generator)
