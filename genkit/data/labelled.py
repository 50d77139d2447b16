"""Labelled training data: samples with one class id each, for class-conditional models.

:class:`LabelledData` pairs a tensor ``[N, ...]`` (or a map-style Dataset of ``N`` samples) with integer labels
``[N]`` in ``0..K-1`` and, optionally, the ``K`` class names. Item ``i`` is ``(x_i, label_i)``; the trainer
batches it as ``(x [B, ...], labels [B])`` (a tensor is indexed in place, a Dataset through a DataLoader), which
is what a class-conditional family's ``loss`` takes.

>>> import torch
>>> data = LabelledData(torch.randn(6, 2), torch.tensor([0, 1, 2, 0, 1, 2]), class_names=["a", "b", "c"])
>>> len(data), data.num_classes, data.take(torch.tensor([1, 2]))[1].tolist()
(6, 3, [1, 2])
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset, IterableDataset

from ..errors import ConfigError, DataError, ShapeError

__all__ = ["LabelledData"]


class LabelledData(Dataset):
    """``LabelledData(data, labels, class_names=None, num_classes=None)``: samples with class ids.

    Args:
        data: a tensor ``[N, ...]`` or a map-style Dataset of ``N`` samples (an :class:`ImageFolder`, say).
        labels: ``N`` integer class ids (a 1-D integer tensor or a sequence of ints) in ``0..K-1``.
        class_names: the ``K`` class names (strings), or None.
        num_classes: ``K``; default ``len(class_names)``, else ``max(labels) + 1``. Every label must be below it.

    ``labels`` is kept as an int64 tensor; ``class_names`` as a list of strings (or None).
    """

    def __init__(self, data: Tensor | Dataset, labels: Tensor | Sequence[int], class_names: Sequence[str] | None = None,
                 num_classes: int | None = None):
        if isinstance(data, LabelledData):
            raise DataError("data is already a LabelledData; pass its .data (or use it as it is)")
        if isinstance(data, Tensor):
            if data.dim() == 0:
                raise ShapeError("data is a 0-d tensor; pass samples [N, ...]")
        elif isinstance(data, IterableDataset) or not (hasattr(data, "__len__") and hasattr(data, "__getitem__")):
            raise DataError(f"data must be a tensor [N, ...] or a map-style Dataset with __len__ and __getitem__; got "
                            f"{type(data).__name__}")
        if not torch.is_tensor(labels):
            try:
                labels = torch.as_tensor(list(labels), dtype=torch.long)
            except (TypeError, ValueError, RuntimeError) as e:
                raise ShapeError(f"labels must be a 1-D integer tensor or a sequence of ints; got "
                                 f"{type(labels).__name__} ({e})") from None
        if labels.is_floating_point() or labels.is_complex() or labels.dtype is torch.bool:
            raise ShapeError(f"labels must hold integer class ids; got {labels.dtype} (convert with labels.long() if "
                             "they are whole numbers)")
        if labels.dim() != 1 or labels.shape[0] != len(data):
            raise ShapeError(f"labels must hold one class id per sample, shape [{len(data)}]; got "
                             f"{tuple(labels.shape)}")
        if len(data) == 0:
            raise DataError("the data set is empty; pass at least one sample")
        labels = labels.to(torch.long)
        if class_names is not None:
            if isinstance(class_names, str) or not all(isinstance(c, str) for c in class_names):
                raise ConfigError(f"class_names must be a list of strings; got {class_names!r}")
            class_names = list(class_names)
        if num_classes is None:
            num_classes = len(class_names) if class_names is not None else int(labels.max()) + 1
        if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) or num_classes < 1:
            raise ConfigError(f"num_classes must be a positive int; got {num_classes!r}")
        if class_names is not None and len(class_names) != num_classes:
            raise ConfigError(f"class_names has {len(class_names)} names for num_classes={num_classes}")
        bad = (labels < 0) | (labels >= num_classes)
        if bool(bad.any()):
            first = int(bad.nonzero()[0])
            raise DataError(f"labels {labels[bad][:5].tolist()} (first at sample {first}) are outside "
                            f"0..{num_classes - 1} (num_classes={num_classes}); relabel them or raise num_classes")
        self.data, self.labels = data, labels
        self.class_names: list[str] | None = class_names
        self.num_classes = int(num_classes)

    def __len__(self) -> int:
        return self.labels.shape[0]

    def __getitem__(self, index: int) -> tuple[Any, Tensor]:
        """``(sample, label)`` of item ``index`` (a DataLoader collates them into ``[x, labels]``)."""
        return self.data[index], self.labels[index]

    def take(self, indices: Tensor) -> tuple[Tensor, Tensor]:
        """``(data[indices], labels[indices])`` of tensor data, indexed in place (what the trainer batches)."""
        if not isinstance(self.data, Tensor):
            raise DataError("take() indexes tensor data in place; this LabelledData holds a Dataset (iterate it or "
                            "use a DataLoader)")
        return self.data[indices.to(self.data.device)], self.labels[indices.to(self.labels.device)]

    def verify(self) -> None:
        """Open every file of the wrapped dataset now (:meth:`ImageFolder.verify`: a DataError lists the unreadable
        ones); tensor data has no files to open."""
        check = getattr(self.data, "verify", None)
        if callable(check):
            check()

    def counts(self) -> Tensor:
        """Samples per class ``[K]`` (int64)."""
        return torch.bincount(self.labels, minlength=self.num_classes)

    def __repr__(self) -> str:
        what = f"tensor {tuple(self.data.shape)}" if isinstance(self.data, Tensor) else type(self.data).__name__
        names = f", classes {self.class_names}" if self.class_names is not None else ""
        return f"LabelledData({what}, {len(self)} labels, num_classes={self.num_classes}{names})"
