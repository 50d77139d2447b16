"""The DNA-like task (genkit.data.dna_task), its oracles and named rewards (genkit.finetune.oracles), the sequence
metrics (k-mer correlation, diversity) and the reward-vs-naturalness report (genkit.finetune.report)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from genkit.data import dna_task as task
from genkit.data import load_dataset
from genkit.data.sequences import encode, sequence_statistics
from genkit.errors import ConfigError, DataError, ShapeError
from genkit.finetune import Reward
from genkit.finetune.oracles import REWARDS, dna_oracle, get_reward, train_oracle
from genkit.finetune.report import sequence_report
from genkit.metrics import kmer_correlation, kmer_frequencies, sequence_diversity, unique_fraction


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_background_is_the_markov_chain():
    """With no planted motifs the transition frequencies are the chain's, within 4 standard errors."""
    x = task.dna(4000, generator=gen(), rate=0.0)
    pairs = torch.zeros(4, 4, dtype=torch.float64)
    pairs.index_put_((x[:, :-1].flatten(), x[:, 1:].flatten()), torch.ones(x[:, 1:].numel(), dtype=torch.float64),
                     accumulate=True)
    rows = pairs.sum(1, keepdim=True)
    freq, p = pairs / rows, torch.tensor(task.TRANSITIONS, dtype=torch.float64)
    se = (p * (1 - p) / rows).sqrt()
    assert ((freq - p).abs() < 4 * se).all(), (freq - p).abs() / se
    start = torch.bincount(x[:, 0], minlength=4).double() / x.shape[0]
    q = torch.tensor(task.START, dtype=torch.float64)
    assert ((start - q).abs() < 4 * (q * (1 - q) / x.shape[0]).sqrt()).all()


def test_planted_motifs_and_activity_of_exact_instances():
    """An exact instance of motif k on a motif-free background adds WEIGHTS[k] * sigmoid(3 BETA) to the activity
    (up to the background's own tiny occupancy); the repressor lowers it; the activators cooperate."""
    g = gen(1)
    bg = task.dna(1, generator=g, rate=0.0, length=60)
    base = task.occupancy(bg)[0]
    exact = 1 / (1 + math.exp(-3 * task.BETA))
    for k, motif in enumerate(task.MOTIFS):
        x = bg.clone()
        x[0, 20:20 + len(motif)] = encode(motif)
        o = task.occupancy(x)[0]
        assert o[k] - base[k] == pytest.approx(exact, abs=0.02)
    both = bg.clone()
    both[0, 5:13], both[0, 30:40] = encode(task.MOTIFS[0]), encode(task.MOTIFS[1])
    o = task.occupancy(both)[0]
    w = torch.tensor(task.WEIGHTS, dtype=torch.float64)
    expected = float(o @ w + task.COOPERATIVITY * math.tanh(o[0]) * math.tanh(o[1]))
    assert float(task.activity(both)[0]) == pytest.approx(expected, abs=1e-12)
    assert float(task.activity(both)[0]) > 2.0  # two activators, cooperating
    # natural sequences hold motifs at the planted rate: more than the background does
    nat, bg = task.dna(2000, generator=g), task.dna(2000, generator=g, rate=0.0)
    assert (task.motif_counts(nat) > 0).double().mean() > 5 * (task.motif_counts(bg) > 0).double().mean()


def test_activity_of_soft_one_hots_is_exact_and_differentiable():
    x = task.dna(16, generator=gen(2))
    hard = F.one_hot(x, 4).double()
    assert torch.allclose(task.activity(hard), task.activity(x), atol=1e-12)
    with_mask = torch.cat([hard, torch.zeros(16, 100, 1, dtype=torch.float64)], -1)
    assert torch.allclose(task.activity(with_mask), task.activity(x), atol=1e-12)
    soft = torch.softmax(torch.randn(2, 20, 4, dtype=torch.float64, generator=gen(3)), -1).requires_grad_()
    assert torch.autograd.gradcheck(task.activity, (soft,))


def test_dna_errors_and_registry():
    with pytest.raises(ConfigError, match="length"):
        task.dna(3, length=5)
    with pytest.raises(ConfigError, match="rate"):
        task.dna(3, rate=-1.0)
    with pytest.raises(DataError, match="MASK"):
        task.activity(torch.full((1, 20), 4))
    with pytest.raises(ShapeError):
        task.activity(torch.zeros(2, 20, 3))
    with pytest.raises(ConfigError, match="split"):
        task.labelled(10, "test")
    x = load_dataset("dna", 8, generator=gen())
    assert x.shape == (8, task.LENGTH) and x.dtype == torch.long
    assert set(sequence_statistics("dna", x)) == {"activity_mean"} | {f"motif_{m}" for m in task.MOTIFS}


def test_labelled_splits_are_disjoint_and_cover_high_activity():
    xa, ya = task.labelled(2000, "finetune")
    xb, _ = task.labelled(2000, "eval")
    assert not (set(map(tuple, xa.tolist())) & set(map(tuple, xb.tolist())))
    xa2, ya2 = task.labelled(2000, "finetune")
    assert torch.equal(xa, xa2) and torch.equal(ya, ya2)
    natural = task.activity(task.dna(2000, generator=gen(4)))
    assert ya.quantile(0.95) > natural.quantile(0.99)  # 5% of the labels lie beyond 99% of natural activity
    assert float((ya.double() - task.activity(xa)).std()) == pytest.approx(0.1, rel=0.1)


def test_oracle_learns_the_activity_and_takes_soft_inputs(tmp_path, monkeypatch):
    """A small oracle trained briefly on one split predicts the activity of the other split (r > 0.8); the cached
    copy is the same network; it takes ids, one-hots and one-hots with a MASK column alike, with gradients."""
    monkeypatch.setenv("GENKIT_CACHE", str(tmp_path))
    kwargs = {"n": 2000, "steps": 300, "length": 40, "channels": 32, "depth": 2}
    oracle = dna_oracle("finetune", **kwargs)
    assert list(tmp_path.rglob("*.safetensors"))
    again = dna_oracle("finetune", **kwargs)
    xe, ye = task.labelled(1000, "eval", length=40)
    pred = oracle(xe)
    assert torch.equal(pred, again(xe))
    r = float(torch.corrcoef(torch.stack([pred, ye]))[0, 1])
    assert r > 0.8, r
    hard = F.one_hot(xe[:8], 4).float()
    assert torch.allclose(oracle(hard), pred[:8], atol=1e-5)
    assert torch.allclose(oracle(torch.cat([hard, torch.zeros(8, 40, 1)], -1)), pred[:8], atol=1e-5)
    soft = hard.clone().requires_grad_()
    oracle(soft).sum().backward()
    assert soft.grad is not None and soft.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in oracle.parameters())
    with pytest.raises(DataError, match="MASK"):
        oracle(torch.full((2, 40), 4))
    with pytest.raises(ShapeError):
        oracle(torch.zeros(2, 40, 3))
    with pytest.raises(ShapeError):
        train_oracle(xe.float(), ye)


def test_get_reward_resolves_names_modules_and_files(tmp_path):
    assert set(REWARDS.names()) >= {"dna_oracle", "dna_eval_oracle", "dna_activity"}
    r = get_reward("dna_activity")
    assert r.differentiable and torch.allclose(r(task.dna(4, generator=gen())),
                                               task.activity(task.dna(4, generator=gen())).float())
    f = tmp_path / "my_reward.py"
    f.write_text("import torch\n"
                 "def gc(x):\n    return ((x == 1) | (x == 2)).float().mean(-1)\n"
                 "def soft(x):\n    return x[..., 1:3].sum((-1, -2))\nsoft.differentiable = True\n")
    gc = get_reward(f"{f}:gc")
    assert not gc.differentiable and gc.name == "gc"
    assert torch.equal(gc(torch.tensor([[1, 2, 0, 3]])), torch.tensor([0.5]))
    assert get_reward(f"{f}:soft").differentiable
    assert get_reward("genkit.data.dna_task:activity").name == "activity"
    given = Reward(lambda x: x.sum(-1).float())
    assert get_reward(given) is given
    with pytest.raises(ConfigError, match="unknown reward"):
        get_reward("no_such_reward")
    with pytest.raises(ConfigError, match="no attribute"):
        get_reward(f"{f}:missing")
    with pytest.raises(ConfigError, match="does not exist"):
        get_reward(str(tmp_path / "nope.py") + ":f")
    with pytest.raises(ConfigError, match="cannot import"):
        get_reward("no_such_module_xyz:f")


def test_kmer_frequencies_and_correlation():
    x = torch.tensor([[0, 1, 2, 3, 0, 1]])
    f = kmer_frequencies(x, 2, 4)
    expected = torch.zeros(16, dtype=torch.float64)
    for a, b in zip(x[0, :-1].tolist(), x[0, 1:].tolist(), strict=True):
        expected[4 * a + b] += 0.2
    assert torch.allclose(f, expected)
    data = task.dna(3000, generator=gen(5))
    assert kmer_correlation(task.dna(3000, generator=gen(6)), data) > 0.98
    uniform = torch.randint(0, 4, (3000, 100), generator=gen(7))
    assert kmer_correlation(uniform, data) < 0.5
    assert kmer_correlation(data, data) == pytest.approx(1.0)
    with pytest.raises(DataError, match="outside the vocabulary"):
        kmer_frequencies(torch.tensor([[0, 4]]), 1, 4)
    with pytest.raises(ConfigError):
        kmer_frequencies(x, 7, 4)


def test_sequence_diversity_is_the_mean_pairwise_hamming_distance():
    x = torch.randint(0, 3, (7, 5), generator=gen(8))
    brute = sum(float((a != b).double().mean()) for a, b in itertools.permutations(x, 2)) / (7 * 6)
    assert sequence_diversity(x) == pytest.approx(brute, abs=1e-12)
    assert sequence_diversity(torch.zeros(4, 6, dtype=torch.long)) == 0.0
    assert unique_fraction(torch.tensor([[0, 1], [0, 1], [1, 1], [0, 0]])) == 0.75
    with pytest.raises(DataError):
        sequence_diversity(torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(ShapeError):
        sequence_diversity(torch.zeros(3, 3))


def test_sequence_report():
    from genkit.models import MaskedDiffusion

    data = task.dna(400, generator=gen(9), length=12)
    samples = task.dna(200, generator=gen(10), length=12)
    model, _ = MaskedDiffusion.example()  # length 3: a wrong-length model is refused
    rep = sequence_report(samples, data, rewards={"activity": get_reward("dna_activity")}, task="dna")
    assert rep["activity_mean"] == pytest.approx(float(task.activity(samples).mean()), abs=1e-6)
    assert rep["activity_median"] == pytest.approx(float(task.activity(samples).float().median()), abs=1e-6)
    assert rep["diversity"] == pytest.approx(sequence_diversity(samples))
    assert "log_likelihood" not in rep and rep["kmer3_corr"] > 0.5
    with pytest.raises(ShapeError):
        sequence_report(samples, data[:, :5])
    with pytest.raises(Exception, match="length"):
        sequence_report(samples, data, pretrained=model)


def test_sequence_report_log_likelihood_is_minus_the_nll_bound():
    from genkit.models import MaskedDiffusion

    model, x = MaskedDiffusion.example()
    samples = model.sample(64, generator=gen(11))
    rep = sequence_report(samples, x, pretrained=model, n_mc=8, generator=gen(12))
    bound = model.nll_bound(samples, n_mc=8, generator=gen(12))
    assert rep["log_likelihood"] == pytest.approx(-float(bound.detach().double().mean()), rel=1e-6)
