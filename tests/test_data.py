"""Data: toy sets (generated from the registry), gmm parameters, digits, image folders, checks."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from genkit.data import (
    COMPONENTS,
    DATASETS,
    TOY,
    LabelledData,
    check_finite,
    digits,
    digits_labels,
    gmm_params,
    image_folder,
    load_dataset,
    load_labelled,
    toy,
    toy_components,
)  # fmt: skip
from genkit.errors import ConfigError, DataError, ShapeError


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("name", TOY.names())
def test_toy_shape_scale_and_reproducibility(name):
    x = toy(name, 4000, generator=gen(0))
    assert x.shape == (4000, 2) and x.dtype == torch.float32 and torch.isfinite(x).all()
    assert torch.equal(x, toy(name, 4000, generator=gen(0)))
    assert not torch.equal(x, toy(name, 4000, generator=gen(1)))
    assert (x.std(0) > 0.5).all() and (x.std(0) < 2).all() and (x.mean(0).abs() < 0.5).all()


@pytest.mark.parametrize("name", TOY.names())
def test_toy_leaves_global_rng_alone(name):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    toy(name, 10, generator=gen(0))
    assert torch.equal(torch.rand(3), expected)


def test_checkerboard_lies_on_black_squares():
    x = toy("checkerboard", 5000, generator=gen())
    assert ((x.floor().sum(1) % 2) == 0).all()
    assert x.abs().max() <= 2


def test_rings_lie_near_their_radii():
    r = toy("rings", 5000, generator=gen()).norm(dim=1)
    nearest = (r[:, None] - torch.tensor([0.5, 1.0, 1.5, 2.0])).abs().min(1).values
    assert nearest.max() < 0.25


@pytest.mark.parametrize("dim", [1, 2, 5])
def test_gmm_samples_match_gmm_params(dim):
    weights, means, covs = gmm_params(dim)
    assert weights.sum() == pytest.approx(1.0) and means.shape == (4, dim) and covs.shape == (4, dim, dim)
    assert (torch.linalg.eigvalsh(covs) > 0).all()
    x = toy("gmm", 200_000, generator=gen(), dim=dim).double()
    mean = weights @ means
    second = (weights[:, None, None] * (covs + means[:, :, None] * means[:, None, :])).sum(0)
    cov = second - mean[:, None] * mean[None, :]
    assert torch.allclose(x.mean(0), mean, atol=0.015)
    assert torch.allclose(torch.cov(x.T).reshape(dim, dim), cov, atol=0.02)


def test_gmm_component_weights_by_nearest_mean():
    weights, means, _ = gmm_params(2)
    x = toy("gmm", 50_000, generator=gen()).double()
    nearest = torch.cdist(x, means).argmin(1)
    freq = torch.bincount(nearest, minlength=4).double() / x.shape[0]
    assert torch.allclose(freq, weights, atol=0.02)  # components barely overlap in 2D


def test_toy_bad_input():
    with pytest.raises(ConfigError, match="2D only"):
        toy("moons", 10, dim=3)
    with pytest.raises(ConfigError, match="moons"):
        toy("moon", 10)
    with pytest.raises(ConfigError, match="positive int"):
        toy("moons", 0)


def test_digits_range_shape_and_splits():
    x, y = digits(), digits_labels()
    assert x.shape == (1797, 1, 8, 8) and x.dtype == torch.float32
    assert x.min() == -1 and x.max() == 1
    assert y.shape == (1797,) and set(y.tolist()) == set(range(10))
    train, test = digits("train"), digits("test")
    assert train.shape[0] + test.shape[0] == 1797 and test.shape[0] == 359
    assert torch.equal(test, digits("test"))
    rows = lambda a: Counter(map(tuple, a.flatten(1).tolist()))  # noqa: E731
    assert rows(train) + rows(test) == rows(x)
    labels_of = {tuple(img.flatten().tolist()): int(lab) for img, lab in zip(x, y)}
    assert all(labels_of[tuple(img.flatten().tolist())] == int(lab) for img, lab in zip(test, digits_labels("test")))
    with pytest.raises(ConfigError, match="'val'"):
        digits("val")


def _png(path, size=(12, 8), colour=(255, 0, 127)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def test_image_folder_flat(tmp_path):
    for i in range(3):
        _png(tmp_path / f"img{i}.png")
    ds = image_folder(tmp_path, 8)
    assert len(ds) == 3 and ds.classes == []
    img = ds[0]
    assert img.shape == (3, 8, 8) and img.dtype == torch.float32
    expected = torch.tensor([1.0, -1.0, 127 / 127.5 - 1])
    assert torch.allclose(img, expected[:, None, None].expand(3, 8, 8), atol=1e-6)
    gray = image_folder(tmp_path, 4, channels=1)[1]
    assert gray.shape == (1, 4, 4) and gray.min() >= -1 and gray.max() <= 1
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=2)))
    assert batch.shape == (2, 3, 8, 8)


def test_image_folder_center_crops(tmp_path):
    img = Image.new("RGB", (24, 8), (0, 0, 0))
    img.paste((255, 255, 255), (8, 0, 16, 8))  # white middle third, black sides
    img.save(tmp_path / "wide.png")
    assert torch.equal(image_folder(tmp_path, 8)[0], torch.ones(3, 8, 8))


def test_image_folder_class_subfolders(tmp_path):
    for cls, n in [("dog", 2), ("cat", 1)]:
        for i in range(n):
            _png(tmp_path / cls / f"{i}.png")
    (tmp_path / "notes.txt").write_text("not an image")
    ds = image_folder(tmp_path, 6)
    assert ds.classes == ["cat", "dog"] and ds.labels.tolist() == [0, 1, 1]
    assert ds[2].shape == (3, 6, 6)


def test_image_folder_missing_empty_and_mixed(tmp_path):
    with pytest.raises(DataError, match="nowhere"):
        image_folder(tmp_path / "nowhere", 8)
    with pytest.raises(DataError, match="no images found"):
        image_folder(tmp_path, 8)
    _png(tmp_path / "loose.png")
    _png(tmp_path / "cls" / "a.png")
    with pytest.raises(DataError, match="mixes"):
        image_folder(tmp_path, 8)
    with pytest.raises(ConfigError, match="channels"):
        image_folder(tmp_path / "cls", 8, channels=2)


def test_image_folder_corrupt_files(tmp_path):
    _png(tmp_path / "good.png")
    (tmp_path / "bad.png").write_bytes(b"this is not a png")
    noise = torch.randint(0, 256, (32, 32, 3), dtype=torch.uint8, generator=gen()).numpy()
    Image.fromarray(noise).save(tmp_path / "noise.png")
    data = (tmp_path / "noise.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(data[: len(data) // 2])  # pixel data cut off
    ds = image_folder(tmp_path, 8)  # lazy: constructing succeeds
    names = [f.name for f in ds.files]
    with pytest.raises(DataError, match=r"bad\.png.*remove"):
        ds[names.index("bad.png")]
    with pytest.raises(DataError, match=r"truncated\.png"):
        ds[names.index("truncated.png")]
    assert ds[names.index("good.png")].shape == ds[names.index("noise.png")].shape == (3, 8, 8)
    with pytest.raises(DataError, match=r"(?s)2 of 4 images.*bad\.png.*truncated\.png"):
        image_folder(tmp_path, 8, verify=True)


def test_image_folder_keeps_16_bit_and_float_images(tmp_path):
    """Pillow's convert() clips 16-bit values at 255 and rounds floats to 0/1; genkit reads them on their scale."""
    ramp = np.linspace(0.0, 1.0, 16 * 16).reshape(16, 16)
    Image.fromarray(np.round(ramp * 65535).astype(np.uint16)).save(tmp_path / "a16.png")
    Image.fromarray(ramp.astype(np.float32)).save(tmp_path / "b_float.tif")
    Image.fromarray(np.round(ramp * 255).astype(np.uint8)).save(tmp_path / "c8.png")
    for channels in (1, 3):
        ds = image_folder(tmp_path, 8, channels=channels, verify=True)
        deep, flt, eight = (ds[i] for i in range(3))
        assert deep.shape == eight.shape == (channels, 8, 8)
        torch.testing.assert_close(deep, flt, rtol=0, atol=1e-4)
        torch.testing.assert_close(deep, eight, rtol=0, atol=2 / 255)  # 8-bit rounding, then resampling
        assert deep.min() < -0.8 and deep.max() > 0.8  # the whole range, not clipped to white
    Image.fromarray((ramp * 3).astype(np.float32)).save(tmp_path / "d_bright.tif")
    with pytest.raises(DataError, match=r"d_bright\.tif .*values in \[0, 3\], outside the \[0, 1\]"):
        image_folder(tmp_path, 8, verify=True)


def test_image_folder_names_an_image_too_large_to_open(tmp_path, monkeypatch):
    _png(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)  # Pillow's decompression-bomb guard: 2x this raises
    with pytest.raises(DataError, match=r"(?s)big\.png.*MAX_IMAGE_PIXELS"):
        image_folder(tmp_path, 8, verify=True)


def test_check_finite():
    x = torch.randn(4, 3)
    assert check_finite(x) is x
    ints = torch.arange(3)
    assert check_finite(ints) is ints  # integer data cannot hold NaN: returned unchanged, not copied
    bad = x.clone()
    bad[0, 0], bad[1, 1], bad[2, 2] = float("nan"), float("inf"), -float("inf")
    with pytest.raises(DataError, match=r"batch has 3 non-finite entries \(1 NaN, 2 inf\) out of 12"):
        check_finite(bad, "batch")


@pytest.mark.parametrize("name", DATASETS.names())
def test_load_dataset_from_every_registry_entry(name):
    x = load_dataset(name, n=64, generator=gen(0))
    assert x.shape[0] == 64 and torch.isfinite(x).all()
    assert torch.equal(x, load_dataset(name, n=64, generator=gen(0)))


def test_load_dataset_options():
    assert load_dataset("gmm", n=10, dim=4).shape == (10, 4)
    assert load_dataset("moons").shape == (10_000, 2)
    assert torch.equal(load_dataset("digits", split="test"), digits("test"))
    with pytest.raises(ConfigError, match="split"):
        load_dataset("moons", n=10, split="train")
    with pytest.raises(ConfigError, match="1438"):
        load_dataset("digits", n=5000)


def test_held_out_sets_are_never_the_training_draw():
    """Digits: the test split and a train subset; toy sets: two draws with seeds the training draw does not use."""
    from genkit.data import held_out

    ref, floor = held_out("digits", 100)
    torch.testing.assert_close(ref, load_dataset("digits", split="test"))
    train = load_dataset("digits")
    assert len(floor) == 100 and all((train == f).all(dim=(1, 2, 3)).any() for f in floor)  # floor: train images
    ref, floor = held_out("moons", 500, seed=3)
    training = load_dataset("moons", n=500, generator=torch.Generator().manual_seed(3))
    assert ref.shape == floor.shape == (500, 2)
    assert not torch.equal(ref, floor) and not torch.equal(ref, training) and not torch.equal(floor, training)


def test_every_toy_set_has_components():
    assert sorted(COMPONENTS) == sorted(TOY.names())


@pytest.mark.parametrize("name", sorted(COMPONENTS))
def test_toy_components_are_the_toy_draw_labelled_by_component(name):
    x, k = toy_components(name, 4000, generator=gen(0))
    assert torch.equal(x, toy(name, 4000, generator=gen(0)))  # the same draw: unconditional data is unchanged
    assert k.dtype == torch.int64 and k.shape == (4000,)
    counts = torch.bincount(k, minlength=len(COMPONENTS[name]))
    assert len(counts) == len(COMPONENTS[name]) and (counts > 0).all()
    means = torch.stack([x[k == c].mean(0) for c in range(len(counts))])
    if name == "rings":  # concentric: the radius tells the ring
        assert torch.equal((x.norm(dim=1) / 0.5).round().long() - 1, k)
    elif name == "checkerboard":  # each square: column floor(x1), lower or upper black square
        col, row = x[:, 0].floor(), x[:, 1].floor()
        assert torch.equal(2 * (col.long() + 2) + (row >= col % 2).long(), k)
    elif name == "spirals":  # the two arms are point reflections of each other
        assert torch.allclose(means[0], -means[1], atol=0.1) and means[0].norm() > 0.3
    elif name == "gmm":
        weights, centres, _ = gmm_params(2)
        assert torch.allclose(means.double(), centres, atol=0.05)
        assert torch.allclose(counts.double() / 4000, weights, atol=0.02)
    elif name == "moons":  # before standardising, the upper moon lies on the unit circle about (0, 0), the lower
        raw = x * torch.tensor([0.87, 0.5]) + torch.tensor([0.5, 0.25])  # one about (1, 0.5)
        centre = torch.where((k == 0)[:, None], torch.zeros(2), torch.tensor([1.0, 0.5]))
        assert ((raw - centre).norm(dim=1) - 1).abs().max() < 0.25
        assert (raw[k == 0, 1] > -0.25).all() and (raw[k == 1, 1] < 0.75).all()
    else:  # 8gaussians: the nearest component mean is the label for (nearly) every sample
        assert (torch.cdist(x, means).argmin(1) == k).float().mean() > 0.99


def test_load_labelled_pairs_the_named_sets_with_their_classes():
    d = load_labelled("digits")
    assert torch.equal(d.data, load_dataset("digits")) and torch.equal(d.labels, digits_labels("train"))
    assert d.num_classes == 10 and d.class_names == [str(i) for i in range(10)]
    sub = load_labelled("digits", n=50, generator=gen(3))
    assert torch.equal(sub.data, load_dataset("digits", n=50, generator=gen(3)))
    full = torch.cat([digits("train").flatten(1), digits_labels("train")[:, None].float()], 1)
    pairs = torch.cat([sub.data.flatten(1), sub.labels[:, None].float()], 1)
    assert (torch.cdist(pairs, full).min(1).values == 0).all()  # each image keeps its own label
    g = load_labelled("gmm", n=100, generator=gen(1), dim=3)
    assert torch.equal(g.data, load_dataset("gmm", n=100, generator=gen(1), dim=3)) and g.num_classes == 4
    with pytest.raises(ConfigError, match="no option"):
        load_labelled("moons", split="test")


def test_image_folder_labelled_gives_images_and_class_indices(tmp_path):
    for cls, n in [("dog", 2), ("cat", 1)]:
        for i in range(n):
            _png(tmp_path / cls / f"{i}.png")
    data = image_folder(tmp_path, 6).labelled()
    assert data.class_names == ["cat", "dog"] and data.labels.tolist() == [0, 1, 1] and len(data) == 3
    x, y = data[2]
    assert x.shape == (3, 6, 6) and y.item() == 1
    data.verify()  # every file readable
    (tmp_path / "dog" / "bad.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="bad.png"):
        image_folder(tmp_path, 6).labelled().verify()  # the wrapped folder's own check
    flat = tmp_path / "flat"
    _png(flat / "a.png")
    with pytest.raises(DataError, match="no class subfolders"):
        image_folder(flat, 6).labelled()


def test_labelled_data_bad_input():
    x = torch.randn(4, 2)
    with pytest.raises(ShapeError, match=r"shape \[4\]"):
        LabelledData(x, torch.tensor([0, 1, 2]))
    with pytest.raises(ShapeError, match="integer class ids"):
        LabelledData(x, torch.zeros(4))
    with pytest.raises(DataError, match=r"outside 0..1"):
        LabelledData(x, torch.tensor([0, 1, 2, 0]), num_classes=2)
    with pytest.raises(DataError, match=r"labels \[-1\]"):
        LabelledData(x, [0, 1, -1, 0])
    with pytest.raises(ConfigError, match="class_names has 2 names for num_classes=3"):
        LabelledData(x, [0, 1, 2, 0], class_names=["a", "b"], num_classes=3)
    assert LabelledData(x, [0, 1, 1, 0], class_names=["a", "b", "c"]).counts().tolist() == [2, 2, 0]
