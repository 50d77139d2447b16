"""genkit: generative models behind one velocity/score interface.

Conventions: t in [0, 1], t = 0 is data, t = 1 is noise; tensors are batch-first; every random draw
takes ``generator=``. See README.md for the two commands that start everything.
"""

from . import errors
from .analytic import Gaussian, GaussianMixture
from .checkpoint import load, save
from .errors import GenkitError
from .fields import FunctionField, as_eps, as_score, as_velocity, as_x0
from .interop import DiffusersScheduler, KDiffusionSampler, from_diffusers, to_diffusers
from .models import Diffusion, FlowMatching
from .paths import get_path
from .solvers import ODEFlowMap, get_grid, get_solver, ode_log_prob, solve
from .teleport import GaussianFit, fit_gaussian, steps_saved, teleport, teleport_solve

__version__ = "0.1.0"

__all__ = [
    "errors", "GenkitError",
    "get_path", "FunctionField", "as_velocity", "as_score", "as_x0", "as_eps",
    "Gaussian", "GaussianMixture",
    "Diffusion", "FlowMatching",
    "solve", "get_solver", "get_grid", "ode_log_prob", "ODEFlowMap",
    "load", "save",
    "from_diffusers", "to_diffusers", "DiffusersScheduler", "KDiffusionSampler",
    "GaussianFit", "fit_gaussian", "teleport", "teleport_solve", "steps_saved",
]
