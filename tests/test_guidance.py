"""Classifier-free guidance (genkit.guidance) on the exact class-conditional Gaussian-mixture field.

The closed form is derived here independently of the wrapper and of genkit's conversions: the marginal of each
class (and of the whole mixture) at time t is a Gaussian mixture whose log-density torch.distributions evaluates;
its score comes from autograd, and the guided score ``grad log p + s (grad log p(.|c) - grad log p)`` is turned
into each prediction by hand (eps = -sigma score, x0 = (x - sigma eps) / alpha, ...).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import MultivariateNormal

import genkit
from genkit.analytic import ClassConditionalMixture
from genkit.errors import ConfigError, ShapeError
from genkit.fields import FunctionField
from genkit.guidance import Guidance, GuidedField, guide
from genkit.models import FlowMatching
from genkit.nets import MLP
from genkit.paths import get_path
from genkit.solvers import SOLVERS, LogSNR, get_solver, solve

D64 = torch.float64
PREDICTIONS = ("eps", "x0", "velocity", "v", "score")


def mixture(path: str = "linear", prediction: str = "velocity") -> ClassConditionalMixture:
    """Four components in 2-D, three classes (class 0 owns two components), full covariances."""
    g = torch.Generator().manual_seed(0)
    means = torch.tensor([[-2.0, 0.5], [1.5, 1.0], [0.0, -2.0], [-0.5, 2.0]], dtype=D64)
    a = torch.randn(4, 2, 2, generator=g, dtype=D64)
    covs = 0.2 * a @ a.transpose(1, 2) + 0.05 * torch.eye(2, dtype=D64)
    weights = torch.tensor([0.2, 0.3, 0.35, 0.15], dtype=D64)
    return ClassConditionalMixture(weights, means, covs, torch.tensor([0, 1, 2, 0]), get_path(path), prediction)


def closed_form_score(field: ClassConditionalMixture, x: torch.Tensor, t: float, labels: torch.Tensor,
                      scale: float) -> torch.Tensor:
    """The guided score from the component posteriors (autograd of the exact log-densities)."""
    m = field.mixture
    tt = torch.tensor(t, dtype=D64)
    a, s = float(field.path.alpha(tt)), float(field.path.sigma(tt))

    def log_p(y: torch.Tensor, comps: list[int]) -> torch.Tensor:
        w = m.weights[comps]
        logs = torch.stack([MultivariateNormal(a * m.means[k], a * a * m.covs[k] + s * s * torch.eye(2, dtype=D64))
                            .log_prob(y) for k in comps], -1)
        return torch.logsumexp(logs + torch.log(w / w.sum()), -1)

    every = list(range(len(m.weights)))
    y = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():  # samples are independent: the gradient of the sum is each one's score
        (g_null,) = torch.autograd.grad(log_p(y, every).sum(), y)
        g_cond = torch.zeros_like(x)
        for c in labels.unique().tolist():
            own = [k for k in every if int(field.classes[k]) == c]
            (g,) = torch.autograd.grad(log_p(y, own).sum(), y)
            g_cond = torch.where((labels == c)[:, None], g, g_cond)
    return g_null + scale * (g_cond - g_null)


def score_as(prediction: str, score: torch.Tensor, x: torch.Tensor, t: float, path) -> torch.Tensor:
    """A score written as another prediction, by hand from the schedule (not through genkit's conversions)."""
    tt = torch.tensor(t, dtype=D64)
    a, s = float(path.alpha(tt)), float(path.sigma(tt))
    da, ds = float(path.d_alpha(tt)), float(path.d_sigma(tt))
    eps = -s * score
    x0 = (x - s * eps) / a
    return {"score": score, "eps": eps, "x0": x0, "velocity": da * x0 + ds * eps, "v": a * eps - s * x0}[prediction]


LABELS = torch.tensor([0, 1, 2, 0, 1, 2])


def points(n: int = 6, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 2, generator=torch.Generator().manual_seed(seed), dtype=D64)


class Counting:
    """A field that counts its calls and the batch sizes it saw."""

    def __init__(self, field):
        self.field, self.path, self.prediction = field, field.path, field.prediction
        self.num_classes, self.null_label, self.calls = field.num_classes, field.null_label, []

    def __call__(self, x, t, **cond):
        self.calls.append(x.shape[0])
        return self.field(x, t, **cond)


# --- the closed form ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", ["linear", "ddpm"])
@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_guidance_equals_the_closed_form_in_every_prediction(path, prediction):
    field = mixture(path, prediction)
    x = points()
    for t in (0.3, 0.8):
        for scale in (0.5, 2.0, 4.0):
            want = score_as(prediction, closed_form_score(field, x, t, LABELS, scale), x, t, field.path)
            for where in (None, *PREDICTIONS):  # plain guidance is the same in every parametrization
                got = guide(field, Guidance(scale, parametrization=where), LABELS)(x, t)
                torch.testing.assert_close(got, want, rtol=0, atol=1e-10)


def test_scale_zero_is_unconditional_and_one_conditional_exactly():
    field = mixture("ddpm", "eps")
    x, t = points(), 0.4
    null = torch.full_like(LABELS, field.null_label)
    for where in (None, "x0", "v"):
        assert torch.equal(guide(field, Guidance(0.0, parametrization=where), LABELS)(x, t), field(x, t, labels=null))
        for phi in (0.0, 0.7):
            g = Guidance(1.0, rescale=phi, parametrization=where)
            assert torch.equal(guide(field, g, LABELS)(x, t), field(x, t, labels=LABELS))
    # and they are the mixture's own fields: the marginal and the class's renormalised mixture
    torch.testing.assert_close(field(x, t, labels=null), field.mixture.with_prediction("eps")(x, t), rtol=0, atol=0)


def test_one_network_call_per_evaluation():
    field = Counting(mixture("linear", "velocity"))
    x = points()
    for g, batch in ((2.0, 12), (0.0, 6), (1.0, 6), (Guidance(3.0, interval=(0.0, 0.5)), 6),
                     (Guidance(3.0, interval=(0.5, 1.0)), 12), (Guidance(0.0, rescale=0.5), 12)):
        field.calls.clear()
        guide(field, g, LABELS)(x, 0.7)
        assert field.calls == [batch], (g, field.calls)
    field.calls.clear()
    sol = solve(guide(field, 2.5, LABELS), x, "heun", 6)
    assert len(field.calls) == sol.nfe == 12 and set(field.calls) == {12}


# --- interval and rescale ---------------------------------------------------------------------------------------
def test_interval_guides_only_inside_and_is_conditional_outside():
    field = mixture("linear", "x0")
    x = points()
    t = torch.tensor([0.1, 0.2, 0.35, 0.5, 0.6, 0.9], dtype=D64)  # (0.2, 0.6]: the 2nd and the 5th are edges
    g = guide(field, Guidance(3.0, interval=(0.2, 0.6)), LABELS)(x, t)
    full = guide(field, 3.0, LABELS)(x, t)
    cond = field(x, t, labels=LABELS)
    inside = torch.tensor([False, False, True, True, True, False])
    assert torch.equal(g[~inside], cond[~inside])
    torch.testing.assert_close(g[inside], full[inside], rtol=0, atol=1e-14)
    assert not torch.allclose(full[~inside], cond[~inside])  # the test would see a missing interval


@pytest.mark.parametrize("where", [None, "x0", "eps", "v"])
def test_rescale_follows_lin_et_al(where):
    field = mixture("cosine", "v")
    x, t, s = points(8, 3), 0.5, 4.0
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    p = where or "v"
    conv = field.path.convert

    def in_p(out):
        return conv(out, x, t, "v", p)

    plain = guide(field, Guidance(s, parametrization=where), labels)(x, t)
    assert torch.equal(guide(field, Guidance(s, rescale=0.0, parametrization=where), labels)(x, t), plain)
    cond = in_p(field(x, t, labels=labels))
    cfg = in_p(plain)
    full = in_p(guide(field, Guidance(s, rescale=1.0, parametrization=where), labels)(x, t))
    # phi = 1: the per-sample spread is the conditional one, the direction the guided one
    torch.testing.assert_close(full.std(1, correction=0), cond.std(1, correction=0), rtol=0, atol=1e-12)
    ratio = cond.std(1, keepdim=True, correction=0) / cfg.std(1, keepdim=True, correction=0)
    torch.testing.assert_close(full, cfg * ratio, rtol=0, atol=1e-12)
    half = in_p(guide(field, Guidance(s, rescale=0.3, parametrization=where), labels)(x, t))
    torch.testing.assert_close(half, 0.3 * cfg * ratio + 0.7 * cfg, rtol=0, atol=1e-12)
    assert not torch.allclose(ratio, torch.ones_like(ratio))


# --- every solver, the stepwise API, an SDE -------------------------------------------------------------------------
def reference_field(field: ClassConditionalMixture, labels: torch.Tensor, scale: float) -> FunctionField:
    """The closed-form guided eps field as a plain function (no wrapper involved)."""
    def fn(x, t):
        t0 = float(t[0])
        return score_as("eps", closed_form_score(field, x, t0, labels, scale), x, t0, field.path)
    return FunctionField(fn, field.path, "eps")


@pytest.mark.parametrize("name", SOLVERS.names())
def test_every_solver_runs_on_a_guided_field(name):
    field = Counting(mixture("ddpm", "eps"))
    labels = LABELS[:4]
    x = field.path.sample_prior((4, 2), generator=torch.Generator().manual_seed(0), dtype=D64)
    grid = "uniform" if name == "edm" else LogSNR(t_max=0.99, t_min=0.01)
    solver, steps = get_solver(name), 4
    got = solve(guide(field, 2.0, labels), x, solver, steps, grid, generator=torch.Generator().manual_seed(5))
    want = solve(reference_field(field.field, labels, 2.0), x, solver, steps, grid,
                 generator=torch.Generator().manual_seed(5))
    assert got.nfe == len(field.calls) and set(field.calls) == {8}
    torch.testing.assert_close(got.samples, want.samples, rtol=0, atol=1e-7)
    unguided = solve(field, x, solver, steps, grid, generator=torch.Generator().manual_seed(5), labels=labels)
    assert not torch.allclose(got.samples, unguided.samples, atol=1e-3)


def test_stepwise_api_and_labels_at_call_time():
    field = mixture("linear", "velocity")
    x = points(6, 4)
    guided = guide(field, Guidance(2.0, interval=(0.1, 0.9), rescale=0.5))
    times = torch.linspace(0.99, 0, 9, dtype=D64)
    for name in ("dpmpp_2m", "euler_maruyama"):
        solver = get_solver(name)
        gen = torch.Generator().manual_seed(0)
        state = solver.init(guided, x, times, generator=gen, labels=LABELS)
        while not state.done:
            state = solver.step(guided, state, generator=gen, labels=LABELS)
        fixed = guide(field, Guidance(2.0, interval=(0.1, 0.9), rescale=0.5), LABELS)
        whole = solve(fixed, x, solver, None, times, generator=torch.Generator().manual_seed(0))
        assert torch.equal(state.x, whole.samples)


def test_guided_sde_samples_the_tilted_class():
    """At scale 1 an SDE solver on the guided field samples p(x_0 | c): the class's own mixture moments."""
    field = mixture("ddpm", "eps")
    n = 4000
    gen = torch.Generator().manual_seed(1)
    x = field.path.sample_prior((n, 2), generator=gen, dtype=D64)
    out = solve(guide(field, Guidance(1.0), 2), x, "euler_maruyama", 100, LogSNR(t_max=0.99), generator=gen).samples
    torch.testing.assert_close(out.mean(0), field.mixture.means[2], rtol=0, atol=0.06)


# --- errors --------------------------------------------------------------------------------------------------------
def test_bad_guidance_is_a_clear_error():
    field = mixture()
    for bad in (-1.0, math.nan, math.inf, True, "2"):
        with pytest.raises(ConfigError, match="scale"):
            Guidance(bad)
    for interval in ((0.5, 0.2), (0.2, 0.2), (-0.1, 0.5), (0.1, 1.5), (0.1,), "ab", (0.1, math.nan)):
        with pytest.raises(ConfigError, match="interval"):
            Guidance(2.0, interval=interval)
    with pytest.raises(ConfigError, match="rescale"):
        Guidance(2.0, rescale=1.5)
    with pytest.raises(ConfigError, match="parametrization"):
        Guidance(2.0, parametrization="noise")
    fn = FunctionField(lambda x, t, labels: x, "linear", "velocity")
    with pytest.raises(ConfigError, match="null label"):
        guide(fn, 2.0, 1)
    fn.num_classes = None
    with pytest.raises(ConfigError, match="unconditional"):
        guide(fn, 2.0, 1, null_label=0)
    x = points()
    with pytest.raises(ConfigError, match="needs class labels"):
        guide(field, 2.0)(x, 0.5)
    with pytest.raises(ConfigError, match="twice"):
        guide(field, 2.0, 1)(x, 0.5, labels=LABELS)
    for labels, match in ((LABELS[:5], "entries"), (LABELS[None], "1-D"), (LABELS.double(), "integer"),
                          (torch.tensor([0, 1, 2, 5, 0, 1]), "not class ids")):
        with pytest.raises((ShapeError, ConfigError), match=match):
            guide(field, 2.0)(x, 0.5, labels=labels)
    with pytest.raises(ConfigError, match="not class ids"):
        guide(field, 2.0, 7)


# --- the model API -----------------------------------------------------------------------------------------------
def conditional_model(null: bool = True) -> FlowMatching:
    """A class-conditional flow-matching model (3 classes, and the null label 3 when ``null``)."""
    torch.manual_seed(0)
    net = MLP(2, hidden=16, depth=1, time_dim=8, num_classes=4 if null else 3)
    return FlowMatching(net, "linear", sample_shape=(2,), num_classes=3, null_label=3 if null else None).eval()


def test_model_sample_with_labels_and_guidance():
    model = conditional_model()
    gen = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    x = model.path.sample_prior((5, 2), generator=gen())
    labels = torch.tensor([0, 1, 2, 0, 1])
    got = model.sample(5, labels=labels, guidance=Guidance(2.5, rescale=0.5), steps=6, generator=gen())
    want = solve(guide(model, Guidance(2.5, rescale=0.5), labels), x, "heun", 6).samples
    assert torch.equal(got, want)
    assert torch.equal(model.sample(5, labels=labels.tolist(), guidance=2.5, steps=6, generator=gen()),
                       solve(guide(model, 2.5, labels), x, "heun", 6).samples)
    # labels without guidance: the plain conditional model; one int for all samples
    assert torch.equal(model.sample(5, labels=1, steps=6, generator=gen()),
                       solve(model, x, "heun", 6, labels=torch.ones(5, dtype=torch.long)).samples)
    # guidance 1 is the conditional model
    torch.testing.assert_close(model.sample(5, labels=1, guidance=1.0, steps=6, generator=gen()),
                               model.sample(5, labels=1, steps=6, generator=gen()), rtol=0, atol=0)
    out = model.rsample(5, labels=2, guidance=3.0, steps=4, generator=gen())
    out.square().sum().backward()
    assert all(p.grad is not None for p in model.net.parameters() if p.requires_grad)


def test_model_sample_errors():
    model = conditional_model()
    with pytest.raises(ConfigError, match="guidance needs labels"):
        model.sample(4, guidance=2.0)
    with pytest.raises(ShapeError, match=r"shape \[4\]"):
        model.sample(4, labels=[0, 1], guidance=2.0)
    with pytest.raises(ShapeError, match="integer"):
        model.sample(4, labels=torch.zeros(4), guidance=2.0)
    with pytest.raises(ConfigError, match="not classes"):
        model.sample(4, labels=5)
    with pytest.raises(ConfigError, match="scale"):
        model.sample(4, labels=1, guidance=-1.0)
    plain = FlowMatching(MLP(2, hidden=8, depth=1, time_dim=8), "linear", sample_shape=(2,))
    with pytest.raises(ConfigError, match="unconditional"):
        plain.sample(4, labels=1, guidance=2.0)
    no_null = conditional_model(null=False)
    with pytest.raises(ConfigError, match="null label"):
        no_null.sample(4, labels=1, guidance=2.0)
    assert isinstance(guide(model, 2.0, 1), GuidedField)


# --- samplers/sample.py --class / --guidance -------------------------------------------------------------------------
def test_sample_script_class_and_guidance(tmp_path, monkeypatch):
    import runpy
    from pathlib import Path

    from safetensors.torch import load_file

    main = runpy.run_path(str(Path(__file__).parents[1] / "samplers" / "sample.py"))["main"]
    plain = FlowMatching(MLP(2, hidden=8, depth=1, time_dim=8), "linear", sample_shape=(2,))
    genkit.save(tmp_path / "plain", plain)
    with pytest.raises(ConfigError, match="unconditional"):
        main(["--checkpoint", str(tmp_path / "plain"), "--class", "1", "--guidance", "2", "--device", "cpu"])
    with pytest.raises(ConfigError, match="need --class"):
        main(["--checkpoint", str(tmp_path / "plain"), "--guidance", "2", "--device", "cpu"])
    model = conditional_model()
    genkit.save(tmp_path / "cond", model)  # a conditional checkpoint, as train.py --conditional writes
    for bad, match in ((["--class", "7"], "out of range"), (["--class", "seven"], "neither a class id"),
                       (["--class", "1", "--guidance-rescale", "0.5"], "give --guidance")):
        with pytest.raises(ConfigError, match=match):
            main(["--checkpoint", str(tmp_path / "cond"), "--device", "cpu", *bad])
    out = tmp_path / "out"
    main(["--checkpoint", str(tmp_path / "cond"), "--n", "5", "--solver", "euler", "--steps", "4", "--device", "cpu",
          "--class", "2", "--guidance", "3", "--guidance-interval", "0.1", "0.9", "--guidance-rescale", "0.5",
          "--out", str(out)])
    x = model.path.sample_prior((5, 2), generator=torch.Generator().manual_seed(0))
    want = solve(guide(model, Guidance(3.0, interval=(0.1, 0.9), rescale=0.5), 2), x, "euler", 4).samples
    assert torch.equal(load_file(str(out / "samples.safetensors"))["samples"], want)
