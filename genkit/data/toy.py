"""Toy distributions in 2D (and a Gaussian mixture in any dimension), sampled in torch with a generator.

All sets are centred near the origin with roughly unit scale. The ``gmm`` set
samples from :func:`gmm_params` exactly, so tests can compare against its
closed-form density and score. Every set is drawn as a mixture of natural components (the two moons, the
eight Gaussians, the eight squares of the checkerboard, the two spiral arms, the four rings, the four mixture
components): :func:`toy_components` returns each sample's component with the very same draw as :func:`toy`, the
labels a class-conditional model trains on (:data:`COMPONENTS` names them).

>>> x = toy("moons", 100, generator=torch.Generator().manual_seed(0))
>>> x.shape
torch.Size([100, 2])
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from ..errors import ConfigError
from ..registry import Registry

__all__ = ["TOY", "toy", "toy_components", "COMPONENTS", "gmm_params"]

#: ``sampler(n, dim, generator) -> (x [n, dim] float32, component [n] int64)``
ToySampler = Callable[[int, int, "torch.Generator | None"], tuple[Tensor, Tensor]]
TOY: Registry[ToySampler] = Registry("toy data set")

#: The component (class) names of each toy set, in label order.
COMPONENTS: dict[str, list[str]] = {
    "moons": ["upper", "lower"],
    "8gaussians": [f"{45 * k} deg" for k in range(8)],
    "checkerboard": [f"square x{c - 2:+d} y{r - 2:+d}" for c in range(4) for r in (c % 2, c % 2 + 2)],
    "spirals": ["arm +", "arm -"],
    "rings": ["r 0.5", "r 1", "r 1.5", "r 2"],
    "gmm": [f"component {k} (weight {w})" for k, w in enumerate((0.4, 0.3, 0.2, 0.1))],
}


def _draw(name: str, n: int, generator: torch.Generator | None, dim: int) -> tuple[Tensor, Tensor]:
    sampler = TOY.get(name)
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ConfigError(f"n must be a positive int (number of samples), got {n!r}")
    if not isinstance(dim, int) or dim < 1:
        raise ConfigError(f"dim must be a positive int, got {dim!r}")
    return sampler(n, dim, generator)


def toy(name: str, n: int, *, generator: torch.Generator | None = None, dim: int = 2) -> Tensor:
    """Draw ``n`` samples ``[n, dim]`` (float32) from the toy set ``name`` (see ``TOY.names()``).

    Only ``gmm`` accepts ``dim != 2``.
    """
    return _draw(name, n, generator, dim)[0]


def toy_components(name: str, n: int, *, generator: torch.Generator | None = None,
                   dim: int = 2) -> tuple[Tensor, Tensor]:
    """``(x [n, dim], component [n])``: :func:`toy`'s samples (equal for an equal generator) and the mixture
    component each was drawn from, int64 in ``0..K-1`` with ``K = len(COMPONENTS[name])``.

    >>> x, k = toy_components("moons", 4, generator=torch.Generator().manual_seed(0))
    >>> bool((x == toy("moons", 4, generator=torch.Generator().manual_seed(0))).all()), k.tolist()
    (True, [0, 1, 0, 0])
    """
    return _draw(name, n, generator, dim)


def _only_2d(name: str, dim: int) -> None:
    if dim != 2:
        raise ConfigError(f"toy set {name!r} is 2D only, got dim={dim}; use dim=2, or 'gmm' for other dimensions")


def _polar(radius: Tensor, angle: Tensor) -> Tensor:
    return torch.stack([radius * angle.cos(), radius * angle.sin()], dim=1)


@TOY.register("moons")
def _moons(n: int, dim: int, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """Two interleaved half circles (as scikit-learn's ``make_moons``), noise 0.05, standardised."""
    _only_2d("moons", dim)
    upper = torch.rand(n, generator=generator) < 0.5
    angle = math.pi * torch.rand(n, generator=generator)
    circle = _polar(torch.ones(n), angle)
    lower = torch.stack([1.0 - circle[:, 0], 0.5 - circle[:, 1]], dim=1)
    x = torch.where(upper[:, None], circle, lower) + 0.05 * torch.randn(n, 2, generator=generator)
    return (x - torch.tensor([0.5, 0.25])) / torch.tensor([0.87, 0.5]), (~upper).long()


@TOY.register("8gaussians")
def _eight_gaussians(n: int, dim: int, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """Eight Gaussians (std 0.1) at angles k*pi/4 on the circle of radius sqrt(2)."""
    _only_2d("8gaussians", dim)
    k = torch.randint(0, 8, (n,), generator=generator)
    centres = _polar(torch.full((n,), math.sqrt(2.0)), k * (math.pi / 4))
    return centres + 0.1 * torch.randn(n, 2, generator=generator), k


@TOY.register("checkerboard")
def _checkerboard(n: int, dim: int, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """Uniform on the black squares of a 4x4 checkerboard over ``[-2, 2]^2``."""
    _only_2d("checkerboard", dim)
    x1 = 4 * torch.rand(n, generator=generator) - 2
    row = torch.randint(0, 2, (n,), generator=generator) * 2 - 2.0  # -2 or 0
    col = torch.floor(x1)
    x2 = torch.rand(n, generator=generator) + row + col % 2
    square = 2 * (col.long() + 2) + (row == 0).long()  # column -2..1, then the lower or the upper black square
    return torch.stack([x1, x2], dim=1), square


@TOY.register("spirals")
def _spirals(n: int, dim: int, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """Two interleaved spirals (FFJORD's ``2spirals``, arXiv:1810.01367), scaled by 1/5."""
    _only_2d("spirals", dim)
    turn = torch.sqrt(torch.rand(n, generator=generator)) * 3 * math.pi
    arm = torch.where(torch.rand(n, generator=generator) < 0.5, 1.0, -1.0)[:, None]
    x = torch.stack([-turn * turn.cos(), turn * turn.sin()], dim=1)
    x = x + 0.5 * torch.rand(n, 2, generator=generator)
    return (arm * x + 0.1 * torch.randn(n, 2, generator=generator)) / 5, (arm[:, 0] < 0).long()


@TOY.register("rings")
def _rings(n: int, dim: int, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """Four concentric circles of radii 0.5, 1, 1.5, 2 (equal weight), radial noise 0.04."""
    _only_2d("rings", dim)
    ring = torch.randint(0, 4, (n,), generator=generator)
    radius = 0.5 * (1 + ring).float()
    radius = radius + 0.04 * torch.randn(n, generator=generator)
    return _polar(radius, 2 * math.pi * torch.rand(n, generator=generator)), ring


def gmm_params(dim: int = 2) -> tuple[Tensor, Tensor, Tensor]:
    """Exact parameters of the ``gmm`` toy set in ``dim`` dimensions (float64).

    Four components with weights (0.4, 0.3, 0.2, 0.1); mean ``k`` has norm 1.5
    and points along ``cos(pi k / 2 + pi / 4 + pi j / dim)`` over coordinates
    ``j`` (the corners of a square in 2D, +-1.5 in 1D); covariance
    ``0.1 I + 0.15 u u^T`` is stretched along the unit mean direction ``u``.

    Returns:
        ``(weights [K], means [K, dim], covs [K, dim, dim])``.
    """
    if not isinstance(dim, int) or dim < 1:
        raise ConfigError(f"dim must be a positive int, got {dim!r}")
    weights = torch.tensor([0.4, 0.3, 0.2, 0.1], dtype=torch.float64)
    angle = 2 * math.pi * torch.arange(4, dtype=torch.float64)[:, None] / 4
    direction = torch.cos(angle + math.pi / 4 + math.pi * torch.arange(dim, dtype=torch.float64) / dim)
    unit = direction / direction.norm(dim=1, keepdim=True)
    covs = 0.1 * torch.eye(dim, dtype=torch.float64) + 0.15 * unit[:, :, None] * unit[:, None, :]
    return weights, 1.5 * unit, covs


@TOY.register("gmm")
def _gmm(n: int, dim: int, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """The Gaussian mixture of :func:`gmm_params` in ``dim`` dimensions."""
    weights, means, covs = gmm_params(dim)
    k = torch.multinomial(weights, n, replacement=True, generator=generator)
    z = torch.randn(n, dim, generator=generator, dtype=torch.float64)
    chol = torch.linalg.cholesky(covs)
    x = means[k] + (chol[k] @ z[:, :, None]).squeeze(-1)
    return x.float(), k
