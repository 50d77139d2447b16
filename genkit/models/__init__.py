"""Model families. Each is an ``nn.Module`` registered in :data:`FAMILIES` with

- ``loss(batch, generator=None) -> (loss, logs)``, ``config() -> dict`` (JSON, with a ``"family"`` key) and
  ``from_config(config)``;
- sampling: ``sample(n, *, sampler=None, generator=None, device=None, return_solution=False, **cond)`` (and
  ``rsample`` with gradients), ``samplers()`` (supported :data:`genkit.sampling.SAMPLERS` names, default
  first) and ``default_sampler()``;
- ``example() -> (model, batch)``: a tiny seeded instance, run by the registry-generated property suite;
- train/train.py hooks: ``cli_defaults``, ``add_arguments(group)``, ``from_args(args, net, sample_shape)`` and
  ``net_options(args, kind)`` (see :class:`ContinuousModel`); optional: ``needs_net = False`` (the family builds
  its own networks: ``from_args`` gets ``net=None``), ``default_class_dropout`` (``--class-dropout``'s default
  under ``--conditional``), and flags shared by several families (declared alike in each ``add_arguments``);
  ``prepare_data(args, data)`` (a classmethod train.py calls on the training data before the model is built: it
  refuses data the family cannot learn and reads what ``from_args`` needs from it, e.g. mdlm's vocabulary; a
  family without it is refused token data);
- optional script report: ``sample_report(samples, reference, floor, *, data=, nll_n=, generator=) -> dict``
  (train.py's metrics.json and evaluate.py use it instead of their vector / image distances: mdlm's token
  statistics with their noise floor, and its held-out ``nll`` ELBO);
- optional: ``data_free`` (True when ``loss(None)`` makes its own samples, e.g. a flow trained by an energy),
  ``example_variants`` (names ``example(variant)`` takes; the property suite runs each), and
  ``exact_likelihood`` (``log_prob(x, labels=None)`` is exact, with no ODE options), and ``discrete`` (samples
  are tokens: ``rsample`` is a ConfigError, and two seeds may draw the same token at a position).

The normalizing-flow families ``nsf`` and ``realnvp`` (:mod:`genkit.models.flows.family`) are distributions with
an exact ``log_prob``, sampled by the ``exact`` sampler; the stochastic normalizing flow ``snf``
(:mod:`genkit.models.flows.snf_family`) has exact path weights instead of a density (``exact_likelihood = False``),
sampled by the ``path`` sampler. Flows trained by an energy share ``sample_with_log_weights(n, generator=)``.

The one-step families ``smt`` and ``smd`` (:mod:`genkit.models.smt`: Score-of-Mixture Training from data, and
:mod:`genkit.models.smd`: Distillation from a frozen teacher) train two optimizers in turn (``optimizers()``,
``update(step)``, ``loss(batch, generator=, update=name)``) and sample in one network evaluation (``jumps``) or
several (``restart``).

The GFlowNet family ``gflownet`` (:mod:`genkit.models.gflownet`) is an environment and a policy; it trains
data-free (its loss rolls out its own trajectories) by FM, DB, TB or SubTB, samples terminal objects (integer states,
``discrete = True``) with the ``policy`` sampler, and on enumerable environments reports its exact terminal
distribution against the target (``target_report``).

Masked discrete diffusion ``mdlm`` (:mod:`genkit.models.masked`) samples token sequences (``discrete = True``:
``rsample`` refuses, as tokens have no pathwise derivative) with the ``masked_ancestral`` sampler. train.py trains it
on token data (``--data motifs``, :mod:`genkit.data.sequences`) with ``--net token_mlp | sequence_transformer |
conv_dna``, or on the user's own file (``--tokens FILE``: text, FASTA or ``.npy``); ``masked_diffusion`` is an
alias of ``mdlm`` (``FAMILIES.get("masked_diffusion")`` is the same class; checkpoints record ``mdlm``). Its
``sample_report`` scores samples by per-position token-frequency total variation and the data
set's own statistics, and held-out data by the negative ELBO in nats.
"""

from __future__ import annotations

from .continuous import ContinuousModel
from .diffusion import Diffusion
from .flow_matching import FlowMatching, ot_pairing
from .flows import FlowFamily, NeuralSplineFlow, RealNVP, StochasticNSF
from .gflownet import GFlowNet
from .masked import MaskedDiffusion
from .meanflow import MeanFlow
from .registry import FAMILIES, build
from .secant import Secant
from .smd import SMD
from .smt import SMT

FAMILIES.alias("masked_diffusion", "mdlm")  # the name issue 12 and the MDLM paper's readers use

__all__ = ["FAMILIES", "build", "ContinuousModel", "Diffusion", "FlowMatching", "MeanFlow", "Secant", "SMT", "SMD",
           "MaskedDiffusion",
           "ot_pairing",
           "FlowFamily", "NeuralSplineFlow", "RealNVP", "StochasticNSF", "GFlowNet"]
