"""mdlm through the scripts: train.py --family mdlm --data motifs end to end, sample.py and evaluate.py on its
checkpoint, the motifs data set and the token-file loader, and the errors of token / float data mix-ups."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from test_scripts import EVALUATE, SAMPLE, TRAIN, finite_numbers, run_main

from genkit.data import held_out, load_dataset, load_tokens
from genkit.data.sequences import MOTIFS, decode, motif_rate, motifs_entropy_bounds
from genkit.errors import DataError

TINY = ["--family", "mdlm", "--data", "motifs", "--steps", "6", "--batch-size", "32", "--hidden", "16", "--depth", "1",
        "--n-samples", "64", "--sample-steps", "4", "--no-progress"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("mdlm") / "run"
    assert run_main(TRAIN, *TINY, "--out", str(out)) == 0
    return out


def test_train_writes_checkpoint_picture_and_token_metrics(run):
    for name in ("checkpoint", "train_data.json", "samples.png", "metrics.json", "metrics.jsonl"):
        assert (run / name).exists(), name
    assert json.loads((run / "train_data.json").read_text()) == {"data": "motifs"}
    m = json.loads((run / "metrics.json").read_text())
    assert m["family"] == "mdlm" and m["nfe"] == 4 and m["n_samples"] == 64
    assert 0 <= m["token_tv"] <= 1 and 0 <= m["noise_floor"]["token_tv"] <= 1
    assert m["noise_floor"]["motif_rate"] == 1.0 and m["reference_statistics"]["motif_rate"] == 1.0
    assert m["nll"]["method"] == "ELBO (upper bound)"
    assert m["nll"]["nats"] >= m["data_entropy_nats"]["lower"]
    finite_numbers(m)


def test_sample_script_writes_long_tokens(run, tmp_path, capsys):
    assert run_main(SAMPLE, "--checkpoint", str(run), "--n", "5", "--steps", "3", "--device", "cpu",
                    "--out", str(tmp_path / "s")) == 0
    assert "NFE 3" in capsys.readouterr().out
    x = load_file(str(tmp_path / "s" / "samples.safetensors"))["samples"]
    assert x.shape == (5, 32) and x.dtype == torch.long and int(x.min()) >= 0 and int(x.max()) < 4
    assert (tmp_path / "s" / "samples.png").is_file()
    assert (tmp_path / "s" / "samples.txt").read_text().splitlines() == decode(x)  # motifs' alphabet, ACGT


def test_evaluate_reports_the_elbo_and_token_statistics(run, tmp_path):
    out = tmp_path / "eval.json"
    assert run_main(EVALUATE, "--checkpoint", str(run), "--n", "100", "--steps", "4", "--nll-n", "50",
                    "--device", "cpu", "--out", str(out)) == 0
    r = json.loads(out.read_text())
    assert r["family"] == "mdlm" and r["data"] == "motifs" and r["nfe"] == 4 and r["steps"] == 4
    nll = r["nll"]
    assert nll["method"] == "ELBO (upper bound)" and nll["n"] == 50 and math.isfinite(nll["nats"])
    assert nll["bits_per_dim"] == pytest.approx(nll["nats"] / (32 * math.log(2)))
    low, high = motifs_entropy_bounds(32)
    assert r["data_entropy_nats"] == pytest.approx({"lower": low, "upper": high})
    assert nll["nats"] >= low  # any model's expected NLL is at least the entropy, an ELBO more
    assert set(r["noise_floor"]) == {"token_tv", "motif_rate"} and 0 <= r["motif_rate"] <= 1
    finite_numbers(r)


def test_mdlm_on_float_data_names_a_token_set(tmp_path, capsys):
    assert run_main(TRAIN, "--family", "mdlm", "--data", "moons", "--steps", "2", "--out", str(tmp_path / "o")) == 2
    err = capsys.readouterr().err
    assert "token sequences" in err and "--data motifs" in err


def test_a_float_family_on_token_data_is_refused(tmp_path, capsys):
    assert run_main(TRAIN, "--data", "motifs", "--steps", "2", "--out", str(tmp_path / "o")) == 2
    assert "--family mdlm" in capsys.readouterr().err


def test_mdlm_flags_are_its_own(tmp_path, capsys):
    assert run_main(TRAIN, "--schedule", "log_linear", "--steps", "2", "--out", str(tmp_path / "o")) == 2
    assert "--family mdlm" in capsys.readouterr().err
    assert run_main(TRAIN, *TINY, "--net", "nope", "--out", str(tmp_path / "p")) == 2
    assert "conv_dna" in capsys.readouterr().err


def test_motifs_is_deterministic_long_and_holds_motifs():
    a = load_dataset("motifs", n=50, generator=torch.Generator().manual_seed(3))
    b = load_dataset("motifs", n=50, generator=torch.Generator().manual_seed(3))
    assert a.dtype == torch.long and a.shape == (50, 32) and torch.equal(a, b)
    assert int(a.min()) >= 0 and int(a.max()) <= 3
    assert all(any(m in s for m in MOTIFS) for s in decode(a))
    assert motif_rate(torch.randint(0, 4, (4000, 32), generator=torch.Generator().manual_seed(0))) < 0.05
    assert load_dataset("motifs", n=3, length=10).shape == (3, 10)


def test_motifs_held_out_is_two_fresh_draws():
    ref, floor = held_out("motifs", 40, seed=0)
    train = load_dataset("motifs", n=40, generator=torch.Generator().manual_seed(0))
    assert ref.shape == floor.shape == (40, 32) and ref.dtype == torch.long
    assert not torch.equal(ref, floor) and not torch.equal(ref, train)
    assert torch.equal(held_out("motifs", 40, seed=0)[0], ref)


def test_load_tokens_npy_and_text(tmp_path):
    np.save(tmp_path / "t.npy", np.array([[0, 1, 2], [2, 1, 0]], dtype=np.int32))
    x, alphabet = load_tokens(tmp_path / "t.npy")
    assert x.dtype == torch.long and x.tolist() == [[0, 1, 2], [2, 1, 0]] and alphabet is None
    (tmp_path / "t.txt").write_text("ACGT\n\nTTAA\n")
    x, alphabet = load_tokens(tmp_path / "t.txt")
    assert alphabet == "ACGT" and x.tolist() == [[0, 1, 2, 3], [3, 3, 0, 0]]
    x, _ = load_tokens(tmp_path / "t.txt", alphabet="TGCA")
    assert x[0].tolist() == [3, 2, 1, 0]
    (tmp_path / "bad.txt").write_text("ACG\nAC\n")
    with pytest.raises(DataError, match="same length"):
        load_tokens(tmp_path / "bad.txt")
    np.save(tmp_path / "f.npy", np.zeros((2, 3)))
    with pytest.raises(DataError, match="integer"):
        load_tokens(tmp_path / "f.npy")
