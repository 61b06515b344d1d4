"""benchmarks/photo_folder.py on matplotlib's photo alone (the scikit-image wheel is a
download): the folder it writes is one ``imagefolder:`` reads, with disjoint strips."""

from __future__ import annotations

import pytest
import torch
from scripts import load_script  # tests/benchmarks/scripts.py

from iwm.data.datasets import get_dataset

script = load_script("photo_folder")


def test_crops_lie_inside_the_photo_and_have_the_size():
    # A photo whose columns are their own index: a crop's values give where it came from.
    photo = torch.arange(200).repeat(3, 120, 1).to(torch.uint8)
    out = script.crops(photo, 50, 16, (48, 400), torch.Generator().manual_seed(0))
    assert out.shape == (50, 3, 16, 16) and out.dtype == torch.uint8
    assert int(out.max()) <= 199
    # Sides are clamped to the photo (120 rows), and crops sit at many places.
    assert len({int(c[0, 0, 0]) for c in out}) > 20


def test_the_folder_has_train_and_test_strips_that_imagefolder_reads(tmp_path):
    photos = script.load_photos(None)
    assert set(photos) == {"grace_hopper"} and photos["grace_hopper"].shape[0] == 3
    # Two classes: the photo, and its colour-inverted copy.
    photos["inverted"] = 255 - photos["grace_hopper"]
    counts = script.build(tmp_path, photos, per_photo=20, size=32, sides=(48, 160),
                          test_fraction=0.25, seed=0)
    assert counts == {"train": 30, "test": 10}
    train = get_dataset(f"imagefolder:{tmp_path}", "train")
    test = get_dataset(f"imagefolder:{tmp_path}", "test")
    assert len(train) == 30 and len(test) == 10
    assert train.classes == ["grace_hopper", "inverted"]
    assert tuple(test.load(0).shape) == (3, 32, 32)


def test_train_and_test_crops_come_from_disjoint_columns(tmp_path):
    # Each column holds its own index; antialiased resizing only averages within a crop.
    ramp = torch.arange(200).repeat(3, 150, 1).to(torch.uint8)
    script.build(tmp_path, {"ramp": ramp}, per_photo=40, size=16, sides=(48, 160),
                 test_fraction=0.25, seed=0)
    train = get_dataset(f"imagefolder:{tmp_path}", "train")
    test = get_dataset(f"imagefolder:{tmp_path}", "test")
    cut = 150  # the first test column of 200
    assert max(int(train.load(i).max()) for i in range(len(train))) < cut
    assert min(int(test.load(i).min()) for i in range(len(test))) >= cut


def test_same_seed_same_folder(tmp_path):
    photos = script.load_photos(None)
    for name in ("a", "b"):
        script.build(tmp_path / name, photos, per_photo=6, size=16, sides=(48, 96),
                     test_fraction=0.5, seed=3)
    a = sorted(p.read_bytes() for p in (tmp_path / "a").rglob("*.png"))
    b = sorted(p.read_bytes() for p in (tmp_path / "b").rglob("*.png"))
    assert a == b and len(a) == 6


@pytest.mark.parametrize("fraction", [0.0, 1.0])
def test_a_split_with_no_columns_is_an_error(tmp_path, fraction):
    with pytest.raises(ValueError, match="test_fraction"):
        script.build(tmp_path, script.load_photos(None), per_photo=4, size=16,
                     sides=(48, 96), test_fraction=fraction, seed=0)
