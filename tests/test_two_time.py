"""Two-time networks (genkit.nets.two_time) beyond the secant tests: forward-mode AD through every registered
one against central finite differences in float64 (MeanFlow's JVP), the class-conditional TwoTimeUNet, and
dropout in MLP / TwoTimeMLP / TwoTimeUNet with the same mask in every pass of a JVP.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from genkit.errors import ConfigError, ShapeError
from genkit.nets import MLP, FourierTimeEmbedding, UNet, build
from genkit.nets.two_time import TWO_TIME_NETS, TwoTimeMLP, TwoTimeUNet, to_two_time
from genkit.nets.two_time import build as build_two_time

SMALL_UNET = {"block_out_channels": (8, 16), "norm_num_groups": 4}  # the default blocks: AttnDownBlock2D included


def tiny(name: str, dropout: float = 0.0, num_classes: int | None = None):
    """A tiny net of each registered kind (the test below fails if one is registered without it) and x's shape."""
    if name == "two_time_mlp":
        return TwoTimeMLP(3, hidden=16, depth=2, time_dim=8, num_classes=num_classes, dropout=dropout), (3, 3)
    if name == "two_time_unet":
        kwargs = {"dropout": dropout} if dropout else None
        return TwoTimeUNet(8, **SMALL_UNET, num_classes=num_classes, unet2d_kwargs=kwargs), (2, 1, 8, 8)
    raise KeyError(name)


def test_every_two_time_net_has_a_tiny_example():
    for name in TWO_TIME_NETS.names():
        net, shape = tiny(name)
        assert net.name == name and net(torch.randn(*shape), 0.5, 0.2).shape == shape


def same_mask(fn, *args, seed: int = 1):
    """``fn(*args)`` with the global RNG reset to ``seed`` and restored after: every call draws the same
    dropout mask (what a JVP and its finite differences need)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return fn(*args)


# Two variants per net: plain, and class-conditional with dropout on (train mode).
VARIANTS = {"plain": (0.0, None), "labels_dropout": (0.3, 3)}


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("name", TWO_TIME_NETS.names())
def test_jvp_equals_central_differences_in_float64(name, variant):
    dropout, k = VARIANTS[variant]
    torch.manual_seed(0)
    net, shape = tiny(name, dropout, k)
    net = net.double().train(dropout > 0)
    with torch.no_grad():  # move the zero-initialised gap embedding off zero, so s matters
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    b = shape[0]
    x = torch.randn(*shape, dtype=torch.float64)
    v = torch.randn_like(x)
    t = 0.1 + 0.8 * torch.rand(b, dtype=torch.float64)
    s = t * torch.rand(b, dtype=torch.float64)
    y = None if k is None else torch.randint(0, k, (b,))
    f = (lambda x, t, s: net(x, t, s)) if y is None else (lambda x, t, s: net(x, t, s, y))
    if dropout:  # the mask is drawn: same RNG state, same output; another state, another output
        assert torch.equal(same_mask(f, x, t, s), same_mask(f, x, t, s))
        assert not torch.allclose(same_mask(f, x, t, s), same_mask(f, x, t, s, seed=2))
    one, zero = torch.ones_like(t), torch.zeros_like(t)
    h = 1e-6
    tangents = {}
    with sdpa_kernel(SDPBackend.MATH):  # the fused CPU / CUDA attention kernels have no forward-mode AD
        for dx, dt, ds in ((v, one, zero), (0 * v, zero, one)):  # MeanFlow's (v, 1, 0), then s alone
            out, tangent = same_mask(torch.func.jvp, f, (x, t, s), (dx, dt, ds))
            with torch.no_grad():
                fd = (same_mask(f, x + h * dx, t + h * dt, s + h * ds)
                      - same_mask(f, x - h * dx, t - h * dt, s - h * ds)) / (2 * h)
                assert torch.allclose(out, same_mask(f, x, t, s))
            scale = tangent.abs().max()
            assert scale > 1e-3 and (tangent - fd).abs().max() <= 1e-4 * scale, (dt[0].item(), ds[0].item())
            tangents[float(dt[0])] = tangent
    assert not torch.allclose(tangents[1.0], tangents[0.0], rtol=0.1)  # t and s are different directions


def test_float64_times_are_resolved_in_float64():
    emb = FourierTimeEmbedding(8).double()
    t = torch.tensor([0.3], dtype=torch.float64)
    assert not torch.equal(emb(t), emb(t + 1e-12))  # float32 rounding of t would merge them
    e32, t32 = FourierTimeEmbedding(8), torch.rand(5)
    arg = t32[:, None] * e32.freqs  # float32 (and bf16 / fp16, promoted) times: the float32 embedding as before
    assert torch.equal(e32(t32), torch.cat([arg.sin(), arg.cos()], -1)) and e32(t32.half()).dtype == torch.float32
    unet = UNet(8, **SMALL_UNET)
    from diffusers.models.embeddings import Timesteps

    times = 999 * torch.rand(6)
    reference = Timesteps(8, True, 0)  # diffusers' projection as UNet2DModel builds it
    assert torch.equal(unet.unet.time_proj(times), reference(times))  # float32: diffusers' own result
    precise = unet.unet.time_proj(times.double())
    assert precise.dtype == torch.float64 and torch.allclose(precise, reference(times).double(), atol=1e-4)
    assert not torch.equal(unet.unet.time_proj(times.double() + 1e-9), precise)


@pytest.mark.parametrize("k", [None, 3])
def test_two_time_unet_runs_in_bfloat16_weights(k):
    net = TwoTimeUNet(8, **SMALL_UNET, num_classes=k).to(torch.bfloat16)  # diffusers' timestep slot took fp32 only
    x, y = torch.randn(2, 1, 8, 8, dtype=torch.bfloat16), (None if k is None else torch.tensor([0, 2]))
    assert net(x, 0.5, 0.2, y).dtype == torch.bfloat16


# --------------------------------------------------------------------------------------------- class labels
def test_conditional_two_time_unet_starts_as_the_conditional_unet():
    torch.manual_seed(0)
    one = UNet(8, **SMALL_UNET, num_classes=3).eval()
    two = to_two_time(one).eval()
    assert isinstance(two, TwoTimeUNet) and two.num_classes == 3 and two.config()["num_classes"] == 3
    x, t, y = torch.randn(4, 1, 8, 8), torch.rand(4), torch.tensor([0, 1, 2, 1])
    with torch.no_grad():
        for s in (torch.zeros(4), torch.rand(4), t):
            assert torch.equal(two(x, t, s, y), one(x, t, y))  # the label embedding is copied, the gap starts at 0
        assert not torch.allclose(two(x, t, 0.2, y), two(x, t, 0.2, torch.tensor([2, 0, 1, 0])))  # labels used
        for p in two.parameters():  # a copy: training it leaves the one-time net alone
            p.add_(0.01 * torch.randn_like(p))
        out = two(x, t, 0.2, y)
        assert not torch.equal(out, one(x, t, y)) and not torch.allclose(out, two(x, t, 0.6, y))  # s is used
        saved = json.loads(json.dumps(two.config()))
        clone = build_two_time(saved).eval()
        clone.load_state_dict(two.state_dict())
        assert torch.equal(clone(x, t, 0.2, y), out) and clone.config() == two.config()


def test_unconditional_two_time_unet_keeps_its_checkpoint_layout():
    net = TwoTimeUNet(8, **SMALL_UNET)
    keys = set(net.state_dict())
    assert {"base.unet.class_embedding.linear_1.weight", "base.unet.class_embedding.linear_2.bias"} <= keys
    assert not any(k.startswith(("gap_embed", "label_embed")) for k in keys)
    assert "num_classes" not in net.config() and net.config()["unet2d_kwargs"] == {}
    conditional = set(TwoTimeUNet(8, **SMALL_UNET, num_classes=3).state_dict())
    assert conditional - keys == {"gap_embed.linear_1.weight", "gap_embed.linear_1.bias", "gap_embed.linear_2.weight",
                                  "gap_embed.linear_2.bias", "label_embed.weight"}
    assert not any(k.startswith("base.unet.class_embedding") for k in conditional)


@pytest.mark.parametrize("name", TWO_TIME_NETS.names())
def test_two_time_labels_are_checked(name):
    net, shape = tiny(name, num_classes=3)
    plain, _ = tiny(name)
    x, b = torch.randn(*shape), shape[0]
    with pytest.raises(ConfigError, match="num_classes=3 and needs labels"):
        net(x, 0.5, 0.2)
    with pytest.raises(ConfigError, match="build it with num_classes=K"):
        plain(x, 0.5, 0.2, torch.zeros(b, dtype=torch.long))
    with pytest.raises(ShapeError, match=f"integer tensor of shape \\[{b}\\]"):
        net(x, 0.5, 0.2, torch.zeros(b + 1, dtype=torch.long))
    with pytest.raises(ShapeError, match="integer tensor"):
        net(x, 0.5, 0.2, torch.zeros(b))


def test_two_time_unet_bad_config():
    with pytest.raises(ConfigError, match="drop class_embed_type='timestep'"):
        TwoTimeUNet(8, **SMALL_UNET, num_classes=3, unet2d_kwargs={"class_embed_type": "timestep"})
    with pytest.raises(ConfigError, match="drop class_embed_type='identity'"):
        TwoTimeUNet(8, **SMALL_UNET, unet2d_kwargs={"class_embed_type": "identity"})
    with pytest.raises(ConfigError, match="num_classes must be a positive int"):
        TwoTimeUNet(8, **SMALL_UNET, num_classes=0)
    with pytest.raises(ConfigError, match="class_embed_type='timestep'"):
        to_two_time(UNet(8, **SMALL_UNET, unet2d_kwargs={"class_embed_type": "timestep"}))


# --------------------------------------------------------------------------------------------- dropout
def test_mlp_dropout_option():
    torch.manual_seed(0)
    plain = MLP(3, hidden=16, depth=2, time_dim=8)
    assert "dropout" not in plain.config()  # configs written before the option exist unchanged
    drop = MLP(3, hidden=16, depth=2, time_dim=8, dropout=0.25)
    drop.load_state_dict(plain.state_dict())  # dropout adds no weights
    assert drop.config()["dropout"] == 0.25 and build(json.loads(json.dumps(drop.config()))).config() == drop.config()
    x, t = torch.randn(64, 3), torch.rand(64)
    assert torch.equal(drop.eval()(x, t), plain(x, t))  # eval mode: no dropout
    drop.train()
    assert not torch.allclose(same_mask(drop, x, t), same_mask(drop, x, t, seed=2))
    assert not torch.allclose(same_mask(drop, x, t), plain(x, t))
    two = to_two_time(drop)
    assert two.config()["dropout"] == 0.25 and two.base.dropout == 0.25
    assert build_two_time(two.config()).config() == two.config()
    assert "dropout" not in TwoTimeMLP(3, hidden=16).config()
    for bad in (1.0, -0.1, True, "0.1"):
        with pytest.raises(ConfigError, match="dropout must be a probability"):
            MLP(3, hidden=16, dropout=bad)


def test_unet_dropout_mask_does_not_depend_on_memory_layout():
    unet = UNet(8, **SMALL_UNET, unet2d_kwargs={"dropout": 0.25}).train()
    drops = [m for m in unet.modules() if isinstance(m, torch.nn.Dropout) and m.p == 0.25]
    assert drops and all(type(m) is not torch.nn.Dropout for m in drops)
    x = torch.randn(2, 16, 4, 4)
    assert torch.equal(same_mask(drops[0], x), same_mask(torch.nn.Dropout(0.25), x))  # torch's result, contiguous
    permuted = x.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)  # the same values, channels-last strides
    assert not permuted.is_contiguous() and torch.equal(same_mask(drops[0], permuted), same_mask(drops[0], x))
    assert not torch.equal(same_mask(torch.nn.Dropout(0.25), permuted), same_mask(torch.nn.Dropout(0.25), x))


def test_unet_dropout_reaches_the_two_time_unet():
    one = UNet(8, **SMALL_UNET, unet2d_kwargs={"dropout": 0.25})
    for two in (to_two_time(one), TwoTimeUNet(8, **SMALL_UNET, num_classes=3, unet2d_kwargs={"dropout": 0.25})):
        assert two.base.unet.config.dropout == 0.25 and two.config()["unet2d_kwargs"] == {"dropout": 0.25}
        assert build_two_time(json.loads(json.dumps(two.config()))).base.unet.config.dropout == 0.25
        x, y = torch.randn(2, 1, 8, 8), (None if two.num_classes is None else torch.tensor([0, 2]))
        two.train()
        assert torch.equal(same_mask(two, x, 0.5, 0.2, y), same_mask(two, x, 0.5, 0.2, y))
        assert not torch.allclose(same_mask(two, x, 0.5, 0.2, y), same_mask(two, x, 0.5, 0.2, y, seed=2))


# --- a network's own JVP rules (forward_jvp) -----------------------------------------------------------------
OWN_JVP = [name for name in TWO_TIME_NETS.names() if callable(getattr(TWO_TIME_NETS.get(name), "forward_jvp", None))]


def test_the_mlp_has_its_own_jvp_rules():
    assert "two_time_mlp" in OWN_JVP  # the list below is not empty by accident


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("name", OWN_JVP)
def test_own_jvp_equals_torch_func_jvp_and_its_gradients_in_float64(name, variant):
    """``forward_jvp`` gives torch.func.jvp's output and tangent to 1e-12 (float64, dropout with the same mask),
    its output the ordinary forward's bit for bit, and the parameter gradients of a loss of both outputs
    (the tangent kept on the graph: Modular MeanFlow's double backward) equal to those through torch.func.jvp;
    without ``tangent_graph`` the tangent carries no graph and the output still does."""
    dropout, k = VARIANTS[variant]
    torch.manual_seed(0)
    net, shape = tiny(name, dropout, k)
    net = net.double().train(dropout > 0)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    b = shape[0]
    x, dx = torch.randn(*shape, dtype=torch.float64), torch.randn(*shape, dtype=torch.float64)
    t, s = torch.rand(b, dtype=torch.float64), torch.rand(b, dtype=torch.float64)
    dt, ds = torch.randn(b, dtype=torch.float64), torch.randn(b, dtype=torch.float64)
    cond = {} if k is None else {"y": torch.arange(b) % k}
    w1, w2 = torch.randn(*shape, dtype=torch.float64), torch.randn(*shape, dtype=torch.float64)

    def grads(out, tangent):
        loss = (w1 * out).sum() + (w2 * tangent).sum()
        return torch.autograd.grad(loss, list(net.parameters()), allow_unused=True)

    ref = same_mask(lambda: torch.func.jvp(lambda a, b_, c: net(a, b_, c, **cond), (x, t, s), (dx, dt, ds)))
    own = same_mask(lambda: net.forward_jvp((x, t, s), (dx, dt, ds), tangent_graph=True, **cond))
    torch.testing.assert_close(own[0], ref[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(own[1], ref[1], rtol=1e-12, atol=1e-12)
    assert torch.equal(own[0], same_mask(lambda: net(x, t, s, **cond)))
    for g_own, g_ref in zip(grads(*own), grads(*ref)):
        if g_ref is None:
            assert g_own is None or not g_own.any()
        else:
            torch.testing.assert_close(g_own, g_ref, rtol=1e-10, atol=1e-12)
    out, tangent = same_mask(lambda: net.forward_jvp((x, t, s), (dx, dt, ds), **cond))
    assert out.requires_grad and not tangent.requires_grad
    needy = [v.clone().requires_grad_() for v in (dx, dt, ds)]  # tangents on a graph of their own: still none kept
    assert not same_mask(lambda: net.forward_jvp((x, t, s), tuple(needy), **cond))[1].requires_grad
    torch.testing.assert_close(tangent, ref[1], rtol=1e-12, atol=1e-12)
    forward = same_mask(lambda: net(x, t, s, **cond))  # the output's graph is the forward's, every parameter
    for g_own, g_ref in zip(grads(out, 0 * w2), grads(forward, 0 * w2)):
        assert (g_own is None) == (g_ref is None)
        if g_ref is not None:
            torch.testing.assert_close(g_own, g_ref, rtol=1e-12, atol=1e-14)
    with pytest.raises(ShapeError, match="tangent"):
        net.forward_jvp((x, t, s), (dx[:, :-1], dt, ds), **cond)


@pytest.mark.parametrize("keep", [False, True])
@pytest.mark.parametrize("shape, normalized", [((4, 7), (7,)), ((3, 5, 7), (5, 7))])
def test_layer_norm_jvp_rule_equals_torch_func_jvp(shape, normalized, keep):
    """Both paths of the LayerNorm rule (the backward kernel without a tangent graph, the formula with one)
    give torch.func.jvp's tangent in float64, over every normalised axis; under CPU bf16 autocast (bf16 inputs,
    fp32 statistics) the rule still runs."""
    from genkit.nets.mlp import layer_norm_jvp

    torch.manual_seed(0)
    ln = torch.nn.LayerNorm(normalized).double()
    with torch.no_grad():
        ln.weight.add_(torch.randn_like(ln.weight))
        ln.bias.add_(torch.randn_like(ln.bias))
    x, dx = torch.randn(*shape, dtype=torch.float64), torch.randn(*shape, dtype=torch.float64)
    y, dy = layer_norm_jvp(ln, x, dx, keep)
    ref = torch.func.jvp(ln, (x,), (dx,))
    torch.testing.assert_close(y, ref[0], rtol=0, atol=1e-14)
    torch.testing.assert_close(dy, ref[1], rtol=1e-12, atol=1e-13)
    ln32 = torch.nn.LayerNorm(normalized)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, d16 = layer_norm_jvp(ln32, x.float().bfloat16(), dx.float().bfloat16(), keep)
    assert torch.isfinite(d16).all()
