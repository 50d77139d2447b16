"""Backbones: the net(x, t, **cond) convention, config round trips, the diffusers adapter, bad input."""

from __future__ import annotations

import json

import pytest
import torch

from genkit.errors import ConfigError, ShapeError
from genkit.nets import MLP, NETS, FourierTimeEmbedding, UNet, build

# One small example per registered network; the test below fails if a network is added without one.
EXAMPLES = {
    "mlp": ({"name": "mlp", "dim": 3, "hidden": 32, "depth": 2, "time_dim": 16}, (5, 3)),
    "unet": ({"name": "unet", "sample_size": 8, "block_out_channels": [8, 16], "norm_num_groups": 4}, (3, 1, 8, 8)),
    # sequence denoisers: x is a soft one-hot [B, L, V + 1] (here random floats), the output logits [B, L, V]
    "sequence_transformer": ({"name": "sequence_transformer", "vocab_size": 4, "length": 6, "dim": 16, "depth": 1,
                              "heads": 2}, (3, 6, 5)),
    "conv_dna": ({"name": "conv_dna", "vocab_size": 4, "length": 6, "channels": 8, "depth": 2}, (3, 6, 5)),
    "token_mlp": ({"name": "token_mlp", "vocab_size": 4, "length": 6, "hidden": 16, "depth": 1, "embed_dim": 4,
                   "time_dim": 8}, (3, 6, 5)),
}
# nets whose output is not shaped like x: the sequence denoisers' logits
OUT_SHAPES = {"sequence_transformer": (3, 6, 4), "conv_dna": (3, 6, 4), "token_mlp": (3, 6, 4)}


def test_every_registered_net_has_an_example():
    assert set(EXAMPLES) == set(NETS.names())


@pytest.mark.parametrize("name", NETS.names())
def test_config_round_trip_gives_identical_outputs(name):
    config, shape = EXAMPLES[name]
    torch.manual_seed(0)
    net = build(config).eval()
    x, t = torch.randn(*shape), torch.rand(shape[0])
    out = net(x, t)
    assert out.shape == OUT_SHAPES.get(name, x.shape) and torch.isfinite(out).all()
    saved = json.loads(json.dumps(net.config()))  # must survive JSON
    assert saved["name"] == name
    torch.manual_seed(1)  # different init, so equality below comes from the state_dict
    clone = build(saved).eval()
    clone.load_state_dict(net.state_dict())
    assert torch.equal(clone(x, t), out)
    assert clone.config() == net.config()


@pytest.mark.parametrize("name", NETS.names())
def test_time_is_used_and_scalar_time_broadcasts(name):
    config, shape = EXAMPLES[name]
    net = build(config).eval()
    x = torch.randn(*shape)
    full = net(x, torch.full((shape[0],), 0.3))
    assert torch.allclose(net(x, 0.3), full)
    assert torch.allclose(net(x, torch.tensor(0.3)), full)
    assert not torch.allclose(net(x, 0.7), full)


@pytest.mark.parametrize("name", NETS.names())
def test_bad_time_raises_shape_error(name):
    config, shape = EXAMPLES[name]
    net = build(config)
    x = torch.randn(*shape)
    with pytest.raises(ShapeError, match=r"shape \["):
        net(x, torch.rand(shape[0] + 1))
    with pytest.raises(ShapeError, match="int64"):
        net(x, torch.full((shape[0],), 500))


def test_fourier_embedding_resolves_fine_and_coarse_times():
    emb = FourierTimeEmbedding(64)
    assert emb.freqs.min() == pytest.approx(1.0) and emb.freqs.max() == pytest.approx(1000.0)
    e = emb(torch.linspace(0, 1, 1001))  # t spacing 1e-3
    step = (e[1:] - e[:-1]).norm(dim=1)
    assert step.min() > 0.5  # neighbouring times 1e-3 apart are far apart
    assert (e[0] - e[-1]).norm() > 1.0


def test_mlp_shapes_and_errors():
    net = MLP(2, hidden=16, depth=1, time_dim=8)
    assert net(torch.randn(4, 2), torch.rand(4)).shape == (4, 2)
    with pytest.raises(ShapeError, match=r"\[B, 2\].*\[4, 3\]"):
        net(torch.randn(4, 3), torch.rand(4))
    with pytest.raises(ShapeError):
        net(torch.randn(4, 2, 1), torch.rand(4))
    with pytest.raises(ConfigError, match="num_classes"):
        net(torch.randn(4, 2), torch.rand(4), y=torch.zeros(4, dtype=torch.long))
    with pytest.raises(ConfigError, match="time_dim"):
        MLP(2, time_dim=7)
    with pytest.raises(ConfigError, match="depth"):
        MLP(2, depth=0)


def test_mlp_runs_in_float64():
    net = MLP(2, hidden=16, depth=1, time_dim=8).double()
    assert net(torch.randn(3, 2, dtype=torch.float64), torch.rand(3, dtype=torch.float64)).dtype == torch.float64


def test_class_conditional_nets_use_labels():
    x, t = torch.randn(4, 2), torch.rand(4)
    net = MLP(2, hidden=16, depth=1, time_dim=8, num_classes=3)
    a, b = net(x, t, y=torch.zeros(4, dtype=torch.long)), net(x, t, y=torch.full((4,), 2))
    assert not torch.allclose(a, b)
    with pytest.raises(ConfigError, match="needs labels"):
        net(x, t)
    with pytest.raises(ShapeError, match="integer"):
        net(x, t, y=torch.zeros(4))
    unet = UNet(8, block_out_channels=(8, 16), norm_num_groups=4, num_classes=3)
    img = torch.randn(4, 1, 8, 8)
    assert not torch.allclose(unet(img, t, y=torch.zeros(4, dtype=torch.long)), unet(img, t, y=torch.full((4,), 2)))
    assert build(unet.config()).config()["num_classes"] == 3


def test_unet_is_diffusers_unet_with_scaled_time():
    from diffusers import UNet2DModel

    model = UNet2DModel(
        sample_size=8, in_channels=3, out_channels=2, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4, act_fn="gelu", attention_head_dim=4,
    ).eval()  # fmt: skip
    net = UNet.from_unet2d(model, time_scale=1000.0)
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([0.25, 0.9])
    assert torch.equal(net(x, t), model(x, t * 1000.0).sample)
    config = net.config()
    assert config["unet2d_kwargs"] == {"act_fn": "gelu", "attention_head_dim": 4}
    clone = build(json.loads(json.dumps(config))).eval()
    clone.load_state_dict(net.state_dict())
    assert torch.equal(clone(x, t), net(x, t))
    assert clone.unet.config.act_fn == "gelu" and net(x, t).shape == (2, 2, 8, 8)


def test_unet_default_trains_on_digits_shape():
    torch.manual_seed(0)
    net = UNet(8)
    opt = torch.optim.SGD(net.parameters(), lr=1e-2)
    x, t = torch.randn(8, 1, 8, 8), torch.rand(8)
    loss = net(x, t).square().mean()
    loss.backward()
    opt.step()
    assert all(p.grad is not None for p in net.parameters() if p.requires_grad)
    assert net(x, t).square().mean() < loss


def test_unet_bad_input_and_config():
    net = UNet(8, block_out_channels=(8, 16), norm_num_groups=4)
    with pytest.raises(ShapeError, match=r"\[B, 1, H, W\]"):
        net(torch.randn(2, 3, 8, 8), torch.rand(2))
    with pytest.raises(ShapeError, match="divisible by 2"):
        net(torch.randn(2, 1, 7, 7), torch.rand(2))
    with pytest.raises(ConfigError, match="norm_num_groups"):
        UNet(8, block_out_channels=(12, 16), norm_num_groups=8)
    with pytest.raises(ConfigError, match="one down and one up block"):
        UNet(8, down_block_types=("DownBlock2D",))
    with pytest.raises(ConfigError, match="in_channels"):
        UNet(8, unet2d_kwargs={"in_channels": 3})
    with pytest.raises(ConfigError, match="diffusers rejected"):
        UNet(8, down_block_types=("NoSuchBlock2D", "DownBlock2D"))
    with pytest.raises(ConfigError, match="UNet2DModel"):
        UNet.from_unet2d(torch.nn.Linear(2, 2))


def test_build_rejects_bad_configs():
    with pytest.raises(ConfigError, match="conv_dna, mlp, sequence_transformer, token_mlp, unet"):
        build({"name": "transformerr", "dim": 2})
    with pytest.raises(ConfigError, match="'name'"):
        build({"dim": 2})
    with pytest.raises(ConfigError, match=r"no option\(s\) \['widht'\]"):
        build({"name": "mlp", "dim": 2, "widht": 3})
    with pytest.raises(ConfigError, match=r"needs option\(s\) \['dim'\]"):
        build({"name": "mlp"})


def test_unet_refuses_an_image_size_its_levels_cannot_halve():
    UNet(sample_size=8, block_out_channels=(8, 8, 8, 8))  # halved 3 times: 8 -> 1
    with pytest.raises(ConfigError, match=r"sample_size=12 must be positive and divisible by 8.*fewer levels"):
        UNet(sample_size=12, block_out_channels=(8, 8, 8, 8))
    with pytest.raises(ConfigError, match=r"sample_size=\(8, 6\) must be positive and divisible by 4"):
        UNet(sample_size=(8, 6), block_out_channels=(8, 8, 8))
