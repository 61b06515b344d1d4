"""Animal-MNIST: the package's pickled arrays are read without unpickling, split per class."""

import gzip
import pickle

import numpy as np
import pytest
import torch

from iwm.data.datasets import class_interleaved, get_dataset
from iwm.data.fetch import pickled_array_bytes, split_animal_mnist, write_idx
from iwm.errors import DataError


def test_pickled_array_is_read_from_opcodes():
    images = np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28)
    code, data = pickled_array_bytes(pickle.dumps(images, protocol=4))
    assert code == "u1" and np.array_equal(np.frombuffer(data, np.uint8).reshape(2, 28, 28),
                                           images)
    labels = np.array([3, 1, 4], dtype=np.int64)
    code, data = pickled_array_bytes(gzip.decompress(gzip.compress(pickle.dumps(labels))))
    assert code == "i8" and np.frombuffer(data, "<i8").tolist() == [3, 1, 4]
    with pytest.raises(DataError, match="one pickled numpy array"):
        pickled_array_bytes(pickle.dumps([images, labels]))


def test_split_holds_out_the_last_images_of_each_class():
    labels = torch.arange(2).repeat_interleave(250)
    images = torch.arange(500).view(500, 1, 1).expand(500, 28, 28).to(torch.uint8)
    split = split_animal_mnist(images, labels)
    test_images, test_labels = split["t10k"]
    assert test_labels.bincount().tolist() == [200, 200]
    assert len(split["train"][1]) == 100
    assert test_images[0, 0, 0] == 50  # class 0's images 50..249 are its test images


def test_registered_and_found_in_iwm_data(tmp_path, monkeypatch):
    folder = tmp_path / "animal-mnist"
    for prefix, n in (("train", 8), ("t10k", 4)):
        write_idx(folder / f"{prefix}-images-idx3-ubyte", torch.zeros(n, 28, 28, dtype=torch.uint8))
        write_idx(folder / f"{prefix}-labels-idx1-ubyte", torch.arange(n, dtype=torch.uint8))
    monkeypatch.setenv("IWM_DATA", str(tmp_path))
    data = get_dataset("animal-mnist", "test", download=False)
    assert data.images.shape == (4, 1, 28, 28) and data.classes[0] == "bear"


def test_classes_are_interleaved_so_that_a_limit_keeps_every_class(tmp_path, monkeypatch):
    # Stored class by class, as the package and its conversion do: 3 classes x 4 images.
    labels = torch.arange(3).repeat_interleave(4).to(torch.uint8)
    images = torch.arange(12).view(12, 1, 1).expand(12, 28, 28).to(torch.uint8)
    folder = tmp_path / "animal-mnist"
    for prefix in ("train", "t10k"):
        write_idx(folder / f"{prefix}-images-idx3-ubyte", images)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte", labels)
    monkeypatch.setenv("IWM_DATA", str(tmp_path))
    data = get_dataset("animal-mnist", "train", download=False)
    assert data.labels.tolist() == [0, 1, 2] * 4
    # Each image keeps its label, and each class its order (0..3, 4..7, 8..11).
    assert data.images[:, 0, 0, 0].tolist() == [0, 4, 8, 1, 5, 9, 2, 6, 10, 3, 7, 11]
    assert data.subset(6).labels.bincount().tolist() == [2, 2, 2]


def test_interleaving_an_unbalanced_set_keeps_every_image_once():
    labels = torch.tensor([2, 0, 0, 0, 1, 2])
    order = class_interleaved(labels, 3)
    assert sorted(order.tolist()) == list(range(6))
    assert labels[order].tolist() == [0, 1, 2, 0, 2, 0]
