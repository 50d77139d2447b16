"""train/distill.py: every --method distils a checkpoint into the common format and writes the student-vs-teacher
table with the metrics eval/evaluate.py computes; the teacher's row at each NFE is the best of the solvers that
spend exactly that NFE; runs resume; bad input is a one-line genkit error; two processes under accelerate."""

from __future__ import annotations

import json
import os
import runpy
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_scripts import run_main

import genkit
from genkit.cli import sample_distances
from genkit.data import held_out, load_dataset
from genkit.errors import ConfigError
from genkit.models import FlowMatching
from genkit.models.meanflow import MeanFlow
from genkit.nets import MLP
from genkit.train import TrainConfig, Trainer

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "train" / "distill.py"
pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")
TINY = ["--train-steps", "12", "--batch-size", "32", "--eval-samples", "200", "--no-progress",
        "--checkpoint-every", "100", "--ref-steps", "4"]


def script():
    return runpy.run_path(str(SCRIPT), run_name="distill")


def run(*args: str) -> int:
    return run_main(SCRIPT, *map(str, args))


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    """A flow-matching checkpoint as train.py leaves it: run/checkpoint/ and run/train_data.json (moons)."""
    torch.manual_seed(0)
    run_dir = tmp_path_factory.mktemp("teacher")
    model = FlowMatching(MLP(2, hidden=32, depth=1), sample_shape=(2,))
    data = load_dataset("moons", 2048, generator=torch.Generator().manual_seed(0))
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    Trainer(model, TrainConfig(steps=150, batch_size=128, lr=3e-3, cpu=True, out_dir=str(run_dir),
                               progress=False)).fit(data)
    AcceleratorState._reset_state(True)
    (run_dir / "train_data.json").write_text(json.dumps({"data": "moons"}))
    return run_dir


@pytest.mark.parametrize("method, family", [("meanflow", "meanflow"), ("smd", "smd"), ("secant", "secant")])
def test_each_method_distils_into_the_common_format_with_the_table(teacher_dir, tmp_path, method, family, capsys):
    out = tmp_path / method
    assert run("--teacher", teacher_dir, "--method", method, "--out", out, *TINY) == 0
    student = genkit.load(out / "checkpoint", expect_family=family)
    assert student.teacher is None  # the teacher is never saved
    assert json.loads((out / "train_data.json").read_text()) == {"data": "moons"}  # evaluate.py's default
    table = json.loads((out / "distill_table.json").read_text())
    assert table["training_steps"] == {"student": 12, "teacher": 150, "ratio": 12 / 150}
    assert table["metric"] == "sliced_w2" and table["data"] == "moons" and table["n"] == 200
    # the student at 1, 2, 4 NFE with its one-step sampler (and the restart sampler where it has one)
    samplers = ["jumps", "restart"] if method == "smd" else ["jumps"]
    assert [(r["budget"], r["sampler"]) for r in table["student"]] == [(k, s) for k in (1, 2, 4) for s in samplers]
    assert all(r["nfe"] == r["budget"] for r in table["student"] + table["teacher"])
    # the teacher at 1, 2, 4, 8, 50 NFE: each row is the best candidate of that budget, every candidate spent it
    assert [r["budget"] for r in table["teacher"]] == [1, 2, 4, 8, 50]
    for row in table["teacher"]:
        tried = [c for c in table["teacher_candidates"] if c["nfe"] == row["budget"]]
        assert len(tried) >= 2 and row["sliced_w2"] == min(c["sliced_w2"] for c in tried)
    best = table["teacher"][-1]["sliced_w2"]
    assert all(r["ratio_to_teacher_best"] == pytest.approx(r["sliced_w2"] / best) for r in table["student"])
    # the numbers are evaluate.py's: recompute the student's 1-NFE row from the saved checkpoint
    ref, floor = held_out("moons", 200, 0)
    with torch.no_grad():
        x = student.sample(200, steps=1, generator=torch.Generator().manual_seed(2))
    assert table["student"][0]["sliced_w2"] == pytest.approx(sample_distances(x, ref, None, 0)["sliced_w2"])
    assert table["noise_floor"] == pytest.approx(sample_distances(floor, ref, None, 0))
    md = (out / "distill_table.md").read_text()
    assert md.count("| student") == 3 * len(samplers) and md.count("| teacher |") == 5
    assert "step 12/12: loss" in capsys.readouterr().out  # --no-progress: a line per log step


def test_teacher_candidates_spend_exactly_the_budget():
    candidates = script()["teacher_candidates"]
    for nfe in (1, 2, 3, 4, 8, 50):
        found = candidates(nfe)
        assert found and all(genkit.get_solver(s).nfe(k) == nfe for s, k in found)
        assert not any(genkit.get_solver(s).stochastic for s, _ in found)
    assert ("rk4", 1) in candidates(4) and ("heun", 25) in candidates(50) and ("euler", 1) in candidates(1)
    assert not any(s in ("heun", "rk4") for s, _ in candidates(1))


def test_meanflow_student_starts_as_the_teacher_and_resumes(teacher_dir, tmp_path):
    out = tmp_path / "mf"
    assert run("--teacher", teacher_dir, "--method", "meanflow", "--out", out, "--no-eval", *TINY,
               "--train-steps", "6") == 0
    first = genkit.load(out / "checkpoint", ema=False).state_dict()
    assert run("--teacher", teacher_dir, "--method", "meanflow", "--out", out, "--no-eval", *TINY,
               "--train-steps", "10") == 0  # continues to step 10
    state = json.loads((out / "checkpoint" / "trainer_state.json").read_text())
    assert state["step"] == 10 and not (out / "distill_table.json").exists()
    assert any(not torch.equal(v, genkit.load(out / "checkpoint", ema=False).state_dict()[k]) for k, v in first.items())
    # another method's or other flags' run in the same folder is refused, not mixed
    with pytest.raises(ConfigError, match="different"):
        script()["main"](["--teacher", str(teacher_dir), "--method", "meanflow", "--out", str(out), "--no-eval",
                          *TINY, "--frac-r-neq-t", "0.5"])
    # --init teacher: the network is a two-time copy of the teacher's, so u(z, t, t) is the teacher's velocity at
    # step 0; --init auto (and scratch) on this MLP teacher: a fresh MLP of its size with smooth time features
    teacher = genkit.load(teacher_dir / "checkpoint")
    flags = ["--teacher", str(teacher_dir), "--method", "meanflow", "--out", str(tmp_path / "x")]
    student = script()["build_student"](script()["parse_args"]([*flags, "--init", "teacher"]), teacher)
    z, t = torch.randn(16, 2), torch.rand(16)
    with torch.no_grad():
        torch.testing.assert_close(student.average_velocity(z, t, t), teacher(z, t), rtol=1e-5, atol=1e-6)
    for init in ([], ["--init", "scratch"]):
        fresh = script()["build_student"](script()["parse_args"]([*flags, *init]), teacher)
        assert fresh.net.base.max_freq == 5.0 and teacher.net.max_freq == 1000.0
        assert fresh.net.base.hidden == teacher.net.hidden and fresh.net.base.depth == teacher.net.depth
        with torch.no_grad():
            assert not torch.allclose(fresh.average_velocity(z, t, t), teacher(z, t))


def test_meanflow_with_the_conditional_velocity_keeps_the_teachers_weights_but_not_its_velocity(teacher_dir):
    s = script()
    teacher = genkit.load(teacher_dir / "checkpoint")
    flags = ["--teacher", str(teacher_dir), "--method", "meanflow", "--out", "o", "--frac-r-neq-t", "0", "--init",
             "teacher"]
    args = s["parse_args"]([*flags, "--velocity", "conditional"])
    student = s["build_meanflow"](args, teacher)
    assert student.teacher is None and (student.t_min, student.t_max) == (0.0, 1.0)
    z, t = torch.randn(8, 2), torch.rand(8)
    with torch.no_grad():  # the init is still the teacher's (a two-time copy)
        torch.testing.assert_close(student.average_velocity(z, t, t), teacher(z, t), rtol=1e-5, atol=1e-6)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 2, generator=torch.Generator().manual_seed(1))
    _, logs = student.loss(x, generator=g)  # all pairs r = t: the target is e - x, not the copied velocity
    attached = s["build_meanflow"](s["parse_args"](flags), teacher)
    assert attached.teacher is teacher
    _, logs_teacher = attached.loss(x, generator=torch.Generator().manual_seed(0))
    assert logs_teacher["mse"] < 1e-10 < 0.1 < logs["mse"]  # the teacher's velocity is its own copy's target


def test_smd_student_copies_the_teacher(teacher_dir):
    s = script()
    teacher = genkit.load(teacher_dir / "checkpoint")
    student = s["build_student"](s["parse_args"](["--teacher", str(teacher_dir), "--method", "smd", "--out", "o",
                                                 "--score-updates", "3"]), teacher)
    assert student.score_updates == 3 and student.data_free and student.teacher is teacher
    for a, b in zip(student.net.parameters(), teacher.net.parameters()):
        assert torch.equal(a, b) and a is not b


@pytest.mark.parametrize("extra, message", [
    (["--method", "flowmap"], "unknown --method 'flowmap'"),
    (["--method", "meanflow", "--loss", "sdei"], "--loss sdei does not apply to --method meanflow"),
    (["--method", "secant", "--modulation", "0.5"], "--modulation 0.5 does not apply to --method secant"),
    (["--method", "smd", "--init", "scratch"], "--init scratch does not apply to --method smd"),
    (["--method", "smd", "--data", "teacher"], "drop --data teacher"),
    (["--method", "meanflow", "--init", "copy"], "unknown --init 'copy'"),
    (["--method", "meanflow", "--velocity", "marginal"], "unknown --velocity 'marginal'"),
    (["--method", "smd", "--velocity", "conditional"], "--velocity conditional does not apply to --method smd"),
    (["--method", "meanflow", "--student-nfe", "1,0"], "--student-nfe must be positive"),
    (["--method", "meanflow", "--data", "mnist"], "unknown --data 'mnist'"),
    (["--method", "meanflow", "--modulation", "1.5"], "lambda"),
    (["--method", "meanflow", "--frac-r-neq-t", "-0.1"], "frac_r_neq_t"),
    (["--method", "meanflow", "--eval-data", "digits"], "shape"),
])
def test_bad_input_is_one_error_line(teacher_dir, tmp_path, extra, message, capsys):
    assert run("--teacher", teacher_dir, "--out", tmp_path / "bad", *TINY, *extra) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "bad" / "checkpoint").exists()


def test_teachers_it_cannot_distil_are_refused(teacher_dir, tmp_path, capsys):
    one_step = tmp_path / "mf"
    genkit.save(one_step, MeanFlow(MLP(2, hidden=8, depth=1)))
    assert run("--teacher", one_step, "--method", "smd", "--out", tmp_path / "a", *TINY) == 2
    assert "not a multi-step flow-matching or diffusion field" in capsys.readouterr().err
    bare = tmp_path / "bare"  # a checkpoint with nothing recording its data: the table needs --eval-data
    genkit.save(bare, genkit.load(teacher_dir / "checkpoint"))
    assert run("--teacher", bare, "--method", "meanflow", "--out", tmp_path / "b", *TINY) == 2
    assert "--eval-data is needed" in capsys.readouterr().err
    assert run("--teacher", tmp_path / "nowhere", "--method", "meanflow", "--out", tmp_path / "c", *TINY,
               "--no-eval") == 2
    assert "no such folder" in capsys.readouterr().err


def test_diffusers_folder_teacher(tmp_path):
    """A diffusers pipeline folder (genkit.interop.to_diffusers of a tiny digits UNet) is a teacher like any
    checkpoint: SMD from it, scored on digits with the Frechet distance."""
    from genkit.interop import to_diffusers
    from genkit.models import Diffusion
    from genkit.nets import UNet

    torch.manual_seed(0)
    model = Diffusion(UNet(8, block_out_channels=(8, 16), norm_num_groups=4, layers_per_block=1, time_scale=1000,
                           time_shift=-1),
                      path="ddpm", prediction="eps", sample_shape=(1, 8, 8))
    folder = to_diffusers(model, tmp_path / "pipe")
    out = tmp_path / "smd"
    assert run("--teacher", folder, "--method", "smd", "--out", out, "--train-steps", "4", "--batch-size", "8",
               "--teacher-steps", "2", "--eval-data", "digits", "--teacher-nfe", "1,2", "--student-nfe", "1",
               "--no-progress") == 0
    table = json.loads((out / "distill_table.json").read_text())
    assert table["metric"] == "frechet_digits" and table["training_steps"]["teacher"] is None
    assert genkit.load(out / "checkpoint").sample(3).shape == (3, 1, 8, 8)


def test_two_processes_under_accelerate(teacher_dir, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    out = tmp_path / "dist"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                           "--main_process_port", port, str(SCRIPT), "--teacher", str(teacher_dir), "--method", "smd",
                           "--out", str(out), "--train-steps", "8", "--batch-size", "16", "--no-progress",
                           "--no-eval", "--teacher-steps", "2"],
                          capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert json.loads((out / "checkpoint" / "trainer_state.json").read_text())["step"] == 8
    assert genkit.load(out / "checkpoint", expect_family="smd").sample(4).shape == (4, 2)


def test_meanflow_student_of_a_unet_teacher_has_smooth_time_features(teacher_dir):
    """A UNet teacher's time features reach its time_scale (999, or 1000 on the ddpm path): the MeanFlow student
    is a fresh UNet of its channels with time_scale 5 (MeanFlow.net_options), the teacher's copy only on request."""
    from genkit.models import Diffusion
    from genkit.nets import UNet

    s = script()
    small = {"block_out_channels": (8, 16), "norm_num_groups": 4, "layers_per_block": 1}
    torch.manual_seed(0)
    fm = FlowMatching(UNet(8, **small), sample_shape=(1, 8, 8))
    ddpm = Diffusion(UNet(8, time_scale=1000, time_shift=-1, **small), path="ddpm", prediction="eps",
                     sample_shape=(1, 8, 8))
    flags = ["--teacher", str(teacher_dir), "--method", "meanflow", "--out", "o"]
    for teacher in (fm, ddpm):
        student = s["build_student"](s["parse_args"](flags), teacher)
        base = student.net.base
        assert (base.time_scale, base.time_shift) == (5.0, 0.0)
        assert base.config()["block_out_channels"] == [8, 16]
    copy = s["build_student"](s["parse_args"]([*flags, "--init", "teacher"]), fm)
    assert copy.net.base.time_scale == 999.0
