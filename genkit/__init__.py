"""genkit: generative models behind one velocity/score interface.

Conventions: t in [0, 1], t = 0 is data, t = 1 is noise; tensors are batch-first; every random draw
takes ``generator=``. See README.md for the two commands that start everything.
"""

from . import errors
from .analytic import ClassConditionalMixture, Gaussian, GaussianMixture
from .checkpoint import save
from .errors import GenkitError
from .fields import FunctionField, as_eps, as_score, as_velocity, as_x0
from .frozen import Frozen
from .gaussian_fit import GaussianFit, GaussianFlowMap, fit_gaussian
from .guidance import Guidance, GuidedField, guide
from .interop import DiffusersScheduler, KDiffusionSampler, from_diffusers, to_diffusers
from .loading import load
from .models import (
    SMD,
    SMT,
    Diffusion,
    FlowMatching,
    GFlowNet,
    MaskedDiffusion,
    MeanFlow,
    NeuralSplineFlow,
    RealNVP,
    Secant,
    StochasticNSF,
)
from .objective import ParamGroup
from .paths import get_path
from .sampling import (
    SAMPLERS,
    ExactSampler,
    JumpSampler,
    MaskedAncestralSampler,
    ODESampler,
    PathSampler,
    PolicySampler,
    RestartSampler,
    Sampler,
    get_sampler,
)
from .solvers import ODEFlowMap, get_grid, get_solver, ode_log_prob, solve
from .solvers.teleport import steps_saved, teleport, teleport_solve

__version__ = "0.1.0"

__all__ = [
    "errors", "GenkitError",
    "get_path", "FunctionField", "as_velocity", "as_score", "as_x0", "as_eps",
    "Gaussian", "GaussianMixture", "ClassConditionalMixture", "Guidance", "GuidedField", "guide",
    "Diffusion", "FlowMatching", "MeanFlow", "Secant", "NeuralSplineFlow", "RealNVP", "StochasticNSF", "SMT", "SMD",
    "MaskedDiffusion", "GFlowNet",
    "Sampler", "ODESampler", "JumpSampler", "ExactSampler", "PathSampler", "RestartSampler", "MaskedAncestralSampler",
    "PolicySampler",
    "SAMPLERS",
    "get_sampler",
    "solve", "get_solver", "get_grid", "ode_log_prob", "ODEFlowMap",
    "load", "save", "Frozen", "ParamGroup",
    "from_diffusers", "to_diffusers", "DiffusersScheduler", "KDiffusionSampler",
    "GaussianFit", "GaussianFlowMap", "fit_gaussian", "teleport", "teleport_solve", "steps_saved",
]
