"""Class-conditional training: labels into the loss (as the net's y), class dropout to the null label drawn from the
loss generator, configs and checkpoints that keep the classes, tensor and Dataset labelled data giving the same
run, train.py --conditional, and a briefly trained digits model whose guided samples are of the asked class."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import Dataset

import genkit
from genkit import metrics
from genkit.data import LabelledData, digits, digits_labels, load_labelled
from genkit.errors import ConfigError, DataError, ShapeError
from genkit.models import Diffusion, FlowMatching
from genkit.nets import MLP
from genkit.train import TrainConfig, Trainer

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def fm(k: int = 3, dropout: float = 0.0, dim: int = 2, hidden: int = 16, **kw) -> FlowMatching:
    torch.manual_seed(0)
    net = MLP(dim, hidden=hidden, depth=1, time_dim=8, num_classes=k + (dropout > 0 or "null_label" in kw))
    return FlowMatching(net, num_classes=k, class_dropout=dropout, sample_shape=(dim,), **kw)


def test_the_conditional_loss_feeds_labels_to_the_net_with_the_unconditional_draws():
    model = fm(3)
    x, labels = torch.randn(16, 2, generator=gen(1)), torch.arange(16) % 3
    loss, _ = model.loss((x, labels), generator=gen(5))
    g = gen(5)  # the unconditional loss's draws, in its order: noise, then t
    eps = torch.randn(x.shape, generator=g)
    t = torch.rand(16, generator=g)
    xt = (1 - t[:, None]) * x + t[:, None] * eps
    expected = (model.net(xt, t, y=labels) - (eps - x)).pow(2).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=0)
    torch.testing.assert_close(model(xt, t, labels=labels), model.net(xt, t, y=labels), rtol=0, atol=0)


def test_class_dropout_replaces_a_fraction_p_by_the_null_label_from_the_generator():
    model = fm(3, dropout=0.25)
    assert model.null_label == 3
    labels = torch.arange(40_000) % 3
    dropped = model.drop_labels(labels, gen(0))
    null = dropped == 3
    assert abs(null.float().mean().item() - 0.25) < 0.01  # binomial sd 0.002
    assert torch.equal(dropped[~null], labels[~null])
    assert torch.equal(dropped, model.drop_labels(labels, gen(0)))  # a function of the generator alone
    g = gen(0)
    state = g.get_state()
    fm(3).drop_labels(labels, g)  # no dropout: no draw at all
    assert torch.equal(g.get_state(), state)
    # the loss draws the dropout after noise and t: the same model without dropout sees the same x_t
    x = torch.randn(8, 2, generator=gen(1))
    d = Diffusion(MLP(2, hidden=8, depth=1, time_dim=8, num_classes=4), num_classes=3, class_dropout=0.5)
    assert torch.isfinite(d.loss((x, torch.arange(8) % 3), generator=gen(2))[0])


def test_classes_are_recorded_in_the_config_and_restored_by_load(tmp_path):
    model = fm(3, dropout=0.1, class_names=["a", "b", "c"])
    c = model.config()
    assert (c["num_classes"], c["class_names"], c["null_label"], c["class_dropout"]) == (3, ["a", "b", "c"], 3, 0.1)
    assert fm(3).config()["null_label"] is None  # conditional without dropout: no null label
    plain = FlowMatching(MLP(2, hidden=8), sample_shape=(2,))
    assert not {"num_classes", "class_names", "null_label", "class_dropout"} & set(plain.config())  # unchanged
    genkit.save(tmp_path / "c", model)
    again = genkit.load(tmp_path / "c")
    assert (again.num_classes, again.class_names, again.null_label, again.class_dropout) == (3, ["a", "b", "c"], 3,
                                                                                              0.1)
    x, t, y = torch.randn(4, 2), torch.rand(4), torch.tensor([0, 1, 2, 3])
    torch.testing.assert_close(again(x, t, labels=y), model(x, t, labels=y), rtol=0, atol=0)


def test_bad_conditioning_gets_genkit_errors():
    with pytest.raises(ConfigError, match=r"num_classes=4 \(3 classes \+ the null label 3"):
        FlowMatching(MLP(2, hidden=8, num_classes=3), num_classes=3, class_dropout=0.1)
    with pytest.raises(ConfigError, match="num_classes=3; MLP has num_classes=None"):
        FlowMatching(MLP(2, hidden=8), num_classes=3)
    with pytest.raises(ConfigError, match="null_label must be K = num_classes = 3"):
        FlowMatching(MLP(2, hidden=8, num_classes=4), num_classes=3, null_label=0)
    with pytest.raises(ConfigError, match="class_names has 2 names"):
        FlowMatching(MLP(2, hidden=8, num_classes=3), num_classes=3, class_names=["a", "b"])
    with pytest.raises(ConfigError, match="class_dropout must be a probability"):
        FlowMatching(MLP(2, hidden=8, num_classes=4), num_classes=3, class_dropout=1.0)
    with pytest.raises(ConfigError, match="unconditional model"):
        FlowMatching(MLP(2, hidden=8), class_dropout=0.1)
    model, plain = fm(3, dropout=0.1), FlowMatching(MLP(2, hidden=8), sample_shape=(2,))
    x = torch.randn(4, 2)
    with pytest.raises(ConfigError, match="needs labels"):
        model(x, 0.5)
    with pytest.raises(ConfigError, match="takes no labels"):
        plain(x, 0.5, labels=torch.zeros(4, dtype=torch.long))
    with pytest.raises(ConfigError, match=r"labels \[7\] are not classes of this model: 0..2 or the null label 3"):
        model(x, 0.5, labels=torch.tensor([0, 1, 2, 7]))
    with pytest.raises(ShapeError, match="LabelledData"):
        model.loss(x, generator=gen())
    with pytest.raises(ShapeError, match="unconditional"):
        plain.loss((x, torch.zeros(4, dtype=torch.long)), generator=gen())
    with pytest.raises(ShapeError, match="integer class ids of shape \\[4\\]"):
        model.loss((x, torch.zeros(4)), generator=gen())


class Rows(Dataset):
    """A map-style Dataset of the rows of a tensor (the DataLoader path of the trainer)."""

    def __init__(self, x: torch.Tensor):
        self.x = x

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.x[i]


def test_labelled_tensors_and_labelled_datasets_train_the_same_run(tmp_path):
    data = load_labelled("8gaussians", n=64, generator=gen(0))

    def run(d, out):
        model = fm(8, dropout=0.2, hidden=16, class_names=data.class_names)
        cfg = TrainConfig(steps=6, batch_size=16, lr=1e-2, warmup_steps=1, ema_decay=None, log_every=2,
                          out_dir=str(tmp_path / out), progress=False, cpu=True)
        return model, Trainer(model, cfg).fit(d)

    a, ra = run(data, "tensor")  # indexed in place
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    b, rb = run(LabelledData(Rows(data.data), data.labels, data.class_names), "dataset")  # through a DataLoader
    assert ra.losses == rb.losses
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name
    assert genkit.load(tmp_path / "tensor").class_names == data.class_names
    AcceleratorState._reset_state(True)
    with pytest.raises(DataError, match="the data has 8 classes but the model was built for num_classes=3"):
        Trainer(fm(3), TrainConfig(steps=1, batch_size=8, out_dir=str(tmp_path / "bad"), cpu=True)).fit(data)


def _script(script: Path, *args: str) -> int:
    argv = sys.argv
    sys.argv = [str(script), *map(str, args)]
    try:
        runpy.run_path(str(script), run_name="__main__")
        return 0
    except SystemExit as e:
        return e.code
    finally:
        sys.argv = argv


def test_train_script_conditional_on_toy_components(tmp_path, capsys):
    out = tmp_path / "run"
    code = _script(ROOT / "train" / "train.py", "--data", "moons", "--conditional", "--class-dropout", "0.2",
                   "--steps", 20, "--hidden", 16, "--depth", 1, "--n-samples", 100, "--sample-steps", 2,
                   "--no-progress", "--out", out)
    assert code == 0, capsys.readouterr().err
    model = genkit.load(out)
    assert (model.num_classes, model.class_names, model.null_label, model.class_dropout) == (2, ["upper", "lower"],
                                                                                              2, 0.2)
    assert model.net.config()["num_classes"] == 3
    assert json.loads((out / "metrics.json").read_text())["n_samples"] == 100
    # evaluate.py samples it at the held-out data's class frequencies, or one --class with --guidance, and --nll
    # scores its unconditional density through the null label
    ev = ROOT / "eval" / "evaluate.py"
    assert _script(ev, "--checkpoint", out, "--n", 64, "--steps", 2, "--out", tmp_path / "a.json") == 0
    a = json.loads((tmp_path / "a.json").read_text())
    assert a["labels"] == "moons's class frequencies" and a["guidance"] is None and a["sliced_w2"] > 0
    assert _script(ev, "--checkpoint", out, "--n", 64, "--steps", 2, "--class", 1, "--guidance", 2, "--nll",
                   "--nll-n", 32, "--nll-solver", "rk4", "--nll-steps", 4, "--out", tmp_path / "b.json") == 0
    b = json.loads((tmp_path / "b.json").read_text())
    assert b["labels"] == "class 1" and b["guidance"] == 2.0 and torch.isfinite(torch.tensor(b["nll"]["nats"]))
    capsys.readouterr()
    assert _script(ev, "--checkpoint", out, "--class", 2, "--out", tmp_path / "c.json") == 2
    assert "--class 2 is not a class of this model: 0..1" in capsys.readouterr().err


@pytest.mark.parametrize("args, named", [
    (["--class-dropout", "0.1"], "--class-dropout 0.1 applies to --conditional training only"),
    (["--conditional", "--class-dropout", "1.5"], "--class-dropout must be a probability in [0, 1)"),
    (["--conditional", "--family", "secant"], "--family secant does not train class-conditional models"),
], ids=["dropout-without-conditional", "dropout-range", "secant"])
def test_train_script_conditional_errors(args, named, tmp_path, capsys):
    assert _script(ROOT / "train" / "train.py", *args, "--out", tmp_path / "out") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and named in err[0], err
    assert not (tmp_path / "out").exists()


def test_train_script_conditional_image_folder_needs_class_folders(tmp_path, capsys):
    from PIL import Image

    for i in range(2):
        Image.new("L", (4, 4), 100).save(tmp_path / f"{i}.png")
    code = _script(ROOT / "train" / "train.py", "--image-folder", tmp_path, "--image-size", 4, "--conditional",
                   "--out", tmp_path / "out")
    assert code == 2 and "no class subfolders" in capsys.readouterr().err


def _guided_digits_accuracy(steps: int, hidden: int, classifier_steps: int) -> dict[float, float]:
    """Train a class-conditional flow-matching MLP on flattened 8x8 digits (10% class dropout) and return the
    digits classifier's accuracy on 200 guided samples (20 a class) per guidance scale."""
    torch.set_num_threads(1)
    train = load_labelled("digits")
    data = LabelledData(train.data.flatten(1), train.labels, train.class_names)
    torch.manual_seed(0)
    model = FlowMatching(MLP(64, hidden=hidden, depth=3, num_classes=11), num_classes=10, class_dropout=0.1,
                         sample_shape=(64,))
    import tempfile

    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig(steps=steps, batch_size=128, lr=2e-3, warmup_steps=50, ema_decay=None, log_every=steps,
                          out_dir=out, progress=False, cpu=True)
        Trainer(model, cfg).fit(data)
    clf = metrics.train_digits_classifier(digits("train"), digits_labels("train"), steps=classifier_steps,
                                          generator=gen(0))
    model.eval()
    labels = torch.arange(200) % 10
    acc = {}
    for scale in (0.0, 2.0):
        x = model.sample(200, labels=labels, guidance=scale, steps=16, generator=gen(1))
        with torch.no_grad():
            acc[scale] = (clf(x.reshape(-1, 1, 8, 8).clamp(-1, 1)).argmax(1) == labels).float().mean().item()
    return acc


def test_a_briefly_trained_conditional_digits_model_generates_the_asked_class():
    acc = _guided_digits_accuracy(steps=400, hidden=64, classifier_steps=200)  # about 7 s on one core
    assert acc[2.0] >= 0.8, acc
    assert acc[0.0] < 0.3, acc  # scale 0 is the unconditional model: the labels are not what made the classes


@pytest.mark.slow
def test_a_conditional_digits_model_trained_longer_generates_the_asked_class():
    acc = _guided_digits_accuracy(steps=1500, hidden=128, classifier_steps=300)  # about 20 s
    assert acc[2.0] >= 0.95, acc
    assert acc[0.0] < 0.3, acc


def test_train_script_conditional_on_an_image_folder_with_class_folders(tmp_path, capsys):
    from PIL import Image

    root = tmp_path / "images"
    for name, value in [("dark", 40), ("light", 210)]:
        (root / name).mkdir(parents=True)
        for i in range(4):
            Image.new("L", (8, 8), value + 5 * i).save(root / name / f"{i}.png")
    out = tmp_path / "run"
    code = _script(ROOT / "train" / "train.py", "--image-folder", root, "--image-size", 8, "--image-channels", 1,
                   "--conditional", "--family", "diffusion", "--channels", "8,16", "--steps", 2, "--batch-size", 4,
                   "--n-samples", 4, "--sample-steps", 1, "--no-progress", "--out", out)
    assert code == 0, capsys.readouterr().err
    model = genkit.load(out)
    assert (model.num_classes, model.class_names, model.null_label) == (2, ["dark", "light"], 2)
    assert model.net.config()["num_classes"] == 3 and (out / "samples.png").is_file()
