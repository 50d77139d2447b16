"""What diffusion and flow-matching families share: a network read as a field through a path,
sampling with any solver, and likelihoods through the ODE."""

from __future__ import annotations

import argparse
import numbers
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..checks import check_device, check_generator
from ..errors import ConfigError, DataError, ShapeError
from ..guidance import Guidance, guide
from ..paths import PREDICTIONS, Path, broadcast_time, get_path
from ..sampling import ODESampler, Sampler, get_sampler
from ..solvers import Solution, Solver, TimeGrid, ode_log_prob

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
            _explain_integer(x, "x", self.family, e)
            if p is not None and x.is_floating_point() and x.dtype != p.dtype:
                raise ShapeError(f"x is {x.dtype} but the {self.family} model's weights are {p.dtype}; convert one "
                                 f"of them (x.to({p.dtype}) or model.to({x.dtype}))") from e
            raise

    def check_batch(self, batch: Any) -> Tensor:
        if batch is None:
            raise DataError(f"{self.family}.loss trains on data and got none (batch=None); pass a tensor of samples "
                            "[n, *sample_shape] (Trainer.fit(data)); only data-free objectives train without it")
        if not torch.is_tensor(batch):
            raise ShapeError(f"{self.family}.loss expects a tensor batch [batch, {self.sample_shape}]; got "
                             f"{type(batch).__name__}. Unconditional families take data only, not (data, label).")
        if tuple(batch.shape[1:]) != self.sample_shape:
            raise ShapeError(f"batch has shape {tuple(batch.shape)} but the model was built for samples of shape "
                             f"{self.sample_shape}; rebuild the model with sample_shape={tuple(batch.shape[1:])}")
        _explain_integer(batch, "batch", self.family)
        return batch

    # --- sampling and densities ---------------------------------------------------------------------------
    def samplers(self) -> tuple[str, ...]:
        """Names (in :data:`genkit.sampling.SAMPLERS`) of the samplers this model supports, default first."""
        return ("ode",)

    def default_sampler(self) -> Sampler:
        """What :meth:`sample` uses when given no sampler: heun on the uniform grid (32 steps)."""
        return ODESampler("heun", None, "uniform")

    def get_sampler(self, sampler: str | Sampler | None = None, *, solver: str | Solver | None = None,
                    steps: int | None = None, grid: str | TimeGrid | Tensor | Sequence[float] | None = None) -> Sampler:
        """The sampler :meth:`sample` runs, checked against :meth:`samplers`.

        ``sampler`` is a Sampler or a registry name (``"ode"``, ``"jumps"``), built with whichever of ``solver``,
        ``steps``, ``grid`` are given. Without one, the keywords keep their meaning: ``solver`` or ``grid`` ask
        for an ODE solver (``ODESampler(solver or "heun", steps, grid or "uniform")``), ``steps`` alone sets the
        default sampler's step count. A jump sampler without steps takes the default sampler's.
        """
        options = {k: v for k, v in (("solver", solver), ("steps", steps), ("grid", grid)) if v is not None}
        if sampler is None:
            if solver is not None or grid is not None:
                sampler = ODESampler("heun" if solver is None else solver, steps, "uniform" if grid is None else grid)
            else:
                default = self.default_sampler()
                sampler = default if steps is None else default.with_steps(steps)
        else:
            sampler = get_sampler(sampler, **options)
        if sampler.name not in self.samplers():
            raise ConfigError(f"the {self.family} model cannot sample with {sampler!r}, which needs {sampler.needs}; "
                              f"its samplers are {self.samplers()}")
        if sampler.steps is None:  # e.g. jumps by name: the model's own count (an ODE sampler's None means 32)
            default = self.default_sampler()
            if type(default) is type(sampler) and default.steps is not None:
                sampler = sampler.with_steps(default.steps)
        return sampler

    @torch.no_grad()
    def sample(self, n: int, *, sampler: str | Sampler | None = None, solver: str | Solver | None = None,
               steps: int | None = None, grid: str | TimeGrid | Tensor | Sequence[float] | None = None,
               generator: torch.Generator | None = None, device: torch.device | str | None = None,
               return_solution: bool = False, labels: Tensor | Sequence[int] | int | None = None,
               guidance: Guidance | float | None = None, **cond: Any) -> Tensor | Solution:
        """Draw ``n`` samples ``[n, *sample_shape]`` from the prior through a sampler (no gradients).

        ``sampler`` is a :class:`~genkit.sampling.Sampler` or its name (see :meth:`get_sampler` for how
        ``solver``, ``steps`` and ``grid`` build one; by default :meth:`default_sampler`). ODE sampling takes
        32 steps unless told otherwise (a searched solver's own N; explicit grid times their own count).
        ``generator`` makes the prior draw (and any solver noise) reproducible; ``device`` defaults to the
        model's. With ``return_solution=True`` the full :class:`~genkit.solvers.Solution` (NFE, trajectory
        if asked through the solver) is returned.

        A class-conditional model takes ``labels``: one class id for all ``n`` samples or ``n`` of them (a list or
        a 1-D integer tensor). ``guidance`` (a scale or a :class:`~genkit.guidance.Guidance`) samples with
        classifier-free guidance (:func:`genkit.guidance.guide`, one batched network call per evaluation);
        it needs ``labels`` and a model with a null label. ``labels`` without ``guidance`` sample the plain
        conditional model (guidance scale 1).
        """
        return self._draw(n, self.get_sampler(sampler, solver=solver, steps=steps, grid=grid), generator, device,
                          return_solution, cond, labels, guidance)

    def rsample(self, n: int, *, sampler: str | Sampler | None = None, solver: str | Solver | None = None,
                steps: int | None = None, grid: str | TimeGrid | Tensor | Sequence[float] | None = None,
                generator: torch.Generator | None = None, device: torch.device | str | None = None,
                return_solution: bool = False, labels: Tensor | Sequence[int] | int | None = None,
                guidance: Guidance | float | None = None, **cond: Any) -> Tensor | Solution:
        """:meth:`sample` with gradients kept: the samples are ``x = Phi_theta(z)`` with ``z`` from the fixed
        Gaussian prior, a deterministic (reparameterised) map of the parameters for ODE solvers and jumps (SDE
        solvers add noise that does not depend on the parameters), so ``loss(rsample(n)).backward()`` gives
        pathwise gradients w.r.t. the parameters, as ``torch.distributions``' ``rsample`` does. Same values as
        :meth:`sample` for the same generator; memory grows with the steps (every evaluation is recorded).
        ``labels`` and ``guidance`` as in :meth:`sample`."""
        return self._draw(n, self.get_sampler(sampler, solver=solver, steps=steps, grid=grid), generator, device,
                          return_solution, cond, labels, guidance)

    def _draw(self, n: int, sampler: Sampler, generator: torch.Generator | None, device: torch.device | str | None,
              return_solution: bool, cond: dict[str, Any], labels: Any = None,
              guidance: Guidance | float | None = None) -> Tensor | Solution:
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
            raise ConfigError(f"n must be a positive integer; got {n!r}")
        n = int(n)
        p = next(self.parameters())
        check_generator(generator, f"{self.family}.sample")
        device = check_device(device, f"{self.family}.sample") if device is not None else p.device
        if generator is not None and generator.device.type != device.type:
            raise ConfigError(f"the generator is on {generator.device} but sampling runs on {device}; create it with "
                              f"torch.Generator(device={str(device)!r})")
        target: Any = self
        if guidance is not None or labels is not None:
            labels = self._sample_labels(labels, n, device, guidance)
            if guidance is None:
                cond["labels"] = labels
            else:
                if sampler.name != "ode":
                    raise ConfigError(f"classifier-free guidance combines two field evaluations, so it needs an "
                                      f"ODE/SDE solver; {sampler!r} runs learned jumps. Pick a solver (solver='heun')")
                target = guide(self, guidance, labels)
        x = self.path.sample_prior((n, *self.sample_shape), generator=generator, device=device, dtype=p.dtype)
        sol = sampler.sample(target, x, generator=generator, **cond)
        return sol if return_solution else sol.samples

    def _sample_labels(self, labels: Any, n: int, device: torch.device, guidance: Any) -> Tensor:
        """``labels`` of :meth:`sample` as ``[n]`` int64 class ids on ``device``, checked against the model."""
        if labels is None:
            raise ConfigError("guidance needs labels: model.sample(n, labels=3, guidance=2.0) (one class for all, or "
                              "n class ids)")
        k = getattr(self, "num_classes", None)
        if k is None:
            raise ConfigError(f"this {self.family} model is unconditional (num_classes None), so it takes no labels"
                              + (" and cannot be guided" if guidance is not None else "")
                              + "; use a class-conditional model (num_classes set; a null label for guidance)")
        if isinstance(labels, numbers.Integral) and not isinstance(labels, bool):
            labels = torch.full((n,), int(labels), dtype=torch.long)
        elif isinstance(labels, (list, tuple)):
            labels = torch.tensor(labels, dtype=torch.long) if len(labels) else torch.zeros(0, dtype=torch.long)
        integer = torch.is_tensor(labels) and not (labels.is_floating_point() or labels.is_complex())
        if not integer or labels.dtype is torch.bool:
            what = labels.dtype if torch.is_tensor(labels) else type(labels).__name__
            raise ShapeError(f"labels must be a class id (int), a list of n ids or a 1-D integer tensor; got {what}")
        if labels.shape != (n,):
            raise ShapeError(f"labels must hold one class id per sample, shape [{n}]; got {tuple(labels.shape)}")
        null = getattr(self, "null_label", None)
        bad = ((labels < 0) | (labels >= k)) & (labels != (-1 if null is None else null))
        if bool(bad.any()):
            names = getattr(self, "class_names", None)
            known = f" ({', '.join(map(str, names))})" if names else ""
            raise ConfigError(f"labels {labels[bad][:5].tolist()} are not classes of this model: 0..{k - 1}{known}")
        return labels.to(device=device, dtype=torch.long)

    #: Return E[x_0 | x_t] at the grid's last time when it ends above 0 (one extra evaluation).
    denoise_end = False

    def default_grid(self, grid):
        """Fill in the model's time range for a grid given by name (objects and explicit times are kept)."""
        return grid

    def log_prob(self, x: Tensor, **kwargs: Any) -> Tensor:
        """``log p(x)`` in nats through the probability-flow ODE over the model's time range (see
        :meth:`time_range` and :func:`genkit.solvers.ode_log_prob`, whose options ``solver``, ``steps``,
        ``divergence_mode``, ``t_min``, ``t_max`` and ``generator`` it takes; other keywords are conditioning).
        A keyword close to an option (``stpes=``) is a ConfigError, not conditioning."""
        self.check_batch(x)
        t_min, t_max = self.time_range()
        kwargs.setdefault("t_min", t_min)
        kwargs.setdefault("t_max", t_max)
        return ode_log_prob(self, x, **kwargs)

    def time_range(self) -> tuple[float, float]:
        """``(t_min, t_max)`` the model was trained on and samples over."""
        return self.path.t_min, 1.0

    # --- registry hooks: a tiny example, and the flags of train/train.py ----------------------------------
    @classmethod
    def example(cls) -> tuple[ContinuousModel, Tensor]:
        """A tiny model of this family and a data batch ``[B, *sample_shape]`` it trains on, the same on every
        call (weights seeded): what the family property suite (tests/test_families.py) runs. Every registered
        family must define it."""
        raise NotImplementedError(f"family {cls.family!r} ({cls.__name__}) registers no example(); define the "
                                  "classmethod example() -> (model, batch)")

    #: Defaults of train/train.py's shared flags (e.g. ``{"path": "linear"}``) and of this family's own flags.
    cli_defaults: ClassVar[dict[str, Any]] = {}

    @classmethod
    def add_arguments(cls, group: argparse._ArgumentGroup) -> None:
        """Add this family's own flags to ``group`` (train/train.py gives each family a group of its own). Every
        flag's argparse default must be None: the script fills :attr:`cli_defaults`, and a flag set for another
        family is an error naming that family."""

    @classmethod
    def from_args(cls, args: argparse.Namespace, net: nn.Module, sample_shape: Sequence[int]) -> ContinuousModel:
        """Build the family from train/train.py's parsed flags (``args.path`` and the family's own, defaults
        filled in) around ``net``; bad values are ConfigErrors naming the flag. A family that cannot be trained
        by train/train.py (it needs a teacher, say) raises a ConfigError pointing to its own script."""
        raise NotImplementedError(f"family {cls.family!r} does not define from_args(); train it from Python")

    @classmethod
    def net_options(cls, args: argparse.Namespace, kind: str) -> dict[str, Any]:
        """Extra keyword arguments of the network train/train.py builds (``kind`` is ``"mlp"`` or ``"unet"``)."""
        return {}

    # --- config ---------------------------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        return {"family": self.family, "path": self.path.config(), "net": self.net.config(),
                "prediction": self.prediction, "sample_shape": list(self.sample_shape), **self.extra_config()}

    def extra_config(self) -> dict[str, Any]:
        return {}


def _explain_integer(x: Tensor, name: str, family: str, cause: BaseException | None = None) -> None:
    """A ShapeError for integer data given to a continuous family (it asks for real-valued samples)."""
    if torch.is_tensor(x) and not (x.is_floating_point() or x.is_complex()):
        what = "the model's input" if name == "x" else "training data"
        raise ShapeError(f"{name} is {x.dtype} but the {family} model is continuous: {what} must be floating point "
                         f"(convert it: {name}.float(), scaled to about unit size, e.g. images to [-1, 1]); integer "
                         "tokens are for a discrete family (masked discrete diffusion, not in genkit yet)") from cause
