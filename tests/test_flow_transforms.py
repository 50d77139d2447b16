"""Property suite of the flow transforms (generated from FLOW_TRANSFORMS) and of the rational-quadratic spline:
round trips to 1e-10 in float64 on random and extreme inputs of each transform's domain (real line, circle,
interval), log-determinants against autograd's slogdet of the Jacobian, out-of-domain inputs as DataErrors, a
seeded fuzz of the spline with no NaN/inf, boundary derivatives 1 at +-B, and bad-input errors."""

from __future__ import annotations

import math

import pytest
import torch
from torch.autograd.functional import jacobian

from genkit.errors import ConfigError, DataError, ShapeError
from genkit.models.flows import (
    FLOW_TRANSFORMS,
    LULinear,
    NeuralSplineFlow,
    Permutation,
    half_swap_permutation,
    rq_spline,
    spline_knots,
)

NAMES = FLOW_TRANSFORMS.names()
F64 = torch.float64


def _extreme_inputs(t, x: torch.Tensor) -> torch.Tensor:
    """Per the transform's domain, mixed with the example's own inputs: on the real line far tails, exactly +-B
    (spline transforms) and 0; on the circle exactly -pi, the float below pi (the seam, the circular splines'
    end knots), 0 and +-pi/2; on the interval exactly 0 and 1, their float neighbours inside, and 1/2."""
    domain = getattr(t, "domain", "real")
    if domain == "circle":
        pi = math.pi
        vals = torch.tensor([-pi, math.nextafter(pi, 0), math.nextafter(-pi, 0), 0.0, pi / 2, -pi / 2, 1e-300],
                            dtype=F64)
    elif domain == "interval":
        vals = torch.tensor([0.0, 1.0, math.nextafter(1.0, 0), 5e-324, 1e-300, 0.5, 1 - 1e-15], dtype=F64)
    else:
        assert domain == "real", f"unknown domain {domain!r}"
        bound = float(getattr(t, "bound", 3.0))
        vals = torch.tensor([1e4, -1e4, bound, -bound, 0.0, bound * (1 - 1e-15), -bound * (1 - 1e-15)], dtype=F64)
    g = torch.Generator().manual_seed(5)
    rows = vals[torch.randint(len(vals), (24, x.shape[1]), generator=g)]
    return torch.cat([x, rows])


def _context(c: torch.Tensor | None, n: int) -> torch.Tensor | None:
    return None if c is None else c[torch.arange(n) % c.shape[0]]


def _gap(t, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``|a - b|``; on the circle the distance along it (``-pi`` and the float below ``pi`` are neighbours)."""
    d = a - b
    if getattr(t, "domain", "real") == "circle":
        d = torch.remainder(d + math.pi, 2 * math.pi) - math.pi
    return d.abs()


def _in_domain(t, x: torch.Tensor) -> bool:
    domain = getattr(t, "domain", "real")
    if domain == "circle":
        return bool(((x >= -math.pi) & (x < math.pi)).all())
    if domain == "interval":
        return bool(((x >= 0) & (x <= 1)).all())
    return True


def test_the_registry_holds_every_transform() -> None:
    assert set(NAMES) >= {"coupling_spline", "autoregressive_spline", "affine_coupling", "lu_linear", "permutation",
                          "circular_coupling", "smooth_coupling", "circular_smooth_coupling", "masked_coupling_spline"}


@pytest.mark.parametrize("parity", [0, 1])
def test_masked_coupling_is_zuko_two_pass_structure(parity: int) -> None:
    """The masked coupling layer is a two-degree-class MADE (zuko's NSF(passes=2)): the ceil(D/2) conditioning
    features (the first, or the last with parity 1) each get a spline of their own that no input moves (its
    Jacobian rows are diagonal and the same at every point), the others a spline conditioned on them alone."""
    from genkit.models.flows import MaskedCouplingSpline

    t = MaskedCouplingSpline(5, bins=5, bound=2.5, hidden=8, layers=2, parity=parity).double()
    _randomise_all(t)
    cond = [0, 1, 2] if parity == 0 else [2, 3, 4]
    trans = [i for i in range(5) if i not in cond]
    assert t.cond_idx.tolist() == cond
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, generator=g, dtype=F64)
    jac = torch.autograd.functional.jacobian(lambda v: t(v[None])[0][0], x)
    assert torch.count_nonzero(jac[cond][:, trans]) == 0  # no conditioning feature sees a transformed one
    assert torch.count_nonzero(jac[cond][:, cond] - torch.diag(torch.diagonal(jac[cond][:, cond]))) == 0
    assert torch.count_nonzero(jac[trans][:, trans] - torch.diag(torch.diagonal(jac[trans][:, trans]))) == 0
    assert (jac[trans][:, cond].abs() > 1e-6).any()  # the conditioning half does condition
    moved = x.clone()
    moved[trans] += 0.7  # moving the other features leaves the conditioning half's spline where it was
    jac2 = torch.autograd.functional.jacobian(lambda v: t(v[None])[0][0], moved)
    assert torch.allclose(jac2[cond][:, cond], jac[cond][:, cond], rtol=0, atol=1e-14)
    assert not torch.allclose(torch.diagonal(jac[cond][:, cond]), torch.ones(3, dtype=F64))  # a spline, not id


@pytest.mark.parametrize("features, context", [(5, 0), (13, 3)])
def test_masked_coupling_first_layer_starts_at_the_scale_of_all_inputs(features: int, context: int) -> None:
    """Like zuko's masked conditioner, which reads every feature: the first layer's weights and biases are
    U(+-1/sqrt(D + C)) (torch's default for D + C inputs), not U(+-1/sqrt(ceil(D/2) + C)) of the inputs it reads."""
    from genkit.models.flows import CouplingSpline, MaskedCouplingSpline

    torch.manual_seed(0)
    first = MaskedCouplingSpline(features, context, hidden=256, layers=2).net[0]
    plain = CouplingSpline(features, context, hidden=256, layers=2).net[0]
    bound = 1 / math.sqrt(features + context)
    for p in (first.weight, first.bias):
        assert p.abs().max() <= bound and p.abs().max() > 0.9 * bound
    assert plain.weight.abs().max() > 1.1 * bound  # the half-split layer keeps the scale of what it reads


def _randomise_all(module: torch.nn.Module) -> None:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=g, dtype=p.dtype))


@pytest.mark.parametrize("name", NAMES)
def test_domain_is_declared_and_enforced(name: str) -> None:
    t, x, c = FLOW_TRANSFORMS.get(name).example()
    assert t.domain in ("real", "circle", "interval") and _in_domain(t, x)
    if t.domain == "real":
        return
    outside = [math.pi, 4.0, -3.5] if t.domain == "circle" else [1.0 + 1e-12, -1e-300, 2.0]
    fix = "wrap" if t.domain == "circle" else "rescale"
    for v in outside:
        bad = x.clone()
        bad[1, -1] = v
        for direction in (t.forward, t.inverse):
            with pytest.raises(DataError, match=fix):
                direction(bad, c)


@pytest.mark.parametrize("name", NAMES)
def test_round_trip_random_and_extreme(name: str) -> None:
    t, x, c = FLOW_TRANSFORMS.get(name).example()
    assert not torch.allclose(t(x, c)[0], x)  # the example is not the identity
    for extreme, inp in ((False, x), (True, _extreme_inputs(t, x))):
        ctx = _context(c, inp.shape[0])
        y, ld = t(inp, ctx)
        x2, ld2 = t.inverse(y, ctx)
        assert ld.shape == (inp.shape[0],) and torch.isfinite(y).all() and torch.isfinite(ld).all()
        assert torch.isfinite(x2).all() and torch.isfinite(ld2).all()
        assert _in_domain(t, y) and _in_domain(t, x2)  # the transform maps its domain onto itself
        assert _gap(t, t(x2, ctx)[0], y).max() <= 1e-10  # the inverse solves f(x) = y
        # sampling direction first: inverse, then forward, recovers the input
        z, lz = t.inverse(inp, ctx)
        x3, lz2 = t(z, ctx)
        assert _gap(t, x3, inp).max() <= 1e-10 and (lz + lz2).abs().max() <= 1e-10
        if not extreme:
            assert _gap(t, x2, inp).max() <= 1e-10 and (ld + ld2).abs().max() <= 1e-10
        # With 1e4 in a conditioning feature the conditioner emits parameters of order 1e3-1e4 and the spline
        # can have slope ~1e-9 at the input: recovering x from y then loses |dx/dy| * eps * |y|, which no
        # algorithm avoids, so x -> y -> x is held to that condition number (the residual above is exact).
        cond = torch.exp(-ld.clamp(max=0))[:, None]
        assert (_gap(t, x2, inp) <= 1e-10 * torch.maximum(cond, torch.ones_like(cond))).all()


@pytest.mark.parametrize("name", NAMES)
def test_logdet_equals_autograd_slogdet(name: str) -> None:
    t, x, c = FLOW_TRANSFORMS.get(name).example()
    for i in range(3):
        ci = None if c is None else c[i:i + 1]
        for direction in (t.forward, t.inverse):
            jac = jacobian(lambda v, f=direction, ci=ci: f(v[None], ci)[0][0], x[i])
            sign, logabs = torch.linalg.slogdet(jac)
            assert sign != 0
            assert abs(float(direction(x[i:i + 1], ci)[1][0].detach() - logabs)) <= 1e-10


@pytest.mark.parametrize("name", NAMES)
def test_wrong_inputs_and_contexts_are_shape_errors(name: str) -> None:
    t, x, c = FLOW_TRANSFORMS.get(name).example()
    with pytest.raises(ShapeError, match="expects inputs"):
        t(x[:, :-1], c)
    if t.context_features:
        with pytest.raises(ShapeError, match="expects context"):
            t(x, torch.zeros(x.shape[0], t.context_features + 1, dtype=F64))
        with pytest.raises(ShapeError, match="pass context"):
            t.inverse(x)
    else:
        with pytest.raises(ShapeError, match="takes no context"):
            t(x, torch.zeros(x.shape[0], 2, dtype=F64))


def test_autoregressive_outputs_depend_only_on_earlier_features() -> None:
    t, x, c = FLOW_TRANSFORMS.get("autoregressive_spline").example()
    jac = jacobian(lambda v: t(v[None], c[:1])[0][0], x[0])
    assert torch.equal(jac.triu(1), torch.zeros_like(jac)) and (jac.diagonal() > 0).all()


def test_permutations() -> None:
    x = torch.arange(4.0)[None]
    assert Permutation.reverse(4)(x)[0].tolist() == [[3.0, 2.0, 1.0, 0.0]]
    assert torch.equal(Permutation.random(4, seed=1).perm, Permutation.random(4, seed=1).perm)
    with pytest.raises(ConfigError, match="permutation of 0..n-1"):
        Permutation(torch.tensor([0, 0, 1]))


@pytest.mark.parametrize("features, conditioning", [(2, 1), (5, 2), (5, 3), (8, 4), (13, 6), (13, 7)])
def test_half_swap_permutation_sends_the_transformed_half_to_the_condition(features: int, conditioning: int) -> None:
    """Two couplings that condition on the first ``conditioning`` features with ``P`` between them: each
    feature one of them conditioned on is transformed by the other, as much as the sizes allow."""
    for seed in range(4):
        perm = half_swap_permutation(features, conditioning, seed)
        assert sorted(perm.tolist()) == list(range(features))
        k = min(conditioning, features - conditioning)
        assert (perm[:k] >= conditioning).all()  # the conditioning positions take what was transformed
        conditioned_twice = set(perm[:conditioning].tolist()) & set(range(conditioning))
        assert len(conditioned_twice) == conditioning - k  # only where the condition outnumbers the rest
        assert torch.equal(perm, half_swap_permutation(features, conditioning, seed))
    assert half_swap_permutation(2, 1).tolist() == [1, 0]
    with pytest.raises(ConfigError, match="conditioning must be an int in 1..4"):
        half_swap_permutation(5, 5)
    with pytest.raises(ConfigError, match="LULinear perm must be a permutation"):
        LULinear(3, perm=torch.tensor([0, 0, 1]))


def test_nsf_lu_mixing_alternates_the_halves_at_initialisation() -> None:
    """The nsf default (LULinear between couplings, L U = I at the start): across consecutive layers every
    feature is transformed by one of any two consecutive couplings (a random ``P`` draws the identity for half
    the seeds in 2-D: the next coupling transforms the same feature again)."""
    for seed in range(6):
        flow = NeuralSplineFlow(2, layers=3, hidden=8, seed=seed).flow
        mixing = [t for t in flow.transforms if isinstance(t, LULinear)]
        assert len(mixing) == 2 and all(t.perm.tolist() == [1, 0] for t in mixing)
        flow5 = NeuralSplineFlow(5, layers=2, hidden=8, seed=seed, transform="masked_coupling").flow
        (lu,) = [t for t in flow5.transforms if isinstance(t, LULinear)]
        assert set(lu.perm[:2].tolist()) == {3, 4}


# ----------------------------------------------------------------------------------------------- the spline

def _params(n: int, k: int, scale: float, seed: int, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    return tuple(scale * torch.randn(n, m, generator=g, dtype=dtype) for m in (k, k, k - 1))


def test_spline_interpolates_knots_and_round_trips_on_them() -> None:
    for scale in (1.0, 50.0):
        w, h, d = _params(6, 7, scale, 0)
        for sign_w, sign_h in ((1, 1), (1, -1), (-1, 1)):
            w_, h_ = sign_w * w, sign_h * h
            xk, yk = spline_knots(w_, 2.0, 1e-3), spline_knots(h_, 2.0, 1e-3)
            n = xk.shape[-1]
            p = [q[:, None].expand(-1, n, -1) for q in (w_, h_, d)]
            y, ld = rq_spline(xk, *p, bound=2.0)
            assert (y - yk).abs().max() <= 1e-12  # f(x_k) = y_k, exactly on the bin edges
            x2, ld2 = rq_spline(y, *p, bound=2.0, inverse=True)
            assert (x2 - xk).abs().max() <= 1e-10 and (ld + ld2).abs().max() <= 1e-10
            x3, _ = rq_spline(yk, *p, bound=2.0, inverse=True)  # the inverse on the y-knots
            assert (x3 - xk).abs().max() <= 1e-10


def test_spline_knots_are_not_mutated_and_ends_are_exact() -> None:
    w, d = torch.randn(3, 5, dtype=F64), torch.randn(3, 4, dtype=F64)
    knots = spline_knots(w, 1.5, 1e-3)
    x = torch.stack([knots[0, -1], knots[1, 2], knots[2, 0]])  # +B, an interior knot, -B
    saved = [t.clone() for t in (w, d, x)]
    for inverse in (False, True):
        rq_spline(x, w, w, d, bound=1.5, inverse=inverse)
    assert all(torch.equal(a, b) for a, b in zip(saved, (w, d, x)))  # inputs and parameters untouched
    assert torch.equal(spline_knots(w, 1.5, 1e-3), knots)
    assert knots[:, 0].eq(-1.5).all() and knots[:, -1].eq(1.5).all()
    assert (knots.diff(dim=-1) >= 3 * 1e-3 * (1 - 1e-9)).all()  # the width floor, times 2B


def test_boundary_derivative_is_one_and_tails_are_identity() -> None:
    w, h, d = _params(4, 6, 3.0, 1)
    x = torch.tensor([-3.0, 3.0, -1e4, 7.5], dtype=F64)
    y, ld = rq_spline(x, w, h, d, bound=3.0)
    assert torch.equal(y, x) and ld.abs().max() <= 1e-12
    for b in (-3.0, 3.0):
        xb = torch.full((4,), b, dtype=F64, requires_grad=True)
        y, ld = rq_spline(xb, w, h, d, bound=3.0)  # +-B are inside: the spline formula itself is evaluated
        (slope,) = torch.autograd.grad(y.sum(), xb)
        assert (slope - 1).abs().max() <= 1e-12 and ld.abs().max() <= 1e-12
        inner = rq_spline(xb.detach() - 1e-11 * b, w, h, d, bound=3.0)[1]  # and the limit from inside
        assert (inner.exp() - 1).abs().max() <= 1e-5


def test_spline_gradient_reaches_parameters_only_from_inside_points() -> None:
    w, h, d = (p.requires_grad_() for p in _params(2, 4, 1.0, 2))
    y, ld = rq_spline(torch.tensor([5.0, 0.5], dtype=F64), w, h, d, bound=3.0)
    (y.sum() + ld.sum()).backward()
    assert w.grad[0].abs().max() == 0 and w.grad[1].abs().max() > 0


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_spline_fuzz_has_no_nan_or_inf(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(123)
    tol = 2e4 * torch.finfo(dtype).eps
    cases = 0
    for it in range(40):
        k = int(torch.randint(1, 20, (1,), generator=g))
        bound = float(torch.empty(1).uniform_(0.1, 10, generator=g))
        scale = [0.1, 1.0, 10.0, 50.0][it % 4]
        n = 100
        w, h, d = (scale * torch.randn(n, m, generator=g, dtype=dtype) for m in (k, k, k - 1))
        x = bound * (2.4 * torch.rand(n, generator=g, dtype=dtype) - 1.2)
        pick = torch.arange(10), torch.randint(k + 1, (10,), generator=g)
        x[:10] = spline_knots(w[:10], bound, 1e-3)[pick]  # exactly on x-knots (forward's bin edges)
        x[10:20] = spline_knots(h[10:20], bound, 1e-3)[pick]  # and on y-knots (the inverse's)
        x[20:24] = torch.tensor([-bound, bound, 1e4, -1e4], dtype=dtype)
        for inverse in (False, True):
            y, ld = rq_spline(x, w, h, d, bound=bound, inverse=inverse)
            assert torch.isfinite(y).all() and torch.isfinite(ld).all()
            x2, ld2 = rq_spline(y, w, h, d, bound=bound, inverse=not inverse)
            assert torch.isfinite(x2).all() and torch.isfinite(ld2).all()
            # x -> y -> x loses about eps * |y| * |dx/dy| where the first map is steep or flat (slopes reach
            # 1e-9 .. 1e5 at scale 50), so the error is held relative to 1 + exp(-ld); measured worst on this
            # seed: 2.5e-12 (float64), 6.1e-4 (float32), about 1e4 ulp, from the inverse's quadratic at scale 50
            assert ((x2 - x).abs() <= tol * bound * (1 + torch.exp(-ld))).all()
            cases += n
    assert cases >= 8000


def test_spline_bad_options_are_config_errors() -> None:
    w, h, d = _params(2, 4, 1.0, 3)
    x = torch.zeros(2, dtype=F64)
    with pytest.raises(ConfigError, match="bound=0"):
        rq_spline(x, w, h, d, bound=0)
    with pytest.raises(ConfigError, match="bound=-1"):
        rq_spline(x, w, h, d, bound=-1.0)
    with pytest.raises(ConfigError, match="min_width=0.25"):
        rq_spline(x, w, h, d, min_width=0.25)
    with pytest.raises(ConfigError, match="min_height=0.3"):
        rq_spline(x, w, h, d, min_height=0.3)
    with pytest.raises(ShapeError, match="derivatives"):
        rq_spline(x, w, h, d[:, :-1])
    with pytest.raises(ConfigError, match="bound"):
        FLOW_TRANSFORMS.get("coupling_spline")(2, bound=-2.0)
    with pytest.raises(ConfigError, match="min_width"):
        FLOW_TRANSFORMS.get("autoregressive_spline")(2, bins=1001)
