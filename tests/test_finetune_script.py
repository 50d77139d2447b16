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
