"""The flow families (nsf, realnvp) as distributions: the score against the Gaussian closed form of an affine
flow and against finite differences of log_prob, the density integrating to 1 on a grid, one-hot class
conditioning, the reverse-KL loss (its expectation in closed form, its pathwise gradient against finite
differences, and a tiny flow trained by a Gaussian energy through the Trainer), training by data, the exact
sampler, the common score / energy interfaces, checkpoints of energy-trained flows and bad input."""

from __future__ import annotations

import math

import pytest
import torch

import genkit
from genkit.cli import energy_metrics
from genkit.energies import get_energy
from genkit.errors import ConfigError, ShapeError
from genkit.models import FAMILIES, NeuralSplineFlow, RealNVP, build
from genkit.models.flows import FlowFamily, LULinear
from genkit.train import TrainConfig, Trainer

F64 = torch.float64
MU, SIGMA = [1.0, -0.5], 0.7
GAUSS = {"name": "gaussian_mixture", "means": [MU], "sigmas": [SIGMA], "weights": [1.0]}

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def jiggle(model: FlowFamily, scale: float, seed: int = 0) -> FlowFamily:
    """Move every weight off its (identity) initial value, seeded."""
    g = gen(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


def affine_flow() -> tuple[FlowFamily, torch.Tensor, torch.Tensor]:
    """identity coupling, LU layer ``z = W x + b``, identity coupling: ``x ~ N(-W^-1 b, (W^T W)^-1)``."""
    model = RealNVP(2, layers=2, hidden=8, depth=1, mixing="lu").double()
    (lu,) = [t for t in model.flow.transforms if isinstance(t, LULinear)]
    g = gen(3)
    with torch.no_grad():
        for p in lu.parameters():
            p.copy_(0.6 * torch.randn(p.shape, generator=g, dtype=F64))
        lower, upper, _ = lu._factors()
        w = (lower @ upper)[lu.perm]  # rows permuted: P L U
    return model, w, lu.bias.detach()


def test_score_of_an_affine_flow_is_the_gaussian_score():
    model, w, b = affine_flow()
    x = torch.randn(7, 2, generator=gen(0), dtype=F64)
    z = x @ w.T + b
    assert torch.allclose(model.flow.transforms[0](x)[0], x)  # the couplings are the identity (zero output layer)
    want = -(z @ w)  # grad_x log N(W x + b; 0, I) = -W^T (W x + b)
    assert torch.allclose(model.score(x), want, atol=1e-12)
    mean = -torch.linalg.solve(w, b)
    cov = torch.linalg.inv(w.T @ w)
    gauss = torch.distributions.MultivariateNormal(mean, cov)
    assert torch.allclose(model.log_prob(x), gauss.log_prob(x), atol=1e-12)
    # the common interfaces: a score field at t = 0 (as_score returns it as is) and an energy whose force it is
    field = model.score_field()
    assert genkit.as_score(field) is field
    assert torch.allclose(genkit.as_score(field)(x, 0.0), want, atol=1e-12)
    assert torch.allclose(model.as_energy().force(x), want, atol=1e-12)
    assert torch.allclose(model.as_energy().energy(x), -gauss.log_prob(x), atol=1e-12)
    with pytest.raises(ConfigError, match="t = 0 only"):
        field(x, 0.5)


@pytest.mark.parametrize("family, options", [("nsf", {"bins": 5}), ("nsf", {"transform": "autoregressive"}),
                                             ("nsf", {"transform": "masked_coupling"}), ("realnvp", {})])
def test_score_is_the_gradient_of_log_prob(family, options):
    """Central differences of the exact log_prob (float64, h = 1e-6) against the autograd score."""
    model = jiggle(build({"family": family, "features": 3, "layers": 3, "hidden": 8, "depth": 1, **options}).double(),
                   0.3)
    x = 0.8 * torch.randn(5, 3, generator=gen(1), dtype=F64)
    s = model.score(x)
    h = 1e-6
    fd = torch.stack([(model.log_prob(x + h * e) - model.log_prob(x - h * e)) / (2 * h)
                      for e in torch.eye(3, dtype=F64)], 1)
    assert s.abs().max() > 0.1
    assert torch.allclose(s, fd, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("family, options", [("nsf", {}), ("nsf", {"transform": "autoregressive", "mixing": "reverse"}),
                                             ("nsf", {"transform": "masked_coupling", "mixing": "none"}),
                                             ("realnvp", {"mixing": "none"})])
def test_log_prob_integrates_to_one_on_a_grid(family, options):
    model = jiggle(build({"family": family, "features": 2, "layers": 3, "hidden": 12, "depth": 1, **options}).double(),
                   0.2)
    g = torch.linspace(-8, 8, 401, dtype=F64)  # trapezoid, step 0.04
    grid = torch.stack(torch.meshgrid(g, g, indexing="ij"), -1).reshape(-1, 2)
    w = torch.full((401,), float(g[1] - g[0]), dtype=F64)
    w[0] = w[-1] = w[0] / 2
    with torch.no_grad():
        mass = float((model.log_prob(grid).exp().reshape(401, 401) * w[:, None] * w[None, :]).sum())
    assert abs(mass - 1) < 0.01
    x = model.sample(2000, generator=gen(2))
    assert (x.std(0) - 1).abs().max() > 0.05 or x.mean(0).abs().max() > 0.1  # not the base Normal


def test_labels_are_one_hot_context_and_a_wrong_label_is_an_error():
    model = NeuralSplineFlow(2, layers=2, hidden=8, depth=1, num_classes=3, class_names=["a", "b", "c"])
    model = jiggle(model.double(), 0.4)
    x = torch.randn(6, 2, generator=gen(0), dtype=F64)
    per_class = [model.log_prob(x, labels=k) for k in range(3)]
    assert (per_class[0] - per_class[1]).abs().min() > 1e-4  # the label changes the density everywhere
    onehot = torch.nn.functional.one_hot(torch.tensor([2] * 6), 3).double()
    assert torch.equal(per_class[2], model.flow.log_prob(x, onehot))  # labels reach the Flow as one-hot context
    mixed = model.log_prob(x, labels=torch.tensor([0, 1, 2, 0, 1, 2]))
    assert torch.allclose(mixed, torch.stack(per_class, 1)[torch.arange(6), torch.tensor([0, 1, 2, 0, 1, 2])])
    xs, logp = model.sample_and_log_prob(5, labels=1, generator=gen(4))
    assert torch.allclose(model.log_prob(xs, labels=1), logp, atol=1e-10)
    assert torch.equal(xs.detach(), model.sample(5, labels=1, generator=gen(4)))
    with pytest.raises(ConfigError, match=r"labels \[3\] are not classes of this flow: 0..2 \(a, b, c\)"):
        model.log_prob(x[:1], labels=3)
    with pytest.raises(ConfigError, match="class-conditional.*needs labels"):
        model.sample(2)
    with pytest.raises(ConfigError, match="no field to guide"):
        model.sample(2, labels=0, guidance=2.0)
    with pytest.raises(ShapeError, match="one class id per sample"):
        model.log_prob(x, labels=torch.tensor([0, 1]))
    with pytest.raises(ConfigError, match="unconditional.*takes no labels"):
        NeuralSplineFlow(2).sample(2, labels=0)
    loss, _ = model.loss((x.float().double(), torch.tensor([0, 1, 2, 0, 1, 2])))
    assert torch.allclose(loss, -mixed.mean())
    with pytest.raises(ShapeError, match=r"\(x, labels\)"):
        model.loss(x)


def test_the_reverse_kl_loss_has_its_closed_form_expectation():
    """An identity flow is q = N(0, I): E_q[U + log q] = KL(q || p) - log Z with p = N(mu, sigma^2 I)."""
    model = RealNVP(2, layers=2, hidden=8, mixing="reverse", energy=GAUSS, batch_size=200_000).double()
    loss, _ = model.loss(None, generator=gen(0))
    mu2 = sum(m * m for m in MU)
    kl = math.log(SIGMA**2) + (2 + mu2) / (2 * SIGMA**2) - 1  # 2-D: sum over dims of the 1-D KL
    log_z = get_energy(**GAUSS).log_z
    assert float(loss.detach()) == pytest.approx(kl - log_z, abs=0.025)  # MC: std(U + log q) = 2.5, se 0.0056


def test_reverse_kl_gradient_is_the_pathwise_derivative():
    """d loss / d theta by autograd equals the central difference of the same-seed loss (float64)."""
    model = jiggle(NeuralSplineFlow(2, layers=2, hidden=8, depth=1, bins=4, energy=GAUSS, batch_size=64).double(), 0.3)
    params = [p for p in model.parameters() if p.requires_grad]
    loss, _ = model.loss(None, generator=gen(1))
    grads = torch.autograd.grad(loss, params)
    h = 1e-6
    checked = 0
    for p, g in zip(params[::3], grads[::3]):
        with torch.no_grad():
            p.view(-1)[0] += h
            up = model.loss(None, generator=gen(1))[0]
            p.view(-1)[0] -= 2 * h
            down = model.loss(None, generator=gen(1))[0]
            p.view(-1)[0] += h
        fd = float((up - down) / (2 * h))
        assert g.view(-1)[0].item() == pytest.approx(fd, rel=1e-5, abs=1e-8)
        checked += abs(fd) > 1e-4
    assert checked >= 2


def test_a_tiny_flow_trained_by_a_gaussian_energy_reaches_small_kl(tmp_path):
    """Through the Trainer (data-free: fit() without data): KL(q || p) = log Z - E_q[log w] below 0.01 nats."""
    model = RealNVP(2, layers=2, hidden=16, depth=1, energy=GAUSS, batch_size=128)
    before = energy_metrics(model, 4000, gen(5))["reverse_kl"]
    cfg = TrainConfig(steps=150, batch_size=128, lr=2e-2, warmup_steps=5, ema_decay=None, checkpoint_every=None,
                      log_every=50, out_dir=str(tmp_path), progress=False, cpu=True)
    with pytest.raises(ConfigError, match="data_free"):
        Trainer(model, cfg).fit(torch.zeros(8, 2))
    Trainer(model, cfg).fit()
    report = energy_metrics(model, 4000, gen(5))
    assert before > 1.0
    assert -0.005 < report["reverse_kl"] < 0.01
    assert report["log_z_reference_method"] == "exact" and report["ess_fraction"] > 0.95
    assert report["log_z"] == pytest.approx(get_energy(**GAUSS).log_z, abs=3 * report["log_z_stderr"] + 1e-3)
    loaded = genkit.load(tmp_path / "checkpoint")
    assert loaded.data_free and loaded.energy.config() == model.energy.config()
    assert torch.equal(loaded.sample(8, generator=gen(0)), model.eval().sample(8, generator=gen(0)))


def test_training_by_data_reaches_the_gaussian_entropy(tmp_path):
    """NLL training of realnvp on N(m, C) samples: held-out NLL within 0.05 nats of the true one."""
    m = torch.tensor([0.5, -1.0])
    c = torch.tensor([[1.0, 0.6], [0.6, 0.8]])
    p = torch.distributions.MultivariateNormal(m, c)
    torch.manual_seed(0)
    data, held = p.sample((4000,)), p.sample((4000,))
    model = RealNVP(2, layers=2, hidden=16, depth=1)
    cfg = TrainConfig(steps=200, batch_size=256, lr=1e-2, warmup_steps=5, ema_decay=None, checkpoint_every=None,
                      log_every=50, out_dir=str(tmp_path), progress=False, cpu=True)
    Trainer(model, cfg).fit(data)
    with torch.no_grad():
        nll, truth = -float(model.log_prob(held).mean()), -float(p.log_prob(held).mean())
    assert nll - truth < 0.05


def test_the_exact_sampler_is_one_pass_and_agrees_with_sample_and_log_prob():
    model = jiggle(RealNVP(2, layers=3, hidden=8, depth=1), 0.3)
    sol = model.sample(10, generator=gen(0), return_solution=True)
    assert sol.nfe == 1 and sol.times.tolist() == [1.0, 0.0]
    x, logp = model.sample_and_log_prob(10, generator=gen(0))
    assert torch.equal(x.detach(), sol.samples) and logp.requires_grad
    assert torch.allclose(model.log_prob(sol.samples), logp.detach(), atol=1e-5)
    assert torch.equal(model.sample(10, sampler="exact", generator=gen(0)), sol.samples)
    with pytest.raises(ConfigError, match="cannot sample with"):
        model.sample(2, sampler="ode")
    with pytest.raises(ConfigError, match="takes no steps"):
        model.rsample(2, steps=4)


def test_config_options_and_bad_input():
    model = NeuralSplineFlow(3, layers=2, bins=6, bound=4.0, hidden=12, depth=2, transform="autoregressive",
                             mixing="random", seed=5)
    config = model.config()
    assert config == {"family": "nsf", "features": 3, "layers": 2, "hidden": 12, "depth": 2, "mixing": "random",
                      "seed": 5, "bins": 6, "bound": 4.0, "transform": "autoregressive"}
    again = build(config)
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in model.state_dict().items())  # the seed's weights
    assert FAMILIES.get("realnvp") is RealNVP
    with pytest.raises(ConfigError, match="unknown nsf transform"):
        NeuralSplineFlow(2, transform="affine")
    with pytest.raises(ConfigError, match="unknown mixing"):
        RealNVP(2, mixing="shuffle")
    with pytest.raises(ConfigError, match="3-D but the flow has features=2"):
        RealNVP(2, energy={"name": "double_well", "dim": 3})
    with pytest.raises(ConfigError, match="torus"):
        RealNVP(2, energy="torus_dihedral")
    with pytest.raises(ConfigError, match="no classes"):
        RealNVP(2, energy="double_well", num_classes=2)
    with pytest.raises(ConfigError, match="takes the keys"):
        build({"family": "nsf", "features": 2, "layers_": 3})
    with pytest.raises(ConfigError, match="coupling flow needs features >= 2"):
        NeuralSplineFlow(1)
    with pytest.raises(ShapeError, match=r"shape \[batch, 2\]"):
        RealNVP(2).log_prob(torch.zeros(4, 3))
    with pytest.raises(ConfigError, match="trains by its energy"):
        RealNVP(2, energy="double_well").loss(torch.zeros(4, 2))


def test_coupling_nsf_beats_realnvp_of_the_same_size_on_moons(tmp_path):
    """The issue's bar: same layers (4), conditioners (32 x 2), LU mixing, optimiser, steps and data; the RQ
    spline coupling reaches a lower held-out NLL on moons than the affine coupling (measured: 1.29 against 2.04
    nats at these 200 steps)."""
    from genkit.data import load_dataset

    data = load_dataset("moons", n=4000, generator=gen(0))
    held = load_dataset("moons", n=4000, generator=gen(1))
    nll = {}
    for name, cls, extra in (("nsf", NeuralSplineFlow, {"bins": 8, "bound": 4.0}), ("realnvp", RealNVP, {})):
        model = cls(2, layers=4, hidden=32, depth=2, **extra)
        cfg = TrainConfig(steps=200, batch_size=256, lr=5e-3, warmup_steps=10, ema_decay=None, checkpoint_every=None,
                          log_every=100, out_dir=str(tmp_path / name), progress=False, cpu=True, seed=0)
        Trainer(model, cfg).fit(data)
        with torch.no_grad():
            nll[name] = -float(model.log_prob(held).mean())
    assert nll["nsf"] < nll["realnvp"] - 0.05, nll
