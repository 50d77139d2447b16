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
from torch import Tensor

from ...errors import ConfigError
from .flow import Flow
from .transforms import Permutation, Transform

__all__ = ["CompactFlow"]

_DOMAINS = ("circle", "interval")


class CompactFlow(Flow):
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
        if domain not in _DOMAINS:
            raise ConfigError(f"CompactFlow domain must be one of {_DOMAINS}; got {domain!r}")
        self.domain = domain  # a plain attribute, read by the transform checks below (not a module or tensor)
        super().__init__(transforms, features, context_features)

    def _check_domain(self, i: int, t: Transform) -> None:
        if t.domain != self.domain and not isinstance(t, Permutation):
            raise ConfigError(f"CompactFlow transform {i} ({type(t).__name__}) acts on domain {t.domain!r}, "
                              f"the flow on {self.domain!r}; use transforms of that domain (e.g. CircularCoupling, "
                              "CircularSmoothCoupling for 'circle', SmoothCoupling for 'interval')")

    def base_log_prob(self) -> float:
        """The uniform base's log density: ``-features * log(2 pi)`` on the torus, 0 on ``[0, 1]^features``."""
        return -self.features * math.log(2 * math.pi) if self.domain == "circle" else 0.0

    def _base_log_prob(self, z: Tensor) -> Tensor:
        return z.new_full((z.shape[0],), self.base_log_prob())

    def _base_draw(self, n: int, generator: torch.Generator | None) -> Tensor:
        dev = self._ref.device if generator is None else generator.device
        z = torch.rand(n, self.features, generator=generator, dtype=self._ref.dtype, device=dev).to(self._ref.device)
        return (2 * z - 1) * math.pi if self.domain == "circle" else z
