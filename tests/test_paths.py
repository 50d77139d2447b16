"""Paths: conversions round-trip, schedules match their closed forms and diffusers' DDPM."""

import math

import pytest
import torch

from genkit.errors import ConfigError, ShapeError
from genkit.paths import PATHS, PREDICTIONS, get_path, path_from_config

PATH_NAMES = PATHS.names()
T = torch.tensor([0.05, 0.2, 0.5, 0.8, 0.95], dtype=torch.float64)


@pytest.mark.parametrize("name", PATH_NAMES)
@pytest.mark.parametrize("src", PREDICTIONS)
@pytest.mark.parametrize("dst", PREDICTIONS)
def test_conversions_round_trip(name, src, dst):
    p = get_path(name)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(5, 3, generator=g, dtype=torch.float64)
    eps = torch.randn(5, 3, generator=g, dtype=torch.float64)
    x = p.sample(x0, T, eps)
    out = p.from_x0_eps(x0, eps, x, T, src)
    there = p.convert(out, x, T, src, dst)
    # the conversion agrees with the ground truth and comes back unchanged
    torch.testing.assert_close(there, p.from_x0_eps(x0, eps, x, T, dst), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(p.convert(there, x, T, dst, src), out, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", PATH_NAMES)
def test_conversion_coefficients_are_the_conversion(name):
    """Solvers precompute convert() as the affine map cx * x + cout * out; it must be the same map."""
    p = get_path(name)
    g = torch.Generator().manual_seed(1)
    x, out = torch.randn(5, 3, generator=g, dtype=torch.float64), torch.randn(5, 3, generator=g, dtype=torch.float64)
    for src in PREDICTIONS:
        for dst in PREDICTIONS:
            cx, cout = p.conversion_coefficients(T, src, dst)
            torch.testing.assert_close(cx[:, None] * x + cout[:, None] * out, p.convert(out, x, T, src, dst),
                                       rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", PATH_NAMES)
def test_derivatives_match_finite_differences(name):
    p = get_path(name)
    t = torch.linspace(0.05, 0.95, 19, dtype=torch.float64)
    h = 1e-4  # central differences: O(h^2) truncation, and the ddpm closed form subtracts ~5e5-sized lgammas
    for f, df in ((p.alpha, p.d_alpha), (p.sigma, p.d_sigma)):
        fd = (f(t + h) - f(t - h)) / (2 * h)
        torch.testing.assert_close(df(t), fd, rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize("name", PATH_NAMES)
def test_log_snr_inverse_and_monotone(name):
    p = get_path(name)
    lam = p.log_snr(T)
    assert (lam[1:] < lam[:-1]).all()
    torch.testing.assert_close(p.t_from_log_snr(lam), T, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", PATH_NAMES)
def test_endpoints_and_config(name):
    p = get_path(name)
    assert float(p.sigma(torch.tensor(0.0, dtype=torch.float64))) == pytest.approx(0.0, abs=1e-12)
    assert float(p.alpha(torch.tensor(0.0, dtype=torch.float64))) == pytest.approx(1.0, abs=1e-12)
    assert path_from_config(p.config()) == p


@pytest.mark.parametrize("name", PATH_NAMES)
def test_sample_prior_seeds_across_devices(name):
    """A CPU generator drives noise for another device: drawn on the CPU and moved, so one seed gives the same
    prior on every device (``meta`` stands in for CUDA here; torch refuses a CPU generator for it directly)."""
    p = get_path(name)
    cpu = p.sample_prior((5, 3), generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    expected = p.prior_std() * torch.randn(5, 3, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    assert cpu.std() > 0 and torch.equal(cpu, expected)
    moved = p.sample_prior((5, 3), generator=torch.Generator().manual_seed(7), device="meta", dtype=torch.float64)
    assert moved.device.type == "meta" and moved.shape == (5, 3)


@pytest.mark.parametrize("name", PATH_NAMES)
def test_ve_sigma_is_sigma_over_alpha_and_inverts(name):
    """EDM / k-diffusion noise level: sigma / alpha, 0 at data, and t_from_ve_sigma undoes it (0 -> t = 0)."""
    p = get_path(name)
    t = torch.linspace(0.02, 0.98, 25, dtype=torch.float64)
    torch.testing.assert_close(p.ve_sigma(t), p.sigma(t) / p.alpha(t), rtol=1e-12, atol=0)
    torch.testing.assert_close(p.t_from_ve_sigma(p.ve_sigma(t)), t, rtol=0, atol=1e-10)
    assert p.ve_sigma(torch.tensor(0.0, dtype=torch.float64)) == 0
    assert p.t_from_ve_sigma(torch.tensor([0.0, 1.0], dtype=torch.float64))[0] == 0


def test_named_closed_forms():
    t = T
    lin, cos, ve = get_path("linear"), get_path("cosine"), get_path("ve", sigma_max=80.0)
    torch.testing.assert_close(lin.alpha(t), 1 - t)
    torch.testing.assert_close(cos.alpha(t), torch.cos(math.pi * t / 2))
    torch.testing.assert_close(cos.sigma(t), torch.sin(math.pi * t / 2))
    torch.testing.assert_close(ve.sigma(t), 80 * t)
    # Nichol & Dhariwal's offset cosine: alpha_bar = f(t)/f(0), f = cos^2((t+s)/(1+s) pi/2)
    s = 0.008
    c = get_path("cosine", offset=s)
    f = lambda u: torch.cos((u + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    torch.testing.assert_close(c.alpha(t) ** 2, f(t) / f(torch.zeros(()).double()))
    # a variance-preserving path keeps alpha^2 + sigma^2 = 1
    for p in (cos, c, get_path("ddpm")):
        torch.testing.assert_close(p.alpha(t) ** 2 + p.sigma(t) ** 2, torch.ones_like(t))


def test_ddpm_matches_diffusers():
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear")
    p = get_path("ddpm")
    t = (torch.arange(1000, dtype=torch.float64) + 1) / 1000
    # diffusers accumulates the product in float32; our closed form is float64
    ref = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)
    torch.testing.assert_close(p.alpha(t) ** 2, ref, rtol=0, atol=1e-9)
    torch.testing.assert_close(p.alpha(t) ** 2, sched.alphas_cumprod.double(), rtol=0, atol=1e-6)


def test_bad_input():
    with pytest.raises(ConfigError, match="unknown path 'nope'.*linear"):
        get_path("nope")
    with pytest.raises(ConfigError, match="bad options"):
        get_path("linear", sigma_max=3)
    with pytest.raises(ConfigError, match="unknown prediction"):
        get_path("linear").convert(torch.zeros(2, 2), torch.zeros(2, 2), 0.5, "eps", "noise")
    with pytest.raises(ShapeError, match=r"shape \[batch\]"):
        get_path("linear").sample(torch.zeros(3, 2), torch.zeros(2), torch.zeros(3, 2))
    with pytest.raises(ConfigError):
        get_path("ve", sigma_max=-1)
