"""Target energies: densities known only up to a constant, ``p(x) ∝ exp(-U(x))`` with ``U`` in units of kT.

Each energy has ``dim``, ``domain`` (``"real"``, or ``"torus"`` for angles on ``[-pi, pi)^dim``), ``energy(x)``
``[batch, dim] -> [batch]``, ``force(x) = -grad U`` by autograd (``create_graph=True`` keeps the graph for force
matching), ``log_prob_unnormalised(x) = -U``, ``bounds`` (a box holding all but a negligible share of the mass,
used by :func:`quadrature`), ``log_z`` (exact ``log ∫ exp(-U)`` where known, else None) and ``config()`` (a
dict that :func:`energy_from_config` rebuilds from). Scripts name them through :data:`ENERGIES`.

>>> u = get_energy("double_well")
>>> x = torch.tensor([[0.0, 0.0], [1.0, 2.0]])
>>> u.energy(x)
tensor([ 0.0000, -3.5000])
>>> q = quadrature(get_energy("gaussian_mixture"), n=201)
>>> abs(q.log_z - get_energy("gaussian_mixture").log_z) < 1e-6
True
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .errors import ConfigError, DataError, ShapeError
from .registry import Registry

__all__ = [
    "Energy", "ENERGIES", "get_energy", "energy_from_config",
    "DoubleWell", "MultiWell", "GaussianMixtureEnergy", "Rings", "TorusDihedral",
    "Quadrature", "quadrature",
]  # fmt: skip

ENERGIES: Registry[type] = Registry("energy")


class Energy:
    """Base class: subclasses set ``name``, ``dim``, ``domain``, ``bounds`` and implement ``_energy(x) -> [batch]``
    on a checked ``[batch, dim]`` float tensor."""

    name: str = "energy"
    domain: str = "real"
    dim: int
    bounds: tuple[tuple[float, float], ...]
    log_z: float | None = None

    def _energy(self, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _params(self) -> dict[str, Any]:
        return {}

    def config(self) -> dict[str, Any]:
        """``{"name": ..., **parameters}``; ``energy_from_config(e.config())`` rebuilds the same energy."""
        return {"name": self.name, **self._params()}

    def _check(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor):
            raise ShapeError(f"energy {self.name!r} takes a torch.Tensor [batch, {self.dim}], got {type(x).__name__}")
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ShapeError(f"energy {self.name!r} takes x of shape [batch, {self.dim}], got {list(x.shape)}; "
                             f"reshape with x.reshape(-1, {self.dim})")
        if not torch.is_floating_point(x):
            raise ShapeError(f"energy {self.name!r} takes a floating-point x, got dtype {x.dtype}; use x.float()")
        return x

    def energy(self, x: Tensor) -> Tensor:
        """``U(x)`` in kT, ``[batch, dim] -> [batch]``; a non-finite value is a DataError naming the input."""
        u = self._energy(self._check(x))
        bad = ~torch.isfinite(u)
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise DataError(
                f"energy {self.name!r} is not finite at {int(bad.sum())} of {u.shape[0]} inputs; the first is "
                f"x[{i}] = {x[i].detach().tolist()} with U = {float(u[i].detach())}; check the inputs for NaN/inf "
                "(e.g. a diverged sampler) or values far outside the energy's bounds "
                f"{[list(b) for b in self.bounds]}"
            )
        return u

    def log_prob_unnormalised(self, x: Tensor) -> Tensor:
        """``-U(x)`` ``[batch]``: the log density up to the constant ``log Z``."""
        return -self.energy(x)

    def force(self, x: Tensor, create_graph: bool = False) -> Tensor:
        """``-grad U(x)`` ``[batch, dim]`` by autograd. With ``create_graph=True`` the result stays differentiable
        (in ``x``, and in whatever ``x`` was computed from when it requires grad): what force matching needs."""
        with torch.enable_grad():
            xg = x if (create_graph and isinstance(x, Tensor) and x.requires_grad) else x.detach().requires_grad_(True)
            u = self.energy(xg)
            (grad,) = torch.autograd.grad(u.sum(), xg, create_graph=create_graph)
        return -grad

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self._params().items())
        return f"{type(self).__name__}({args})"


def get_energy(name: str, **params: Any) -> Energy:
    """The registered energy ``name`` built with ``params`` (see ``ENERGIES.names()``)."""
    cls = ENERGIES.get(name)
    try:
        return cls(**params)
    except TypeError as err:
        raise ConfigError(f"energy {name!r} does not take {sorted(params)}: {err}") from err


def energy_from_config(config: dict[str, Any]) -> Energy:
    """Rebuild an energy from :meth:`Energy.config`."""
    if not isinstance(config, dict) or "name" not in config:
        raise ConfigError(f"an energy config is a dict with a 'name' key, got {config!r}")
    params = dict(config)
    return get_energy(params.pop("name"), **params)


@ENERGIES.register("double_well")
class DoubleWell(Energy):
    """The double well of Stochastic Normalizing Flows (Wu, Köhler, Noé, NeurIPS 2020, arXiv 2002.06707):
    ``U(x) = a x_1 + b x_1^2 + c x_1^4 + 1/2 sum_{i>1} x_i^2``.

    Constants ``a = -0.5, b = -6`` are those the official notebook passes
    (``noegroup/stochastic_normalizing_flows``, ``experiment1_doublewell.ipynb``: ``DoubleWellEnergy(2, a=-0.5,
    b=-6)``); ``c = 1`` is the default the notebook leaves in place, read from bgflow's ``DoubleWellEnergy(dim,
    a=0, b=-4, c=1)`` (bgtorch's successor; bgtorch's own file was not available to check, so ``c`` is
    unverified against bgtorch and the paper's text, though it agrees with METHODS.md section 12). The tilt
    ``a < 0`` makes the right well (``x_1 ≈ 1.75``) deeper than the left (``x_1 ≈ -1.71``). :meth:`minima`
    gives the ``x_1`` of both wells; the ``x_1`` free-energy profile is ``a x_1 + b x_1^2 + c x_1^4`` plus a
    constant.
    """

    name = "double_well"

    def __init__(self, dim: int = 2, a: float = -0.5, b: float = -6.0, c: float = 1.0):
        if not isinstance(dim, int) or dim < 1:
            raise ConfigError(f"double_well dim must be an int >= 1, got {dim!r}")
        if not c > 0:
            raise ConfigError(f"double_well needs c > 0 (the quartic keeps the density normalisable), got {c!r}")
        self.dim, self.a, self.b, self.c = dim, float(a), float(b), float(c)
        self.bounds = ((-3.5, 3.5),) + ((-8.0, 8.0),) * (dim - 1)

    def _params(self) -> dict[str, Any]:
        return {"dim": self.dim, "a": self.a, "b": self.b, "c": self.c}

    def _energy(self, x: Tensor) -> Tensor:
        d = x[:, 0]
        return self.a * d + self.b * d**2 + self.c * d**4 + 0.5 * (x[:, 1:] ** 2).sum(1)

    def minima(self) -> list[float]:
        """The ``x_1`` of the local minima (the real roots of ``a + 2b x + 4c x^3 = 0`` with ``U'' > 0``), sorted."""
        import numpy as np

        roots = np.roots([4 * self.c, 0.0, 2 * self.b, self.a])
        real = sorted(float(r.real) for r in roots if abs(r.imag) < 1e-9)
        return [r for r in real if 2 * self.b + 12 * self.c * r**2 > 0]


@ENERGIES.register("multi_well")
class MultiWell(Energy):
    """``2^dim`` wells at the corners ``(±1, ..., ±1)``: ``U(x) = sum_i [h (x_i^2 - 1)^2 + s_i x_i]`` with barrier
    ``h`` kT between neighbouring wells and tilts ``s`` (default ``0.5, -0.25`` on the first two axes and 0 on the
    rest, so the 2-D wells all have different depths; one float is used for every axis)."""

    name = "multi_well"

    def __init__(self, dim: int = 2, barrier: float = 4.0, tilt: float | Sequence[float] | None = None):
        if not isinstance(dim, int) or dim < 1:
            raise ConfigError(f"multi_well dim must be an int >= 1, got {dim!r}")
        if not barrier > 0:
            raise ConfigError(f"multi_well barrier must be > 0 kT, got {barrier!r}")
        if tilt is None:
            tilt = ([0.5, -0.25] + [0.0] * dim)[:dim]
        tilts = [float(tilt)] * dim if isinstance(tilt, (int, float)) else [float(t) for t in tilt]
        if len(tilts) != dim:
            raise ConfigError(f"multi_well tilt needs one value or {dim} values (one per axis), got {tilt!r}")
        self.dim, self.barrier, self.tilt = dim, float(barrier), tilts
        self.bounds = ((-3.0, 3.0),) * dim

    def _params(self) -> dict[str, Any]:
        return {"dim": self.dim, "barrier": self.barrier, "tilt": list(self.tilt)}

    def _energy(self, x: Tensor) -> Tensor:
        s = torch.tensor(self.tilt, dtype=x.dtype, device=x.device)
        return (self.barrier * (x**2 - 1) ** 2 + s * x).sum(1)


@ENERGIES.register("gaussian_mixture")
class GaussianMixtureEnergy(Energy):
    """``U(x) = -log sum_k w_k exp(-|x - mu_k|^2 / (2 sigma_k^2))``: isotropic Gaussian bumps without their
    normalisers, so ``log Z = log sum_k w_k (2 pi sigma_k^2)^(dim/2)`` is known exactly (:attr:`log_z`)."""

    name = "gaussian_mixture"

    def __init__(self, means: Sequence[Sequence[float]] = ((-2.0, 0.0), (2.0, 1.0), (0.0, -2.0)),
                 sigmas: Sequence[float] = (0.5, 0.7, 0.4), weights: Sequence[float] = (0.5, 0.3, 0.2)):
        means_t = torch.as_tensor(means, dtype=torch.float64)
        sig, w = torch.as_tensor(sigmas, dtype=torch.float64), torch.as_tensor(weights, dtype=torch.float64)
        if means_t.ndim != 2 or sig.shape != (means_t.shape[0],) or w.shape != (means_t.shape[0],):
            raise ConfigError(f"gaussian_mixture needs means [K, dim], sigmas [K] and weights [K]; got shapes "
                              f"{list(means_t.shape)}, {list(sig.shape)}, {list(w.shape)}")
        if not bool((sig > 0).all()) or not bool((w > 0).all()):
            raise ConfigError(f"gaussian_mixture sigmas and weights must be > 0, got {sigmas!r}, {weights!r}")
        self.means, self.sigmas, self.weights = means_t, sig, w
        self.dim = int(means_t.shape[1])
        reach = 9.0 * float(sig.max())
        self.bounds = tuple((float(means_t[:, i].min()) - reach, float(means_t[:, i].max()) + reach)
                            for i in range(self.dim))
        self.log_z = float(torch.logsumexp(w.log() + 0.5 * self.dim * torch.log(2 * math.pi * sig**2), 0))

    def _params(self) -> dict[str, Any]:
        return {"means": self.means.tolist(), "sigmas": self.sigmas.tolist(), "weights": self.weights.tolist()}

    def _energy(self, x: Tensor) -> Tensor:
        mu, sig, w = (t.to(x) for t in (self.means, self.sigmas, self.weights))
        d2 = ((x[:, None, :] - mu) ** 2).sum(-1)  # [batch, K]
        return -torch.logsumexp(w.log() - d2 / (2 * sig**2), dim=1)


@ENERGIES.register("rings")
class Rings(Energy):
    """Concentric rings in 2-D: ``U(x) = -log sum_k exp(-(r - r_k)^2 / (2 sigma^2))`` with ``r = |x|`` (computed
    as ``sqrt(|x|^2 + 1e-12)``, so the force at the origin is finite)."""

    name = "rings"

    def __init__(self, radii: Sequence[float] = (1.0, 2.0, 3.0), sigma: float = 0.15):
        radii = [float(r) for r in radii]
        if not radii or min(radii) <= 0 or not sigma > 0:
            raise ConfigError(f"rings need radii > 0 and sigma > 0, got radii={radii!r}, sigma={sigma!r}")
        self.dim, self.radii, self.sigma = 2, radii, float(sigma)
        reach = max(radii) + 9.0 * self.sigma
        self.bounds = ((-reach, reach), (-reach, reach))

    def _params(self) -> dict[str, Any]:
        return {"radii": list(self.radii), "sigma": self.sigma}

    def _energy(self, x: Tensor) -> Tensor:
        r = torch.sqrt((x**2).sum(1, keepdim=True) + 1e-12)
        rk = torch.tensor(self.radii, dtype=x.dtype, device=x.device)
        return -torch.logsumexp(-((r - rk) ** 2) / (2 * self.sigma**2), dim=1)


@ENERGIES.register("torus_dihedral")
class TorusDihedral(Energy):
    """A two-angle energy on the torus ``[-pi, pi)^2``, shaped like a dipeptide's ``(phi, psi)`` map (genkit's
    own, not fitted to any molecule): a mixture of three von Mises wells near the C7eq / beta
    ``(-1.45, 1.25)``, alpha_R ``(-1.35, -0.75)`` and alpha_L ``(1.1, 0.6)`` basins,
    ``U = -log sum_k w_k exp(kappa_k [cos(phi - mu_k) + cos(psi - nu_k) - 2])``. Periodic in each angle by
    construction (inputs outside ``[-pi, pi)`` give the value of their wrapped angle) and C-infinity;
    ``log Z = log sum_k w_k (2 pi I0e(kappa_k))^2`` exactly (:attr:`log_z`, ``I0e`` the scaled Bessel function).
    """

    name = "torus_dihedral"
    domain = "torus"

    def __init__(self, centres: Sequence[Sequence[float]] = ((-1.45, 1.25), (-1.35, -0.75), (1.1, 0.6)),
                 kappas: Sequence[float] = (3.0, 4.0, 5.0), weights: Sequence[float] = (0.6, 0.3, 0.1)):
        c = torch.as_tensor(centres, dtype=torch.float64)
        k, w = torch.as_tensor(kappas, dtype=torch.float64), torch.as_tensor(weights, dtype=torch.float64)
        if c.ndim != 2 or c.shape[1] != 2 or k.shape != (c.shape[0],) or w.shape != (c.shape[0],):
            raise ConfigError(f"torus_dihedral needs centres [K, 2], kappas [K], weights [K]; got shapes "
                              f"{list(c.shape)}, {list(k.shape)}, {list(w.shape)}")
        if not bool((k > 0).all()) or not bool((w > 0).all()):
            raise ConfigError(f"torus_dihedral kappas and weights must be > 0, got {kappas!r}, {weights!r}")
        self.centres, self.kappas, self.weights = c, k, w
        self.dim = 2
        self.bounds = ((-math.pi, math.pi), (-math.pi, math.pi))
        self.log_z = float(torch.logsumexp(w.log() + 2 * torch.log(2 * math.pi * torch.special.i0e(k)), 0))

    def _params(self) -> dict[str, Any]:
        return {"centres": self.centres.tolist(), "kappas": self.kappas.tolist(), "weights": self.weights.tolist()}

    def _energy(self, x: Tensor) -> Tensor:
        c, k, w = (t.to(x) for t in (self.centres, self.kappas, self.weights))
        cosines = torch.cos(x[:, None, :] - c).sum(-1) - 2  # [batch, K]
        return -torch.logsumexp(w.log() + k * cosines, dim=1)


@dataclass(frozen=True)
class Quadrature:
    """A 2-D energy on a grid (float64): ``axes`` (two ``[n]`` grids), ``energy`` and ``density`` ``[n, n]``
    (indexed ``[i, j]`` = ``(axes[0][i], axes[1][j])``; the density is normalised on the grid), ``weights``
    (the quadrature weights per axis) and ``log_z``."""

    axes: tuple[Tensor, Tensor]
    weights: tuple[Tensor, Tensor]
    energy: Tensor
    density: Tensor
    log_z: float

    def marginal(self, axis: int) -> tuple[Tensor, Tensor]:
        """``(grid [n], p [n])``: the marginal density along ``axis`` (0 or 1), the other axis integrated out."""
        if axis not in (0, 1):
            raise ConfigError(f"axis must be 0 or 1 for a 2-D quadrature, got {axis!r}")
        other = self.weights[1 - axis]
        p = (self.density * (other[None, :] if axis == 0 else other[:, None])).sum(1 - axis)
        return self.axes[axis], p

    def free_energy(self, axis: int, shift: bool = True) -> tuple[Tensor, Tensor]:
        """``(grid [n], F [n])`` with ``F = -log p_marginal`` in kT along ``axis``, shifted to a minimum of 0 unless
        ``shift=False``: the profile stochastic normalizing flows are judged against."""
        grid, p = self.marginal(axis)
        f = -torch.log(p)
        return grid, (f - f.min()) if shift else f

    def sample(self, n: int, *, generator: torch.Generator | None = None, periodic: bool = False) -> Tensor:
        """``[n, 2]`` float64 samples of the grid density: a grid point drawn with probability ``density *
        weights``, then moved uniformly within its cell (``+- h / 2`` on each axis; ``periodic`` wraps the result
        into ``[-pi, pi)``, for a torus). The training set of a maximum-likelihood fit when the energy is all one
        has; its law differs from ``exp(-U) / Z`` only by the grid's resolution."""
        if not (isinstance(n, int) and n >= 1):
            raise ConfigError(f"number of samples must be an int >= 1; got n={n!r}")
        p = (self.density * self.weights[0][:, None] * self.weights[1][None, :]).reshape(-1)
        idx = torch.multinomial(p, n, replacement=True, generator=generator)
        m = self.axes[1].shape[0]
        out = []
        for axis, i in enumerate((idx // m, idx % m)):
            grid = self.axes[axis]
            h = float(grid[1] - grid[0])
            u = torch.rand(n, generator=generator, dtype=torch.float64) - 0.5
            out.append(grid[i] + h * u)
        x = torch.stack(out, 1)
        return torch.remainder(x + math.pi, 2 * math.pi) - math.pi if periodic else x


def quadrature(energy: Energy, n: int = 401, bounds: Sequence[Sequence[float]] | None = None) -> Quadrature:
    """Integrate ``exp(-U)`` of a 2-D energy on an ``n x n`` grid in float64: the trapezoid rule on
    ``bounds`` (default ``energy.bounds``) for a real domain, the periodic rectangle rule on ``[-pi, pi)`` (``n``
    points, the seam counted once) for a torus; both converge spectrally for smooth, decaying integrands.

    >>> q = quadrature(get_energy("double_well"), n=101)
    >>> q.density.shape, round(float((q.density * q.weights[0][:, None] * q.weights[1]).sum()), 12)
    (torch.Size([101, 101]), 1.0)
    """
    if getattr(energy, "dim", None) != 2:
        raise ConfigError(f"quadrature integrates 2-D energies; {energy!r} has dim {getattr(energy, 'dim', None)}")
    if not isinstance(n, int) or n < 3:
        raise ConfigError(f"quadrature needs n >= 3 grid points per axis, got {n!r}")
    axes, weights = [], []
    for lo, hi in (energy.bounds if bounds is None else bounds):
        if energy.domain == "torus":
            h = 2 * math.pi / n
            axes.append(-math.pi + h * torch.arange(n, dtype=torch.float64))
            weights.append(torch.full((n,), h, dtype=torch.float64))
        else:
            if not hi > lo:
                raise ConfigError(f"quadrature bounds need lo < hi, got ({lo}, {hi})")
            axes.append(torch.linspace(lo, hi, n, dtype=torch.float64))
            w = torch.full((n,), (hi - lo) / (n - 1), dtype=torch.float64)
            w[0] = w[-1] = w[0] / 2
            weights.append(w)
    g0, g1 = torch.meshgrid(axes[0], axes[1], indexing="ij")
    with torch.no_grad():
        u = energy.energy(torch.stack([g0.reshape(-1), g1.reshape(-1)], 1)).reshape(n, n)
    logw = torch.log(weights[0])[:, None] + torch.log(weights[1])[None, :]
    log_z = float(torch.logsumexp((-u + logw).reshape(-1), 0))
    return Quadrature(axes=(axes[0], axes[1]), weights=(weights[0], weights[1]), energy=u,
                      density=torch.exp(-u - log_z), log_z=log_z)
