"""A normalizing flow as a distribution: a standard Normal base and a list of transforms.

The transforms map data to the base (``forward``, the density direction): ``log p(x) = log N(z; 0, I) +
sum log |det dz/dx|``; sampling runs their inverses in reverse order. Transforms built with a context are given
the flow's context; context-free ones (permutations, LU layers) are not.

>>> import torch
>>> from genkit.models.flows import CouplingSpline, Flow, Permutation
>>> flow = Flow([CouplingSpline(2, bins=4), Permutation.reverse(2), CouplingSpline(2, bins=4)], features=2)
>>> x, logp = flow.sample_and_log_prob(3, generator=torch.Generator().manual_seed(0))
>>> x.shape, bool((flow.log_prob(x) - logp).abs().max() < 1e-5)
(torch.Size([3, 2]), True)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ...errors import ConfigError, ShapeError
from .transforms import Transform

__all__ = ["Flow"]


class Flow(nn.Module):
    """``Flow(transforms, features, context_features=0)``: ``log_prob(x, context)``, ``sample(n, context,
    generator=)``, ``rsample`` (with gradients) and ``sample_and_log_prob`` (one pass). Inputs are
    ``[batch, features]``; a context is ``[batch, context_features]`` (or one row ``[context_features]``,
    shared by all ``n`` samples)."""

    #: Where the flow's samples live; every transform must act there (:meth:`_check_domain`).
    domain = "real"

    def __init__(self, transforms: Sequence[Transform], features: int, context_features: int = 0):
        super().__init__()
        name = type(self).__name__
        if not (isinstance(features, int) and features >= 1):
            raise ConfigError(f"a {name} needs features >= 1; got features={features!r}")
        for i, t in enumerate(transforms):
            if not isinstance(t, Transform):
                raise ConfigError(f"{name} transform {i} is a {type(t).__name__}, not a genkit flow Transform")
            self._check_domain(i, t)
            if t.features != features:
                raise ConfigError(f"{name} transform {i} ({type(t).__name__}) acts on {t.features} features, the "
                                  f"flow on {features}; build every transform with features={features}")
            if t.context_features not in (0, context_features):
                raise ConfigError(f"{name} transform {i} ({type(t).__name__}) takes context_features="
                                  f"{t.context_features}, the flow {context_features}; build them alike")
        self.transforms = nn.ModuleList(transforms)
        self.features, self.context_features = features, context_features
        self.register_buffer("_ref", torch.zeros(()), persistent=False)  # follows .to(device, dtype)

    def _check_domain(self, i: int, t: Transform) -> None:
        if t.domain != "real":
            raise ConfigError(f"Flow transform {i} ({type(t).__name__}) acts on a {t.domain}, but a Flow has a "
                              "standard Normal base on R^D; build a CompactFlow(transforms, features, "
                              f"domain={t.domain!r}) (a uniform base on the {t.domain}) instead")

    def _context(self, context: Tensor | None, n: int) -> Tensor | None:
        name = type(self).__name__
        if not self.context_features:
            if context is not None:
                raise ShapeError(f"this {name} was built without a context (context_features=0); pass context=None")
            return None
        if context is None:
            raise ShapeError(f"this {name} is conditional; pass context=[batch, {self.context_features}]")
        if context.dim() == 1:
            context = context.expand(n, -1)
        if context.shape != (n, self.context_features):
            raise ShapeError(f"{name} expects context [{n}, {self.context_features}] (or [{self.context_features}]); "
                             f"got {tuple(context.shape)}")
        return context

    def _base_log_prob(self, z: Tensor) -> Tensor:
        """The base density ``log N(z; 0, I)`` ``[batch]``."""
        return -0.5 * (z * z).sum(1) - 0.5 * self.features * math.log(2 * math.pi)

    def _base_draw(self, n: int, generator: torch.Generator | None) -> Tensor:
        """``n`` base draws ``[n, features]`` from ``generator`` on the flow's device and dtype."""
        dev = self._ref.device if generator is None else generator.device
        z = torch.randn(n, self.features, generator=generator, dtype=self._ref.dtype, device=dev)
        return z.to(self._ref.device)

    def log_prob(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """``log p(x | context)``, shape ``[batch]``, in nats."""
        if x.dim() != 2 or x.shape[1] != self.features:
            raise ShapeError(f"{type(self).__name__}.log_prob expects x [batch, {self.features}]; got "
                             f"{tuple(x.shape)}")
        context = self._context(context, x.shape[0])
        total = x.new_zeros(x.shape[0])
        for t in self.transforms:
            x, ld = t(x, context if t.context_features else None)
            total = total + ld
        return self._base_log_prob(x) + total

    def _run(self, n: int, context: Tensor | None, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
        if not (isinstance(n, int) and n >= 1):
            raise ConfigError(f"number of samples must be an int >= 1; got n={n!r}")
        context = self._context(context, n)
        z = self._base_draw(n, generator)
        logp = self._base_log_prob(z)
        for t in reversed(self.transforms):
            z, ld = t.inverse(z, context if t.context_features else None)
            logp = logp - ld
        return z, logp

    def rsample(self, n: int, context: Tensor | None = None, *,
                generator: torch.Generator | None = None) -> Tensor:
        """``n`` samples, differentiable in the flow's parameters (and the context)."""
        return self._run(n, context, generator)[0]

    @torch.no_grad()
    def sample(self, n: int, context: Tensor | None = None, *, generator: torch.Generator | None = None) -> Tensor:
        """``n`` samples ``[n, features]`` without gradients."""
        return self._run(n, context, generator)[0]

    def sample_and_log_prob(self, n: int, context: Tensor | None = None, *,
                            generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Samples and their ``log p`` from one pass through the inverses (differentiable, like ``rsample``)."""
        return self._run(n, context, generator)
