"""The reward interface (genkit.finetune.rewards): one [batch] float per sample, checked on every call; gradients
to the input only for a differentiable reward, and a soft one-hot of tokens gives the tokens' reward exactly;
a network reward is frozen."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from genkit.errors import ConfigError, DataError, ShapeError
from genkit.finetune import Reward, as_reward
from genkit.frozen import Frozen

TARGET = torch.tensor([0, 1, 2, 3])  # reward: how many positions carry the motif's token


def motif_tokens(x):
    return (x == TARGET).float().sum(-1)


def motif_soft(p):  # the same reward on one-hots [B, L, V]: sum_l p[l, TARGET[l]]
    return p.gather(-1, TARGET.expand(p.shape[0], -1)[..., None]).squeeze(-1).sum(-1)


def test_differentiable_reward_on_soft_one_hots_equals_the_token_reward_and_has_its_gradient():
    tokens = torch.randint(0, 4, (16, 4), generator=torch.Generator().manual_seed(0))
    hard = torch.nn.functional.one_hot(tokens, 4).float().requires_grad_(True)
    r = Reward(motif_soft, differentiable=True)
    out = r(hard)
    assert torch.equal(out, Reward(motif_tokens)(tokens))
    out.sum().backward()
    expected = torch.zeros(16, 4, 4)
    expected[:, torch.arange(4), TARGET] = 1.0  # d r / d p[l, v] = [v == TARGET[l]]
    assert torch.equal(hard.grad, expected)


def test_a_non_differentiable_reward_runs_without_gradients():
    x = torch.randn(5, 3, requires_grad=True)
    out = Reward(lambda v: v.pow(2).sum(-1), name="norm")(x)
    assert not out.requires_grad and torch.allclose(out, x.detach().pow(2).sum(-1))
    assert as_reward(lambda v: v.sum(-1)).differentiable is False
    r = Reward(motif_soft, differentiable=True)
    assert as_reward(r) is r and as_reward(r, differentiable=True) is r
    with pytest.raises(ConfigError, match="declared differentiable=True.*differentiable=False"):
        as_reward(r, differentiable=False)


def test_a_network_reward_is_frozen_and_held_as_a_frozen_part():
    net = nn.Sequential(nn.Linear(3, 8), nn.Dropout(0.5), nn.Linear(8, 1))
    r = Reward(lambda x: net(x).squeeze(-1), name="predictor")
    module_reward = Reward(net.train())
    assert module_reward.module is net and not net.training
    assert not any(p.requires_grad for p in net.parameters())
    x = torch.randn(6, 3)
    assert torch.equal(r(x), r(x))  # eval mode: no dropout noise
    holder = Frozen(reward=net)
    assert list(holder.parameters()) == [] and list(holder.state_dict()) == []


@pytest.mark.parametrize("fn, error, message", [
    (lambda x: x.sum(-1, keepdim=True), ShapeError, r"shape \(4, 1\) for a batch of 4.*squeeze its last"),
    (lambda x: x.sum(), ShapeError, r"shape \(\) for a batch of 4"),
    (lambda x: [1.0] * 4, ShapeError, "returned list"),
    (lambda x: (x > 0).sum(-1), ShapeError, "dtype torch.int64.*floating-point"),
    (lambda x: torch.where(torch.arange(4) == 2, torch.nan, x.sum(-1)), DataError,
     r"1 non-finite value\(s\) of 4 \(first at sample 2: nan\).*nan_to_num"),
])
def test_bad_rewards_name_the_fix(fn, error, message):
    with pytest.raises(error, match=message):
        Reward(fn, name="bad")(torch.randn(4, 3))


def test_bad_declarations():
    with pytest.raises(ConfigError, match="must be callable"):
        Reward(3.0)
    with pytest.raises(ConfigError, match="True or False"):
        Reward(motif_tokens, differentiable="yes")
    with pytest.raises(ConfigError, match="already a Reward"):
        Reward(Reward(motif_tokens))
    with pytest.raises(ShapeError, match=r"batch tensor \[batch, \.\.\.\]"):
        Reward(motif_tokens)(torch.tensor(1.0))
