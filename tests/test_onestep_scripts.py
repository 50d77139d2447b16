"""samplers/sample.py and eval/evaluate.py on the one-step families: MeanFlow and SMT checkpoints written by
train/train.py, an SMD one distilled from a flow-matching teacher through the Trainer (no train_data.json: a
checkpoint "saved by hand"). One learned jump by default (NFE 1), --steps k for k jumps, the same samples as the
Python API for the same --seed, an SMD checkpoint that samples without its teacher, and one error line for the
settings a one-step model cannot take.

Every script runs in this process through its ``__main__`` (test_scripts.run_main), train.py included.
"""

from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_scripts import EVALUATE, SAMPLE, TRAIN, finite_numbers, run_main

import genkit
from genkit.models import SMD, FlowMatching
from genkit.nets import MLP
from genkit.train import TrainConfig, Trainer

TINY_TRAIN = ["--steps", 12, "--hidden", 16, "--depth", 1, "--batch-size", 64, "--n-samples", 50, "--no-progress"]


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@contextlib.contextmanager
def fresh_accelerate():
    """accelerate's per-process singletons reset around a training run (the fresh_accelerate_state fixture, for
    the module-scoped fixture below)."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    try:
        yield
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()


def _distil_smd(out: Path) -> SMD:
    """SMD from an (untrained, seeded) flow-matching teacher: 6 Trainer steps (5 score updates, 1 generator
    update), checkpoint with EMA weights in ``out/checkpoint``. Returns the in-memory model, in eval mode."""
    torch.manual_seed(0)
    teacher = FlowMatching(MLP(2, hidden=16, depth=1), sample_shape=(2,))
    model = SMD.from_teacher(teacher, batch_size=16)
    cfg = TrainConfig(steps=6, batch_size=16, lr=1e-3, out_dir=str(out), log_every=6, checkpoint_every=None,
                      progress=False, cpu=True)
    with fresh_accelerate():
        Trainer(model, cfg).fit()
    return model.eval()


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """train.py runs of meanflow and smt (in this process, as a user's command line: an interpreter start costs
    more than the training) and the SMD distillation."""
    base = tmp_path_factory.mktemp("onestep")
    for family in ("meanflow", "smt"):
        with fresh_accelerate():
            assert run_main(TRAIN, "--family", family, *map(str, TINY_TRAIN), "--out", str(base / family)) == 0
        assert json.loads((base / family / "train_data.json").read_text())["data"] == "moons"
    return {"meanflow": base / "meanflow", "smt": base / "smt", "smd": base / "smd",
            "smd_model": _distil_smd(base / "smd")}


def data_flag(family: str) -> list[str]:
    """The SMD checkpoint has no train_data.json (the Trainer writes none): evaluate.py needs --data."""
    return ["--data", "moons"] if family == "smd" else []


def sample(run: Path, out: Path, *args: str, capsys) -> tuple[torch.Tensor, str]:
    assert run_main(SAMPLE, "--checkpoint", str(run), "--out", str(out), "--device", "cpu", *args) == 0
    return load_file(str(out / "samples.safetensors"))["samples"], capsys.readouterr().out


def evaluate(run: Path, out: Path, *args: str) -> dict:
    assert run_main(EVALUATE, "--checkpoint", str(run), "--n", "200", "--out", str(out), "--device", "cpu",
                    *args) == 0
    return json.loads(out.read_text())


FAMILIES = ["meanflow", "smt", "smd"]


@pytest.mark.parametrize("family", FAMILIES)
def test_sample_takes_one_learned_jump_by_default_and_k_with_steps(runs, family, tmp_path, capsys):
    run = runs[family]
    model = genkit.load(run)
    assert model.family == family
    one, out = sample(run, tmp_path / "one", "--n", "5", "--seed", "3", capsys=capsys)
    assert one.shape == (5, 2) and torch.isfinite(one).all() and (tmp_path / "one" / "samples.png").is_file()
    assert "NFE 1," in out and "1 learned jumps, uniform in t" in out
    assert torch.equal(one, model.sample(5, generator=gen(3)))  # the API's default: one jump, the same prior draw
    assert torch.equal(one, sample(run, tmp_path / "again", "--n", "5", "--seed", "3", capsys=capsys)[0])
    assert not torch.equal(one, sample(run, tmp_path / "other", "--n", "5", "--seed", "4", capsys=capsys)[0])
    by_name, out = sample(run, tmp_path / "named", "--n", "5", "--seed", "3", "--solver", "jumps", capsys=capsys)
    assert torch.equal(by_name, one) and "NFE 1," in out
    two, out = sample(run, tmp_path / "two", "--n", "5", "--seed", "3", "--steps", "2", capsys=capsys)
    assert two.shape == (5, 2) and "NFE 2," in out and "2 learned jumps" in out
    sol = model.sample(5, steps=2, generator=gen(3), return_solution=True)
    assert sol.nfe == 2 and torch.equal(two, sol.samples) and not torch.equal(two, one)


def test_sample_names_its_default_folder_after_the_jumps(runs, capsys):
    """Default --out: samples_jumps1/ beside the checkpoint folder (no grid part: jumps are uniform in t), and
    samples_restart2/ for two restart steps (formerly 'samples_restart2_uniform in t', a name with spaces)."""
    run = runs["smt"]
    assert run_main(SAMPLE, "--checkpoint", str(run), "--n", "3", "--device", "cpu") == 0
    assert (run / "samples_jumps1" / "samples.safetensors").is_file()
    assert run_main(SAMPLE, "--checkpoint", str(run), "--n", "3", "--solver", "restart", "--steps", "2",
                    "--device", "cpu") == 0
    assert (run / "samples_restart2" / "samples.safetensors").is_file()
    assert "NFE 2" in capsys.readouterr().out


@pytest.mark.parametrize("family", FAMILIES)
def test_evaluate_reports_learned_jumps_nfe_one_by_default(runs, family, tmp_path):
    report = evaluate(runs[family], tmp_path / "eval.json", *data_flag(family))
    assert (report["family"], report["data"], report["n"]) == (family, "moons", 200)  # moons from train_data.json
    assert (report["sampler"], report["solver"], report["steps"], report["nfe"]) == ("learned jumps", "jumps", 1, 1)
    assert report["sampled_with"] == "1 learned jumps, uniform in t" and report["grid"] == "uniform in t"
    for key in ("sliced_w2", "energy_distance", "mmd"):
        assert report[key] > 0 and report["noise_floor"][key] > 0
    if family == "meanflow":
        assert "nll" not in report  # a velocity view to score, but only with --nll
    else:  # no density: said, not computed
        assert report["nll"] is None and "no tractable density" in report["note_nll"]
    finite_numbers(report)
    report = evaluate(runs[family], tmp_path / "eval2.json", "--steps", "2", *data_flag(family))
    assert (report["sampler"], report["steps"], report["nfe"]) == ("learned jumps", 2, 2)


def test_meanflow_takes_ode_solvers_on_its_velocity_view(runs, tmp_path, capsys):
    run = runs["meanflow"]
    x, out = sample(run, tmp_path / "euler", "--n", "4", "--solver", "euler", "--steps", "3", capsys=capsys)
    assert x.shape == (4, 2) and "NFE 3," in out and "euler (ODE solver), 3 steps" in out
    report = evaluate(run, tmp_path / "eval.json", "--solver", "heun", "--steps", "2", "--nll", "--nll-n", "20",
                      "--nll-solver", "euler", "--nll-steps", "4")
    assert (report["sampler"], report["solver"], report["nfe"]) == ("ODE solver", "heun", 4)
    assert report["nll"]["n"] == 20 and "note" not in report["nll"]  # scored the ODE it sampled with
    report = evaluate(run, tmp_path / "eval.json", "--nll", "--nll-n", "20", "--nll-solver", "euler",
                      "--nll-steps", "4")
    assert report["nfe"] == 1 and "velocity view" in report["nll"]["note"]  # the jumps' samples have no density


@pytest.mark.parametrize("family", ["smt", "smd"])
def test_smt_and_smd_take_restart_steps(runs, family, tmp_path, capsys):
    run = runs[family]
    x, out = sample(run, tmp_path / "restart", "--n", "4", "--seed", "1", "--solver", "restart", "--steps", "2",
                    capsys=capsys)
    assert "NFE 2," in out
    assert torch.equal(x, genkit.load(run).sample(4, sampler="restart", steps=2, generator=gen(1)))
    report = evaluate(run, tmp_path / "eval.json", "--solver", "restart", "--steps", "3", *data_flag(family))
    assert (report["sampler"], report["steps"], report["nfe"]) == ("restart", 3, 3)


def test_an_smd_checkpoint_samples_without_its_teacher(runs, tmp_path, capsys):
    """The teacher is never saved: the reloaded model has none, and its one-jump samples are the in-memory
    model's (raw weights) bit for bit; the EMA weights, sample.py's default, are genkit.load's."""
    run, model = runs["smd"], runs["smd_model"]
    assert model.teacher is not None and genkit.load(run).teacher is None
    raw, out = sample(run, tmp_path / "raw", "--n", "6", "--seed", "5", "--raw-weights", capsys=capsys)
    assert "raw weights" in out and "NFE 1," in out
    assert torch.equal(raw, model.sample(6, generator=gen(5)))
    ema, out = sample(run, tmp_path / "ema", "--n", "6", "--seed", "5", capsys=capsys)
    assert "EMA weights" in out and torch.equal(ema, genkit.load(run).sample(6, generator=gen(5)))
    report = evaluate(run, tmp_path / "eval.json", "--data", "moons", "--raw-weights")
    assert report["weights"] == "raw" and report["nfe"] == 1


@pytest.mark.parametrize("script, family, args, named", [
    (SAMPLE, "meanflow", ["--grid", "karras"], "--grid karras would be ignored: jumps run over the model's trained "
                                               "range, uniform in t"),
    (SAMPLE, "smt", ["--solver", "jumps", "--grid", "karras"], "--grid karras would be ignored"),
    (EVALUATE, "smd", ["--data", "moons", "--grid", "logsnr"], "--grid logsnr would be ignored"),
    (SAMPLE, "smd", ["--t-max", "0.5"], "--t-max 0.5 would be ignored"),
    (SAMPLE, "smd", ["--solver", "heun"], "--solver heun: the 'smd' model does not sample with ODE/SDE solvers; its "
                                          "samplers are jumps, restart"),
    (EVALUATE, "smt", ["--solver", "dopri5"], "the 'smt' model does not sample with ODE/SDE solvers"),
    (SAMPLE, "meanflow", ["--solver", "restart"], "--solver restart needs a one-step generator with denoise(x, t)"),
    (SAMPLE, "smt", ["--steps", "0"], "--steps must be a positive integer; got 0"),
    (EVALUATE, "smt", ["--nll"], "--nll: the smt model has no likelihood to score"),
    (EVALUATE, "smd", ["--nll", "--data", "moons"], "--nll: the smd model has no likelihood to score"),
    (EVALUATE, "smd", [], "--data is needed"),
], ids=["grid-meanflow", "grid-jumps-smt", "grid-evaluate-smd", "t-max-smd", "ode-smd", "adaptive-smt",
        "restart-meanflow", "steps-0", "nll-smt", "nll-smd", "smd-without-data"])
def test_settings_a_one_step_model_cannot_take_exit_2_with_one_error_line(runs, script, family, args, named,
                                                                          capsys, tmp_path):
    out = tmp_path / "out"
    assert run_main(script, "--checkpoint", str(runs[family]), "--out", str(out), "--device", "cpu", *args) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and named in lines[0], captured.err
    assert not out.exists()  # nothing written before the error


def test_help_says_one_step_models_take_one_jump(capsys):
    for script in (SAMPLE, EVALUATE):
        assert run_main(script, "--help") == 0
        text = re.sub(r"\s+", " ", capsys.readouterr().out)
        assert "MeanFlow, SMT and SMD" in text and "1 learned jump" in text and "--steps k" in text, script.name
