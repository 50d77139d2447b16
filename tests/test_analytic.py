"""Analytic fields against Monte Carlo and autograd: they are the ground truth of everything else."""

import pytest
import torch

from genkit.analytic import Gaussian, GaussianMixture
from genkit.errors import ConfigError, ShapeError
from genkit.paths import PATHS, get_path


def _gmm(path, prediction="velocity"):
    w = torch.tensor([0.3, 0.7])
    m = torch.tensor([[-2.0, 0.0], [1.5, 1.0]])
    c = torch.stack([torch.tensor([[0.3, 0.1], [0.1, 0.2]]), torch.tensor([[0.5, -0.2], [-0.2, 0.4]])])
    return GaussianMixture(w, m, c, path, prediction)


@pytest.mark.parametrize("name", PATHS.names())
def test_score_is_grad_log_prob(name):
    p = get_path(name)
    gm = _gmm(p, "score")
    x = torch.randn(6, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
    t = torch.full((6,), 0.4, dtype=torch.float64)
    (g,) = torch.autograd.grad(gm.log_prob(x, t).sum(), x)
    torch.testing.assert_close(gm(x.detach(), t), g, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("name", PATHS.names())
def test_predictions_agree_through_the_path(name):
    p = get_path(name)
    x = torch.randn(6, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    t = torch.linspace(0.1, 0.9, 6, dtype=torch.float64)
    ref = _gmm(p, "eps")(x, t)
    for pred in ("x0", "velocity", "v", "score"):
        out = _gmm(p, pred)(x, t)
        torch.testing.assert_close(p.convert(out, x, t, pred, "eps"), ref, rtol=1e-7, atol=1e-7)


def test_x0_posterior_mean_matches_monte_carlo():
    """E[x0 | x_t] by importance sampling over the prior equals the closed form."""
    p = get_path("linear")
    gm = _gmm(p, "x0")
    g = torch.Generator().manual_seed(3)
    x0 = gm.sample(400_000, generator=g, dtype=torch.float64)
    t = 0.6
    xt = torch.tensor([[0.2, 0.5]], dtype=torch.float64)
    a, s = 1 - t, t
    logw = -0.5 * ((xt - a * x0) ** 2).sum(1) / s ** 2
    w = torch.softmax(logw, 0)
    mc = (w[:, None] * x0).sum(0)
    torch.testing.assert_close(gm(xt, t)[0], mc, rtol=0, atol=1e-2)


def test_marginal_moments_and_exact_flow():
    p = get_path("cosine")
    g = Gaussian(torch.tensor([1.0, -1.0]), torch.tensor([[1.0, 0.3], [0.3, 0.5]]), p)
    x = g.sample(200_000, t=0.5, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    torch.testing.assert_close(x.mean(0), g.mean(0.5), atol=1e-2, rtol=0)
    torch.testing.assert_close(torch.cov(x.T), g.covariance(0.5), atol=2e-2, rtol=0)
    # the exact flow pushes the t=0.5 marginal to the t=0.1 marginal and is invertible
    y = g.exact_flow(x, 0.5, 0.1)
    torch.testing.assert_close(torch.cov(y.T), g.covariance(0.1), atol=2e-2, rtol=0)
    torch.testing.assert_close(g.exact_flow(y, 0.1, 0.5), x, atol=1e-10, rtol=0)


def test_exact_flow_solves_the_ode():
    """d/ds of the exact flow equals the velocity field along it."""
    p = get_path("linear")
    g = Gaussian(torch.tensor([0.5, 2.0]), torch.tensor([[2.0, 0.4], [0.4, 0.7]]), p)
    x1 = torch.randn(5, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    s, h = 0.4, 1e-6
    d = (g.exact_flow(x1, 1.0, s + h) - g.exact_flow(x1, 1.0, s - h)) / (2 * h)
    torch.testing.assert_close(d, g(g.exact_flow(x1, 1.0, s), s), rtol=1e-6, atol=1e-6)


def test_bad_input():
    p = get_path("linear")
    with pytest.raises(ShapeError):
        Gaussian(torch.zeros(2), torch.eye(3), p)
    with pytest.raises(ConfigError, match="positive definite"):
        Gaussian(torch.zeros(2), torch.zeros(2, 2), p)
    with pytest.raises(ConfigError, match="sum to 1"):
        GaussianMixture(torch.tensor([0.5, 0.6]), torch.zeros(2, 1), torch.ones(2, 1, 1), p)
    with pytest.raises(ShapeError, match=r"\[batch, 2\]"):
        _gmm(p)(torch.zeros(3, 4), 0.5)
    with pytest.raises(ConfigError, match="single Gaussian"):
        _gmm(p).exact_flow(torch.zeros(1, 2), 1.0, 0.0)
