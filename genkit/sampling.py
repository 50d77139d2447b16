"""Samplers as objects: how a generative model turns prior noise into samples.

A :class:`Sampler` takes a model (or any field / flow map) and a prior draw ``x [B, *shape]`` at the
sampling start and returns a :class:`~genkit.solvers.Solution`. Models draw the prior and hand it over
(``model.sample(n, sampler=...)``); scripts ask a model which samplers it supports (``model.samplers()``)
and which is its default (``model.default_sampler()``) instead of testing its class.

Registered in :data:`SAMPLERS` (strings name them in scripts and configs):

- ``ode``: :class:`ODESampler`, an ODE/SDE solver with its step count and time grid, run on a field
  through :func:`genkit.solve`;
- ``jumps``: :class:`JumpSampler`, the jumps of any flow map ``flow_map(x, t, s)`` on a grid (a secant
  model's learned jumps; MeanFlow; a one-step generator is one jump from 1 to 0);
- ``exact``: :class:`ExactSampler`, one pass of a normalizing flow's base draw through its inverse transforms
  (``nsf``, ``realnvp``): no steps, no grid, no solver;
- ``path``: :class:`PathSampler`, one pass of a stochastic normalizing flow (``snf``) through its flow layers and
  stochastic blocks, their noise drawn from the generator: no steps, no grid, no solver;
- ``restart``: :class:`RestartSampler`, the multistep sampler of a one-step generator (consistency models, DMD2,
  ``smt`` / ``smd``): denoise, re-noise to the next grid time with fresh noise, denoise again;
- ``masked_ancestral``: :class:`MaskedAncestralSampler`, the ancestral sampler of masked discrete diffusion
  (``mdlm``): from all-MASK tokens, unmask positions step by step with the reverse probabilities;
- ``policy``: :class:`PolicySampler`, a GFlowNet's forward policy rolled out from the initial state until it
  exits (``gflownet``): no steps, no grid, no solver.

A sampler declares ``takes_steps`` (False for ``exact``, ``path`` and ``policy``): whether a step count means
anything to it.

A sampler is anything with ``name``, ``needs``, ``sample(model, x, generator=None, **cond)`` and ``describe()``.

>>> import torch
>>> from genkit.analytic import Gaussian
>>> from genkit.paths import get_path
>>> from genkit.solvers import ODEFlowMap
>>> g = Gaussian(torch.tensor([2.0]), torch.eye(1), get_path("linear"))
>>> ODESampler("heun", steps=8).sample(g, torch.zeros(1, 1)).samples   # prior mean -> data mean
tensor([[2.]])
>>> JumpSampler(steps=2).sample(ODEFlowMap(g, "rk4", steps=4), torch.zeros(1, 1)).samples
tensor([[2.]])
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

from .errors import ConfigError
from .fields import LimitedX0, as_x0
from .registry import Registry
from .solvers import Custom, Solution, Solver, TimeGrid, get_grid, get_solver, solve
from .solvers.base import steps_or_default

__all__ = ["SAMPLERS", "Sampler", "ODESampler", "JumpSampler", "ExactSampler", "PathSampler", "RestartSampler",
           "MaskedAncestralSampler", "PolicySampler", "masked_reverse_step", "get_sampler"]

SAMPLERS: Registry = Registry("sampler")


class Sampler:
    """Base of samplers. Subclasses set ``name`` (their registry name), ``needs`` (what a model must provide,
    for error messages) and implement :meth:`sample` and :meth:`describe`.

    ``steps`` is the sampler's step count (None: chosen by the sampler or the model); ``label`` is the short
    name scripts use on the command line and in file names.
    """

    name: ClassVar[str] = "sampler"
    needs: ClassVar[str] = "a generative model"
    #: Whether the sampler has a step count (an ODE solver's steps, a flow map's jumps); False for one-pass
    #: samplers (:class:`ExactSampler`), which refuse ``steps``.
    takes_steps: ClassVar[bool] = True
    steps: int | None = None

    def sample(self, model: Any, x: Tensor, *, generator: torch.Generator | None = None, **cond: Any) -> Solution:
        """Carry the prior draw ``x [B, *shape]`` to samples; ``generator`` draws any noise of the sampler."""
        raise NotImplementedError

    def describe(self) -> str:
        """One line for logs and picture titles, e.g. ``"heun, 32 steps, uniform grid"``."""
        return self.name

    @property
    def label(self) -> str:
        return self.name

    def with_steps(self, steps: int | None) -> Sampler:
        """A copy with another step count."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.describe()})"


def _check_steps(steps: Any) -> int | None:
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise ConfigError(f"steps must be a positive integer or None; got {steps!r}")
    return steps


def _explicit(grid: Any) -> bool:
    return isinstance(grid, (list, tuple)) or (torch.is_tensor(grid) and grid.ndim == 1)


@SAMPLERS.register("ode")
class ODESampler(Sampler):
    """Integrate a field from the prior with an ODE (or SDE) solver: ``ODESampler(solver="heun", steps=None,
    grid="uniform")``.

    ``solver`` is a Solver, its registry name or a searched-solver folder; ``steps`` None means 32 (a searched
    solver's own N; explicit grid times their own count); ``grid`` a TimeGrid, its name or explicit times
    running down from noise to data. A model's ``default_grid(grid)`` fills in its time range for a named grid,
    and a model with ``denoise_end`` returns ``E[x_0 | x_t]`` when the grid stops above ``t = 0``.
    """

    name = "ode"
    needs = "a field (a network read through a path)"

    def __init__(self, solver: str | Solver = "heun", steps: int | None = None,
                 grid: str | TimeGrid | Tensor | Sequence[float] = "uniform"):
        self.solver, self.steps, self.grid = solver, _check_steps(steps), grid
        self._solver = get_solver(solver)  # an unknown name fails here, not at sampling time
        if _explicit(grid):
            ends = [float(grid[0]), float(grid[-1])] if len(grid) else []
            if len(ends) == 2 and ends[0] < ends[1]:
                raise ConfigError(f"sampling runs from noise (t = 1) down to data (t = 0); the grid runs up, from "
                                  f"t={ends[0]:g} to t={ends[1]:g}: reverse it")

    def plan(self, model: Any) -> tuple[Any, Any, int | None, Tensor | None]:
        """``(field, grid, steps, cut)``, what :meth:`sample` hands to :func:`genkit.solve`: the field (x0-limited
        when the model asks for it), the grid with the model's time range filled in, and the step count (32 when
        nothing sets one). For a model with ``denoise_end`` a grid ending at t = 0 is cut before it (its last step
        is the final denoising step) and ``cut`` is the full grid, else None. Reward-guided samplers that step the
        solver themselves (``genkit.finetune.svdd``) use it to sample on the same grid."""
        limit = getattr(model, "x0_limit", None)
        if limit is not None and limit.active and not isinstance(model, LimitedX0):
            model = LimitedX0(model, limit)  # x0 clipping / thresholding, read by every solver
        grid = model.default_grid(self.grid) if callable(getattr(model, "default_grid", None)) else self.grid
        steps = self.steps
        if steps is None and self._solver.default_steps is None and not isinstance(get_grid(grid), Custom):
            steps = 32
        if getattr(model, "denoise_end", False) and self._solver.default_grid() is None:
            # a grid ending at t = 0 (diffusers' spacings, set_alpha_to_one): its last step is the final denoising
            # step E[x_0 | x_t] at the last time above 0, not a solver step into t = 0, below the training range
            g = get_grid(grid)
            times = g.times(steps_or_default(steps, self._solver, g), model.path)
            if len(times) >= 2 and float(times[-1]) == 0 and float(times[-2]) > 0:
                return model, times[:-1], None, times
        return model, grid, steps, None

    def sample(self, model: Any, x: Tensor, *, generator: torch.Generator | None = None, **cond: Any) -> Solution:
        model, grid, steps, cut = self.plan(model)
        if cut is not None and len(cut) == 2:
            return Solution(as_x0(model)(x, float(cut[0]), **cond), 1, cut)
        sol = solve(model, x, self._solver, steps, grid, generator=generator, **cond)
        t_end = float(sol.times[-1])
        if t_end > 0 and getattr(model, "denoise_end", False):
            sol.samples = as_x0(model)(sol.samples, t_end, **cond)
            sol.nfe += 1
        return sol

    def describe(self) -> str:
        steps = "default" if self.steps is None else self.steps
        grid = self.grid if isinstance(self.grid, str) else type(self.grid).__name__
        return f"{self._solver.name}, {steps} steps, {grid} grid"

    @property
    def label(self) -> str:
        return self._solver.name

    def with_steps(self, steps: int | None) -> ODESampler:
        return ODESampler(self.solver, steps, self.grid)


@SAMPLERS.register("jumps")
class JumpSampler(Sampler):
    """Run a flow map ``flow_map(x, t, s)`` on a grid of jumps: ``JumpSampler(steps=None, grid=None)``.

    The target is a model with a ``flow_map`` method (a secant model's learned jumps) or a flow map itself
    (e.g. :class:`genkit.solvers.ODEFlowMap`; a one-step generator is ``JumpSampler(1)``). ``grid`` None (or
    ``"uniform"``) jumps uniformly in ``t`` over the target's ``time_range()`` (``[0, 1]`` without one), from
    its top down; explicit times (descending, ``[steps + 1]``) set their own count. ``steps`` None takes the
    model's default sampler's (a secant model's first trained step count). NFE counts one evaluation per
    jump, what a learned flow map costs.
    """

    name = "jumps"
    needs = "a model with learned jumps (a flow map, e.g. a secant model from train/secant.py)"

    def __init__(self, steps: int | None = None, grid: str | Tensor | Sequence[float] | None = None):
        self.steps = _check_steps(steps)
        if grid == "uniform":
            grid = None
        if grid is not None:
            if not _explicit(grid):
                raise ConfigError(f"jumps take grid=None (uniform in t) or explicit descending times; got {grid!r}. "
                                  "Named solver grids (karras, logsnr) apply to ODE solvers: sampler='ode'")
            grid = torch.as_tensor(grid, dtype=torch.float64).flatten()
            if len(grid) < 2 or not bool((grid[1:] < grid[:-1]).all()):
                raise ConfigError(f"jump times must decrease from noise to data, at least two; got {grid.tolist()}")
            if self.steps is not None and self.steps != len(grid) - 1:
                raise ConfigError(f"steps={self.steps} but the grid has {len(grid) - 1} jumps; drop one of them")
            self.steps = len(grid) - 1
        self.grid = grid

    def times(self, model: Any) -> Tensor:
        """The jump times ``[steps + 1]`` (float64) for ``model``."""
        if self.grid is not None:
            return self.grid
        steps = self.steps
        if steps is None:
            default = model.default_sampler() if callable(getattr(model, "default_sampler", None)) else None
            steps = getattr(default, "steps", None) if isinstance(default, JumpSampler) else None
            if steps is None:
                raise ConfigError(f"JumpSampler needs steps=: {type(model).__name__} has no default jump count")
        t_min, t_max = model.time_range() if callable(getattr(model, "time_range", None)) else (0.0, 1.0)
        return torch.linspace(t_max, t_min, steps + 1, dtype=torch.float64)

    def sample(self, model: Any, x: Tensor, *, generator: torch.Generator | None = None, **cond: Any) -> Solution:
        flow_map = getattr(model, "flow_map", model)
        if not callable(flow_map):
            raise ConfigError(f"jumps need {self.needs}; {type(model).__name__} has no flow_map")
        times = self.times(model)
        traj = [x]
        for k in range(len(times) - 1):
            traj.append(flow_map(traj[-1], float(times[k]), float(times[k + 1]), **cond))
        return Solution(traj[-1], len(times) - 1, times, torch.stack(traj))

    def describe(self) -> str:
        return f"{'default' if self.steps is None else self.steps} learned jumps"

    def with_steps(self, steps: int | None) -> JumpSampler:
        return JumpSampler(steps) if self.grid is None else JumpSampler(steps, self.grid)


class _OnePassSampler(Sampler):
    """A sampler with no time grid: ``steps``, ``grid`` and ``solver`` are ConfigErrors naming ``refusal``."""

    takes_steps = False
    refusal: ClassVar[str] = "it samples in one pass"

    def __init__(self, steps: int | None = None, grid: Any = None, solver: Any = None):
        given = [f"{k}={v!r}" for k, v in (("steps", steps), ("grid", grid), ("solver", solver)) if v is not None]
        if given:
            raise ConfigError(f"the {self.name} sampler takes no {', '.join(given)}: {self.refusal}; drop them")

    def with_steps(self, steps: int | None) -> _OnePassSampler:
        return type(self)(steps)


@SAMPLERS.register("exact")
class ExactSampler(_OnePassSampler):
    """A normalizing flow's exact sampling: the base draw ``z ~ N(0, I)`` goes once through the inverse
    transforms, ``x = T^-1(z)`` (``model.from_base(z, context)``). There is no time, so ``steps``, ``grid`` and
    ``solver`` are ConfigErrors; NFE is 1: one evaluation of the model's inverse map, the cost unit of a
    one-step generator's jump (an autoregressive flow's inverse spends ``features`` network passes a layer
    inside it). The :class:`~genkit.solvers.Solution`'s times are ``[1, 0]``: noise to data in one go.
    """

    name = "exact"
    needs = "an exact inverse from a base distribution (a normalizing flow: --family nsf or realnvp)"
    refusal = ("a normalizing flow samples in one pass through its inverse transforms, with no time grid to step "
               "or solve")

    def sample(self, model: Any, x: Tensor, *, generator: torch.Generator | None = None, **cond: Any) -> Solution:
        inverse = getattr(model, "from_base", None)
        if not callable(inverse):
            raise ConfigError(f"the exact sampler needs {self.needs}; {type(model).__name__} has no from_base")
        samples, _ = inverse(x, cond.get("context"))
        return Solution(samples, 1, torch.tensor([1.0, 0.0], dtype=torch.float64))

    def describe(self) -> str:
        return "one pass through the flow's inverse"


@SAMPLERS.register("path")
class PathSampler(_OnePassSampler):
    """A stochastic normalizing flow's sampling (``snf``): the base draw ``z ~ N(0, I)`` goes once through the
    flow's layers in sampling order, its flow layers by their inverse and its stochastic blocks (Langevin or
    Metropolis steps on the interpolated energies) with their noise drawn from ``generator``
    (``model.sample_path(z, generator=)``). The same generator gives the same samples. Like the exact sampler it
    has no time grid, so ``steps``, ``grid`` and ``solver`` are ConfigErrors (the blocks' step counts are the
    model's ``block_steps``). NFE counts the evaluations of the target energy along the path
    (``model.path_evaluations()``: ``n_steps + 1`` energies a Metropolis block, ``2 n_steps`` forces a Langevin
    block), the cost unit of sampling a Boltzmann distribution; the flow layers' one pass is not counted apart.
    The :class:`~genkit.solvers.Solution`'s times are ``[1, 0]``.
    """

    name = "path"
    needs = "a stochastic path from a base distribution (a stochastic normalizing flow: --family snf)"
    refusal = ("a stochastic normalizing flow samples in one pass through its flow layers and stochastic blocks, "
               "with no time grid to step or solve (its blocks' step counts are the model's block_steps)")

    def sample(self, model: Any, x: Tensor, *, generator: torch.Generator | None = None, **cond: Any) -> Solution:
        path = getattr(model, "sample_path", None)
        if not callable(path):
            raise ConfigError(f"the path sampler needs {self.needs}; {type(model).__name__} has no sample_path")
        if cond.get("context") is not None:
            raise ConfigError("the path sampler runs unconditional stochastic flows; this model gave a context")
        samples, _ = path(x, generator=generator)
        return Solution(samples, int(model.path_evaluations()), torch.tensor([1.0, 0.0], dtype=torch.float64))

    def describe(self) -> str:
        return "one pass, flow layers and stochastic blocks"


@SAMPLERS.register("policy")
class PolicySampler(_OnePassSampler):
    """A GFlowNet's sampling (``gflownet``): the prior draw is a batch of initial states, and the forward policy
    ``P_F(a | s)`` is rolled out from them (``model.rollout(x, generator=)``), all trajectories stepped together,
    until each takes the exit action; the samples are the terminal objects. There is no exploration (the policy
    itself) and no time grid, so ``steps``, ``grid`` and ``solver`` are ConfigErrors; NFE counts the policy
    evaluations of the longest trajectory (one per action, exit included). The
    :class:`~genkit.solvers.Solution`'s times are ``[1, 0]``.
    """

    name = "policy"
    needs = "a forward policy over an environment's states (a GFlowNet: --family gflownet)"
    refusal = ("a GFlowNet samples in one pass, its forward policy rolled out until it exits, with no time grid to "
               "step or solve")

    def sample(self, model: Any, x: Tensor, *, generator: torch.Generator | None = None, **cond: Any) -> Solution:
        rollout = getattr(model, "rollout", None)
        if not callable(rollout):
            raise ConfigError(f"the policy sampler needs {self.needs}; {type(model).__name__} has no rollout")
        if any(v is not None for v in cond.values()):
            raise ConfigError(f"the policy sampler runs unconditional GFlowNets; got {sorted(cond)}")
        samples, nfe = rollout(x, generator=generator)
        return Solution(samples, int(nfe), torch.tensor([1.0, 0.0], dtype=torch.float64))

    def describe(self) -> str:
        return "forward policy rolled out to exit"


@SAMPLERS.register("restart")
class RestartSampler(Sampler):
    """Multistep sampling of a one-step generator: ``RestartSampler(steps=None, grid=None)``.

    The multistep sampler of consistency models (Song et al. 2023, arXiv 2303.01469, Algorithm 1) and DMD2
    (Yin et al. 2024, arXiv 2405.14867): on a grid ``t_0 > t_1 > ... > t_k = t_min`` (uniform in ``t`` over the
    model's ``time_range()`` unless explicit times are given), ``x0 = model.denoise(x, t_j)``, then ``x =
    path.sample(x0, t_{j+1}, eps)`` with fresh ``eps ~ N(0, I)`` drawn from ``generator``, until the last
    ``x0`` is returned. NFE is ``steps`` (one network evaluation per grid time above the end). One step is the
    generator itself. ``steps`` None takes the model's default sampler's when it is a restart sampler, else 1.
    """

    name = "restart"
    needs = "a one-step generator with denoise(x, t) (the smt and smd families)"

    def __init__(self, steps: int | None = None, grid: str | Tensor | Sequence[float] | None = None):
        jumps = JumpSampler(steps, grid)  # the same grid checks
        self.steps, self.grid = jumps.steps, jumps.grid

    def times(self, model: Any) -> Tensor:
        """The grid ``[steps + 1]`` (float64) for ``model``."""
        if self.grid is not None:
            return self.grid
        steps = self.steps
        if steps is None:
            default = model.default_sampler() if callable(getattr(model, "default_sampler", None)) else None
            steps = getattr(default, "steps", None) if isinstance(default, RestartSampler) else None
            steps = 1 if steps is None else steps
        t_min, t_max = model.time_range() if callable(getattr(model, "time_range", None)) else (0.0, 1.0)
        return torch.linspace(t_max, t_min, steps + 1, dtype=torch.float64)

    def sample(self, model: Any, x: Tensor, *, generator: torch.Generator | None = None, **cond: Any) -> Solution:
        denoise = getattr(model, "denoise", None)
        if not callable(denoise):
            raise ConfigError(f"the restart sampler needs {self.needs}; {type(model).__name__} has no denoise")
        times = self.times(model)
        traj = [x]
        for k in range(len(times) - 1):
            x0 = denoise(traj[-1], float(times[k]), **cond)
            if k == len(times) - 2:
                traj.append(x0)
                break
            on = generator.device if generator is not None else x.device
            eps = torch.randn(x.shape, generator=generator, device=on, dtype=x.dtype).to(x.device)
            traj.append(model.path.sample(x0, float(times[k + 1]), eps))
        return Solution(traj[-1], len(times) - 1, times, torch.stack(traj))

    def describe(self) -> str:
        return f"{'default' if self.steps is None else self.steps} restart steps"

    def with_steps(self, steps: int | None) -> RestartSampler:
        return RestartSampler(steps) if self.grid is None else RestartSampler(steps, self.grid)


@SAMPLERS.register("masked_ancestral")
class MaskedAncestralSampler(Sampler):
    """Ancestral sampling of masked (absorbing-state) discrete diffusion: ``MaskedAncestralSampler(steps=None,
    cache=True)`` (MDLM, Sahoo et al. 2024, arXiv 2406.07524; METHODS.md section 3).

    The target is a model with ``logits(x_t, t) -> log p(x_0 | x_t) [B, L, V + 1]`` (the SUBS
    parameterisation: no mass on MASK, one-hot carry-over at unmasked positions), ``schedule.alpha(t)`` and
    ``mask_id`` (``= V``); ``x`` is the all-MASK prior ``[B, L]``. On the uniform grid ``1 = t_0 > ... >
    t_steps = 0``, each masked position moves from ``t`` to ``s`` to token ``y`` with probability
    ``p(x_0 = y | x_t) (alpha_s - alpha_t) / (1 - alpha_t)`` and stays MASK with ``(1 - alpha_s) / (1 -
    alpha_t)``; unmasked positions are copied. The last step (``s = 0``, ``alpha_s = 1``) gives MASK no mass,
    so it samples every remaining position from ``p(x_0 | x_t)`` (a draw, not the argmax: the output is
    then exact for an exact denoiser at one step per position). Any ``steps >= 1`` (None: 64); one step
    samples each position independently from its marginal ``p(x_0 | all MASK)``.

    ``cache`` (MDLM's caching of unchanged states): when a step changes no position of the batch, the next
    step reuses the previous log-probabilities instead of calling the network. This is exact for a denoiser
    that ignores ``t`` (the true ``p(x_0 | x_t)`` depends on the unmasked tokens only) and MDLM's
    approximation for a time-conditioned one. NFE counts the network calls actually made.
    """

    name = "masked_ancestral"
    needs = "a masked discrete diffusion model with logits(x_t, t), schedule and mask_id (--family mdlm)"

    def __init__(self, steps: int | None = None, cache: bool = True):
        if not isinstance(cache, bool):
            raise ConfigError(f"cache must be True or False (reuse the logits when no position changed); got "
                              f"{cache!r}")
        self.steps, self.cache = _check_steps(steps), cache

    def times(self) -> Tensor:
        """The grid ``[steps + 1]`` (float64) from 1 down to 0."""
        return torch.linspace(1, 0, (64 if self.steps is None else self.steps) + 1, dtype=torch.float64)

    def sample(self, model: Any, x: Tensor, *, generator: torch.Generator | None = None, **cond: Any) -> Solution:
        if not callable(getattr(model, "logits", None)) or getattr(model, "mask_id", None) is None:
            raise ConfigError(f"the masked ancestral sampler needs {self.needs}; {type(model).__name__} has none")
        if cond:
            raise ConfigError(f"the masked ancestral sampler takes no conditioning; got {sorted(cond)}")
        times = self.times()
        logp, nfe = None, 0
        for k in range(len(times) - 1):
            t, s = float(times[k]), float(times[k + 1])
            if logp is None or not self.cache:
                logp = model.logits(x, torch.full((x.shape[0],), t, device=x.device))
                nfe += 1
            new = masked_reverse_step(model, x, logp, t, s, generator)
            if not torch.equal(new, x):
                logp = None  # a changed state needs a fresh network call
            x = new
        return Solution(x, nfe, times)

    def describe(self) -> str:
        return f"{'default (64)' if self.steps is None else self.steps} ancestral steps" + (
            ", cached" if self.cache else "")

    def with_steps(self, steps: int | None) -> MaskedAncestralSampler:
        return MaskedAncestralSampler(steps, self.cache)


def masked_reverse_step(model: Any, x: Tensor, logp: Tensor, t: float, s: float,
                        generator: torch.Generator | None = None) -> Tensor:
    """One reverse step ``t -> s`` of masked diffusion, ``x_s [B, L]``, from ``x_t [B, L]`` and its SUBS
    log-probabilities ``logp = model.logits(x_t, t) [B, L, V + 1]``: a masked position moves to ``y`` with
    probability ``p(x_0 = y | x_t) (alpha_s - alpha_t) / (1 - alpha_t)`` and stays MASK with ``(1 - alpha_s) /
    (1 - alpha_t)``; unmasked positions are copied. One uniform per position, ``[B, L]``, from ``generator``
    (shared by :class:`MaskedAncestralSampler` and reward-guided samplers such as ``genkit.finetune.svdd``)."""
    mask_id = model.mask_id
    a_t, a_s = (float(model.schedule.alpha(torch.tensor(v, dtype=torch.float64))) for v in (t, s))
    probs = logp.exp()
    probs = torch.cat([probs[..., :mask_id] * (a_s - a_t), torch.full_like(probs[..., :1], 1 - a_s)], -1)
    cdf = probs.cumsum(-1)
    on = generator.device if generator is not None else x.device
    u = torch.rand(x.shape, generator=generator, device=on, dtype=cdf.dtype).to(x.device) * cdf[..., -1]
    draw = (cdf <= u[..., None]).sum(-1).clamp(max=mask_id)
    return torch.where(x == mask_id, draw, x)


def get_sampler(sampler: str | Sampler, **options: Any) -> Sampler:
    """A Sampler, or one built from its registry name with ``options`` (e.g. ``get_sampler("ode",
    solver="euler", steps=8)``). Options given with a Sampler object are an error: give them to it."""
    if isinstance(sampler, Sampler):
        if options:
            raise ConfigError(f"{sorted(options)} were given beside the sampler object {sampler!r}; build the "
                              "sampler with them instead (e.g. ODESampler('euler', steps=8))")
        return sampler
    cls = SAMPLERS.get(sampler)
    try:
        return cls(**options)
    except TypeError as e:
        raise ConfigError(f"sampler {sampler!r} does not take {sorted(options)} ({e}); see "
                          f"help(genkit.sampling.{cls.__name__})") from None
