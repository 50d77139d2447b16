import torch

from genkit.models.flows.roots import bracketed_inverse, inverse


def _f(x, a, b):
    # increasing on R for a > 0: a * x + b * tanh(x) with b > -a... keep b > 0
    return a * x + b * torch.tanh(x), a + b * (1 - torch.tanh(x) ** 2)


def test_bracketed_inverse_solves_to_tolerance():
    a = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    b = torch.tensor([3.0, 0.1, 1.0], dtype=torch.float64)
    y = torch.tensor([-1.0, 0.3, 2.5], dtype=torch.float64)
    x = bracketed_inverse(lambda z: _f(z, a, b), y, -10.0, 10.0, tol=1e-13)
    assert (_f(x, a, b)[0] - y).abs().max() < 1e-12


def test_inverse_gradients_match_finite_differences():
    a = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64, requires_grad=True)
    b = torch.tensor([3.0, 0.1, 1.0], dtype=torch.float64, requires_grad=True)
    y = torch.tensor([-1.0, 0.3, 2.5], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda y, a, b: inverse(_f, y, -10.0, 10.0, a, b, tol=1e-14),
                                    (y, a, b), eps=1e-6, atol=1e-7)


import math  # noqa: E402

import pytest  # noqa: E402

from genkit.errors import DataError  # noqa: E402
from genkit.models.flows.circular import circular_rq_spline  # noqa: E402


def _params(n, k=6):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(n, k, generator=g, dtype=torch.float64), torch.randn(n, k, generator=g, dtype=torch.float64),
            torch.randn(n, k - 1, generator=g, dtype=torch.float64))


def test_circular_spline_periodic_and_invertible():
    w, h, d = _params(2)
    seam = torch.tensor([-math.pi, math.nextafter(math.pi, 0)], dtype=torch.float64, requires_grad=True)
    wp, hp, dp = w[:1].expand(2, -1), h[:1].expand(2, -1), d[:1].expand(2, -1)
    y, lad = circular_rq_spline(seam, wp, hp, dp)
    assert abs((y[1] - y[0]).item() - 2 * math.pi) < 1e-10
    assert abs((lad[1] - lad[0]).item()) < 1e-10
    x = torch.rand(2, dtype=torch.float64) * 2 * math.pi - math.pi
    y, lad = circular_rq_spline(x, w, h, d)
    xb, ladi = circular_rq_spline(torch.remainder(y + math.pi, 2 * math.pi) - math.pi, w, h, d, inverse=True)
    assert (xb - x).abs().max() < 1e-10
    assert (lad + ladi).abs().max() < 1e-10


def test_circular_spline_rejects_outside_angles():
    w, h, d = _params(1)
    with pytest.raises(DataError, match="wrap"):
        circular_rq_spline(torch.tensor([4.0], dtype=torch.float64), w, h, d)
