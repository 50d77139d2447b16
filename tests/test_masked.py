"""Masked discrete diffusion (genkit.models.masked, ``mdlm``) and its schedules (genkit.models.masking): the
mathematics on enumerable spaces, with an exact denoiser built from a known p(x0) by enumeration.

- the forward masking rate is 1 - alpha_t (binomial check); the schedules' derivatives and ELBO weights against
  finite differences;
- SUBS: no mass on MASK, exact carry-over at unmasked positions;
- the continuous-time negative ELBO of the exact denoiser equals -log p(x0) for every x0 (Gauss-Legendre in t,
  every mask pattern enumerated, both schedules), its Monte-Carlo estimate nll_bound is unbiased, and for a
  learned denoiser it bounds -log p_theta(x) of the model's own (many-step) process from above;
- the ancestral sampler's output law equals the exact law of its factorised reverse chain (computed by
  enumeration) for several step counts (chi-square over 20000 samples), which tends to p(x0) as steps grow;
  caching unchanged states changes no sample and saves network calls;
- the concrete score equals the exact ratio p_t(x with l := y) / p_t(x) of the noisy marginal;
- a brief training of the default TokenMLP lowers the loss and moves samples toward the data;
- bad input gets genkit errors naming the fix.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from genkit.errors import ConfigError, ShapeError
from genkit.models import MaskedDiffusion
from genkit.models.masking import MASK_SCHEDULES, get_schedule
from genkit.nets.tokens import TokenMLP
from genkit.sampling import MaskedAncestralSampler


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def sequences(v: int, length: int, mask: bool = False) -> Tensor:
    """All sequences over tokens ``0..v-1`` (``0..v`` with MASK = v when ``mask``), ``[n, length]``."""
    return torch.tensor(list(itertools.product(range(v + int(mask)), repeat=length)), dtype=torch.long)


class ExactDenoiser(nn.Module):
    """The true ``log p(x0^l = y | x_t)`` of a distribution ``p`` over all sequences, by enumeration: the
    posterior over the sequences that agree with ``x_t`` at its unmasked positions. It ignores ``t``."""

    def __init__(self, p: Tensor, v: int, length: int):
        super().__init__()
        self.v = v
        self.register_buffer("seqs", sequences(v, length))
        self.register_buffer("p", p.double())

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        if x.is_floating_point():
            x = x.argmax(-1)
        agree = ((x[:, None, :] == self.v) | (x[:, None, :] == self.seqs[None])).all(-1)  # [B, n]
        w = agree.double() * self.p
        marg = torch.einsum("bn,nly->bly", w, nn.functional.one_hot(self.seqs, self.v).double())
        return (marg / w.sum(-1)[:, None, None]).clamp_min(1e-300).log()


def exact_model(v=3, length=2, schedule="log_linear", seed=0) -> tuple[MaskedDiffusion, Tensor]:
    p = torch.distributions.Dirichlet(torch.ones(v ** length)).sample() if seed is None else \
        torch.tensor(np.random.default_rng(seed).dirichlet(np.ones(v ** length)))
    p = p.double() / p.sum()
    return MaskedDiffusion(ExactDenoiser(p, v, length), vocab_size=v, length=length, schedule=schedule), p


def exact_chain(model: MaskedDiffusion, steps: int) -> Tensor:
    """The exact law over data sequences of the factorised reverse chain on the uniform grid of ``steps``,
    re-derived here: a masked position moves to y with p(y | x_t)(a_s - a_t) / (1 - a_t), stays MASK with
    (1 - a_s) / (1 - a_t); an unmasked one stays. Returns ``[V ** L]`` in the order of :func:`sequences`."""
    v, length = model.vocab_size, model.length
    states = sequences(v, length, mask=True)  # [S, L] over 0..V
    index = {tuple(s.tolist()): i for i, s in enumerate(states)}
    dist = torch.zeros(len(states), dtype=torch.float64)
    dist[index[(v,) * length]] = 1.0
    times = torch.linspace(1, 0, steps + 1, dtype=torch.float64)
    for k in range(steps):
        t, s = float(times[k]), float(times[k + 1])
        a_t, a_s = (float(model.schedule.alpha(torch.tensor(x, dtype=torch.float64))) for x in (t, s))
        p0 = model.logits(states, t).double().exp()[..., :v]  # [S, L, V]
        per = torch.zeros(len(states), length, v + 1, dtype=torch.float64)
        per[..., :v] = p0 * (a_s - a_t) / (1 - a_t)
        per[..., v] = (1 - a_s) / (1 - a_t)
        masked = states == v
        per = torch.where(masked[..., None], per, nn.functional.one_hot(states, v + 1).double())
        trans = torch.ones(len(states), len(states), dtype=torch.float64)
        for pos in range(length):
            trans = trans * per[:, pos, states[:, pos]]  # [from, to]
        dist = dist @ trans
    data = sequences(v, length)
    return dist[[index[tuple(s.tolist())] for s in data]]


def frequencies(samples: Tensor, v: int) -> Tensor:
    codes = (samples * v ** torch.arange(samples.shape[1] - 1, -1, -1)).sum(-1)
    return torch.bincount(codes, minlength=v ** samples.shape[1]).double() / len(samples)


def exact_nelbo(model: MaskedDiffusion, x: Tensor, nodes: int = 64) -> Tensor:
    """``int_0^1 -alpha'/(1 - alpha) E_mask[sum_masked -log p(x^l | x_t)] dt`` per sequence ``[B]``, every
    mask pattern enumerated and Gauss-Legendre in t."""
    z, w = np.polynomial.legendre.leggauss(nodes)
    total = torch.zeros(len(x), dtype=torch.float64)
    patterns = list(itertools.product((0, 1), repeat=x.shape[1]))
    for zi, wi in zip(z, w):
        t = torch.tensor((zi + 1) / 2, dtype=torch.float64)
        a = float(model.schedule.alpha(t))
        weight = -float(model.schedule.weight(t))
        inner = torch.zeros(len(x), dtype=torch.float64)
        for m in patterns:
            m = torch.tensor(m, dtype=torch.bool)
            if not m.any():
                continue
            prob = (1 - a) ** int(m.sum()) * a ** int((~m).sum())
            x_t = torch.where(m, model.mask_id, x)
            logp = model.logits(x_t, float(t)).double().gather(-1, x[..., None])[..., 0]
            inner += prob * (-logp * m).sum(-1)
        total += wi / 2 * weight * inner
    return total


# --- (1) the forward process and (4) the schedules ---------------------------------------------------------
@pytest.mark.parametrize("name", MASK_SCHEDULES.names())
def test_forward_masking_rate_is_one_minus_alpha(name):
    model, _ = exact_model(schedule=name)
    n = 20000
    x0 = torch.randint(0, 3, (n, 2), generator=gen(0))
    for t in (0.1, 0.5, 0.9):
        x_t = model.mask(x0, t, gen(1))
        rate = float((x_t == model.mask_id).double().mean())
        q = float(model.schedule.mask_prob(torch.tensor(t)))
        assert abs(rate - q) < 4 * math.sqrt(q * (1 - q) / (2 * n)), (t, rate, q)
        assert torch.equal(x_t[x_t != model.mask_id], x0[x_t != model.mask_id])  # the rest is kept
    t = torch.tensor([0.2, 0.8]).repeat_interleave(n // 2)  # per-sequence times
    x_t = model.mask(x0, t, gen(2))
    for half, tt in ((slice(0, n // 2), 0.2), (slice(n // 2, n), 0.8)):
        q = float(model.schedule.mask_prob(torch.tensor(tt)))
        assert abs(float((x_t[half] == model.mask_id).double().mean()) - q) < 4 * math.sqrt(q * (1 - q) / n)


@pytest.mark.parametrize("name", MASK_SCHEDULES.names())
def test_schedule_derivative_and_elbo_weight_against_finite_differences(name):
    s = get_schedule(name)
    t = torch.linspace(0.02, 0.98, 49, dtype=torch.float64)
    h = 1e-6
    fd = (s.alpha(t + h) - s.alpha(t - h)) / (2 * h)
    assert torch.allclose(s.dalpha(t), fd, rtol=1e-7, atol=1e-9)
    assert torch.allclose(s.weight(t), fd / (1 - s.alpha(t)), rtol=1e-6)
    assert float(s.alpha(torch.tensor(0.0))) == 1 and abs(float(s.alpha(torch.tensor(1.0)))) < 1e-12
    assert (s.weight(t) < 0).all()
    expected = {"log_linear": (1 - t, -1 / t), "cosine": (torch.cos(math.pi * t / 2), None)}[name]
    assert torch.allclose(s.alpha(t), expected[0])
    if expected[1] is not None:
        assert torch.allclose(s.weight(t), expected[1])
    assert torch.allclose(s.mask_prob(t), 1 - s.alpha(t))


# --- (2) SUBS ---------------------------------------------------------------------------------------------
def test_subs_never_predicts_mask_and_carries_unmasked_tokens_over_exactly():
    model, _ = MaskedDiffusion.example()
    x0 = torch.randint(0, 4, (64, 3), generator=gen(0))
    x_t = model.mask(x0, torch.rand(64, generator=gen(1)), gen(2))
    logp = model.logits(x_t, torch.rand(64, generator=gen(3)))
    assert logp.shape == (64, 3, 5)
    assert torch.isneginf(logp[..., 4]).all()
    unmasked = x_t != 4
    assert unmasked.any() and (~unmasked).any()
    assert torch.equal(logp.exp()[unmasked], nn.functional.one_hot(x_t[unmasked], 5).float())
    assert torch.allclose(logp[~unmasked].exp().sum(-1), torch.ones(int((~unmasked).sum())))
    assert torch.isfinite(logp[~unmasked][:, :4]).all()
    # a soft one-hot that is exactly one-hot is the same input as the token ids
    t = torch.full((64,), 0.4)
    assert torch.allclose(model.logits(nn.functional.one_hot(x_t, 5).float(), t), model.logits(x_t, t))


# --- (3) the ELBO, the bound and the sampler on an enumerable space ------------------------------------------
@pytest.mark.parametrize("name", MASK_SCHEDULES.names())
def test_exact_denoiser_negative_elbo_equals_minus_log_p_for_every_sequence(name):
    model, p = exact_model(v=3, length=2, schedule=name)
    data = sequences(3, 2)
    assert torch.allclose(exact_nelbo(model, data), -p.log(), rtol=1e-6)


def test_nll_bound_is_an_unbiased_monte_carlo_estimate():
    model, p = exact_model(v=3, length=2)
    x = sequences(3, 2)[[1, 5]].repeat_interleave(4000, 0)
    est = model.nll_bound(x, n_mc=4, generator=gen(0)).double().view(2, 4000)
    se = est.std(-1) / math.sqrt(4000)
    assert ((est.mean(-1) - (-p.log()[[1, 5]])).abs() < 4 * se).all(), (est.mean(-1), -p.log()[[1, 5]])


def test_negative_elbo_bounds_minus_log_p_of_a_learned_denoiser():
    torch.manual_seed(0)
    net = TokenMLP(vocab_size=2, length=2, hidden=16, depth=1, embed_dim=4, time_dim=8).double()
    model = MaskedDiffusion(net, vocab_size=2, length=2)
    with torch.no_grad():
        p_theta = exact_chain(model, 2000)  # the model's own continuous-time law, to O(1 / steps)
        bound = exact_nelbo(model, sequences(2, 2))
    assert abs(float(p_theta.sum()) - 1) < 1e-9
    assert (bound >= -p_theta.log() - 1e-3).all(), (bound, -p_theta.log())
    assert (bound - (-p_theta.log())).max() > 1e-3  # a non-exact denoiser has a gap


def test_one_ancestral_step_samples_the_product_of_marginals():
    model, p = exact_model(v=3, length=2)
    marg = [p.view(3, 3).sum(1), p.view(3, 3).sum(0)]
    assert torch.allclose(exact_chain(model, 1), torch.outer(*marg).flatten())


@pytest.mark.parametrize("steps", [1, 3, 8])
def test_ancestral_sampler_law_matches_the_exact_chain(steps):
    model, p = exact_model(v=3, length=2)
    n = 20000
    sol = model.sample(n, steps=steps, generator=gen(steps), return_solution=True)
    assert sol.samples.dtype == torch.long and sol.samples.shape == (n, 2)
    assert (sol.samples < 3).all()  # the last step unmasks everything
    expected = exact_chain(model, steps)
    chi2 = float(((frequencies(sol.samples, 3) - expected) ** 2 / expected).sum() * n)
    assert chi2 < 30, chi2  # 8 degrees of freedom: P(chi2 > 30) ~ 2e-4


def test_the_chain_tends_to_the_data_distribution():
    model, p = exact_model(v=3, length=2)
    tv = [0.5 * float((exact_chain(model, k) - p).abs().sum()) for k in (1, 4, 16, 256)]
    assert all(a > b for a, b in zip(tv, tv[1:])), tv
    assert tv[-1] < 0.01, tv


def test_caching_unchanged_states_changes_no_sample_and_saves_calls():
    model, _ = exact_model(v=3, length=2)  # the exact denoiser ignores t: caching is exact
    cached = MaskedAncestralSampler(64).sample(model, torch.full((50, 2), 3), generator=gen(0))
    fresh = MaskedAncestralSampler(64, cache=False).sample(model, torch.full((50, 2), 3), generator=gen(0))
    assert torch.equal(cached.samples, fresh.samples)
    assert fresh.nfe == 64 and cached.nfe < 64


# --- (5) the concrete score ---------------------------------------------------------------------------------
def test_concrete_score_is_the_ratio_of_noisy_marginals():
    v, length, t = 3, 2, 0.4
    model, p = exact_model(v=v, length=length)
    a = 1 - t
    data, states = sequences(v, length), sequences(v, length, mask=True)
    factor = torch.where(states[:, None, :] == v, torch.tensor(1 - a, dtype=torch.float64),
                         (states[:, None, :] == data[None]).double() * a)  # [S, n, L]
    p_t = (factor.prod(-1) * p).sum(-1)  # the noisy marginal over all states
    index = {tuple(s.tolist()): i for i, s in enumerate(states)}
    score = model.concrete_score(states, torch.full((len(states),), t, dtype=torch.float64))  # float64 alpha_t
    checked = 0
    for i, s in enumerate(states.tolist()):
        for pos in range(length):
            if s[pos] != v:
                assert (score[i, pos] == 0).all()
                continue
            for y in range(v):
                other = list(s)
                other[pos] = y
                assert float(score[i, pos, y]) == pytest.approx(float(p_t[index[tuple(other)]] / p_t[i]), rel=1e-9)
                checked += 1
    assert checked == 24  # 8 (state, masked position) pairs, 3 tokens each


# --- (6) training -------------------------------------------------------------------------------------------
def test_brief_training_lowers_the_loss_and_moves_samples_toward_the_data():
    v, length = 3, 2
    data = sequences(v, length)
    p = torch.softmax(3.0 * (data[:, 0] == data[:, 1]).double() + torch.arange(9) / 9, 0)  # correlated positions
    torch.manual_seed(0)
    model = MaskedDiffusion(TokenMLP(vocab_size=v, length=length, hidden=32, depth=1, embed_dim=8, time_dim=8),
                            vocab_size=v, length=length)
    held = data[torch.multinomial(p, 2048, replacement=True, generator=gen(0))]

    def tv() -> float:
        return 0.5 * float((frequencies(model.sample(4000, steps=16, generator=gen(1)), v) - p).abs().sum())

    def bound() -> float:
        with torch.no_grad():
            return float(model.nll_bound(held, n_mc=4, generator=gen(2)).mean())

    before, tv_before = bound(), tv()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = gen(3)
    for _ in range(250):
        batch = data[torch.multinomial(p, 128, replacement=True, generator=g)]
        loss, logs = model.loss(batch, generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after, tv_after = bound(), tv()
    entropy = float(-(p * p.log()).sum())
    assert after < before - 0.2 and after < entropy + 0.15, (before, after, entropy)
    assert tv_after < 0.5 * tv_before and tv_after < 0.08, (tv_before, tv_after)


# --- (7) bad input ------------------------------------------------------------------------------------------
def test_bad_input_names_the_fix():
    model, batch = MaskedDiffusion.example()  # V = 4, L = 3
    with pytest.raises(ShapeError, match=r"0\.\.3.*vocab_size=6"):
        model.loss(torch.tensor([[0, 5, 1]]), generator=gen(0))
    with pytest.raises(ShapeError, match=r"long tensor.*\.long\(\)"):
        model.loss(batch.float(), generator=gen(0))
    with pytest.raises(ShapeError, match="length=4"):
        model.loss(torch.zeros(2, 4, dtype=torch.long), generator=gen(0))
    with pytest.raises(ShapeError, match=r"soft one-hot \[B, 3, 5\].*vocab_size \+ 1 = 5"):
        model.logits(torch.rand(2, 3, 4), 0.5)
    with pytest.raises(ShapeError, match=r"0\.\.4 \(4 = MASK\)"):
        model.logits(torch.tensor([[0, 7, 1]]), 0.5)
    with pytest.raises(ConfigError, match="positive integer"):
        MaskedAncestralSampler(0)
    with pytest.raises(ConfigError, match="positive integer"):
        model.sample(2, steps=0)
    with pytest.raises(ConfigError, match="mask schedule"):
        MaskedDiffusion(model.net, vocab_size=4, length=3, schedule="linear")
    with pytest.raises(ConfigError, match=r"t_min.*\(0, 1\)"):
        MaskedDiffusion(model.net, vocab_size=4, length=3, t_min=0)
    with pytest.raises(ShapeError, match="no MASK column"):
        MaskedDiffusion(TokenMLP(5, 3, hidden=8, depth=1), vocab_size=4, length=3).logits(batch, 0.5)
    with pytest.raises(ConfigError, match="no pathwise derivative"):
        model.rsample(2)
    with pytest.raises(ConfigError, match="samples with"):
        model.sample(2, sampler="ode")


def test_config_round_trip_rebuilds_the_same_sampler_output():
    model, _ = MaskedDiffusion.example()
    clone = MaskedDiffusion.from_config(model.config())
    clone.load_state_dict(model.state_dict())
    assert clone.config() == model.config()
    assert torch.equal(model.sample(8, steps=5, generator=gen(0)), clone.sample(8, steps=5, generator=gen(0)))


def test_the_generic_trainer_fits_token_data_and_genkit_load_rebuilds_the_model(tmp_path):
    import genkit
    from genkit.train import TrainConfig, Trainer

    model, _ = MaskedDiffusion.example()
    data = torch.randint(0, 4, (128, 3), generator=gen(0))
    Trainer(model, TrainConfig(steps=4, batch_size=32, out_dir=tmp_path, progress=False, checkpoint_every=4,
                               log_every=2, ema_decay=None)).fit(data)
    loaded = genkit.load(tmp_path)
    assert isinstance(loaded, MaskedDiffusion) and loaded.config() == model.config()
    model.eval()
    assert torch.equal(loaded.sample(6, steps=4, generator=gen(1)), model.sample(6, steps=4, generator=gen(1)))


@pytest.mark.parametrize("backbone", ["sequence_transformer", "conv_dna", "token_mlp"])
def test_every_sequence_backbone_drives_the_family(backbone, tmp_path):
    """The backbones of genkit.nets.sequence (and TokenMLP) plug into mdlm unchanged: SUBS holds on their logits,
    the loss reaches every parameter, sampling gives tokens, and save / load rebuilds the same model."""
    import genkit
    from genkit.nets import build

    config = {"sequence_transformer": {"dim": 16, "depth": 1, "heads": 2}, "conv_dna": {"channels": 8, "depth": 2},
              "token_mlp": {"hidden": 16, "depth": 1, "embed_dim": 4, "time_dim": 8}}[backbone]
    torch.manual_seed(0)
    model = MaskedDiffusion(build({"name": backbone, "vocab_size": 4, "length": 6, **config}), vocab_size=4, length=6)
    x = torch.randint(0, 4, (8, 6), generator=torch.Generator().manual_seed(1))
    xt = model.mask(x, torch.full((8,), 0.5), generator=torch.Generator().manual_seed(2))
    logp = model.logits(xt, torch.full((8,), 0.5))
    kept = xt != 4
    assert torch.isneginf(logp[..., 4]).all()
    assert torch.equal(logp.argmax(-1)[kept], xt[kept]) and torch.all(logp.exp().sum(-1).sub(1).abs() < 1e-5)
    loss, _ = model.loss(x, generator=torch.Generator().manual_seed(3))
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in model.parameters())
    s = model.sample(5, steps=4, generator=torch.Generator().manual_seed(4))
    assert s.shape == (5, 6) and s.dtype == torch.long and bool(((s >= 0) & (s < 4)).all())
    genkit.save(tmp_path / "m", model)
    again = genkit.load(tmp_path / "m")
    assert torch.equal(again.sample(5, steps=4, generator=torch.Generator().manual_seed(4)), s)
