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

import numpy as np
import torch
from torch import Tensor

from ..errors import ConfigError, TimeGridError
from ..paths import Path
from ..registry import Registry

__all__ = ["TimeGrid", "Uniform", "Karras", "LogSNR", "Custom", "Leading", "Trailing", "Linspace", "GRIDS",
           "get_grid", "validate_grid", "diffusers_timesteps"]

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
    v = t.tolist()  # a grid has a few dozen points: Python checks cost less than torch's per-op overhead
    if not all(0.0 <= a <= 1.0 for a in v):  # also False for NaN
        raise TimeGridError(f"grid times must lie in [0, 1] (0 = data, 1 = noise); got {v}")
    if not (all(a > b for a, b in zip(v, v[1:])) or all(a < b for a, b in zip(v, v[1:]))):
        raise TimeGridError(f"a time grid must be strictly monotone (sampling runs from 1 down to 0); got {v}")
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


def diffusers_timesteps(n: int, spacing: str, num_train_timesteps: int = 1000, steps_offset: int = 0) -> list[int]:
    """diffusers' ``DDIMScheduler(timestep_spacing=spacing).set_timesteps(n)`` timesteps (integers, decreasing),
    computed as diffusers does (``linspace`` and ``trailing`` ignore ``steps_offset`` there, and so here).

    >>> diffusers_timesteps(5, "leading"), diffusers_timesteps(3, "trailing"), diffusers_timesteps(3, "linspace")
    ([800, 600, 400, 200, 0], [999, 666, 332], [999, 500, 0])
    """
    _check_n(n)
    big = int(num_train_timesteps)
    if n > big:
        raise ConfigError(f"{n} steps exceed the {big} training timesteps of the schedule; use at most {big}")
    if spacing == "leading":
        ratio = big // n
        return [k * ratio + int(steps_offset) for k in range(n - 1, -1, -1)]
    if spacing == "trailing":
        # diffusers' own float arithmetic (numpy's arange, round half to even), bit for bit
        return (np.round(np.arange(big, 0, -big / n)).astype(np.int64) - 1).tolist()
    if spacing == "linspace":
        return np.linspace(0, big - 1, n).round()[::-1].astype(np.int64).tolist()
    raise ConfigError(f"unknown timestep spacing {spacing!r}; choose leading, trailing or linspace")


class _DiffusersSpacing(TimeGrid):
    """diffusers' timestep spacing as a genkit grid: ``n`` steps visit diffusers' ``n`` timesteps ``k`` at
    ``t = (k + 1) / N`` (genkit's ddpm path equals ``DDPMScheduler.alphas_cumprod[k]`` there, see
    :class:`genkit.paths.DDPMLinearPath`) and end at ``t = 0``, DDIM's final ``alpha = 1``
    (``set_alpha_to_one=True``). The last step, from the last timestep to ``t = 0``, is the final denoising
    step: a :class:`genkit.Diffusion` model runs it as ``E[x_0 | x_t]``, one evaluation, which is what DDIM's
    last step computes, so ``n`` steps cost ``n`` evaluations as in diffusers. ``N`` is the path's
    ``num_steps`` (1000 for paths without one), or ``num_train_timesteps`` when given.

    diffusers' ``DDIMScheduler.step`` goes from timestep ``k`` to ``k - N // n``, which is the next listed
    timestep for ``leading`` always, but for ``trailing`` and ``linspace`` only when the listed timesteps are
    evenly spaced by ``N // n`` (e.g. trailing at n dividing N); genkit's grid always steps to the next listed
    timestep."""

    spacing = ""

    def __init__(self, steps_offset: int = 0, num_train_timesteps: int | None = None):
        if isinstance(steps_offset, bool) or not isinstance(steps_offset, int) or steps_offset < 0:
            raise ConfigError(f"steps_offset must be a non-negative integer; got {steps_offset!r}")
        if num_train_timesteps is not None and (not isinstance(num_train_timesteps, int) or num_train_timesteps < 2):
            raise ConfigError(f"num_train_timesteps must be an integer >= 2; got {num_train_timesteps!r}")
        self.steps_offset, self.num_train_timesteps = steps_offset, num_train_timesteps

    def train_steps(self, path: Path) -> int:
        return self.num_train_timesteps or int(getattr(path, "num_steps", 1000))

    def timesteps(self, n: int, path: Path) -> list[int]:
        """diffusers' integer timesteps for ``n`` steps."""
        return diffusers_timesteps(n, self.spacing, self.train_steps(path), self.steps_offset)

    def times(self, n: int, path: Path) -> Tensor:
        big = self.train_steps(path)
        ks = self.timesteps(n, path)
        if ks[0] >= big:
            raise TimeGridError(f"{self.spacing} grid: steps_offset={self.steps_offset} puts the first timestep at "
                                f"{ks[0]}, past the last training timestep {big - 1}; lower steps_offset")
        t = torch.tensor([(k + 1) / big for k in ks] + [0.0], dtype=torch.float64)
        return validate_grid(t)

    @property
    def name(self) -> str:
        return self.spacing

    def __repr__(self) -> str:
        opts = [f"steps_offset={self.steps_offset}"] if self.steps_offset else []
        if self.num_train_timesteps is not None:
            opts.append(f"num_train_timesteps={self.num_train_timesteps}")
        return f"{type(self).__name__}({', '.join(opts)})"


@GRIDS.register("leading")
class Leading(_DiffusersSpacing):
    """diffusers' ``leading`` spacing (DDIMScheduler's default): timesteps ``k * (N // n) + steps_offset``,
    ``k = n - 1 .. 0``.

    >>> from genkit.paths import get_path
    >>> Leading().times(4, get_path("ddpm")).tolist()
    [0.751, 0.501, 0.251, 0.001, 0.0]
    """

    spacing = "leading"


@GRIDS.register("trailing")
class Trailing(_DiffusersSpacing):
    """diffusers' ``trailing`` spacing (Lin et al. 2023, arXiv 2305.08891, Table 2): timesteps
    ``round(N - i N / n) - 1``, starting at the last training timestep (``t = 1``)."""

    spacing = "trailing"


@GRIDS.register("linspace")
class Linspace(_DiffusersSpacing):
    """diffusers' ``linspace`` spacing: ``n`` timesteps ``round(linspace(0, N - 1, n))``, decreasing."""

    spacing = "linspace"


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
