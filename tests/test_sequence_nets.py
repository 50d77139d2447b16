"""Sequence denoisers (genkit.nets.sequence): logits shapes, soft one-hots equal to ids, rotary relative positions,
permutation behaviour, adaLN at init, time conditioning, config round trips, gradients, bad input."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from genkit.errors import ConfigError, ShapeError
from genkit.nets import NETS, ConvDNA, SequenceTransformer, build
from genkit.nets.sequence import rotary

V, L, B = 4, 7, 3


def small(kind: str, **kw):
    torch.manual_seed(0)
    if kind == "conv":
        return ConvDNA(V, L, channels=16, depth=3, **kw).eval()
    return SequenceTransformer(V, L, dim=16, depth=2, heads=2, positions=kind, **kw).eval()


KINDS = ["rotary", "learned", "none", "conv"]


def ids(generator_seed: int = 0) -> torch.Tensor:
    return torch.randint(0, V + 1, (B, L), generator=torch.Generator().manual_seed(generator_seed))


@pytest.mark.parametrize("kind", KINDS)
def test_logits_shape_and_soft_one_hot_of_ids_is_exactly_the_ids(kind):
    net = small(kind)
    x, t = ids(), torch.rand(B)
    out = net(x, t)
    assert out.shape == (B, L, V) and out.dtype == torch.float32 and torch.isfinite(out).all()
    assert torch.equal(net(F.one_hot(x, V + 1).float(), t), out)
    assert torch.equal(net(x, 0.4), net(x, torch.full((B,), 0.4)))
    soft = torch.softmax(torch.randn(B, L, V + 1), -1)  # a genuinely soft state embeds as the mixture of rows
    assert torch.allclose(net.embed.weight.T @ soft[0, 0], (soft @ net.embed.weight)[0, 0])
    assert torch.isfinite(net(soft, t)).all()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # mixed precision keeps the two paths identical
        assert torch.equal(net(F.one_hot(x, V + 1).float(), t), net(x, t))


@pytest.mark.parametrize("kind", KINDS)
def test_build_round_trip_gives_identical_outputs(kind):
    net = small(kind)
    config = json.loads(json.dumps(net.config()))
    assert config["name"] in NETS
    torch.manual_seed(1)
    clone = build(config).eval()
    clone.load_state_dict(net.state_dict())
    x, t = ids(), torch.rand(B)
    assert torch.equal(clone(x, t), net(x, t)) and clone.config() == net.config()


def test_rotary_scores_depend_only_on_the_relative_offset():
    torch.manual_seed(0)
    n, d = 9, 8
    q, k = torch.randn(d, dtype=torch.float64), torch.randn(d, dtype=torch.float64)
    qr, kr = rotary(q.expand(n, d)), rotary(k.expand(n, d))  # the same vector placed at every position
    scores = qr @ kr.T  # scores[i, j] = rot_i(q) . rot_j(k)
    for offset in range(-n + 1, n):
        diag = torch.diagonal(scores, offset)
        assert torch.allclose(diag, diag[0].expand_as(diag), atol=1e-12)  # a function of i - j only
    assert not torch.allclose(torch.diagonal(scores, 0)[0], torch.diagonal(scores, 3)[0])  # and it does depend on it
    assert torch.allclose(rotary(q.expand(n, d)).norm(dim=-1), q.norm().expand(n))  # rotations keep norms
    assert torch.equal(rotary(q[None])[0], q)  # position 0 is not rotated
    with pytest.raises(ShapeError, match="even"):
        rotary(torch.randn(3, 5))


@pytest.mark.parametrize("kind", KINDS)
def test_permutation_behaviour(kind):
    net = small(kind)
    x, t = ids(), torch.rand(B)
    perm = torch.randperm(L, generator=torch.Generator().manual_seed(3))
    permuted_out, out_permuted = net(x[:, perm], t), net(x, t)[:, perm]
    if kind == "none":  # no positions: attention and position-wise layers commute with permutations
        assert torch.allclose(permuted_out, out_permuted, atol=1e-5)
    else:  # rotary and learned positions, and convolutions, see the order
        assert not torch.allclose(permuted_out, out_permuted, atol=1e-3)


@pytest.mark.parametrize("kind", KINDS)
def test_all_masked_input_is_position_symmetric_only_without_absolute_positions(kind):
    net = small(kind)
    out = net(torch.full((B, L), V), torch.ones(B))  # t = 1: every token is the mask
    same = torch.allclose(out, out[:, :1].expand_as(out), atol=1e-5)
    assert same == (kind in ("rotary", "none"))  # learned positions, and the conv's zero padding, break the tie


@pytest.mark.parametrize("kind", ["rotary", "conv"])
def test_learns_to_unmask_a_fixed_batch(kind):
    net = small(kind).train()
    g = torch.Generator().manual_seed(0)
    x0 = torch.randint(0, V, (8, L), generator=g)
    masked = torch.rand(8, L, generator=g) < 0.5
    xt = torch.where(masked, torch.full_like(x0, V), x0)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        opt.zero_grad()
        loss = F.cross_entropy(net(xt, torch.full((8,), 0.5)).flatten(0, 1), x0.flatten())
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0]


def test_blocks_start_as_plain_pre_norm_blocks_independent_of_time():
    net = small("rotary")
    block = net.blocks[0]
    assert torch.count_nonzero(block.modulation.weight) == 0 and torch.count_nonzero(block.modulation.bias) == 0
    h = torch.randn(B, L, 16)
    t1, t2 = torch.randn(B, 16), torch.randn(B, 16)
    with torch.no_grad():
        plain = h + block.attn(F.layer_norm(h, (16,)))
        plain = plain + block.mlp(F.layer_norm(plain, (16,)))
        assert torch.allclose(block(h, t1), plain, atol=1e-6) and torch.equal(block(h, t1), block(h, t2))


@pytest.mark.parametrize("kind", KINDS)
def test_time_conditions_the_logits(kind):
    net = small(kind)
    x = ids()
    assert not torch.allclose(net(x, 0.1), net(x, 0.9), atol=1e-4)
    if kind != "conv":  # after training moves the modulation the blocks see t too
        with torch.no_grad():
            net.blocks[0].modulation.weight.normal_(0, 0.1)
        h = torch.randn(B, L, 16)
        a, b = net.blocks[0](h, torch.randn(B, 16)), net.blocks[0](h, torch.randn(B, 16))
        assert not torch.allclose(a, b)


@pytest.mark.parametrize("kind", KINDS)
def test_gradient_reaches_every_parameter(kind):
    net = small(kind).train()
    x = F.one_hot(ids(), V + 1).float().requires_grad_(True)  # DRAKES backpropagates into the soft state
    target = torch.randint(0, V, (B, L))
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    for _ in range(2):  # the zero-initialised modulation gets a gradient at step 1 and passes one on at step 2
        opt.zero_grad()
        loss = F.cross_entropy(net(x, torch.rand(B)).flatten(0, 1), target.flatten())
        loss.backward()
        opt.step()
    missing = [n for n, p in net.named_parameters() if p.grad is None or not torch.count_nonzero(p.grad)]
    assert not missing, f"no gradient reached {missing}"
    assert torch.count_nonzero(x.grad)


@pytest.mark.parametrize("kind", KINDS)
def test_bad_input_names_the_fix(kind):
    net = small(kind)
    with pytest.raises(ShapeError, match=r"0\.\.4 \(4 is the mask token\).*vocab_size"):
        net(torch.full((B, L), V + 1), 0.5)
    with pytest.raises(ShapeError, match=r"0\.\.4"):
        net(torch.full((B, L), -1), 0.5)
    with pytest.raises(ShapeError, match=r"\[B, L, 5\].*mask channel"):
        net(torch.rand(B, L, V), 0.5)
    with pytest.raises(ShapeError, match=r"\[B, L\]"):
        net(ids()[0], 0.5)
    with pytest.raises(ShapeError, match="dtype torch.bool"):
        net(ids().bool(), 0.5)
    with pytest.raises(ShapeError, match=r"shape \[batch\]"):
        net(ids(), torch.rand(B + 1))
    with pytest.raises(ShapeError, match="int64"):
        net(ids(), torch.zeros(B, dtype=torch.long))
    short = ids()[:, : L - 2]
    if kind == "learned":
        with pytest.raises(ShapeError, match=r"length 7, got length 5.*positions='rotary'"):
            net(short, 0.5)
    else:
        assert net(short, 0.5).shape == (B, L - 2, V)


def test_bad_configs():
    with pytest.raises(ConfigError, match="positions"):
        SequenceTransformer(V, L, positions="sinusoidal")
    with pytest.raises(ConfigError, match="divisible by heads"):
        SequenceTransformer(V, L, dim=18, heads=4)
    with pytest.raises(ConfigError, match="even head dim"):
        SequenceTransformer(V, L, dim=12, heads=4)
    with pytest.raises(ConfigError, match="vocab_size"):
        SequenceTransformer(0, L)
    with pytest.raises(ConfigError, match="dropout"):
        ConvDNA(V, L, dropout=1.0)
    with pytest.raises(ConfigError, match="kernel_size must be odd"):
        ConvDNA(V, L, kernel_size=8)
    with pytest.raises(ConfigError, match="dilations"):
        ConvDNA(V, L, dilations=[1, 0])
    with pytest.raises(ConfigError, match="length"):
        build({"name": "conv_dna", "vocab_size": V, "length": 0})


def test_conv_dna_defaults_are_the_drakes_model():
    net = ConvDNA(4, 200)
    assert len(net.convs) == 20 and net.channels == 128
    assert [c.dilation[0] for c in net.convs[:5]] == [1, 1, 4, 16, 64]
    assert net.embed.weight.shape == (5, 128)  # 4 bases + mask
    x = torch.randint(0, 5, (2, 200))
    assert net(x, torch.rand(2)).shape == (2, 200, 4)


def test_float64_and_default_sizes_run():
    net = SequenceTransformer(V, L, dim=16, depth=1, heads=2).double()
    out = net(F.one_hot(ids(), V + 1).double(), torch.rand(B, dtype=torch.float64))
    assert out.dtype == torch.float64
    assert SequenceTransformer(V, L).config()["dim"] == 128
