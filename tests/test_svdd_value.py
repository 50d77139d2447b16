"""SVDD-MC, the regression-trained value network (genkit.finetune.svdd_value), against exact conditional
expectations:

- on the enumerable masked toy (V = 3, L = 3) the pretrained chain's value ``E[r(x_0) | x_t]`` at every state and
  grid time is a backward recursion through its exact transition matrices; the rollouts' per-state mean rewards
  agree with it within Monte-Carlo error (chi-square), and the fitted network within twice that error;
- on 2-D Gaussian data with a linear reward the ancestral chain's value is ``w . E[x_0 | x_t]`` in closed form (the
  chain's transition means composed, which equals the analytic denoiser to rounding); the fitted MLP matches it and
  guides as SVDD-PM (then exact) does;
- the fitted network guides SVDD as well as the exact values do, at one denoiser call a step;
- bad input gets genkit errors naming the fix.
"""

from __future__ import annotations

import math

import pytest
import torch
from test_masked import exact_model, gen, sequences
from test_svdd import linear_reward
from torch import nn

from genkit.analytic import Gaussian
from genkit.errors import ConfigError, ShapeError
from genkit.fields import as_x0
from genkit.finetune import Reward, Rollouts, SVDDSampler, ValueNetwork, collect_rollouts, fit_value
from genkit.nets import MLP, TokenMLP
from genkit.paths import get_path
from genkit.sampling import ODESampler
from genkit.solvers import get_solver

Tensor = torch.Tensor


def chain_values(model, steps: int, r: Tensor) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """All states ``[S, L]`` (tokens and MASK, base V + 1 codes) and, at every grid time ``t_k``, the exact value
    ``E[r(x_0) | x_{t_k}]`` and law of the pretrained masked chain (``[S]`` each), by enumeration: the transition
    matrix of one step is the product over positions of the per-position reverse probabilities."""
    v, length = model.vocab_size, model.length
    states = sequences(v, length, mask=True)
    times = torch.linspace(1, 0, steps + 1, dtype=torch.float64)
    mats = []
    for k in range(steps):
        t, s = float(times[k]), float(times[k + 1])
        a_t, a_s = (float(model.schedule.alpha(torch.tensor(x, dtype=torch.float64))) for x in (t, s))
        p0 = model.logits(states, torch.full((len(states),), t)).double().exp()[..., :v]
        per = torch.zeros(len(states), length, v + 1, dtype=torch.float64)
        per[..., :v] = p0 * (a_s - a_t) / (1 - a_t)
        per[..., v] = (1 - a_s) / (1 - a_t)
        per = torch.where((states == v)[..., None], per, nn.functional.one_hot(states, v + 1).double())
        trans = torch.ones(len(states), len(states), dtype=torch.float64)
        for pos in range(length):
            trans = trans * per[:, pos, states[:, pos]]  # [from, to]
        mats.append(trans)
    data = (states < v).all(-1)
    r_all = torch.zeros(len(states), dtype=torch.float64)
    r_all[data] = r  # sequences() without MASK lists the data states in the same order
    values = [r_all]
    for trans in reversed(mats):
        values.insert(0, trans @ values[0])
    law = torch.zeros(len(states), dtype=torch.float64)
    law[-1] = 1.0  # all MASK is the last state
    laws = [law]
    for trans in mats:
        laws.append(laws[-1] @ trans)
    return states, values, laws


def code(x: Tensor, v: int) -> Tensor:
    return (x * (v + 1) ** torch.arange(x.shape[1] - 1, -1, -1)).sum(-1)


def test_rollouts_and_fitted_network_match_the_exact_chain_value_on_the_enumerable_toy():
    torch.manual_seed(0)  # the network's initial weights
    model, _ = exact_model(v=3, length=3, seed=1)
    reward, r = linear_reward(seed=1, length=3)
    steps, n = 3, 2000
    states, values, laws = chain_values(model, steps, r)
    second = chain_values(model, steps, r ** 2)[1]  # E[r^2 | x_t], for the exact conditional variance
    assert torch.equal(code(states, 3), torch.arange(len(states)))
    data = collect_rollouts(model, reward, n, steps=steps, generator=gen(0))
    assert data.x.shape == (2 * n, 3) and torch.equal(data.r, reward(data.samples).double().repeat(2))
    times = torch.linspace(1, 0, steps + 1, dtype=torch.float64)
    assert torch.equal(data.t, times[1:-1].repeat_interleave(n))
    net = ValueNetwork(TokenMLP(3, 3, hidden=64, depth=2))
    losses = fit_value(net, data, epochs=60, batch_size=500, lr=3e-3, generator=gen(1))
    assert losses[-1] < 0.8 * losses[0]
    chi2, dof, err_net, err_mc = 0.0, 0, 0.0, 0.0
    with torch.no_grad():
        for k in (1, 2):
            on = data.t == times[k]
            c = code(data.x[on], 3)
            count = torch.bincount(c, minlength=len(states)).double()
            total = torch.zeros(len(states), dtype=torch.float64).index_add_(0, c, data.r[on])
            seen = count > 0
            mean = total[seen] / count[seen]
            exact, law = values[k][seen], laws[k][seen]
            var = (second[k][seen] - exact ** 2).clamp(min=0)
            ok = var > 1e-12  # fully unmasked states: the reward is fixed, the mean exact
            assert torch.allclose(mean[~ok], exact[~ok], atol=1e-9)
            chi2 += float(((mean[ok] - exact[ok]) ** 2 / (var[ok] / count[seen][ok])).sum())
            dof += int(ok.sum())
            pred = net(states[seen], torch.full((int(seen.sum()),), float(times[k]))).double()
            err_net += float((law * (pred - exact) ** 2).sum())
            err_mc += float((law * var / count[seen]).sum())  # the per-state mean's own squared error
    # per-state mean rewards are the exact values up to Monte-Carlo error: chi-square with `dof` degrees of freedom
    assert chi2 < dof + 5 * math.sqrt(2 * dof), (chi2, dof)
    # the network, visitation-weighted, within twice the error of the per-state means (measured ~1.1x)
    assert math.sqrt(err_net / 2) < 2 * math.sqrt(err_mc / 2), (math.sqrt(err_net / 2), math.sqrt(err_mc / 2))


def test_fitted_mlp_matches_the_closed_form_value_of_gaussian_data_and_a_linear_reward():
    torch.manual_seed(0)
    g = Gaussian(torch.tensor([1.0, -0.5]), torch.tensor([[0.5, 0.1], [0.1, 0.3]]), get_path("linear"))
    w = torch.tensor([1.0, 2.0], dtype=torch.float64)
    reward = Reward(lambda x: x.double() @ w, name="linear")
    steps, n, solver = 4, 2000, get_solver("ancestral")
    times = torch.linspace(1, 0, steps + 1, dtype=torch.float64)
    data = collect_rollouts(g, reward, prior=torch.randn(n, 2, generator=gen(0)), steps=steps, solver="ancestral",
                            generator=gen(1))
    net = ValueNetwork(MLP(2, hidden=64, depth=2))
    fit_value(net, data, epochs=60, batch_size=500, lr=3e-3, generator=gen(2))
    test = collect_rollouts(g, reward, prior=torch.randn(n, 2, generator=gen(5)), steps=steps, solver="ancestral",
                            generator=gen(6))
    sq, spread = 0.0, 0.0
    with torch.no_grad():
        for k in range(1, steps):
            on = test.t == times[k]
            x = test.x[on]
            state = solver.init(g, x, times)._replace(n=k)
            while not state.done:  # every transition mean is affine in x, so E[x_0 | x_k] composes the means
                state = state.advance(solver.transition(g, state).mean, 1)
            exact = state.x.double() @ w
            # the ancestral chain of exact Gaussian data keeps E[x_0 | x_t] = the analytic denoiser's
            assert torch.allclose(exact, reward(as_x0(g)(x, float(times[k]))), atol=1e-5)  # float32 states
            sq += float((net(x, test.t[on]).double() - exact).square().mean())
            spread += float(exact.var())
    rmse, sd = math.sqrt(sq / (steps - 1)), math.sqrt(spread / (steps - 1))
    assert rmse < 0.15 * sd, (rmse, sd)  # measured ~0.09 of the value's spread (residual sd of r given x_t ~0.8)
    # here SVDD-PM's r(E[x_0 | x_t]) is the exact value, so the network guides as it does, at a transition a step
    prior = torch.randn(n, 2, generator=gen(8))
    runs = [SVDDSampler(reward, candidates=4, steps=steps, solver="ancestral", value=v).sample(g, prior,
                                                                                              generator=gen(9))
            for v in ("posterior_mean", net)]
    (pm, by_net), plain = (reward(sol.samples) for sol in runs), reward(ODESampler("ancestral", steps).sample(
        g, prior, generator=gen(9)).samples)
    assert [sol.nfe for sol in runs] == [steps + 4 * (steps - 1), steps]
    se = math.hypot(float(pm.std()), float(by_net.std())) / math.sqrt(n)
    assert float(pm.mean() - plain.mean()) > 0.5 and abs(float(by_net.mean() - pm.mean())) < 4 * se


def test_the_fitted_network_guides_like_the_exact_values_at_one_denoiser_call_a_step():
    torch.manual_seed(0)
    model, _ = exact_model(v=3, length=3, seed=1)
    reward, r = linear_reward(seed=1, length=3)
    steps, n = 3, 3000
    states, values, _ = chain_values(model, steps, r)
    net = ValueNetwork(TokenMLP(3, 3, hidden=64, depth=2))
    fit_value(net, collect_rollouts(model, reward, 2000, steps=steps, generator=gen(0)), epochs=60,
              batch_size=500, lr=3e-3, generator=gen(1))

    def exact(x: Tensor, t: Tensor) -> Tensor:  # the table of chain values at grid time k = (1 - t) steps
        k = torch.round((1 - t.double()) * steps).long()
        return torch.stack(values)[k, code(x, 3)]

    def run(value) -> tuple[Tensor, int]:
        sol = model.sample(n, sampler=SVDDSampler(reward, candidates=8, steps=steps, value=value), generator=gen(7),
                           return_solution=True)
        return reward(sol.samples), sol.nfe

    plain = reward(model.sample(n, steps=steps, generator=gen(7)))
    (by_exact, nfe_exact), (by_net, nfe_net) = run(exact), run(net)
    assert nfe_exact == nfe_net == steps  # the prior's call, then one on the kept sample a step but the last
    se = math.hypot(float(by_exact.std()), float(by_net.std())) / math.sqrt(n)
    gain = float(by_exact.mean() - plain.mean())
    assert gain > 0.5, gain
    assert abs(float(by_net.mean() - by_exact.mean())) < max(4 * se, 0.1 * gain), (by_net.mean(), by_exact.mean())


def test_bad_input_names_the_fix():
    model, _ = exact_model()
    reward, _ = linear_reward()
    with pytest.raises(ConfigError, match="steps >= 2"):
        collect_rollouts(model, reward, 4, steps=1)
    with pytest.raises(ConfigError, match="either n .* or prior="):
        collect_rollouts(model, reward)
    with pytest.raises(ConfigError, match="pass its prior draw as prior="):
        collect_rollouts(Gaussian(torch.zeros(1), torch.eye(1), get_path("linear")), reward, 4, solver="ancestral")
    with pytest.raises(ConfigError, match="features="):
        ValueNetwork(nn.Linear(2, 2))
    with pytest.raises(ConfigError, match="epochs must be a positive integer"):
        fit_value(ValueNetwork(TokenMLP(3, 2, hidden=8, depth=1)), collect_rollouts(model, reward, 4, steps=2),
                  epochs=0)
    with pytest.raises(ConfigError, match="data must be Rollouts"):
        fit_value(ValueNetwork(TokenMLP(3, 2, hidden=8, depth=1)), (torch.zeros(2), torch.zeros(2)))
    with pytest.raises(ConfigError, match="value network value"):
        SVDDSampler(reward, value="network")  # the trained network itself is the value
    wide = SVDDSampler(reward, candidates=2, steps=2, value=lambda x, t: torch.zeros(x.shape[0], 1))
    with pytest.raises(ShapeError, match="one floating value per candidate"):
        model.sample(3, sampler=wide, generator=gen(0))
    assert isinstance(collect_rollouts(model, reward, 4, steps=2, generator=gen(0)), Rollouts)
