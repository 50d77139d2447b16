"""PNG pictures of samples: a scatter for vectors, a grid for images, a per-position token-frequency heatmap for
token sequences (integer tensors [N, L]), optionally next to reference data; and heatmaps of distributions on a
2-D grid (:func:`save_heatmaps_png`, a GFlowNet's samples beside its exact and target distributions).

Scripts and notebooks share this one function so every run's pictures look alike. Figures are drawn
with matplotlib's Agg canvas on a private ``Figure``: nothing touches pyplot's global state or the
user's chosen backend, so it is safe inside notebooks and on headless machines.

>>> import tempfile, torch
>>> path = save_samples_png(torch.randn(100, 2), tempfile.mkdtemp() + "/s.png", reference=torch.randn(100, 2))
>>> path.suffix
'.png'
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .errors import ShapeError

__all__ = ["save_samples_png", "save_heatmaps_png", "MAX_IMAGES"]

#: At most this many images are drawn per grid (the first ones); more would be unreadable.
MAX_IMAGES = 64


def _check(x: Any, what: str) -> Tensor:
    if not torch.is_tensor(x):
        raise ShapeError(f"{what} must be a torch.Tensor [N, D] or [N, C, H, W]; got {type(x).__name__}")
    if x.ndim not in (2, 4) or x.shape[0] < 1:
        raise ShapeError(f"{what} must be vectors [N, D] or images [N, C, H, W] with N >= 1; got shape "
                         f"{tuple(x.shape)}. Reshape it (e.g. x.flatten(1) for vectors)")
    if x.ndim == 4 and x.shape[1] not in (1, 3):
        raise ShapeError(f"{what} images need 1 (grey) or 3 (RGB) channels; got shape {tuple(x.shape)}")
    return x.detach().float().cpu()


def _scatter(ax: Any, x: Tensor, title: str, color: str) -> None:
    finite = torch.isfinite(x).all(1)
    dropped = int((~finite).sum())
    x = x[finite]
    if x.shape[1] == 1:
        ax.hist(x[:, 0].numpy(), bins=60, color=color, alpha=0.8)
        ax.set_xlabel("x")
    else:
        ax.scatter(x[:, 0].numpy(), x[:, 1].numpy(), s=2, alpha=0.5, color=color, linewidths=0)
        ax.set_aspect("equal", adjustable="box")
        if x.shape[1] > 2:
            ax.set_xlabel("dim 0")
            ax.set_ylabel("dim 1")
    ax.set_title(title + (f" ({dropped} non-finite dropped)" if dropped else ""), fontsize=10)


def _token_heatmap(ax: Any, x: Tensor, vocab_size: int, title: str) -> Any:
    """Per-position token frequencies: a [V, L] heatmap (rows tokens, columns positions, colour in [0, 1])."""
    freq = torch.nn.functional.one_hot(x.long(), vocab_size).double().mean(0).T  # [V, L]
    image = ax.imshow(freq.numpy(), aspect="auto", interpolation="nearest", vmin=0.0, vmax=1.0, cmap="viridis")
    ax.set_xlabel("position")
    ax.set_ylabel("token")
    ax.set_yticks(range(vocab_size))
    ax.set_title(f"{title}: token frequency (n = {x.shape[0]})", fontsize=10)
    return image


def _grid(ax: Any, x: Tensor, title: str) -> None:
    from torchvision.utils import make_grid

    x = x[:MAX_IMAGES]
    x = torch.nan_to_num(x, nan=0.0).clamp(-1, 1).add(1).div(2)  # images live in [-1, 1]
    grid = make_grid(x, nrow=math.ceil(math.sqrt(x.shape[0])), padding=1, pad_value=1.0)
    ax.imshow(grid.permute(1, 2, 0).numpy(), interpolation="nearest")
    ax.set_axis_off()
    ax.set_title(title, fontsize=10)


def save_samples_png(samples: Tensor, path: str | Path, reference: Tensor | None = None,
                     title: str | None = None) -> Path:
    """Write ``samples`` to the PNG ``path`` and return it (parent folders are created).

    Args:
        samples: vectors ``[N, D]`` (a scatter of the first two coordinates; a histogram when ``D = 1``)
            or images ``[N, C, H, W]`` in ``[-1, 1]`` with ``C`` 1 or 3 (a grid of the first
            :data:`MAX_IMAGES`, clamped).
        reference: data of the same kind, drawn in a second panel to the right ("data") with the same
            axis limits for vectors.
        title: a title over the whole figure.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if torch.is_tensor(samples) and not samples.is_floating_point() and samples.ndim == 2:
        return _save_tokens_png(samples, path, reference, title)
    x = _check(samples, "samples")
    ref = _check(reference, "reference") if reference is not None else None
    if ref is not None and (ref.ndim != x.ndim or (x.ndim == 4 and ref.shape[1] != x.shape[1])
                            or (x.ndim == 2 and ref.shape[1] != x.shape[1])):
        raise ShapeError(f"reference {tuple(ref.shape)} is not the same kind of data as samples {tuple(x.shape)}; "
                         "pass reference data with the samples' shape")
    panels = [("samples", x, "tab:blue")] + ([("data", ref, "tab:orange")] if ref is not None else [])
    fig = Figure(figsize=(4.5 * len(panels), 4.8 if title else 4.5))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels), squeeze=False, sharex=x.ndim == 2, sharey=x.ndim == 2)[0]
    for ax, (name, data, color) in zip(axes, panels):
        if data.ndim == 2:
            _scatter(ax, data, name, color)
        else:
            _grid(ax, data, name)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def _save_tokens_png(samples: Tensor, path: str | Path, reference: Tensor | None, title: str | None) -> Path:
    """Token sequences ``[N, L]`` (integer ids): a per-position token-frequency heatmap, beside the reference's."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    x = samples.detach().cpu()
    if x.shape[0] < 1 or (x.numel() and int(x.min()) < 0):
        raise ShapeError(f"token samples must be ids >= 0 [N, L] with N >= 1; got shape {tuple(x.shape)}")
    ref = None
    if reference is not None:
        if not torch.is_tensor(reference) or reference.is_floating_point() or reference.ndim != 2 \
                or reference.shape[1] != x.shape[1]:
            raise ShapeError(f"reference {getattr(reference, 'shape', type(reference).__name__)} is not token "
                             f"sequences like samples {tuple(x.shape)}; pass token ids [N, {x.shape[1]}]")
        ref = reference.detach().cpu()
    vocab = 1 + max(int(t.max()) for t in (x, ref) if t is not None and t.numel())
    panels = [("samples", x)] + ([("data", ref)] if ref is not None else [])
    fig = Figure(figsize=(5.0 * len(panels), 3.6 if title else 3.3))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (name, data) in zip(axes, panels):
        image = _token_heatmap(ax, data, vocab, name)
    fig.colorbar(image, ax=list(axes), shrink=0.9)
    return _save(fig, path, title)


def _save(fig: Any, path: str | Path, title: str | None) -> Path:
    """Title ``fig`` and write it to the PNG ``path`` (parent folders created); return the path."""
    if title:
        fig.suptitle(title, fontsize=11)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def save_heatmaps_png(panels: dict[str, Tensor], path: str | Path, title: str | None = None) -> Path:
    """Write one heatmap per ``{name: [H, W] tensor}`` side by side, on one shared colour scale (e.g. a
    distribution on a 2-D grid: ``[i, j]`` is the mass at state ``(i, j)``), to the PNG ``path``; return it."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not panels or any(not torch.is_tensor(v) or v.ndim != 2 for v in panels.values()):
        raise ShapeError(f"save_heatmaps_png takes a non-empty dict of 2-D tensors; got "
                         f"{ {k: tuple(getattr(v, 'shape', ())) for k, v in panels.items()} }")
    top = max(float(v.max()) for v in panels.values()) or 1.0
    fig = Figure(figsize=(4.2 * len(panels) + 0.6, 4.6 if title else 4.2))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    image = None
    for ax, (name, grid) in zip(axes, panels.items()):
        image = ax.imshow(grid.detach().double().cpu().numpy(), origin="lower", vmin=0.0, vmax=top, cmap="viridis")
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("x_1")
        ax.set_ylabel("x_0")
    fig.colorbar(image, ax=list(axes), shrink=0.8)
    return _save(fig, path, title)
