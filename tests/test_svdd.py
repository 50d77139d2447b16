"""SVDD, soft value-based decoding of masked diffusion (genkit.finetune.svdd), on enumerable spaces with the exact
denoiser of a known p(x0) (test_masked's helpers):

- one candidate is the ancestral sampler draw for draw; an infinite temperature keeps its law (chi-square against
  the exact chain);
- at one step the output law has a closed form, the softmax(r / alpha)-weighted choice among M i.i.d. draws from the
  product of marginals, computed by enumeration (chi-square);
- the expected reward grows with M and falls with alpha (exactly at one step, by Monte Carlo over several);
- an indicator reward concentrates mass on its sequence far beyond its prior probability;
- NFE counts the batched candidate calls; bad input gets genkit errors naming the fix.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from test_masked import exact_chain, exact_model, frequencies, gen, sequences

from genkit.analytic import ClassConditionalMixture, GaussianMixture
from genkit.errors import ConfigError, ShapeError
from genkit.finetune import Reward, SVDDSampler
from genkit.models import FAMILIES, MaskedDiffusion
from genkit.paths import get_path
from genkit.sampling import SAMPLERS, MaskedAncestralSampler, ODESampler, get_sampler
from genkit.solvers import Ancestral, EulerMaruyama, Uniform

V, L = 3, 2
Tensor = torch.Tensor


def linear_reward(seed: int = 0, v: int = V, length: int = L) -> tuple[Reward, Tensor]:
    """A reward linear in the one-hot, ``r(x) = sum_l w[l, x_l]``, and its table over :func:`sequences`."""
    w = torch.randn(length, v, generator=gen(seed), dtype=torch.float64)
    fn = lambda x: w[torch.arange(x.shape[1]), x].sum(-1)  # noqa: E731
    return Reward(fn, name="linear"), fn(sequences(v, length))


def codes(x: Tensor, v: int = V) -> Tensor:
    return (x * v ** torch.arange(x.shape[1] - 1, -1, -1)).sum(-1)


def one_step_law(q: Tensor, r: Tensor, m: int, alpha: float) -> Tensor:
    """The exact law of one SVDD step from all-MASK: M i.i.d. draws from ``q`` (``[N]``, the product of marginals),
    one kept with probability softmax(r / alpha) (argmax with uniform ties at 0), every M-tuple enumerated."""
    tuples = torch.tensor(list(itertools.product(range(len(q)), repeat=m)))  # [N ** M, M]
    prob = q[tuples].prod(-1)
    v = r[tuples]
    if alpha == 0:
        w = (v == v.max(-1, keepdim=True).values).double()
        w = w / w.sum(-1, keepdim=True)
    elif math.isinf(alpha):
        w = torch.full_like(v, 1 / m)
    else:
        w = torch.softmax(v / alpha, -1)
    return torch.zeros(len(q), dtype=torch.float64).index_add_(0, tuples.flatten(), (prob[:, None] * w).flatten())


def chi2(samples: Tensor, expected: Tensor, v: int = V) -> float:
    keep = expected > 0
    f = frequencies(samples, v)
    assert float(f[~keep].sum()) == 0
    return float(((f[keep] - expected[keep]) ** 2 / expected[keep]).sum() * len(samples))


def test_registered_and_accepted_by_masked_models():
    assert SAMPLERS.get("svdd") is SVDDSampler
    reward, _ = linear_reward()
    s = get_sampler("svdd", reward=reward, candidates=3, alpha=0.5)
    assert isinstance(s, SVDDSampler) and s.candidates == 3 and s.guides == "masked_ancestral"
    model, _ = exact_model()
    sol = model.sample(7, sampler=s, steps=5, generator=gen(0), return_solution=True)
    assert sol.samples.shape == (7, L) and (sol.samples < V).all()  # the last step unmasks everything
    assert sol.nfe == 1 + 4 * 3 and len(sol.times) == 6  # the prior's call, then M per step but the last


@pytest.mark.parametrize("steps", [1, 3, 8])
def test_one_candidate_is_the_ancestral_sampler_draw_for_draw(steps):
    model, _ = exact_model()
    reward, _ = linear_reward()
    prior = torch.full((500, L), V)
    a = MaskedAncestralSampler(steps).sample(model, prior, generator=gen(steps))
    b = SVDDSampler(reward, candidates=1, alpha=0.0, steps=steps).sample(model, prior, generator=gen(steps))
    assert torch.equal(a.samples, b.samples)


@pytest.mark.parametrize("alpha", [1e9, math.inf])
def test_infinite_temperature_keeps_the_ancestral_law(alpha):
    model, _ = exact_model()
    reward, _ = linear_reward()
    n = 20000
    x = model.sample(n, sampler=SVDDSampler(reward, candidates=4, alpha=alpha, steps=3), generator=gen(1))
    assert chi2(x, exact_chain(model, 3)) < 30  # 8 degrees of freedom: P(chi2 > 30) ~ 2e-4


@pytest.mark.parametrize("m, alpha", [(3, 0.0), (3, 0.5), (2, 2.0)])
def test_one_step_law_is_the_weighted_choice_among_iid_draws(m, alpha):
    model, p = exact_model()
    reward, r = linear_reward()
    q = torch.outer(p.view(V, V).sum(1), p.view(V, V).sum(0)).flatten()  # the product of marginals
    assert torch.allclose(exact_chain(model, 1), q)
    n = 20000
    x = model.sample(n, sampler=SVDDSampler(reward, candidates=m, alpha=alpha, steps=1), generator=gen(2))
    law = one_step_law(q, r, m, alpha)
    assert float((law - q).abs().sum()) > 0.1  # the tilt is visible, so the test can tell the two apart
    assert chi2(x, law) < 30


def test_expected_reward_grows_with_m_and_falls_with_alpha_exactly_at_one_step():
    model, p = exact_model()
    _, r = linear_reward()
    q = torch.outer(p.view(V, V).sum(1), p.view(V, V).sum(0)).flatten()
    by_m = [float(one_step_law(q, r, m, 0.0) @ r) for m in (1, 2, 3, 4)]
    by_alpha = [float(one_step_law(q, r, 3, a) @ r) for a in (0.0, 0.3, 1.0, 5.0, math.inf)]
    assert all(a < b for a, b in zip(by_m, by_m[1:])), by_m
    assert all(a > b for a, b in zip(by_alpha, by_alpha[1:])), by_alpha
    assert by_m[0] == pytest.approx(float(q @ r)) and by_alpha[-1] == pytest.approx(float(q @ r))


def test_expected_reward_grows_with_m_and_falls_with_alpha_over_several_steps():
    model, _ = exact_model(v=3, length=3, seed=1)
    reward, _ = linear_reward(seed=1, length=3)
    n = 3000

    def mean_reward(m: int, alpha: float) -> tuple[float, float]:
        x = model.sample(n, sampler=SVDDSampler(reward, candidates=m, alpha=alpha, steps=3), generator=gen(m))
        rx = reward(x)
        return float(rx.mean()), float(rx.std()) / math.sqrt(n)

    by_m = [mean_reward(m, 0.0) for m in (1, 4, 16)]
    by_alpha = [mean_reward(8, a) for a in (0.0, 1.0, math.inf)]
    for seq, sign in ((by_m, 1), (by_alpha, -1)):
        for (a, sa), (b, sb) in zip(seq, seq[1:]):
            assert sign * (b - a) > 4 * math.hypot(sa, sb), seq


def test_an_indicator_reward_concentrates_mass_on_its_sequence():
    model, p = exact_model(v=3, length=3, seed=2)
    target = int(p.argmin())
    star = sequences(3, 3)[target]
    reward = Reward(lambda x: (x == star).all(-1).double(), name="is_star")
    n = 4000
    prior_mass = float(exact_chain(model, 3)[target])
    x = model.sample(n, sampler=SVDDSampler(reward, candidates=16, alpha=0.05, steps=3), generator=gen(3))
    hit = float((codes(x, 3) == target).double().mean())
    # SVDD-PM scores a partial state by its argmax decode, which rarely is the target before the last step; the
    # gain comes mostly from the last step's 16 tries, still ~10x the prior mass
    assert prior_mass < 0.01 and hit > 5 * prior_mass, (prior_mass, hit)


def test_sampled_values_also_guide():
    model, _ = exact_model()
    reward, _ = linear_reward()
    n = 3000
    plain = reward(model.sample(n, steps=3, generator=gen(4))).mean()
    guided = reward(model.sample(n, sampler=SVDDSampler(reward, candidates=8, steps=3, value="sample"),
                                 generator=gen(4))).mean()
    assert float(guided) > float(plain) + 0.3


def test_bad_input_names_the_fix():
    reward, _ = linear_reward()
    with pytest.raises(ConfigError, match="candidates must be a positive integer"):
        SVDDSampler(reward, candidates=0)
    with pytest.raises(ConfigError, match="alpha must be a number >= 0"):
        SVDDSampler(reward, alpha=-0.1)
    with pytest.raises(ConfigError, match="value must be one of"):
        SVDDSampler(reward, value="mean")
    with pytest.raises(ConfigError, match="steps must be a positive integer"):
        SVDDSampler(reward, steps=0)
    with pytest.raises(ConfigError, match="svdd.*does not take"):
        get_sampler("svdd", steps=4)  # no reward: by name alone it cannot be built
    model, _ = exact_model()
    wrong = SVDDSampler(Reward(lambda x: x.double(), name="per_token"), candidates=2, steps=2)
    with pytest.raises(ShapeError, match="per_token.*must return \\[batch\\]"):
        model.sample(4, sampler=wrong, generator=gen(0))
    with pytest.raises(ConfigError, match="SVDD needs a masked discrete diffusion model"):
        SVDDSampler(reward, steps=2).sample(torch.nn.Linear(2, 2), torch.zeros(3, 2))
    with pytest.raises(ConfigError, match="no conditioning"):
        SVDDSampler(reward, steps=2).sample(model, torch.full((3, L), V), y=1)
    assert MaskedDiffusion.example()[0].get_sampler(SVDDSampler(reward)).name == "svdd"
    flow, _ = FAMILIES.get("flow_matching").example()  # another family refuses it through its sampler check
    with pytest.raises(ConfigError):
        flow.sample(2, sampler=SVDDSampler(reward))


# --- continuous models with a stochastic solver -------------------------------------------------------------------

MEANS = torch.tensor([[-2.0, 0.0], [2.0, 0.0]], dtype=torch.float64)
WEIGHTS, COV = torch.tensor([0.7, 0.3], dtype=torch.float64), 0.3  # components N(m_k, 0.3 I)


def mixture() -> GaussianMixture:
    return GaussianMixture(WEIGHTS, MEANS, COV * torch.eye(2, dtype=torch.float64).expand(2, 2, 2), get_path("linear"))


class SoftValue:
    """The exact soft value ``alpha log E[exp(w . x_0 / alpha) | x_t]`` of :func:`mixture` data under the true
    reverse process: ``p(x_0 | x_t)`` is a mixture of ``N(m_k + a C S^-1 (x - a m_k), C - a^2 C S^-1 C)`` with
    ``S = a^2 C + s^2 I`` and the components' responsibilities, and a Gaussian's ``E[exp(w . x_0 / alpha)]`` is
    ``exp(w . mu / alpha + w' Sigma w / (2 alpha^2))``."""

    def __init__(self, w: Tensor, alpha: float):
        self.w, self.alpha, self.path = w, alpha, get_path("linear")

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        x, t = x.double(), t.double()
        a, s = self.path.alpha(t)[:, None], self.path.sigma(t)[:, None]
        var_t = a ** 2 * COV + s ** 2  # [N, 1]: S is isotropic
        diff = x[:, None, :] - a[:, None] * MEANS[None]  # [N, K, 2]
        log_resp = torch.log(WEIGHTS) - 0.5 * diff.square().sum(-1) / var_t - torch.log(2 * math.pi * var_t)
        mu = MEANS[None] + (a * COV / var_t)[:, None] * diff
        post_var = COV - a ** 2 * COV ** 2 / var_t  # [N, 1]
        tilt = mu @ self.w / self.alpha + post_var * float(self.w @ self.w) / (2 * self.alpha ** 2)
        return self.alpha * (torch.logsumexp(log_resp + tilt, -1) - torch.logsumexp(log_resp, -1))


@pytest.mark.parametrize("solver, grid", [("ancestral", "uniform"), ("euler_maruyama", Uniform(t_max=0.99)),
                                          (Ancestral(eta=0.5), "uniform")])
def test_one_candidate_is_the_stochastic_solver_draw_for_draw(solver, grid):
    g, reward = mixture(), Reward(lambda x: x[:, 0].double(), name="x")
    x = torch.randn(300, 2, generator=gen(0))
    for steps in (2, 7):  # (one step onto t = 0 is deterministic: refused, below)
        plain = ODESampler(solver, steps, grid).sample(g, x, generator=gen(steps))
        one = SVDDSampler(reward, candidates=1, steps=steps, solver=solver, grid=grid).sample(g, x,
                                                                                              generator=gen(steps))
        assert torch.equal(plain.samples, one.samples) and plain.nfe == one.nfe and torch.equal(plain.times, one.times)


def test_one_candidate_samples_a_diffusion_model_as_its_solver_does():
    model, _ = FAMILIES.get("diffusion").example()  # denoise_end: the last grid time is t_eps, then E[x_0 | x_t]
    reward = Reward(lambda x: x.flatten(1).sum(-1), name="sum")
    for steps in (1, 5):
        plain = model.sample(40, solver="ancestral", steps=steps, generator=gen(3), return_solution=True)
        one = model.sample(40, sampler=SVDDSampler(reward, candidates=1, solver="ancestral", steps=steps),
                           generator=gen(3), return_solution=True)
        assert torch.equal(plain.samples, one.samples) and plain.nfe == one.nfe == steps + 1
        four = model.sample(40, sampler=SVDDSampler(reward, candidates=4, solver="ancestral", steps=steps),
                            generator=gen(3), return_solution=True)
        assert four.nfe == 2 * steps + 1 + 4 * steps - steps  # a transition and 4 x0 calls a step, the last x0


@pytest.mark.parametrize("solver, grid", [("ancestral", "uniform"), ("euler_maruyama", Uniform(t_max=0.99))])
def test_mean_reward_grows_with_m_on_a_mixture(solver, grid):
    g, c = mixture(), torch.tensor([1.0, 1.0], dtype=torch.float64)
    reward = Reward(lambda x: -(x.double() - c).square().sum(-1), name="near_c")
    n, steps = 2000, 8
    x = torch.randn(n, 2, generator=gen(0))

    def mean_reward(m: int) -> tuple[float, float, int]:
        sol = SVDDSampler(reward, candidates=m, steps=steps, solver=solver, grid=grid).sample(g, x, generator=gen(m))
        rx = reward(sol.samples)
        return float(rx.mean()), float(rx.std()) / math.sqrt(n), sol.nfe

    by_m = [mean_reward(m) for m in (1, 2, 4, 8)]
    for (a, sa, _), (b, sb, _) in zip(by_m, by_m[1:]):
        assert b - a > 4 * math.hypot(sa, sb), by_m
    # a transition a step, and M x0 calls on the candidates of every step but the last (onto t = 0, deterministic)
    assert [nfe for *_, nfe in by_m] == [steps + (m > 1) * m * (steps - 1) for m in (1, 2, 4, 8)], by_m


def test_component_weights_move_to_the_tilted_mixture_as_m_grows():
    """For a linear reward ``w . x`` the target ``p(x) exp(w . x / alpha)`` is the mixture with components
    ``N(m_k + C w / alpha, C)`` and weights ``∝ w_k exp(w . m_k / alpha + w' C w / (2 alpha^2))`` (equal C: the
    second factor cancels). Exact soft values approach it as M grows (the remaining gap, ~0.07 at M = 16, is the
    finite-M selection and the 20-step chain's own error; 0.03 at 50 steps and M = 64); SVDD-PM's values
    ``r(E[x_0 | x_t])`` ignore the posterior spread and stop short (~0.09)."""
    g, w, alpha = mixture(), torch.tensor([1.0, 0.0], dtype=torch.float64), 2.0
    reward = Reward(lambda x: x.double() @ w, name="linear")
    tilted = WEIGHTS * torch.exp(MEANS @ w / alpha)
    tilted = float(tilted[1] / tilted.sum())  # the right component's weight, 0.76 (prior 0.3)
    n, steps = 4000, 20
    x = torch.randn(n, 2, generator=gen(0))
    se = math.sqrt(0.25 / n)
    for value, final in ((SoftValue(w, alpha), 0.1), ("posterior_mean", 0.13)):
        gaps = []
        for m in (1, 4, 16):
            sampler = SVDDSampler(reward, candidates=m, alpha=alpha, steps=steps, value=value, solver="ancestral")
            right = float((sampler.sample(g, x, generator=gen(m)).samples[:, 0] > 0).double().mean())
            gaps.append(abs(right - tilted))
            if m == 1:
                assert abs(right - float(WEIGHTS[1])) < 0.03  # the pretrained chain: the prior's weight
        assert all(a - b > 8 * se for a, b in zip(gaps, gaps[1:])) and gaps[-1] < final, (value, gaps)


def test_conditioning_reaches_every_candidate():
    f = ClassConditionalMixture(torch.tensor([0.5, 0.5]), torch.tensor([[-2.0], [2.0]]), 0.1 * torch.ones(2, 1, 1),
                                torch.tensor([0, 1]), get_path("linear"), "x0")
    x, labels = torch.randn(500, 1, generator=gen(0)), torch.randint(0, 3, (500,), generator=gen(1))  # 2: null
    reward = Reward(lambda x: x[:, 0].double(), name="x")
    plain = ODESampler("ancestral", 6).sample(f, x, generator=gen(2), labels=labels)
    one = SVDDSampler(reward, candidates=1, steps=6, solver="ancestral").sample(f, x, generator=gen(2), labels=labels)
    assert torch.equal(plain.samples, one.samples)
    guided = SVDDSampler(reward, candidates=8, steps=6, solver="ancestral").sample(f, x, generator=gen(2),
                                                                                  labels=labels).samples[:, 0]
    # class 0 lives at -2 +- 0.3: the reward pushes it right, yet no candidate leaves its class; the null label's
    # mixture moves to the right component, well beyond its plain half
    assert bool((guided[labels == 0] < -0.5).all()) and bool((guided[labels == 1] > 0.5).all())
    assert float((guided[labels == 2] > 0).double().mean()) > 0.9 > 0.7 > float((plain.samples[labels == 2] > 0)
                                                                                 .double().mean())


def test_continuous_bad_input_names_the_fix():
    reward = Reward(lambda x: x[:, 0].double(), name="x")
    with pytest.raises(ConfigError, match="Gaussian transition.*'heun'.*ancestral"):
        SVDDSampler(reward, solver="heun")
    with pytest.raises(ConfigError, match="noise='fresh'"):
        SVDDSampler(reward, solver=EulerMaruyama(noise="brownian_tree"))
    with pytest.raises(ConfigError, match="value='sample'.*continuous"):
        SVDDSampler(reward, solver="ancestral", value="sample")
    with pytest.raises(ConfigError, match="adds no noise"):
        SVDDSampler(reward, candidates=2, steps=4, solver=Ancestral(eta=0.0)).sample(mixture(), torch.zeros(3, 2))
    with pytest.raises(ConfigError, match="give a stochastic solver"):
        SVDDSampler(reward, steps=4).sample(mixture(), torch.zeros(3, 2))
    masked, _ = exact_model()
    with pytest.raises(ConfigError, match="drop solver="):
        SVDDSampler(reward, steps=2, solver="ancestral").sample(masked, torch.full((3, L), V))
    with pytest.raises(ConfigError):  # a masked model refuses the continuous sampler through its sampler check
        masked.sample(2, sampler=SVDDSampler(reward, solver="ancestral"))
    model, _ = FAMILIES.get("flow_matching").example()
    with pytest.raises(ConfigError, match="cannot sample with .*or solver= a stochastic solver"):
        model.sample(2, sampler=SVDDSampler(reward))
    s = model.get_sampler(SVDDSampler(reward, solver="euler_maruyama", grid=Uniform(t_max=0.99)))
    assert s.guides == "ode" and "euler_maruyama" in s.describe()
