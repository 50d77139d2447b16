"""Tabular data (genkit.data.tabular): shipped scikit-learn sets, splits, standardisation, dequantisation, and the
user's own CSV / .npy tables."""

import numpy as np
import pytest
import torch

from genkit.data import (
    DATASETS,
    TABULAR,
    digits,
    held_out,
    load_dataset,
    load_labelled,
    load_table,
    load_tabular,
    tabular_stats,
)
from genkit.data.tabular import split_index
from genkit.errors import ConfigError, DataError, ShapeError

SHAPES = {"digits64": (1797, 64), "wine": (178, 13), "breast_cancer": (569, 30)}


@pytest.mark.parametrize("name", TABULAR)
def test_shapes_registration_and_standardisation(name):
    n, d = SHAPES[name]
    assert name in DATASETS
    sizes = {s: load_dataset(name, split=s, generator=torch.Generator().manual_seed(0)).shape
             for s in ("train", "validation", "test", "all")}
    assert all(shape[1] == d for shape in sizes.values())
    assert sizes["all"][0] == n == sizes["train"][0] + sizes["validation"][0] + sizes["test"][0]
    assert sizes["test"][0] == round(0.2 * n) and sizes["validation"][0] == round(0.1 * n)
    x = load_dataset(name, split="train", generator=torch.Generator().manual_seed(1)).double()
    assert x.dtype == torch.float64 and bool(torch.isfinite(x).all())
    if name == "digits64":
        # statistics are the dequantised data's exact expectations; one draw's deviation is ~ 1/sqrt(N) per column
        tol = 5 / x.shape[0] ** 0.5
        assert float(x.mean(0).abs().max()) < tol
        assert float((x.std(0, unbiased=False) - 1).abs().max()) < 2 * tol
    else:
        torch.testing.assert_close(x.mean(0), torch.zeros(d, dtype=torch.float64), rtol=0, atol=1e-5)
        torch.testing.assert_close(x.std(0, unbiased=False), torch.ones(d, dtype=torch.float64), rtol=0, atol=1e-5)
    # the other splits use the train statistics: undoing them gives the raw values
    mean, std = tabular_stats(name)
    raw = load_tabular(name, split="test", standardize=False, generator=torch.Generator().manual_seed(2))
    std_x = load_tabular(name, split="test", generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(std_x * std + mean, raw, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("n", [10, 178, 1797])
def test_splits_disjoint_covering_deterministic(n):
    parts = [split_index(n, s) for s in ("train", "validation", "test")]
    joined = torch.cat(parts)
    assert sorted(joined.tolist()) == list(range(n))
    for s, p in zip(("train", "validation", "test"), parts):
        assert torch.equal(split_index(n, s), p)
    assert not torch.equal(split_index(n, "train", seed=1), parts[0])


def test_same_rows_for_every_generator_and_digits_test_rows_match_the_image_set():
    a = load_tabular("wine", split="validation", generator=torch.Generator().manual_seed(0))
    b = load_tabular("wine", split="validation", generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)  # no dequantisation: the split alone fixes the rows
    raw = load_tabular("digits64", split="test", standardize=False, generator=torch.Generator().manual_seed(0))
    pixels = (digits("test").reshape(-1, 64) + 1) * 8  # the image set's [-1, 1] back to counts 0..16
    torch.testing.assert_close(raw.floor(), pixels.round(), rtol=0, atol=0)
    ref, floor = held_out("breast_cancer", 64)
    assert ref.shape == (114, 30) and floor.shape == (64, 30)


def test_dequantised_digits_not_integer_and_in_their_cell():
    g = torch.Generator().manual_seed(0)
    x = load_tabular("digits64", split="all", standardize=False, generator=g)
    from sklearn.datasets import load_digits

    k = torch.as_tensor(load_digits().data, dtype=torch.float32)
    assert bool((x >= k).all()) and bool((x < k + 1).all())
    assert float((x == x.round()).float().mean()) < 1e-3
    # the noise is uniform on [0, 1): mean 1/2, variance 1/12
    u = (x - k).double()
    assert abs(float(u.mean()) - 0.5) < 0.01 and abs(float(u.var()) - 1 / 12) < 0.005
    # seeded: the same generator seed gives the same draw, another seed another
    again = load_tabular("digits64", split="all", standardize=False, generator=torch.Generator().manual_seed(0))
    other = load_tabular("digits64", split="all", standardize=False, generator=torch.Generator().manual_seed(1))
    assert torch.equal(x, again) and not torch.equal(x, other)
    sub = load_dataset("digits64", n=100, generator=torch.Generator().manual_seed(0))
    assert sub.shape == (100, 64)


def test_labelled_tabular_sets_pair_the_same_rows_with_their_classes():
    from sklearn.datasets import load_wine

    for name, k in (("wine", 3), ("breast_cancer", 2), ("digits64", 10)):
        data = load_labelled(name, n=15, split="validation", generator=torch.Generator().manual_seed(3))
        x = load_dataset(name, n=15, split="validation", generator=torch.Generator().manual_seed(3))
        assert torch.equal(data.data, x) and data.num_classes == k and len(data.labels) == 15
    wine = load_labelled("wine", split="all", standardize=False)
    assert wine.labels.tolist() == load_wine().target.tolist() and wine.class_names == ["class_0", "class_1",
                                                                                          "class_2"]


def test_cell_cap_keeps_the_top_of_a_cell_below_the_next_integer():
    k = torch.tensor([16.0, 0.0, 3.0])
    top = torch.minimum(k + torch.tensor([1 - 2**-24] * 3), torch.nextafter(k + 1, k))
    assert bool((top < k + 1).all()) and bool((top.floor() == k).all())


def test_tabular_errors():
    with pytest.raises(ConfigError, match="split must be one of"):
        load_dataset("wine", split="val")
    with pytest.raises(ConfigError, match="n must be an int"):
        load_dataset("wine", n=10_000)
    with pytest.raises(ConfigError, match="takes no option"):
        load_dataset("wine", dim=3)


def _table(seed=0, rows=50, cols=4):
    g = np.random.default_rng(seed)
    return g.normal(3.0, 2.0, size=(rows, cols))


def test_csv_and_npy_round_trip(tmp_path):
    values = _table()
    np.save(tmp_path / "t.npy", values)
    with open(tmp_path / "t.csv", "w") as fh:
        fh.write("a,b,c,d\n" + "\n".join(",".join(repr(float(v)) for v in row) for row in values) + "\n")
    np.savetxt(tmp_path / "nohead.csv", values, delimiter=",", fmt="%.17g")
    raw = torch.as_tensor(values, dtype=torch.float32)
    for name in ("t.npy", "t.csv", "nohead.csv"):
        x = load_table(tmp_path / name, standardize=False)
        torch.testing.assert_close(x, raw, rtol=0, atol=0)
        xs, mean, std = load_table(tmp_path / name, split="all", return_stats=True, dim=4)
        torch.testing.assert_close(xs * std + mean, raw, rtol=1e-5, atol=1e-5)
        train = load_table(tmp_path / name, split="train").double()
        torch.testing.assert_close(train.mean(0), torch.zeros(4, dtype=torch.float64), rtol=0, atol=1e-5)
        torch.testing.assert_close(train.std(0, unbiased=False), torch.ones(4, dtype=torch.float64),
                                   rtol=0, atol=1e-5)
        parts = [load_table(tmp_path / name, split=s) for s in ("train", "validation", "test")]
        assert sum(len(p) for p in parts) == 50
        torch.testing.assert_close(torch.cat(parts)[torch.argsort(torch.cat(
            [split_index(50, s) for s in ("train", "validation", "test")]))], xs, rtol=0, atol=0)


def test_table_errors(tmp_path):
    (tmp_path / "word.csv").write_text("a,b\n1,2\n3,x\n")
    with pytest.raises(DataError, match=r"line 3, column 1 \('b'\) holds 'x', not a number"):
        load_table(tmp_path / "word.csv")
    (tmp_path / "ragged.csv").write_text("1,2\n3\n")
    with pytest.raises(DataError, match="line 2 has 1 columns"):
        load_table(tmp_path / "ragged.csv")
    values = _table()
    values[7, 2] = np.nan
    np.save(tmp_path / "nan.npy", values)
    with pytest.raises(DataError, match="NaN / inf values.*row 7, column 2"):
        load_table(tmp_path / "nan.npy")
    np.save(tmp_path / "flat.npy", np.arange(20.0))
    with pytest.raises(ShapeError, match=r"shape \[20\].*reshape\(-1, 1\)"):
        load_table(tmp_path / "flat.npy")
    np.save(tmp_path / "ok.npy", _table())
    with pytest.raises(ShapeError, match="4 columns, expected dim=3"):
        load_table(tmp_path / "ok.npy", dim=3)
    np.save(tmp_path / "str.npy", np.array([["a", "b"]] * 20))
    with pytest.raises(DataError, match="not numbers"):
        load_table(tmp_path / "str.npy")
    with pytest.raises(DataError, match="does not exist"):
        load_table(tmp_path / "missing.csv")
    (tmp_path / "t.txt").write_text("1,2\n")
    with pytest.raises(DataError, match=r"\.csv or \.npy"):
        load_table(tmp_path / "t.txt")
