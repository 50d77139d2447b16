"""Stochastic normalizing flows: exact path weights, Delta S closed forms, estimators, bad input."""

import math

import pytest
import torch

from genkit import metrics
from genkit.energies import get_energy, quadrature
from genkit.errors import ConfigError, DataError
from genkit.models.flows import (
    AffineCoupling,
    EnergyObjective,
    Flow,
    LangevinBlock,
    MetropolisBlock,
    StochasticFlow,
)


class Quadratic:
    """u = 0.5 k |x|^2 + c."""

    def __init__(self, k=1.0, c=0.0):
        self.k, self.c = k, c

    def energy(self, x):
        return 0.5 * self.k * (x * x).sum(1) + self.c


def _normal(d):  # normalised standard Normal energy: Z = 1
    return Quadratic(1.0, 0.5 * d * math.log(2 * math.pi))


def test_mc_target_equals_prior_gives_zero_log_weights():
    d = 3
    t = _normal(d)
    snf = StochasticFlow([MetropolisBlock(t, 0.5, step_size=0.5, n_steps=10),
                          MetropolisBlock(t, 1.0, step_size=0.5, n_steps=10)], d).double()
    _, lw = snf.sample_with_log_weights(500, t, generator=torch.Generator().manual_seed(0))
    assert lw.abs().max() < 1e-12


def test_langevin_target_equals_prior_log_weights_vanish_as_eps_to_zero():
    d = 2
    t = _normal(d)
    spread = []
    for eps in (1e-1, 1e-2, 1e-3):
        snf = StochasticFlow([LangevinBlock(t, 1.0, step_size=eps, n_steps=5)], d).double()
        _, lw = snf.sample_with_log_weights(2000, t, generator=torch.Generator().manual_seed(1))
        spread.append(float(lw.detach().abs().mean()))
    assert spread[0] > spread[1] > spread[2] and spread[2] < 1e-3


def test_langevin_delta_s_is_gaussian_transition_log_ratio():
    k, eps = 2.5, 0.05
    blk = LangevinBlock(Quadratic(k), 1.0, step_size=eps).double()
    x = torch.randn(64, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    with torch.no_grad():
        y, ds = blk(x, torch.Generator().manual_seed(3))

    def log_n(a, mean):
        return -((a - mean) ** 2).sum(1) / (4 * eps)

    exact = log_n(x, (1 - eps * k) * y) - log_n(y, (1 - eps * k) * x)
    torch.testing.assert_close(ds, exact, rtol=1e-10, atol=1e-10)


def test_mc_delta_s_is_energy_change():
    e = get_energy("double_well")
    blk = MetropolisBlock(e, 0.7, step_size=0.3).double()
    x = torch.randn(256, 2, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    y, ds = blk(x, torch.Generator().manual_seed(5))
    torch.testing.assert_close(ds, blk.energy.energy(y) - blk.energy.energy(x), rtol=0, atol=1e-12)
    moved = (y != x).any(1)
    assert 0 < int(moved.sum()) < 256


def test_estimators_on_known_weights():
    lw = torch.zeros(100, dtype=torch.float64) + 3.0
    assert metrics.effective_sample_size(lw) == pytest.approx(100)
    lz, se = metrics.log_z(lw)
    assert lz == pytest.approx(3.0) and se == pytest.approx(0.0, abs=1e-12)
    lw = torch.tensor([0.0, math.log(3.0)], dtype=torch.float64)  # w = 1, 3
    assert metrics.effective_sample_size(lw) == pytest.approx(16 / 10)
    lz, se = metrics.log_z(lw)
    assert lz == pytest.approx(math.log(2.0))
    assert se == pytest.approx(math.sqrt(2.0) / (math.sqrt(2) * 2.0))  # std(w)=sqrt(2), mean 2
    v = torch.tensor([1.0, 5.0], dtype=torch.float64)
    assert float(metrics.reweighted_mean(v, lw)) == pytest.approx(4.0)
    _, f = metrics.reweighted_free_energy(torch.tensor([-0.5, 0.5]), lw, torch.tensor([-1.0, 0.0, 1.0]))
    torch.testing.assert_close(f, torch.tensor([math.log(3.0), 0.0], dtype=torch.float64))


def test_bad_input():
    with pytest.raises(ConfigError):
        LangevinBlock(_normal(2), 1.0, step_size=0.0)
    with pytest.raises(ConfigError):
        MetropolisBlock(_normal(2), 1.0, step_size=float("nan"))
    with pytest.raises(ConfigError):
        LangevinBlock(_normal(2), 1.5)
    bad = Quadratic(float("nan"))
    snf = StochasticFlow([MetropolisBlock(bad, 1.0)], 2)
    with pytest.raises(DataError, match="step size"):
        snf.sample_with_log_weights(8, bad, generator=torch.Generator().manual_seed(0))


@pytest.mark.slow
def test_log_z_double_well_from_trained_flow_and_snf():
    torch.manual_seed(0)
    torch.set_num_threads(1)
    e = get_energy("double_well")
    exact = quadrature(e, n=401).log_z
    flow = Flow([AffineCoupling(2, hidden=32, parity=i) for i in range(6)], 2)
    obj = EnergyObjective(flow, e, batch_size=256)
    opt = torch.optim.Adam(flow.parameters(), lr=5e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(600):
        loss, _ = obj.loss(None, g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    snf = StochasticFlow(list(flow.transforms)[::-1] + [MetropolisBlock(e, 1.0, step_size=0.1, n_steps=20)], 2)
    with torch.no_grad():
        for model in (flow, snf):
            from genkit.models.flows import flow_log_weights
            _, lw = flow_log_weights(model, 20000, e, generator=torch.Generator().manual_seed(1))
            lz, se = metrics.log_z(lw)
            print(type(model).__name__, lz, se, exact, metrics.effective_sample_size(lw))
            assert abs(lz - exact) < 0.02 * abs(exact)
