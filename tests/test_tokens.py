"""The user's own token file: load_tokens on FASTA (multi-line records, case, errors) and its fixed held-out
split, save_tokens' round trip, registry aliases (masked_diffusion = mdlm), and train.py --tokens end to end
with samplers/sample.py decoding the samples and eval/evaluate.py scoring the held-out split."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from test_scripts import EVALUATE, SAMPLE, TRAIN, finite_numbers, run_main

from genkit.data import load_tokens, token_file_format
from genkit.data.sequences import DNA, save_tokens
from genkit.errors import ConfigError, DataError
from genkit.models import FAMILIES
from genkit.registry import Registry


def write_fasta(path, seqs, width=5):
    """``seqs`` as FASTA records ``>r{i} description``, each sequence split over lines of ``width`` letters."""
    lines = []
    for i, seq in enumerate(seqs):
        lines.append(f">r{i} a description")
        lines += [seq[j:j + width] for j in range(0, len(seq), width)]
    path.write_text("\n".join(lines) + "\n")
    return path


def random_dna(n, length, seed=0):
    g = torch.Generator().manual_seed(seed)
    return ["".join(DNA[int(i)] for i in row) for row in torch.randint(0, 4, (n, length), generator=g)]


# --------------------------------------------------------------------------------------------- registry aliases
def test_registry_alias_is_a_second_name_of_one_entry():
    r = Registry("colour")
    r.register("red")(red := object())
    r.alias("rouge", "red")
    assert r.get("rouge") is r.get("red") is red
    assert r.canonical("rouge") == r.canonical("red") == "red"
    assert r.names() == ["red"] and list(r) == ["red"] and len(r) == 1  # test matrices see each entry once
    assert r.aliases() == {"rouge": "red"} and "rouge" in r and "vert" not in r
    r.alias("rouge", "red")  # the same alias again is harmless
    with pytest.raises(ConfigError, match="aliases: rouge = red"):
        r.get("vert")
    with pytest.raises(ConfigError, match="no colour 'blue' is registered"):
        r.alias("bleu", "blue")
    r.register("blue")(object())
    with pytest.raises(ConfigError, match="already stands for 'red'"):
        r.alias("rouge", "blue")
    with pytest.raises(ConfigError, match="is a registered entry"):
        r.alias("blue", "red")
    with pytest.raises(ConfigError, match="already an alias of 'red'"):
        r.register("rouge")(object())
    r.unregister("red")  # an entry takes its aliases with it
    assert "rouge" not in r and r.aliases() == {}


def test_masked_diffusion_is_an_alias_of_mdlm():
    assert FAMILIES.get("masked_diffusion") is FAMILIES.get("mdlm")
    assert FAMILIES.canonical("masked_diffusion") == "mdlm"
    assert "mdlm" in FAMILIES.names() and "masked_diffusion" not in FAMILIES.names()
    assert FAMILIES.aliases()["masked_diffusion"] == "mdlm"


# --------------------------------------------------------------------------------------------- FASTA
def test_load_tokens_reads_multiline_fasta_case_insensitively(tmp_path):
    seqs = ["ACGTACGTAC", "ttttggggcc", "AcGtNAcGtA"]
    write_fasta(tmp_path / "x.fa", seqs, width=4)
    x, alphabet = load_tokens(tmp_path / "x.fa")
    assert alphabet == "ACGNT"  # the sorted letters of the (upper-cased) file
    assert x.dtype == torch.long and x.shape == (3, 10)
    assert ["".join(alphabet[i] for i in row) for row in x.tolist()] == [s.upper() for s in seqs]
    x, alphabet = load_tokens(tmp_path / "x.fa", alphabet="acgtn")  # a given alphabet is upper-cased too
    assert alphabet == "ACGTN" and x[1].tolist() == [3] * 4 + [2] * 4 + [1] * 2
    # no FASTA suffix: the leading '>' says it; ';' comments and blank lines are skipped
    (tmp_path / "x.txt").write_text(";comment\n\n>a\nAC\nGT\n\n>b\nTTAA\n")
    assert token_file_format(tmp_path / "x.txt") == "fasta" and token_file_format(tmp_path / "x.fasta") == "fasta"
    x, alphabet = load_tokens(tmp_path / "x.txt", alphabet="ACGT")
    assert x.tolist() == [[0, 1, 2, 3], [3, 3, 0, 0]]
    # a text file keeps its case (text is not necessarily DNA)
    (tmp_path / "t.txt").write_text("aA\nAa\n")
    x, alphabet = load_tokens(tmp_path / "t.txt")
    assert alphabet == "Aa" and x.tolist() == [[1, 0], [0, 1]]


def test_load_tokens_fasta_errors_name_the_record_and_the_fix(tmp_path):
    write_fasta(tmp_path / "ragged.fasta", ["ACGTACGT", "ACGTACGT", "ACGTAC"], width=3)
    with pytest.raises(DataError, match=r"record 3 \('r2 a description'\) has 6 letters.*8.*pad or crop"):
        load_tokens(tmp_path / "ragged.fasta")
    (tmp_path / "headless.fa").write_text("ACGT\n>a\nACGT\n")
    with pytest.raises(DataError, match="line 1 holds sequence letters before the first '>' header"):
        load_tokens(tmp_path / "headless.fa")
    (tmp_path / "empty_record.fa").write_text(">a\nACGT\n>b\n>c\nACGT\n")
    with pytest.raises(DataError, match=r"record 2 \('b'\) has no sequence"):
        load_tokens(tmp_path / "empty_record.fa")
    (tmp_path / "letters.fa").write_text(">a\nACGT\n>b\nACGX\n")
    with pytest.raises(DataError, match=r"record 2 \('b'\) holds \['X'\] outside the alphabet 'ACGT'"):
        load_tokens(tmp_path / "letters.fa", alphabet="ACGT")
    with pytest.raises(ConfigError, match="repeats a letter"):
        load_tokens(tmp_path / "letters.fa", alphabet="ACGTXA")
    (tmp_path / "nothing.fa").write_text("\n;only a comment\n")
    with pytest.raises(DataError, match="no sequences"):
        load_tokens(tmp_path / "nothing.fa")


def test_the_held_out_split_is_fixed_disjoint_and_in_file_order(tmp_path):
    seqs = random_dna(40, 8)
    write_fasta(tmp_path / "x.fa", seqs)
    every, _ = load_tokens(tmp_path / "x.fa", alphabet="ACGT")
    train, _ = load_tokens(tmp_path / "x.fa", alphabet="ACGT", split="train")
    test, _ = load_tokens(tmp_path / "x.fa", alphabet="ACGT", split="test")
    assert len(test) == 4 and len(train) == 36  # round(0.1 * 40)
    rows = [tuple(r) for r in every.tolist()]
    where = [rows.index(tuple(r)) for r in test.tolist()] + [rows.index(tuple(r)) for r in train.tolist()]
    assert sorted(where) == list(range(40))  # every sequence in exactly one split (the random rows are distinct)
    assert where[:4] == sorted(where[:4]) and where[4:] == sorted(where[4:])  # file order within each split
    assert torch.equal(load_tokens(tmp_path / "x.fa", alphabet="ACGT", split="test")[0], test)  # fixed
    assert len(load_tokens(tmp_path / "x.fa", split="test", holdout=0.25)[0]) == 10
    np.save(tmp_path / "x.npy", every.numpy())  # .npy ids split the same way
    assert torch.equal(load_tokens(tmp_path / "x.npy", split="test")[0], test)
    write_fasta(tmp_path / "small.fa", seqs[:5])
    with pytest.raises(DataError, match="holds 5 sequences.*at least 10"):
        load_tokens(tmp_path / "small.fa", split="train")
    with pytest.raises(ConfigError, match="holdout must be a fraction"):
        load_tokens(tmp_path / "x.fa", split="test", holdout=1.5)


def test_save_tokens_round_trips_through_load_tokens(tmp_path):
    x = torch.randint(0, 5, (6, 7), generator=torch.Generator().manual_seed(1))
    for name in ("s.fasta", "s.txt"):
        save_tokens(tmp_path / name, x, "ACGTN")
        back, alphabet = load_tokens(tmp_path / name, alphabet="ACGTN")
        assert torch.equal(back, x) and alphabet == "ACGTN"
    assert (tmp_path / "s.fasta").read_text().startswith(">sample_0\n")
    with pytest.raises(DataError, match="the alphabet 'ACG' has 3 letters"):
        save_tokens(tmp_path / "bad.txt", x, "ACG")


# --------------------------------------------------------------------------------------------- train.py --tokens
TINY = ["--steps", "6", "--batch-size", "16", "--hidden", "16", "--depth", "1", "--n-samples", "32",
        "--sample-steps", "4", "--no-progress"]


@pytest.fixture(scope="module")
def fasta_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokens")
    fasta = write_fasta(root / "promoters.fasta", [s.lower() for s in random_dna(40, 12)])
    out = root / "run"
    # ACGTN: a letter the file lacks still gets its token (the vocabulary is the alphabet's)
    assert run_main(TRAIN, "--family", "masked_diffusion", "--tokens", str(fasta), "--alphabet", "ACGTN", *TINY,
                    "--out", str(out)) == 0
    return fasta, out


def test_train_on_a_fasta_file_records_its_alphabet_and_split(fasta_run):
    fasta, out = fasta_run
    assert json.loads((out / "train_data.json").read_text()) == {
        "tokens": str(fasta.absolute()), "format": "fasta", "alphabet": "ACGTN", "vocab_size": 5, "holdout": 0.1}
    config = json.loads((out / "checkpoint" / "config.json").read_text())
    assert config["family"] == "mdlm" and config["vocab_size"] == 5 and config["length"] == 12  # canonical name
    m = json.loads((out / "metrics.json").read_text())
    assert m["family"] == "mdlm" and m["data"] == str(fasta) and m["nfe"] == 4
    final, _ = load_tokens(out / "samples.fasta", alphabet="ACGTN")  # the final samples, decoded
    assert final.shape == (32, 12)
    assert m["nll"]["n"] == 4 and m["nll"]["method"] == "ELBO (upper bound)"  # the 4 held-out sequences
    assert 0 <= m["token_tv"] <= 1 and 0 <= m["noise_floor"]["token_tv"] <= 1
    finite_numbers(m)


def test_sample_script_decodes_with_the_runs_alphabet(fasta_run, tmp_path, capsys):
    _, out = fasta_run
    assert run_main(SAMPLE, "--checkpoint", str(out), "--n", "5", "--steps", "3", "--device", "cpu",
                    "--out", str(tmp_path / "s")) == 0
    assert "alphabet ACGTN" in capsys.readouterr().out
    x = load_file(str(tmp_path / "s" / "samples.safetensors"))["samples"]
    assert x.shape == (5, 12) and x.dtype == torch.long
    text = (tmp_path / "s" / "samples.fasta").read_text()
    assert text.count(">sample_") == 5
    back, _ = load_tokens(tmp_path / "s" / "samples.fasta", alphabet="ACGTN")
    assert torch.equal(back, x)  # the FASTA holds exactly the sampled tokens
    assert run_main(SAMPLE, "--checkpoint", str(out), "--alphabet", "ACGT", "--n", "2", "--device", "cpu",
                    "--out", str(tmp_path / "t")) == 2
    assert "has 4 letters but" in capsys.readouterr().err and not (tmp_path / "t").exists()


def test_evaluate_scores_the_held_out_split_of_the_file(fasta_run, tmp_path, capsys):
    fasta, out = fasta_run
    report = tmp_path / "eval.json"
    assert run_main(EVALUATE, "--checkpoint", str(out), "--n", "20", "--steps", "4", "--device", "cpu",
                    "--out", str(report)) == 0
    r = json.loads(report.read_text())
    assert r["family"] == "mdlm" and r["data"] == str(fasta.absolute()) and r["nll"]["n"] == 4
    finite_numbers(r)
    assert run_main(EVALUATE, "--checkpoint", str(out), "--data", "motifs", "--device", "cpu",
                    "--out", str(tmp_path / "other.json")) == 2
    assert "trained on the token file" in capsys.readouterr().err


def test_train_on_a_text_file_writes_text_samples(tmp_path, capsys):
    (tmp_path / "seqs.txt").write_text("\n".join(random_dna(20, 6, seed=2)) + "\n")
    out = tmp_path / "run"
    assert run_main(TRAIN, "--family", "mdlm", "--tokens", str(tmp_path / "seqs.txt"), *TINY, "--out", str(out)) == 0
    record = json.loads((out / "train_data.json").read_text())
    assert record["format"] == "text" and record["alphabet"] == "ACGT" and record["vocab_size"] == 4
    assert run_main(SAMPLE, "--checkpoint", str(out), "--n", "3", "--steps", "2", "--device", "cpu",
                    "--out", str(tmp_path / "s")) == 0
    lines = (tmp_path / "s" / "samples.txt").read_text().splitlines()
    assert len(lines) == 3 and all(len(line) == 6 and set(line) <= set("ACGT") for line in lines)


def test_tokens_errors(tmp_path, capsys):
    write_fasta(tmp_path / "ok.fa", random_dna(20, 6))
    o = str(tmp_path / "o")
    cases = [
        (["--family", "mdlm", "--tokens", str(tmp_path / "ok.fa"), "--data", "motifs"],
         "--data motifs and --tokens"),
        (["--family", "mdlm", "--tokens", str(tmp_path / "ok.fa"), "--table", "t.csv"], "--table t.csv and --tokens"),
        (["--family", "mdlm", "--alphabet", "ACGT", "--data", "motifs"], "--alphabet ACGT applies to --tokens"),
        (["--family", "mdlm", "--tokens", str(tmp_path / "ok.fa"), "--conditional"], "--conditional needs classes"),
        (["--tokens", str(tmp_path / "ok.fa")], "holds token ids"),  # a real-valued family: flow_matching
    ]
    for argv, message in cases:
        assert run_main(TRAIN, *argv, "--steps", "2", "--no-progress", "--out", o) == 2, argv
        err = capsys.readouterr().err
        assert message in err, (argv, err)
    write_fasta(tmp_path / "ragged.fa", ["ACGTAC"] * 12 + ["ACG"])
    assert run_main(TRAIN, "--family", "mdlm", "--tokens", str(tmp_path / "ragged.fa"), "--out", o) == 2
    assert "record 13 ('r12 a description') has 3 letters" in capsys.readouterr().err
    assert run_main(TRAIN, "--family", "mdlm", "--tokens", str(tmp_path / "missing.fa"), "--out", o) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_a_resume_with_another_alphabet_is_refused(fasta_run, capsys):
    fasta, out = fasta_run
    before = (out / "train_data.json").read_text()
    assert run_main(TRAIN, "--family", "mdlm", "--tokens", str(fasta), "--alphabet", "NACGT", *TINY,
                    "--out", str(out)) == 2  # same vocabulary, another id per letter: other data
    assert "--alphabet 'ACGTN' there, 'NACGT' now" in capsys.readouterr().err
    assert (out / "train_data.json").read_text() == before


def test_npy_tokens_take_the_whole_files_vocabulary(tmp_path):
    x = torch.randint(0, 3, (20, 5), generator=torch.Generator().manual_seed(0))
    np.save(tmp_path / "rows.npy", np.arange(20).reshape(20, 1))  # which rows the test split holds
    held = load_tokens(tmp_path / "rows.npy", split="test")[0][:, 0].tolist()
    x[held[0], 0] = 6  # id 6 only in a held-out sequence: the model still needs 7 tokens to score it
    np.save(tmp_path / "ids.npy", x.numpy())
    out = tmp_path / "run"
    assert run_main(TRAIN, "--family", "mdlm", "--tokens", str(tmp_path / "ids.npy"), *TINY, "--out", str(out)) == 0
    record = json.loads((out / "train_data.json").read_text())
    assert record["format"] == "npy" and record["alphabet"] is None and record["vocab_size"] == 7
    assert json.loads((out / "checkpoint" / "config.json").read_text())["vocab_size"] == 7
    assert not (out / "samples.txt").exists()  # no alphabet: ids only

