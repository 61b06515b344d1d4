"""Data sets by registry name.

Small data sets (Fashion-MNIST, MNIST, Animal-MNIST, Shapes, CIFAR-10/100, STL-10) are
held in memory as one uint8 tensor (:class:`ImageSet`) so the training loop can keep them
on the GPU and crop there; ``imagefolder:<path>`` is streamed from disk
(:class:`FolderSet`) and decoded by DataLoader workers.
"""

from __future__ import annotations

import difflib
import gzip
import hashlib
import io
import math
import os
import warnings
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from iwm.config import DataConfig
from iwm.data.fetch import data_root, find_animal_mnist, find_fashion_mnist, find_mnist
from iwm.data.shapes import SHAPES_CLASSES, SHAPES_SPLITS, load_shapes
from iwm.errors import DataError

ANIMAL_MNIST_CLASSES = [
    # Label order of the package (checked by viewing samples of each label).
    "bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra",
]
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]

# Per-channel statistics of the *training* split, so that train and test images are
# normalised identically. Data sets not listed get statistics computed from the images.
_KNOWN_STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "fashion-mnist": ((0.2860,), (0.3530,)),
    "mnist": ((0.1307,), (0.3081,)),
    "animal-mnist": ((0.2720,), (0.4053,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}

FOLDER_PREFIX = "imagefolder:"
SHARDS_PREFIX = "shards:"
"""Tar shards (:mod:`iwm.data.tarshards`): streamed for pretraining only."""
SPLIT_FOLDERS = ("train", "val", "valid", "validation", "test")
# Which sub-folders may stand in for a requested split (ImageNet-style trees have "val").
_SPLIT_ALIASES = {
    "train": ("train",),
    "test": ("test", "val", "valid", "validation"),
    "val": ("val", "valid", "validation", "test"),
}
STATS_SAMPLE = 256
"""Images a :class:`FolderSet` decodes to estimate its mean and std."""
DEFAULT_HOLDOUT = DataConfig.holdout
"""``data.holdout``'s default, for callers without a config."""


@dataclass
class ImageSet:
    """A data set held in memory."""

    images: torch.Tensor
    """uint8 (N, C, H, W)."""
    labels: torch.Tensor
    """int64 (N,); -1 where unlabelled (STL-10's unlabeled split)."""
    classes: list[str]
    mean: tuple[float, ...]
    """Per-channel mean of pixel values scaled to [0, 1]."""
    std: tuple[float, ...]
    name: str = ""
    split: str = ""

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise DataError(
                f"{self.name}: images must be uint8 (N, C, H, W), got "
                f"{self.images.dtype} {tuple(self.images.shape)}"
            )
        if self.labels.shape != (self.images.shape[0],):
            raise DataError(
                f"{self.name}: {self.images.shape[0]} images but labels of shape "
                f"{tuple(self.labels.shape)}"
            )
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise DataError(f"{self.name}: mean/std need one value per channel")

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def channels(self) -> int:
        return self.images.shape[1]

    def subset(self, limit: int | None) -> ImageSet:
        """The first ``limit`` images (all if None); statistics are kept, not recomputed."""
        if limit is None or limit >= len(self):
            return self
        if limit < 1:
            raise DataError(f"{self.name}: limit={limit} must be at least 1")
        return ImageSet(self.images[:limit], self.labels[:limit], self.classes, self.mean,
                        self.std, self.name, self.split)


@dataclass
class FolderSet:
    """Images on disk in class sub-folders, decoded on demand (to RGB)."""

    root: Path
    """The folder of this split (e.g. ``<path>/train``)."""
    samples: list[tuple[str, int]]
    """(file path, label) in a fixed (sorted) order."""
    classes: list[str]
    name: str = ""
    split: str = ""
    _stats: tuple[tuple[float, ...], tuple[float, ...]] | None = field(
        default=None, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def channels(self) -> int:
        return 3

    @property
    def labels(self) -> torch.Tensor:
        return torch.tensor([label for _, label in self.samples], dtype=torch.long)

    def load(self, index: int) -> torch.Tensor:
        """Decode image ``index`` as uint8 (3, H, W); DataError if it cannot be read."""
        return load_image(self.samples[index][0])

    def subset(self, limit: int | None) -> FolderSet:
        """``limit`` images spread evenly over the folder (the list is sorted by class, so
        "the first N" would be one or two classes only)."""
        if limit is None or limit >= len(self):
            return self
        if limit < 1:
            raise DataError(f"{self.name}: limit={limit} must be at least 1")
        idx = torch.linspace(0, len(self) - 1, limit).round().long().tolist()
        return FolderSet(self.root, [self.samples[i] for i in idx], self.classes, self.name,
                         self.split)

    @property
    def mean(self) -> tuple[float, ...]:
        return self._estimate_stats()[0]

    @property
    def std(self) -> tuple[float, ...]:
        return self._estimate_stats()[1]

    def _estimate_stats(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        # Lazily, because decoding even a sample of a large folder costs seconds and most
        # callers never need it.
        if self._stats is None:
            n = min(len(self), STATS_SAMPLE)
            idx = torch.linspace(0, len(self) - 1, n).round().long().tolist()
            total = torch.zeros(3, dtype=torch.float64)
            total_sq = torch.zeros(3, dtype=torch.float64)
            count = 0
            first_error = ""
            for i in idx:
                try:
                    img = load_image(self.samples[i][0], max_side=64).to(torch.float64) / 255
                except DataError as e:
                    first_error = first_error or str(e)
                    continue
                total += img.sum(dim=(1, 2))
                total_sq += img.square().sum(dim=(1, 2))
                count += img.shape[1] * img.shape[2]
            if count == 0:
                raise DataError(f"{self.name or self.root}: none of {n} sampled images "
                                f"could be read (e.g. {first_error}): is this an image folder?")
            mean = total / count
            std = (total_sq / count - mean.square()).clamp_min(1e-12).sqrt()
            self._stats = (tuple(mean.tolist()), tuple(std.tolist()))
        return self._stats


_16BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def _to_rgb(im: Any) -> Any:
    """A Pillow image of any mode as RGB.

    Grayscale, palette, CMYK, LA/RGBA (alpha dropped) and 1-bit images convert with
    Pillow's own rules. 16-bit grayscale (``I;16``; ``I`` on some Pillow versions) would be
    clipped at 255 by Pillow, turning nearly every pixel white, so its 0..65535 range is
    scaled down to 8 bits here instead. (16-bit RGB PNGs already decode as 8-bit RGB.)
    """
    from PIL import Image

    if im.mode in _16BIT_MODES:
        wide = np.asarray(im).astype(np.int64)
        im = Image.fromarray((np.clip(wide, 0, 65535) >> 8).astype(np.uint8), "L")
    elif im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")  # the direct P -> RGB conversion warns about transparency
    return im.convert("RGB")


_JPEG_MAGIC = b"\xff\xd8\xff"


def _decode_jpeg(path: str | os.PathLike[str], data: bytes | None = None
                 ) -> torch.Tensor | None:
    """A JPEG through ``torchvision.io`` (libjpeg-turbo straight into a tensor: about 2x
    Pillow's path here, which matters in the decoding workers of a large folder); None
    for other formats and for anything it cannot decode cleanly, which Pillow then
    decides (converts, or reports as a :class:`DataError`)."""
    try:
        from torchvision.io import ImageReadMode, decode_jpeg
    except ImportError:  # torchvision announces it will drop its image decoders
        return None
    if data is None:
        try:
            with open(path, "rb") as f:
                # The magic first: other formats are read once, by Pillow, not twice.
                data = f.read(len(_JPEG_MAGIC))
                if data != _JPEG_MAGIC:
                    return None
                data += f.read()
        except OSError:
            return None
    elif not data.startswith(_JPEG_MAGIC):
        return None
    try:
        with warnings.catch_warnings():
            # libjpeg's "premature end of data" is a warning; a cut file must fail instead.
            warnings.simplefilter("error")
            warnings.filterwarnings("ignore", message="The image decoding and encoding")
            image = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8),
                                mode=ImageReadMode.RGB)
    except Exception:  # noqa: BLE001 - Pillow gives the user-facing verdict
        return None
    assert isinstance(image, torch.Tensor)  # a list comes back only for a list of inputs
    return image if image.dtype == torch.uint8 and image.shape[0] == 3 else None


def load_image(path: str | os.PathLike[str], max_side: int | None = None,
               data: bytes | None = None) -> torch.Tensor:
    """Decode any Pillow-readable image as uint8 RGB (3, H, W) (see :func:`_to_rgb` for the
    modes); a :class:`DataError` for truncated, corrupt or non-image files. ``max_side``
    lets JPEG decode at reduced size (much faster) for statistics. ``data`` is the file's
    content where it was read already (a tar shard's member); ``path`` then only names it."""
    from PIL import Image

    if max_side is None:
        fast = _decode_jpeg(path, data)
        if fast is not None:
            return fast

    try:
        with Image.open(path if data is None else io.BytesIO(data)) as im:
            if max_side is not None:
                im.draft("RGB", (max_side, max_side))
            rgb = _to_rgb(im)
        if max_side is not None and max(rgb.size) > max_side:
            rgb.thumbnail((max_side, max_side))
        array = np.array(rgb, dtype=np.uint8)
    except Exception as e:  # noqa: BLE001 - Pillow raises many types for bad files
        raise DataError(f"{path}: cannot read image ({type(e).__name__}: {e})") from None
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


# ---------------------------------------------------------------- IDX files


_IDX_CODES: dict[int, np.dtype[Any]] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_idx(path: str | os.PathLike[str]) -> torch.Tensor:
    """Read an IDX file (the MNIST format), gzip-compressed or raw; DataError if corrupt."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e})") from None
    if data[:2] == b"\x1f\x8b":  # gzip magic, whatever the file is called
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as e:
            raise DataError(
                f"{path}: corrupt gzip data ({e}); delete the file so it is fetched again"
            ) from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_CODES:
        raise DataError(f"{path}: not an IDX file (bad magic number {data[:4].hex()})")
    ndim = data[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(data) < header:
        raise DataError(f"{path}: corrupt IDX header ({ndim} dimensions)")
    shape = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    dtype = _IDX_CODES[data[2]]
    expected = math.prod(shape) * dtype.itemsize
    if len(data) - header != expected:
        raise DataError(
            f"{path}: IDX header says shape {shape} ({expected} bytes) but the file holds "
            f"{len(data) - header} bytes: truncated or corrupt; delete it so it is fetched again"
        )
    array = np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)
    # A native-order, writable copy: torch cannot share big-endian or read-only memory.
    return torch.from_numpy(array.astype(dtype.newbyteorder("="), copy=True))


# ---------------------------------------------------------------- registry


def _channel_stats(images: torch.Tensor, max_images: int = 10_000
                   ) -> tuple[tuple[float, ...], tuple[float, ...]]:
    step = max(1, len(images) // max_images)
    sample = images[::step]
    c = sample.shape[1]
    total = torch.zeros(c, dtype=torch.float64)
    total_sq = torch.zeros(c, dtype=torch.float64)
    for chunk in sample.split(1000):
        x = chunk.to(torch.float64).div_(255)
        total += x.sum(dim=(0, 2, 3))
        total_sq += x.square().sum(dim=(0, 2, 3))
    count = sample.shape[0] * sample.shape[2] * sample.shape[3]
    mean = total / count
    std = (total_sq / count - mean.square()).clamp_min(1e-12).sqrt()
    return tuple(mean.tolist()), tuple(std.tolist())


def _make_set(name: str, split: str, images: torch.Tensor, labels: torch.Tensor,
              classes: list[str]) -> ImageSet:
    mean, std = _KNOWN_STATS.get(name) or _channel_stats(images)
    return ImageSet(images, labels.long(), classes, mean, std, name, split)


def _load_idx_family(name: str, split: str, root: str | None, download: bool) -> ImageSet:
    if name == "fashion-mnist":
        files, classes = find_fashion_mnist(root, download), FASHION_MNIST_CLASSES
    elif name == "animal-mnist":
        files, classes = find_animal_mnist(root, download), ANIMAL_MNIST_CLASSES
    else:
        files, classes = find_mnist(root, download), [str(d) for d in range(10)]
    prefix = "train" if split == "train" else "t10k"
    images_path = files[f"{prefix}-images-idx3-ubyte"]
    labels_path = files[f"{prefix}-labels-idx1-ubyte"]
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.dtype != torch.uint8 or images.dim() != 3:
        raise DataError(f"{images_path}: expected uint8 images (N, H, W), got "
                        f"{images.dtype} {tuple(images.shape)}")
    if labels.dim() != 1 or len(labels) != len(images):
        raise DataError(f"{labels_path}: {tuple(labels.shape)} labels for {len(images)} images")
    if len(labels) and int(labels.max()) >= len(classes):
        raise DataError(f"{labels_path}: label {int(labels.max())} out of range")
    if name == "animal-mnist":
        # The package stores its images class by class, so a limit (the probes' and
        # finetuning's first N) would keep only the first classes.
        order = class_interleaved(labels.long(), len(classes))
        images, labels = images[order], labels[order]
    return _make_set(name, split, images.unsqueeze(1), labels, classes)


def class_interleaved(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """The order that takes each class's images in turn (its k-th image after every class's
    (k-1)-th, classes in label order), keeping each class's own order: every prefix of a
    balanced set is then balanced to within one image per class."""
    onehot = torch.nn.functional.one_hot(labels, num_classes)
    rank = (onehot.cumsum(0) * onehot).sum(1) - 1  # position within its own class
    return torch.argsort(rank * num_classes + labels, stable=True)


_TORCHVISION = {
    "cifar10": ("CIFAR10", "cifar-10-batches-py"),
    "cifar100": ("CIFAR100", "cifar-100-python"),
    "stl10": ("STL10", "stl10_binary"),
}


def _load_torchvision(name: str, split: str, root: str | None, download: bool) -> ImageSet:
    import torchvision

    store = data_root(root)
    cls_name, folder = _TORCHVISION[name]
    cls = getattr(torchvision.datasets, cls_name)
    try:
        if name == "stl10":
            ds = cls(str(store), split=split, download=download)
            images = torch.from_numpy(np.ascontiguousarray(ds.data))
            labels = torch.from_numpy(np.asarray(ds.labels, dtype=np.int64))
        else:
            ds = cls(str(store), train=split == "train", download=download)
            # (N, H, W, C) -> (N, C, H, W), contiguous so crops read memory in order.
            images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
            labels = torch.tensor(ds.targets, dtype=torch.long)
    except Exception as e:  # noqa: BLE001 - torchvision raises RuntimeError, URLError, ...
        how = "download failed" if download else "download=False"
        msg = " ".join(str(e).split())[:300]
        raise DataError(
            f"{name}: not found in {store / folder} and {how} ({msg}). Fix: put torchvision's "
            f"{name} files in {store / folder} (set data.root or IWM_DATA to their parent), "
            f"or go online so they can be downloaded."
        ) from None
    return _make_set(name, split, images, labels, list(ds.classes))


def _load_shapes(name: str, split: str, root: str | None, download: bool) -> ImageSet:
    del download  # built here, never downloaded
    splits = load_shapes(data_root(root))
    # The train split's statistics for both splits, as for the sets with known ones.
    mean, std = _channel_stats(splits["train"][0])
    images, labels = splits[split]
    return ImageSet(images, labels, list(SHAPES_CLASSES), mean, std, name, split)


_SPLITS = {
    "shapes": tuple(SHAPES_SPLITS),
    "fashion-mnist": ("train", "test"),
    "mnist": ("train", "test"),
    "animal-mnist": ("train", "test"),
    "cifar10": ("train", "test"),
    "cifar100": ("train", "test"),
    "stl10": ("train", "test", "unlabeled", "train+unlabeled"),
}
_LOADERS: dict[str, Callable[[str, str, str | None, bool], ImageSet]] = {
    "fashion-mnist": _load_idx_family,
    "shapes": _load_shapes,
    "mnist": _load_idx_family,
    "animal-mnist": _load_idx_family,
    "cifar10": _load_torchvision,
    "cifar100": _load_torchvision,
    "stl10": _load_torchvision,
}


def dataset_names() -> list[str]:
    """Registered names (``imagefolder:<path>`` stands for any folder, ``shards:<pattern>``
    for tar shards)."""
    return [*_LOADERS, f"{FOLDER_PREFIX}<path>", f"{SHARDS_PREFIX}<pattern>"]


def get_dataset(name: str, split: str, root: str | None = None, download: bool = True,
                holdout: float = DEFAULT_HOLDOUT) -> ImageSet | FolderSet:
    """Load data set ``name`` (see :func:`dataset_names`), split ``train`` or ``test``
    (STL-10 also ``unlabeled``, ``train+unlabeled``). ``holdout`` (``data.holdout``) is the
    test fraction of an image folder without split sub-folders; other sets ignore it."""
    key = name.strip()
    if key.lower().startswith(FOLDER_PREFIX):
        return open_image_folder(key[len(FOLDER_PREFIX):], split, holdout)
    if key.lower().startswith(SHARDS_PREFIX):
        # Evaluations index images at random, which is what shards are made to avoid.
        raise DataError(f"{name}: tar shards are streamed for pretraining only; evaluate on "
                        "the image folder they were written from (data.name=imagefolder:...)")
    key = key.lower()
    if key not in _LOADERS:
        close = difflib.get_close_matches(key, list(_LOADERS), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise DataError(
            f"unknown data set '{name}'{hint}; registered: {', '.join(dataset_names())}"
        )
    if split not in _SPLITS[key]:
        raise DataError(f"{key}: unknown split '{split}'; splits: {', '.join(_SPLITS[key])}")
    return _LOADERS[key](key, split, root, download)


def require_labels(dataset: ImageSet | FolderSet, what: str) -> None:
    """DataError unless ``dataset`` has at least two classes to tell apart; ``what`` names
    the evaluation that needs them (a one-class image folder trains and has an MRR, but
    gives a probe nothing to learn)."""
    if len(dataset.classes) < 2:
        if isinstance(dataset, FolderSet) and dataset.samples and \
                Path(dataset.samples[0][0]).parent == dataset.root:
            raise DataError(f"{what} needs labelled images: {dataset.name} has no class "
                            "sub-folders; put its images in <class>/ sub-folders (at least "
                            "two; the folder names are the labels)")
        raise DataError(f"{what} needs labelled images: {dataset.name} has a single class "
                        f"({', '.join(dataset.classes)}); put its images in <class>/ "
                        "sub-folders (at least two; the folder names are the labels)")


# ---------------------------------------------------------------- image folders


def image_extensions() -> frozenset[str]:
    from PIL import Image

    # Everything the installed Pillow can decode (png, jpg, webp, bmp, tiff, gif, ...).
    return frozenset(ext.lower() for ext in Image.registered_extensions())


def _visible_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def image_files(folder: Path, recursive: bool, exts: frozenset[str],
                 others: list[Path] | None = None) -> list[Path]:
    """Image files under ``folder`` by extension, sorted; visible non-image files are
    appended to ``others`` if given (hidden files such as .DS_Store are never counted)."""
    if recursive:
        files = []
        for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            files += [Path(dirpath) / f for f in filenames]
    else:
        files = [p for p in folder.iterdir() if p.is_file()]
    visible = [p for p in files if not p.name.startswith(".")]
    if others is not None:
        others += [p for p in visible if p.suffix.lower() not in exts]
    return sorted(p for p in visible if p.suffix.lower() in exts)


def _resolve_split(base: Path, split: str) -> tuple[Path, list[Path], str | None]:
    """The folder of ``split``, all split folders of ``base`` (for class names) and, for a
    folder without split sub-folders, the side of its held-out slice that ``split`` is
    ("train" or "test"; None where the split has a folder of its own)."""
    split_dirs = [base / s for s in SPLIT_FOLDERS if (base / s).is_dir()]
    for candidate in _SPLIT_ALIASES.get(split, (split,)):
        if (base / candidate).is_dir():
            return base / candidate, split_dirs or [base / candidate], None
    if not split_dirs and split in SPLIT_FOLDERS:
        return base, [base], "train" if split == "train" else "test"
    if not split_dirs:
        raise DataError(f"{base}: unknown split '{split}' of a folder without split "
                        f"sub-folders; splits: {', '.join(SPLIT_FOLDERS)}")
    have = ", ".join(d.name for d in split_dirs)
    raise DataError(
        f"{base}: no '{split}' sub-folder (split folders found: {have}); add "
        f"{base / split}/<class>/ images, as in the other split folders"
    )


def _path_hash(relative: str) -> float:
    """A path's place in [0, 1): fixed by the path alone, so a file keeps its split when
    others are added or removed, on every machine and Python (unlike ``hash``)."""
    digest = hashlib.blake2b(relative.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def held_out(samples: list[tuple[str, int]], base: Path, holdout: float,
             name: str) -> set[str]:
    """The files of ``samples`` (all under ``base``) in the held-out (test) slice: those
    whose :func:`_path_hash` of the path relative to ``base`` is below ``holdout``, but at
    least one and never all (the ones of lowest hash), so a tiny folder still has both
    splits. DataError for a folder of fewer than 2 images."""
    if len(samples) < 2:
        raise DataError(f"{name}: only {len(samples)} image, but a train split and a "
                        "held-out test slice need 2; add images, or set data.holdout=0 to "
                        "train on it with no test split")
    ranked = sorted((_path_hash(Path(p).relative_to(base).as_posix()), p) for p, _ in samples)
    below = sum(h < holdout for h, _ in ranked)
    return {p for _, p in ranked[:min(max(below, 1), len(ranked) - 1)]}


def open_image_folder(path: str | os.PathLike[str], split: str = "train",
                      holdout: float = DEFAULT_HOLDOUT) -> FolderSet:
    """Index an image folder: ``<path>/<split>/<class>/**/<image>`` or, without split
    folders, ``<path>/<class>/...``, whose ``holdout`` fraction (:func:`held_out`) is the
    test split (also ``val``, ``valid``, ``validation``) and the rest the train split. A
    folder of images with no class sub-folders is one class."""
    base = Path(path).expanduser()
    name = f"{FOLDER_PREFIX}{path}"
    if not base.is_dir():
        raise DataError(f"{name}: {base} is not a folder")
    folder, split_dirs, side = _resolve_split(base, split)
    if side == "test" and holdout == 0:
        raise DataError(f"{name}: no test split (data.holdout=0 and no test/ or val/ "
                        "sub-folder); set data.holdout=0.1 to hold out a slice of it")
    # Class names from every split folder, so that a class missing from one split does
    # not shift the labels of the others.
    classes = sorted({d.name for s in split_dirs for d in _visible_dirs(s)})
    samples: list[tuple[str, int]] = []
    exts = image_extensions()
    others: list[Path] = []
    empty: list[str] = []
    if classes:
        for label, cls in enumerate(classes):
            if (folder / cls).is_dir():
                found = image_files(folder / cls, True, exts, others)
                samples += [(str(p), label) for p in found]
                if not found:
                    empty.append(cls)
    else:
        classes = [folder.name]
        samples = [(str(p), 0) for p in image_files(folder, False, exts, others)]
    if not samples:
        raise DataError(
            f"{name}: no images in {folder} (expected <class>/<image> files in a format "
            f"Pillow can read, e.g. .png, .jpg)"
        )
    if side is not None and holdout > 0:
        test = held_out(samples, base, holdout, name)
        samples = [s for s in samples if (s[0] in test) == (side == "test")]
    # Reported once, when the folder is indexed. An empty class keeps its label (so labels
    # agree between splits) but gets no samples; a non-image file is ignored.
    notes = []
    if empty:
        notes.append(f"{len(empty)} class folders without images ({', '.join(empty[:5])}) "
                     "keep their label but contribute nothing")
    if others:
        notes.append(f"{len(others)} files that are not images by their extension "
                     f"ignored (e.g. {others[0].name})")
    if notes:
        warnings.warn(f"{name} ({split}): " + "; ".join(notes), stacklevel=2)
    return FolderSet(folder, samples, classes, name, split)
