"""Normalizing flows: rational-quadratic splines, invertible transforms (registered in FLOW_TRANSFORMS) and
:class:`Flow`, a distribution built from them."""

from __future__ import annotations

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

__all__ = ["Flow", "rq_spline", "spline_knots", "FLOW_TRANSFORMS", "Transform", "CouplingSpline",
           "AutoregressiveSpline",
           "AffineCoupling", "LULinear", "Permutation",
           "InterpolatedEnergy", "LangevinBlock", "MetropolisBlock", "StochasticFlow", "EnergyObjective",
           "MLObjective", "MixedObjective", "flow_log_weights"]
