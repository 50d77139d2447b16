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
