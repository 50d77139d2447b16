"""Secant models (genkit.models.secant, genkit.nets.two_time, train/secant.py).

The ground truth is the exact field of Gaussian data under the linear path, whose ODE flow, and so whose
secant ``(x_s - x_t) / (s - t)``, is known in closed form (research/METHODS.md sections 0.6 and 7).
"""

from __future__ import annotations

import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import genkit
from genkit.analytic import Gaussian
from genkit.errors import ConfigError, ShapeError
from genkit.models import Diffusion, FlowMatching
from genkit.models.secant import LOSSES, Secant
from genkit.nets import MLP, UNet
from genkit.nets.two_time import TWO_TIME_NETS, TwoTimeMLP, to_two_time
from genkit.nets.two_time import build as build_net
from genkit.paths import get_path
from genkit.train import TrainConfig, Trainer

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "train" / "secant.py"
LINEAR = get_path("linear")
A = torch.tensor([[0.5, 0.0], [0.3, 0.3]])
GAUSS = Gaussian(torch.tensor([1.0, -0.5]), A @ A.T, LINEAR)  # correlated 2-D data
MEAN, STD = torch.tensor([1.0, -0.5]), torch.tensor([0.6, 0.3])
DIAG = Gaussian(MEAN, torch.diag(STD ** 2), LINEAR)


def diag_secant(x, t, s):
    """Closed-form secant of DIAG for per-sample times ``t, s [B]`` (METHODS.md 0.6 with t = 0 data)."""
    t, s = t[:, None].double(), s[:, None].double()
    mu = lambda u: (1 - u) * MEAN.double()  # noqa: E731
    sd = lambda u: ((1 - u) ** 2 * STD.double() ** 2 + u ** 2).sqrt()  # noqa: E731
    xs = mu(s) + sd(s) * (x.double() - mu(t)) / sd(t)
    gap = torch.where((s - t).abs() > 1e-6, s - t, torch.ones_like(s))
    v = DIAG(x.double(), t[:, 0])
    return torch.where((s - t).abs() > 1e-6, (xs - x.double()) / gap, v).to(x.dtype)


class Oracle(nn.Module):
    """The exact secant of DIAG plus a learnable offset ``b``: the loss gradient in ``b`` is the mean residual."""

    two_times = True

    def __init__(self):
        super().__init__()
        self.b = nn.Parameter(torch.zeros(2))

    def forward(self, x, t, s):
        return diag_secant(x, t, s) + self.b

    def config(self):
        return {"name": "oracle"}


def endpoint_error(x, x1):
    return float((x - GAUSS.exact_flow(x1, 1.0, 0.0)).norm(dim=1).mean())


def train(model, tmp_path, steps, lr=6e-3, seed=0):
    data = GAUSS.sample(8192, generator=torch.Generator().manual_seed(seed))
    cfg = TrainConfig(steps=steps, batch_size=256, lr=lr, warmup_steps=50, ema_decay=None, out_dir=str(tmp_path),
                      cpu=True, checkpoint_every=None, log_every=steps, progress=False, seed=seed)
    Trainer(model, cfg).fit(data, resume=False)
    return model.eval()


# --------------------------------------------------------------------------------------------- mathematics
def test_closed_form_secant_matches_exact_flow():
    x, t, s = DIAG.sample(64, 0.7), torch.full((64,), 0.7), torch.full((64,), 0.2)
    exact = (DIAG.exact_flow(x, 0.7, 0.2) - x) / (0.2 - 0.7)
    torch.testing.assert_close(diag_secant(x, t, s), exact, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(diag_secant(x, t, t), DIAG(x, t), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("loss", LOSSES)
def test_exact_secant_is_a_stationary_point_of_every_loss(loss):
    """The secant is the average velocity along the exact path (genkit time: t = 0 data), so at the oracle
    every loss has zero expected gradient; an offset of 0.1 is pulled back."""
    model = Secant(Oracle(), sample_shape=(2,), loss=loss, steps=(1, 2, 4), teacher=None if loss == "stee" else DIAG)
    data = DIAG.sample(40000, generator=torch.Generator().manual_seed(0))
    for offset in (0.0, 0.1):
        model.net.b.data.fill_(offset)
        model.net.b.grad = None
        model.loss(data, generator=torch.Generator().manual_seed(1))[0].backward()
        grad = model.net.b.grad
        assert (grad.abs() < 0.012).all() if offset == 0 else (grad > 0.04).all(), (offset, grad)


def test_training_intervals_stay_within_one_inference_step():
    g = torch.Generator().manual_seed(0)
    like = torch.zeros(1)
    for loss in LOSSES:
        model = Secant(MLP(2, hidden=8, depth=1), sample_shape=(2,), loss=loss, steps=(2, 4), t_min=0.1, t_max=0.9,
                       teacher=None if loss == "stee" else DIAG)
        t, s, r = model._times(20000, like, g)
        assert ((t - s).abs() <= 0.4 + 1e-6).all() and ((r - t) * (r - s) <= 1e-7).all()
        assert t.min() >= 0.1 - 1e-6 and s.min() >= 0.1 - 1e-6 and t.max() <= 0.9 + 1e-6 and s.max() <= 0.9 + 1e-6
        if loss == "sdei":  # t on a step grid of N = 2 or 4, the jump toward the data by at most one step
            on_grid = [((0.9 - t) / (0.8 / n) - ((0.9 - t) / (0.8 / n)).round()).abs() < 1e-4 for n in (2, 4)]
            assert (on_grid[0] | on_grid[1]).all() and (s <= t).all()
            assert ((t - s) > 0.2 + 1e-6).sum() > 0  # the N = 2 steps are longer than the N = 4 ones
        if loss in ("sdee", "stee"):  # both directions
            assert 0.4 < (s < t).float().mean() < 0.6


# One small example per registered two-time network; the test below fails if one is added without it.
TWO_TIME_EXAMPLES = {
    "two_time_mlp": (MLP(3, hidden=16, depth=2, time_dim=8), (5, 3)),
    "two_time_unet": (lambda: UNet(8, block_out_channels=(8, 16), norm_num_groups=4), (2, 1, 8, 8)),
}


def test_every_two_time_net_has_an_example():
    assert set(TWO_TIME_EXAMPLES) == set(TWO_TIME_NETS.names())


@pytest.mark.parametrize("name", TWO_TIME_NETS.names())
def test_two_time_net_starts_as_its_one_time_net_and_round_trips(name):
    one, shape = TWO_TIME_EXAMPLES[name]
    torch.manual_seed(0)
    one = (one() if not isinstance(one, nn.Module) else one).eval()
    two = to_two_time(one).eval()
    assert two.name == name and to_two_time(two) is two
    x, t = torch.randn(*shape), torch.rand(shape[0])
    with torch.no_grad():
        for s in (torch.zeros(shape[0]), torch.rand(shape[0]), t):
            assert torch.equal(two(x, t, s), one(x, t))  # zero-initialised gap embedding
        for p in two.parameters():  # a copy: training it does not move the one-time net's weights
            p.add_(0.01 * torch.randn_like(p))
        out = two(x, t, 0.2)
        assert not torch.equal(out, one(x, t)) and not torch.allclose(out, two(x, t, 0.6))  # s is used
        assert torch.allclose(two(x, 0.5, 0.2), two(x, torch.full((shape[0],), 0.5), torch.full((shape[0],), 0.2)))
        saved = json.loads(json.dumps(two.config()))
        clone = build_net(saved).eval()
        clone.load_state_dict(two.state_dict())
        assert torch.equal(clone(x, t, 0.2), out) and clone.config() == two.config()
    with pytest.raises(ShapeError):
        two(x, torch.rand(shape[0] + 1), 0.2)


# --------------------------------------------------------------------------------------------- training
@pytest.fixture(scope="module")
def sdei(tmp_path_factory):
    torch.manual_seed(0)
    model = Secant(MLP(2, hidden=64, depth=2), sample_shape=(2,), loss="sdei", steps=(1, 2, 4), teacher=GAUSS)
    return train(model, tmp_path_factory.mktemp("sdei"), 300)


def test_sdei_learns_the_closed_form_secant(sdei):
    model = sdei
    g = torch.Generator().manual_seed(5)
    errors, num, den = [], 0.0, 0.0
    with torch.no_grad():
        for n in (1, 2, 4):
            for k in range(n):
                for frac in (0.5, 1.0):
                    t = 1 - k / n
                    s = t - frac / n
                    x = GAUSS.sample(1000, t, generator=g) if t < 1 else torch.randn(1000, 2, generator=g)
                    exact = (GAUSS.exact_flow(x, t, s) - x) / (s - t)
                    err = (model.secant(x, t, s) - exact).norm() ** 2
                    errors.append(float(err.sqrt() / exact.norm()))
                    num, den = num + err, den + exact.norm() ** 2
    pooled = float((num / den).sqrt())
    assert pooled < 0.06 and max(errors) < 0.2, (pooled, errors)
    # f(x, t, t) is the velocity at the times the sampler starts its jumps
    for t in (1.0, 0.75, 0.5, 0.25):
        x = GAUSS.sample(1000, t, generator=g) if t < 1 else torch.randn(1000, 2, generator=g)
        v = GAUSS(x, t)
        with torch.no_grad():
            assert float((model(x, t) - v).norm() / v.norm()) < 0.1


def test_sdei_few_step_sampling_beats_euler(sdei):
    model = sdei
    x1 = torch.randn(2000, 2, generator=torch.Generator().manual_seed(3))
    for n in (1, 2, 4):
        secant = endpoint_error(model.integrate(x1, n).samples, x1)
        euler = endpoint_error(genkit.solve(GAUSS, x1, "euler", n).samples, x1)
        assert secant < 0.4 * euler, (n, secant, euler)


def test_stee_without_teacher_beats_euler(tmp_path):
    torch.manual_seed(0)
    model = train(Secant(MLP(2, hidden=64, depth=2), sample_shape=(2,), loss="stee", steps=(1, 2, 4)), tmp_path, 300)
    x1 = torch.randn(2000, 2, generator=torch.Generator().manual_seed(3))
    for n in (1, 2, 4):
        secant = endpoint_error(model.integrate(x1, n).samples, x1)
        euler = endpoint_error(genkit.solve(GAUSS, x1, "euler", n).samples, x1)
        assert secant < 0.75 * euler, (n, secant, euler)


def test_save_load_round_trip_and_field_view(sdei, tmp_path):
    model = sdei
    genkit.save(tmp_path / "ckpt", model)
    loaded = genkit.load(tmp_path / "ckpt")
    assert loaded.config() == model.config() and loaded.teacher is None
    assert not any(k.startswith("_teacher") for k in model.state_dict())
    x, t, s = torch.randn(8, 2), torch.rand(8), torch.rand(8)
    assert torch.equal(loaded.secant(x, t, s), model.secant(x, t, s))
    a, b = (m.sample(16, steps=2, generator=torch.Generator().manual_seed(0)) for m in (model, loaded))
    assert torch.equal(a, b)
    sol = loaded.sample(16, solver="heun", steps=4, return_solution=True)  # a field: any genkit solver
    assert sol.nfe == 8 and torch.isfinite(sol.samples).all()
    torch.testing.assert_close(loaded.flow_map(x, 1.0, 0.0, steps=2), loaded.integrate(x, 2).samples)


def test_samplers_are_the_learned_jumps_and_any_ode_solver(sdei):
    """A secant model samples with its jumps by default and with any ODE solver on its velocity view, over
    its own time range: sampler objects give exactly the explicit computations."""
    from genkit.sampling import JumpSampler, ODESampler
    from genkit.solvers import Uniform

    model = sdei
    assert model.samplers() == ("jumps", "ode") and model.default_sampler().steps == model.steps[0]
    x1 = model.path.sample_prior((16, 2), generator=torch.Generator().manual_seed(0))
    jumps = model.sample(16, sampler=JumpSampler(3), generator=torch.Generator().manual_seed(0))
    times = torch.linspace(model.t_max, model.t_min, 4, dtype=torch.float64)
    x = x1
    for k in range(3):
        x = model.flow_map(x, float(times[k]), float(times[k + 1]))
    assert torch.equal(jumps, x)
    ode = model.sample(16, sampler=ODESampler("heun", 4), generator=torch.Generator().manual_seed(0))
    assert torch.equal(ode, genkit.solve(model, x1, "heun", 4, Uniform(model.t_max, model.t_min)).samples)


def test_sample_script_uses_the_learned_jumps(sdei, tmp_path, capsys):
    """samplers/sample.py on a secant checkpoint: its learned jumps by default (NFE = the first trained step
    count, same samples as model.sample), any ODE solver on request, and clear errors for what cannot apply."""
    from safetensors.torch import load_file

    from genkit.cli import run_main as cli_main

    sample = ROOT / "samplers" / "sample.py"

    main = runpy.run_path(str(sample), run_name="not_main")["main"]

    def run(*args: str) -> int:
        return cli_main(main, list(args))

    genkit.save(tmp_path / "ckpt", sdei)
    assert run("--checkpoint", str(tmp_path / "ckpt"), "--n", "5", "--device", "cpu", "--out", str(tmp_path / "a")) == 0
    out = capsys.readouterr().out
    assert "1 learned jumps" in out and "NFE 1" in out  # steps=(1, 2, 4): the first is the default
    assert run("--checkpoint", str(tmp_path / "ckpt"), "--n", "5", "--steps", "4", "--device", "cpu",
               "--out", str(tmp_path / "b")) == 0
    got = load_file(str(tmp_path / "b" / "samples.safetensors"))["samples"]
    torch.testing.assert_close(got, sdei.sample(5, steps=4, generator=torch.Generator().manual_seed(0)))
    assert run("--checkpoint", str(tmp_path / "ckpt"), "--n", "5", "--solver", "heun", "--steps", "2",
               "--device", "cpu", "--out", str(tmp_path / "c")) == 0
    assert "NFE 4" in capsys.readouterr().out
    assert run("--checkpoint", str(tmp_path / "ckpt"), "--grid", "karras", "--out", str(tmp_path / "d")) == 2
    assert "--grid karras" in capsys.readouterr().err and not (tmp_path / "d").exists()
    genkit.save(tmp_path / "fm", FlowMatching(MLP(2, hidden=8, depth=1), sample_shape=(2,)))
    assert run("--checkpoint", str(tmp_path / "fm"), "--solver", "jumps", "--out", str(tmp_path / "e")) == 2
    assert "learned jumps" in capsys.readouterr().err


def test_from_teacher_copies_a_flow_matching_network_and_keeps_it_frozen():
    teacher = FlowMatching(MLP(2, hidden=16, depth=1), sample_shape=(2,))
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    model = Secant.from_teacher(teacher, loss="sdei", steps=2)
    x, t = torch.randn(8, 2), torch.rand(8)
    assert torch.equal(model.secant(x, t, torch.rand(8)), teacher(x, t).detach())
    assert not any(p.requires_grad for p in teacher.parameters())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model.loss(torch.randn(64, 2), generator=torch.Generator().manual_seed(0))[0].backward()
    opt.step()
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in before.items())
    model.double()  # .to() / .double() carry the teacher along, as they would a buffer
    assert all(p.dtype == torch.float64 for p in teacher.parameters())
    assert model.loss(torch.randn(8, 2, dtype=torch.float64))[0].dtype == torch.float64
    assert model.t_max == 1.0 and model.t_min == 0.0
    diffusion = Diffusion(MLP(2, hidden=16, depth=1), "cosine", "eps", sample_shape=(2,))
    with pytest.raises(ConfigError, match="net="):
        Secant.from_teacher(diffusion)
    scratch = Secant.from_teacher(diffusion, net=TwoTimeMLP(2, hidden=16, depth=1))
    assert (scratch.t_min, scratch.t_max) == (diffusion.t_eps, diffusion.t_max)  # the teacher's sampling range
    assert torch.isfinite(scratch.loss(torch.randn(32, 2))[0])


def test_bad_input_names_the_fix():
    model = Secant(MLP(2, hidden=8, depth=1), sample_shape=(2,), loss="stee")
    x = torch.randn(4, 2)
    with pytest.raises(ConfigError, match=r"\[0, 1\]"):
        model.secant(x, 0.5, 1.5)
    with pytest.raises(ConfigError, match=r"\[0, 1\]"):
        model.flow_map(x, torch.full((4,), -0.1), 0.0)
    with pytest.raises(ShapeError, match=r"\[batch, 2\]"):
        model.secant(torch.randn(4, 3), 0.5, 0.2)
    with pytest.raises(ShapeError, match="shape"):
        model.secant(x, torch.rand(3), 0.2)
    with pytest.raises(ConfigError, match="unknown secant loss"):
        Secant(MLP(2, hidden=8), loss="sde")
    with pytest.raises(ConfigError, match="steps"):
        Secant(MLP(2, hidden=8), steps=0)
    three = Gaussian(torch.zeros(3), torch.eye(3), LINEAR)
    with pytest.raises(ShapeError, match=r"sample_shape=\(3,\)"):
        Secant(MLP(2, hidden=8), sample_shape=(2,), teacher=three)
    with pytest.raises(ConfigError, match="path=teacher.path"):
        Secant(MLP(2, hidden=8), "cosine", sample_shape=(2,), teacher=GAUSS)
    with pytest.raises(ConfigError, match="teacher="):
        Secant(MLP(2, hidden=8), sample_shape=(2,), loss="sdei").loss(x)
    with pytest.raises(ConfigError, match="without a teacher"):
        Secant(MLP(2, hidden=8), sample_shape=(2,), loss="stee", teacher=GAUSS)
    with pytest.raises(ConfigError, match="MLP or UNet"):
        to_two_time(nn.Linear(2, 2))
    with pytest.raises(ConfigError, match="class embedding"):  # a UNet with num_classes extends (test_two_time.py)
        to_two_time(UNet(8, block_out_channels=(8, 16), norm_num_groups=4,
                         unet2d_kwargs={"class_embed_type": "timestep"}))
    with pytest.raises(ConfigError, match="valid options"):
        build_net({"name": "two_time_mlp", "dim": 2, "width": 8})


# --------------------------------------------------------------------------------------------- script
def run_main(*args: str) -> int:
    argv = sys.argv
    sys.argv = [str(SCRIPT), *args]
    try:
        runpy.run_path(str(SCRIPT), run_name="__main__")
        return 0
    except SystemExit as e:
        return e.code
    finally:
        sys.argv = argv


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("teacher") / "fm"
    genkit.save(path, FlowMatching(MLP(2, hidden=16, depth=1), sample_shape=(2,)))
    return path


def test_script_distils_a_checkpoint(teacher_dir, tmp_path):
    out = tmp_path / "run"
    (teacher_dir.parent / "train_data.json").write_text(json.dumps({"data": "moons"}))  # as train.py records it
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--teacher", str(teacher_dir), "--out", str(out),
                           "--steps-inference", "2", "--train-steps", "20", "--batch-size", "64", "--n-data", "256",
                           "--eval-samples", "128", "--ref-steps", "8", "--table-steps", "1,2,4", "--no-progress"],
                          capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "secant" in proc.stdout and "euler" in proc.stdout and "rk4 x 8" in proc.stdout
    model = genkit.load(out / "checkpoint", expect_family="secant")
    assert model.steps == (2,) and model.sample(5, steps=2).shape == (5, 2)
    rows = json.loads((out / "secant_eval.json").read_text())["rows"]
    assert [r["nfe"] for r in rows] == [1, 2, 4] and [r["trained"] for r in rows] == [False, True, False]
    assert rows[0]["heun"] is None and all(r["secant"] >= 0 and r["euler"] >= 0 for r in rows)
    # the table's measure is the scripts' one (genkit.metrics.endpoint_rms: per-sample L2 RMS), named in it
    from genkit.metrics import ENDPOINT_ERROR, endpoint_rms

    assert f"endpoint error: {ENDPOINT_ERROR}" in proc.stdout
    teacher = genkit.load(teacher_dir)
    x1 = teacher.path.sample_prior((128, 2), generator=torch.Generator().manual_seed(2))
    grid = genkit.get_grid("uniform", t_max=model.t_max, t_min=model.t_min)
    with torch.no_grad():
        ref = genkit.solve(teacher, x1, "rk4", 8, grid).samples
        euler = [endpoint_rms(genkit.solve(teacher, x1, "euler", n, grid).samples, ref) for n in (1, 2, 4)]
    assert [r["euler"] for r in rows] == pytest.approx(euler, rel=1e-6)
    assert "step 20/20: loss" in proc.stdout  # --no-progress: a line per log step
    # the teacher's data is what the secant model learned: evaluate.py scores it against that by default
    assert json.loads((out / "train_data.json").read_text()) == {"data": "moons"}


@pytest.mark.parametrize("args, named", [
    (["--loss", "sde"], "--loss 'sde'"),
    (["--steps-inference", "0"], "positive"),
    (["--steps-inference", "two"], "1,2,4"),
    (["--init", "copy"], "--init"),
    (["--train-steps", "0"], "--train-steps"),
    (["--ref-solver", "nope"], "solver 'nope'"),
    (["--teacher", "/no/such/run"], "/no/such/run"),
    (["--bogus"], "--bogus"),
])
def test_script_bad_input_exits_2_with_one_error_line(args, named, teacher_dir, tmp_path, capsys):
    base = ["--teacher", str(teacher_dir), "--out", str(tmp_path / "out")]
    assert run_main(*base, *args) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and named in lines[0], lines
    assert not (tmp_path / "out").exists()


def test_script_help(capsys):
    assert run_main("--help") == 0
    text = capsys.readouterr().out
    assert "--teacher" in text and "--steps-inference" in text and "sdei" in text and "default" in text
