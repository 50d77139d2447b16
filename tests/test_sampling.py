"""Samplers as objects (genkit.sampling) and flow maps with per-sample times (genkit.solvers.ODEFlowMap,
Secant.flow_map). Ground truth: the closed-form probability-flow map of Gaussian data (GaussianMixture.exact_flow).
"""

from __future__ import annotations

import pytest
import torch

import genkit
from genkit.analytic import Gaussian
from genkit.errors import ConfigError, ShapeError
from genkit.models import Diffusion, FlowMatching, Secant
from genkit.nets import MLP
from genkit.paths import get_path
from genkit.sampling import SAMPLERS, JumpSampler, ODESampler, get_sampler
from genkit.solvers import ODEFlowMap

A = torch.tensor([[0.5, 0.0], [0.3, 0.3]], dtype=torch.float64)
GAUSS = Gaussian(torch.tensor([1.0, -0.5]), A @ A.T, get_path("linear"))  # correlated 2-D data


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_registry_names():
    assert {"ode", "jumps"} <= set(SAMPLERS.names())
    assert isinstance(get_sampler("ode", solver="euler", steps=3), ODESampler)
    assert get_sampler("jumps", steps=2).steps == 2


def test_ode_flow_map_takes_per_sample_times():
    """[B] times: every row is the exact Gaussian flow for its own (t, s) (rk4, 64 steps: error ~1e-8), and
    each group of equal times equals the scalar call on it bitwise; t == s is the identity."""
    fm = ODEFlowMap(GAUSS, "rk4", steps=64)
    t = torch.tensor([1.0, 0.7, 1.0, 0.3, 0.7, 0.5], dtype=torch.float64)
    s = torch.tensor([0.0, 0.2, 0.0, 0.9, 0.2, 0.5], dtype=torch.float64)
    x = torch.randn(6, 2, generator=gen(0), dtype=torch.float64)
    out = fm(x, t, s)
    for i in range(6):
        exact = GAUSS.exact_flow(x[i:i + 1], float(t[i]), float(s[i]))
        torch.testing.assert_close(out[i:i + 1], exact, rtol=0, atol=1e-7)
    for idx, (tk, sk) in (([0, 2], (1.0, 0.0)), ([1, 4], (0.7, 0.2)), ([3], (0.3, 0.9))):
        assert torch.equal(out[idx], fm(x[idx], tk, sk))
    assert torch.equal(out[5], x[5])
    assert torch.equal(fm(x, torch.full((6,), 0.7, dtype=torch.float64), 0.2), fm(x, 0.7, 0.2))  # [B] and float
    assert torch.equal(fm(x, torch.tensor(0.7, dtype=torch.float64), 0.2), fm(x, 0.7, 0.2))  # 0-d: one time


def test_ode_flow_map_times_of_the_wrong_shape_are_shape_errors():
    fm = ODEFlowMap(GAUSS, "euler", steps=2)
    x = torch.zeros(4, 2, dtype=torch.float64)
    with pytest.raises(ShapeError, match=r"shape \[batch\]=\[4\]; got shape \(3,\)"):
        fm(x, torch.ones(3, dtype=torch.float64), 0.0)
    with pytest.raises(ShapeError, match=r"time s .*got shape \(4, 1\)"):
        fm(x, 1.0, torch.zeros(4, 1))
    with pytest.raises(ShapeError, match="float tensor"):
        fm(x, torch.ones(4, dtype=torch.long), 0.0)


def test_jump_sampler_runs_any_flow_map():
    """Jumps of the exact-in-the-limit ODE flow map land on the exact flow from 1 to 0; one jump is a
    one-step generator; explicit times set their own count."""
    x = torch.randn(5, 2, generator=gen(1), dtype=torch.float64)
    exact = GAUSS.exact_flow(x, 1.0, 0.0)
    fm = ODEFlowMap(GAUSS, "rk4", steps=32)
    for sampler in (JumpSampler(1), JumpSampler(3), JumpSampler(grid=[1.0, 0.6, 0.1, 0.0])):
        sol = sampler.sample(fm, x)
        torch.testing.assert_close(sol.samples, exact, rtol=0, atol=1e-6)
        assert sol.trajectory.shape == (len(sol.times), 5, 2) and sol.nfe == len(sol.times) - 1
    with pytest.raises(ConfigError, match="decrease"):
        JumpSampler(grid=[0.0, 1.0])
    with pytest.raises(ConfigError, match="ODE solvers"):
        JumpSampler(2, grid="karras")
    with pytest.raises(ConfigError, match="steps="):
        JumpSampler().sample(fm, x)


def test_secant_flow_map_takes_per_sample_times():
    torch.manual_seed(0)
    model = Secant(MLP(2, hidden=16, depth=1), sample_shape=(2,), loss="stee", steps=2)
    x, t, s = torch.randn(6, 2), torch.rand(6), torch.rand(6)
    rows = torch.cat([model.flow_map(x[i:i + 1], t[i:i + 1], s[i:i + 1], steps=2) for i in range(6)])
    torch.testing.assert_close(model.flow_map(x, t, s, steps=2), rows, rtol=1e-6, atol=1e-6)
    with pytest.raises(ShapeError, match="shape"):
        model.flow_map(x, torch.rand(5), 0.0)


def test_legacy_keywords_build_the_same_samplers():
    """solver= / steps= / grid= keep their meaning: they build the sampler that sampler= names (bitwise the same
    samples); steps= alone sets the default sampler's count."""
    torch.manual_seed(0)
    fm = FlowMatching(MLP(2, hidden=8, depth=1), sample_shape=(2,))
    a = fm.sample(6, solver="euler", steps=3, grid="karras", generator=gen(0))
    assert torch.equal(a, fm.sample(6, sampler=ODESampler("euler", 3, "karras"), generator=gen(0)))
    assert torch.equal(a, fm.sample(6, sampler="ode", solver="euler", steps=3, grid="karras", generator=gen(0)))
    assert fm.sample(6, steps=5, return_solution=True).nfe == 10  # heun by default
    assert fm.sample(6, return_solution=True).nfe == 64  # heun, 32 steps
    secant = Secant(MLP(2, hidden=8, depth=1), sample_shape=(2,), loss="stee", steps=(3, 5))
    x = secant.sample(4, generator=gen(0), return_solution=True)
    assert x.nfe == 3  # the learned jumps at the first trained count
    two = secant.sample(4, steps=2, generator=gen(0))
    assert torch.equal(two, secant.sample(4, sampler="jumps", steps=2, generator=gen(0)))
    assert torch.equal(two, secant.integrate(secant.path.sample_prior((4, 2), generator=gen(0)), 2).samples)
    assert secant.sample(4, solver="heun", return_solution=True).nfe == 64  # the velocity view, 32 steps


def test_diffusion_ode_sampler_denoises_at_the_end():
    torch.manual_seed(0)
    model = Diffusion(MLP(2, hidden=8, depth=1), "cosine", "eps", sample_shape=(2,))
    sol = model.sample(3, steps=4, return_solution=True)
    assert sol.nfe == 9 and float(sol.times[-1]) == model.t_eps  # 4 heun steps + E[x_0 | x_{t_eps}]


def test_sampler_misuse_names_the_fix():
    fm = FlowMatching(MLP(2, hidden=8, depth=1), sample_shape=(2,))
    with pytest.raises(ConfigError, match=r"cannot sample with JumpSampler.*learned jumps.*\('ode',\)"):
        fm.sample(2, sampler="jumps", steps=2)
    with pytest.raises(ConfigError, match="build the sampler with them"):
        fm.sample(2, sampler=ODESampler("euler"), steps=4)
    with pytest.raises(ConfigError, match="does not take"):
        fm.sample(2, sampler="jumps", solver="euler")
    with pytest.raises(ConfigError, match="unknown sampler 'nope'"):
        fm.sample(2, sampler="nope")
    with pytest.raises(ConfigError, match="unknown solver"):
        ODESampler("nope")
    with pytest.raises(ConfigError, match="steps must be a positive integer"):
        ODESampler("euler", steps=0)
    with pytest.raises(ConfigError, match="reverse it"):
        ODESampler("euler", grid=[0.0, 1.0])
    assert genkit.FlowMatching is FlowMatching
