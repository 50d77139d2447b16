"""Metrics against closed forms: shifted Gaussians, Frechet distance, Gaussian entropy, RBF-MMD."""

from __future__ import annotations

import importlib.util
import math

import numpy as np
import pytest
import scipy.linalg
import scipy.stats
import torch

from genkit.data import digits, digits_labels
from genkit.errors import ConfigError, DataError, ShapeError
from genkit.metrics import (
    ENDPOINT_ERROR,
    DigitsClassifier,
    endpoint_rms,
    energy_distance,
    fid,
    frechet_distance,
    frechet_gaussians,
    inception_features,
    mmd,
    nll,
    sliced_wasserstein,
    train_digits_classifier,
)  # fmt: skip


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def gaussian(n: int, mean, cov=None, seed: int = 0) -> torch.Tensor:
    mean = torch.as_tensor(mean, dtype=torch.float64)
    z = torch.randn(n, mean.shape[0], generator=gen(seed), dtype=torch.float64)
    return mean + (z if cov is None else z @ torch.linalg.cholesky(torch.as_tensor(cov, dtype=torch.float64)).T)


def test_two_sample_distances_vanish_on_identical_sets_and_grow_with_shift():
    x = gaussian(400, [0.0, 0.0, 0.0])
    y = gaussian(400, [0.0, 0.0, 0.0], seed=1)
    assert energy_distance(x, x) == 0.0
    assert mmd(x, x) == pytest.approx(0.0, abs=1e-12)
    shifts = [energy_distance(x, y + s) for s in (0.0, 0.5, 1.0)]
    assert shifts[0] < shifts[1] < shifts[2]
    shifts = [mmd(x, y + s, bandwidths=[1.0]) for s in (0.0, 0.5, 1.0)]
    assert shifts[0] < shifts[1] < shifts[2]
    assert abs(mmd(x, y, unbiased=True)) < 0.01 < mmd(x, y + 0.5)


def test_energy_distance_is_square_of_scipy_in_1d():
    x, y = gaussian(300, [0.0]), gaussian(200, [0.7], seed=1)
    expected = scipy.stats.energy_distance(x[:, 0].numpy(), y[:, 0].numpy()) ** 2
    assert energy_distance(x, y) == pytest.approx(expected, rel=1e-9)


def test_unbiased_mmd_matches_gaussian_closed_form():
    # For N(0, s^2 I) vs N(m, s^2 I) and k = exp(-|a-b|^2 / 2h^2):
    # MMD^2 = 2 (h^2 / (h^2 + 2 s^2))^(d/2) (1 - exp(-|m|^2 / (2 (h^2 + 2 s^2)))).
    d, h, m = 2, 1.0, torch.tensor([0.8, -0.6], dtype=torch.float64)
    x, y = gaussian(2000, [0.0, 0.0]), gaussian(2000, m.tolist(), seed=1)
    c = h**2 + 2.0
    exact = 2 * (h**2 / c) ** (d / 2) * (1 - math.exp(-m.square().sum().item() / (2 * c)))
    assert mmd(x, y, bandwidths=[h], unbiased=True) == pytest.approx(exact, rel=0.1)


@pytest.mark.parametrize("dim", [2, 4])
def test_sliced_w2_of_a_shift_is_norm_over_sqrt_dim(dim):
    m = torch.zeros(dim, dtype=torch.float64)
    m[0], m[-1] = 2.0, -2.0
    x, y = gaussian(1000, [0.0] * dim), gaussian(1000, m.tolist(), seed=1)
    sw = sliced_wasserstein(x, y, n_projections=500, generator=gen())
    assert sw == pytest.approx(m.norm().item() / math.sqrt(dim), rel=0.08)
    assert sw == sliced_wasserstein(x, y, n_projections=500, generator=gen())
    assert sliced_wasserstein(x, x, n_projections=50, generator=gen()) == pytest.approx(0.0, abs=1e-9)


def _frechet_scipy(m1, c1, m2, c2) -> float:
    s1 = scipy.linalg.sqrtm(c1)
    cross = scipy.linalg.sqrtm(s1 @ c2 @ s1).real
    return float(np.sum((m1 - m2) ** 2) + np.trace(c1 + c2 - 2 * cross))


def test_frechet_distance_matches_closed_form_on_sample_moments():
    a = torch.randn(5, 5, generator=gen(), dtype=torch.float64)
    x = gaussian(500, [0.0] * 5, a @ a.T + 0.1 * torch.eye(5, dtype=torch.float64))
    y = gaussian(300, [1.0, 0.0, -1.0, 0.5, 0.0], seed=1) * torch.linspace(0.5, 2, 5, dtype=torch.float64)
    moments = [(v.mean(0).numpy(), np.cov(v.numpy().T)) for v in (x, y)]
    assert frechet_distance(x, y) == pytest.approx(_frechet_scipy(*moments[0], *moments[1]), rel=1e-8)
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-8)


def test_frechet_gaussians_diagonal_and_population_limit():
    a, b = torch.tensor([1.0, 4.0, 0.25]), torch.tensor([4.0, 1.0, 0.25])
    m1, m2 = torch.zeros(3), torch.tensor([1.0, 2.0, 0.0])
    exact = 5.0 + ((a.sqrt() - b.sqrt()) ** 2).sum().item()
    assert frechet_gaussians(m1, torch.diag(a), m2, torch.diag(b)) == pytest.approx(exact, rel=1e-12)
    x, y = gaussian(50_000, m1.tolist(), torch.diag(a)), gaussian(50_000, m2.tolist(), torch.diag(b), seed=1)
    assert frechet_distance(x, y) == pytest.approx(exact, rel=0.05)


def test_frechet_distance_with_singular_covariance_is_finite():
    x = torch.randn(10, 32, generator=gen())  # fewer samples than features
    assert math.isfinite(frechet_distance(x, x)) and abs(frechet_distance(x, x)) < 1e-6


def test_fid_is_frechet_of_features_whatever_the_batch_size():
    x, y = torch.randn(20, 1, 4, 4, generator=gen(0)), torch.randn(30, 1, 4, 4, generator=gen(1)) + 1
    feats = lambda imgs: imgs.flatten(1)[:, :5]  # noqa: E731
    expected = frechet_distance(feats(x), feats(y))
    assert fid(x, y, feats, batch_size=7) == pytest.approx(expected, rel=1e-10)
    with pytest.raises(ShapeError, match=r"\[N, F\]"):
        fid(x, y, lambda imgs: imgs)


def test_nll_of_standard_normal_is_its_entropy():
    d = 3
    dist = torch.distributions.MultivariateNormal(torch.zeros(d), torch.eye(d))
    x = dist.sample((20_000,))
    result = nll(lambda v: dist.log_prob(v), x)
    entropy = 0.5 * d * math.log(2 * math.pi * math.e)
    assert abs(result.nats - entropy) < 4 * result.stderr_nats
    assert result.bits_per_dim == pytest.approx(result.nats / (d * math.log(2)))
    assert nll(lambda v: dist.log_prob(v), x, batch_size=999).nats == pytest.approx(result.nats, rel=1e-6)


def test_nll_bad_log_prob():
    x = torch.randn(8, 2)
    with pytest.raises(ShapeError, match=r"shape \[8\], got \[8, 1\]"):
        nll(lambda v: v[:, :1], x)
    with pytest.raises(DataError, match="NaN for 8 of 8"):
        nll(lambda v: torch.full((v.shape[0],), float("nan")), x)
    assert nll(lambda v: torch.full((v.shape[0],), -float("inf")), x).nats == float("inf")


def test_two_sample_bad_input():
    with pytest.raises(ShapeError, match=r"\[10, 2\] and \[10, 3\]"):
        energy_distance(torch.randn(10, 2), torch.randn(10, 3))
    with pytest.raises(ShapeError, match="at least 2"):
        mmd(torch.randn(1, 2), torch.randn(10, 2))
    with pytest.raises(ConfigError, match="bandwidths"):
        mmd(torch.randn(5, 2), torch.randn(5, 2), bandwidths=[1.0, -1.0])


@pytest.fixture(scope="module")
def classifier() -> DigitsClassifier:
    # A tiny CNN gains nothing from threads, and on a busy 2-core machine OpenMP
    # barriers made training ~40x slower; one thread keeps it at a few seconds.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train_digits_classifier(digits("train"), digits_labels("train"), generator=gen(0))
    finally:
        torch.set_num_threads(threads)


def test_digits_classifier_accuracy(classifier):
    with torch.no_grad():
        pred = classifier(digits("test")).argmax(1)
    assert (pred == digits_labels("test")).float().mean() > 0.9


def test_digits_frechet_distance_separates_real_from_noise(classifier):
    test, train = digits("test"), digits("train")
    noise = torch.rand(test.shape, generator=gen()) * 2 - 1
    blurred = torch.nn.functional.avg_pool2d(test, 3, stride=1, padding=1)
    real, blur, fake = (fid(test, other, classifier.features) for other in (train, blurred, noise))
    assert real < blur < fake and fake > 10 * real
    with pytest.raises(ShapeError, match=r"\[N, 1, 8, 8\]"):
        classifier.features(torch.randn(4, 3, 8, 8))


@pytest.mark.skipif(importlib.util.find_spec("torch_fidelity") is not None, reason="torch-fidelity installed")
def test_inception_features_says_what_to_install():
    with pytest.raises(ConfigError, match=r"torchmetrics\[image\]"):
        inception_features()


def test_endpoint_rms_is_the_per_sample_l2_rms():
    """sqrt(mean_i |x_i - ref_i|^2): per-sample distances 3, 4 and 0 give sqrt(25 / 3); sqrt(D) times the
    per-element RMS, whatever the sample shape."""
    ref = torch.randn(3, 2, generator=gen(), dtype=torch.float64)
    x = ref + torch.tensor([[3.0, 0.0], [0.0, -4.0], [0.0, 0.0]], dtype=torch.float64)
    assert endpoint_rms(x, ref) == pytest.approx(math.sqrt(25 / 3), rel=1e-12)
    assert endpoint_rms(ref, ref) == 0.0
    a, b = (torch.randn(5, 1, 8, 8, generator=gen(k), dtype=torch.float64) for k in (1, 2))
    assert endpoint_rms(a, b) == pytest.approx(8 * float((a - b).double().pow(2).mean().sqrt()), rel=1e-12)
    assert ENDPOINT_ERROR == "per-sample L2 RMS to the reference"
    with pytest.raises(ShapeError, match="paired batches"):
        endpoint_rms(a, b[:4])
