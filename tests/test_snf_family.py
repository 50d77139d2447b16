"""The snf family (genkit.models.flows.snf_family.StochasticNSF) as a genkit model: its layers (the nsf of the
same config, in sampling order, with a block after each at lambda = (k + 1) / layers), its log weights against
StochasticFlow's and, without the blocks, against the nsf's exact ``-U(x) - log q(x)``; the path sampler's NFE
against counted energy evaluations; the mixed loss as its two parts; a tiny snf trained by KL through the
Trainer on a Gaussian energy (ESS, log Z); and bad input. The registry-generated contracts (config and
checkpoint round trips, determinism, pathwise gradients) run in tests/test_families.py."""

from __future__ import annotations

import pytest
import torch

import genkit
from genkit.cli import energy_metrics
from genkit.energies import GaussianMixtureEnergy
from genkit.errors import ConfigError, DataError, ShapeError
from genkit.models import FAMILIES, NeuralSplineFlow, StochasticNSF, build
from genkit.models.flows import LangevinBlock, MetropolisBlock, StochasticFlow, Transform
from genkit.train import TrainConfig, Trainer

MU, SIGMA = [1.0, -0.5], 0.7
GAUSS = {"name": "gaussian_mixture", "means": [MU], "sigmas": [SIGMA], "weights": [1.0]}
OPTIONS = {"layers": 3, "hidden": 8, "depth": 1, "bins": 4, "seed": 2}

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def jiggle(model, scale: float = 0.3, seed: int = 0):
    g = gen(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


@pytest.mark.parametrize("blocks", ["metropolis", "langevin"])
def test_the_layers_are_the_nsf_in_sampling_order_with_a_block_after_each(blocks):
    model = StochasticNSF(2, energy=GAUSS, blocks=blocks, block_steps=3, step_size=0.02, **OPTIONS)
    nsf = NeuralSplineFlow(2, **OPTIONS)  # the same config and seed: the same initial transforms
    layers = list(model.snf.layers)
    flow_layers = [m for m in layers if isinstance(m, Transform)]
    assert [type(m) for m in flow_layers] == [type(t) for t in reversed(nsf.flow.transforms)]
    for a, b in zip(flow_layers, reversed(nsf.flow.transforms)):
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    block = MetropolisBlock if blocks == "metropolis" else LangevinBlock
    stochastic = [m for m in layers if not isinstance(m, Transform)]
    assert all(type(m) is block and m.n_steps == 3 and m.step_size == 0.02 for m in stochastic)
    assert [m.energy.lam for m in stochastic] == [1 / 3, 2 / 3, 1.0] and isinstance(layers[-1], block)
    # a block follows each spline layer together with the mixing layer after it in sampling order
    assert [type(m).__name__ for m in layers[:3]] == ["MaskedCouplingSpline", "LULinear", block.__name__]
    names = [k for k, _ in model.named_parameters()]
    assert names and all(k.startswith("snf.layers.") for k in names)  # one module holds the transforms


@pytest.mark.parametrize("blocks", ["metropolis", "langevin"])
def test_log_weights_equal_the_stochastic_flows_for_the_same_layers_and_generator(blocks):
    model = jiggle(StochasticNSF(2, energy=GAUSS, blocks=blocks, block_steps=2, step_size=0.2, **OPTIONS)).double()
    again = StochasticFlow(list(model.snf.layers), 2).double()
    x, log_w = model.sample_with_log_weights(64, generator=gen(4))
    y, want = again.sample_with_log_weights(64, model.energy, generator=gen(4))
    assert torch.equal(x, y) and torch.equal(log_w, want)
    assert torch.equal(model.sample(64, generator=gen(4)), x.detach())  # the path sampler: the same pass
    assert log_w.requires_grad and log_w.std() > 0


def test_without_its_blocks_the_log_weight_is_the_nsfs_exact_one():
    """Dropping the blocks leaves the nsf of the same weights: ``log w = -U(x) - log q(x)`` exactly."""
    model = jiggle(StochasticNSF(2, energy=GAUSS, **OPTIONS)).double()
    nsf = NeuralSplineFlow(2, energy=GAUSS, **OPTIONS).double()
    flow_layers = [m for m in model.snf.layers if isinstance(m, Transform)]
    nsf.flow.transforms = torch.nn.ModuleList(reversed(flow_layers))
    x, log_w = StochasticFlow(flow_layers, 2).double().sample_with_log_weights(200, model.energy, generator=gen(1))
    y, want = nsf.sample_with_log_weights(200, generator=gen(1))
    torch.testing.assert_close(x, y, rtol=0, atol=1e-12)
    torch.testing.assert_close(log_w, want, rtol=0, atol=1e-10)


class CountingGaussian(GaussianMixtureEnergy):
    calls = 0

    def _energy(self, x):
        CountingGaussian.calls += 1
        return super()._energy(x)


@pytest.mark.parametrize("blocks, steps", [("metropolis", 3), ("langevin", 2)])
def test_the_path_samplers_nfe_counts_the_target_energy_evaluations(blocks, steps):
    energy = CountingGaussian([MU], [SIGMA], [1.0])
    model = StochasticNSF(2, energy=energy, blocks=blocks, block_steps=steps, **OPTIONS)
    CountingGaussian.calls = 0
    sol = model.sample(10, generator=gen(0), return_solution=True)
    assert sol.nfe == CountingGaussian.calls == model.path_evaluations()
    assert sol.nfe == 3 * (steps + 1 if blocks == "metropolis" else 2 * steps)
    assert sol.times.tolist() == [1.0, 0.0]


def test_the_mixed_loss_is_its_weighted_ml_and_kl_parts():
    """``w_ml * ML(batch) + (1 - w_ml) * KL``, ML's block noise drawn first from the generator, then KL's paths."""
    batch = 0.7 * torch.randn(40, 2, generator=gen(3)) + torch.tensor(MU)
    kw = dict(energy=GAUSS, block_steps=2, step_size=0.3, batch_size=32, **OPTIONS)
    mixed = jiggle(StochasticNSF(2, objective="mixed", w_ml=0.3, **kw))
    ml, kl = jiggle(StochasticNSF(2, objective="ml", **kw)), jiggle(StochasticNSF(2, **kw))
    g = gen(5)
    want = 0.3 * ml.loss(batch, generator=g)[0] + 0.7 * kl.loss(None, generator=g)[0]
    loss, logs = mixed.loss(batch, generator=gen(5))
    torch.testing.assert_close(loss, want, rtol=1e-6, atol=1e-6)
    assert set(logs) == {"ml", "kl"} and not mixed.data_free and kl.data_free and not ml.data_free
    z, ds = ml.snf.reverse(batch, generator=gen(6))
    torch.testing.assert_close(ml.loss(batch, generator=gen(6))[0], (ml.snf.prior_energy(z) - ds).mean())


def test_nll_bound_is_the_per_sample_ml_loss_and_rejects_bad_input():
    """``nll_bound(x)`` is ``u_Z(z) - sum Delta S`` of one reverse path per sample: its mean is the ML loss for the
    same generator, it follows the generator, and a wrong shape or generator is refused."""
    batch = 0.7 * torch.randn(40, 2, generator=gen(3)) + torch.tensor(MU)
    ml = jiggle(StochasticNSF(2, energy=GAUSS, objective="ml", block_steps=2, step_size=0.3, **OPTIONS))
    bound = ml.nll_bound(batch, generator=gen(6))
    assert bound.shape == (40,) and bool(torch.isfinite(bound).all())
    torch.testing.assert_close(bound.mean(), ml.loss(batch, generator=gen(6))[0])
    assert torch.equal(bound, ml.nll_bound(batch, generator=gen(6)))
    assert not torch.equal(bound, ml.nll_bound(batch, generator=gen(7)))  # the blocks' noise
    with pytest.raises(ShapeError, match=r"x of shape \[batch, 2\]"):
        ml.nll_bound(torch.zeros(4, 3))
    with pytest.raises(ConfigError, match="generator"):
        ml.nll_bound(batch, generator=1)


@pytest.mark.parametrize("blocks, step_size, steps", [("metropolis", 0.1, 2), ("langevin", 0.01, 1)])
def test_the_reverse_path_estimate_of_the_marginal_integrates_to_one(blocks, step_size, steps):
    """``q(x) = E_backward[p_Z(z) exp(sum Delta S)] = E[exp(-nll_bound(x))]``, unbiased (what makes nll_bound an
    upper bound of ``-log q`` by Jensen): averaged over K reverse paths per point of a 41 x 41 grid on
    ``[-7, 7]^2`` (the samples of the model lie within ``[-5, 5]^2``), its trapezoid integral is 1 within four
    standard errors of the K replicate integrals (plus 0.01 for the grid). A wrong sign of a block's Delta S,
    or of the flow's log-det, breaks the normalisation. The half-split coupling layers: jiggled this much, the
    masked coupling's own splines on the conditioning half spread the samples past the grid."""
    model = jiggle(StochasticNSF(2, energy=GAUSS, blocks=blocks, step_size=step_size, block_steps=steps, layers=2,
                                 hidden=8, depth=1, bins=4, seed=2, transform="coupling")).double()
    assert float(model.sample(2000, generator=gen(0)).abs().max()) < 5
    n, k, lo, hi = 41, 128, -7.0, 7.0
    axis = torch.linspace(lo, hi, n, dtype=torch.float64)
    h = (hi - lo) / (n - 1)
    w = torch.full((n,), h, dtype=torch.float64)
    w[0] = w[-1] = h / 2
    with torch.no_grad():
        bound = model.nll_bound(torch.cartesian_prod(axis, axis).repeat(k, 1), generator=gen(1))
    per_path = (torch.exp(-bound).reshape(k, n * n) * (w[:, None] * w[None, :]).reshape(-1)).sum(1)  # [K]
    total, se = float(per_path.mean()), float(per_path.std() / k ** 0.5)
    assert se < 0.05, se  # enough paths to tell a normalised estimate from a wrong one
    assert abs(total - 1) < 4 * se + 0.01, (total, se)


def test_a_tiny_snf_trained_by_kl_reaches_high_ess_and_log_z(tmp_path):
    """Through the Trainer (data-free): ESS > 0.9 n and log Z within 2% of the Gaussian's exact one."""
    model = StochasticNSF(2, energy=GAUSS, layers=2, hidden=16, depth=1, bins=4, block_steps=1, step_size=0.05,
                          batch_size=128)
    before = energy_metrics(model, 4000, gen(5))
    cfg = TrainConfig(steps=150, batch_size=128, lr=2e-2, warmup_steps=5, ema_decay=None, checkpoint_every=None,
                      log_every=50, out_dir=str(tmp_path), progress=False, cpu=True)
    with pytest.raises(ConfigError, match="data_free"):
        Trainer(model, cfg).fit(torch.zeros(8, 2))
    Trainer(model, cfg).fit()
    report = energy_metrics(model, 4000, gen(5))
    exact = GaussianMixtureEnergy([MU], [SIGMA], [1.0]).log_z
    assert before["ess_fraction"] < 0.5
    assert report["ess_fraction"] > 0.9 and report["log_z_reference"] == exact
    assert abs(report["log_z"] - exact) < 0.02 * abs(exact)
    loaded = genkit.load(tmp_path / "checkpoint")
    assert type(loaded) is StochasticNSF and loaded.config() == model.config()
    assert torch.equal(loaded.sample(8, generator=gen(0)), model.eval().sample(8, generator=gen(0)))


def test_config_and_bad_input():
    model = StochasticNSF(2, energy="double_well", blocks="langevin", block_steps=4, step_size=0.005,
                          objective="mixed", w_ml=0.25, layers=2, bins=5, hidden=8, depth=1, mixing="reverse", seed=3)
    config = model.config()
    assert config == {"family": "snf", "features": 2, "layers": 2, "hidden": 8, "depth": 1, "mixing": "reverse",
                      "seed": 3, "bins": 5, "bound": 3.0, "transform": "masked_coupling", "blocks": "langevin",
                      "block_steps": 4, "step_size": 0.005, "objective": "mixed", "w_ml": 0.25,
                      "energy": model.energy.config(), "batch_size": 256}
    assert FAMILIES.get("snf") is StochasticNSF and build(config).config() == config
    assert StochasticNSF(2, energy="double_well").step_size == 0.1  # Metropolis default; Langevin 0.01
    assert StochasticNSF(2, energy="double_well", blocks="langevin").step_size == 0.01
    for kwargs, match in [({}, "needs energy="), ({"energy": "torus_dihedral"}, "torus"),
                          ({"energy": "double_well", "blocks": "hmc"}, "unknown snf blocks"),
                          ({"energy": "double_well", "objective": "nll"}, "unknown snf objective"),
                          ({"energy": "double_well", "w_ml": 0.3}, "objective='mixed' only"),
                          ({"energy": "double_well", "objective": "mixed", "w_ml": 1.0}, r"w_ml must be .* \(0, 1\)"),
                          ({"energy": "double_well", "step_size": 0.0}, "step_size must be"),
                          ({"energy": "double_well", "block_steps": 0}, "block_steps must be an int >= 1"),
                          ({"energy": "double_well", "num_classes": 2}, "no classes"),
                          ({"energy": {"name": "double_well", "dim": 3}}, "3-D but the flow has features=2")]:
        with pytest.raises(ConfigError, match=match):
            StochasticNSF(2, **kwargs)
    with pytest.raises(ConfigError, match="takes the keys"):
        build({**config, "blockz": 1})
    x = torch.zeros(4, 2)
    for call in (lambda: model.log_prob(x), lambda: model.score(x), lambda: model.as_energy(),
                 lambda: model.sample_and_log_prob(4)):
        with pytest.raises(ConfigError, match="no exact density.*sample_with_log_weights"):
            call()
    with pytest.raises(ConfigError, match="cannot sample with"):
        model.sample(2, sampler="exact")
    with pytest.raises(ConfigError, match="path sampler takes no steps=4"):
        model.sample(2, steps=4)
    kl = StochasticNSF(2, energy="double_well")
    with pytest.raises(ConfigError, match="data_free"):
        kl.loss(x)
    with pytest.raises(DataError, match="got none"):
        model.loss(None)
    with pytest.raises(ConfigError, match="no labels"):
        model.loss((x, torch.zeros(4)))
    with pytest.raises(ConfigError, match="unconditional"):
        kl.sample(2, labels=1)
    with pytest.raises(ConfigError, match="trained on data, not by an energy"):
        NeuralSplineFlow(2).sample_with_log_weights(4)
