"""SEPO (genkit.finetune.sepo): the concrete-score identity on an enumerable table (all y exact, Hamming-1 not),
SNIS convergence, clipping gradients under both reductions, GRPO group advantages, a short fine-tuning run with a
non-differentiable reward, and the ConfigErrors."""

from __future__ import annotations

import itertools

import pytest
import torch

from genkit.errors import ConfigError
from genkit.finetune import SEPO, Reward
from genkit.finetune.sepo import group_advantages, neighbour_log_scores, sepo_surrogate, snis_weights
from genkit.models import MaskedDiffusion

SPACE = torch.tensor(list(itertools.product(range(4), repeat=4)))  # the 256 sequences of L = 4, V = 4


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _grads(theta: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return torch.autograd.grad(f, theta, retain_graph=True)[0]


def test_identity_exact_over_all_y_not_over_hamming1() -> None:
    theta = torch.randn(256, generator=gen(0), dtype=torch.float64, requires_grad=True)
    logq = theta.log_softmax(0)
    q = logq.exp().detach()
    ham = (SPACE[:, None, :] != SPACE[None, :, :]).sum(-1)
    for x in (0, 17, 200):
        lhs = _grads(theta, logq[x])
        log_s = logq - logq[x]  # s(x)_y = q(y) / q(x)
        rhs_all = -_grads(theta, (q * log_s).sum())
        torch.testing.assert_close(lhs, rhs_all, rtol=1e-10, atol=1e-12)
        nb = (ham[x] == 1).to(q.dtype)  # the implemented form: Hamming-1 neighbours only (12 of 256)
        rhs_h1 = -_grads(theta, (nb * q * log_s).sum())
        rel = float((lhs - rhs_h1).norm() / lhs.norm())
        assert rel > 0.5, rel  # restricting to neighbours breaks the identity (it is a neighbourhood estimate)
        cos = float(torch.nn.functional.cosine_similarity(lhs, rhs_h1, 0))
        assert cos > 0  # ...but still points uphill for log q(x) on this table


def test_mdlm_neighbour_scores_are_conditional_ratios() -> None:
    model, _ = MaskedDiffusion.example()
    x = torch.tensor([[0, 1, 2], [3, 3, 0]])
    log_s, logp = neighbour_log_scores(model, x, 1 / 3)
    assert log_s.shape == (2, 3, 4)
    assert torch.equal(log_s.gather(-1, x[..., None]), torch.zeros(2, 3, 1))
    xm = x.clone()
    xm[:, 1] = model.mask_id
    direct = model.logits(xm, 1 / 3)[:, 1, :4]
    torch.testing.assert_close(logp[:, 1], direct)


def test_snis_estimate_approaches_exact_q_as_m_grows() -> None:
    logq = torch.randn(256, generator=gen(1), dtype=torch.float64).log_softmax(0)
    unnorm = logq + 3.0  # SNIS needs the target only up to a constant
    tvs = []
    for m in (4, 64, 1024, 16384):
        tv = 0.0
        for rep in range(4):
            z = torch.randint(256, (m,), generator=gen(10 * m + rep))  # uniform proposal
            w = snis_weights(unnorm[z])
            est = torch.zeros(256, dtype=torch.float64).index_add_(0, z, w)
            tv += 0.5 * float((est - logq.exp()).abs().sum()) / 4
        tvs.append(tv)
    assert all(a > b for a, b in zip(tvs, tvs[1:])), tvs
    assert tvs[-1] < 0.08, tvs


def _branch_grads(adv: torch.Tensor, ratio: torch.Tensor, reduction: str) -> torch.Tensor:
    """Gradient of J w.r.t. log s for M = 1 (pi = 1), ratio set through log_s_old."""
    ls = torch.zeros(len(adv), 1, dtype=torch.float64, requires_grad=True)
    j, logs = sepo_surrogate(adv, ls, ratio.log()[:, None], clip=0.2, reduction=reduction)
    torch.testing.assert_close(logs["ratio"], ratio.mean())
    return torch.autograd.grad(j, ls)[0][:, 0]


def test_clipping_zero_gradient_per_sample_textbook() -> None:
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0, 1.0], dtype=torch.float64)
    ratio = torch.tensor([1.5, 0.5, 0.5, 1.5, 1.1], dtype=torch.float64)
    g = _branch_grads(adv, ratio, "sample")
    # A > 0, ratio > 1 + eps: clipped (the min) -> 0; A < 0, ratio < 1 - eps: clipped -> 0
    assert g[0] == 0 and g[2] == 0
    # pessimistic side keeps the unclipped gradient: -A * ratio / N per sample; inside the range too
    torch.testing.assert_close(g[[1, 3, 4]], -(adv * ratio)[[1, 3, 4]] / 5)


def test_clipping_after_batch_reduction_code_form() -> None:
    adv = torch.tensor([1.0, 1.0, -1.0], dtype=torch.float64)
    # the unclipped mean A * ratio is larger: the whole batch takes the clipped branch, where only in-range
    # ratios carry gradient (sample 2's ratio 1.1), samples 0 and 1 get exactly 0
    ratio = torch.tensor([1.5, 1.6, 1.1], dtype=torch.float64)
    g = _branch_grads(adv, ratio, "batch")
    assert g[0] == 0 and g[1] == 0 and g[2] != 0
    # the unclipped mean is smaller: every sample keeps its gradient, even outside the range (unlike textbook)
    ratio = torch.tensor([0.5, 1.3, 1.1], dtype=torch.float64)
    g = _branch_grads(adv, ratio, "batch")
    torch.testing.assert_close(g, -(adv * ratio) / 3)
    assert _branch_grads(adv, ratio, "sample")[1] == 0  # textbook clips sample 1 (A > 0, ratio > 1.2)


def test_group_advantages_normalised_and_constant_group_zero() -> None:
    r = torch.cat([torch.rand(8, generator=gen(2)) * 5, torch.ones(8), torch.tensor([0.0] * 7 + [1.0])])
    a = group_advantages(r, 8).reshape(3, 8)
    torch.testing.assert_close(a.mean(1), torch.zeros(3), atol=1e-6, rtol=0)
    torch.testing.assert_close(a[[0, 2]].std(1), torch.ones(2), atol=1e-6, rtol=0)
    assert torch.equal(a[1], torch.zeros(8)) and torch.isfinite(a).all()


def test_fine_tuning_raises_reward_of_own_samples() -> None:
    model, _ = MaskedDiffusion.example()
    reward = Reward(lambda x: (x[:, 1] == 2).float(), name="pos1_is_2")  # long tokens, non-differentiable

    def mean_reward() -> float:
        with torch.no_grad():
            return float(reward(model.sample(512, steps=3, generator=gen(123))).mean())

    before = mean_reward()
    obj = SEPO(model, reward, group=8, inner=5, steps=3, batch_size=4)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    fracs = []
    for k in range(40):
        loss, logs = obj.loss(None, gen(k))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        fracs.append(float(logs["clip_frac"]))
        if k % 5 == 0:  # a fresh rollout batch: the old policy is the current one, every ratio is 1
            assert float(logs["ratio"]) == pytest.approx(1.0) and fracs[-1] == 0.0
    after = mean_reward()
    assert int(obj.loss_steps) == 40 and int(obj.rollout_at) == 35
    # measured: 0.227 -> 0.953 over 40 steps; mean clip fraction 0.30 (inner passes only: 0.38)
    assert before < 0.3 and after > 0.8, (before, after)
    assert 0.05 < sum(fracs) / len(fracs) < 0.6, fracs


def test_rollout_batch_is_resume_state() -> None:
    model, _ = MaskedDiffusion.example()
    reward = Reward(lambda x: (x[:, 0] == 1).float())
    obj = SEPO(model, reward, group=4, inner=3, steps=2, batch_size=2)
    obj.loss(None, gen(0))
    state = obj.state_dict()
    assert {"loss_steps", "rollout_at", "rollout_x", "rollout_adv", "rollout_log_s"} <= set(state)
    assert not any(k.startswith("frozen") for k in state)
    twin = SEPO(MaskedDiffusion.example()[0], reward, group=4, inner=3, steps=2, batch_size=2)
    twin.load_state_dict(state)
    a, _ = obj.loss(None, gen(1))
    b, _ = twin.loss(None, gen(1))
    assert torch.equal(a, b)


def test_kl_to_reference_zero_at_reference() -> None:
    import copy

    pre, _ = MaskedDiffusion.example()
    obj = SEPO(copy.deepcopy(pre), Reward(lambda x: x[:, 0].float()), reference=pre, kl=0.1, group=2, steps=2,
               batch_size=2)
    _, logs = obj.loss(None, gen(0))
    assert abs(float(logs["kl"])) < 1e-6


def test_bad_input_config_errors() -> None:
    model, _ = MaskedDiffusion.example()
    r = Reward(lambda x: x[:, 0].float())
    SEPO(model, Reward(lambda x: x[:, 0].float(), differentiable=True), steps=2)  # differentiable is fine
    SEPO(model, lambda x: x[:, 0].float(), steps=2)  # a plain callable is wrapped
    cases = [
        (dict(reward=3), "Reward"),
        (dict(group=1), "group"),
        (dict(inner=0), "inner"),
        (dict(clip=0.0), "clip"),
        (dict(clip=-0.1), "clip"),
        (dict(snis=0), "snis"),
        (dict(model=torch.nn.Linear(2, 2)), "mdlm"),
        (dict(reduction="mean"), "reduction"),
        (dict(kl=0.1), "reference"),
    ]
    for over, word in cases:
        kw = dict(model=model, reward=r) | over
        with pytest.raises(ConfigError, match=word):
            SEPO(kw.pop("model"), kw.pop("reward"), **kw)
    with pytest.raises(ConfigError, match="data-free"):
        SEPO(model, r, steps=2).loss(torch.zeros(2, 3), gen())


def test_trainer_runs_sepo_data_free(tmp_path) -> None:
    from genkit.train import TrainConfig, Trainer

    model, _ = MaskedDiffusion.example()
    obj = SEPO(model, Reward(lambda x: (x[:, 1] == 2).float()), group=4, inner=3, steps=2, batch_size=2)
    cfg = TrainConfig(steps=7, lr=1e-2, cpu=True, out_dir=str(tmp_path), checkpoint_every=None, ema_decay=None,
                      progress=False, log_every=3)
    Trainer(obj, cfg).fit()
    assert int(obj.loss_steps) == 7 and int(obj.rollout_at) == 6  # draws at loss steps 0, 3, 6
    assert "rollout_x" in obj.state_dict() and not any(k.startswith("frozen") for k in obj.state_dict())


def test_a_model_without_trainable_parameters_is_refused():
    """A copy of a model another objective froze (Frozen sets requires_grad=False) would train nothing."""
    from genkit.models import MaskedDiffusion

    model, _ = MaskedDiffusion.example()
    model.requires_grad_(False)
    with pytest.raises(ConfigError, match=r"no trainable parameters.*requires_grad_\(True\)"):
        SEPO(model, lambda x: (x == 0).float().sum(-1))
