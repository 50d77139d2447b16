"""Solvers: measured convergence order equals declared order; samples and likelihoods match closed forms."""

import math

import numpy as np
import pytest
import torch

from genkit.analytic import Gaussian, GaussianMixture
from genkit.errors import ConfigError, ShapeError, SolverError, TimeGridError
from genkit.fields import FunctionField
from genkit.paths import PATHS, get_path
from genkit.solvers import (
    GRIDS,
    SOLVERS,
    Custom,
    EulerMaruyama,
    Karras,
    LogSNR,
    ODEFlowMap,
    RungeKutta,
    Uniform,
    get_grid,
    get_solver,
    ode_log_prob,
    solve,
    validate_grid,
)

FIXED = [n for n in SOLVERS.names() if isinstance(get_solver(n), RungeKutta)]
ADAPTIVE = [n for n in SOLVERS.names() if not get_solver(n).fixed_step]
ODE_SOLVERS = FIXED + ADAPTIVE  # the fast diffusion solvers have their own full-grid test


def test_every_solver_is_in_an_order_suite():
    """Runge-Kutta and adaptive solvers are measured here, the fast diffusion solvers in
    test_fast_solvers.py, the stochastic ones by their distributions; nothing registered escapes."""
    from test_fast_solvers import EXPONENTIAL

    stochastic = [n for n in SOLVERS.names() if get_solver(n).stochastic]
    covered = set(FIXED) | set(ADAPTIVE) | set(EXPONENTIAL) | set(stochastic)
    assert covered == set(SOLVERS.names())


def _measured_order(solver, errors_at):
    ns = [8, 16, 32, 64]
    errs = [errors_at(solver, n) for n in ns]
    return -np.polyfit(np.log(ns), np.log(errs), 1)[0]


@pytest.mark.parametrize("name", FIXED)
def test_order_on_closed_form_ode(name):
    """dx/dt = -cos(t) x  =>  x(s) = x(t) exp(sin t - sin s)."""
    field = FunctionField(lambda x, t: -torch.cos(t)[:, None] * x, get_path("linear"), "velocity")
    x1 = torch.tensor([[1.0], [-2.0]], dtype=torch.float64)
    exact = x1 * math.exp(math.sin(1.0) - math.sin(0.0))

    def err(solver, n):
        return (solve(field, x1, solver, n).samples - exact).abs().max().item()

    assert abs(_measured_order(name, err) - get_solver(name).order) < 0.3


@pytest.mark.parametrize("name", FIXED)
@pytest.mark.parametrize("path", ["cosine"])
def test_order_on_gaussian_field(name, path):
    """Against the exact flow of the probability-flow ODE of Gaussian data. (On the linear path the
    midpoint rule superconverges, order 3, for this field, so the cosine path is the honest probe.)"""
    g = Gaussian(torch.tensor([1.0, -0.5]), torch.tensor([[0.5, 0.2], [0.2, 0.3]]), get_path(path))
    x1 = torch.randn(16, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    exact = g.exact_flow(x1, 1.0, 0.0)

    def err(solver, n):
        return (solve(g, x1, solver, n).samples - exact).abs().max().item()

    assert abs(_measured_order(name, err) - get_solver(name).order) < 0.3


@pytest.mark.parametrize("name", ODE_SOLVERS)
@pytest.mark.parametrize("path,prediction", [("linear", "velocity"), ("cosine", "x0"), ("ddpm", "eps"),
                                             ("ve", "eps")])
def test_samples_match_target_moments(name, path, prediction):
    p = get_path(path)
    mean, cov = torch.tensor([1.0, -2.0]), torch.tensor([[2.0, 0.5], [0.5, 1.0]])
    g = Gaussian(mean, cov, p, prediction)
    x1 = p.sample_prior((2000, 2), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grid = Karras() if path == "ve" else Uniform()
    sol = solve(g, x1, name, 64, grid)
    exact = g.exact_flow(x1, 1.0, float(sol.times[-1]))
    assert (sol.samples - exact).abs().max() < (0.05 if get_solver(name).order > 1 else 0.25)
    # and the population matches the data distribution (sampling error of 2000 draws)
    assert torch.allclose(sol.samples.mean(0), mean.double(), atol=0.15)
    assert torch.allclose(torch.cov(sol.samples.T), cov.double(), atol=0.3)


def test_euler_maruyama_matches_target_distribution():
    p = get_path("ddpm")
    mean, cov = torch.tensor([1.0, -2.0]), torch.tensor([[0.6, 0.2], [0.2, 0.3]])
    g = Gaussian(mean, cov, p, "eps")
    gen = torch.Generator().manual_seed(2)
    x1 = p.sample_prior((6000, 2), generator=gen, dtype=torch.float64)
    out = solve(g, x1, EulerMaruyama(), 200, generator=gen).samples
    # standard errors: ~0.01 for the mean, ~0.01 for the covariance entries
    torch.testing.assert_close(out.mean(0), mean.double(), atol=0.04, rtol=0)
    torch.testing.assert_close(torch.cov(out.T), cov.double(), atol=0.04, rtol=0)
    # reproducible with the same generator
    again = solve(g, x1[:10], EulerMaruyama(), 20, generator=torch.Generator().manual_seed(5)).samples
    same = solve(g, x1[:10], "euler_maruyama", 20, generator=torch.Generator().manual_seed(5))
    assert torch.equal(again, same.samples)


def test_euler_maruyama_eta_zero_is_euler():
    g = Gaussian(torch.zeros(2), torch.eye(2) * 0.5, get_path("cosine"), "eps")
    x1 = torch.randn(5, 2, dtype=torch.float64)
    grid = Uniform(t_max=0.99)
    torch.testing.assert_close(solve(g, x1, EulerMaruyama(eta=0.0), 10, grid).samples,
                               solve(g, x1, "euler", 10, grid).samples)


@pytest.mark.parametrize("path", ["linear", "cosine"])
@pytest.mark.parametrize("mode", ["exact", "hutchinson"])
def test_ode_log_prob_matches_exact_density(path, mode):
    p = get_path(path)
    gm = GaussianMixture(torch.tensor([0.4, 0.6]), torch.tensor([[-1.0, 0.5], [1.0, -0.5]]),
                         torch.stack([torch.eye(2) * 0.3, torch.tensor([[0.4, 0.1], [0.1, 0.2]])]), p)
    x = gm.sample(6, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    if mode == "exact":
        lp = ode_log_prob(gm, x, solver="rk4", steps=200)
        torch.testing.assert_close(lp, gm.log_prob(x), atol=1e-3, rtol=0)
        lp5 = ode_log_prob(gm, x, solver=get_solver("dopri5", rtol=1e-7, atol=1e-7))
        torch.testing.assert_close(lp5, gm.log_prob(x), atol=1e-3, rtol=0)
    else:  # unbiased: the average over probes converges to the exact value
        xs = x.repeat(400, 1)
        lp = ode_log_prob(gm, xs, solver="rk4", steps=50, divergence_mode="hutchinson",
                          generator=torch.Generator().manual_seed(4)).reshape(400, 6).mean(0)
        torch.testing.assert_close(lp, gm.log_prob(x), atol=0.1, rtol=0)


def test_adaptive_reports_nfe_and_trajectory():
    g = Gaussian(torch.tensor([2.0]), torch.eye(1), get_path("linear"))
    sol = solve(g, torch.zeros(3, 1), "dopri5", 4, trajectory=True)
    assert sol.nfe > 0 and sol.trajectory.shape == (5, 3, 1)
    sol = solve(g, torch.zeros(3, 1), "rk4", 4, trajectory=True)
    assert sol.nfe == 16 and sol.trajectory.shape == (5, 3, 1)
    torch.testing.assert_close(sol.trajectory[0], torch.zeros(3, 1))


@pytest.mark.parametrize("grid", GRIDS.names())
@pytest.mark.parametrize("path", PATHS.names())
def test_grids_are_valid(grid, path):
    p = get_path(path)
    start = 1.0
    if grid == "custom":
        g, n, end = Custom([1.0, 0.5, 0.1, 0.0]), 3, 0.0
    elif grid in ("leading", "trailing", "linspace"):  # diffusers' timesteps k at t = (k + 1) / 1000, then t = 0
        g, n, end = get_grid(grid), 10, 0.0
        start = 0.901 if grid == "leading" else 1.0
    else:
        g, n, end = get_grid(grid), 10, p.t_min
    t = g.times(n, p)
    assert len(t) == n + 1 and t[0] == start and t[-1] == end
    assert (t[1:] < t[:-1]).all()


def test_karras_and_logsnr_spacing():
    p = get_path("ve")
    t = Karras(rho=7.0).times(8, p)
    sig = (80 * t[:-1]) ** (1 / 7)
    d = sig[1:] - sig[:-1]
    torch.testing.assert_close(d, d[0].expand_as(d))  # uniform in sigma^(1/rho)
    lam = get_path("cosine").log_snr(LogSNR().times(8, get_path("cosine"))[1:-1])
    d = lam[1:] - lam[:-1]
    torch.testing.assert_close(d, d[0].expand_as(d))


def test_logsnr_grid_refuses_repeated_log_snr():
    """Past what float64 resolves near t = 0 (ddpm: log-SNR ~19), steps would repeat log-SNR values and exponential
    integrators divide by zero; the grid says so instead."""
    p = get_path("ddpm")
    with pytest.raises(TimeGridError, match="lambda_max <= 1[0-9]"):
        LogSNR(lambda_max=20.0, t_min=0.0).times(1000, p)
    lam = p.log_snr(LogSNR(lambda_max=16.0, t_min=0.0).times(1000, p)[:-1])
    assert (lam[1:] > lam[:-1]).all()


def test_flow_map_composes():
    g = Gaussian(torch.tensor([1.0, 0.0]), torch.eye(2) * 0.5, get_path("linear"))
    fm = ODEFlowMap(g, "rk4", steps=16)
    x = torch.randn(4, 2, dtype=torch.float64)
    torch.testing.assert_close(fm(fm(x, 1.0, 0.5), 0.5, 0.0), g.exact_flow(x, 1.0, 0.0), atol=1e-6, rtol=0)


def test_bad_input():
    g = Gaussian(torch.zeros(2), torch.eye(2), get_path("linear"), "eps")
    x = torch.zeros(2, 2)
    with pytest.raises(TimeGridError, match="monotone"):
        solve(g, x, "euler", None, [1.0, 0.3, 0.5, 0.0])
    with pytest.raises(TimeGridError, match=r"\[0, 1\]"):
        validate_grid([1.5, 0.0])
    with pytest.raises(ConfigError, match="unknown solver 'eulr'.*euler"):
        solve(g, x, "eulr", 4)
    with pytest.raises(ConfigError, match="positive integer"):
        solve(g, x, "euler", 0)
    with pytest.raises(SolverError, match="non-finite"):  # eps field at alpha = 0
        solve(g, x, "euler", 4)
    with pytest.raises(SolverError, match="infinite diffusion"):
        solve(g, x, "euler_maruyama", 4)
    with pytest.raises(ConfigError, match="not a genkit Field"):
        solve(lambda x, t: x, x, "euler", 4)


@pytest.mark.parametrize("name", ADAPTIVE)
def test_adaptive_solvers_never_evaluate_past_the_grid_end(name):
    """torchdiffeq steps past the end time and interpolates back unless told to land on it; below t = 0 the
    ddpm path is undefined, which crashed dopri5 on trained ddpm models ('underflow in dt')."""
    g = Gaussian(torch.tensor([1.0, -1.0]), torch.eye(2) * 0.5, get_path("ddpm"), "eps")
    seen: list[float] = []

    def recorded(x, t):
        seen.append(float(t.min()))
        return g(x, t)

    x1 = torch.randn(64, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    end = 1e-3
    sol = solve(FunctionField(recorded, g.path, "eps"), x1, name, grid=Uniform(t_min=end))
    assert min(seen) >= end - 1e-12
    torch.testing.assert_close(sol.samples, g.exact_flow(x1, 1.0, end), atol=1e-3, rtol=0)


def test_function_field_reads_other_conventions():
    """A torchcfm / flow_matching style field (t = 0 noise, called f(t, x) with a 0-d t) wrapped with
    time_first=True, data_at=1 is the genkit field it describes: same samples to rounding."""
    g = Gaussian(torch.tensor([2.0, -1.0]), torch.tensor([[0.5, 0.1], [0.1, 0.3]]), get_path("linear"))

    def cfm_velocity(t, x):  # noise at t = 0, data at t = 1, velocity towards the data
        assert t.ndim == 0
        return -g(x, 1 - t)

    wrapped = FunctionField(cfm_velocity, "linear", time_first=True, data_at=1)
    x1 = torch.randn(32, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for name in ("heun", "dopri5"):
        torch.testing.assert_close(solve(wrapped, x1, name, 8).samples, solve(g, x1, name, 8).samples)
    eps_view = FunctionField(lambda x, t: torch.zeros_like(x), "linear", "eps", data_at=1)
    assert torch.equal(eps_view(x1, 0.3), torch.zeros_like(x1))  # only a velocity changes sign
    with pytest.raises(ShapeError, match=r"returned \(32, 1\) for x of shape \(32, 2\)"):
        FunctionField(lambda x, t: x[:, :1], "linear")(x1, 0.5)
    with pytest.raises(ConfigError, match="data_at must be 0"):
        FunctionField(cfm_velocity, "linear", data_at=2)


def test_steps_grid_and_batch_arguments():
    g = Gaussian(torch.zeros(2), torch.eye(2), get_path("linear"))
    x = torch.randn(4, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    ref = solve(g, x, "heun", 5).samples
    for steps in (np.int64(5), torch.tensor(5)):
        assert torch.equal(solve(g, x, "heun", steps).samples, ref)
    for bad in (True, 0, 2.5, torch.tensor(5.0)):
        with pytest.raises(ConfigError, match="steps must be a positive integer"):
            solve(g, x, "heun", bad)
    times = torch.tensor([1.0, 0.5, 0.0], dtype=torch.float64)
    assert solve(g, x, "euler", grid=times).nfe == 2  # explicit times: their own count
    with pytest.raises(ConfigError, match="custom grid has 2 steps but 5 were asked for"):
        solve(g, x, "euler", 5, times)  # no longer silently ignored
    with pytest.raises(ConfigError, match=r"batch \[n, \.\.\.\] with n >= 1"):
        solve(g, x[:0], "heun", 4)
    with pytest.raises(ConfigError, match="generator must be a torch.Generator"):
        solve(g, x, "euler_maruyama", 4, generator=0)
