from __future__ import annotations

import gzip
import pickle
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from iwm.data.datasets import (
    FASHION_MNIST_CLASSES,
    FolderSet,
    ImageSet,
    dataset_names,
    get_dataset,
    open_image_folder,
    read_idx,
    require_labels,
)
from iwm.errors import DataError


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path, monkeypatch):
    monkeypatch.delenv("IWM_DATA", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


def test_fashion_mnist_from_idx_files(fake_mnist_dir, mnist_writer, tmp_path):
    expected = mnist_writer(tmp_path / "check")  # same generator: same contents
    train = get_dataset("fashion-mnist", "train", root=str(fake_mnist_dir), download=False)
    assert isinstance(train, ImageSet)
    assert train.images.shape == (64, 1, 28, 28) and train.images.dtype == torch.uint8
    assert train.labels.dtype == torch.long
    assert torch.equal(train.images[:, 0], expected["train_images"])
    assert torch.equal(train.labels, expected["train_labels"])
    assert train.classes == FASHION_MNIST_CLASSES
    assert train.mean == (0.2860,) and train.std == (0.3530,)
    test = get_dataset("fashion-mnist", "test", root=str(fake_mnist_dir), download=False)
    assert len(test) == 16 and test.split == "test"


def test_fashion_mnist_via_iwm_data(fake_mnist_dir, monkeypatch):
    monkeypatch.setenv("IWM_DATA", str(fake_mnist_dir))
    assert len(get_dataset("fashion-mnist", "train", download=False)) == 64


def test_mnist_from_torchvision_layout(mnist_writer, tmp_path):
    mnist_writer(tmp_path / "MNIST" / "raw", gz=False)
    ds = get_dataset("mnist", "test", root=str(tmp_path), download=False)
    assert len(ds) == 16 and ds.classes[3] == "3" and ds.mean == (0.1307,)


def test_unknown_name_and_split():
    with pytest.raises(DataError) as err:
        get_dataset("fashion_mnist", "train")
    assert "did you mean 'fashion-mnist'" in str(err.value)
    for name in ("cifar10", "stl10", "imagefolder:<path>"):
        assert name in str(err.value)
    with pytest.raises(DataError, match="unknown split 'validation'"):
        get_dataset("mnist", "validation")
    assert set(dataset_names()) == {"fashion-mnist", "mnist", "animal-mnist", "shapes", "cifar10",
                                    "cifar100", "stl10", "imagefolder:<path>",
                                    "shards:<pattern>"}


@pytest.mark.parametrize("name, folder", [("cifar10", "cifar-10-batches-py"),
                                          ("stl10", "stl10_binary")])
def test_torchvision_set_missing_offline(tmp_path, name, folder):
    with pytest.raises(DataError) as err:
        get_dataset(name, "train", root=str(tmp_path), download=False)
    assert str(tmp_path / folder) in str(err.value)


def test_cifar10_from_torchvision_files(tmp_path, monkeypatch):
    # Tiny files in the pickled layout torchvision reads; its md5 check would reject them.
    import torchvision.datasets.cifar as tv_cifar

    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *args, **kwargs: True)
    base = tmp_path / "cifar-10-batches-py"
    base.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (4, 3072), dtype=np.uint8)
        with open(base / name, "wb") as f:
            pickle.dump({"data": data, "labels": [0, 1, 2, 3]}, f)
    with open(base / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, f)
    ds = get_dataset("cifar10", "train", root=str(tmp_path), download=False)
    assert ds.images.shape == (20, 3, 32, 32) and ds.images.is_contiguous()
    assert ds.classes[0] == "c0" and ds.mean == (0.4914, 0.4822, 0.4465)
    # (N, H, W, C) -> (N, C, H, W): channel 0 of image 0 is the first 1024 bytes.
    with open(base / "data_batch_1", "rb") as f:
        first = pickle.load(f)["data"][0]
    assert torch.equal(ds.images[0, 0].flatten(), torch.from_numpy(first[:1024].copy()))


def test_read_idx_rejects_corrupt_files(tmp_path, fake_mnist_dir):
    good = (fake_mnist_dir / "train-images-idx3-ubyte.gz").read_bytes()
    raw = gzip.decompress(good)
    cases = {
        "truncated.gz": good[: len(good) // 2],
        "short": raw[:-5],
        "long": raw + b"x",
        "magic": b"\x01\x02" + raw[2:],
        "dtype": raw[:2] + b"\x07" + raw[3:],
        "empty": b"",
        "header": raw[:9],
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(DataError, match=str(tmp_path / name)):
            read_idx(tmp_path / name)


def test_corrupt_file_surfaces_from_get_dataset(fake_mnist_dir):
    path = fake_mnist_dir / "t10k-labels-idx1-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(DataError, match="t10k-labels"):
        get_dataset("fashion-mnist", "test", root=str(fake_mnist_dir), download=False)


def test_image_folder_splits_and_formats(image_folder):
    train = get_dataset(f"imagefolder:{image_folder}", "train")
    assert isinstance(train, FolderSet)
    assert train.classes == ["cat", "dog"] and train.root == image_folder / "train"
    assert len(train) == 2 * (4 + 3)  # png x4, gray, alpha, jpg; notes.txt ignored
    assert train.labels.tolist() == [0] * 7 + [1] * 7
    for i in range(len(train)):
        img = train.load(i)
        assert img.dtype == torch.uint8 and img.dim() == 3 and img.shape[0] == 3
    gray = [i for i, (p, _) in enumerate(train.samples) if p.endswith("gray.png")][0]
    g = train.load(gray)
    assert torch.equal(g[0], g[1]) and torch.equal(g[1], g[2])
    test = get_dataset(f"imagefolder:{image_folder}", "test")
    assert len(test) == 2 * (2 + 3) and test.classes == train.classes


def test_image_folder_class_missing_from_test_keeps_labels(image_folder):
    shutil.rmtree(image_folder / "test" / "cat")
    test = open_image_folder(image_folder, "test")
    assert test.classes == ["cat", "dog"] and set(test.labels.tolist()) == {1}


def test_image_folder_without_splits_holds_a_slice_out(image_folder):
    flat = image_folder / "train"  # class folders directly, 14 images
    train = open_image_folder(flat, "train")
    test = open_image_folder(flat, "test")
    assert train.classes == test.classes == ["cat", "dog"]
    assert len(test) >= 1 and len(train) + len(test) == 14
    assert not set(train.samples) & set(test.samples)  # (path, label): labels agree too
    for alias in ("val", "valid", "validation"):
        assert open_image_folder(flat, alias).samples == test.samples
    everything = open_image_folder(flat, "train", holdout=0)
    assert len(everything) == 14 and set(everything.samples) == {*train.samples,
                                                                 *test.samples}
    with pytest.raises(DataError, match="no test split .*data.holdout=0"):
        open_image_folder(flat, "test", holdout=0)
    with pytest.raises(DataError, match="unknown split 'unlabeled'.*train, val, valid, "
                                        "validation, test"):
        open_image_folder(flat, "unlabeled")


def _touch_images(folder, names):
    # Indexing goes by extension only, so empty files are images enough (and fast).
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).touch()


@pytest.mark.parametrize("holdout", [0.1, 0.3])
def test_holdout_slice_statistics(tmp_path, holdout):
    names = [f"img_{i:04d}.png" for i in range(2000)]
    _touch_images(tmp_path / "photos", names)
    train = open_image_folder(tmp_path / "photos", "train", holdout)
    test = open_image_folder(tmp_path / "photos", "test", holdout)
    train_files = {p for p, _ in train.samples}
    test_files = {p for p, _ in test.samples}
    assert not train_files & test_files
    assert train_files | test_files == {str(tmp_path / "photos" / n) for n in names}
    # Binomial std of the fraction: sqrt(p (1 - p) / 2000) <= 0.011.
    assert abs(len(test) / 2000 - holdout) < 0.035
    assert test.classes == train.classes == ["photos"]
    again = open_image_folder(tmp_path / "photos", "test", holdout)
    assert again.samples == test.samples  # deterministic


def test_holdout_is_stable_when_files_are_added_and_the_folder_moves(tmp_path):
    names = [f"{i}.jpg" for i in range(300)]
    _touch_images(tmp_path / "a", names)
    before = {p for p, _ in open_image_folder(tmp_path / "a", "test").samples}
    _touch_images(tmp_path / "a", [f"new_{i}.jpg" for i in range(100)])
    after = {p for p, _ in open_image_folder(tmp_path / "a", "test").samples}
    assert before <= after  # old files keep their split; only new ones can join
    assert all("new_" in p for p in after - before)
    # By the path inside the folder, so a copy elsewhere splits the same way.
    _touch_images(tmp_path / "elsewhere" / "b", names)
    moved = open_image_folder(tmp_path / "elsewhere" / "b", "test").samples
    assert {p.rsplit("/", 1)[1] for p, _ in moved} == {p.rsplit("/", 1)[1] for p in before}


def test_tiny_folders_keep_both_splits(tmp_path):
    _touch_images(tmp_path / "two", ["a.png", "b.png"])
    for holdout in (0.01, 0.5, 0.99):
        train = open_image_folder(tmp_path / "two", "train", holdout)
        test = open_image_folder(tmp_path / "two", "test", holdout)
        assert len(train) == len(test) == 1 and train.samples != test.samples
    _touch_images(tmp_path / "one", ["a.png"])
    with pytest.raises(DataError, match="only 1 image.*need 2.*data.holdout=0"):
        open_image_folder(tmp_path / "one", "train")
    assert len(open_image_folder(tmp_path / "one", "train", holdout=0)) == 1


def test_require_labels(tmp_path, image_folder):
    _touch_images(tmp_path / "photos", ["a.png", "b.png"])
    with pytest.raises(DataError, match="^a probe needs labelled images: imagefolder:.*photos "
                                        "has no class sub-folders; put its images in <class>/"):
        require_labels(open_image_folder(tmp_path / "photos"), "a probe")
    _touch_images(tmp_path / "cats" / "cat", ["a.png", "b.png"])
    with pytest.raises(DataError, match=r"imagefolder:.*cats has a single class \(cat\); put "
                                        "its images in <class>/"):
        require_labels(open_image_folder(tmp_path / "cats"), "a probe")
    require_labels(open_image_folder(image_folder), "a probe")  # two classes: fine


def test_train_folder_without_test_folder(image_folder):
    # "test" must not fall back to the whole tree (which would hold train/ as a class).
    shutil.rmtree(image_folder / "test")
    with pytest.raises(DataError, match="no 'test' sub-folder"):
        open_image_folder(image_folder, "test")
    assert open_image_folder(image_folder, "train").classes == ["cat", "dog"]


def test_image_folder_val_alias(image_folder):
    (image_folder / "test").rename(image_folder / "val")
    assert len(open_image_folder(image_folder, "test")) == 10


def test_flat_folder_is_one_class(tmp_path):
    for i in range(3):
        Image.new("RGB", (5, 5), (i, i, i)).save(tmp_path / f"{i}.png")
    ds = open_image_folder(tmp_path, "train", holdout=0)
    assert ds.classes == [tmp_path.name] and len(ds) == 3


def test_empty_or_missing_folder(tmp_path):
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(DataError, match="no images"):
        get_dataset(f"imagefolder:{tmp_path / 'empty'}", "train")
    with pytest.raises(DataError, match="not a folder"):
        get_dataset(f"imagefolder:{tmp_path / 'nope'}", "train")


def test_unreadable_image_raises_data_error(image_folder):
    bad = image_folder / "train" / "cat" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    ds = open_image_folder(image_folder, "train")
    i = [k for k, (p, _) in enumerate(ds.samples) if p == str(bad)][0]
    with pytest.raises(DataError, match="broken.png"):
        ds.load(i)


def test_subsets(image_folder, fake_mnist_dir):
    ds = open_image_folder(image_folder, "train")
    sub = ds.subset(4)
    assert len(sub) == 4 and set(sub.labels.tolist()) == {0, 1}  # spread over classes
    assert ds.subset(None) is ds and ds.subset(100) is ds
    mean, std = ds.mean, ds.std
    assert len(mean) == 3 and all(0 <= m <= 1 for m in mean) and all(s > 0 for s in std)
    im = get_dataset("fashion-mnist", "train", root=str(fake_mnist_dir), download=False)
    assert torch.equal(im.subset(5).images, im.images[:5])
    with pytest.raises(DataError):
        im.subset(0)


def test_image_set_validates_shapes():
    with pytest.raises(DataError):
        ImageSet(torch.zeros(2, 1, 4, 4), torch.zeros(2, dtype=torch.long), [], (0.5,), (0.5,))
    with pytest.raises(DataError):
        ImageSet(torch.zeros(2, 1, 4, 4, dtype=torch.uint8), torch.zeros(3, dtype=torch.long),
                 [], (0.5,), (0.5,))
