"""Normalizing flows: rational-quadratic splines, invertible transforms (registered in FLOW_TRANSFORMS),
:class:`Flow`, a distribution built from them, and the model families ``nsf`` (:class:`NeuralSplineFlow`),
``realnvp`` (:class:`RealNVP`) and the stochastic normalizing flow ``snf`` (:class:`StochasticNSF`) that train,
save, sample and evaluate through genkit's common scripts; circular and smooth transforms on tori and intervals
with :class:`CompactFlow` (a uniform base), a bracketed root finder with implicit gradients, force matching, and
stochastic normalizing flows (:class:`StochasticFlow`)."""

from __future__ import annotations

from .circular import CircularCoupling, circular_rq_spline, wrap
from .compact import CompactFlow
from .family import FlowEnergy, FlowFamily, FlowScoreField, NeuralSplineFlow, RealNVP
from .flow import Flow
from .forces import ForceMatchingObjective, flow_force, force_matching_loss
from .roots import bracketed_inverse
from .roots import inverse as root_inverse
from .smooth import CircularSmoothCoupling, SmoothCoupling, bump_sigmoid, smooth_unit_inverse, smooth_unit_map
from .snf import (
    EnergyObjective,
    InterpolatedEnergy,
    LangevinBlock,
    MetropolisBlock,
    MixedObjective,
    MLObjective,
    StochasticFlow,
    flow_log_weights,
)
from .snf_family import StochasticNSF
from .splines import rq_spline, spline_knots
from .transforms import (
    FLOW_TRANSFORMS,
    AffineCoupling,
    AutoregressiveSpline,
    CouplingSpline,
    LULinear,
    MaskedCouplingSpline,
    Permutation,
    Transform,
    half_swap_permutation,
)

__all__ = ["Flow", "FlowFamily", "NeuralSplineFlow", "RealNVP", "StochasticNSF", "FlowScoreField", "FlowEnergy",
           "rq_spline", "spline_knots", "FLOW_TRANSFORMS", "Transform", "CouplingSpline", "MaskedCouplingSpline",
           "AutoregressiveSpline",
           "AffineCoupling", "LULinear", "Permutation", "half_swap_permutation",
           "InterpolatedEnergy", "LangevinBlock", "MetropolisBlock", "StochasticFlow", "EnergyObjective",
           "MLObjective", "MixedObjective", "flow_log_weights",
           "circular_rq_spline", "wrap", "CircularCoupling", "CompactFlow", "SmoothCoupling", "CircularSmoothCoupling",
           "bump_sigmoid", "smooth_unit_map", "smooth_unit_inverse", "bracketed_inverse", "root_inverse",
           "flow_force", "force_matching_loss", "ForceMatchingObjective"]
