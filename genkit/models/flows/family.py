"""Normalizing flows as genkit model families: ``nsf`` (neural spline flow, Durkan et al. 2019, arXiv 1906.04032)
and ``realnvp`` (affine coupling, Dinh et al. 2017, arXiv 1605.08803), registered in
:data:`genkit.models.FAMILIES` beside diffusion and flow matching.

A flow family is a distribution over vectors ``[batch, features]``: :meth:`~FlowFamily.sample` /
:meth:`~FlowFamily.rsample` through a sampler object (the ``exact`` sampler: one pass through the inverse
transforms, :class:`genkit.sampling.ExactSampler`), the exact :meth:`~FlowFamily.log_prob` in nats,
:meth:`~FlowFamily.sample_and_log_prob` and the score :meth:`~FlowFamily.score` ``= grad_x log p(x)``. Its
score is also a genkit field (:meth:`~FlowFamily.score_field`, prediction ``"score"``, defined at ``t = 0``)
that :func:`genkit.as_score` takes, and an energy ``U = -log p`` (:meth:`~FlowFamily.as_energy`) with the
``energy`` / ``force`` interface of :mod:`genkit.energies`. A flow trained by an energy also gives importance weights
against it, :meth:`~FlowFamily.sample_with_log_weights` (``log w = -U(x) - log q(x)``), the method the stochastic
``snf`` family (:mod:`genkit.models.flows.snf_family`, built on this class) shares with exact path weights.

It trains two ways, both through :class:`genkit.train.Trainer`:

- by data: ``loss(batch)`` is the negative log-likelihood ``-mean log p(x)``;
- by energy (``energy={"name": ..., **kwargs}``, a :data:`genkit.energies.ENERGIES` entry): the reverse KL
  ``E_q[U(x) + log q(x)]`` over ``batch_size`` of its own samples (``KL(q || p) - log Z``); the model then
  declares ``data_free = True`` and ``loss(None)`` makes its own samples.

Class-conditional flows (``num_classes=K``) take ``labels=`` (class ids ``0..K-1``) like every family; the
labels reach the low-level :class:`~genkit.models.flows.Flow` as a one-hot ``context``. A flow has no field to
guide, so ``guidance=`` is a ConfigError, and there is no null label.

>>> import torch
>>> model = NeuralSplineFlow(2, layers=2, bins=4, hidden=8)
>>> x, logp = model.sample_and_log_prob(3, generator=torch.Generator().manual_seed(0))
>>> x.shape, bool((model.log_prob(x) - logp).abs().max() < 1e-5)
(torch.Size([3, 2]), True)
"""

from __future__ import annotations

import argparse
import json
import math
import numbers
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ...checks import check_class_names, check_device, check_generator, class_ids
from ...energies import Energy, energy_from_config, get_energy
from ...errors import ConfigError, DataError, ShapeError
from ...paths import broadcast_time, get_path
from ...sampling import ExactSampler, Sampler, get_sampler
from ...solvers import Solution
from ..registry import FAMILIES
from .flow import Flow
from .transforms import (
    AffineCoupling,
    AutoregressiveSpline,
    CouplingSpline,
    LULinear,
    MaskedCouplingSpline,
    Permutation,
    Transform,
    half_swap_permutation,
)

__all__ = ["FlowFamily", "NeuralSplineFlow", "RealNVP", "FlowScoreField", "FlowEnergy", "MIXINGS", "NSF_TRANSFORMS"]

#: What sits between two flow layers: an LU-factorised linear map (Glow), the reversal of the features, a
#: seeded random permutation, or nothing (then coupling layers alternate which half they transform).
MIXINGS = ("lu", "reverse", "random", "none")
#: The spline layers of ``nsf``: coupling (parallel both ways) or autoregressive (MADE; density in one pass,
#: sampling sequential in the features).
NSF_TRANSFORMS = ("coupling", "autoregressive", "masked_coupling")


def _positive_int(name: str, value: Any, least: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < least:
        raise ConfigError(f"{name} must be an int >= {least}; got {value!r}")
    return int(value)


def _energy(energy: Any, features: int) -> Energy | None:
    """The target energy from its name, its config dict (``{"name": ..., **kwargs}``) or an Energy."""
    if energy is None:
        return None
    if isinstance(energy, str):
        energy = get_energy(energy)
    elif isinstance(energy, dict):
        energy = energy_from_config(energy)
    if not isinstance(energy, Energy):
        raise ConfigError(f"energy must be a genkit.energies name, its config {{'name': ..., **kwargs}} or an Energy; "
                          f"got {type(energy).__name__}")
    if energy.dim != features:
        raise ConfigError(f"the energy {energy.name!r} is {energy.dim}-D but the flow has features={features}; build "
                          f"the flow with features={energy.dim}")
    if energy.domain != "real":
        raise ConfigError(f"the energy {energy.name!r} lives on a {energy.domain}; an nsf / realnvp flow models "
                          "densities on R^d, so it would put mass outside the domain: use a flow on the torus")
    return energy


class FlowFamily(nn.Module):
    """Base of the flow families: a :class:`~genkit.models.flows.Flow` built from a JSON config (see
    :class:`NeuralSplineFlow` and :class:`RealNVP` for the options) and read as a genkit model.

    Subclasses set ``family`` and implement :meth:`layer` (the ``i``-th invertible layer) and
    :meth:`layer_config` (its options in the config).
    """

    family: ClassVar[str] = "flow"
    #: ``log_prob`` is exact (change of variables), not an ODE estimate: evaluate.py reports it as such.
    exact_likelihood: ClassVar[bool] = True
    #: train/train.py builds no MLP / UNet for this family: the flow builds its own conditioner networks.
    needs_net: ClassVar[bool] = False
    #: train/train.py's --class-dropout under --conditional: a flow has no null label to train.
    default_class_dropout: ClassVar[float] = 0.0
    null_label = None  # no null class: a flow is guided by nothing
    class_dropout = 0.0

    def __init__(self, features: int, *, layers: int = 4, hidden: int = 64, depth: int = 2,
                 mixing: str = "lu", seed: int = 0, num_classes: int | None = None,
                 class_names: Sequence[str] | None = None, energy: Any = None, batch_size: int = 256):
        super().__init__()
        self.features = _positive_int("features", features, 2 if self.family == "realnvp" else 1)
        self.layers = _positive_int("layers", layers)
        self.hidden = _positive_int("hidden", hidden)
        self.depth = _positive_int("depth", depth)
        if mixing not in MIXINGS:
            raise ConfigError(f"unknown mixing {mixing!r}; choose one of {MIXINGS}")
        self.mixing = mixing
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
            raise ConfigError(f"seed must be an int; got {seed!r}")
        self.seed = int(seed)
        self.num_classes, self.class_names = self._classes(num_classes, class_names)
        self.energy = _energy(energy, self.features)
        if self.energy is not None and self.num_classes is not None:
            raise ConfigError("a flow trained by an energy has no classes (the energy is one target); drop "
                              "num_classes or the energy")
        self.batch_size = _positive_int("batch_size", batch_size)
        self.sample_shape = (self.features,)
        context = self.num_classes or 0
        with torch.random.fork_rng(devices=[]):  # the initial weights follow the config's seed alone
            torch.manual_seed(self.seed)
            transforms: list[Transform] = []
            for i in range(self.layers):
                if i > 0:
                    transforms += self._mixing(i)
                transforms.append(self.layer(i, context))
        self._assemble(transforms, context)

    def _assemble(self, transforms: list[Transform], context_features: int) -> None:
        """Hold the built layers (data -> base order, mixing layers included): as a :class:`Flow` here; a family
        that runs them otherwise (a stochastic flow) keeps them in its own module, once (a checkpoint holds each
        tensor under one name)."""
        self.flow = Flow(transforms, self.features, context_features)

    def _core(self) -> nn.Module:
        """The module holding the transforms (its ``_ref`` buffer carries the device and dtype)."""
        return self.flow

    # --- construction -------------------------------------------------------------------------------------
    @staticmethod
    def _classes(num_classes: Any, class_names: Any) -> tuple[int | None, list[str] | None]:
        if num_classes is None:
            if class_names is not None:
                raise ConfigError("class_names set on an unconditional flow (num_classes None); pass num_classes=K")
            return None, None
        k = _positive_int("num_classes", num_classes)
        class_names = check_class_names(class_names, k)
        return k, class_names

    def _mixing(self, i: int) -> list[Transform]:
        if self.mixing == "lu":  # behind a coupling layer, P moves what it transformed to the next one's condition
            split = self.conditioning_size()
            perm = None if split is None else half_swap_permutation(self.features, split, self.seed + i)
            return [LULinear(self.features, seed=self.seed + i, perm=perm)]
        if self.mixing == "reverse":
            return [Permutation.reverse(self.features)]
        if self.mixing == "random":
            return [Permutation.random(self.features, seed=self.seed + i)]
        return []

    def conditioning_size(self) -> int | None:
        """How many features (the first, behind a mixing layer) each coupling layer conditions on; None when the
        layers are not couplings (autoregressive: every feature is transformed)."""
        transform = getattr(self, "transform", "coupling")
        if transform == "autoregressive":
            return None
        return (self.features + 1) // 2 if transform == "masked_coupling" else self.features // 2

    def parity(self, i: int) -> int:
        """Which half a coupling layer ``i`` transforms: always the same half behind a mixing layer (which moves
        the features), alternating without one."""
        return i % 2 if self.mixing == "none" else 0

    def layer(self, i: int, context_features: int) -> Transform:  # pragma: no cover - abstract
        raise NotImplementedError

    def layer_config(self) -> dict[str, Any]:
        return {}

    # --- conditioning ---------------------------------------------------------------------------------------
    def _labels(self, labels: Any, n: int, device: torch.device, guidance: Any = None) -> Tensor | None:
        """The flow's context for ``labels``: one-hot ``[n, K]`` (None for an unconditional flow), checked."""
        if guidance is not None:
            raise ConfigError(f"guidance={guidance!r}: a {self.family} flow samples its density exactly through its "
                              "inverse; it has no field to guide (classifier-free guidance mixes two fields). Drop "
                              "guidance=, and sample a class with labels=")
        if labels is None:
            if self.num_classes is not None:
                raise ConfigError(f"this {self.family} flow is class-conditional ({self.num_classes} classes) and "
                                  f"needs labels: class ids 0..{self.num_classes - 1} (labels=3, or one per sample)")
            return None
        if self.num_classes is None:
            raise ConfigError(f"this {self.family} flow is unconditional (num_classes None), so it takes no labels; "
                              "drop labels= or train a class-conditional flow (num_classes=K)")
        labels = class_ids(labels, n, self.num_classes, class_names=self.class_names, what="flow")
        return nn.functional.one_hot(labels.to(device=device, dtype=torch.long), self.num_classes).to(self._dtype())

    def _dtype(self) -> torch.dtype:
        return self._core()._ref.dtype

    def _device(self) -> torch.device:
        return self._core()._ref.device

    def check_x(self, x: Any, what: str = "x") -> Tensor:
        if x is None:
            raise DataError(f"{self.family}.loss trains on data and got none (batch=None); pass a tensor of samples "
                            "[n, *sample_shape] (Trainer.fit(data)); only data-free objectives train without it")
        if not torch.is_tensor(x):
            raise ShapeError(f"{what} must be a tensor [batch, {self.features}]; got {type(x).__name__}")
        if x.dim() != 2 or x.shape[1] != self.features:
            raise ShapeError(f"this {self.family} flow takes {what} of shape [batch, {self.features}]; got "
                             f"{tuple(x.shape)}")
        if not x.is_floating_point():
            raise ShapeError(f"{what} is {x.dtype}; a flow takes floating-point vectors ({what}.float())")
        return x

    # --- the distribution -----------------------------------------------------------------------------------
    def log_prob(self, x: Tensor, labels: Tensor | Sequence[int] | int | None = None) -> Tensor:
        """Exact ``log p(x | labels)`` ``[batch]`` in nats (change of variables through the transforms)."""
        x = self.check_x(x)
        return self.flow.log_prob(x, self._labels(labels, x.shape[0], x.device))

    def score(self, x: Tensor, labels: Tensor | Sequence[int] | int | None = None) -> Tensor:
        """``grad_x log p(x | labels)`` ``[batch, features]`` by autograd (no graph kept)."""
        x = self.check_x(x)
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(self.log_prob(xg, labels).sum(), xg)
        return g

    def score_field(self) -> FlowScoreField:
        """The score as a genkit field (prediction ``"score"``, :func:`genkit.as_score` returns it as is), defined
        at ``t = 0``, the data end: a flow models the data density, not its noised marginals."""
        return FlowScoreField(self)

    def as_energy(self) -> FlowEnergy:
        """The flow as an energy ``U(x) = -log p(x)`` (normalised: ``log Z = 0``), with ``force = score``: what
        genkit's energy consumers (Langevin blocks, quadrature) take."""
        return FlowEnergy(self)

    def from_base(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(x, log p(x))`` for base draws ``z [n, features]``: one pass through the inverse transforms."""
        logp = self.flow._base_log_prob(z)
        for t in reversed(self.flow.transforms):
            z, ld = t.inverse(z, context if t.context_features else None)
            logp = logp - ld
        return z, logp

    # --- samplers -------------------------------------------------------------------------------------------
    def samplers(self) -> tuple[str, ...]:
        return ("exact",)

    def default_sampler(self) -> Sampler:
        return ExactSampler()

    def get_sampler(self, sampler: str | Sampler | None = None, *, solver: Any = None, steps: int | None = None,
                    grid: Any = None) -> Sampler:
        """The exact sampler (by default, by name or as an object); ``steps`` / ``grid`` / ``solver`` are a
        ConfigError naming why (a flow samples in one pass, with no time grid to step)."""
        options = {k: v for k, v in (("solver", solver), ("steps", steps), ("grid", grid)) if v is not None}
        chosen = get_sampler(self.samplers()[0] if sampler is None else sampler, **options)
        if chosen.name not in self.samplers():
            raise ConfigError(f"the {self.family} flow cannot sample with {chosen!r}, which needs {chosen.needs}; its "
                              f"samplers are {self.samplers()} (one pass through its layers)")
        return chosen

    def _draw(self, n: int, sampler: Sampler, generator: torch.Generator | None, device: Any,
              return_solution: bool, labels: Any, guidance: Any) -> Tensor | Solution:
        z, context = self._base_draw(n, generator, device, labels, guidance)
        sol = sampler.sample(self, z, generator=generator, context=context)
        return sol if return_solution else sol.samples

    def _base_draw(self, n: int, generator: torch.Generator | None, device: Any, labels: Any,
                   guidance: Any) -> tuple[Tensor, Tensor | None]:
        """The checked base draw ``z ~ N(0, I)`` ``[n, features]`` from ``generator`` and the labels' context."""
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
            raise ConfigError(f"n must be a positive integer; got {n!r}")
        n = int(n)
        check_generator(generator, f"{self.family}.sample")
        device = check_device(device, f"{self.family}.sample") if device is not None else self._device()
        if generator is not None and generator.device.type != device.type:
            raise ConfigError(f"the generator is on {generator.device} but sampling runs on {device}; create it with "
                              f"torch.Generator(device={str(device)!r})")
        context = self._labels(labels, n, device, guidance)
        z = torch.randn(n, self.features, generator=generator, device=device, dtype=self._dtype())
        return z, context

    @torch.no_grad()
    def sample(self, n: int, *, sampler: str | Sampler | None = None, solver: Any = None, steps: int | None = None,
               grid: Any = None, generator: torch.Generator | None = None, device: Any = None,
               return_solution: bool = False, labels: Tensor | Sequence[int] | int | None = None,
               guidance: Any = None) -> Tensor | Solution:
        """``n`` samples ``[n, features]`` (no gradients) through the exact sampler: a base draw ``z ~ N(0, I)``
        from ``generator`` pushed through the inverse transforms. ``labels`` (one class id or ``n``) for a
        class-conditional flow; ``guidance`` is an error (nothing to guide); ``steps`` / ``grid`` / ``solver``
        too (nothing to step). ``return_solution=True`` gives the :class:`~genkit.solvers.Solution` (NFE 1)."""
        return self._draw(n, self.get_sampler(sampler, solver=solver, steps=steps, grid=grid), generator, device,
                          return_solution, labels, guidance)

    def rsample(self, n: int, *, sampler: str | Sampler | None = None, solver: Any = None, steps: int | None = None,
                grid: Any = None, generator: torch.Generator | None = None, device: Any = None,
                return_solution: bool = False, labels: Tensor | Sequence[int] | int | None = None,
                guidance: Any = None) -> Tensor | Solution:
        """:meth:`sample` with gradients: ``x = T_theta^-1(z)`` is a reparameterised map of the parameters."""
        return self._draw(n, self.get_sampler(sampler, solver=solver, steps=steps, grid=grid), generator, device,
                          return_solution, labels, guidance)

    def sample_and_log_prob(self, n: int, *, generator: torch.Generator | None = None, device: Any = None,
                            labels: Tensor | Sequence[int] | int | None = None) -> tuple[Tensor, Tensor]:
        """``(x [n, features], log p(x) [n])`` from one pass through the inverses, differentiable like
        :meth:`rsample` (the same ``x`` for the same generator)."""
        z, context = self._base_draw(n, generator, device, labels, None)
        return self.from_base(z, context)

    def sample_with_log_weights(self, n: int, *, generator: torch.Generator | None = None, device: Any = None
                                ) -> tuple[Tensor, Tensor]:
        """``(x [n, features], log w [n])``: ``n`` samples and their importance weights against the flow's energy,
        ``log w = -U(x) - log q(x)`` (``mean(exp(log w))`` estimates ``Z``; :func:`genkit.metrics.log_z`), one pass
        like :meth:`sample_and_log_prob` (differentiable). A ConfigError for a flow trained without an energy."""
        if self.energy is None:
            raise ConfigError(f"this {self.family} flow was trained on data, not by an energy: importance weights need "
                              "the target energy (build the flow with energy=NAME, or weigh its samples yourself: "
                              "-U(x) - model.log_prob(x))")
        x, logq = self.sample_and_log_prob(n, generator=generator, device=device)
        return x, -self.energy.energy(x) - logq

    # --- training -------------------------------------------------------------------------------------------
    @property
    def data_free(self) -> bool:
        """True for a flow trained by an energy (its loss makes its own samples; Trainer.fit takes no data)."""
        return self.energy is not None

    def loss(self, batch: Any, generator: torch.Generator | None = None) -> tuple[Tensor, dict[str, float]]:
        """By data: ``-mean log p(x)`` over ``batch`` (``x``, or ``(x, labels)`` for a class-conditional flow;
        no randomness). By energy (``batch`` None): the reverse KL ``mean(U(x) + log q(x))`` over
        :attr:`batch_size` samples ``x ~ q`` drawn with ``generator`` (pathwise gradients)."""
        check_generator(generator, f"{self.family}.loss")
        if self.energy is not None:
            if batch is not None:
                raise ConfigError(f"this {self.family} flow trains by its energy {self.energy.name!r} (data_free): its "
                                  "loss makes its own samples; call loss(None) / Trainer.fit() without data")
            device = generator.device if generator is not None else self._device()
            x, logq = self.sample_and_log_prob(self.batch_size, generator=generator, device=device)
            return (self.energy.energy(x) + logq).mean(), {}
        labels = None
        if self.num_classes is not None:
            if not isinstance(batch, (tuple, list)) or len(batch) != 2:
                raise ShapeError(f"this {self.family} flow is class-conditional ({self.num_classes} classes) and "
                                 "trains on (x, labels) batches: pass genkit.data.LabelledData(x, labels) to "
                                 "Trainer.fit")
            batch, labels = batch
        elif isinstance(batch, (tuple, list)):
            raise ShapeError(f"{self.family}.loss expects a tensor batch [batch, {self.features}]; got a "
                             f"{type(batch).__name__} of {len(batch)} parts, but this flow is unconditional")
        x = self.check_x(batch, "batch")
        return -self.log_prob(x, labels).mean(), {}

    # --- config ---------------------------------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        classes = {} if self.num_classes is None else {"num_classes": self.num_classes,
                                                       "class_names": self.class_names}
        energy = {} if self.energy is None else {"energy": self.energy.config(), "batch_size": self.batch_size}
        return {"family": self.family, "features": self.features, "layers": self.layers, "hidden": self.hidden,
                "depth": self.depth, "mixing": self.mixing, "seed": self.seed, **self.layer_config(),
                **classes, **energy}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> FlowFamily:
        options = {k: v for k, v in config.items() if k != "family"}
        if "sample_shape" in options:  # not written by config(); accepted for symmetry with other families
            (options["features"],) = options.pop("sample_shape")
        try:
            return cls(**options)
        except TypeError as e:
            raise ConfigError(f"a {cls.family} config takes the keys of {cls.__name__}(...); got {sorted(config)} "
                              f"({e})") from None

    # --- the family registry's hooks ------------------------------------------------------------------------
    #: Variants of :meth:`example` the property suite runs: trained by data, and by an energy (data-free).
    example_variants: ClassVar[tuple[str, ...]] = ("default", "energy")

    @classmethod
    def example(cls, variant: str = "default") -> tuple[FlowFamily, Tensor | None]:
        """A tiny 2-D flow with seeded non-trivial weights and a batch (variant ``"default"``: 32 points of a
        shifted Gaussian), or the same flow trained by a Gaussian-mixture energy (``"energy"``: batch None)."""
        if variant not in cls.example_variants:
            raise ConfigError(f"{cls.family}.example variants are {cls.example_variants}; got {variant!r}")
        energy = {"name": "gaussian_mixture", "means": [[1.0, -0.5]], "sigmas": [0.7], "weights": [1.0]}
        model = cls(2, **cls._example_options(), seed=0,
                    **({"energy": energy, "batch_size": 16} if variant == "energy" else {}))
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in model.parameters():  # away from the identity the flow starts at, so every weight matters
                p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
        if variant == "energy":
            return model, None
        return model, 0.5 * torch.randn(32, 2, generator=torch.Generator().manual_seed(0)) + 1.0

    @classmethod
    def _example_options(cls) -> dict[str, Any]:
        return {"layers": 2, "hidden": 8, "depth": 1}

    cli_defaults: ClassVar[dict[str, Any]] = {}

    @classmethod
    def add_arguments(cls, group: argparse._ArgumentGroup) -> None:
        """The flags every flow family shares (train/train.py lets families share a flag of the same name)."""
        group.add_argument("--layers", type=int, help="flow layers (default: 4); --hidden / --depth set each "
                                                      "layer's conditioner MLP (default: 64 wide, 2 hidden layers)")
        group.add_argument("--mixing", help=f"between layers, one of {', '.join(MIXINGS)} (default: lu)")
        group.add_argument("--energy", metavar="NAME",
                           help="train by an energy of genkit.energies instead of data (reverse KL, data-free; "
                                "--batch-size samples a step; an objective that also learns from samples of the "
                                "target, snf --objective ml / mixed, takes them from --samples FILE): e.g. double_well")
        group.add_argument("--energy-options", metavar="JSON", help="the energy's keyword arguments, as JSON, e.g. "
                                                                    "'{\"dim\": 2, \"b\": -4}'")

    @classmethod
    def energy_from_args(cls, args: argparse.Namespace) -> dict[str, Any] | None:
        """``--energy NAME --energy-options JSON`` as an energy config (None without ``--energy``)."""
        name, options = getattr(args, "energy", None), getattr(args, "energy_options", None)
        if name is None:
            if options is not None:
                raise ConfigError("--energy-options needs --energy NAME")
            return None
        try:
            kwargs = {} if options is None else json.loads(options)
        except ValueError as e:
            raise ConfigError(f"--energy-options must be a JSON object of the energy's arguments; got {options!r} "
                              f"({e})") from None
        if not isinstance(kwargs, dict):
            raise ConfigError(f"--energy-options must be a JSON object {{...}}; got {options!r}")
        return get_energy(name, **kwargs).config()

    @classmethod
    def from_args(cls, args: argparse.Namespace, net: Any, sample_shape: Sequence[int]) -> FlowFamily:
        if len(sample_shape) != 1:
            raise ConfigError(f"--family {cls.family} models vectors; the data has samples of shape "
                              f"{tuple(sample_shape)} (flatten images first, or use --data digits64)")
        if getattr(args, "class_dropout", None):
            raise ConfigError(f"--class-dropout {args.class_dropout}: a {cls.family} flow has no null label and no "
                              "guidance; drop --class-dropout (or set it to 0)")
        options = {k: getattr(args, k) for k in ("layers", "mixing") if getattr(args, k, None) is not None}
        for flag, key in (("hidden", "hidden"), ("depth", "depth")):
            if getattr(args, flag, None) is not None:
                options[key] = getattr(args, flag)
        energy = cls.energy_from_args(args)
        if energy is not None:
            options.update(energy=energy, batch_size=args.batch_size)
        k = getattr(args, "num_classes", None)
        if k is not None:
            options.update(num_classes=k, class_names=getattr(args, "class_names", None))
        return cls(int(sample_shape[0]), seed=args.seed, **options, **cls.options_from_args(args))

    @classmethod
    def options_from_args(cls, args: argparse.Namespace) -> dict[str, Any]:
        return {}

    @classmethod
    def net_options(cls, args: argparse.Namespace, kind: str) -> dict[str, Any]:
        return {}


@FAMILIES.register("nsf")
class NeuralSplineFlow(FlowFamily):
    """Neural spline flow: ``NeuralSplineFlow(features, layers=4, bins=8, bound=3.0, hidden=64, depth=2,
    transform="masked_coupling", mixing="lu", seed=0, num_classes=None, class_names=None, energy=None,
    batch_size=256)``. Each layer is a rational-quadratic spline on ``[-bound, bound]`` (identity outside) with
    ``bins`` bins, its parameters from an MLP of ``depth`` hidden layers ``hidden`` wide:

    - ``"masked_coupling"`` (the default): a coupling layer whose conditioning half (``ceil(features / 2)``)
      also gets splines of its own, from the context alone (:class:`~genkit.models.flows.MaskedCouplingSpline`,
      the layer of ``zuko.flows.NSF(passes=2)``);
    - ``"coupling"``: the conditioning half (``features // 2``) passes unchanged
      (:class:`~genkit.models.flows.CouplingSpline`, the NSF paper's coupling layer). On small tabular data it
      trails the masked layer (wine, ``eval/bench_flows.py --seeds 24``: by 0.37 nats of test NLL);
    - ``"autoregressive"``: a MADE (:class:`~genkit.models.flows.AutoregressiveSpline`: density in one pass,
      sampling in ``features`` passes).
    """

    family = "nsf"

    def __init__(self, features: int, *, bins: int = 8, bound: float = 3.0, transform: str = "masked_coupling",
                 **options: Any):
        set_spline_options(self, features, bins, bound, transform)
        super().__init__(features, **options)

    def layer(self, i: int, context_features: int) -> Transform:
        return spline_layer(self, i, context_features)

    def layer_config(self) -> dict[str, Any]:
        return {"bins": self.bins, "bound": self.bound, "transform": self.transform}

    @classmethod
    def _example_options(cls) -> dict[str, Any]:
        return {"layers": 2, "hidden": 8, "depth": 1, "bins": 4}

    @classmethod
    def add_arguments(cls, group: argparse._ArgumentGroup) -> None:
        super().add_arguments(group)
        add_spline_arguments(group)

    @classmethod
    def options_from_args(cls, args: argparse.Namespace) -> dict[str, Any]:
        return spline_options_from_args(args)


# The spline layers' options, shared by every family built of nsf layers (nsf, and the stochastic snf).
def set_spline_options(model: FlowFamily, features: int, bins: Any, bound: Any, transform: Any) -> None:
    """Check and set ``model.bins`` / ``bound`` / ``transform`` (before :class:`FlowFamily` builds the layers)."""
    if transform not in NSF_TRANSFORMS:
        raise ConfigError(f"unknown nsf transform {transform!r}; choose one of {NSF_TRANSFORMS}")
    model.bins, model.transform = _positive_int("bins", bins), transform
    if isinstance(bound, bool) or not isinstance(bound, numbers.Real) or not (0 < bound < math.inf):
        raise ConfigError(f"bound must be a finite number > 0 (the spline's interval [-bound, bound]); got "
                          f"{bound!r}")
    model.bound = float(bound)
    if transform in ("coupling", "masked_coupling") and features == 1:
        raise ConfigError("a coupling flow needs features >= 2 (one half conditions the other); use "
                          "transform='autoregressive' for 1-D data")


def spline_layer(model: FlowFamily, i: int, context_features: int) -> Transform:
    """The ``i``-th spline layer of ``model`` (coupling, or autoregressive)."""
    if model.transform == "autoregressive":
        return AutoregressiveSpline(model.features, context_features, bins=model.bins, bound=model.bound,
                                    hidden=model.hidden, layers=model.depth)
    layer = MaskedCouplingSpline if model.transform == "masked_coupling" else CouplingSpline
    return layer(model.features, context_features, bins=model.bins, bound=model.bound, hidden=model.hidden,
                          layers=model.depth, parity=model.parity(i))


def add_spline_arguments(group: argparse._ArgumentGroup) -> None:
    """train.py's ``--bins`` / ``--bound`` / ``--transform`` (shared by the families of spline layers)."""
    group.add_argument("--bins", type=int, help="spline bins (default: 8)")
    group.add_argument("--bound", type=float, help="the splines act on [-B, B], identity outside (default: 3)")
    group.add_argument("--transform", help=f"spline layers, one of {', '.join(NSF_TRANSFORMS)} (default: "
                                           "masked_coupling)")


def spline_options_from_args(args: argparse.Namespace) -> dict[str, Any]:
    return {k: getattr(args, k) for k in ("bins", "bound", "transform") if getattr(args, k, None) is not None}


@FAMILIES.register("realnvp")
class RealNVP(FlowFamily):
    """RealNVP: ``RealNVP(features, layers=4, hidden=64, depth=2, clamp=3.0, mixing="lu", seed=0, ...)``,
    affine coupling layers ``y = x exp(s) + t`` (:class:`~genkit.models.flows.AffineCoupling`, the log-scale
    soft-clamped to ``(-clamp, clamp)``); other options as :class:`NeuralSplineFlow`."""

    family = "realnvp"

    def __init__(self, features: int, *, clamp: float = 3.0, **options: Any):
        if isinstance(clamp, bool) or not isinstance(clamp, numbers.Real) or not (0 < clamp < math.inf):
            raise ConfigError(f"clamp must be a finite number > 0 (the bound of the log-scale); got {clamp!r}")
        self.clamp = float(clamp)
        super().__init__(features, **options)

    def layer(self, i: int, context_features: int) -> Transform:
        return AffineCoupling(self.features, context_features, hidden=self.hidden, layers=self.depth,
                              parity=self.parity(i), clamp=self.clamp)

    def layer_config(self) -> dict[str, Any]:
        return {"clamp": self.clamp}

    @classmethod
    def add_arguments(cls, group: argparse._ArgumentGroup) -> None:
        super().add_arguments(group)
        group.add_argument("--clamp", type=float, help="bound of the affine log-scale (default: 3)")

    @classmethod
    def options_from_args(cls, args: argparse.Namespace) -> dict[str, Any]:
        return {} if getattr(args, "clamp", None) is None else {"clamp": args.clamp}


class FlowScoreField:
    """A flow's score ``grad_x log p(x)`` as a genkit field (``path`` linear, ``prediction`` ``"score"``): at
    ``t = 0`` only, where the path's marginal is the data density the flow models; another ``t`` is a
    ConfigError (the noised marginals are not the flow's). ``labels`` for a class-conditional flow."""

    prediction = "score"

    def __init__(self, model: FlowFamily):
        self.model, self.path = model, get_path("linear")

    def __call__(self, x: Tensor, t: Tensor | float = 0.0, labels: Any = None) -> Tensor:
        t = broadcast_time(t, x)
        if bool((t != 0).any()):
            raise ConfigError(f"a {self.model.family} flow's score field is the data score, defined at t = 0 only; got "
                              f"t = {float(t[t != 0][0]):g}. A flow models the data density, not its noised "
                              "marginals p_t: train a diffusion / flow-matching model for those")
        return self.model.score(x, labels)

    def __repr__(self) -> str:
        return f"FlowScoreField({self.model.family})"


class FlowEnergy(Energy):
    """``U(x) = -log p(x)`` of a flow (normalised: ``log_z = 0``), its ``force`` the flow's score; ``bounds``
    cover ``[-6, 6]`` per feature (the base's reach through an identity-initialised flow; pass a quadrature
    its own bounds for a flow that moved its mass further)."""

    domain = "real"
    log_z = 0.0

    def __init__(self, model: FlowFamily):
        self.model, self.name, self.dim = model, f"{model.family} flow", model.features
        self.bounds = ((-6.0, 6.0),) * model.features

    def _energy(self, x: Tensor) -> Tensor:
        return -self.model.log_prob(x)

    def config(self) -> dict[str, Any]:
        raise ConfigError("a flow's energy is saved with the flow: genkit.save(folder, model), then "
                          "genkit.load(folder).as_energy()")
