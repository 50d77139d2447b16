"""What diffusion and flow-matching families share: a network read as a field through a path,
sampling with any solver, and likelihoods through the ODE."""

from __future__ import annotations

import argparse
import numbers
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..checks import check_class_names, check_device, check_generator, class_ids
from ..errors import ConfigError, DataError, ShapeError
from ..guidance import Guidance, guide
from ..paths import PREDICTIONS, Path, broadcast_time, get_path
from ..sampling import ODESampler, Sampler, get_sampler
from ..solvers import Solution, Solver, TimeGrid, ode_log_prob

__all__ = ["ContinuousModel"]


class ContinuousModel(nn.Module):
    """Base of continuous-time families. A model is a field: ``model(x, t, labels=None) -> prediction``.

    Subclasses define ``loss(batch, generator=None) -> (loss, logs)``, ``family`` and extra config keys.

    **Class-conditional models** (``num_classes=K``) take class ids ``labels [B]`` in ``0..K-1``, handed to the
    network as its ``y``; they train on ``(x, labels)`` batches (:class:`~genkit.data.LabelledData`). With
    ``class_dropout=p > 0`` each training label is replaced by the null label ``K`` with probability ``p``
    (drawn from the loss's generator, so resumed runs stay exact), which teaches the same network the
    unconditional model that classifier-free guidance needs (Ho & Salimans 2022, arXiv 2207.12598); the network
    is then built with ``K + 1`` classes, and ``model.null_label == K``. ``class_names`` (K strings) are
    recorded with the checkpoint. ``null_label`` defaults to ``K`` when ``class_dropout > 0`` and may be set to
    ``K`` without dropout (a network that learned the null class elsewhere).
    """

    family = "continuous"

    def __init__(self, net: nn.Module, path: Path | str, prediction: str, sample_shape: Sequence[int], *,
                 num_classes: int | None = None, class_names: Sequence[str] | None = None,
                 null_label: int | None = None, class_dropout: float = 0.0):
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
        self.num_classes, self.class_names, self.null_label, self.class_dropout = _classes(
            net, num_classes, class_names, null_label, class_dropout)

    # --- the field -----------------------------------------------------------------------------------
    def net_input(self, x: Tensor, t: Tensor) -> Tensor:
        """What the network sees for ``x_t`` (identity here; diffusion rescales)."""
        return x

    def forward(self, x: Tensor, t: Tensor | float, labels: Tensor | None = None, **cond: Any) -> Tensor:
        """The network's prediction at ``x [B, *sample_shape]``, ``t [B]`` (or a float); a class-conditional
        model needs ``labels [B]`` (class ids, or its null label), passed to the network as ``y``."""
        if tuple(x.shape[1:]) != self.sample_shape:
            shape = ", ".join(map(str, self.sample_shape))
            raise ShapeError(f"{self.family} model expects inputs of shape [batch, {shape}]; got {tuple(x.shape)}")
        t = broadcast_time(t, x)
        if labels is not None:
            if self.num_classes is None:
                raise ConfigError(f"this {self.family} model is unconditional (num_classes None) and takes no labels; "
                                  "drop labels=, or train a class-conditional model (num_classes=K)")
            cond["y"] = labels
        elif self.num_classes is not None and "y" not in cond:
            null = ("" if self.null_label is None else
                    f", or labels=model.null_label ({self.null_label}) for the unconditional model")
            raise ConfigError(f"this {self.family} model is class-conditional ({self.num_classes} classes) and needs "
                              f"labels: model(x, t, labels=...) / model.sample(n, labels=...) with class ids "
                              f"0..{self.num_classes - 1}{null}")
        try:
            return self.net(self.net_input(x, t), t, **cond)
        except IndexError as e:  # an embedding lookup out of range: name the labels
            if "y" in cond and torch.is_tensor(cond["y"]):
                _check_label_range(cond["y"], self.num_classes, self.null_label, self.class_names, e)
            raise
        except RuntimeError as e:  # explained here, at no cost to the calls that work (a sampling loop's)
            p = next(self.net.parameters(), None)
            _explain_integer(x, "x", self.family, e)
            if p is not None and x.is_floating_point() and x.dtype != p.dtype:
                raise ShapeError(f"x is {x.dtype} but the {self.family} model's weights are {p.dtype}; convert one "
                                 f"of them (x.to({p.dtype}) or model.to({x.dtype}))") from e
            raise

    def split_batch(self, batch: Any) -> tuple[Tensor, Tensor | None]:
        """``(x, labels)`` of a training batch, checked: a tensor ``[B, *sample_shape]`` for an unconditional
        model, ``(x, labels [B])`` (a tuple or list, as a DataLoader collates ``(sample, label)`` items) for a
        class-conditional one (``labels`` None then)."""
        if self.num_classes is None:
            if isinstance(batch, (tuple, list)):
                raise ShapeError(f"{self.family}.loss expects a tensor batch [batch, {self.sample_shape}]; got a "
                                 f"{type(batch).__name__} of {len(batch)} parts, e.g. (data, labels), but this model "
                                 "is unconditional (num_classes None): train it on the samples alone, or build a "
                                 "class-conditional model (num_classes=K; a network with K + 1 classes and "
                                 "class_dropout for guidance)")
            return self.check_batch(batch), None
        if torch.is_tensor(batch) or batch is None:
            raise ShapeError(f"this {self.family} model is class-conditional ({self.num_classes} classes) and trains "
                             "on (x, labels) batches; got " + ("None" if batch is None else "a tensor without labels")
                             + ": pass genkit.data.LabelledData(x, labels) to Trainer.fit")
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise ShapeError(f"a class-conditional batch is (x, labels); got {type(batch).__name__}"
                             + (f" of {len(batch)} parts" if isinstance(batch, (tuple, list)) else ""))
        x, labels = self.check_batch(batch[0]), batch[1]
        integer = torch.is_tensor(labels) and labels.dtype in (torch.int64, torch.int32, torch.int16, torch.uint8)
        if not integer or labels.shape != (x.shape[0],):
            what = f"{labels.dtype} {tuple(labels.shape)}" if torch.is_tensor(labels) else type(labels).__name__
            raise ShapeError(f"batch labels must be integer class ids of shape [{x.shape[0]}]; got {what}")
        return x, labels.long()

    def drop_labels(self, labels: Tensor, generator: torch.Generator | None) -> Tensor:
        """Class dropout: each label becomes :attr:`null_label` with probability :attr:`class_dropout` (one
        uniform draw per sample from ``generator``; no draw at all without dropout)."""
        if self.class_dropout == 0.0:
            return labels
        drop = torch.rand(labels.shape, generator=generator, device=labels.device) < self.class_dropout
        return labels.masked_fill(drop, self.null_label)

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
        # a guided sampler (genkit.finetune.svdd given a solver) declares the sampler whose steps it reweights
        if sampler.name not in self.samplers() and getattr(sampler, "guides", None) not in self.samplers():
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
        labels = class_ids(labels, n, k, null_label=getattr(self, "null_label", None),
                           class_names=getattr(self, "class_names", None))
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
        """The model's JSON config; a class-conditional model adds ``num_classes``, ``class_names``,
        ``null_label`` and ``class_dropout`` (an unconditional model's config has none of them)."""
        classes = {} if self.num_classes is None else {
            "num_classes": self.num_classes, "class_names": self.class_names, "null_label": self.null_label,
            "class_dropout": self.class_dropout}
        return {"family": self.family, "path": self.path.config(), "net": self.net.config(),
                "prediction": self.prediction, "sample_shape": list(self.sample_shape), **classes,
                **self.extra_config()}

    @staticmethod
    def class_config(config: dict[str, Any]) -> dict[str, Any]:
        """The class keywords of the constructor recorded in ``config`` (none for an unconditional model)."""
        return {k: config[k] for k in ("num_classes", "class_names", "null_label", "class_dropout") if k in config}

    @staticmethod
    def class_options(args: argparse.Namespace) -> dict[str, Any]:
        """The class keywords train/train.py sets (``args.num_classes``, ``args.class_names``,
        ``args.class_dropout``; absent: unconditional)."""
        k = getattr(args, "num_classes", None)
        if k is None:
            return {}
        return {"num_classes": k, "class_names": getattr(args, "class_names", None),
                "class_dropout": float(getattr(args, "class_dropout", None) or 0.0)}

    def extra_config(self) -> dict[str, Any]:
        return {}


def _explain_integer(x: Tensor, name: str, family: str, cause: BaseException | None = None) -> None:
    """A ShapeError for integer data given to a continuous family (it asks for real-valued samples)."""
    if torch.is_tensor(x) and not (x.is_floating_point() or x.is_complex()):
        what = "the model's input" if name == "x" else "training data"
        raise ShapeError(f"{name} is {x.dtype} but the {family} model is continuous: {what} must be floating point "
                         f"(convert it: {name}.float(), scaled to about unit size, e.g. images to [-1, 1]); integer "
                         "tokens are for a discrete family (masked discrete diffusion, not in genkit yet)") from cause


def _classes(net: nn.Module, num_classes: Any, class_names: Any, null_label: Any,
             class_dropout: Any) -> tuple[int | None, list[str] | None, int | None, float]:
    """The checked class settings of a model, against the network's own class count."""
    if num_classes is None:
        given = [k for k, v in (("class_names", class_names), ("null_label", null_label)) if v is not None]
        if class_dropout:
            given.append("class_dropout")
        if given:
            raise ConfigError(f"{', '.join(given)} set on an unconditional model (num_classes None); pass "
                              "num_classes=K for a class-conditional model")
        return None, None, None, 0.0
    if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) or num_classes < 1:
        raise ConfigError(f"num_classes must be a positive int (the number of real classes K); got {num_classes!r}")
    k = int(num_classes)
    class_names = check_class_names(class_names, k)
    if isinstance(class_dropout, bool) or not isinstance(class_dropout, numbers.Real) or not 0 <= class_dropout < 1:
        raise ConfigError(f"class_dropout must be a probability in [0, 1) (0.1 is usual for guidance); got "
                          f"{class_dropout!r}")
    if null_label is None and class_dropout > 0:
        null_label = k
    if null_label is not None and (isinstance(null_label, bool) or null_label != k):
        raise ConfigError(f"null_label must be K = num_classes = {k} (the extra class after the real ones); got "
                          f"{null_label!r}")
    want = k + (null_label is not None)
    config = net.config() if callable(getattr(net, "config", None)) else {}
    have = config.get("num_classes") if isinstance(config, dict) else None
    if have != want:
        null = f" ({k} classes + the null label {k} that class dropout trains)" if null_label is not None else ""
        raise ConfigError(f"the network must be built with num_classes={want}{null}; {type(net).__name__} has "
                          f"num_classes={have!r}: build it with {type(net).__name__}(..., num_classes={want})")
    return k, class_names, None if null_label is None else int(null_label), float(class_dropout)


def _check_label_range(labels: Tensor, k: int | None, null: int | None, names: Sequence[str] | None,
                       cause: BaseException) -> None:
    if k is None:
        return
    bad = ((labels < 0) | (labels >= k)) & (labels != (-1 if null is None else null))
    if bool(bad.any()):
        known = f" ({', '.join(map(str, names))})" if names else ""
        extra = f" or the null label {null}" if null is not None else ""
        raise ConfigError(f"labels {labels[bad][:5].tolist()} are not classes of this model: 0..{k - 1}{known}"
                          f"{extra}") from cause
