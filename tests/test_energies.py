"""Target energies (genkit.energies): forces, exact log Z, quadrature, periodicity, the SNF double well, errors."""

import math

import pytest
import torch

from genkit.energies import ENERGIES, DoubleWell, energy_from_config, get_energy, quadrature
from genkit.errors import ConfigError, DataError, ShapeError


def _points(energy, n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    lo = torch.tensor([b[0] for b in energy.bounds], dtype=torch.float64)
    hi = torch.tensor([b[1] for b in energy.bounds], dtype=torch.float64)
    # the central half of the box: where the mass is, and away from float64 underflow of far tails
    return lo / 2 + (hi - lo) / 2 * torch.rand(n, energy.dim, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("name", ENERGIES.names())
def test_force_is_minus_gradient_by_finite_differences(name):
    e = get_energy(name)
    x = _points(e)
    f = e.force(x)
    assert f.shape == x.shape
    h = 1e-6
    for i in range(e.dim):
        dx = torch.zeros_like(x)
        dx[:, i] = h
        fd = -(e.energy(x + dx) - e.energy(x - dx)) / (2 * h)
        torch.testing.assert_close(f[:, i], fd, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(e.log_prob_unnormalised(x), -e.energy(x), rtol=0, atol=0)


@pytest.mark.parametrize("name", ENERGIES.names())
def test_config_round_trip_and_shapes(name):
    e = get_energy(name)
    e2 = energy_from_config(e.config())
    x = _points(e, 5)
    assert e.energy(x).shape == (5,)
    torch.testing.assert_close(e2.energy(x), e.energy(x), rtol=0, atol=0)
    assert e.domain in ("real", "torus")


def test_force_create_graph_gives_second_derivatives():
    e = get_energy("double_well")
    x = torch.tensor([[0.3, -0.7]], dtype=torch.float64, requires_grad=True)
    f = e.force(x, create_graph=True)
    (d2,) = torch.autograd.grad(f[:, 0].sum(), x)  # -U''(x1) = -(2b + 12c x1^2)
    assert abs(float(d2[0, 0]) + (2 * e.b + 12 * e.c * 0.3**2)) < 1e-12
    assert abs(float(d2[0, 1])) < 1e-12
    assert not e.force(x).requires_grad


@pytest.mark.parametrize("name", ["gaussian_mixture", "torus_dihedral"])
def test_quadrature_log_z_matches_exact(name):
    e = get_energy(name)
    assert e.log_z is not None
    assert abs(quadrature(e, n=301).log_z - e.log_z) < 1e-6


def test_gaussian_mixture_log_z_closed_form_in_3d():
    e = get_energy("gaussian_mixture", means=[[0.0, 0.0, 0.0], [1.0, 2.0, 3.0]], sigmas=[0.5, 2.0],
                   weights=[1.0, 3.0])
    expected = math.log(1.0 * (2 * math.pi * 0.25) ** 1.5 + 3.0 * (2 * math.pi * 4.0) ** 1.5)
    assert abs(e.log_z - expected) < 1e-12
    # far from every mean the energy is the nearest bump's quadratic
    x = torch.tensor([[1.0, 2.0, 3.0]], dtype=torch.float64)
    assert abs(float(e.energy(x)) + math.log(3.0 + math.exp(-14 / 0.5))) < 1e-12


@pytest.mark.parametrize("name", ENERGIES.names())
def test_quadrature_converges_as_grid_refines(name):
    e = get_energy(name)
    ref = quadrature(e, n=801).log_z
    errors = [abs(quadrature(e, n=n).log_z - ref) for n in (21, 41, 81, 321)]
    assert errors[-1] < 1e-8
    assert all(b < a or b < 1e-12 for a, b in zip(errors, errors[1:])), errors
    q = quadrature(e, n=201)
    total = float((q.density * q.weights[0][:, None] * q.weights[1][None, :]).sum())
    assert abs(total - 1) < 1e-12
    for axis in (0, 1):
        grid, p = q.marginal(axis)
        assert abs(float((p * q.weights[axis]).sum()) - 1) < 1e-12


def test_double_well_constants_minima_and_profile():
    e = get_energy("double_well")
    assert (e.dim, e.a, e.b, e.c) == (2, -0.5, -6.0, 1.0)
    lo, hi = e.minima()
    for m in (lo, hi):  # stationary and convex: U' = a + 2b x + 4c x^3 = 0, U'' > 0
        assert abs(e.a + 2 * e.b * m + 4 * e.c * m**3) < 1e-12
        assert 2 * e.b + 12 * e.c * m**2 > 0
    assert -1.72 < lo < -1.70 and 1.75 < hi < 1.76
    # the force vanishes at both minima (x2 = 0) and is nonzero elsewhere
    x = torch.tensor([[lo, 0.0], [hi, 0.0]], dtype=torch.float64)
    assert float(e.force(x).abs().max()) < 1e-10
    # the tilt a < 0 makes the right well the deeper one
    u = e.energy(x)
    assert float(u[1]) < float(u[0])
    # a grid search agrees with the formula's minima
    g = torch.linspace(-3, 3, 60001, dtype=torch.float64)
    ug = e.energy(torch.stack([g, torch.zeros_like(g)], 1))
    left, right = g < 0, g > 0
    assert abs(float(g[left][ug[left].argmin()]) - lo) < 2e-4
    assert abs(float(g[right][ug[right].argmin()]) - hi) < 2e-4
    # separable: the x1 free-energy profile is a x + b x^2 + c x^4 up to a constant
    q = quadrature(e, n=401)
    grid, f = q.free_energy(0)
    u1 = e.a * grid + e.b * grid**2 + e.c * grid**4
    torch.testing.assert_close(f, u1 - u1.min(), rtol=0, atol=1e-9)
    # the x2 marginal is a unit Gaussian
    grid2, p2 = q.marginal(1)
    torch.testing.assert_close(p2, torch.exp(-grid2**2 / 2) / math.sqrt(2 * math.pi), rtol=0, atol=1e-9)


def test_double_well_other_dims_and_minima_api():
    e = DoubleWell(dim=3)
    x = torch.tensor([[1.0, 1.0, 2.0]], dtype=torch.float64)
    assert float(e.energy(x)) == pytest.approx(-0.5 - 6 + 1 + 0.5 + 2.0)
    assert len(DoubleWell(b=1.0).minima()) == 1  # no barrier: a single well


def test_torus_energy_is_periodic_in_value_and_force():
    e = get_energy("torus_dihedral")
    assert e.domain == "torus"
    x = _points(e, 64)
    for shift in ([2 * math.pi, 0.0], [0.0, -2 * math.pi], [4 * math.pi, 2 * math.pi]):
        xs = x + torch.tensor(shift, dtype=torch.float64)
        torch.testing.assert_close(e.energy(xs), e.energy(x), rtol=0, atol=1e-12)
        torch.testing.assert_close(e.force(xs), e.force(x), rtol=0, atol=1e-12)
    # the seam: -pi and pi are the same point
    seam = torch.tensor([[-math.pi, 0.3], [0.4, -math.pi]], dtype=torch.float64)
    flipped = seam.abs()
    flipped[0, 1], flipped[1, 0] = 0.3, 0.4
    torch.testing.assert_close(e.energy(seam), e.energy(flipped), rtol=0, atol=1e-12)
    torch.testing.assert_close(e.force(seam), e.force(flipped), rtol=0, atol=1e-12)


def test_torus_energy_has_its_wells():
    e = get_energy("torus_dihedral")
    q = quadrature(e, n=200)
    assert int(_grid_minima(q.energy, periodic=True).sum()) == 3


def test_non_finite_energy_is_a_data_error_naming_energy_and_input():
    e = get_energy("double_well")
    x = torch.tensor([[0.0, 0.0], [float("nan"), 1.0]])
    with pytest.raises(DataError, match=r"double_well.*x\[1\] = \[nan, 1.0\]"):
        e.energy(x)
    with pytest.raises(DataError, match="rings"):
        get_energy("rings").force(torch.tensor([[float("inf"), 0.0]]))


def test_bad_shapes_and_configs():
    e = get_energy("gaussian_mixture")
    for bad in (torch.zeros(3), torch.zeros(4, 3), torch.zeros(2, 2, 2)):
        with pytest.raises(ShapeError, match=r"shape \[batch, 2\]"):
            e.energy(bad)
    with pytest.raises(ShapeError, match="floating-point"):
        e.energy(torch.zeros(4, 2, dtype=torch.int64))
    with pytest.raises(ConfigError, match="unknown energy"):
        get_energy("no_such_energy")
    with pytest.raises(ConfigError, match="does not take"):
        get_energy("rings", radius=2)
    with pytest.raises(ConfigError, match="c > 0"):
        DoubleWell(c=-1.0)
    with pytest.raises(ConfigError, match="2-D"):
        quadrature(get_energy("multi_well", dim=3))


def _grid_minima(u, periodic=False):
    """Strict local minima of a grid (8 neighbours); the border counts as higher unless periodic."""
    pad = u if periodic else torch.nn.functional.pad(u[None, None], (1, 1, 1, 1), value=float("inf"))[0, 0]
    is_min = torch.ones_like(pad, dtype=torch.bool)
    for di in (-1, 0, 1):
        for dj in (-1, 0, 1):
            if di or dj:
                is_min &= pad < torch.roll(pad, (di, dj), (0, 1))
    return is_min if periodic else is_min[1:-1, 1:-1]


def test_multi_well_has_four_wells_of_different_depths_near_the_corners():
    e = get_energy("multi_well")
    q = quadrature(e, n=301)
    mins = _grid_minima(q.energy)
    assert int(mins.sum()) == 4
    i, j = mins.nonzero(as_tuple=True)
    pts = torch.stack([q.axes[0][i], q.axes[1][j]], 1)
    assert float((pts.abs() - 1).abs().max()) < 0.1
    depths = q.energy[mins]
    assert len(set(depths.round(decimals=3).tolist())) == 4


def test_rings_minima_lie_on_the_rings():
    e = get_energy("rings")
    r = torch.linspace(0.2, 3.6, 3401, dtype=torch.float64)
    u = e.energy(torch.stack([r, torch.zeros_like(r)], 1))
    inner = (u[1:-1] < u[:-2]) & (u[1:-1] < u[2:])
    found = r[1:-1][inner]
    assert len(found) == 3
    torch.testing.assert_close(found, torch.tensor(e.radii, dtype=torch.float64), rtol=0, atol=0.01)
    # rotation invariant
    theta = torch.tensor(0.7, dtype=torch.float64)
    rot = torch.stack([r * torch.cos(theta), r * torch.sin(theta)], 1)
    torch.testing.assert_close(e.energy(rot), u, rtol=0, atol=1e-12)


def test_quadrature_sample_follows_the_grid_density():
    """Quadrature.sample: the double well's left-well mass and x_2 variance (exactly 1) within 4 standard errors;
    a torus sample wraps into [-pi, pi)."""
    e = get_energy("double_well")
    q = quadrature(e, n=401)
    g, p = q.marginal(0)
    left = float((p * q.weights[0])[g < 0].sum())
    n = 40000
    x = q.sample(n, generator=torch.Generator().manual_seed(0))
    assert x.shape == (n, 2) and x.dtype == torch.float64
    assert abs(float((x[:, 0] < 0).double().mean()) - left) < 4 * (left * (1 - left) / n) ** 0.5
    assert abs(float(x[:, 1].var()) - 1.0) < 4 * (2 / n) ** 0.5
    t = quadrature(get_energy("torus_dihedral"), n=64).sample(5000, generator=torch.Generator().manual_seed(1),
                                                              periodic=True)
    assert float(t.min()) >= -torch.pi and float(t.max()) < torch.pi
    with pytest.raises(ConfigError):
        q.sample(0)
