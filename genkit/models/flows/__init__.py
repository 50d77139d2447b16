"""Normalizing flows: rational-quadratic splines, invertible transforms (registered in FLOW_TRANSFORMS),
:class:`Flow`, a distribution built from them, and the model families ``nsf`` (:class:`NeuralSplineFlow`) and
``realnvp`` (:class:`RealNVP`) that train, save, sample and evaluate through genkit's common scripts."""

from __future__ import annotations

from .family import FlowEnergy, FlowFamily, FlowScoreField, NeuralSplineFlow, RealNVP
from .flow import Flow
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
from .splines import rq_spline, spline_knots
from .transforms import (
    FLOW_TRANSFORMS,
    AffineCoupling,
    AutoregressiveSpline,
    CouplingSpline,
    LULinear,
    Permutation,
    Transform,
)

__all__ = ["Flow", "FlowFamily", "NeuralSplineFlow", "RealNVP", "FlowScoreField", "FlowEnergy",
           "rq_spline", "spline_knots", "FLOW_TRANSFORMS", "Transform", "CouplingSpline",
           "AutoregressiveSpline",
           "AffineCoupling", "LULinear", "Permutation",
           "InterpolatedEnergy", "LangevinBlock", "MetropolisBlock", "StochasticFlow", "EnergyObjective",
           "MLObjective", "MixedObjective", "flow_log_weights"]
