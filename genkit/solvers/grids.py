"""Time grids: decreasing sequences of times from ``t_max`` (noise) to ``t_min`` (data).

A grid of ``n`` steps has ``n + 1`` points. Grids are objects (``Uniform()``, ``Karras(rho=7)``,
``LogSNR()``, ``Custom(times)``) with ``times(n, path) -> Tensor[n + 1]`` in float64; strings name them
in scripts (``get_grid("karras")``). Every grid, built-in or user-given, passes :func:`validate_grid`.

>>> from genkit.paths import get_path
>>> Uniform().times(4, get_path("linear")).tolist()
[1.0, 0.75, 0.5, 0.25, 0.0]
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ..errors import ConfigError, TimeGridError
from ..paths import Path
from ..registry import Registry

__all__ = ["TimeGrid", "Uniform", "Karras", "LogSNR", "Custom", "GRIDS", "get_grid", "validate_grid"]

GRIDS: Registry = Registry("time grid")


def validate_grid(times: Tensor | Sequence[float], *, min_steps: int = 1) -> Tensor:
    """Check a user grid: 1-D, at least ``min_steps + 1`` points, strictly monotone, inside ``[0, 1]``.
    Returns it as a float64 CPU tensor (a copy when the input was not one). Increasing grids (data -> noise) are
    allowed for encoding.

    >>> validate_grid(torch.tensor([1.0, 0.5, 0.0], dtype=torch.float32)).dtype
    torch.float64
    """
    t = torch.as_tensor(times).detach().to(device="cpu", dtype=torch.float64)
    if t.ndim != 1 or t.numel() < min_steps + 1:
        raise TimeGridError(
            f"a time grid must be 1-D with at least {min_steps + 1} points; got shape {tuple(t.shape)}"
        )
    if not torch.isfinite(t).all() or (t < 0).any() or (t > 1).any():
        raise TimeGridError(f"grid times must lie in [0, 1] (0 = data, 1 = noise); got {t.tolist()}")
    d = t[1:] - t[:-1]
    if not ((d < 0).all() or (d > 0).all()):
        raise TimeGridError(
            f"a time grid must be strictly monotone (sampling runs from 1 down to 0); got {t.tolist()}"
        )
    return t


def _check_n(n: int) -> None:
    if not isinstance(n, int) or n < 1:
        raise ConfigError(f"the number of steps must be a positive integer; got {n!r}")


class TimeGrid:
    """Base class: ``times(n, path)`` returns ``n + 1`` decreasing times in float64."""

    def times(self, n: int, path: Path) -> Tensor:
        raise NotImplementedError

    def _bounds(self, path: Path) -> tuple[float, float]:
        t_min = path.t_min if self.t_min is None else self.t_min
        if not 0 <= t_min < self.t_max <= 1:
            raise TimeGridError(f"need 0 <= t_min < t_max <= 1; got t_min={t_min}, t_max={self.t_max}")
        return t_min, self.t_max


@GRIDS.register("uniform")
class Uniform(TimeGrid):
    """Equal steps in t from ``t_max`` to ``t_min`` (default: the path's ``t_min``, 0 for most paths)."""

    def __init__(self, t_max: float = 1.0, t_min: float | None = None):
        self.t_max, self.t_min = float(t_max), t_min

    def times(self, n: int, path: Path) -> Tensor:
        _check_n(n)
        lo, hi = self._bounds(path)
        return validate_grid(torch.linspace(hi, lo, n + 1, dtype=torch.float64))


@GRIDS.register("karras")
class Karras(TimeGrid):
    """EDM's schedule (Karras et al. 2022, arXiv 2206.00364, eq. 5): steps uniform in
    ``sigma^(1/rho)`` of the equivalent VE noise level ``sigma/alpha``, between
    ``min(sigma_max, sigma(t_max))`` and ``sigma(t_min)`` (or ``sigma_min`` followed by a last step to
    ``t_min = 0``), mapped back to t. The first point is always ``t_max`` itself."""

    def __init__(self, rho: float = 7.0, sigma_min: float = 0.002, sigma_max: float = 80.0,
                 t_max: float = 1.0, t_min: float | None = None):
        if rho <= 0 or not 0 < sigma_min < sigma_max:
            raise ConfigError(f"karras grid needs rho > 0 and 0 < sigma_min < sigma_max; got {rho}, "
                              f"{sigma_min}, {sigma_max}")
        self.rho, self.sigma_min, self.sigma_max = float(rho), float(sigma_min), float(sigma_max)
        self.t_max, self.t_min = float(t_max), t_min

    def times(self, n: int, path: Path) -> Tensor:
        _check_n(n)
        lo, hi = self._bounds(path)
        s_hi = min(self.sigma_max, float(path.ve_sigma(torch.tensor(hi, dtype=torch.float64))))
        # ending above 0, the last point is t_min itself; ending at 0, EDM's last step goes sigma_min -> 0
        s_lo = float(path.ve_sigma(torch.tensor(lo, dtype=torch.float64))) if lo > 0 else self.sigma_min
        k = n + 1 if lo > 0 else n
        if k < 2 or s_lo >= s_hi:
            return Uniform(hi, lo).times(n, path)
        r = torch.linspace(0, 1, k, dtype=torch.float64)
        sig = (s_hi ** (1 / self.rho) + r * (s_lo ** (1 / self.rho) - s_hi ** (1 / self.rho))) ** self.rho
        return _finish(path.t_from_ve_sigma(sig).to(torch.float64), hi, lo, k == n + 1)


def _finish(t: Tensor, hi: float, lo: float, ends_at_lo: bool) -> Tensor:
    """Pin the end points exactly (the inverse log-SNR is a bisection) and validate."""
    t = t.clone()
    t[0] = hi
    if ends_at_lo:
        t[-1] = lo
    else:
        t = torch.cat([t, t.new_tensor([lo])])
    return validate_grid(t)


@GRIDS.register("logsnr")
class LogSNR(TimeGrid):
    """Steps uniform in log-SNR ``lambda = 2 log(alpha/sigma)`` (DPM-Solver's choice) between
    ``lambda(t_max)`` and ``lambda(t_min)``, clipped to ``[lambda_min, lambda_max]``; when clipped at
    ``lambda_max`` (always for ``t_min = 0``) a last step goes to ``t_min``."""

    def __init__(self, lambda_max: float = 12.0, lambda_min: float = -12.0, t_max: float = 1.0,
                 t_min: float | None = None):
        self.lambda_max, self.lambda_min = float(lambda_max), float(lambda_min)
        self.t_max, self.t_min = float(t_max), t_min

    def times(self, n: int, path: Path) -> Tensor:
        _check_n(n)
        lo, hi = self._bounds(path)
        l_hi = max(self.lambda_min, float(path.log_snr(torch.tensor(hi, dtype=torch.float64))))
        l_lo = min(self.lambda_max, float(path.log_snr(torch.tensor(lo, dtype=torch.float64))))
        ends_at_lo = lo > 0 and l_lo < self.lambda_max
        k = n + 1 if ends_at_lo else n
        if k < 2 or l_lo <= l_hi:
            return Uniform(hi, lo).times(n, path)
        lam = torch.linspace(l_hi, l_lo, k, dtype=torch.float64)
        times = _finish(path.t_from_log_snr(lam).to(torch.float64), hi, lo, ends_at_lo)
        reached = path.log_snr(times[times > 0])
        flat = (reached[1:] <= reached[:-1]).nonzero()
        if len(flat):
            top = float(reached[int(flat[0])])
            raise TimeGridError(
                f"logsnr grid: {n} steps up to lambda_max={self.lambda_max:g} repeat log-SNR values on the "
                f"{type(path).__name__} path: in float64 its log-SNR stops resolving such steps near {top:.3g} "
                f"(equal log-SNR makes exponential-integrator steps divide by zero). Use lambda_max <= "
                f"{math.floor(top) - 1} or fewer steps")
        return times


@GRIDS.register("custom")
class Custom(TimeGrid):
    """A user-given grid; ``n`` must equal its number of steps."""

    def __init__(self, times: Tensor | Sequence[float]):
        self._times = validate_grid(times)

    def times(self, n: int | None, path: Path) -> Tensor:
        if n is not None and n != len(self._times) - 1:
            raise ConfigError(f"the custom grid has {len(self._times) - 1} steps but {n} were asked for; "
                              "pass steps=None or the matching number")
        return self._times


def get_grid(grid: str | TimeGrid | Tensor | Sequence[float], **kwargs: Any) -> TimeGrid:
    """A grid by name (``uniform``, ``karras``, ``logsnr``) built with ``kwargs``, a TimeGrid unchanged, or explicit
    times. Options given with a built grid or explicit times would be ignored, so they are an error.

    >>> get_grid("uniform", t_max=0.5).t_max
    0.5
    """
    if isinstance(grid, str):
        try:
            return GRIDS.get(grid)(**kwargs)
        except TypeError as e:
            raise ConfigError(f"bad options for grid {grid!r}: {e}") from None
    if kwargs:
        what = f"a built {type(grid).__name__} grid" if isinstance(grid, TimeGrid) else "explicit grid times"
        raise ConfigError(f"options {sorted(kwargs)} given with {what}, which they cannot change; build the grid "
                          "with them instead (e.g. Uniform(t_max=0.5), or get_grid('uniform', t_max=0.5))")
    if isinstance(grid, TimeGrid):
        return grid
    return Custom(grid)
