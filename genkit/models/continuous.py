"""What diffusion and flow-matching families share: a network read as a field through a path,
sampling with any solver, and likelihoods through the ODE."""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ConfigError, ShapeError
from ..fields import as_x0
from ..paths import PREDICTIONS, Path, broadcast_time, get_path
from ..solvers import Custom, Solution, Solver, TimeGrid, get_grid, get_solver, ode_log_prob, solve

__all__ = ["ContinuousModel"]


class ContinuousModel(nn.Module):
    """Base of continuous-time families. A model is a field: ``model(x, t) -> prediction``.

    Subclasses define ``loss(batch, generator=None) -> (loss, logs)``, ``family`` and extra config keys.
    """

    family = "continuous"

    def __init__(self, net: nn.Module, path: Path | str, prediction: str, sample_shape: Sequence[int]):
        super().__init__()
        if prediction not in PREDICTIONS:
            raise ConfigError(f"unknown prediction {prediction!r}; choose one of {PREDICTIONS}")
        if not hasattr(net, "config"):
            raise ConfigError(f"the network {type(net).__name__} needs a config() method to be saved; use a "
                              "genkit.nets network or add config()")
        self.net = net
        self.path = get_path(path)
        self.prediction = prediction
        self.sample_shape = tuple(int(s) for s in sample_shape)

    # --- the field -----------------------------------------------------------------------------------
    def net_input(self, x: Tensor, t: Tensor) -> Tensor:
        """What the network sees for ``x_t`` (identity here; diffusion rescales)."""
        return x

    def forward(self, x: Tensor, t: Tensor | float, **cond: Any) -> Tensor:
        if tuple(x.shape[1:]) != self.sample_shape:
            shape = ", ".join(map(str, self.sample_shape))
            raise ShapeError(f"{self.family} model expects inputs of shape [batch, {shape}]; got {tuple(x.shape)}")
        t = broadcast_time(t, x)
        try:
            return self.net(self.net_input(x, t), t, **cond)
        except RuntimeError as e:  # explained here, at no cost to the calls that work (a sampling loop's)
            p = next(self.net.parameters(), None)
            if p is not None and x.is_floating_point() and x.dtype != p.dtype:
                raise ShapeError(f"x is {x.dtype} but the {self.family} model's weights are {p.dtype}; convert one "
                                 f"of them (x.to({p.dtype}) or model.to({x.dtype}))") from e
            raise

    def check_batch(self, batch: Any) -> Tensor:
        if not torch.is_tensor(batch):
            raise ShapeError(f"{self.family}.loss expects a tensor batch [batch, {self.sample_shape}]; got "
                             f"{type(batch).__name__}. Unconditional families take data only, not (data, label).")
        if tuple(batch.shape[1:]) != self.sample_shape:
            raise ShapeError(f"batch has shape {tuple(batch.shape)} but the model was built for samples of shape "
                             f"{self.sample_shape}; rebuild the model with sample_shape={tuple(batch.shape[1:])}")
        return batch

    # --- sampling and densities ---------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, n: int, *, solver: str | Solver = "heun", steps: int | None = None,
               grid: str | TimeGrid | Tensor | Sequence[float] = "uniform", generator: torch.Generator | None = None,
               device: torch.device | str | None = None, return_solution: bool = False,
               **cond: Any) -> Tensor | Solution:
        """Draw ``n`` samples ``[n, *sample_shape]`` by solving from the prior at the grid's first time.

        ``steps`` defaults to 32 (a searched solver's own N; explicit grid times their own count).
        ``generator`` makes the prior draw (and any solver noise) reproducible; ``device`` defaults to the
        model's. With ``return_solution=True`` the full :class:`~genkit.solvers.Solution` (NFE, trajectory
        if asked through the solver) is returned.
        """
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
            raise ConfigError(f"n must be a positive integer; got {n!r}")
        n = int(n)
        p = next(self.parameters())
        device = torch.device(device) if device is not None else p.device
        if generator is not None and generator.device.type != device.type:
            raise ConfigError(f"the generator is on {generator.device} but sampling runs on {device}; create it with "
                              f"torch.Generator(device={str(device)!r})")
        x = self.path.sample_prior((n, *self.sample_shape), generator=generator, device=device, dtype=p.dtype)
        solver = get_solver(solver)
        if isinstance(grid, (list, tuple)) or (torch.is_tensor(grid) and grid.ndim == 1):
            ends = [float(grid[0]), float(grid[-1])] if len(grid) else []
            if len(ends) == 2 and ends[0] < ends[1]:
                raise ConfigError(f"sampling runs from noise (t = 1) down to data (t = 0); the grid runs up, from "
                                  f"t={ends[0]:g} to t={ends[1]:g}: reverse it")
        grid = self.default_grid(grid)
        if steps is None and solver.default_steps is None and not isinstance(get_grid(grid), Custom):
            steps = 32
        sol = solve(self, x, solver, steps, grid, generator=generator, **cond)
        t_end = float(sol.times[-1])
        if t_end > 0 and self.denoise_end:
            sol.samples = as_x0(self)(sol.samples, t_end, **cond)
            sol.nfe += 1
        return sol if return_solution else sol.samples

    #: Return E[x_0 | x_t] at the grid's last time when it ends above 0 (one extra evaluation).
    denoise_end = False

    def default_grid(self, grid):
        """Fill in the model's time range for a grid given by name (objects and explicit times are kept)."""
        return grid

    def log_prob(self, x: Tensor, **kwargs: Any) -> Tensor:
        """``log p(x)`` in nats through the probability-flow ODE over the model's time range (see
        :meth:`time_range` and :func:`genkit.solvers.ode_log_prob`)."""
        self.check_batch(x)
        t_min, t_max = self.time_range()
        kwargs.setdefault("t_min", t_min)
        kwargs.setdefault("t_max", t_max)
        return ode_log_prob(self, x, **kwargs)

    def time_range(self) -> tuple[float, float]:
        """``(t_min, t_max)`` the model was trained on and samples over."""
        return self.path.t_min, 1.0

    # --- config ---------------------------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        return {"family": self.family, "path": self.path.config(), "net": self.net.config(),
                "prediction": self.prediction, "sample_shape": list(self.sample_shape), **self.extra_config()}

    def extra_config(self) -> dict[str, Any]:
        return {}
