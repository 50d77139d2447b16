"""Reverse-SDE solvers: target distributions, strong convergence on one Brownian path, sign conventions
against Euler-Maruyama, NFE accounting, and bad input."""

import numpy as np
import pytest
import torch

from genkit.analytic import Gaussian
from genkit.errors import ConfigError, SolverError
from genkit.fields import FunctionField
from genkit.paths import get_path
from genkit.solvers.base import SOLVERS, get_solver, solve
from genkit.solvers.grids import LogSNR, Uniform
from genkit.solvers.sde import EulerMaruyama, reverse_drift
from genkit.solvers.sde_torchsde import TorchSDE

MEAN, COV = torch.tensor([1.0, -2.0]), torch.tensor([[0.6, 0.2], [0.2, 0.3]])


def _gen(seed=1):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("solver,path,prediction,grid", [
    ("sde_srk", "ddpm", "eps", LogSNR(t_max=0.99)),
    ("sde_heun", "linear", "velocity", Uniform(t_max=0.99)),
    (TorchSDE("srk", adaptive=True, rtol=0.05, atol=0.05), "cosine", "x0", Uniform(t_max=0.99)),
])
def test_hits_the_target_distribution(solver, path, prediction, grid):
    p = get_path(path)
    g = Gaussian(MEAN, COV, p, prediction)
    x1 = p.sample_prior((4000, 2), generator=_gen(2), dtype=torch.float64)
    sol = solve(g, x1, solver, 60, grid, generator=_gen(3))
    # standard errors ~0.012 for the mean and the covariance entries of 4000 draws
    torch.testing.assert_close(sol.samples.mean(0), MEAN.double(), atol=0.05, rtol=0)
    torch.testing.assert_close(torch.cov(sol.samples.T), COV.double(), atol=0.05, rtol=0)
    if get_solver(solver).fixed_step:
        assert sol.nfe == 2 * 60  # two evaluations per step, none wasted on torchsde's shape checks
    else:
        assert sol.nfe % 6 == 0 and sol.nfe > 0  # step doubling: one full and two half steps per try


def test_registered_and_declared():
    assert {"sde_srk", "sde_heun", "euler_maruyama"} <= set(SOLVERS.names())
    srk, heun = get_solver("sde_srk"), get_solver("sde_heun", eta=0.5)
    assert (srk.order, srk.strong_order, srk.stochastic, srk.fixed_step) == (2, 1.5, True, True)
    assert (heun.order, heun.strong_order, heun.eta) == (2, 1.0, 0.5)
    assert not TorchSDE(adaptive=True).fixed_step


def test_image_shapes_trajectory_and_reproducibility():
    p = get_path("ve")
    field = FunctionField(lambda x, t: 0.3 * x / (1 + (80 * t[:, None, None, None]) ** 2), p, "eps")
    x1 = torch.randn(3, 1, 2, 2, generator=_gen(0)) * 80
    for solver in (TorchSDE("srk", noise="brownian_tree"), EulerMaruyama(noise="brownian_tree"), TorchSDE("euler")):
        a = solve(field, x1, solver, 6, "karras", generator=_gen(4), trajectory=True)
        b = solve(field, x1, solver, 6, "karras", generator=_gen(4))
        c = solve(field, x1, solver, 6, "karras", generator=_gen(5))
        assert a.samples.shape == x1.shape and a.samples.dtype == x1.dtype
        assert a.trajectory.shape == (7, *x1.shape) and torch.equal(a.trajectory[-1], a.samples)
        assert torch.equal(a.samples, b.samples) and not torch.equal(a.samples, c.samples)


def test_torchsde_euler_is_euler_maruyama_on_one_brownian_path():
    """The same Brownian tree, s = 1 - t, and drift signs: torchsde's Euler equals ours to rounding."""
    g = Gaussian(MEAN, COV, get_path("linear"), "eps")
    x1 = torch.randn(8, 2, dtype=torch.float64, generator=_gen(0))
    grid = Uniform(t_max=0.95, t_min=0.05)  # ends above 0, where Euler-Maruyama adds noise on every step
    ours = solve(g, x1, EulerMaruyama(noise="brownian_tree"), 12, grid, generator=_gen()).samples
    theirs = solve(g, x1, TorchSDE("euler", noise="brownian_tree"), 12, grid, generator=_gen()).samples
    torch.testing.assert_close(ours, theirs, atol=1e-12, rtol=0)


def test_brownian_tree_gives_strong_convergence_across_grids():
    """With one generator every grid sees the same Brownian path, so samples converge as the grid is
    refined: Euler-Maruyama at strong order 1 (the noise does not depend on x), SRA1 faster; fresh
    per-step noise gives unrelated samples on every grid."""
    g = Gaussian(torch.tensor([1.0, -0.5]), torch.tensor([[0.5, 0.2], [0.2, 0.3]]), get_path("linear"), "eps")
    x1 = torch.randn(16, 2, dtype=torch.float64, generator=_gen(0))
    grid = Uniform(t_max=0.95, t_min=0.05)
    ns = [8, 16, 32, 64]

    def rms(a, b):
        return (a - b).square().sum(1).mean().sqrt().item()

    slopes = {}
    for solver in (EulerMaruyama(noise="brownian_tree"), TorchSDE("srk", noise="brownian_tree")):
        outs = [solve(g, x1, solver, n, grid, generator=_gen()).samples for n in ns]
        diffs = [rms(a, b) for a, b in zip(outs[:-1], outs[1:])]  # |x_n - x_2n| shrinks like n^-order
        slopes[solver.name] = -np.polyfit(np.log(ns[:-1]), np.log(diffs), 1)[0]
        slopes[solver.name + "_last"] = outs[-1]
    assert abs(slopes["euler_maruyama"] - 1.0) < 0.3, slopes
    assert slopes["sde_srk"] > 1.5, slopes
    # both converge to the same sample of the same Brownian path
    assert rms(slopes["euler_maruyama_last"], slopes["sde_srk_last"]) < 0.05
    fresh = [solve(g, x1, EulerMaruyama(), n, grid, generator=_gen()).samples for n in (32, 64)]
    assert rms(*fresh) > 10 * rms(slopes["euler_maruyama_last"], slopes["sde_srk_last"])


def test_eta_zero_srk_is_a_second_order_ode_solver():
    p = get_path("cosine")
    g = Gaussian(torch.tensor([1.0, -0.5]), torch.tensor([[0.5, 0.2], [0.2, 0.3]]), p, "x0")
    x1 = torch.randn(8, 2, dtype=torch.float64, generator=_gen(0))
    grid = Uniform(t_max=0.9, t_min=0.1)
    exact = g.exact_flow(x1, 0.9, 0.1)
    errs = [(solve(g, x1, TorchSDE("srk", eta=0.0), n, grid).samples - exact).abs().max().item() for n in (8, 16, 32)]
    assert abs(-np.polyfit(np.log([8, 16, 32]), np.log(errs), 1)[0] - 2) < 0.3, errs


def test_reverse_drift_is_velocity_minus_half_g2_score():
    """The finite form v + eta c eps equals the textbook v - eta g^2 / 2 score (and stays finite at t = 0)."""
    p = get_path("cosine")
    g = Gaussian(MEAN, COV, p, "eps")
    x = torch.randn(5, 2, dtype=torch.float64, generator=_gen(0))
    t = torch.full((5,), 0.4, dtype=torch.float64)
    v = g.with_prediction("velocity")(x, t)
    score = g.with_prediction("score")(x, t)
    textbook = v - 0.7 * 0.5 * p.g2(t)[:, None] * score
    torch.testing.assert_close(reverse_drift(g, x, t, 0.7), textbook)
    torch.testing.assert_close(reverse_drift(g, x, 0.4, 0.7), textbook)
    assert torch.isfinite(reverse_drift(g.with_prediction("x0"), x, 0.0, 1.0)).all()


def test_euler_maruyama_default_is_unchanged():
    """The default draws one torch.randn per step from the generator, as it always did."""
    p = get_path("ddpm")
    g = Gaussian(MEAN, COV, p, "eps")
    x = torch.randn(6, 2, dtype=torch.float64, generator=_gen(0))
    times = Uniform().times(10, p)
    out = solve(g, x, "euler_maruyama", None, times, generator=_gen(7)).samples
    gen, ts = _gen(7), times.double()
    for n in range(10):
        h, t = ts[n + 1] - ts[n], ts[n]
        tb = torch.full((6,), float(t), dtype=torch.float64)
        drift = g.with_prediction("velocity")(x, tb) - 0.5 * p.g2(t) * g.with_prediction("score")(x, tb)
        x = x + h * drift + torch.sqrt(-h * p.g2(t)) * torch.randn(x.shape, generator=gen, dtype=x.dtype)
    torch.testing.assert_close(out, x, atol=1e-12, rtol=0)


def test_bad_input():
    g = Gaussian(torch.zeros(2), torch.eye(2), get_path("linear"), "eps")
    x = torch.zeros(2, 2)
    with pytest.raises(ConfigError, match="unknown noise 'brownian'.*brownian_tree"):
        EulerMaruyama(noise="brownian")
    with pytest.raises(ConfigError, match="unknown noise"):
        get_solver("sde_srk", noise="tree")
    with pytest.raises(ConfigError, match="unknown torchsde method 'milstein'"):
        TorchSDE("milstein")
    with pytest.raises(ConfigError, match="eta"):
        TorchSDE(eta=-1.0)
    with pytest.raises(ConfigError, match="tolerance"):
        EulerMaruyama(noise="brownian_tree", tol=0.0)
    with pytest.raises(ConfigError, match="rtol"):
        TorchSDE(adaptive=True, rtol=0.0)
    with pytest.raises(ConfigError, match=r"\['atol'\] control adaptive stepping"):
        TorchSDE(atol=1e-2)  # never accepted and ignored
    with pytest.raises(ConfigError, match="needs noise='brownian_tree'"):
        EulerMaruyama(tol=1e-6)
    for path in ("linear", "cosine"):  # alpha(1) = 0: the diffusion is infinite at t = 1
        gp = Gaussian(torch.zeros(2), torch.eye(2), get_path(path), "eps")
        for solver in ("sde_srk", "sde_heun", EulerMaruyama(noise="brownian_tree")):
            with pytest.raises(SolverError, match=r"infinite diffusion g\^2 at t=1.*t_max=0.99"):
                solve(gp, x, solver, 4)
    with pytest.raises(SolverError, match="must decrease"):
        solve(g, x, "sde_srk", None, [0.1, 0.5, 0.9])
