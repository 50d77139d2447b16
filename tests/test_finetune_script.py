"""train/finetune.py (DRAKES / SEPO from an mdlm checkpoint, reward vs naturalness log and report, resume) and
samplers/sample.py --solver svdd, end to end at tiny size on the DNA-like task."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from test_scripts import ROOT, SAMPLE, TRAIN, finite_numbers, run_main

import genkit
from genkit.data import dna_task

FINETUNE = ROOT / "train" / "finetune.py"
PRETRAIN = ["--family", "mdlm", "--data", "dna", "--steps", "40", "--batch-size", "64", "--hidden", "32",
            "--depth", "1", "--n-samples", "32", "--sample-steps", "4", "--no-progress"]
FAST = ["--reward", "dna_activity", "--sample-steps", "6", "--eval-samples", "16", "--no-progress"]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    out = tmp_path_factory.mktemp("dna") / "run"
    assert run_main(TRAIN, *PRETRAIN, "--out", str(out)) == 0
    return out


def test_drakes_writes_checkpoint_log_report_and_plot(pretrained, tmp_path):
    out = tmp_path / "drakes"
    assert run_main(FINETUNE, "--model", str(pretrained), "--method", "drakes", "--train-steps", "4",
                    "--batch-size", "4", "--grad-accum", "2", "--eval-every", "2", "--lr", "1e-2", "--out", str(out),
                    *FAST) == 0
    for name in ("checkpoint", "finetune_log.jsonl", "finetune_report.json", "finetune_report.md",
                 "reward_naturalness.png", "metrics.jsonl", "train_data.json"):
        assert (out / name).exists(), name
    log = [json.loads(line) for line in (out / "finetune_log.jsonl").read_text().splitlines()]
    assert [line["step"] for line in log] == [0, 2, 4]
    for key in ("dna_activity_mean", "dna_activity_median", "kmer3_corr", "log_likelihood", "diversity", "unique"):
        assert all(key in line for line in log), key
    report = json.loads((out / "finetune_report.json").read_text())
    assert report["pretrained"] == log[0] and report["finetuned"] == log[-1]
    assert json.loads((out / "checkpoint" / "trainer_state.json").read_text())["train_config"][
        "gradient_accumulation_steps"] == 2
    finite_numbers(report["log"])
    # step 0 scores the pretrained model itself, from the evaluation noise
    pre = genkit.load(pretrained / "checkpoint")
    x = pre.sample(16, steps=6, generator=torch.Generator().manual_seed(7))
    assert log[0]["dna_activity_mean"] == pytest.approx(float(dna_task.activity(x).mean()), abs=1e-5)
    # the fine-tuned checkpoint is an mdlm in the common format; its weights moved, the pretrained ones did not
    tuned = genkit.load(out / "checkpoint")
    assert tuned.family == "mdlm"
    moved = [not torch.equal(a, b) for a, b in zip(tuned.state_dict().values(), pre.state_dict().values(),
                                                     strict=True)]
    assert any(moved)
    frozen = json.loads((out / "checkpoint" / "trainer_state.json").read_text())["frozen"]
    assert frozen["frozen.reference"]["source"] == str(pretrained / "checkpoint")  # recorded by reference
    assert not any(k.startswith("frozen") for k in load_file(str(out / "checkpoint" / "model.safetensors")))


def test_sepo_with_a_users_non_differentiable_reward_and_resume(pretrained, tmp_path):
    reward = tmp_path / "gc.py"
    reward.write_text("def gc(x):\n    return ((x == 1) | (x == 2)).float().mean(-1)\n")
    out = tmp_path / "sepo"
    args = ["--model", str(pretrained), "--method", "sepo", "--reward", f"{reward}:gc", "--batch-size", "2",
            "--group", "2", "--inner", "1", "--sample-steps", "4", "--eval-samples", "8", "--no-progress",
            "--out", str(out)]
    assert run_main(FINETUNE, *args, "--train-steps", "2") == 0
    report = json.loads((out / "finetune_report.json").read_text())
    assert {"gc_mean", "gc_median", "dna_activity_mean"} <= set(report["finetuned"])
    assert run_main(FINETUNE, *args, "--train-steps", "3") == 0  # resumed from step 2
    report = json.loads((out / "finetune_report.json").read_text())
    assert report["finetuned"]["step"] == 3
    assert run_main(FINETUNE, *args, "--train-steps", "4", "--clip", "0.5") == 2  # another objective: refused


@pytest.mark.parametrize("extra, message", [
    (["--method", "drakes", "--group", "3"], "does not apply to --method drakes"),
    (["--method", "sepo", "--alpha", "0.1"], "does not apply to --method sepo"),
    (["--method", "sepo", "--states", "soft"], "does not apply to --method sepo"),
    (["--method", "drakes", "--reward", "dna_activity", "--states", "hard"], "states"),
    (["--method", "ppo"], "unknown --method"),
    (["--method", "sepo", "--reward", "nope"], "unknown reward"),
    (["--method", "sepo", "--eval-samples", "1"], "at least 2"),
])
def test_bad_flags_are_one_line_errors(pretrained, tmp_path, capsys, extra, message):
    assert run_main(FINETUNE, "--model", str(pretrained), "--out", str(tmp_path / "x"), *extra) == 2
    assert message in capsys.readouterr().err


def test_drakes_refuses_a_non_differentiable_reward(pretrained, tmp_path, capsys):
    reward = tmp_path / "r.py"
    reward.write_text("def count(x):\n    return (x == 0).float().sum(-1)\n")
    assert run_main(FINETUNE, "--model", str(pretrained), "--method", "drakes", "--reward", f"{reward}:count",
                    "--out", str(tmp_path / "x")) == 2
    assert "not differentiable" in capsys.readouterr().err and not (tmp_path / "x" / "checkpoint").exists()


def test_finetune_refuses_a_continuous_model(tmp_path, capsys):
    run = tmp_path / "fm"
    assert run_main(TRAIN, "--steps", "2", "--hidden", "8", "--depth", "1", "--n-samples", "16", "--sample-steps",
                    "2", "--no-progress", "--out", str(run)) == 0
    assert run_main(FINETUNE, "--model", str(run), "--method", "sepo", "--out", str(tmp_path / "x")) == 2
    assert "masked discrete diffusion" in capsys.readouterr().err


def test_sample_script_svdd(pretrained, tmp_path, capsys):
    out = tmp_path / "svdd"
    assert run_main(SAMPLE, "--checkpoint", str(pretrained), "--solver", "svdd", "--reward", "dna_activity",
                    "--candidates", "3", "--steps", "4", "--n", "6", "--device", "cpu", "--out", str(out)) == 0
    assert "NFE 10" in capsys.readouterr().out  # 1 + (steps - 1) * M
    x = load_file(str(out / "samples.safetensors"))["samples"]
    assert x.shape == (6, 100) and x.dtype == torch.long and int(x.max()) < 4
    # the same draws as the library's SVDD sampler from the same seed
    from genkit.finetune import SVDDSampler
    from genkit.finetune.oracles import get_reward

    model = genkit.load(pretrained / "checkpoint")
    ref = model.sample(6, sampler=SVDDSampler(get_reward("dna_activity"), candidates=3, steps=4),
                       generator=torch.Generator().manual_seed(0))
    assert torch.equal(x, ref)
    assert run_main(SAMPLE, "--checkpoint", str(pretrained), "--solver", "svdd", "--out", str(out)) == 2
    assert "needs --reward" in capsys.readouterr().err
    assert run_main(SAMPLE, "--checkpoint", str(pretrained), "--candidates", "3", "--out", str(out)) == 2
    assert "--solver svdd" in capsys.readouterr().err


def test_sample_script_svdd_on_a_continuous_model(tmp_path, capsys):
    """--solver svdd on a flow-matching run steers through Euler-Maruyama's Gaussian steps (from t = 0.99, as
    any stochastic solver there): with the reward x_0 the samples move right of plain Euler-Maruyama's."""
    run = tmp_path / "fm"
    assert run_main(TRAIN, "--steps", "30", "--hidden", "16", "--depth", "1", "--n-samples", "16", "--sample-steps",
                    "2", "--no-progress", "--out", str(run)) == 0
    reward = tmp_path / "right.py"
    reward.write_text("def right(x):\n    return x[:, 0].float()\n")
    common = ["--checkpoint", str(run), "--steps", "8", "--n", "400", "--device", "cpu"]
    assert run_main(SAMPLE, *common, "--solver", "euler_maruyama", "--out", str(tmp_path / "plain")) == 0
    assert run_main(SAMPLE, *common, "--solver", "svdd", "--reward", f"{reward}:right", "--candidates", "4",
                    "--out", str(tmp_path / "svdd")) == 0
    assert "solver euler_maruyama" in capsys.readouterr().out
    plain = load_file(str(tmp_path / "plain" / "samples.safetensors"))["samples"]
    guided = load_file(str(tmp_path / "svdd" / "samples.safetensors"))["samples"]
    assert guided[:, 0].mean() > plain[:, 0].mean() + 0.3, (guided[:, 0].mean(), plain[:, 0].mean())
    assert run_main(SAMPLE, *common, "--solver", "svdd", "--svdd-solver", "heun", "--reward", f"{reward}:right",
                    "--out", str(tmp_path / "x")) == 2
    assert "Gaussian transition" in capsys.readouterr().err


# --- continuous models: VARD, DRaFT, DDPO --------------------------------------------------------------------------
QUADRATIC = """import torch

C = torch.tensor([1.5, 0.0])


def quad(x):
    return -(x - C.to(x)).square().sum(-1)


quad.differentiable = True


def box(x):
    return (x[:, 0] > 1.0).to(x.dtype)


def height(x):
    return x[:, 1]
"""
CHAIN = ["--sample-steps", "8", "--no-progress"]


@pytest.fixture(scope="module")
def moons(tmp_path_factory):
    """A flow-matching run on moons and a file of rewards: quad = -||x - (1.5, 0)||^2 (differentiable), box = 1[x_0 >
    1] (not), height = x_1."""
    root = tmp_path_factory.mktemp("moons")
    assert run_main(TRAIN, "--data", "moons", "--steps", "300", "--hidden", "32", "--depth", "2", "--n-samples", "16",
                    "--sample-steps", "2", "--no-progress", "--out", str(root / "run")) == 0
    (root / "rewards.py").write_text(QUADRATIC)
    return root / "run", root / "rewards.py"


def chain_rollout(model, n, seed=7, steps=8):
    """The evaluation's rollout: Euler-Maruyama on the uniform grid from t = 0.99 (the flow's SDE is singular at 1),
    the prior drawn and every step's noise from ``seed``."""
    from genkit.finetune import GaussianChain
    from genkit.solvers import get_grid

    chain = GaussianChain("euler_maruyama", steps, get_grid("uniform", t_max=0.99, t_min=0.0))
    field, times, end = chain.plan(model)
    g = torch.Generator().manual_seed(seed)
    x = model.path.sample_prior((n, 2), generator=g, dtype=next(model.parameters()).dtype)
    with torch.no_grad():
        return chain, chain.rollout(field, x, times, end, {}, generator=g)


def test_vard_on_flow_matching_writes_outputs_and_the_reward_rises(moons, tmp_path):
    """VARD from a flow-matching moons run toward a user's quadratic reward: the log scores the pretrained model at
    step 0 and every --eval-every steps from the same noise (reward, the summed per-step KL to the pretrained steps,
    the drift from held-out moons); the reward climbs from step 0, the KL grows from 0, and the checkpoint is a
    flow-matching model with the pretrained one recorded by reference."""
    from genkit.cli import sample_distances
    from genkit.data import held_out
    from genkit.finetune import step_kl

    run, rewards = moons
    out = tmp_path / "vard"
    assert run_main(FINETUNE, "--model", str(run), "--method", "vard", "--reward", f"{rewards}:quad",
                    "--value-warmup", "15", "--policy-updates", "3", "--value-lr-scale", "1",
                    "--value-replay", "1", "--replay-batches", "2",
                    "--train-steps", "30", "--eval-every", "10",
                    "--lr", "1e-2", "--batch-size", "64", "--eval-samples", "128", "--out", str(out), *CHAIN) == 0
    for name in ("checkpoint", "finetune_log.jsonl", "finetune_report.json", "finetune_report.md",
                 "reward_kl_drift.png", "metrics.jsonl", "train_data.json"):
        assert (out / name).exists(), name
    log = [json.loads(line) for line in (out / "finetune_log.jsonl").read_text().splitlines()]
    assert [line["step"] for line in log] == [0, 10, 20, 30]
    for key in ("quad_mean", "quad_median", "kl", "sliced_w2", "energy_distance", "mmd"):
        assert all(key in line for line in log), key
    report = json.loads((out / "finetune_report.json").read_text())
    assert report["pretrained"] == log[0] and report["finetuned"] == log[-1] and report["data"] == "moons"
    # the fresh value steps query the reward (15 warm-up, then steps 15, 20, 25 of rounds of 1 fresh + 1 replay + 3
    # policy steps); the replay and policy steps do not
    assert report["reward_queries"] == 64 * (15 + 3)
    finite_numbers(report["log"])
    # measured: quad_mean -4.03 -> -1.18 (the tilted target's pull toward (1.5, 0)), KL 0 -> 0.72 nats
    assert log[-1]["quad_mean"] > log[0]["quad_mean"] + 1.5, (log[0], log[-1])
    assert log[0]["kl"] == 0 and log[-1]["kl"] > 0.1
    # step 0 is the pretrained model itself, from the evaluation noise, against held-out moons
    pre = genkit.load(run / "checkpoint")
    _, roll = chain_rollout(pre, 128)
    r = -(roll.samples - torch.tensor([1.5, 0.0])).square().sum(-1)
    assert log[0]["quad_mean"] == pytest.approx(float(r.mean()), abs=1e-5)
    ref = held_out("moons", 128, 0)[0]
    assert log[0]["sliced_w2"] == pytest.approx(sample_distances(roll.samples, ref, None, 0)["sliced_w2"], rel=1e-5)
    # the last line is the checkpoint's: its reward, and its per-step KL to the pretrained steps summed over the chain
    tuned = genkit.load(out / "checkpoint")
    assert tuned.family == "flow_matching"
    chain, roll = chain_rollout(tuned, 128)
    with torch.no_grad():
        kl = sum(step_kl(roll.states[n + 1].transition.mean, chain.transition(chain.field(pre), roll.states[n],
                                                                               {}).mean,
                         roll.states[n + 1].transition.std) for n in roll.noisy)
    assert log[-1]["kl"] == pytest.approx(float(kl.mean()), rel=1e-4)
    r = -(roll.samples - torch.tensor([1.5, 0.0])).square().sum(-1)
    assert log[-1]["quad_mean"] == pytest.approx(float(r.mean()), abs=1e-4)
    state = json.loads((out / "checkpoint" / "trainer_state.json").read_text())
    assert state["frozen"]["frozen.reference"]["source"] == str(run / "checkpoint")  # recorded by reference
    assert not any(k.startswith("frozen") for k in load_file(str(out / "checkpoint" / "model.safetensors")))


@pytest.mark.parametrize("method, flags", [("draft", ["--truncate", "2", "--eta", "0.1"]),
                                           ("ddpo", ["--clip", "0.2", "--reuse", "2"])])
def test_draft_and_ddpo_fine_tune_flow_matching_and_resume(moons, tmp_path, method, flags):
    run, rewards = moons
    out = tmp_path / method
    args = ["--model", str(run), "--method", method, "--reward", f"{rewards}:quad", *flags, "--eval-every", "3",
            "--lr", "1e-2", "--batch-size", "32", "--eval-samples", "64", "--out", str(out), *CHAIN]
    assert run_main(FINETUNE, *args, "--train-steps", "3") == 0
    assert run_main(FINETUNE, *args, "--train-steps", "6") == 0  # resumed from step 3
    log = [json.loads(line) for line in (out / "finetune_log.jsonl").read_text().splitlines()]
    assert [line["step"] for line in log] == [0, 3, 6]
    # measured in 6 steps: draft -3.4 -> -0.15, ddpo -3.4 -> -0.41
    assert log[-1]["quad_mean"] > log[0]["quad_mean"] + 1.0 and log[-1]["kl"] > 0, log
    assert genkit.load(out / "checkpoint").family == "flow_matching"
    assert run_main(FINETUNE, *args, "--train-steps", "7", "--eta", "0.5") == 2  # another objective: refused


def test_a_class_conditional_model_fine_tunes_on_the_classes_of_class(tmp_path, capsys):
    """--class reaches the model: on a moons model conditioned on its two moons, the evaluation samples of class 0
    (the upper moon) lie above those of class 1."""
    run = tmp_path / "cond"
    assert run_main(TRAIN, "--data", "moons", "--conditional", "--steps", "150", "--hidden", "32", "--depth", "2",
                    "--n-samples", "16", "--sample-steps", "2", "--no-progress", "--out", str(run)) == 0
    rewards = tmp_path / "rewards.py"
    rewards.write_text(QUADRATIC)
    common = ["--model", str(run), "--method", "ddpo", "--reward", f"{rewards}:height", "--train-steps", "1",
              "--batch-size", "8", "--eval-samples", "64", *CHAIN]
    heights = []
    for c in ("0", "1"):
        assert run_main(FINETUNE, *common, "--class", c, "--out", str(tmp_path / c)) == 0
        heights.append(json.loads((tmp_path / c / "finetune_report.json").read_text())["pretrained"]["height_mean"])
    assert heights[0] > heights[1] + 0.5, heights
    assert run_main(FINETUNE, *common, "--class", "0,1", "--advantages", "per_prompt", "--out",
                    str(tmp_path / "both")) == 0
    assert run_main(FINETUNE, *common, "--out", str(tmp_path / "x")) == 2
    assert "pass --class IDS" in capsys.readouterr().err
    assert run_main(FINETUNE, *common, "--class", "2", "--out", str(tmp_path / "x")) == 2
    assert "classes are 0..1" in capsys.readouterr().err


def test_a_diffusers_folder_fine_tunes_with_drift_in_digits_features(tmp_path, monkeypatch):
    """A diffusers pipeline folder (8x8, one channel) through genkit.from_diffusers, DRaFT toward brightness, with
    the image drift the Frechet distance in the features of genkit.cli.digits_features (here a fixed projection,
    for speed: the real one trains a classifier for ~15 s)."""
    from test_interop import _tiny_pipeline

    import genkit.cli
    from genkit import metrics
    from genkit.data import held_out

    _tiny_pipeline(tmp_path / "pipe")
    proj = torch.randn(64, 6, generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(genkit.cli, "digits_features", lambda: lambda x: x.flatten(1).float() @ proj)
    reward = tmp_path / "bright.py"
    reward.write_text("def bright(x):\n    return x.mean((1, 2, 3))\n\n\nbright.differentiable = True\n")
    out = tmp_path / "draft"
    assert run_main(FINETUNE, "--model", str(tmp_path / "pipe"), "--method", "draft", "--reward", f"{reward}:bright",
                    "--data", "digits", "--train-steps", "2", "--eval-every", "2", "--sample-steps", "3",
                    "--eval-samples", "16", "--batch-size", "4", "--lr", "1e-3", "--no-progress",
                    "--out", str(out)) == 0
    report = json.loads((out / "finetune_report.json").read_text())
    before, after = report["pretrained"], report["finetuned"]
    assert after["bright_mean"] > before["bright_mean"] and after["kl"] > 0, (before, after)
    assert (out / "reward_kl_drift.png").exists() and genkit.load(out / "checkpoint").family == "diffusion"
    # step 0: the pipeline's ancestral samples from the evaluation noise, scored in those features
    from genkit.finetune import GaussianChain

    pre = genkit.from_diffusers(tmp_path / "pipe")
    chain = GaussianChain("ancestral", 3)
    field, times, end = chain.plan(pre)
    g = torch.Generator().manual_seed(7)
    x = pre.path.sample_prior((16, 1, 8, 8), generator=g)
    with torch.no_grad():
        samples = chain.rollout(field, x, times, end, {}, generator=g).samples
    ref = held_out("digits", 16, 0)[0]
    expect = metrics.fid(samples.clamp(-1, 1), ref, lambda x: x.flatten(1).float() @ proj)
    assert before["frechet_digits"] == pytest.approx(expect, rel=1e-4)


@pytest.mark.parametrize("extra, message", [
    (["--method", "draft", "--reward", "{r}:box"], "not differentiable; use --method vard or ddpo"),
    (["--method", "vard", "--solver", "heun"], "--solver heun is deterministic"),
    (["--method", "ddpo", "--solver", "ddim"], "use --solver ancestral (diffusion) or euler_maruyama"),
    (["--method", "sepo"], "for this continuous model use --method vard, draft or ddpo"),
    (["--method", "vard", "--truncate", "3"], "use --method drakes or draft"),
    (["--method", "drakes", "--eta", "1"], "use --method vard, draft or ddpo"),
    (["--method", "vard", "--class", "1"], "unconditional; drop --class"),
    (["--method", "ddpo", "--advantages", "per_prompt"], "use --advantages batch"),
    (["--method", "drakes", "--class", "1"], "--class 1 does not apply to --method drakes"),
    (["--method", "ddpo", "--class", "a"], "comma-separated class ids"),
    (["--method", "vard", "--data", "digits"], "shape (1, 8, 8) but the model makes (2,)"),
])
def test_continuous_bad_flags_are_one_line_errors(moons, tmp_path, capsys, extra, message):
    run, rewards = moons
    extra = [e.format(r=rewards) for e in extra]
    if "--reward" not in extra:
        extra += ["--reward", f"{rewards}:quad"]
    assert run_main(FINETUNE, "--model", str(run), "--out", str(tmp_path / "x"), *extra) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "x" / "checkpoint").exists()


def test_a_continuous_method_refuses_an_mdlm_model(pretrained, tmp_path, capsys):
    assert run_main(FINETUNE, "--model", str(pretrained), "--method", "vard", "--reward", "dna_activity",
                    "--out", str(tmp_path / "x")) == 2
    assert "for masked diffusion use --method drakes or sepo" in capsys.readouterr().err
