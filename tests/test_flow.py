"""Flow as a distribution: a 2-D density integrates to 1 on a grid, sample_and_log_prob agrees with log_prob,
seeded sampling is reproducible, rsample carries gradients, conditional flows check their context, and
.to(dtype) / state_dict round-trip."""

from __future__ import annotations

import pytest
import torch

from genkit.errors import ConfigError, ShapeError
from genkit.models.flows import AffineCoupling, AutoregressiveSpline, CouplingSpline, Flow, LULinear, Permutation
from genkit.models.flows.transforms import _randomise

F64 = torch.float64


def _flow(context: int = 0) -> Flow:
    torch.manual_seed(0)
    f = Flow([CouplingSpline(2, context, bins=6, hidden=16), AutoregressiveSpline(2, context, bins=6, hidden=16),
              LULinear(2, seed=1), AffineCoupling(2, context, hidden=16, parity=1), Permutation.reverse(2),
              CouplingSpline(2, context, bins=6, hidden=16, parity=1)], features=2, context_features=context)
    f = f.double()
    _randomise(f, 3, 0.3)
    return f


def test_density_integrates_to_one_on_a_grid() -> None:
    f = _flow()
    g = torch.linspace(-8, 8, 401, dtype=F64)  # step 0.04; measured mass 1.0005
    grid = torch.stack(torch.meshgrid(g, g, indexing="ij"), -1).reshape(-1, 2)
    with torch.no_grad():
        mass = float(f.log_prob(grid).exp().sum() * (g[1] - g[0]) ** 2)
    assert abs(mass - 1) < 0.01
    x = f.sample(500, generator=torch.Generator().manual_seed(1))
    assert x.std(0).sub(1).abs().max() > 0.05 or x.mean(0).abs().max() > 0.2  # not the base Normal


def test_sample_and_log_prob_agree_and_seeds_reproduce() -> None:
    f = _flow()
    x, logp = f.sample_and_log_prob(64, generator=torch.Generator().manual_seed(2))
    assert (f.log_prob(x) - logp).abs().max() < 1e-10
    assert torch.equal(f.sample(64, generator=torch.Generator().manual_seed(2)), x.detach())
    assert not f.sample(4).requires_grad
    loss = f.rsample(8, generator=torch.Generator().manual_seed(3)).square().sum()
    loss.backward()
    assert f.transforms[0].net[0].weight.grad.abs().sum() > 0


def test_conditional_flow_checks_its_context() -> None:
    f = _flow(context=3)
    c = torch.randn(5, 3, dtype=F64)
    x, logp = f.sample_and_log_prob(5, c)
    assert (f.log_prob(x, c) - logp).abs().max() < 1e-10
    assert f.sample(4, c[0]).shape == (4, 2)  # one row shared by every sample
    other = f.log_prob(x, c + 1)
    assert (other - logp).abs().max() > 1e-3  # the context matters
    with pytest.raises(ShapeError, match="context"):
        f.log_prob(x, torch.randn(5, 4, dtype=F64))
    with pytest.raises(ShapeError, match="conditional"):
        f.sample(5)
    with pytest.raises(ShapeError, match="without a context"):
        _flow().log_prob(x, c)


def test_bad_flows_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="features=3"):
        Flow([CouplingSpline(2)], features=3)
    with pytest.raises(ConfigError, match="context_features"):
        Flow([CouplingSpline(2, 4)], features=2, context_features=3)
    with pytest.raises(ConfigError, match="n=0"):
        _flow().sample(0)


def test_dtype_and_state_dict() -> None:
    f = _flow()
    g = _flow().float()
    g.load_state_dict(f.state_dict())
    x = torch.randn(6, 2, dtype=F64)
    assert g.sample(3).dtype == torch.float32
    assert (g.log_prob(x.float()).double() - f.log_prob(x)).abs().max() < 1e-4


@pytest.mark.parametrize("layer", ["spline", "affine"])
def test_spline_arithmetic_stays_float32_under_bf16_autocast(layer):
    """Under autocast the conditioner returns bf16; bf16 knots near +-B round onto each other (spacing 2^-6 at
    3.0 against bins of width ~6e-3), which broke the round trip by ~1e-2. The spline runs in the input's
    float32, so the round trip holds to float32 precision and log p is float32."""
    torch.manual_seed(0)
    make = (lambda p: CouplingSpline(4, bins=8, hidden=32, parity=p)) if layer == "spline" else (
        lambda p: AffineCoupling(4, hidden=32, parity=p))
    flow = Flow([make(0), Permutation.reverse(4), make(1)], features=4)
    x = 2 * torch.randn(256, 4)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logp = flow.log_prob(x)
        z = x
        for t in flow.transforms:
            z, _ = t(z)
        back = z
        for t in reversed(flow.transforms):
            back, _ = t.inverse(back)
    assert logp.dtype == torch.float32 and torch.isfinite(logp).all()
    assert (back - x).abs().max() < 1e-4


def test_a_flow_refuses_transforms_on_a_circle_or_interval():
    from genkit.models.flows import CircularCoupling, SmoothCoupling

    for t, domain in ((CircularCoupling(2, bins=4), "circle"), (SmoothCoupling(2, components=3), "interval")):
        with pytest.raises(ConfigError, match=f"CompactFlow.*domain='{domain}'"):
            Flow([t], features=2)
