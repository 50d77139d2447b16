"""Tabular data for density estimation: scikit-learn's shipped sets (no download) and the user's CSV / ``.npy``.

Every table is ``[N, D]`` float32, split by a fixed permutation (seed 0) into train / validation / test
(70 / 10 / 20 %; the test rows of ``digits64`` are those of the ``digits`` image set) and standardised with the
TRAIN split's per-column mean and standard deviation (a constant column keeps std 1), so a model sees the same
scale on every split. :func:`tabular_stats` / ``load_table(..., return_stats=True)`` give the statistics to undo it.

- ``digits64``: the 8x8 digits as 64-D vectors of pixel counts 0..16, dequantised ``x + u``, ``u ~ U[0, 1)`` drawn
  from the ``generator`` (so each value lies in its integer's cell ``[k, k + 1)`` before standardising); its
  statistics are the dequantised data's exact expectations (integer mean + 1/2, variance + 1/12), the same for
  every draw;
- ``wine`` (178 x 13) and ``breast_cancer`` (569 x 30).

>>> x = load_tabular("wine", split="train")
>>> x.shape, bool(x.mean(0).abs().max() < 1e-5)
(torch.Size([124, 13]), True)
"""

from __future__ import annotations

import csv
import functools
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from ..errors import ConfigError, DataError, ShapeError

__all__ = ["TABULAR", "load_tabular", "load_tabular_labelled", "tabular_stats", "split_index", "load_table", "SPLITS"]

Split = Literal["all", "train", "validation", "test"]
SPLITS = ("all", "train", "validation", "test")
TABULAR = ("digits64", "wine", "breast_cancer")
_TEST_FRACTION, _VAL_FRACTION = 0.2, 0.1


def split_index(n: int, split: Split, seed: int = 0) -> Tensor:
    """Row indices of ``split`` among ``n`` rows: a fixed permutation (``seed``) cut into test (first 20 %),
    validation (next 10 %) and train (the rest); ``"all"`` is every row in order. Disjoint and covering."""
    if split == "all":
        return torch.arange(n)
    if split not in SPLITS:
        raise ConfigError(f"split must be one of {SPLITS}, got {split!r}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_test, n_val = round(_TEST_FRACTION * n), round(_VAL_FRACTION * n)
    if split == "test":
        return order[:n_test]
    return order[n_test:n_test + n_val] if split == "validation" else order[n_test + n_val:]


@functools.cache
def _bunch(name: str) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    from sklearn import datasets  # shipped with scikit-learn: no download

    loaders = {"digits64": datasets.load_digits, "wine": datasets.load_wine,
               "breast_cancer": datasets.load_breast_cancer}
    if name not in loaders:
        raise ConfigError(f"unknown tabular set {name!r}; choose one of: {', '.join(TABULAR)}")
    bunch = loaders[name]()
    names = tuple(str(c) for c in bunch.target_names)
    return np.asarray(bunch.data, dtype=np.float64), np.asarray(bunch.target, dtype=np.int64), names


def _raw(name: str) -> np.ndarray:
    return _bunch(name)[0]


def _stats(x: np.ndarray, dequantized: bool = False) -> tuple[Tensor, Tensor]:
    mean, var = x.mean(0), x.var(0)
    if dequantized:  # E[x + u] and Var[x + u] for u ~ U[0, 1) independent of x
        mean, var = mean + 0.5, var + 1.0 / 12.0
    std = np.sqrt(var)
    std[std == 0] = 1.0
    return torch.as_tensor(mean, dtype=torch.float32), torch.as_tensor(std, dtype=torch.float32)


def tabular_stats(name: str) -> tuple[Tensor, Tensor]:
    """``(mean [D], std [D])`` of ``name``'s train split, what :func:`load_tabular` standardises with:
    ``raw = x * std + mean``."""
    raw = _raw(name)
    return _stats(raw[split_index(len(raw), "train").numpy()], dequantized=name == "digits64")


def load_tabular(name: str, n: int | None = None, *, generator: torch.Generator | None = None,
                 split: Split = "train", standardize: bool = True) -> Tensor:
    """``split`` of the tabular set ``name`` as ``[N, D]`` float32, standardised with the train split's statistics
    (``standardize=False``: raw values, digits64 still dequantised); ``n`` rows drawn without replacement."""
    return _load(name, n, generator, split, standardize)[0]


def load_tabular_labelled(name: str, n: int | None = None, *, generator: torch.Generator | None = None,
                          split: Split = "train", standardize: bool = True) -> tuple[Tensor, Tensor, list[str]]:
    """``(x, labels [N], class_names)``: :func:`load_tabular`'s rows for the same arguments (the same draw)
    with each row's class (digit, wine cultivar, malignant / benign)."""
    x, rows = _load(name, n, generator, split, standardize)
    _, target, names = _bunch(name)
    return x, torch.as_tensor(target)[rows], list(names)


def _load(name: str, n: int | None, generator: torch.Generator | None, split: Split,
          standardize: bool) -> tuple[Tensor, Tensor]:
    raw = _raw(name)
    rows = split_index(len(raw), split)
    if n is not None:
        if not isinstance(n, int) or not 1 <= n <= rows.shape[0]:
            raise ConfigError(f"n must be an int in [1, {rows.shape[0]}] for {name} split {split!r}, got {n!r}")
        rows = rows[torch.randperm(rows.shape[0], generator=generator)[:n]]
    x = torch.as_tensor(raw[rows.numpy()], dtype=torch.float32)
    if name == "digits64":
        # k + u can round up to k + 1 in float32 (u = 1 - 2^-24 at k = 16); cap at the float just below k + 1 so
        # every value stays in its cell [k, k + 1)
        x = torch.minimum(x + torch.rand(x.shape, generator=generator), torch.nextafter(x + 1, x))
    if standardize:
        mean, std = tabular_stats(name)
        x = (x - mean) / std
    return x, rows


def _read_csv(path: Path) -> tuple[np.ndarray, list[str] | None]:
    with open(path, newline="", encoding="utf-8") as fh:
        rows = [r for r in csv.reader(fh) if r and any(c.strip() for c in r)]
    if not rows:
        raise DataError(f"{path} holds no rows; a table needs one row per sample and one numeric column per feature")

    def numeric(cell: str) -> bool:
        try:
            float(cell)
        except ValueError:
            return False
        return True

    header = None if all(numeric(c) for c in rows[0]) else [c.strip() for c in rows[0]]
    body = rows[1:] if header is not None else rows
    if not body:
        raise DataError(f"{path} has a header but no data rows")
    width = len(body[0])
    values = np.empty((len(body), width), dtype=np.float64)
    first_line = 2 if header is not None else 1
    for i, row in enumerate(body):
        if len(row) != width:
            raise DataError(f"{path}: line {i + first_line} has {len(row)} columns, the first data line {width}; "
                            "every row needs the same number of values")
        for j, cell in enumerate(row):
            try:
                values[i, j] = float(cell)
            except ValueError:
                column = f"column {j}" + (f" ({header[j]!r})" if header is not None and j < len(header) else "")
                raise DataError(f"{path}: line {i + first_line}, {column} holds {cell!r}, not a number; genkit "
                                "tables are numeric: drop or encode (e.g. one-hot) non-numeric columns first") from None
    return values, header


def load_table(path: str | Path, split: Split = "all", *, dim: int | None = None, standardize: bool = True,
               seed: int = 0, return_stats: bool = False) -> Tensor | tuple[Tensor, Tensor, Tensor]:
    """The user's own table from a ``.csv`` (comma-separated numbers, an optional header line of column names)
    or ``.npy`` (a 2-D numeric array) as ``[N, D]`` float32, split like the shipped sets (the permutation seeded
    by ``seed``) and standardised with its train split's mean / std. ``dim`` checks the column count;
    ``return_stats=True`` returns ``(x, mean, std)``. NaN / inf values, non-numeric cells and ragged rows are
    DataErrors naming where; a table of the wrong dimension a ShapeError."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"table file {path} does not exist; pass the path of a .csv or .npy file")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        try:
            arr = np.load(path, allow_pickle=False)
        except (ValueError, OSError) as err:
            raise DataError(f"cannot read {path} as a numeric .npy array ({err}); save it with "
                            "np.save(path, array.astype(np.float64))") from err
        if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_):
            raise DataError(f"{path} holds dtype {arr.dtype}, not numbers; convert it to a float array first")
        values = arr.astype(np.float64)
    elif suffix == ".csv":
        values, _ = _read_csv(path)
    else:
        raise DataError(f"load_table reads .csv or .npy files, got {path.name!r}; convert it, e.g. np.save('x.npy', x)")
    if values.ndim != 2:
        raise ShapeError(f"{path} holds an array of shape {list(values.shape)}; a table is 2-D [rows, columns] "
                         "(a single feature: x.reshape(-1, 1); images: flatten them to x.reshape(len(x), -1))")
    if dim is not None and values.shape[1] != dim:
        raise ShapeError(f"{path} has {values.shape[1]} columns, expected dim={dim}; check the file or pass "
                         f"dim={values.shape[1]}")
    bad = ~np.isfinite(values)
    if bad.any():
        rows, cols = np.nonzero(bad)
        raise DataError(f"{path} has {int(bad.sum())} NaN / inf values (first at row {int(rows[0])}, column "
                        f"{int(cols[0])}); drop or impute those rows before training")
    if values.shape[0] < 10:
        raise DataError(f"{path} has {values.shape[0]} rows; a train / validation / test split needs at least 10")
    mean, std = _stats(values[split_index(len(values), "train", seed).numpy()])
    x = torch.as_tensor(values[split_index(len(values), split, seed).numpy()], dtype=torch.float32)
    if standardize:
        x = (x - mean) / std
    return (x, mean, std) if return_stats else x
