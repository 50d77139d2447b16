"""Data: toy 2D / nD sets, shipped 8x8 digits, tabular sets (digits64, wine, breast_cancer; the user's CSV /
``.npy`` through :func:`load_table`), the user's image folders, token sequences (the synthetic ``motifs`` set and
the DNA-like task ``dna`` with a known activity, :mod:`genkit.data.dna_task`; long tensors ``[N, L]``; the
user's own through :func:`load_tokens`, :mod:`genkit.data.sequences`), and data checks.

Scripts name a training set by string through :data:`DATASETS`:

>>> x = load_dataset("8gaussians", n=256, generator=torch.Generator().manual_seed(0))
>>> x.shape
torch.Size([256, 2])

Class-conditional models train on :class:`LabelledData` (samples and class ids): :func:`load_labelled` gives a
named set with its labels (digits' classes, toy sets' components), ``ImageFolder.labelled()`` an image folder's
class subfolders, and ``LabelledData(x, labels, class_names)`` the user's own.

>>> data = load_labelled("8gaussians", n=256, generator=torch.Generator().manual_seed(0))
>>> bool((data.data == x).all()), data.num_classes
(True, 8)
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ..errors import ConfigError, DataError
from ..registry import Registry
from .dna_task import dna
from .images import IMAGE_EXTENSIONS, ImageFolder, digits, digits_labels, image_folder
from .labelled import LabelledData
from .sequences import TOKEN_SETS, load_tokens, motifs, sequence_statistics, token_file_format
from .tabular import TABULAR, load_table, load_tabular, load_tabular_labelled, tabular_stats
from .toy import COMPONENTS, TOY, gmm_params, toy, toy_components

__all__ = [
    "TOY", "toy", "toy_components", "COMPONENTS", "gmm_params",
    "digits", "digits_labels", "image_folder", "ImageFolder", "IMAGE_EXTENSIONS",
    "LabelledData", "TABULAR", "load_tabular", "tabular_stats", "load_table",
    "TOKEN_SETS", "motifs", "dna", "load_tokens", "token_file_format", "sequence_statistics",
    "check_finite", "DATASETS", "load_dataset", "load_labelled", "held_out",
]  # fmt: skip

DEFAULT_TOY_SIZE = 10_000

DatasetLoader = Callable[..., Tensor]
DATASETS: Registry[DatasetLoader] = Registry("data set")


def check_finite(x: Tensor, what: str = "data") -> Tensor:
    """Return ``x`` unchanged if every entry is finite, else raise :class:`DataError` with counts.

    >>> check_finite(torch.ones(2, 3)).shape
    torch.Size([2, 3])
    """
    if not torch.is_floating_point(x) and not torch.is_complex(x):
        return x
    bad = ~torch.isfinite(x)
    n_bad = int(bad.sum())
    if n_bad:
        n_nan = int(torch.isnan(x).sum())
        raise DataError(
            f"{what} has {n_bad} non-finite entries ({n_nan} NaN, {n_bad - n_nan} inf) out of {x.numel()}; "
            "clean the source, or drop bad rows with x[torch.isfinite(x).flatten(1).all(1)]"
        )
    return x


def _register_toy(name: str) -> None:
    def load(n: int | None = None, *, generator: torch.Generator | None = None, dim: int = 2) -> Tensor:
        return toy(name, DEFAULT_TOY_SIZE if n is None else n, generator=generator, dim=dim)

    load.__doc__ = f"``n`` (default {DEFAULT_TOY_SIZE}) samples ``[n, dim]`` of the toy set {name!r}."
    DATASETS.register(name)(load)


for _name in TOY.names():
    _register_toy(_name)


@DATASETS.register("digits")
def _load_digits(n: int | None = None, *, generator: torch.Generator | None = None, split: str = "train") -> Tensor:
    """The digits ``split`` ``[N, 1, 8, 8]``, or ``n`` of them drawn without replacement."""
    x = digits(split)
    if n is None:
        return x
    if not isinstance(n, int) or not 1 <= n <= x.shape[0]:
        raise ConfigError(f"n must be an int in [1, {x.shape[0]}] for digits split {split!r}, got {n!r}")
    return x[torch.randperm(x.shape[0], generator=generator)[:n]]


@DATASETS.register("dna")
def _load_dna(n: int | None = None, *, generator: torch.Generator | None = None, length: int = 100) -> Tensor:
    """``n`` (default 10 000) sequences ``[n, length]`` of the DNA-like task (long, A C G T as 0..3): a Markov
    background with planted motifs whose activity is known (:mod:`genkit.data.dna_task`)."""
    return dna(DEFAULT_TOY_SIZE if n is None else n, generator=generator, length=length)


@DATASETS.register("motifs")
def _load_motifs(n: int | None = None, *, generator: torch.Generator | None = None, length: int = 32) -> Tensor:
    """``n`` (default 10 000) token sequences ``[n, length]`` (long, A C G T as 0..3) with a planted motif each
    (:mod:`genkit.data.sequences`)."""
    return motifs(DEFAULT_TOY_SIZE if n is None else n, generator=generator, length=length)


def _register_tabular(name: str) -> None:
    def load(n: int | None = None, *, generator: torch.Generator | None = None, split: str = "train",
             standardize: bool = True) -> Tensor:
        return load_tabular(name, n, generator=generator, split=split, standardize=standardize)

    load.__doc__ = (f"The tabular set {name!r}'s ``split`` (train / validation / test / all) ``[N, D]``, "
                    "standardised with the train split's statistics; ``n`` rows drawn without replacement.")
    DATASETS.register(name)(load)


for _name in TABULAR:
    _register_tabular(_name)


def load_dataset(
    name: str, n: int | None = None, *, generator: torch.Generator | None = None, **options: Any
) -> Tensor:
    """A training tensor ``[N, ...]`` for the data set ``name`` (see ``DATASETS.names()``).

    ``n=None`` means the set's natural size (10 000 samples for toy sets, the
    whole split for digits and tabular sets). ``options`` are set-specific (``dim`` for toy sets,
    ``split`` for digits, ``split`` and ``standardize`` for tabular sets); an option the set does not take
    raises ConfigError.
    """
    loader = DATASETS.get(name)
    accepted = {k for k, p in inspect.signature(loader).parameters.items() if p.kind is p.KEYWORD_ONLY} - {"generator"}
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise ConfigError(f"data set {name!r} takes no option(s) {unknown}; it accepts {sorted(accepted) or 'none'}")
    return loader(n, generator=generator, **options)


def load_labelled(
    name: str, n: int | None = None, *, generator: torch.Generator | None = None, **options: Any
) -> LabelledData:
    """:func:`load_dataset` with each sample's class: the same samples for the same arguments, paired with
    digits' digit classes or a toy set's mixture components (:data:`COMPONENTS`), as :class:`LabelledData` with
    the class names. A set without classes is a ConfigError.
    """
    loader = DATASETS.get(name)
    labelled = _LABELLED.get(name)
    if labelled is None:
        raise ConfigError(f"data set {name!r} has no class labels; labelled sets: {', '.join(sorted(_LABELLED))} "
                          "(or pass your own: LabelledData(x, labels))")
    accepted = {k for k, p in inspect.signature(loader).parameters.items() if p.kind is p.KEYWORD_ONLY} - {"generator"}
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise ConfigError(f"data set {name!r} takes no option(s) {unknown}; it accepts {sorted(accepted) or 'none'}")
    return labelled(n, generator=generator, **options)


_LABELLED: dict[str, Callable[..., LabelledData]] = {}


def _register_toy_labelled(name: str) -> None:
    def load(n: int | None = None, *, generator: torch.Generator | None = None, dim: int = 2) -> LabelledData:
        x, k = toy_components(name, DEFAULT_TOY_SIZE if n is None else n, generator=generator, dim=dim)
        return LabelledData(x, k, class_names=COMPONENTS[name])

    _LABELLED[name] = load


for _name in COMPONENTS:
    _register_toy_labelled(_name)


def _load_digits_labelled(n: int | None = None, *, generator: torch.Generator | None = None,
                          split: str = "train") -> LabelledData:
    x, y = digits(split), digits_labels(split)
    if n is not None:
        if not isinstance(n, int) or not 1 <= n <= x.shape[0]:
            raise ConfigError(f"n must be an int in [1, {x.shape[0]}] for digits split {split!r}, got {n!r}")
        idx = torch.randperm(x.shape[0], generator=generator)[:n]  # the draw of the unlabelled loader
        x, y = x[idx], y[idx]
    return LabelledData(x, y, class_names=[str(d) for d in range(10)])


_LABELLED["digits"] = _load_digits_labelled


def _register_tabular_labelled(name: str) -> None:
    def load(n: int | None = None, *, generator: torch.Generator | None = None, split: str = "train",
             standardize: bool = True) -> LabelledData:
        x, y, names = load_tabular_labelled(name, n, generator=generator, split=split, standardize=standardize)
        return LabelledData(x, y, class_names=names)

    _LABELLED[name] = load


for _name in TABULAR:
    _register_tabular_labelled(_name)



def held_out(name: str, n: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Two reference sets of ``name`` that training never sees: ``(reference, floor)``. A model's distance to
    ``reference`` is judged against ``floor``'s, what a perfect model would score. Sets with a test split use it
    (the floor is a train subset of ``min(len(reference), n)``); unlimited toy sets get two fresh draws of ``n``
    with seeds ``seed + 1000`` and ``seed + 1001``, which the training draw (``seed``) does not use.

    >>> ref, floor = held_out("moons", 100)
    >>> ref.shape, floor.shape, bool((ref != floor).any())
    (torch.Size([100, 2]), torch.Size([100, 2]), True)
    """
    try:
        ref = load_dataset(name, split="test")
    except ConfigError:  # no test split: an unlimited toy set
        def draw(k: int) -> Tensor:
            return load_dataset(name, n=n, generator=torch.Generator().manual_seed(seed + 1000 + k))
        return draw(0), draw(1)
    return ref, load_dataset(name, n=min(len(ref), n), generator=torch.Generator().manual_seed(seed + 1))
