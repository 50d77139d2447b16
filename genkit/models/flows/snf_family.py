"""A stochastic normalizing flow as a genkit model family: ``snf`` (:class:`StochasticNSF`; Wu, Köhler, Noé 2020,
arXiv 2002.06707; METHODS.md section 12), registered in :data:`genkit.models.FAMILIES` beside ``nsf``.

The model is the layers of an ``nsf`` flow in sampling order (prior -> target) with a stochastic block after each
flow layer: Metropolis (``blocks="metropolis"``) or overdamped Langevin (``"langevin"``) steps on the interpolated
energy ``u_lambda = (1 - lambda) |x|^2 / 2 + lambda U(x)`` with ``lambda = (i + 1) / layers`` after the ``i``-th
flow layer, the last at ``lambda = 1`` (the target). It is built once as a
:class:`~genkit.models.flows.StochasticFlow`, the only submodule holding the transforms.

Its samples have no closed-form density (their marginal integrates over the blocks' noise), so ``log_prob`` /
``score`` are ConfigErrors; what it has is the exact path weight of each sample,
``log w = -U(x) - log p_Z(z) + sum Delta S`` (:meth:`StochasticNSF.sample_with_log_weights`), whose mean of
``exp`` estimates the target's ``Z``. It samples through the ``path`` sampler (:class:`genkit.sampling.PathSampler`:
one pass with the blocks' noise from the generator; the same generator gives the same samples).

It trains through :class:`genkit.train.Trainer` by one of three objectives:

- ``"kl"`` (data-free): the reverse KL ``-mean log w`` over ``batch_size`` of its own paths;
- ``"ml"`` (on samples of the target, in the energy's coordinates): ``mean(u_Z(z) - sum Delta S)`` through the
  reverse pass (:meth:`~genkit.models.flows.StochasticFlow.reverse`);
- ``"mixed"``: ``w_ml * ML(batch) + (1 - w_ml) * KL``.

Held-out samples of the target are scored by :meth:`StochasticNSF.nll_bound`, the ML loss per sample: an upper
bound of ``-log q(x)`` in nats (Jensen over the backward path measure), what train/train.py and
eval/evaluate.py report as the held-out NLL of an snf trained with ``--samples``.

>>> import torch
>>> model = StochasticNSF(2, energy="double_well", layers=2, bins=4, hidden=8)
>>> x, log_w = model.sample_with_log_weights(3, generator=torch.Generator().manual_seed(0))
>>> x.shape, log_w.shape
(torch.Size([3, 2]), torch.Size([3]))
"""

from __future__ import annotations

import argparse
import math
import numbers
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ...checks import check_generator
from ...errors import ConfigError
from ...sampling import PathSampler, Sampler
from ..registry import FAMILIES
from .family import (
    FlowFamily,
    _positive_int,
    add_spline_arguments,
    set_spline_options,
    spline_layer,
    spline_options_from_args,
)
from .snf import LangevinBlock, MetropolisBlock, StochasticFlow
from .transforms import LULinear, Permutation, Transform

__all__ = ["StochasticNSF", "SNF_BLOCKS", "SNF_OBJECTIVES"]

#: The stochastic blocks after each flow layer.
SNF_BLOCKS = ("metropolis", "langevin")
#: The training objectives: reverse KL (data-free), maximum likelihood on samples, their mix.
SNF_OBJECTIVES = ("kl", "ml", "mixed")
_STEP_SIZE = {"metropolis": 0.1, "langevin": 0.01}

_NO_DENSITY = ("an snf has no exact density: its samples' marginal q(x) integrates over the stochastic blocks' "
               "noise, which has no closed form. Use sample_with_log_weights(n) (x and log w = -U(x) - log p_Z(z) "
               "+ sum Delta S, exact per path) or the energy itself (model.energy)")


@FAMILIES.register("snf")
class StochasticNSF(FlowFamily):
    """Stochastic normalizing flow: ``StochasticNSF(features, *, energy, blocks="metropolis", block_steps=1,
    step_size=None, objective="kl", w_ml=0.5, layers=4, bins=8, bound=3.0, hidden=64, depth=2,
    transform="masked_coupling", mixing="lu", seed=0, batch_size=256)``.

    ``energy`` (required: a :data:`genkit.energies.ENERGIES` name, its config ``{"name": ..., **kwargs}`` or an
    Energy; recorded in the config) is the target the blocks interpolate to. ``blocks`` picks the stochastic
    block after each of the ``layers`` spline layers, each running ``block_steps`` steps of ``step_size``
    (default 0.1 for Metropolis proposals, 0.01 for Langevin). ``objective`` ``"kl"`` trains data-free;
    ``"ml"`` / ``"mixed"`` (weight ``w_ml`` on ML) train on samples of the target (:meth:`nll_bound` scores
    held-out ones). Other options as
    :class:`~genkit.models.flows.NeuralSplineFlow` (no classes: the energy is one target).
    """

    family = "snf"
    #: no ``log_prob``: evaluate.py reports importance weights (ESS, log Z, reverse KL), no NLL.
    exact_likelihood: ClassVar[bool] = False
    #: why a report holds no likelihood (evaluate.py writes it beside ``"nll": null``).
    no_likelihood: ClassVar[str] = ("none: an snf has no exact density (its samples' marginal integrates over the "
                                    "stochastic blocks' noise); it is scored by its exact path weights")

    def __init__(self, features: int, *, energy: Any = None, blocks: str = "metropolis", block_steps: int = 1,
                 step_size: float | None = None, objective: str = "kl", w_ml: float | None = None,
                 bins: int = 8, bound: float = 3.0, transform: str = "masked_coupling",
                 **options: Any):
        if energy is None:
            raise ConfigError("an snf needs energy=: its stochastic blocks run on the interpolated energy to the "
                              "target; pass a genkit.energies name (energy='double_well'), its config "
                              "{'name': ..., **kwargs} or an Energy")
        if "num_classes" in options or "class_names" in options:
            raise ConfigError("an snf has no classes (its energy is one target); drop num_classes / class_names")
        if blocks not in SNF_BLOCKS:
            raise ConfigError(f"unknown snf blocks {blocks!r}; choose one of {SNF_BLOCKS}")
        if objective not in SNF_OBJECTIVES:
            raise ConfigError(f"unknown snf objective {objective!r}; choose one of {SNF_OBJECTIVES} (kl: reverse KL, "
                              "data-free; ml: maximum likelihood on samples; mixed: both)")
        self.blocks, self.objective = blocks, objective
        self.block_steps = _positive_int("block_steps", block_steps)
        if step_size is None:
            step_size = _STEP_SIZE[blocks]
        if isinstance(step_size, bool) or not isinstance(step_size, numbers.Real) or not (
                0 < step_size < math.inf):
            raise ConfigError(f"step_size must be a finite number > 0 (the blocks' step; typical 1e-3 .. 0.1); got "
                              f"{step_size!r}")
        self.step_size = float(step_size)
        if w_ml is not None and objective != "mixed":
            raise ConfigError(f"w_ml={w_ml!r} weighs ML against KL in objective='mixed' only; this snf trains by "
                              f"{objective!r}: drop w_ml or set objective='mixed'")
        w_ml = 0.5 if w_ml is None else w_ml
        if isinstance(w_ml, bool) or not isinstance(w_ml, numbers.Real) or not (0 < w_ml < 1):
            raise ConfigError(f"w_ml must be a number in (0, 1) (0.5: the SNF paper's mix; 0 or 1 is objective kl "
                              f"or ml); got {w_ml!r}")
        self.w_ml = float(w_ml)
        set_spline_options(self, features, bins, bound, transform)
        super().__init__(features, energy=energy, **options)

    # --- construction ---------------------------------------------------------------------------------------
    layer = spline_layer

    def _assemble(self, transforms: list[Transform], context_features: int) -> None:
        """The spline layers (with the mixing layer before each but the first, data -> base order) run backwards
        in sampling order, a stochastic block after each spline layer at ``lambda = (k + 1) / layers``."""
        groups: list[list[Transform]] = []  # data -> base: [layer 0], [mixing 1, layer 1], ...
        pending: list[Transform] = []
        for t in transforms:
            pending.append(t)
            if _is_spline(t):
                groups.append(pending)
                pending = []
        block = MetropolisBlock if self.blocks == "metropolis" else LangevinBlock
        layers: list[nn.Module] = []
        for k, group in enumerate(reversed(groups)):  # sampling order: the last data-order group first
            layers += list(reversed(group))  # its spline layer, then its mixing layer
            layers.append(block(self.energy, (k + 1) / self.layers, step_size=self.step_size,
                                n_steps=self.block_steps))
        self.snf = StochasticFlow(layers, self.features)

    def _core(self) -> nn.Module:
        return self.snf

    def layer_config(self) -> dict[str, Any]:
        mixed = {"w_ml": self.w_ml} if self.objective == "mixed" else {}
        return {"bins": self.bins, "bound": self.bound, "transform": self.transform, "blocks": self.blocks,
                "block_steps": self.block_steps, "step_size": self.step_size, "objective": self.objective, **mixed}

    # --- no density -----------------------------------------------------------------------------------------
    def log_prob(self, x: Tensor, labels: Any = None, **options: Any) -> Tensor:
        """Not available: a ConfigError saying why (:data:`_NO_DENSITY`)."""
        raise ConfigError(f"log_prob: {_NO_DENSITY}")

    def score(self, x: Tensor, labels: Any = None) -> Tensor:
        raise ConfigError(f"score: {_NO_DENSITY}")

    def score_field(self) -> Any:
        raise ConfigError(f"score_field: {_NO_DENSITY}")

    def as_energy(self) -> Any:
        raise ConfigError(f"as_energy: {_NO_DENSITY}")

    def from_base(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        raise ConfigError(f"from_base (the exact sampler's pass): {_NO_DENSITY}; it samples with the path sampler")

    def sample_and_log_prob(self, n: int, **options: Any) -> tuple[Tensor, Tensor]:
        raise ConfigError(f"sample_and_log_prob: {_NO_DENSITY}")

    # --- the stochastic path --------------------------------------------------------------------------------
    def sample_path(self, z: Tensor, *, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """``(x, sum Delta S)`` for base draws ``z [n, features]``: one pass through the layers in sampling order
        (:meth:`StochasticFlow.run_path`), flow layers by their inverse, blocks with their noise from ``generator``."""
        return self.snf.run_path(z, generator)

    def path_evaluations(self) -> int:
        """Target-energy evaluations of one path (the ``path`` sampler's NFE): a Metropolis block evaluates the
        energy at its start and at each proposal (``block_steps + 1``), a Langevin block the force before and
        after each step (``2 block_steps``)."""
        per_block = self.block_steps + 1 if self.blocks == "metropolis" else 2 * self.block_steps
        return self.layers * per_block

    def sample_with_log_weights(self, n: int, *, generator: torch.Generator | None = None, device: Any = None
                                ) -> tuple[Tensor, Tensor]:
        """``(x [n, features], log w [n])`` with ``log w = -U(x) + u_Z(z) + sum Delta S`` (``u_Z = -log N(z; 0,
        I)``), exact per path: ``mean(exp(log w))`` estimates the target's ``Z``. Differentiable like
        :meth:`rsample` (the same ``x`` for the same generator)."""
        z, _ = self._base_draw(n, generator, device, None, None)
        return self.snf.path_log_weights(z, self.energy, generator)

    def samplers(self) -> tuple[str, ...]:
        return ("path",)

    def default_sampler(self) -> Sampler:
        return PathSampler()

    # --- training -------------------------------------------------------------------------------------------
    @property
    def data_free(self) -> bool:
        """True for ``objective="kl"`` (its loss makes its own paths; Trainer.fit takes no data)."""
        return self.objective == "kl"

    def _kl(self, generator: torch.Generator | None) -> Tensor:
        device = generator.device if generator is not None else self._device()
        _, log_w = self.sample_with_log_weights(self.batch_size, generator=generator, device=device)
        return -log_w.mean()

    def _ml(self, batch: Any, generator: torch.Generator | None) -> Tensor:
        if isinstance(batch, (tuple, list)):
            raise ConfigError(f"snf.loss expects a tensor batch [batch, {self.features}] of samples of the target; "
                              f"got a {type(batch).__name__} of {len(batch)} parts (an snf has no labels)")
        return self._path_nll(self.check_x(batch, "batch"), generator).mean()

    def _path_nll(self, x: Tensor, generator: torch.Generator | None) -> Tensor:
        z, ds = self.snf.reverse(x, generator=generator)
        return self.snf.prior_energy(z) - ds

    def nll_bound(self, x: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        """``[n]`` nats: ``u_Z(z) - sum Delta S`` along one reverse path of each ``x [n, features]`` (its blocks'
        noise from ``generator``), the ML loss per sample. Its expectation over the path is an upper bound of
        ``-log q(x)`` (``q(x) = E_backward[p_Z(z) exp(sum Delta S)]``, then Jensen), so its mean over held-out
        samples of the target bounds the model's cross-entropy, itself ``>=`` the target's entropy."""
        check_generator(generator, f"{self.family}.nll_bound")
        return self._path_nll(self.check_x(x), generator)

    def loss(self, batch: Any, generator: torch.Generator | None = None) -> tuple[Tensor, dict[str, float]]:
        """``"kl"`` (``batch`` None): ``-mean log w`` over :attr:`batch_size` paths drawn with ``generator``;
        ``"ml"``: ``mean(u_Z(z) - sum Delta S)`` of the reverse pass of ``batch`` (samples of the target);
        ``"mixed"``: ``w_ml * ML(batch) + (1 - w_ml) * KL`` (ML's block noise drawn first)."""
        check_generator(generator, f"{self.family}.loss")
        if self.objective == "kl":
            if batch is not None:
                raise ConfigError(f"this snf trains by the reverse KL to its energy {self.energy.name!r} (data_free): "
                                  "its loss makes its own paths; call loss(None) / Trainer.fit() without data (or "
                                  "build it with objective='ml' / 'mixed' to train on samples)")
            kl = self._kl(generator)
            return kl, {"kl": float(kl.detach())}
        ml = self._ml(batch, generator)
        if self.objective == "ml":
            return ml, {"ml": float(ml.detach())}
        kl = self._kl(generator)
        return self.w_ml * ml + (1 - self.w_ml) * kl, {"ml": float(ml.detach()), "kl": float(kl.detach())}

    # --- the family registry's hooks ------------------------------------------------------------------------
    #: Metropolis blocks trained by KL (data-free), Langevin blocks by KL, and Metropolis blocks by the mixed
    #: objective on samples.
    example_variants: ClassVar[tuple[str, ...]] = ("default", "langevin", "mixed")

    @classmethod
    def example(cls, variant: str = "default") -> tuple[StochasticNSF, Tensor | None]:
        """A tiny 2-D snf on a Gaussian energy with seeded non-trivial weights: Metropolis blocks by KL
        (``"default"``, batch None), Langevin blocks by KL (``"langevin"``), or Metropolis blocks by the mixed
        objective with a batch of 32 samples of the target (``"mixed"``)."""
        if variant not in cls.example_variants:
            raise ConfigError(f"{cls.family}.example variants are {cls.example_variants}; got {variant!r}")
        energy = {"name": "gaussian_mixture", "means": [[1.0, -0.5]], "sigmas": [0.7], "weights": [1.0]}
        options = {"blocks": "langevin", "step_size": 0.05} if variant == "langevin" else {"step_size": 0.3}
        if variant == "mixed":
            options["objective"] = "mixed"
        model = cls(2, energy=energy, layers=2, hidden=8, depth=1, bins=4, block_steps=2, batch_size=16, seed=0,
                    **options)
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in model.parameters():  # away from the identity the flow starts at, so every weight matters
                p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
        if variant != "mixed":
            return model, None
        return model, 0.7 * torch.randn(32, 2, generator=torch.Generator().manual_seed(0)) + torch.tensor([1.0, -0.5])

    @classmethod
    def add_arguments(cls, group: argparse._ArgumentGroup) -> None:
        super().add_arguments(group)
        add_spline_arguments(group)
        group.add_argument("--blocks", help=f"stochastic block after each flow layer, one of {', '.join(SNF_BLOCKS)} "
                                            "(default: metropolis)")
        group.add_argument("--block-steps", type=int, help="Metropolis / Langevin steps per block (default: 1)")
        group.add_argument("--step-size", type=float, help="the blocks' step: Metropolis proposal scale (default: "
                                                           "0.1) or Langevin time step (default: 0.01)")
        group.add_argument("--objective", help="kl (reverse KL, data-free: the default); ml (maximum likelihood) or "
                                               "mixed (--w-ml ML + the rest KL) train on --samples FILE, samples of "
                                               "the target in the energy's own coordinates")
        group.add_argument("--w-ml", type=float, help="with --objective mixed: the weight of ML against KL, in (0, 1) "
                                                      "(default: 0.5, the SNF paper's mix)")

    @classmethod
    def options_from_args(cls, args: argparse.Namespace) -> dict[str, Any]:
        if getattr(args, "energy", None) is None:
            raise ConfigError("--family snf needs --energy NAME: its stochastic blocks run on the interpolated energy "
                              "to that target (e.g. --energy double_well)")
        objective = getattr(args, "objective", None)
        if objective is not None and objective not in SNF_OBJECTIVES:
            raise ConfigError(f"unknown --objective {objective!r}; choose one of {', '.join(SNF_OBJECTIVES)} (kl: "
                              "reverse KL, data-free; ml / mixed: on --samples FILE)")
        if getattr(args, "w_ml", None) is not None and objective != "mixed":
            raise ConfigError(f"--w-ml {args.w_ml} weighs ML against KL under --objective mixed only; add "
                              "--objective mixed or drop --w-ml")
        options = spline_options_from_args(args)
        for key in ("blocks", "block_steps", "step_size", "objective", "w_ml"):
            if getattr(args, key, None) is not None:
                options[key] = getattr(args, key)
        return options


def _is_spline(t: Transform) -> bool:
    """A flow layer proper (a spline), not a mixing layer between two of them."""
    return not isinstance(t, (LULinear, Permutation))
