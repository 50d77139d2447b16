"""Normalizing flows: rational-quadratic splines and invertible transforms (registered in FLOW_TRANSFORMS)."""

from __future__ import annotations

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

__all__ = ["rq_spline", "spline_knots", "FLOW_TRANSFORMS", "Transform", "CouplingSpline", "AutoregressiveSpline",
           "AffineCoupling", "LULinear", "Permutation"]
