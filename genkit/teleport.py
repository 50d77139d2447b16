"""Deprecated home of teleportation (kept one release): the Gaussian fit and its flow map moved to
:mod:`genkit.gaussian_fit`, teleport sampling to :mod:`genkit.solvers.teleport`; all are also in ``genkit``.

Importing this module binds it to the name ``genkit.teleport``, where ``genkit`` keeps the function
:func:`genkit.solvers.teleport.teleport`; so the module itself calls as that function.
"""

from __future__ import annotations

import sys
import types
import warnings

from .gaussian_fit import GaussianFit, GaussianFlowMap, fit_gaussian
from .solvers.teleport import StepsSaved, steps_saved, teleport, teleport_solve

__all__ = ["GaussianFit", "fit_gaussian", "GaussianFlowMap", "teleport", "teleport_solve", "StepsSaved",
           "steps_saved"]

warnings.warn("genkit.teleport is deprecated: import GaussianFit / fit_gaussian / GaussianFlowMap from "
              "genkit.gaussian_fit and teleport / teleport_solve / steps_saved from genkit.solvers.teleport "
              "(or all of them from genkit)", DeprecationWarning, stacklevel=2)


class _CallableModule(types.ModuleType):
    def __call__(self, *args, **kwargs):
        return teleport(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
