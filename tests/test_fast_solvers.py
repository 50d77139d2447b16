"""Fast diffusion solvers: measured order on analytic fields, and faithfulness to diffusers."""

import numpy as np
import pytest
import torch

from genkit.analytic import Gaussian
from genkit.fields import FunctionField
from genkit.paths import get_path
from genkit.solvers import (
    DEIS,
    SOLVERS,
    Ancestral,
    DPMSolverPP2M,
    EDMStochastic,
    ExponentialSolver,
    Karras,
    LogSNR,
    UniPC,
    get_solver,
    solve,
)

EXPONENTIAL = [n for n in SOLVERS.names() if isinstance(get_solver(n), (ExponentialSolver, DEIS))]


def _exact_order_solver(name):
    s = get_solver(name)
    return get_solver(name, lower_order_final=False) if isinstance(s, ExponentialSolver) else s


@pytest.mark.parametrize("name", EXPONENTIAL)
@pytest.mark.parametrize("path,prediction", [("cosine", "x0"), ("ddpm", "eps"), ("ve", "eps")])
def test_measured_order(name, path, prediction):
    """Log-SNR-uniform grids inside (0, 1), against the exact flow of Gaussian data; the slope between the
    two finest grids (asymptotic regime) matches the declared global order."""
    p = get_path(path)
    g = Gaussian(torch.tensor([1.0, -0.5]), torch.tensor([[0.5, 0.2], [0.2, 0.3]]), p, prediction)
    x1 = torch.randn(8, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * p.prior_std()
    grid = LogSNR(t_max=0.9, t_min=0.05)
    solver = _exact_order_solver(name)
    errs = []
    for n in (64, 128, 256):
        t = grid.times(n, p)
        errs.append((solve(g, x1, solver, None, t).samples - g.exact_flow(x1, 0.9, 0.05)).abs().max().item())
    slope = -np.log2(errs[-1] / errs[-2])
    assert abs(slope - solver.order) < 0.3, (errs, slope)


@pytest.mark.parametrize("name", EXPONENTIAL)
@pytest.mark.parametrize("path,prediction", [("linear", "velocity"), ("cosine", "v"), ("ddpm", "eps"), ("ve", "x0")])
def test_full_grid_samples_the_target(name, path, prediction):
    """From t = 1 (alpha = 0 on linear/cosine) to t = 0 (sigma = 0) on every path."""
    p = get_path(path)
    g = Gaussian(torch.tensor([1.0, -2.0]), torch.tensor([[0.6, 0.2], [0.2, 0.3]]), p, prediction)
    x1 = p.sample_prior((64, 2), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    sol = solve(g, x1, name, 40, "logsnr")
    exact = g.exact_flow(x1, 1.0, float(sol.times[-1]))
    assert sol.nfe == 40
    # first-order DDIM and the eps-extrapolating DEIS are the least accurate at 40 steps
    assert (sol.samples - exact).abs().max() < {"ddim": 0.2, "deis": 0.06}.get(name, 0.03)


class _Net(torch.nn.Module):
    """A fixed smooth eps-network of (x, integer-scale timestep), shared by both sides."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w1 = torch.randn(3, 32, generator=g) * 0.5
        self.w2 = torch.randn(32, 2, generator=g) * 0.5

    def forward(self, x, timestep):
        tt = timestep.float().reshape(-1, 1).expand(x.shape[0], 1) / 1000
        return torch.tanh(torch.cat([x, tt], 1) @ self.w1) @ self.w2 + 0.3 * x


@pytest.mark.parametrize("steps", [5, 10, 20])
@pytest.mark.parametrize("which", ["dpmpp_2m", "unipc"])
def test_reproduces_diffusers(which, steps):
    from diffusers import DPMSolverMultistepScheduler, UniPCMultistepScheduler

    common = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                  prediction_type="epsilon", solver_order=2)
    if which == "dpmpp_2m":
        sched, ours = DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", **common), DPMSolverPP2M()
    else:
        sched, ours = UniPCMultistepScheduler(solver_type="bh2", predict_x0=True, **common), UniPC()
    sched.set_timesteps(steps)
    net = _Net()
    x = torch.randn(256, 2, generator=torch.Generator().manual_seed(0))
    ref = x.clone()
    with torch.no_grad():
        for ts in sched.timesteps:
            ref = sched.step(net(ref, ts), ts, ref).prev_sample
        path = get_path("ddpm")
        field = FunctionField(lambda y, t: net(y, path.timestep(t)), path, "eps")
        times = torch.cat([(sched.timesteps.double() + 1) / 1000, torch.zeros(1, dtype=torch.float64)])
        out = solve(field, x, ours, None, times).samples
    rel = ((out - ref).norm() / ref.norm()).item()
    assert rel < 1e-4, rel


STOCHASTIC = [n for n in SOLVERS.names() if get_solver(n).stochastic]


@pytest.mark.parametrize("name", STOCHASTIC)
@pytest.mark.parametrize("path,prediction", [("ddpm", "eps"), ("ve", "eps"), ("cosine", "v")])
def test_stochastic_samplers_hit_the_target_distribution(name, path, prediction):
    p = get_path(path)
    mean, cov = torch.tensor([1.0, -2.0]), torch.tensor([[0.6, 0.2], [0.2, 0.3]])
    g = Gaussian(mean, cov, p, prediction)
    gen = torch.Generator().manual_seed(2)
    x1 = p.sample_prior((6000, 2), generator=gen, dtype=torch.float64)
    grid = "karras" if path == "ve" else ("uniform" if name == "edm" else LogSNR(t_max=0.99))
    if name == "euler_maruyama" and path == "cosine":
        grid = LogSNR(t_max=0.99)
    out = solve(g, x1, name, 200, grid, generator=gen).samples
    # standard errors ~0.01 for the mean and the covariance entries of 6000 draws
    torch.testing.assert_close(out.mean(0), mean.double(), atol=0.05, rtol=0)
    torch.testing.assert_close(torch.cov(out.T), cov.double(), atol=0.05, rtol=0)
    a = solve(g, x1[:5], name, 10, grid, generator=torch.Generator().manual_seed(9)).samples
    b = solve(g, x1[:5], name, 10, grid, generator=torch.Generator().manual_seed(9)).samples
    assert torch.equal(a, b)  # reproducible with a generator


def test_ancestral_eta_zero_is_ddim_and_edm_churn_zero_is_heun():
    p = get_path("ve")
    g = Gaussian(torch.tensor([0.5]), torch.eye(1) * 0.4, p, "eps")
    x1 = torch.randn(6, 1, dtype=torch.float64) * p.prior_std()
    grid = Karras(t_min=0.01)
    torch.testing.assert_close(solve(g, x1, Ancestral(eta=0.0), 12, grid).samples,
                               solve(g, x1, "ddim", 12, grid).samples)
    # on the ve path rho = 80 t, so EDM's Heun in rho is Heun in t
    torch.testing.assert_close(solve(g, x1, EDMStochastic(churn=0.0), 12, grid).samples,
                               solve(g, x1, "heun", 12, grid).samples, rtol=1e-10, atol=1e-10)
