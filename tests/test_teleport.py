"""Analytic teleportation: exact against closed-form flows, explicit data-range rescaling, harmless early
skips and harmful late ones on a Gaussian mixture, steps saved at equal error, and bad input."""

import math

import pytest
import torch

from genkit.analytic import Gaussian, GaussianMixture
from genkit.errors import ConfigError, DataError, ShapeError, TimeGridError
from genkit.gaussian_fit import GaussianFit, GaussianFlowMap, fit_gaussian
from genkit.metrics import mmd
from genkit.paths import get_path
from genkit.solvers.base import solve
from genkit.solvers.grids import Karras
from genkit.solvers.teleport import StepsSaved, steps_saved, teleport, teleport_solve


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _random_gaussian(dim, seed=0):
    a = torch.randn(dim, dim, generator=_gen(seed), dtype=torch.float64)
    return torch.randn(dim, generator=_gen(seed + 1), dtype=torch.float64), a @ a.T / dim + 0.05 * torch.eye(dim)


@pytest.mark.parametrize("path", ["linear", "cosine", "ddpm", "ve"])
def test_full_rank_teleport_is_the_exact_flow(path):
    p = get_path(path)
    mean, cov = _random_gaussian(6)
    fit = GaussianFit.from_moments(mean, cov)
    x1 = p.sample_prior((32, 6), generator=_gen(3), dtype=torch.float64)
    exact = Gaussian(mean, cov, p).exact_flow(x1, 1.0, 0.3)
    torch.testing.assert_close(teleport(fit, p, x1, 0.3), exact, atol=1e-6, rtol=0)
    flow = GaussianFlowMap(fit, p)  # a flow map: composes, and takes per-sample times
    torch.testing.assert_close(flow(flow(x1, 1.0, 0.6), 0.6, 0.3), exact, atol=1e-6, rtol=0)
    torch.testing.assert_close(flow(x1, torch.ones(32, dtype=torch.float64), 0.3), exact, atol=1e-6, rtol=0)


def test_fit_from_samples_matches_the_sample_moments():
    mean, cov = _random_gaussian(5, seed=4)
    data = mean + torch.randn(3000, 5, generator=_gen(5), dtype=torch.float64) @ torch.linalg.cholesky(cov).T
    fit = fit_gaussian(data)
    torch.testing.assert_close(fit.mean, data.mean(0))
    torch.testing.assert_close(fit.covariance(), torch.cov(data.T))
    assert fit.rank == 5 and bool((fit.eigvals[:-1] >= fit.eigvals[1:]).all())
    # fewer samples than dimensions: the SVD route gives the same empirical covariance
    few = data[:4].reshape(4, 5)
    wide = torch.cat([few, few ** 2, few.sin()], 1)  # [4, 15]
    torch.testing.assert_close(fit_gaussian(wide).covariance(), torch.cov(wide.T))
    torch.testing.assert_close(fit_gaussian(wide, rank=2).covariance(),
                               GaussianFit.from_moments(wide.mean(0), torch.cov(wide.T), rank=2).covariance())


@pytest.mark.parametrize("path", ["linear", "ve"])
def test_low_rank_teleport_is_the_flow_of_low_rank_plus_isotropic(path):
    p = get_path(path)
    mean, cov = _random_gaussian(8, seed=6)
    data = mean + torch.randn(4000, 8, generator=_gen(7), dtype=torch.float64) @ torch.linalg.cholesky(cov).T
    fit = fit_gaussian(data, rank=3)
    lam = torch.linalg.eigvalsh(torch.cov(data.T)).flip(0)
    assert fit.rank == 3 and math.isclose(fit.residual, float(lam[3:].mean()), rel_tol=1e-9)  # probabilistic PCA
    x1 = p.sample_prior((32, 8), generator=_gen(8), dtype=torch.float64)
    U = fit.eigvecs
    low_plus_iso = (U * fit.eigvals) @ U.T + fit.residual * (torch.eye(8, dtype=torch.float64) - U @ U.T)
    torch.testing.assert_close(teleport(fit, p, x1, 0.2), Gaussian(fit.mean, low_plus_iso, p).exact_flow(x1, 1.0, 0.2),
                               atol=1e-6, rtol=0)
    # residual 0 (Wang & Vastola's code): the complement scales by sigma_s / sigma_t
    zero = fit_gaussian(data, rank=3, residual=0.0)
    out = teleport(zero, p, x1, 0.2)
    def perp(z):
        return z - z @ U @ U.T

    ratio = float(p.sigma(0.2) / p.sigma(1.0))
    torch.testing.assert_close(perp(out - float(p.alpha(0.2)) * zero.mean),
                               ratio * perp(x1 - float(p.alpha(1.0)) * zero.mean), atol=1e-6, rtol=0)


def test_data_range_rescale_is_explicit():
    u = torch.rand(2000, 2, 3, generator=_gen(9), dtype=torch.float64) ** 2  # pixels in [0, 1], shape [N, 2, 3]
    raw = fit_gaussian(u)
    fit = fit_gaussian(u, data_range=(0, 1))
    torch.testing.assert_close(fit.mean, 2 * raw.mean - 1)
    torch.testing.assert_close(fit.eigvals, 4 * raw.eigvals)
    torch.testing.assert_close(fit.covariance(), 4 * torch.cov(u.reshape(2000, 6).T))
    torch.testing.assert_close(fit.covariance(), fit_gaussian(2 * u - 1).covariance())
    torch.testing.assert_close(fit_gaussian(255 * u, data_range=(0, 255)).mean, fit.mean)
    low = fit_gaussian(u, rank=2, data_range=(0, 1))
    assert math.isclose(low.residual, 4 * fit_gaussian(u, rank=2).residual, rel_tol=1e-9)
    moments = GaussianFit.from_moments(raw.mean, raw.covariance(), data_range=(0, 1))
    torch.testing.assert_close(moments.covariance(), fit.covariance())
    assert fit.event_shape == (2, 3) and teleport(fit, get_path("linear"), torch.randn(4, 2, 3), 0.5).shape == (4, 2, 3)
    with pytest.raises(DataError, match=r"outside data_range=\(0, 1\).*data_range=None"):
        fit_gaussian(2 * u - 1, data_range=(0, 1))  # already in [-1, 1]: the silent bug, caught


def test_teleport_then_solve_reproduces_the_full_solve():
    p = get_path("linear")
    mean, cov = _random_gaussian(3, seed=10)
    field = Gaussian(mean, cov, p)
    fit = GaussianFit.from_moments(mean, cov)
    x1 = p.sample_prior((16, 3), generator=_gen(11), dtype=torch.float64)
    exact = field.exact_flow(x1, 1.0, 0.0)
    full = solve(field, x1, "rk4", 40).samples
    for grid in ("uniform", Karras(), None):
        times = torch.linspace(0.6, 0.0, 31, dtype=torch.float64) if grid is None else grid
        sol = teleport_solve(field, fit, x1, 0.6, "rk4", None if grid is None else 30, times)
        assert float(sol.times[0]) == 0.6 and sol.nfe == 4 * 30
        torch.testing.assert_close(sol.samples, exact, atol=1e-6, rtol=0)
        torch.testing.assert_close(sol.samples, full, atol=1e-6, rtol=0)
    same = teleport_solve(field, fit, x1, 1.0, "heun", 8)  # t_skip = t_start: the plain solve
    assert torch.equal(same.samples, solve(field, x1, "heun", 8).samples)


def _ring(path, k=8):
    ang = torch.arange(k) * 2 * math.pi / k
    gm = GaussianMixture(torch.ones(k) / k, 1.5 * torch.stack([ang.cos(), ang.sin()], 1),
                         torch.eye(2).expand(k, 2, 2) * 0.04, get_path(path))
    return gm, GaussianFit.from_moments(gm.mean(), gm.covariance())  # the fit: the mixture's own moments


def test_mixture_early_skips_are_harmless_late_skips_hurt():
    gm, fit = _ring("linear")
    x1 = gm.path.sample_prior((300, 2), generator=_gen(0), dtype=torch.float64)
    data = gm.sample(600, generator=_gen(1), dtype=torch.float64)
    full = solve(gm, x1, "heun", 24).samples
    skips = [0.9, 0.7, 0.5, 0.3, 0.1]
    outs = [teleport_solve(gm, fit, x1, t, "heun", 24).samples for t in skips]
    dev = [(o - full).square().sum(1).mean().sqrt().item() for o in outs]
    assert all(a < b for a, b in zip(dev[:-1], dev[1:])), dev  # monotone in how far we jump
    assert dev[0] < 1e-3 and dev[-1] > 0.3, dev
    base = mmd(full, data)
    # MMD to data: unchanged by an early skip (base is the 300-sample floor), several times worse late
    assert abs(mmd(outs[0], data) - base) < 0.01 * base and mmd(outs[-1], data) > 3 * base


def test_steps_saved_on_a_mixture():
    gm, fit = _ring("linear")
    x1 = gm.path.sample_prior((300, 2), generator=_gen(0), dtype=torch.float64)
    reference = solve(gm, x1, "rk4", 100).samples
    res = steps_saved(gm, fit, x1, "heun", [4, 6, 8, 12, 16], [0.9, 0.8], reference, "karras")
    assert isinstance(res, StepsSaved) and res.t_skips == [1.0, 0.9, 0.8] and res.errors.shape == (3, 5)
    torch.testing.assert_close(res.saved[0], torch.zeros(5, dtype=torch.float64), atol=1e-9, rtol=0)
    saved_09 = res.saved[1][~res.saved[1].isnan()]
    assert len(saved_09) >= 3 and bool((saved_09 > 0.2).all()), str(res)  # >= 20% fewer steps at equal error
    best, t_skip, _ = res.best()
    assert best > 0.3 and t_skip in (0.9, 0.8)
    assert "steps saved" in str(res)


def test_bad_input():
    p = get_path("linear")
    mean, cov = _random_gaussian(4)
    fit = GaussianFit.from_moments(mean, cov)
    x1 = torch.randn(5, 4, dtype=torch.float64)
    for t_skip in (0.0, -0.1, 1.5):
        with pytest.raises(ConfigError, match=r"t_skip must lie in \(0, t_start\]"):
            teleport(fit, p, x1, t_skip)
    with pytest.raises(ShapeError, match=r"4 numbers per sample.*\(5, 3\)"):
        teleport(fit, p, torch.randn(5, 3), 0.5)
    with pytest.raises(ShapeError, match=r"mean \[D\] and cov \[D, D\]"):
        GaussianFit.from_moments(mean, cov[:3])
    data = torch.randn(50, 4, generator=_gen(0), dtype=torch.float64)
    for rank in (0, 5, 2.0):
        with pytest.raises(ConfigError, match=r"rank must be an integer in \[1, 4\]"):
            fit_gaussian(data, rank=rank)
    with pytest.raises(ConfigError, match="exceeds the 3 samples"):
        fit_gaussian(torch.randn(3, 10), rank=5)
    with pytest.raises(ConfigError, match="low-rank fit only"):
        fit_gaussian(data, residual=0.1)
    with pytest.raises(ConfigError, match="low < high"):
        fit_gaussian(data, data_range=(1, 0))
    with pytest.raises(ShapeError, match=r"\[N, \*event\]"):
        fit_gaussian(torch.randn(10))
    with pytest.raises(DataError, match="NaN"):
        fit_gaussian(torch.cat([data, torch.full((1, 4), math.nan, dtype=torch.float64)]))
    field = Gaussian(mean, cov, p)
    with pytest.raises(ConfigError, match="must start at t_skip=0.5"):
        teleport_solve(field, fit, x1, 0.5, "heun", None, [0.6, 0.3, 0.0])
    with pytest.raises(TimeGridError):
        teleport_solve(field, fit, x1, 0.5, "heun", 4, Karras(t_min=0.7))
    with pytest.raises(ConfigError, match="at least two"):
        steps_saved(field, fit, x1, "heun", [4], [0.8], x1)


def test_the_deprecated_module_still_works_and_says_where_things_went():
    import importlib
    import sys

    import genkit

    sys.modules.pop("genkit.teleport", None)
    with pytest.warns(DeprecationWarning, match="genkit.gaussian_fit.*genkit.solvers.teleport"):
        old = importlib.import_module("genkit.teleport")
    assert old.GaussianFit is GaussianFit and old.teleport_solve is teleport_solve
    # importing the module binds it to genkit.teleport, where the function was: it still calls as the function
    fit = GaussianFit.from_moments(torch.tensor([2.0], dtype=torch.float64), torch.eye(1, dtype=torch.float64))
    x1 = torch.zeros(3, 1, dtype=torch.float64)
    assert torch.equal(genkit.teleport(fit, get_path("linear"), x1, 0.5), teleport(fit, get_path("linear"), x1, 0.5))
