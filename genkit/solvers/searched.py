"""Searched solvers: Differentiable Solver Search (DSS; Wang et al., ICML 2025, arXiv 2505.21114).

A searched solver of ``N`` steps has two learned parts (float64):
- step logits ``a [N]``: steps ``softmax(a) * (t_start - t_end)``, positive and summing to the interval,
  times ``t_i = t_start - cumsum(steps)`` (``torch.cumsum``; the official ``_timesteps`` sums in place);
- a strictly lower-triangular coefficient matrix ``C [N, N]``.

Step ``i`` evaluates the field once, ``d_i``, and combines it with the past evaluations,
``D_i = sum_{j<i} C[i,j] d_j + (1 - sum_{j<i} C[i,j]) d_i``. Variant ``velocity`` (the paper's flow-matching
form) uses the velocity: ``x_{i+1} = x_i + (t_{i+1} - t_i) D_i``. Variant ``data`` (its DDPM form) uses the
data prediction in the DDIM step ``x_{i+1} = (s_{i+1}/s_i) x_i + (a_{i+1} - s_{i+1} a_i/s_i) D_i`` (``a`` alpha,
``s`` sigma), without the official file's duplicated, uncombined second update. With ``C = 0`` and uniform
steps it is Euler (DDIM) on the uniform grid. Every ``C[i, j<i]`` is searched (the official code restricts
the last two rows when ``N <= 6``). :func:`search_solver` fits ``a`` and ``C`` to a reference solution of a
frozen field; the artifact is ``solver.safetensors`` + ``solver.json``; :func:`register_searched` names it.

Beyond the paper (genkit extensions, each off by default, so the default search space is the paper's):
- ``eval_times``: the field is evaluated at ``t'_i = sigmoid(logit(t_i) + e_i)`` with a learned shift ``e_i``
  per step, decoupled from the integration times ``t_i`` (time-shifted evaluation as in the time-shift
  sampler of Li et al., ICLR 2024, arXiv 2305.15583, here searched rather than set by a rule). An evaluation
  at ``t_start = 1`` stays there (``logit(1)`` is infinite): without a teleport jump the first shift is inert;
- ``step_scales``: a learned factor ``s_i`` on each combined update (``D_i -> s_i D_i``), so the
  coefficients of a step need not sum to one (akin to the epsilon scaling of Ning et al., arXiv 2308.15321,
  here searched per step);
- ``teleport``: a Gaussian fit (:mod:`genkit.gaussian_fit`) replaces the first step by its closed-form flow from
  ``t_start`` to a searched ``t_jump`` at no evaluation (cf. the analytical first step of AMED, Zhou et al.,
  CVPR 2024, arXiv 2312.00094, and Wang & Vastola's teleportation); the ``N`` evaluations then run from
  ``t_jump``. The jump is one Gaussian for all conditioning (``cond`` reaches the field only). The jump is one more
  softmax segment: ``a`` has ``N + 1`` entries.

Never worse than the paper: a search returns its best iterate on held-out noise (not the last), and the extended
search (any extension on) runs the DSS search first and keeps it as a candidate, so on that held-out noise it
never ends worse than DSS with the same budget and seed (:func:`search_solver`).

>>> import torch
>>> from genkit.analytic import Gaussian
>>> from genkit.paths import get_path
>>> from genkit.solvers import solve
>>> g = Gaussian(torch.tensor([2.0]), torch.eye(1), get_path("linear"))
>>> s = search_solver(g, 2, shape=(1,), iters=5, batch=8, pool=16, holdout=16, reference_steps=10)
>>> solve(g, torch.zeros(3, 1), s, steps=2).samples.shape
torch.Size([3, 1])
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from collections.abc import Sequence
from pathlib import Path as FsPath
from typing import Any, Union

import torch
from torch import Tensor

from ..errors import CheckpointError, ConfigError, SolverError
from ..fields import Field, as_velocity, as_x0, check_field
from ..gaussian_fit import GaussianFit, GaussianFlowMap, fit_gaussian
from ..io import atomic_folder, file_sizes, genkit_version, read_json, read_tensors, write_json, write_tensors
from ..paths import Path, broadcast_time, path_from_config
from .base import SOLVERS, Solver, SolverState, get_solver, register_resolver
from .grids import TimeGrid, Uniform, get_grid
from .search_loop import LR_SCHEDULES, OPTIMISERS, loss_curve, optimise

__all__ = ["SearchedSolver", "search_solver", "load_searched_solver", "register_searched", "unregister_searched",
           "solver_home", "saved_solver_names", "find_saved", "check_new_name", "VARIANTS", "FORMAT_VERSION"]

VARIANTS = ("velocity", "data")
FORMAT_VERSION = 2  # 2: optional evaluation-time shifts, step scales and a teleport Gaussian
_TELEPORT_KEYS = ("teleport_mean", "teleport_eigvals", "teleport_eigvecs")
REFERENCE_FIT_RANK = 256  # teleport="reference": at most this many principal directions (artifact <= D x 256)
_KIND = "genkit.searched_solver"
PathLike = Union[str, "os.PathLike[str]"]


def _times(logits: Tensor, t_start: float, t_end: float) -> Tensor:
    """``[N + 1]`` times from ``t_start`` to ``t_end`` (pinned exactly), differentiable in ``logits``."""
    inner = t_start + (t_end - t_start) * torch.cumsum(torch.softmax(logits, 0), 0)[:-1]
    return torch.cat([logits.new_tensor([t_start]), inner, logits.new_tensor([t_end])])


def _shifted(starts: Tensor, shift: Tensor | None) -> Tensor:
    """Evaluation times ``sigmoid(logit(t) + shift)`` of the step starts ``t`` (``starts`` when no shift)."""
    if shift is None:
        return starts
    return torch.sigmoid(torch.logit(starts) + shift.to(device=starts.device, dtype=torch.float64))


def _direction(hist: Sequence[Tensor], c: Tensor, i: int, scales: Tensor | None) -> Tensor:
    """Update direction of searched step ``i``: the newest evaluation ``hist[-1]`` (step ``i``'s) with weight
    ``1 - sum_j c_ij`` plus ``sum_{j < i} c_ij hist[j]`` (so ``C = 0`` is the plain evaluation exactly), times
    ``scales[i]`` if given.
    One place for the search (differentiable) and the solver's ``step``."""
    d = hist[-1]
    if i:  # at C = 0 this is d exactly: 1 * d + 0 * d_j
        d = (1 - c[i, :i].sum()) * d
        for j in range(i):
            d = d + c[i, j] * hist[j]
    return d if scales is None else scales[i] * d


def _integrate(field: Field, x: Tensor, times: Tensor, coeffs: Tensor, variant: str, keep: bool,
               cond: dict[str, Any], shift: Tensor | None = None, scales: Tensor | None = None,
               teleport: GaussianFit | None = None) -> tuple[Tensor, list[Tensor]]:
    """Run the searched update over ``times`` (float64; ``[N + 1]``, or ``[N + 2]`` with a teleport jump first)
    with ``coeffs [N, N]`` and the optional extensions (module docstring); differentiable."""
    states = [x] if keep else []
    if teleport is not None:  # closed-form first segment, differentiable in its end time
        x = GaussianFlowMap(teleport.to(x.device), field.path)(x, times[0].to(x.device), times[1].to(x.device))
        times = times[1:]
        if keep:
            states.append(x)
    ts, c = times.to(device=x.device, dtype=x.dtype), coeffs.to(device=x.device, dtype=x.dtype)
    # evaluation times, decoupled from the integration times when shifted
    t_eval = _shifted(times[:-1].to(device=x.device), shift).to(x.dtype)
    gain_scale = scales.to(device=x.device, dtype=x.dtype) if scales is not None else None
    view = as_velocity(field) if variant == "velocity" else as_x0(field)
    if variant == "data":  # schedule in float64, differentiable in the times
        t64 = times.to(device=x.device, dtype=torch.float64)
        a, s = field.path.alpha(t64), field.path.sigma(t64)
        ratio, gain = (s[1:] / s[:-1]).to(x.dtype), (a[1:] - s[1:] * a[:-1] / s[:-1]).to(x.dtype)
    hist: list[Tensor] = []
    for i in range(len(ts) - 1):
        hist.append(view(x, broadcast_time(t_eval[i], x), **cond))
        d = _direction(hist, c, i, gain_scale)
        if variant == "velocity":  # the step is rounded from float64 exactly as Euler rounds it
            x = x + (times[i + 1] - times[i]).to(device=x.device, dtype=x.dtype) * d
        else:
            x = ratio[i] * x + gain[i] * d
        if keep:
            states.append(x)
    return x, states


def _checked_fit(fit: Any) -> GaussianFit:
    """``fit`` as a consistent float64 GaussianFit on the CPU; ConfigError otherwise."""
    if not isinstance(fit, GaussianFit):
        raise ConfigError(f"teleport must be a genkit.GaussianFit (fit_gaussian(data)) or None; got "
                          f"{type(fit).__name__}")
    mean, lam, vecs = (torch.as_tensor(v).detach().to("cpu", torch.float64) for v in (fit.mean, fit.eigvals,
                                                                                    fit.eigvecs))
    d, k = mean.shape[0] if mean.ndim == 1 else -1, lam.shape[0] if lam.ndim == 1 else -1
    ok = d >= 1 and 1 <= k <= d and vecs.shape == (d, k) and math.prod(fit.event_shape) == d
    finite = all(torch.isfinite(v).all() for v in (mean, lam, vecs)) and math.isfinite(fit.residual)
    if not (ok and finite and (lam >= 0).all() and fit.residual >= 0):
        raise ConfigError(f"inconsistent teleport Gaussian: mean {tuple(mean.shape)}, eigvals {tuple(lam.shape)}, "
                          f"eigvecs {tuple(vecs.shape)}, event shape {fit.event_shape}, residual {fit.residual} "
                          "(need mean [D], eigvals [k] >= 0, eigvecs [D, k], residual >= 0, all finite); build it "
                          "with genkit.fit_gaussian")
    return GaussianFit(mean, lam, vecs, float(fit.residual), tuple(fit.event_shape))


def _fit_at_data(fit: GaussianFit, path: Path, t: float) -> GaussianFit:
    """The data (t = 0) Gaussian whose marginal at ``t`` is ``fit``: mean / alpha, (variance - sigma^2) / alpha^2
    (clamped at 0). The identity at t = 0."""
    if t == 0.0:
        return fit
    t64 = torch.tensor(t, dtype=torch.float64)
    a, s2 = float(path.alpha(t64)), float(path.sigma(t64)) ** 2
    return type(fit)(fit.mean / a, ((fit.eigvals - s2) / a ** 2).clamp_min(0.0), fit.eigvecs,
                     max(fit.residual - s2, 0.0) / a ** 2, fit.event_shape)


class SearchedSolver(Solver):
    """A solver of exactly ``N`` evaluations searched for ``path`` over ``[t_start, t_end]``.

    Args:
        logits: ``[N]`` step logits (``zeros`` = uniform steps); ``[N + 1]`` with ``teleport``, the first entry
            being the closed-form jump.
        coefficients: ``[N, N]`` strictly lower-triangular multistep coefficients (``zeros`` = Euler/DDIM).
        path: the path of the fields it was searched for; fields of other paths are refused.
        t_start, t_end: the interval (sampling runs from ``t_start`` down to ``t_end``).
        variant: ``"velocity"`` or ``"data"`` (see the module docstring).
        info: JSON metadata of the search, saved with the artifact.
        eval_shift: ``[N]`` shifts of the evaluation times in logit(t) (None: evaluate at the step times).
        scales: ``[N]`` factors on the combined updates (None: 1).
        teleport: a :class:`~genkit.gaussian_fit.GaussianFit` whose flow makes the first, free segment.

    The grid given to ``solve`` supplies only the step count (must be ``N``) and the end points (must be
    the searched interval); the searched solver owns its interior times, ``solver.times``.
    """

    name, order, stochastic, fixed_step = "searched", 1, False, True

    def __init__(self, logits: Tensor, coefficients: Tensor, path: Path, t_start: float = 1.0, t_end: float = 0.0,
                 variant: str = "velocity", info: dict[str, Any] | None = None, name: str = "searched", *,
                 eval_shift: Tensor | None = None, scales: Tensor | None = None,
                 teleport: GaussianFit | None = None):
        logits = torch.as_tensor(logits).detach().to("cpu", torch.float64)
        coeffs = torch.as_tensor(coefficients).detach().to("cpu", torch.float64)
        if teleport is not None:
            teleport = _checked_fit(teleport)
        n = coeffs.shape[0] if coeffs.ndim == 2 else 0
        segments = n + (teleport is not None)
        if logits.ndim != 1 or n < 1 or coeffs.shape != (n, n) or logits.numel() != segments:
            want = "logits [N + 1] (the teleport jump, then N steps)" if teleport is not None else "logits [N]"
            raise ConfigError(f"need {want} and coefficients [N, N] with N >= 1; got logits {tuple(logits.shape)} "
                              f"and coefficients {tuple(coeffs.shape)}")
        extra = {}
        for key, value in (("eval_shift", eval_shift), ("scales", scales)):
            if value is not None:
                value = torch.as_tensor(value).detach().to("cpu", torch.float64)
                if value.shape != (n,) or not torch.isfinite(value).all():
                    raise ConfigError(f"{key} must hold {n} finite numbers (one per evaluation); got "
                                      f"{value.tolist()}")
            extra[key] = value
        if not (torch.isfinite(logits).all() and torch.isfinite(coeffs).all()) or torch.triu(coeffs).any():
            raise ConfigError("need finite logits and strictly lower-triangular coefficients (C[i, j] = 0 for j >= i);"
                              f" got {logits.tolist()} and {coeffs.tolist()}. If a search gave NaN, lower its lr")
        if variant not in VARIANTS or not isinstance(path, Path):
            raise ConfigError(f"need a variant in {VARIANTS} and a genkit Path (genkit.get_path(name)); got "
                              f"{variant!r} and {path!r}")
        if not 0.0 <= float(t_end) < float(t_start) <= 1.0:
            raise ConfigError(f"need 0 <= t_end < t_start <= 1 (sampling runs noise -> data); got "
                              f"t_start={t_start}, t_end={t_end}")
        self.logits, self.coefficients, self.path, self.variant, self.min_steps = logits, coeffs, path, variant, n
        self.eval_shift, self.scales = extra["eval_shift"], extra["scales"]
        self.teleport = teleport
        self.t_start, self.t_end, self.info, self.name = float(t_start), float(t_end), dict(info or {}), name

    num_steps = property(lambda self: self.coefficients.shape[0],
                         doc="N, the number of evaluations (= steps after the teleport jump, if any).")

    @property
    def times(self) -> Tensor:
        """The searched grid (float64) from ``t_start`` to ``t_end``: ``[N + 1]``, or ``[N + 2]`` with the
        teleport jump's end as the second entry."""
        return _times(self.logits, self.t_start, self.t_end)

    @property
    def steps(self) -> Tensor:
        """Segment lengths (``N``, or ``N + 1`` with the jump first), positive, summing to ``t_start - t_end``."""
        return self.times[:-1] - self.times[1:]

    @property
    def eval_times(self) -> Tensor:
        """The ``N`` times at which the field is evaluated (the step starts unless ``eval_shift`` moves them)."""
        return _shifted(self.times[:-1][1 if self.teleport is not None else 0:], self.eval_shift)

    def grid(self) -> TimeGrid:
        """A grid of ``N`` steps over the searched interval for ``solve(field, x, solver, None, solver.grid())``:
        the searched times (with a teleport jump, those after it)."""
        times = self.times
        return get_grid(times if self.teleport is None else torch.cat([times[:1], times[2:]]))

    def default_grid(self) -> TimeGrid:
        return self.grid()

    @property
    def default_steps(self) -> int:
        return self.num_steps

    def with_name(self, name: str) -> SearchedSolver:
        """The same solver under another name."""
        return SearchedSolver(self.logits, self.coefficients, self.path, self.t_start, self.t_end, self.variant,
                              self.info, name, eval_shift=self.eval_shift, scales=self.scales, teleport=self.teleport)

    def __repr__(self) -> str:
        ext = [k for k, v in (("eval_shift", self.eval_shift), ("scales", self.scales), ("teleport", self.teleport))
               if v is not None]
        return (f"SearchedSolver(name={self.name!r}, steps={self.num_steps}, variant={self.variant!r}, "
                f"path={self.path!r}, t=[{self.t_start:g}, {self.t_end:g}]"
                + (f", extensions={ext}" if ext else "") + ")")

    def check_steps(self, times: Tensor) -> None:
        if len(times) - 1 != self.num_steps:
            raise SolverError(f"searched solver {self.name!r} was searched for {self.num_steps} steps; the grid has "
                              f"{len(times) - 1}. Pass steps={self.num_steps}, or search again for this budget")
        if abs(float(times[0]) - self.t_start) > 1e-7 or abs(float(times[-1]) - self.t_end) > 1e-7:
            raise SolverError(f"searched solver {self.name!r} was searched for t from {self.t_start:g} to "
                              f"{self.t_end:g}; the grid runs from {float(times[0]):g} to {float(times[-1]):g}. "
                              "Use a grid with these end points, or search again for this interval")

    def nfe(self, steps: int, *, times: Tensor | None = None, path: Any = None) -> int:
        """Always ``N`` (the teleport jump, a step of its own, costs no evaluation)."""
        return self.num_steps

    def init(self, field: Field, x: Tensor, times: Tensor, *, generator: torch.Generator | None = None,
             **cond: Any) -> SolverState:
        """Check the field and the grid (``times`` gives only N and the end points); precompute the searched
        times, evaluation times, coefficients and, for the data variant, the DDIM ratios. ``state.times`` is
        the searched grid, ``solver.times``."""
        del generator, cond  # deterministic
        check_field(field)
        if field.path != self.path:
            raise SolverError(f"searched solver {self.name!r} was searched for path {self.path!r}, field uses "
                              f"{field.path!r}; search again with this field")
        self.check_steps(times)
        searched_for, this = (self.info or {}).get("model"), _model_fingerprint(field)
        if searched_for is not None and this is not None and searched_for != this:
            warnings.warn(f"searched solver {self.name!r} was searched for another model (its config differs: "
                          f"{searched_for} there, {this} here); it runs, but not with the accuracy its search "
                          "measured. Search again for this model", stacklevel=4)
        grid = self.times
        jump = None
        seg = grid
        if self.teleport is not None:  # closed-form first segment
            jump = (GaussianFlowMap(self.teleport.to(x.device), field.path), grid[0].to(x.device), grid[1].to(x.device))
            seg = grid[1:]
        dev, dt = x.device, x.dtype
        t_eval = _shifted(seg[:-1].to(device=dev), self.eval_shift).to(dt)
        scales = self.scales.to(device=dev, dtype=dt) if self.scales is not None else None
        if self.variant == "data":  # schedule in float64
            t64 = seg.to(device=dev, dtype=torch.float64)
            a, s = field.path.alpha(t64), field.path.sigma(t64)
            update = ((s[1:] / s[:-1]).to(dt), (a[1:] - s[1:] * a[:-1] / s[:-1]).to(dt))
        else:  # the step is rounded from float64 exactly as Euler rounds it
            update = ((seg[1:] - seg[:-1]).to(device=dev, dtype=dt),)
        plan = (jump, t_eval, self.coefficients.to(device=dev, dtype=dt), scales, update)
        return SolverState(x, 0, 0, grid, plan, ((),))

    def step(self, field: Field, state: SolverState, *, generator: torch.Generator | None = None,
             **cond: Any) -> SolverState:
        """The teleport jump (no evaluation), or one evaluation combined with the past ones by the searched
        coefficients, then an Euler (velocity) or DDIM (data) step."""
        jump, t_eval, c, scales, update = state.plan
        x, hist = state.x, state.memory[0]
        if jump is not None and state.n == 0:
            flow, t0, t1 = jump
            return state.advance(flow(x, t0, t1), 0, ((),))
        i = state.n - (jump is not None)
        view = as_velocity(field) if self.variant == "velocity" else as_x0(field)
        hist = hist + (view(x, broadcast_time(t_eval[i], x), **cond),)
        d = _direction(hist, c, i, scales)
        x = x + update[0][i] * d if len(update) == 1 else update[0][i] * x + update[1][i] * d
        return state.advance(x, 1, (hist,))

    # ------------------------------------------------------------------------------------------ artifact
    def save(self, directory: PathLike) -> FsPath:
        """Write ``solver.safetensors`` + ``solver.json`` into ``directory`` atomically; returns it.

        ``directory`` must be missing, empty or an earlier searched solver (``solver.json``; replaced whole); any
        other folder is a CheckpointError, as saving would delete its files.
        """
        directory = FsPath(directory)
        with atomic_folder(directory, "searched solver", lambda d: (d / "solver.json").is_file(),
                           f"searched_nfe{self.num_steps}") as tmp:
            tensors = {"logits": self.logits, "coefficients": self.coefficients, "eval_shift": self.eval_shift,
                       "scales": self.scales}
            fit, teleport = self.teleport, None
            if fit is not None:
                tensors.update(zip(_TELEPORT_KEYS, (fit.mean, fit.eigvals, fit.eigvecs)))
                teleport = {"residual": fit.residual, "event_shape": list(fit.event_shape)}
            write_tensors(tmp / "solver.safetensors", {k: v for k, v in tensors.items() if v is not None})
            extended = fit is not None or self.eval_shift is not None or self.scales is not None
            meta = {"kind": _KIND, "format": FORMAT_VERSION if extended else 1, "genkit_version": genkit_version(),
                    "torch_version": torch.__version__, "steps": self.num_steps, "variant": self.variant,
                    "path": self.path.config(), "t_start": self.t_start, "t_end": self.t_end, "teleport": teleport,
                    "info": self.info, "files": file_sizes(tmp)}
            write_json(tmp / "solver.json", meta, "solver.json", keep_tuples=False)
        return directory


def load_searched_solver(directory: PathLike) -> SearchedSolver:
    """Read an artifact written by :meth:`SearchedSolver.save`; CheckpointError if incomplete or corrupt."""
    directory = FsPath(directory)
    if not directory.is_dir():
        raise CheckpointError(f"no searched solver at {directory}: the directory does not exist; check the path")
    hint = "search again or use another artifact"
    meta = read_json(directory / "solver.json", hint)
    if not isinstance(meta, dict) or meta.get("kind") != _KIND or not isinstance(meta.get("format"), int):
        raise CheckpointError(f"{directory / 'solver.json'} is not a genkit searched-solver artifact (kind "
                              f"{meta.get('kind') if isinstance(meta, dict) else None!r}); save one with solver.save")
    if meta["format"] > FORMAT_VERSION:
        raise CheckpointError(f"{directory} has searched-solver format {meta['format']}; this genkit "
                              f"({genkit_version()}) reads format <= {FORMAT_VERSION}. Upgrade genkit")
    file = directory / "solver.safetensors"
    files = meta.get("files")
    tensors = read_tensors(file, files.get(file.name) if isinstance(files, dict) else None, hint=hint)
    try:
        n, path, tele = int(meta["steps"]), path_from_config(meta["path"]), meta.get("teleport")
        segments = n + (tele is not None)
        wanted = {"logits", "coefficients"} | (set(_TELEPORT_KEYS) if tele is not None else set())
        if not wanted <= set(tensors) <= wanted | {"eval_shift", "scales"} \
                or tensors["logits"].shape != (segments,) or tensors["coefficients"].shape != (n, n):
            raise CheckpointError(f"{file} holds {({k: tuple(v.shape) for k, v in tensors.items()})}, not logits "
                                  f"[{segments}] and coefficients [{n}, {n}]"
                                  + (" with a teleport Gaussian" if tele is not None else "") + f"; {hint}")
        fit = None
        if tele is not None:
            fit = GaussianFit(*(tensors[k] for k in _TELEPORT_KEYS), float(tele["residual"]),
                              tuple(tele["event_shape"]))
        return SearchedSolver(tensors["logits"], tensors["coefficients"], path, meta["t_start"], meta["t_end"],
                              meta["variant"], meta.get("info"), eval_shift=tensors.get("eval_shift"),
                              scales=tensors.get("scales"), teleport=fit)
    except CheckpointError:
        raise
    except Exception as e:  # safetensors' SafetensorError, missing JSON keys, invalid values
        raise CheckpointError(f"{directory} is truncated or corrupt ({type(e).__name__}: {e}); {hint}") from e


class _Registered:
    """The registry entry of a searched solver: ``SOLVERS.get(name)()`` returns the solver itself (options
    raise TypeError, which ``get_solver`` reports as a ConfigError)."""

    def __init__(self, solver: SearchedSolver):
        self.solver = solver

    def __call__(self) -> SearchedSolver:
        return self.solver


def solver_home() -> FsPath:
    """Where searched solvers saved by name live: ``$GENKIT_SOLVERS``, else ``~/.cache/genkit/solvers``."""
    return FsPath(os.environ.get("GENKIT_SOLVERS") or FsPath.home() / ".cache" / "genkit" / "solvers").expanduser()


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not name or not all(c.isalnum() or c in "_-." for c in name) \
            or name.startswith("."):
        raise ConfigError(f"a solver name is letters, digits, '_', '-' and '.' (not first); got {name!r}")


def check_new_name(name: str, *, replace: bool = False, persist: bool = False) -> None:
    """Raise ConfigError unless ``register_searched(name, ..., replace=replace, persist=persist)`` would accept
    ``name``: a valid name, not a built-in or (without ``replace``) registered or saved solver."""
    _check_name(name)
    if name in SOLVERS and not (replace and isinstance(SOLVERS.get(name), _Registered)):
        raise ConfigError(f"solver name {name!r} is taken; pick another name"
                          + ("" if replace else " or pass replace=True to replace a searched solver"))
    target = solver_home() / name
    if persist and not replace and (target / "solver.json").is_file():
        raise ConfigError(f"a searched solver named {name!r} is already saved in {target}; pick another name "
                          "or pass replace=True")


def register_searched(name: str, solver: SearchedSolver | PathLike, *, replace: bool = False,
                      persist: bool = False) -> SearchedSolver:
    """Make ``get_solver(name)`` / ``solve(field, x, name)`` use a searched solver (object or artifact
    directory) in this process. ``persist=True`` also saves it under :func:`solver_home` so that the name works
    in any later process (``get_solver`` looks there for names it does not know). ``replace=True`` replaces an
    earlier searched solver of that name (registered, and saved when persisting)."""
    check_new_name(name, replace=replace, persist=persist)
    if not isinstance(solver, SearchedSolver):
        solver = load_searched_solver(solver)
    named = solver.with_name(name)
    if persist:
        named.save(solver_home() / name)
    if name in SOLVERS:
        unregister_searched(name)
    SOLVERS.register(name)(_Registered(named))
    return named


def saved_solver_names() -> list[str]:
    """Names of the searched solvers saved under :func:`solver_home` (``register_searched(..., persist=True)``)."""
    home = solver_home()
    try:
        return sorted(p.name for p in home.iterdir() if (p / "solver.json").is_file()) if home.is_dir() else []
    except OSError:  # an unreadable solver home lists nothing rather than hiding the error being reported
        return []


def find_saved(name: str) -> SearchedSolver | None:
    """The searched solver saved as ``name`` under :func:`solver_home`, registered for this process; or None."""
    try:
        _check_name(name)
    except ConfigError:
        return None
    folder = solver_home() / name
    if not (folder / "solver.json").is_file():
        return None
    return register_searched(name, folder)


def unregister_searched(name: str) -> None:
    """Remove a solver added by :func:`register_searched` (built-in solvers cannot be removed)."""
    if not isinstance(SOLVERS.get(name), _Registered):
        raise ConfigError(f"{name!r} is a built-in solver, not a registered searched solver")
    SOLVERS.unregister(name)


class _SearchedStore:
    """How :func:`~genkit.solvers.base.get_solver` finds searched solvers: an artifact folder by its path, or a
    name saved under :func:`solver_home` by an earlier process (``register_searched(..., persist=True)``)."""

    def resolve(self, spec: str | os.PathLike) -> SearchedSolver | None:
        if (FsPath(spec) / "solver.json").is_file():
            return load_searched_solver(spec)
        return find_saved(spec) if isinstance(spec, str) else None

    def explain(self, spec: str | os.PathLike) -> str | None:
        if isinstance(spec, os.PathLike) or "/" in spec or os.sep in spec:
            where = FsPath(spec)
            return (f"it looks like a searched-solver folder, but {where} "
                    + ("holds no solver.json" if where.is_dir() else "does not exist") + "; check the path")
        names = saved_solver_names()
        saved = f"searched solvers saved in {solver_home()}: {', '.join(names)}; " if names else ""
        return saved + "a searched-solver folder is given by its path"


register_resolver(_SearchedStore())


def _model_fingerprint(field: Any) -> str | None:
    """A short hash of a model's ``config()`` (family, path, network, ...), or None for fields without one:
    kept in a searched solver's info so that using it on another architecture warns. Weights are not hashed,
    so two trainings of the same architecture look alike."""
    base = getattr(field, "base", field)  # a FieldView's model
    config = getattr(base, "config", None)
    if not callable(config):
        return None
    try:
        text = json.dumps(config(), sort_keys=True, default=str)
    except Exception:  # a config that is not JSON: nothing to compare
        return None
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _interp(ref_t: Tensor, ref: Tensor, t: Tensor) -> Tensor:
    """Linear interpolation of reference states ``ref [M + 1, B, ...]`` on decreasing ``ref_t`` at ``t [K]``."""
    u = (ref_t[0] - t) / (ref_t[0] - ref_t[-1]) * (len(ref_t) - 1)  # fractional index on the uniform ref grid
    k = u.floor().long().clamp(0, len(ref_t) - 2)
    w = (u - k).clamp(0, 1).to(ref.dtype).reshape(-1, *[1] * (ref.ndim - 1))
    return (1 - w) * ref[k] + w * ref[k + 1]


def _jump_start(times: Tensor, t_jump: float) -> Tensor:
    """Logits ``[N + 1]`` of a teleport start built on a searched grid ``times [N + 1]``: the jump from
    ``times[0]`` to ``t_jump``, then the searched steps rescaled onto ``[times[-1], t_jump]`` (the searched
    coefficients stay with their steps)."""
    t_start, t_end = float(times[0]), float(times[-1])
    after = t_end + (times - t_end) * (t_jump - t_end) / (t_start - t_end)
    return torch.log(torch.cat([times.new_tensor([t_start - t_jump]), after[:-1] - after[1:]]))


def _check_counts(counts: dict[str, Any], lr: float, trajectory_weight: float) -> None:
    if any(not isinstance(v, int) or isinstance(v, bool) or v < 1 for v in counts.values()) \
            or not (lr > 0 and math.isfinite(lr)) or not trajectory_weight >= 0:
        raise ConfigError(f"need positive integers {counts}, lr > 0 and trajectory_weight >= 0; got lr={lr}, "
                          f"trajectory_weight={trajectory_weight}")


@torch.inference_mode(False)  # the search differentiates through solves: it works under a caller's no_grad
@torch.enable_grad()  # or inference_mode too
def search_solver(field: Field, nfe: int, *, shape: tuple[int, ...], variant: str = "data",
                  reference_solver: str | Solver = "rk4", reference_steps: int = 100, iters: int = 1000,
                  batch: int = 64, pool: int = 2048, holdout: int = 2048, lr: float = 3e-2, optimiser: str = "adam",
                  lr_schedule: str = "constant", check_every: int | None = None, trajectory_weight: float = 0.0,
                  eval_times: bool = False, step_scales: bool = False, teleport: GaussianFit | str | None = None,
                  teleport_to: float | None = None, extend_iters: int | None = None,
                  extend_lr: float | None = None, extend_margin: float = 2.0, grid: str | TimeGrid = "uniform",
                  cond: dict[str, Any] | None = None,
                  generator: torch.Generator | None = None, device: torch.device | str | None = None,
                  dtype: torch.dtype | None = None, importance: float = 0.5) -> SearchedSolver:
    """Search a solver of ``nfe`` steps (= evaluations) for ``field`` (DSS, arXiv 2505.21114).

    Draws ``pool`` prior samples ``[pool, *shape]`` to train on and ``holdout`` more to select with, solves
    them with ``reference_solver`` on ``reference_steps`` uniform steps (adaptive solvers: output times), then
    takes ``iters`` steps of ``optimiser`` (``adam`` or ``lion``) on minibatches of ``batch`` pool samples, at a
    ``constant`` learning rate or one decayed to 0 on a ``cosine``. Loss: endpoint MSE to the reference, plus
    ``trajectory_weight`` times the mean MSE of the intermediate states to the reference trajectory
    interpolated at the current searched times (the official trainer's per-step term, where times are rounded
    to the teacher grid). The result is the iterate with the lowest endpoint MSE on the held-out samples among
    the start and every ``check_every`` iterations (default ``max(1, iters // 25)``), not the last one
    (:mod:`genkit.solvers.search_loop`); ``info["holdout_loss"]`` is that error. Gradients reach only the
    solver's parameters: ``torch.autograd.grad`` leaves the field's ``.grad`` alone.
    ``grid`` gives the interval and the initial steps (``uniform``: exactly Euler/DDIM at the start).
    ``variant``: ``"data"`` (the paper's DDPM form, DDIM steps on combined data predictions; the default on every
    path) or ``"velocity"`` (its flow-matching form, Euler steps on combined velocities).
    ``importance = m`` in ``[0, 1)``: minibatches are drawn with probability ``(1 - m) / pool + m e_i / sum(e)``
    from the pool samples' current endpoint errors ``e`` (refreshed at every check) and weighted by
    ``1 / (pool p_i)``, an unbiased estimate of the pool's mean loss (:func:`genkit.solvers.search_loop.optimise`);
    ``0`` draws uniform epochs as the paper does. On a multimodal field the error sits in the few samples that end
    between modes, which uniform minibatches of 64 rarely see.

    Defaults, by measurement (``python eval/bench_search_defaults.py``: issue 8's 16-D mixture of six narrow modes,
    5 NFE, scored on 4096 unseen samples, five search seeds): on the ddpm path read as eps the former defaults
    (velocity variant, pool 1024, held-out 512, uniform minibatches) ended at 0.53-0.57 RMS against diffusers'
    UniPC at 10 NFE's 0.435; the data variant brought 0.44-0.45, and with pool = held-out = 2048 and
    ``importance=0.5`` 0.39-0.42 (linear path read as velocity: 0.37-0.43 against UniPC's 0.506). A default
    search costs about 30 s there on one CPU thread.
    ``cond``: conditioning for the field, tensors with first dimension ``pool`` (sliced with the noise; the
    held-out noise takes the first ``holdout`` of them, so ``holdout <= pool`` with ``cond``).
    ``device``/``dtype`` default to the field's parameters' (CPU and the default dtype for other fields).

    genkit extensions (module docstring; all off by default, which is the paper's search space):
    ``eval_times`` searches a shift of each evaluation time; ``step_scales`` a factor on each update;
    ``teleport`` makes the first segment a closed-form jump of a :class:`~genkit.gaussian_fit.GaussianFit`, or of
    the Gaussian fitted to the pool's reference endpoints (``"reference"``: the field's own samples, no data
    needed; full covariance up to 256 dimensions with more samples than dimensions, else the top 256 directions,
    or half the pool's, and the mean remaining variance; endpoints at ``t_end > 0`` are mapped back to t = 0).

    The extended search never ends worse than DSS on the held-out samples, by construction: it first runs the
    DSS search above (the same draws, so the very solver ``search_solver`` returns without extensions), then
    ``extend_iters`` (default ``iters``) more iterations at ``extend_lr`` (default ``lr / 5``: a fresh Adam
    state moves every parameter by about the learning rate per step, which would throw the tuned DSS solver
    off its optimum) with the extensions, started from the DSS optimum with zero shifts and unit scales (the
    DSS solver itself, to rounding). A jump is guarded: the jump start is the DSS grid rescaled behind a jump to
    ``teleport_to`` (default: the better on the held-out samples of the DSS grid's first interior time and the
    time of log-SNR -4); if it beats the DSS optimum there it gets all ``extend_iters``, else it gets half and
    the jump-free extensions the other half. The DSS optimum stays a candidate and the returned solver is
    whichever was best on the held-out samples, the extended one only when its gain there (the mean of the paired
    per-sample differences) exceeds ``extend_margin`` standard errors of that mean (default 2: a gain carried by
    a handful of held-out samples does not carry over to new noise; 0 keeps any gain) (``info["chosen"]``:
    ``"dss"`` or ``"extended"``; ``info["extended_gain"]``, ``info["extended_gain_se"]``;
    ``info["dss_holdout_loss"]``, ``info["teleport_start"]``); a jump that hurts is not in it. The extended
    search costs the DSS search plus ``extend_iters`` iterations.
    """
    check_field(field)
    if not isinstance(nfe, int) or nfe < 2:
        raise SolverError(f"nfe must be an integer >= 2 (one step has nothing to search: it is Euler); got {nfe!r}")
    if variant not in VARIANTS or optimiser not in OPTIMISERS or lr_schedule not in LR_SCHEDULES:
        raise ConfigError(f"variant must be one of {VARIANTS}, optimiser one of {OPTIMISERS} and lr_schedule one of "
                          f"{LR_SCHEDULES}; got {variant!r}, {optimiser!r}, {lr_schedule!r}")
    if isinstance(teleport, str) and teleport != "reference":
        raise ConfigError(f"teleport must be None, 'reference' (fit the reference endpoints) or a GaussianFit "
                          f"(genkit.fit_gaussian(data)); got {teleport!r}")
    fit = None if teleport is None or teleport == "reference" else _checked_fit(teleport)
    if teleport == "reference" and not (isinstance(pool, int) and pool >= 2):
        raise ConfigError(f"teleport='reference' fits a Gaussian to the pool's reference endpoints: need pool >= 2, "
                          f"got {pool!r}")
    if not (isinstance(importance, (int, float)) and not isinstance(importance, bool) and 0 <= importance < 1):
        raise ConfigError(f"importance must be a number in [0, 1) (the share of minibatch draws proportional to each "
                          f"sample's error; 0 = uniform epochs); got {importance!r}")
    check_every = max(1, iters // 25) if check_every is None and isinstance(iters, int) else check_every
    extend_iters = iters if extend_iters is None else extend_iters
    extend_lr = lr / 5 if extend_lr is None and isinstance(lr, (int, float)) else extend_lr
    if not (isinstance(extend_margin, (int, float)) and not isinstance(extend_margin, bool) and extend_margin >= 0):
        raise ConfigError(f"extend_margin must be a number of standard errors >= 0; got {extend_margin!r}")
    if not (isinstance(extend_lr, (int, float)) and extend_lr > 0 and math.isfinite(extend_lr)):
        raise ConfigError(f"extend_lr must be a learning rate > 0 (or None: lr / 5); got {extend_lr!r}")
    _check_counts({"iters": iters, "batch": batch, "pool": pool, "holdout": holdout, "check_every": check_every,
                   "extend_iters": extend_iters, "reference_steps": reference_steps}, lr, trajectory_weight)
    cond = dict(cond or {})
    if cond and holdout > pool:
        raise ConfigError(f"with cond the held-out noise reuses the pool's first conditions: need holdout <= pool, "
                          f"got holdout={holdout}, pool={pool}")
    params = list(field.parameters()) if isinstance(field, torch.nn.Module) else []
    device = torch.device(device) if device is not None else (params[0].device if params else torch.device("cpu"))
    dtype = dtype or (params[0].dtype if params else torch.get_default_dtype())
    init = get_grid(grid).times(nfe, field.path).to(torch.float64)
    t_start, t_end = float(init[0]), float(init[-1])
    extended = eval_times or step_scales or teleport is not None
    if teleport is None and teleport_to is not None:
        raise ConfigError(f"teleport_to={teleport_to!r} applies only with a teleport Gaussian; pass "
                          "teleport='reference' or a GaussianFit, or drop teleport_to")
    t_lam4 = float(field.path.t_from_log_snr(torch.tensor(-4.0, dtype=torch.float64)))
    if teleport is not None:
        if teleport_to is not None and (not isinstance(teleport_to, (int, float)) or isinstance(teleport_to, bool)):
            raise ConfigError(f"teleport_to must be a time in ({t_end:g}, {t_start:g}) or None; got {teleport_to!r}")
        t_jump = t_lam4 if teleport_to is None else float(teleport_to)
        if not t_end < t_jump < t_start:
            what = "the default jump end (log-SNR -4)" if teleport_to is None else "teleport_to"
            raise ConfigError(f"{what} must lie inside the searched interval ({t_end:g}, {t_start:g}); got "
                              f"{t_jump:g}. Pass teleport_to=t inside it")
    x_all = field.path.sample_prior((pool + holdout, *shape), generator=generator, device=device, dtype=dtype)
    cond_all = {k: torch.cat([v, v[:holdout]]) if torch.is_tensor(v) else v for k, v in cond.items()}
    keep = trajectory_weight > 0
    reference = get_solver(reference_solver)
    ref_t = Uniform(t_start, t_end).times(reference_steps, field.path)
    with torch.no_grad():  # the reference is a constant target
        ref = reference.solve(field, x_all, ref_t, trajectory=keep, **cond_all)
    target, hold = ref.samples[:pool], slice(pool, pool + holdout)
    x_pool, x_hold, target_hold = x_all[:pool], x_all[hold], ref.samples[hold]
    cond_hold = {k: v[hold] if torch.is_tensor(v) else v for k, v in cond_all.items()}
    if teleport == "reference":  # full covariance where it fits; else the top directions plus an isotropic rest
        dim = math.prod(shape)
        if dim <= REFERENCE_FIT_RANK and pool > dim:
            rank = None
        else:  # fewer samples than dimensions: keep half the sampled directions, so the rest has variance left
            rank = max(1, min(REFERENCE_FIT_RANK, dim - 1 if pool > dim else (pool - 1) // 2))
        fit = _fit_at_data(fit_gaussian(target.cpu(), rank=rank), field.path, t_end)
    if fit is not None and fit.dim != math.prod(shape):
        raise ConfigError(f"the teleport Gaussian has dimension {fit.dim}, the samples {math.prod(shape)} "
                          f"(shape {shape}); fit it to data of this shape")
    mask = torch.tril(torch.ones(nfe, nfe, dtype=torch.float64), -1)

    def run(u: dict[str, Tensor], x: Tensor, sub: dict[str, Any], jump: GaussianFit | None, keep_states: bool):
        return _integrate(field, x, _times(u["logits"], t_start, t_end), u["coeffs"] * mask, variant, keep_states,
                          sub, u.get("shift"), u.get("scales"), jump)

    def held_each(u: dict[str, Tensor], jump_on: GaussianFit | None) -> Tensor:
        """Endpoint MSE of each held-out sample [holdout] (float64)."""
        with torch.no_grad():
            return (run(u, x_hold, cond_hold, jump_on, False)[0] - target_hold).pow(2).flatten(1).mean(1).double()

    def held(u: dict[str, Tensor], jump_on: GaussianFit | None) -> float:
        """Endpoint MSE on the held-out noise."""
        return held_each(u, jump_on).mean().item()

    def search(u: dict[str, Tensor], jump: GaussianFit | None, steps: int, step_lr: float):
        jump_on = jump.to(device) if jump is not None else None
        for v in u.values():
            v.requires_grad_(True)

        def loss(idx: Tensor, w: Tensor | None = None) -> Tensor:
            sub = {k: v[idx.to(v.device)] if torch.is_tensor(v) else v for k, v in cond.items()}
            out, states = run(u, x_pool[idx], sub, jump_on, keep)
            value = (out - target[idx]).pow(2).flatten(1).mean(1)  # [batch]
            if keep:
                times = _times(u["logits"], t_start, t_end)[1 if jump is not None else 0:]
                want = _interp(ref_t.to(device), ref.trajectory[:, idx], times[1:-1].detach().to(device))
                gap = (torch.stack(states[-len(times) + 1:-1]) - want).pow(2)
                value = value + trajectory_weight * gap.transpose(0, 1).flatten(1).mean(1)
            return (value if w is None else value * w.to(value.dtype)).mean()

        def per_sample() -> Tensor:
            """Endpoint MSE of every pool sample (importance sampling's probabilities)."""
            with torch.no_grad():
                return (run(u, x_pool, cond, jump_on, False)[0] - target).pow(2).flatten(1).mean(1)

        def held_out() -> float:
            return held(u, jump_on)

        def diverged(it: int, value: float) -> Exception:
            return SolverError(f"the solver search diverged at iteration {it} (loss {value}); lower lr={step_lr}")

        keys = list(u)
        found = optimise(loss, held_out, [u[k] for k in keys], iters=steps, batch=batch, pool=pool, lr=step_lr,
                         optimiser=optimiser, lr_schedule=lr_schedule, check_every=check_every, generator=generator,
                         device=device, on_nonfinite=diverged, per_sample=per_sample, importance=importance)
        return dict(zip(keys, found.params)), found

    logits = torch.zeros(nfe, dtype=torch.float64) if isinstance(get_grid(grid), Uniform) \
        else torch.log(init[:-1] - init[1:])
    best, dss = search({"logits": logits, "coeffs": torch.zeros(nfe, nfe, dtype=torch.float64)}, None, iters, lr)
    found, jump, chosen = dss, None, "dss"
    info: dict[str, Any] = {"nfe": nfe, "iters": iters, "batch": batch, "pool": pool, "holdout": holdout, "lr": lr,
                            "optimiser": optimiser, "lr_schedule": lr_schedule, "check_every": check_every,
                            "variant": variant, "importance": importance,
                            "trajectory_weight": trajectory_weight, "reference": repr(reference),
                            "reference_steps": reference_steps, "eval_times": eval_times, "step_scales": step_scales,
                            "teleport": None, "dss_holdout_loss": dss.holdout}
    if extended:
        start = {k: v.clone() for k, v in best.items()}
        if eval_times:
            start["shift"] = torch.zeros(nfe, dtype=torch.float64)
        if step_scales:
            start["scales"] = torch.ones(nfe, dtype=torch.float64)
        branches = [(start, None, extend_iters)]
        if fit is not None:  # the jump guard: the best jump start gets all iterations only if it beats the DSS optimum
            dss_times, jump_on = _times(best["logits"], t_start, t_end), fit.to(device)
            ends = [t_jump] if teleport_to is not None else [float(dss_times[1]), t_jump]
            tried = [dict(start, logits=_jump_start(dss_times, end)) for end in ends]
            errors = [held(cand, jump_on) for cand in tried]
            k = min(range(len(ends)), key=errors.__getitem__)
            cand = tried[k]
            info.update({"teleport_start": ends[k], "teleport_start_holdout_loss": errors[k]})
            if errors[k] < held(start, None):
                branches = [(cand, fit, extend_iters)]
            else:  # a jump that starts worse is searched on half the iterations, the DSS optimum on the rest
                branches = [(start, None, extend_iters - extend_iters // 2),
                            ({k: v.clone() for k, v in cand.items()}, fit, extend_iters // 2)]
        info.update({"extend_iters": extend_iters, "extend_lr": extend_lr, "extended_holdout_loss": None,
                     "teleport_tried": None if fit is None else "reference" if teleport == "reference" else "given"})
        candidate = None
        for begin, begin_jump, steps in branches:
            if steps < 1:
                continue
            ext_best, ext = search(begin, begin_jump, steps, extend_lr)
            if candidate is None or ext.holdout < candidate[1].holdout:
                candidate = (ext_best, ext, begin_jump)
        info["extended_holdout_loss"] = None if candidate is None else candidate[1].holdout
        if candidate is not None and candidate[1].holdout < found.holdout:  # the DSS optimum is the one to beat
            gain = held_each(best, None) - held_each(candidate[0], None if candidate[2] is None else
                                                     candidate[2].to(device))
            se = float(gain.std() / math.sqrt(len(gain))) if len(gain) > 1 else 0.0
            info.update({"extended_gain": float(gain.mean()), "extended_gain_se": se})
            if float(gain.mean()) > extend_margin * se:
                best, found, jump = candidate
                chosen = "extended"
    if jump is not None:
        info["teleport"] = "reference" if teleport == "reference" else "given"
    info.update({"chosen": chosen if extended else "dss", "holdout_loss": found.holdout, "best_iter": found.best_iter,
                 "first_loss": found.losses[0], "last_loss": found.losses[-1], "loss_curve": loss_curve(found.losses),
                 "holdout_curve": found.holdout_curve})
    fingerprint = _model_fingerprint(field)
    if fingerprint is not None:
        info["model"] = fingerprint
    return SearchedSolver(best["logits"], best["coeffs"] * mask, field.path, t_start, t_end, variant, info,
                          eval_shift=best.get("shift"), scales=best.get("scales"), teleport=jump)
