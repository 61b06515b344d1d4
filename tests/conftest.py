"""Shared fixtures: tiny generated data sets, so no test needs the internet."""

from __future__ import annotations

from pathlib import Path

# Inductor (the torch.compile tests) imports setuptools lazily, and setuptools' distutils
# hack asserts if the standard library's distutils was imported before it, which some
# test orders under xdist did (CI failed once this way). Imported first, setuptools owns
# ``distutils`` from the start.
import setuptools  # noqa: F401  # isort: skip
import numpy as np
import pytest
import torch
from PIL import Image

from iwm.data.fetch import write_idx

FAKE_TRAIN = 64
FAKE_TEST = 16


def write_fake_mnist(folder: Path, gz: bool = True, n_train: int = FAKE_TRAIN,
                     n_test: int = FAKE_TEST) -> dict[str, torch.Tensor]:
    """Write the four MNIST-format IDX files (28x28, 10 classes) and return their contents.
    Image i is filled with the value i % 256 plus a gradient, so tests can tell them apart."""
    gen = torch.Generator().manual_seed(0)
    out = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = (torch.arange(n).view(n, 1, 1) + torch.arange(28).view(1, 1, 28)) % 256
        images = images.expand(n, 28, 28).contiguous()
        labels = torch.randint(0, 10, (n,), generator=gen)
        suffix = ".gz" if gz else ""
        write_idx(folder / f"{prefix}-images-idx3-ubyte{suffix}", images.to(torch.uint8))
        write_idx(folder / f"{prefix}-labels-idx1-ubyte{suffix}", labels.to(torch.uint8))
        out[f"{prefix}_images"] = images.to(torch.uint8)
        out[f"{prefix}_labels"] = labels
    return out


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # `-m cuda` selects the tests that need a GPU (benchmarks/gpu_suite.py runs them);
    # without one they are skipped, never failed.
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


@pytest.fixture
def mnist_writer():
    """:func:`write_fake_mnist`, for tests that need the files in several places."""
    return write_fake_mnist


@pytest.fixture
def fake_mnist_dir(tmp_path: Path) -> Path:
    """A folder holding tiny Fashion-MNIST-format IDX files (gzip-compressed)."""
    folder = tmp_path / "fmnist"
    write_fake_mnist(folder)
    return folder


def write_image(path: Path, array: np.ndarray, fmt: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format=fmt)


def constant_image(value: int, size: tuple[int, int] = (12, 10)) -> np.ndarray:
    """An RGB image (height, width) of one colour that encodes ``value`` (< 256)."""
    return np.full((*size, 3), (value, 255 - value, 7), dtype=np.uint8)


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """``<root>/{train,test}/<class>/`` with PNG (RGB, grayscale, RGBA) and JPEG files of
    different sizes, plus a non-image file that must be ignored."""
    root = tmp_path / "folder"
    rng = np.random.default_rng(0)
    for split, n in (("train", 4), ("test", 2)):
        for c, cls in enumerate(("cat", "dog")):
            d = root / split / cls
            for i in range(n):
                v = 10 * (c * 10 + i) + (0 if split == "train" else 5)
                write_image(d / f"rgb_{i}.png", constant_image(v, (12 + i, 10)))
            write_image(d / "gray.png", rng.integers(0, 256, (9, 11), dtype=np.uint8))
            rgba = rng.integers(0, 256, (10, 10, 4), dtype=np.uint8)
            write_image(d / "alpha.png", rgba)
            write_image(d / "photo.jpg", rng.integers(0, 256, (16, 20, 3), dtype=np.uint8),
                        "JPEG")
            (d / "notes.txt").write_text("not an image")
    return root


def write_coloured_shards(folder: Path, n: int = 48, shard_size: int = 7) -> str:
    """``n`` constant-colour PNGs (red = 5 x their number, class = number % 3) written by
    ``iwm shards`` in shards of ``shard_size`` (the last one shorter); their pattern."""
    from iwm.data.tarshards import write_shards

    for i in range(n):
        write_image(folder / "images" / f"class{i % 3}" / f"{i:03d}.png",
                    np.full((10 + i % 4, 12, 3), (5 * i, 0, 0), np.uint8))
    write_shards(folder / "images", folder / "shards", shard_size, holdout=0)
    return f"{folder / 'shards' / 'train'}/shard-*.tar"


@pytest.fixture
def coloured_shards(tmp_path: Path) -> str:
    """The pattern of :func:`write_coloured_shards`'s 48 images in 7 shards."""
    return write_coloured_shards(tmp_path)
