"""Circular rational-quadratic spline on [-pi, pi).

``rq_spline`` with ``bound = pi`` maps ``-pi -> -pi`` and ``pi -> pi`` with derivative exactly 1 at both
ends, so read on the circle it is a periodic diffeomorphism whose value and derivative agree at the seam.
No tails: inputs must lie in ``[-pi, pi)``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from genkit.errors import DataError
from genkit.models.flows.splines import rq_spline


def check_angles(x: Tensor) -> None:
    if not bool(((x >= -math.pi) & (x < math.pi)).all()):
        bad = x[~((x >= -math.pi) & (x < math.pi))].flatten()[0].item()
        raise DataError(f"circular flows take angles in [-pi, pi); got {bad}; wrap the data first, "
                        "e.g. x = torch.remainder(x + pi, 2 * pi) - pi")


def circular_rq_spline(x: Tensor, widths: Tensor, heights: Tensor, derivatives: Tensor, *,
                       inverse: bool = False) -> tuple[Tensor, Tensor]:
    """Periodic RQ spline on [-pi, pi); returns ``(y, log|dy/dx|)`` as ``rq_spline`` does."""
    check_angles(x)
    return rq_spline(x, widths, heights, derivatives, bound=math.pi, inverse=inverse)
