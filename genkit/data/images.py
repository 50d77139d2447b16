"""Image data: scikit-learn's shipped 8x8 digits, and folders of the user's own images.

Images are float tensors ``[C, H, W]`` scaled to ``[-1, 1]``.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor
from torch.utils.data import Dataset

from ..errors import ConfigError, DataError
from .labelled import LabelledData

__all__ = ["digits", "digits_labels", "image_folder", "ImageFolder", "IMAGE_EXTENSIONS"]

Split = Literal["all", "train", "test"]
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"})
_TEST_FRACTION = 0.2


@functools.lru_cache(maxsize=1)
def _digits_arrays() -> tuple[Tensor, Tensor]:
    from sklearn.datasets import load_digits  # shipped with scikit-learn: no download

    bunch = load_digits()
    images = torch.as_tensor(bunch.images, dtype=torch.float32)[:, None] / 8.0 - 1.0  # pixels 0..16
    return images, torch.as_tensor(bunch.target, dtype=torch.int64)


def _digits_index(split: Split) -> Tensor:
    n = _digits_arrays()[1].shape[0]
    if split == "all":
        return torch.arange(n)
    if split not in ("train", "test"):
        raise ConfigError(f"split must be 'all', 'train' or 'test', got {split!r}")
    # A fixed permutation: the same 80/20 split on every machine and torch version.
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    n_test = round(_TEST_FRACTION * n)
    return order[n_test:] if split == "train" else order[:n_test]


def digits(split: Split = "all") -> Tensor:
    """scikit-learn's handwritten digits as ``[N, 1, 8, 8]`` float32 in ``[-1, 1]``.

    1797 images; ``"train"`` / ``"test"`` is a fixed 80/20 split (1438 / 359).

    >>> digits("test").shape
    torch.Size([359, 1, 8, 8])
    """
    return _digits_arrays()[0][_digits_index(split)].clone()


def digits_labels(split: Split = "all") -> Tensor:
    """Class labels ``[N]`` (int64 in 0..9) aligned with :func:`digits` of the same split."""
    return _digits_arrays()[1][_digits_index(split)].clone()


_HIGH_BIT = {"I;16": 65535.0, "I;16B": 65535.0, "I;16L": 65535.0, "I;16N": 65535.0, "I": 65535.0, "F": 1.0}


def _load_image(path: Path, mode: str):
    """``path`` as a PIL image in ``mode`` ("L" or "RGB"), 8 bits a channel; or, for a 16-bit or float image,
    as a float ("F") image on the same 0..255 scale, so no precision is lost (Pillow's own ``convert`` would
    clip 16-bit values at 255 and round floats to 0 or 1). A float image must hold values in [0, 1]."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            if img.mode not in _HIGH_BIT:
                return img.convert(mode)
            import numpy as np

            full = _HIGH_BIT[img.mode]
            pixels = np.asarray(img, dtype=np.float64)
            low, high = (float(pixels.min()), float(pixels.max())) if pixels.size else (0.0, 0.0)
            if not (np.isfinite(low) and np.isfinite(high) and low >= 0 and high <= full):
                kind = "float" if img.mode == "F" else "integer"
                detail = (f"{kind} mode {img.mode!r} with values in [{low:g}, {high:g}], outside the [0, {full:g}] "
                          "that genkit reads as black..white; rescale it or save it as an 8- or 16-bit image")
                error = DataError(f"image {path}: {detail}")
                error.detail = detail
                raise error
            return Image.fromarray((pixels * (255.0 / full)).astype(np.float32), mode="F")
    except DataError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        detail = f"{type(err).__name__}: {err}"
        if isinstance(err, Image.DecompressionBombError):
            detail += "; downscale it, or raise PIL.Image.MAX_IMAGE_PIXELS if you trust the file"
        error = DataError(f"cannot read image {path} ({detail}); remove or replace this file "
                          "(image_folder(..., verify=True) lists every unreadable file at once)")
        error.detail = detail  # what verify() lists
        raise error from err


class ImageFolder(Dataset):
    """Images under ``root`` as ``[channels, size, size]`` tensors in ``[-1, 1]``.

    ``root`` holds either image files directly or one subfolder per class
    (``root/<class>/**/*.png``). Each image is resized (shorter side to
    ``size``, antialiased) and centre-cropped. ``classes`` lists the class
    folder names (empty for a flat folder) and ``labels`` ``[N]`` gives each
    item's class index (all 0 for a flat folder), in the order of torchvision's ``ImageFolder``
    (class folders sorted by name). :meth:`labelled` pairs the images with them for class-conditional training.
    """

    def __init__(self, root: str | Path, size: int, *, channels: int = 3, verify: bool = False):
        if channels not in (1, 3):
            raise ConfigError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels!r}")
        if not isinstance(size, int) or size < 1:
            raise ConfigError(f"size must be a positive int (output side in pixels), got {size!r}")
        self.root, self.size, self.channels = Path(root), size, channels
        if not self.root.is_dir():
            raise DataError(f"image folder {self.root} does not exist or is not a directory; check the path")
        self.files, labels, self.classes = self._scan()
        self.labels = torch.tensor(labels, dtype=torch.int64)
        if verify:
            self.verify()

    def _scan(self) -> tuple[list[Path], list[int], list[str]]:
        def images(paths) -> list[Path]:
            return sorted(p for p in paths if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                          and not p.name.startswith("."))  # fmt: skip

        flat = images(self.root.iterdir())
        folders = sorted(d for d in self.root.iterdir() if d.is_dir() and not d.name.startswith("."))
        per_class = {d.name: images(d.rglob("*")) for d in folders}
        per_class = {name: found for name, found in per_class.items() if found}
        if flat and per_class:
            raise DataError(
                f"{self.root} mixes {len(flat)} loose images with class folders {sorted(per_class)}; "
                "move the loose images into a class folder or the class images up into the root"
            )
        if not flat and not per_class:
            raise DataError(
                f"no images found in {self.root} (looked for {', '.join(sorted(IMAGE_EXTENSIONS))} files "
                "directly or in class subfolders); check the path"
            )
        if flat:
            return flat, [0] * len(flat), []
        classes = sorted(per_class)
        files = [f for name in classes for f in per_class[name]]
        labels = [i for i, name in enumerate(classes) for _ in per_class[name]]
        return files, labels, classes

    def labelled(self) -> LabelledData:
        """This dataset with its class labels: items ``(image, class index)``, ``class_names`` the folder names.
        A flat folder (no class subfolders) is a DataError."""
        if not self.classes:
            raise DataError(f"{self.root} holds its images directly, with no class subfolders, so they have no "
                            "labels; put each class's images in a subfolder of its own (root/<class>/...)")
        return LabelledData(self, self.labels, class_names=self.classes)

    def verify(self) -> None:
        """Open every file now; raise :class:`DataError` listing all unreadable ones."""
        bad = []
        for path in self.files:
            try:
                _load_image(path, "L")
            except DataError as err:
                bad.append(f"{path} ({getattr(err, 'detail', err)})")
        if bad:
            listing = "\n  ".join(bad[:20]) + (f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else "")
            raise DataError(f"{len(bad)} of {len(self.files)} images are unreadable; remove or replace:\n  {listing}")

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> Tensor:
        """Image ``index`` as ``[channels, size, size]`` float32 in ``[-1, 1]``."""
        import torchvision.transforms.functional as TF

        img = _load_image(self.files[index], "L" if self.channels == 1 else "RGB")
        img = TF.center_crop(TF.resize(img, self.size, antialias=True), [self.size, self.size])
        x = TF.pil_to_tensor(img).float() / 127.5 - 1.0
        if x.shape[0] != self.channels:  # a 16-bit or float image is one grey channel
            x = x.expand(self.channels, -1, -1).clone()
        return x.clamp(-1.0, 1.0)  # resampling a float image can overshoot a little


def image_folder(root: str | Path, size: int, *, channels: int = 3, verify: bool = False) -> ImageFolder:
    """A dataset of the images under ``root`` (flat or class subfolders), see :class:`ImageFolder`.

    Corrupt files raise :class:`DataError` naming the file when the item is
    loaded; ``verify=True`` checks every file up front instead.
    """
    return ImageFolder(root, size, channels=channels, verify=verify)
