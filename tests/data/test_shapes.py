"""The procedural colour data set: deterministic, disjoint splits, shapes as named,
colour a nuisance, cached, registered."""

from __future__ import annotations

import math

import pytest
import torch

from iwm.data import shapes
from iwm.data.datasets import get_dataset
from iwm.data.shapes import (
    SHAPES_CLASSES,
    generate_shapes,
    load_shapes,
    render_shapes,
    shape_inside,
    shapes_cache_path,
)
from iwm.errors import DataError

SMALL = {"train": 400, "test": 100}


def _hashes(images: torch.Tensor) -> set[bytes]:
    return {bytes(img.flatten().tolist()) for img in images}


def test_same_seed_same_images_other_seed_other_images():
    a, b = generate_shapes(3, counts=SMALL), generate_shapes(3, counts=SMALL)
    for split in SMALL:
        assert torch.equal(a[split][0], b[split][0]) and torch.equal(a[split][1], b[split][1])
    c = generate_shapes(4, counts=SMALL)
    assert not torch.equal(a["train"][0], c["train"][0])


def test_splits_are_disjoint_balanced_and_shaped():
    data = generate_shapes(0, counts=SMALL)
    train, test = data["train"], data["test"]
    assert train[0].shape == (400, 3, 32, 32) and train[0].dtype == torch.uint8
    assert test[0].shape == (100, 3, 32, 32)
    assert not _hashes(train[0]) & _hashes(test[0])
    assert len(_hashes(train[0])) == 400  # no duplicate inside a split either
    counts = torch.bincount(torch.cat([train[1], test[1]]), minlength=len(SHAPES_CLASSES))
    assert counts.tolist() == [50] * len(SHAPES_CLASSES)


@pytest.mark.parametrize(("name", "inside", "outside"), [
    ("circle", [(0, 0), (0.8, 0)], [(0.7, 0.7)]),
    ("ring", [(0.75, 0), (0, -0.75)], [(0, 0), (0.3, 0.3)]),
    ("ellipse", [(0, 0), (0.9, 0)], [(0, 0.7)]),
    ("triangle", [(0, 0), (0, -0.9)], [(0, 0.9), (0.6, 0.6)]),
    ("square", [(0, 0), (0.7, 0.7)], [(0.9, 0)]),
    ("pentagon", [(0, 0), (0, -0.95)], [(0.8, 0.8)]),
    ("star", [(0, 0), (0, -0.9)], [(0.6 * math.sin(0.63), -0.6 * math.cos(0.63))]),
    ("cross", [(0, 0), (0.9, 0), (0, 0.9)], [(0.6, 0.6)]),
    ("crescent", [(-0.8, 0)], [(0.45, 0), (0, 0)]),
    ("tee", [(0, -0.7), (0, 0.8), (0.8, -0.6)], [(0.6, 0), (0.6, 0.6)]),
])
def test_each_class_is_the_shape_it_is_named_after(name, inside, outside):
    # Points in the shape's own frame (v grows downwards in the image).
    label = SHAPES_CLASSES.index(name)
    for points, expected in ((inside, True), (outside, False)):
        u = torch.tensor([p[0] for p in points])
        v = torch.tensor([p[1] for p in points])
        assert shape_inside(label, u, v).tolist() == [expected] * len(points), (name, points)


def test_classes_differ_in_shape_not_in_colour():
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(2000) % len(SHAPES_CLASSES)
    images = render_shapes(labels, g).float() / 255
    rgb = images.mean(dim=(2, 3))
    chroma = rgb / rgb.sum(dim=1, keepdim=True)  # colour without brightness (area leaks that)
    by_class = torch.stack([chroma[labels == k].mean(0) for k in range(len(SHAPES_CLASSES))])
    # Colour is drawn independently of the class: class means agree to within sampling
    # noise, a small fraction of how much colour varies between images...
    assert (by_class - chroma.mean(0)).abs().max() < 0.25 * chroma.std(0).min()
    # ...while each image has a shape on a background of another value: its pixels span
    # a wide range (a blank or one-colour image would not).
    spread = images.amax(dim=(1, 2, 3)) - images.amin(dim=(1, 2, 3))
    assert spread.min() > 0.2


def test_built_once_then_read_from_the_cache(tmp_path, monkeypatch):
    first = load_shapes(tmp_path, counts=SMALL)
    path = shapes_cache_path(tmp_path, counts=SMALL)
    assert path.is_file()

    def no_rebuild(*args, **kwargs):
        raise AssertionError("the cached set was rebuilt")

    monkeypatch.setattr(shapes, "generate_shapes", no_rebuild)
    again = load_shapes(tmp_path, counts=SMALL)
    assert torch.equal(first["train"][0], again["train"][0])
    assert torch.equal(first["test"][1], again["test"][1])


def test_corrupt_cache_is_a_clear_error(tmp_path):
    path = shapes_cache_path(tmp_path, counts=SMALL)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not a torch file")
    with pytest.raises(DataError, match="unreadable shapes cache.*delete it"):
        load_shapes(tmp_path, counts=SMALL)


def test_registered_as_a_colour_data_set(tmp_path, monkeypatch):
    monkeypatch.setattr(shapes, "SHAPES_SPLITS", SMALL)
    train = get_dataset("shapes", "train", str(tmp_path))
    test = get_dataset("shapes", "test", str(tmp_path))
    assert (len(train), len(test)) == (400, 100)
    assert train.channels == 3 and train.classes == list(SHAPES_CLASSES)
    # Both splits are normalised with the train split's statistics.
    assert train.mean == test.mean and train.std == test.std
    assert all(0.1 < m < 0.9 for m in train.mean)
    with pytest.raises(DataError, match="unknown split"):
        get_dataset("shapes", "val", str(tmp_path))
