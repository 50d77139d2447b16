"""Smooth and circular flows: the bracketed root finder with implicit gradients, circular RQ splines periodic at
the seam, C-infinity mixture transforms (their inverse gradients against finite differences, their forces
continuous where an RQ spline's jump, measured), compact-domain densities integrating to 1, and force matching.
The registry-wide round trip / slogdet suite for these transforms is in tests/test_flow_transforms.py."""

from __future__ import annotations

import math

import pytest
import torch
from torch.func import functional_call

from genkit.energies import get_energy
from genkit.errors import ConfigError, DataError, ShapeError, SolverError
from genkit.models.flows import (
    CircularCoupling,
    CircularSmoothCoupling,
    CompactFlow,
    CouplingSpline,
    ForceMatchingObjective,
    Permutation,
    SmoothCoupling,
    bump_sigmoid,
    circular_rq_spline,
    flow_force,
    force_matching_loss,
    rq_spline,
    smooth_unit_inverse,
    smooth_unit_map,
    spline_knots,
    wrap,
)
from genkit.models.flows.roots import bracketed_inverse, inverse

F64 = torch.float64
PI = math.pi
BELOW_PI = math.nextafter(PI, 0)


def _randn(g, *shape, scale=1.0):
    return scale * torch.randn(*shape, generator=g, dtype=F64)


def _randomise(module, seed, scale=0.5):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return module


# ------------------------------------------------------------------------------------------- the root finder

def _f(x, a, b):
    # increasing on R for a > 0, b >= 0
    return a * x + b * torch.tanh(x), a + b * (1 - torch.tanh(x) ** 2)


def test_bracketed_inverse_solves_to_tolerance():
    a = torch.tensor([0.5, 1.0, 2.0], dtype=F64)
    b = torch.tensor([3.0, 0.1, 1.0], dtype=F64)
    y = torch.tensor([-1.0, 0.3, 2.5], dtype=F64)
    x = bracketed_inverse(lambda z: _f(z, a, b), y, -10.0, 10.0, tol=1e-13)
    assert (_f(x, a, b)[0] - y).abs().max() < 1e-12


def test_inverse_gradients_match_finite_differences():
    a = torch.tensor([0.5, 1.0, 2.0], dtype=F64, requires_grad=True)
    b = torch.tensor([3.0, 0.1, 1.0], dtype=F64, requires_grad=True)
    y = torch.tensor([-1.0, 0.3, 2.5], dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda y, a, b: inverse(_f, y, -10.0, 10.0, a, b, tol=1e-14),
                                    (y, a, b), eps=1e-6, atol=1e-7)


def test_inverse_second_derivatives_match_finite_differences():
    a = torch.tensor([0.5, 1.0, 2.0], dtype=F64, requires_grad=True)
    b = torch.tensor([3.0, 0.1, 1.0], dtype=F64, requires_grad=True)
    y = torch.tensor([-1.0, 0.3, 2.5], dtype=F64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda y, a, b: inverse(_f, y, -10.0, 10.0, a, b, tol=1e-14),
                                        (y, a, b), eps=1e-6, atol=1e-6)


def test_root_finder_bad_input_is_a_solver_error():
    a, b = torch.ones(2, dtype=F64), torch.zeros(2, dtype=F64)
    with pytest.raises(SolverError, match="outside the range"):
        bracketed_inverse(lambda z: _f(z, a, b), torch.tensor([0.0, 20.0], dtype=F64), -10.0, 10.0)
    with pytest.raises(SolverError, match="lo < hi"):
        bracketed_inverse(lambda z: _f(z, a, b), torch.zeros(2, dtype=F64), 1.0, -1.0)


# ----------------------------------------------------------------------------------------- circular splines

def _circ_params(g, n, k, scale):
    return (_randn(g, n, k, scale=scale), _randn(g, n, k, scale=scale), _randn(g, n, k - 1, scale=scale),
            _randn(g, n, scale=scale), _randn(g, n, scale=3.0))


def test_circular_spline_is_periodic_at_the_seam_under_random_parameters():
    g = torch.Generator().manual_seed(0)
    slopes = []
    for scale in (0.3, 1.0, 3.0, 10.0):
        w, h, d, bd, off = _circ_params(g, 50, 7, scale)
        rep = [t.repeat_interleave(2, 0) for t in (w, h, d, bd, off)]
        # the underlying spline at exactly -pi and pi (the same point of the circle): value + 2 pi, same slope
        ends = torch.tensor([-PI, PI], dtype=F64).repeat(50).requires_grad_(True)
        y, ld = rq_spline(ends, *rep[:3], bound=PI, boundary_derivatives=rep[3][:, None].expand(-1, 2))
        (dy,) = torch.autograd.grad(y.sum(), ends)
        y, ld, dy = y.view(50, 2), ld.view(50, 2), dy.view(50, 2)
        assert (y[:, 1] - y[:, 0] - 2 * PI).abs().max() <= 1e-12
        assert (dy[:, 1] - dy[:, 0]).abs().max() <= 1e-12 * dy.abs().max()
        assert (ld[:, 1] - ld[:, 0]).abs().max() <= 1e-12
        slopes.append(dy[:, 0])
        # the circular map itself at -pi and at the float below pi (its one-sided limit at the seam)
        seam = torch.tensor([-PI, BELOW_PI], dtype=F64).repeat(50).requires_grad_(True)
        y, ld = circular_rq_spline(seam, *rep)
        dy, dld = (torch.autograd.grad(v.sum(), seam, retain_graph=True)[0].view(50, 2) for v in (y, ld))
        y, ld = y.view(50, 2), ld.view(50, 2)
        assert wrap(y[:, 1] - y[:, 0]).abs().max() <= 1e-10  # value, mod 2 pi
        assert (dy[:, 1] - dy[:, 0]).abs().max() <= 1e-10 * dy.abs().max()  # derivative, by autograd
        assert (dy.log() - ld).abs().max() <= 1e-9  # autograd's slope vs the analytic one (3e-10 at scale 10)
        # log-slopes agree up to their change over the one-ulp gap (curvature reaches 1e6 at large scales)
        gap = PI - BELOW_PI
        assert ((ld[:, 1] - ld[:, 0]).abs() <= 1e-10 + 2 * gap * dld.abs().amax(1)).all()
    slopes = torch.cat(slopes)
    assert slopes.min() < 0.5 and slopes.max() > 2  # the seam derivative is learned, not pinned to 1


def test_circular_spline_round_trips_on_its_knots_and_the_seam():
    g = torch.Generator().manual_seed(1)
    w, h, d, bd, off = _circ_params(g, 8, 6, 2.0)
    xk = spline_knots(w, PI, 1e-3)[:, :-1]  # -pi and the interior knots (pi is -pi on the circle)
    yk = spline_knots(h, PI, 1e-3)[:, :-1]
    p = [t[:, None].expand(-1, 6, *t.shape[1:]) for t in (w, h, d, bd, off)]
    y, ld = circular_rq_spline(xk, *p)
    assert wrap(y - yk - off[:, None]).abs().max() <= 1e-12  # f(x_k) = y_k + offset, mod 2 pi
    x2, ld2 = circular_rq_spline(y, *p, inverse=True)
    assert wrap(x2 - xk).abs().max() <= 1e-10 and (ld + ld2).abs().max() <= 1e-10
    near = torch.full((8, 6), BELOW_PI, dtype=F64)
    x3, _ = circular_rq_spline(circular_rq_spline(near, *p)[0], *p, inverse=True)
    assert wrap(x3 - near).abs().max() <= 1e-10


def test_circular_spline_stays_in_its_domain_next_to_the_seam():
    g = torch.Generator().manual_seed(9)
    w, h, d = _randn(g, 500, 4, scale=3.0), _randn(g, 500, 4, scale=3.0), _randn(g, 500, 3)
    bd = 100 * torch.rand(500, generator=g, dtype=F64)  # steep seams: the float below pi maps back onto pi
    for x in (torch.full((500,), BELOW_PI, dtype=F64), torch.full((500,), -PI, dtype=F64)):
        for inv in (False, True):
            y, ld = circular_rq_spline(x, w, h, d, bd, inverse=inv)
            assert ((y >= -PI) & (y < PI)).all()
            x2, _ = circular_rq_spline(y, w, h, d, bd, inverse=not inv)
            # held to the way back's condition number |dx/dy| (as in tests/test_flow_transforms.py)
            assert (wrap(x2 - x).abs() <= 1e-10 * torch.exp(-ld).clamp_min(1)).all()


def test_circular_spline_rejects_outside_angles():
    g = torch.Generator().manual_seed(2)
    w, h, d, bd, off = _circ_params(g, 1, 4, 1.0)
    for bad in (PI, 4.0, -3.5, float("nan")):
        with pytest.raises(DataError, match="wrap"):
            circular_rq_spline(torch.tensor([bad], dtype=F64), w, h, d, bd, off)
    with pytest.raises(ShapeError, match="boundary_derivative"):
        circular_rq_spline(torch.zeros(1, dtype=F64), w, h, d, bd[:, None], off)
    assert wrap(torch.tensor([PI, -PI], dtype=F64)).tolist() == [-PI, -PI]
    many = wrap(torch.cat([_randn(g, 1000, scale=1e3), torch.tensor([-1e-17, 2 * PI, -2 * PI], dtype=F64)]))
    assert ((many >= -PI) & (many < PI)).all()


def test_rq_spline_boundary_derivatives_keyword():
    g = torch.Generator().manual_seed(3)
    w, h, d = _randn(g, 2, 5), _randn(g, 2, 5), _randn(g, 2, 4)
    bd = torch.tensor([[-2.0, 1.5], [0.0, 3.0]], dtype=F64)
    x = torch.tensor([-2.0, 2.0], dtype=F64).requires_grad_(True)
    y, ld = rq_spline(x, w, h, d, bound=2.0, boundary_derivatives=bd)
    (dy,) = torch.autograd.grad(y.sum(), x)
    want = 1e-3 + torch.nn.functional.softplus(torch.stack([bd[0, 0], bd[1, 1]]))
    assert (dy - want).abs().max() <= 1e-12 and (ld - want.log()).abs().max() <= 1e-12
    assert torch.equal(rq_spline(x, w, h, d, bound=2.0)[0], x.detach())  # default: derivative 1, unchanged


# ----------------------------------------------------------------------------------- smooth mixture transforms

def test_bump_sigmoid_is_flat_outside_and_exact_at_the_centre():
    z = torch.tensor([-1.0, 0.0, 1e-5, 0.5, 1 - 1e-5, 1.0, 2.0], dtype=F64).requires_grad_(True)
    for alpha in (0.5, 1.0, 4.0):
        s, ds = bump_sigmoid(z, alpha)
        assert s.tolist()[:2] == [0.0, 0.0] and s.tolist()[-2:] == [1.0, 1.0] and ds[[0, 1, 5, 6]].eq(0).all()
        centre, slope = float(s[3].detach()), float(ds[3].detach())
        assert abs(centre - 0.5) <= 1e-15 and abs(slope - 2 * alpha) <= 1e-12  # sigma'(1/2) = 2 alpha
        (auto,) = torch.autograd.grad(s.sum(), z, retain_graph=True)
        assert (auto - ds).abs().max() <= 1e-12
        (dds,) = torch.autograd.grad(ds.sum(), z, create_graph=True)
        (d3,) = torch.autograd.grad(dds.sum(), z)
        assert torch.isfinite(dds).all() and torch.isfinite(d3).all()  # every derivative finite, also at 0, 1


@pytest.mark.parametrize("circle", [False, True])
def test_smooth_unit_map_is_monotone_onto_the_unit_interval(circle):
    g = torch.Generator().manual_seed(4)
    p = _randn(g, 40, 3 * 5 + 1 + int(circle), scale=3.0)
    u = torch.linspace(0, 1, 501, dtype=F64)[:, None].expand(-1, 40)
    f, df = smooth_unit_map(u, p, circle=circle)
    assert f[0].abs().max() <= 1e-15 and (f[-1] - 1).abs().max() <= 1e-14
    assert (f.diff(dim=0) > 0).all() and (df >= 1e-2).all()
    ug = u.clone().requires_grad_(True)
    (auto,) = torch.autograd.grad(smooth_unit_map(ug, p, circle=circle)[0].sum(), ug)
    assert (auto - df).abs().max() <= 1e-10 * df.abs().max()  # the analytic derivative is the derivative
    v = torch.rand(40, generator=g, dtype=F64)
    fu, dfu = smooth_unit_map(smooth_unit_inverse(v, p, circle=circle), p, circle=circle)
    # the solver's stated tolerance: |f(u) - v| <= 1e-14, or a bracket narrower than 1e-14 around u
    assert ((fu - v).abs() <= 1e-14 * dfu.clamp_min(1)).all()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_smooth_unit_map_fuzz_with_extreme_parameters(dtype):
    """Unnormalised parameters up to scale 50 (slopes from the 1e-2 floor to ~200), the ends and their
    neighbours: finite values and slopes, and the root-finder inverse recovers u (measured worst: 1.1e-14 in
    float64, 5e-6 in float32, where the bracket-width stop of 1e-6 binds)."""
    g = torch.Generator().manual_seed(11)
    for circle in (False, True):
        for scale in (1.0, 10.0, 50.0):
            p = scale * torch.randn(200, 3 * 5 + 1 + int(circle), generator=g, dtype=dtype)
            u = torch.rand(200, generator=g, dtype=dtype)
            u[:5] = torch.tensor([0.0, 1.0, 1e-30, 0.5, 1 - 1e-7])
            v, dv = smooth_unit_map(u, p, circle=circle)
            assert torch.isfinite(v).all() and torch.isfinite(dv).all() and (dv >= 1e-2 * (1 - 1e-6)).all()
            u2 = smooth_unit_inverse(v, p, circle=circle)
            assert (u2 - u).abs().max() <= (1e-13 if dtype == torch.float64 else 2e-5)


def test_circular_smooth_map_matches_every_derivative_at_the_seam():
    g = torch.Generator().manual_seed(5)
    p = _randn(g, 30, 3 * 4 + 2, scale=2.0)
    ends = torch.tensor([0.0, 1.0], dtype=F64)[None].expand(30, -1).clone().requires_grad_(True)
    _, df = smooth_unit_map(ends, p[:, None], circle=True)
    derivs = [df]
    for _ in range(3):
        (nxt,) = torch.autograd.grad(derivs[-1].sum(), ends, create_graph=True)
        derivs.append(nxt)
    for k, dk in enumerate(derivs, start=1):  # f', f'', f''', f'''' agree at u = 0 and u = 1
        assert (dk[:, 1] - dk[:, 0]).abs().max() <= 1e-9 * (1 + dk.abs().max()), k
    # the interval version is not periodic: its derivatives at 0 and 1 differ
    _, dfi = smooth_unit_map(ends, p[:, None, :-1])
    assert (dfi[:, 1] - dfi[:, 0]).abs().max() > 1e-2


def test_smooth_inverse_gradients_equal_finite_differences():
    g = torch.Generator().manual_seed(6)
    for circle in (False, True):
        p = _randn(g, 3, 3 * 2 + 1 + int(circle), scale=2.0).requires_grad_(True)
        v = torch.tensor([0.01, 0.55, 0.97], dtype=F64).requires_grad_(True)
        u = smooth_unit_inverse(v, p, circle=circle)
        assert type(u.grad_fn).__name__ == "InverseFunctionBackward"  # implicit gradients, not the iterations
        assert torch.autograd.gradcheck(lambda v, p, c=circle: smooth_unit_inverse(v, p, circle=c), (v, p),
                                        eps=1e-6, atol=1e-8)
    for cls in (SmoothCoupling, CircularSmoothCoupling):  # whole transforms: the inverse in y and the context
        t, x, c = cls.example()
        y = t(x, c)[0].detach()[:2].requires_grad_(True)
        c = c[:2].clone().requires_grad_(True)
        assert torch.autograd.gradcheck(lambda y, c, t=t: t.inverse(y, c), (y, c), eps=1e-6, atol=1e-8)


def _force_along(model, fixed: float, grid: torch.Tensor) -> torch.Tensor:
    """d/dx2 log q at (fixed, x2) for x2 on grid: the force component the RQ spline's knots act on."""
    x = torch.stack([torch.full_like(grid, fixed), grid], dim=1)
    return flow_force(model, x)[:, 1]


def test_forces_of_a_smooth_flow_are_continuous_where_an_rq_splines_are_not():
    """Measured at a knot of one RQ spline: the jump of d/dx log f'(x) (which enters the force) between
    x_k - h and x_k + h tends to a finite non-zero limit for the RQ spline and to 0 (like h) for the smooth
    mixture at the same point; and at flow level the largest force change between neighbouring grid points
    stays put for an RQ coupling flow as the grid is refined 100x, while a smooth flow's shrinks about 100x."""
    g = torch.Generator().manual_seed(7)
    w, h, d = _randn(g, 1, 6), _randn(g, 1, 6), _randn(g, 1, 5)
    p = _randn(g, 1, 3 * 6 + 1)
    xk = float(spline_knots(w, 0.5, 1e-3)[0, 3])  # an interior knot of the spline on [-0.5, 0.5]

    def dlog_slope(fn, at):
        at = at.clone().requires_grad_(True)
        return torch.autograd.grad(fn(at).sum(), at)[0]

    def rq(x):
        return rq_spline(x, w.expand(len(x), -1), h.expand(len(x), -1), d.expand(len(x), -1), bound=0.5)[1]

    def smooth(x):
        return smooth_unit_map(x + 0.5, p.expand(len(x), -1))[1].log()

    jumps = {}
    for gap in (1e-3, 1e-5, 1e-7):
        pair = torch.tensor([xk - gap, xk + gap], dtype=F64)
        jumps[gap] = [float(j.diff().abs()) for j in (dlog_slope(rq, pair), dlog_slope(smooth, pair))]
    rq_j, sm_j = {k: v[0] for k, v in jumps.items()}, {k: v[1] for k, v in jumps.items()}
    assert rq_j[1e-7] > 1.0 and abs(rq_j[1e-7] - rq_j[1e-5]) <= 1e-3 * rq_j[1e-7]  # a finite jump, converged
    assert sm_j[1e-7] <= 1e-4 * sm_j[1e-3] * 1.01 and sm_j[1e-5] <= 1e-2 * sm_j[1e-3] * 1.01  # ~ gap
    assert sm_j[1e-7] <= 1e-5 * rq_j[1e-7]

    torch.manual_seed(0)
    rq_flow = CompactFlow([_randomise(CircularCoupling(2, bins=6, hidden=8, rotation=False), 1)], 2).double()
    sm_flow = CompactFlow([_randomise(CircularSmoothCoupling(2, components=4, hidden=8), 1)], 2).double()
    for flow, moves in ((rq_flow, True), (sm_flow, False)):
        steps = []
        for n in (400, 40000):
            grid = torch.linspace(-3.0, 3.0, n, dtype=F64)
            steps.append(float(_force_along(flow, 0.3, grid).diff().abs().max()))
        if moves:
            assert steps[1] >= 0.5 * steps[0] and steps[1] > 0.1  # the jump at a knot survives refinement
        else:
            assert steps[1] <= 0.02 * steps[0]  # continuous: shrinks with the grid step (100x)


def test_a_smooth_torus_flow_has_a_periodic_density_and_force_an_rq_one_only_a_periodic_density():
    """Across the seam (-pi vs the float below pi, in either angle) log q agrees for both circular flows; the
    force grad log q agrees for the smooth flow (every derivative matches at the seam) but jumps for the RQ one
    (its seam matches the slope, not the curvature)."""
    rq = [_randomise(CircularCoupling(2, bins=6, hidden=8, parity=i), 40 + i) for i in (0, 1)]
    sm = [_randomise(CircularSmoothCoupling(2, components=4, hidden=8, parity=i), 40 + i) for i in (0, 1)]
    other = torch.linspace(-3.0, 3.0, 7, dtype=F64)
    for layers, smooth in ((rq, False), (sm, True)):
        flow = CompactFlow(layers, 2).double()
        for axis in (0, 1):
            pts = [torch.stack([torch.full_like(other, v), other], 1)[:, [axis, 1 - axis]] for v in (-PI, BELOW_PI)]
            lq = [flow.log_prob(q).detach() for q in pts]
            assert (lq[1] - lq[0]).abs().max() <= 1e-10
            f0, f1 = (flow_force(flow, q)[:, axis] for q in pts)
            if smooth:
                assert (f1 - f0).abs().max() <= 1e-10  # measured 3e-16
            else:
                assert (f1 - f0).abs().min() > 1.0  # at every seam point (measured 3 .. 56, forces up to 12)


# --------------------------------------------------------------------------------------- compact-domain flows

def _torus_grid(n):
    a = -PI + 2 * PI / n * torch.arange(n, dtype=F64)
    return torch.cartesian_prod(a, a), (2 * PI / n) ** 2


@pytest.mark.parametrize("kind", ["rq", "smooth"])
def test_torus_density_of_a_circular_flow_integrates_to_one(kind):
    def layer(parity):
        if kind == "rq":
            return _randomise(CircularCoupling(2, bins=6, hidden=8, parity=parity), 10 + parity, 0.5)
        return _randomise(CircularSmoothCoupling(2, components=4, hidden=8, parity=parity), 10 + parity, 0.7)

    flow = CompactFlow([layer(0), Permutation.reverse(2), layer(1)], 2).double()
    x, cell = _torus_grid(320)
    with torch.no_grad():
        logq = flow.log_prob(x)
        # the periodic rectangle rule: within 1% for the piecewise-rational RQ density (measured 7e-4); the
        # smooth periodic density converges spectrally (measured 4e-14)
        assert abs(float(logq.exp().sum() * cell) - 1) <= (0.01 if kind == "rq" else 1e-9)
        assert logq.max() - logq.min() > 1.0  # far from the uniform density
        xs, lq = flow.sample_and_log_prob(64, generator=torch.Generator().manual_seed(0))
        assert ((xs >= -PI) & (xs < PI)).all() and (flow.log_prob(xs) - lq).abs().max() <= 1e-10


def test_interval_density_of_a_smooth_flow_integrates_to_one():
    layers = [_randomise(SmoothCoupling(2, components=4, hidden=8, parity=i), 20 + i, 0.7) for i in (0, 1)]
    flow = CompactFlow(layers, 2, domain="interval").double()
    n = 160
    a = (torch.arange(n, dtype=F64) + 0.5) / n  # midpoint rule on [0, 1]^2
    with torch.no_grad():
        logq = flow.log_prob(torch.cartesian_prod(a, a))
    assert abs(float(logq.exp().sum() / n**2) - 1) <= 0.01 and logq.max() - logq.min() > 1.0


def test_compact_flow_bad_configurations():
    with pytest.raises(ConfigError, match="domain 'real'"):
        CompactFlow([CouplingSpline(2)], 2)
    with pytest.raises(ConfigError, match="domain must be one of"):
        CompactFlow([SmoothCoupling(2)], 2, domain="sphere")
    with pytest.raises(ConfigError, match="acts on domain 'interval'"):
        CompactFlow([SmoothCoupling(2)], 2, domain="circle")
    flow = CompactFlow([SmoothCoupling(2)], 2, domain="interval")
    with pytest.raises(DataError, match="rescale"):
        flow.log_prob(torch.tensor([[0.5, 1.5]]))
    with pytest.raises(ConfigError, match="min_slope"):
        SmoothCoupling(2, min_slope=0.0)


@pytest.mark.parametrize("kind", ["rq", "smooth"])
def test_circular_flows_keep_float32_arithmetic_under_bf16_autocast(kind):
    torch.manual_seed(0)
    make = (lambda p: CircularCoupling(2, bins=8, hidden=32, parity=p)) if kind == "rq" else (
        lambda p: CircularSmoothCoupling(2, components=4, hidden=32, parity=p))
    flow = CompactFlow([_randomise(make(0), 50, 0.2), _randomise(make(1), 51, 0.2)], 2)
    x = (2 * torch.rand(256, 2) - 1) * PI
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logq = flow.log_prob(x)
        z = x
        for t in flow.transforms:
            z, _ = t(z)
        back = z
        for t in reversed(flow.transforms):
            back, _ = t.inverse(back)
    assert logq.dtype == torch.float32 and torch.isfinite(logq).all()
    assert wrap(back - x).abs().max() < 1e-4


# ----------------------------------------------------------------------------------------------- force matching

class _LogProb:
    def __init__(self, fn):
        self.log_prob = fn


class _LogProbModule(torch.nn.Module):
    def __init__(self, flow):
        super().__init__()
        self.flow = flow

    def forward(self, x):
        return self.flow.log_prob(x)


def test_flow_force_and_force_matching_gradients_are_exact():
    flow = CompactFlow([_randomise(CircularSmoothCoupling(2, components=2, hidden=4), 30),
                        _randomise(CircularSmoothCoupling(2, components=2, hidden=4, parity=1), 31)], 2).double()
    g = torch.Generator().manual_seed(8)
    x = (2 * torch.rand(6, 2, generator=g, dtype=F64) - 1) * 3.0
    force = flow_force(flow, x)
    eps = 1e-6
    for j in range(2):
        e = torch.zeros(2, dtype=F64)
        e[j] = eps
        with torch.no_grad():
            fd = (flow.log_prob(x + e) - flow.log_prob(x - e)) / (2 * eps)
        assert (force[:, j] - fd).abs().max() <= 1e-7
    target = _randn(g, 6, 2)
    params = dict(flow.named_parameters())
    name = "transforms.0.net.2.weight"

    wrapper = _LogProbModule(flow)

    def loss_of(wt):
        return force_matching_loss(_LogProb(lambda z: functional_call(wrapper, {"flow." + name: wt}, (z,))),
                                   x, target)

    # the parameter gradient of the force loss (a mixed second derivative of log q) against finite differences
    wt = params[name].detach().clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(loss_of(wt), wt)
    assert grad.abs().max() > 1e-3  # the weight does reach the loss
    assert torch.autograd.gradcheck(loss_of, (wt,), eps=1e-6, atol=1e-6)



def test_force_matching_training_reduces_the_force_error():
    torch.manual_seed(0)
    target = get_energy("torus_dihedral")
    flow = CompactFlow([CircularSmoothCoupling(2, components=3, hidden=8, parity=0),
                        CircularSmoothCoupling(2, components=3, hidden=8, parity=1)], 2).double()
    g = torch.Generator().manual_seed(1)
    x, held = ((2 * torch.rand(128, 2, generator=g, dtype=F64) - 1) * PI for _ in range(2))
    f_held = target.force(held)

    def error():
        return float(((flow_force(flow, held) - f_held) ** 2).sum(1).mean())

    before = error()
    objective = ForceMatchingObjective(flow, target)
    opt = torch.optim.Adam(flow.parameters(), lr=3e-2)
    for _ in range(40):
        opt.zero_grad()
        loss, logs = objective.loss(x)
        loss.backward()
        opt.step()
    after = error()
    assert before > 5 and after < 0.5 * before  # measured on held-out angles: about 10.7 -> 4.1


def test_force_matching_bad_input():
    flow = CompactFlow([SmoothCoupling(2)], 2, domain="interval")
    x = torch.full((3, 2), 0.5)
    with pytest.raises(ShapeError, match="same shape"):
        force_matching_loss(flow, x, torch.zeros(3, 3))
    with pytest.raises(DataError, match="non-finite"):
        force_matching_loss(flow, x, torch.full((3, 2), float("nan")))
    with pytest.raises(ConfigError, match="needs batches"):
        ForceMatchingObjective(flow).loss(x)
    with pytest.raises(ConfigError, match="log_prob"):
        ForceMatchingObjective(torch.nn.Linear(2, 2))
    loss, logs = ForceMatchingObjective(flow).loss((x, torch.zeros(3, 2)))
    assert loss.item() == pytest.approx(logs["force_mse"]) and loss.item() >= 0
