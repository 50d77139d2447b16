"""ODE and SDE solvers, time grids, likelihoods and flow maps over the common Field interface."""

from .adaptive import Adaptive, Bosh3, Dopri5
from .base import SOLVERS, Solution, Solver, get_solver, solve
from .exponential import DDIM, DEIS, DPMSolverPP2M, DPMSolverPP3M, ExponentialSolver, UniPC
from .fixed import RK4, Euler, Heun, Midpoint, RungeKutta, Tableau
from .flowmap import ODEFlowMap
from .grids import (
                    GRIDS,
                    Custom,
                    Karras,
                    Leading,
                    Linspace,
                    LogSNR,
                    TimeGrid,
                    Trailing,
                    Uniform,
                    diffusers_timesteps,
                    get_grid,
                    validate_grid,
)
from .likelihood import divergence, ode_log_prob
from .sde import EulerMaruyama, brownian_tree
from .sde_torchsde import TorchSDE
from .searched import SearchedSolver, load_searched_solver, register_searched, search_solver, unregister_searched
from .state import SolverState, Transition
from .stochastic import Ancestral, EDMStochastic

__all__ = [
    "SOLVERS", "GRIDS", "Solution", "Solver", "SolverState", "Transition", "get_solver", "solve",
    "RungeKutta", "Tableau", "Euler", "Midpoint", "Heun", "RK4",
    "Adaptive", "Dopri5", "Bosh3", "EulerMaruyama", "TorchSDE", "brownian_tree", "Ancestral", "EDMStochastic",
    "ExponentialSolver", "DDIM", "DPMSolverPP2M", "DPMSolverPP3M", "UniPC", "DEIS",
    "TimeGrid", "Uniform", "Karras", "LogSNR", "Custom", "Leading", "Trailing", "Linspace", "diffusers_timesteps",
    "get_grid", "validate_grid",
    "divergence", "ode_log_prob", "ODEFlowMap",
    "SearchedSolver", "search_solver", "load_searched_solver", "register_searched", "unregister_searched",
]
