"""Tar shards of images in the WebDataset layout: written by ``iwm shards``
(:func:`write_shards`), opened by ``data.name=shards:<pattern>`` (:func:`open_shards`) and
streamed by :class:`iwm.data.sources.ShardBatchSource`.

A shard is an uncompressed tar whose members are grouped into samples by key (the member
name up to the first dot of its file name): ``KEY.jpg`` (or any image extension Pillow
reads) and optionally ``KEY.cls``, the label's index as text. Next to the shards lies
``index.json``: the samples and bytes of every shard, the class names and the images'
statistics, so that a run knows its epoch length without reading the shards.

Read with :mod:`tarfile` rather than the ``webdataset`` package: what a run needs beyond
reading members in order (exact-sample resume, equal sample counts per process) is not
something that package does, and skipping unneeded members by seeking is tarfile's own.
"""

from __future__ import annotations

import glob
import io
import json
import os
import re
import tarfile
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from iwm.data.datasets import (
    DEFAULT_HOLDOUT,
    SHARDS_PREFIX,
    FolderSet,
    image_extensions,
    open_image_folder,
)
from iwm.errors import DataError

INDEX_FILE = "index.json"
INDEX_FORMAT = "iwm-shards"
INDEX_VERSION = 1
DEFAULT_SHARD_SIZE = 1000
"""Samples per shard ``iwm shards`` writes (about 100 MB of ImageNet-sized JPEGs)."""
LABEL_EXT = "cls"
READ_BUFFER = 1 << 20
"""Bytes per read: large, sequential reads are what shared file systems serve well."""

_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")
_WRITER_SPLITS = ("train", "test")


def expand_braces(pattern: str) -> list[str]:
    """``a{1..3}b`` -> a1b a2b a3b (zero-padded as written: ``{000..127}``) and ``{x,y}``
    -> x y, nested and repeated, in order; a pattern without braces is itself."""
    start = pattern.find("{")
    if start < 0:
        return [pattern]
    depth = 0
    for end in range(start, len(pattern)):
        depth += {"{": 1, "}": -1}.get(pattern[end], 0)
        if depth == 0:
            break
    else:
        raise DataError(f"{SHARDS_PREFIX}{pattern}: unbalanced '{{' in the pattern")
    inner, head, tail = pattern[start + 1:end], pattern[:start], pattern[end + 1:]
    match = _RANGE.match(inner)
    if match:
        lo, hi = int(match[1]), int(match[2])
        width = len(match[1]) if match[1].startswith("0") else 0
        step = 1 if hi >= lo else -1
        choices = [str(i).zfill(width) for i in range(lo, hi + step, step)]
    else:
        choices, depth, piece = [], 0, ""
        for ch in inner:  # split on the commas of this level only
            depth += {"{": 1, "}": -1}.get(ch, 0)
            if ch == "," and depth == 0:
                choices.append(piece)
                piece = ""
            else:
                piece += ch
        choices.append(piece)
    return [x for c in choices for x in expand_braces(head + c + tail)]


def shard_paths(pattern: str) -> list[Path]:
    """The .tar files of a brace and/or glob pattern, in the pattern's order (a glob's
    matches sorted); DataError if it names none, or names a missing file."""
    paths: list[Path] = []
    for piece in expand_braces(os.path.expanduser(pattern)):
        if glob.has_magic(piece):
            paths += [Path(p) for p in sorted(glob.glob(piece)) if os.path.isfile(p)]
        elif os.path.isfile(piece):
            paths.append(Path(piece))
        else:
            raise DataError(f"{SHARDS_PREFIX}{pattern}: {piece} does not exist; fix the "
                            "pattern (e.g. shards:/data/train/shard-{000000..000127}.tar)")
    if not paths:
        raise DataError(f"{SHARDS_PREFIX}{pattern}: the pattern matches no files; fix it "
                        "(e.g. shards:/data/train/shard-*.tar)")
    return list(dict.fromkeys(paths))  # a shard named twice is still read once


@dataclass
class ShardSet:
    """Tar shards and what their index says about them."""

    paths: list[Path]
    counts: list[int]
    """Samples used of each shard: all of them, or fewer under ``data.limit``."""
    classes: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    name: str = ""
    split: str = "train"
    offsets: list[int] = field(init=False, repr=False)
    """A sample's id is ``offsets[shard] + its ordinal in the shard``."""

    def __post_init__(self) -> None:
        self.offsets = np.concatenate([[0], np.cumsum(self.counts)[:-1]]).astype(int).tolist()

    def __len__(self) -> int:
        return sum(self.counts)

    @property
    def channels(self) -> int:
        return 3

    def subset(self, limit: int | None) -> ShardSet:
        """The first ``limit`` samples in shard order (all if None): whole shards, so that
        a quick experiment reads few files."""
        if limit is None or limit >= len(self):
            return self
        if limit < 1:
            raise DataError(f"{self.name}: limit={limit} must be at least 1")
        counts, left = [], limit
        for c in self.counts:
            if left == 0:
                break
            counts.append(min(c, left))
            left -= counts[-1]
        return ShardSet(self.paths[:len(counts)], counts, self.classes, self.mean, self.std,
                        self.name, self.split)


def _read_index(folder: Path) -> dict[str, Any]:
    path = folder / INDEX_FILE
    try:
        index = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{folder}: no {INDEX_FILE} beside the shards (it holds their sample "
                        "counts); write the shards with `iwm shards FOLDER OUT`") from None
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: unreadable shard index ({e}); write the shards again "
                        "with `iwm shards FOLDER OUT`") from None
    if not isinstance(index, dict) or index.get("format") != INDEX_FORMAT:
        raise DataError(f"{path}: not an iwm shard index; write the shards with "
                        "`iwm shards FOLDER OUT`")
    if index.get("version") != INDEX_VERSION:
        raise DataError(f"{path}: shard index version {index.get('version')}, this iwm "
                        f"reads {INDEX_VERSION}; write the shards again with `iwm shards`")
    return index


def open_shards(pattern: str) -> ShardSet:
    """The shards of ``pattern`` (see :func:`shard_paths`) with their indexes. DataError
    for a pattern without files, a shard its folder's index does not list, or one whose
    size is not the index's (changed or cut short since it was written)."""
    name = f"{SHARDS_PREFIX}{pattern}"
    paths = shard_paths(pattern)
    indexes: dict[Path, dict[str, Any]] = {}
    counts = []
    for path in paths:
        folder = path.parent
        if folder not in indexes:
            index = indexes[folder] = _read_index(folder)
            index["by_file"] = {s["file"]: s for s in index["shards"]}
        entry = indexes[folder]["by_file"].get(path.name)
        if entry is None:
            raise DataError(f"{path}: not in {folder / INDEX_FILE}; write the shards again "
                            "with `iwm shards FOLDER OUT`, or leave it out of the pattern")
        size = path.stat().st_size
        if size != entry["bytes"]:
            raise DataError(f"{path}: {size} bytes, but {INDEX_FILE} says {entry['bytes']}: "
                            "the shard changed or was cut short; write the shards again")
        counts.append(int(entry["samples"]))
    first = next(iter(indexes.values()))
    for folder, index in indexes.items():
        if index["classes"] != first["classes"]:
            raise DataError(f"{name}: {folder} has other classes than {paths[0].parent}; "
                            "match only shards written from one image folder")
    # Several folders are one data set (checked above); its statistics are the first's.
    return ShardSet(paths, counts, list(first["classes"]), tuple(first["mean"]),
                    tuple(first["std"]), name, str(first.get("split", "train")))


def _key_ext(member: str) -> tuple[str, str]:
    folder, _, base = member.rpartition("/")
    key, _, ext = base.partition(".")
    return (f"{folder}/{key}" if folder else key), ext.lower()


def iter_samples(path: Path, stop: int, wanted: Callable[[int], bool]
                 ) -> Iterator[tuple[int, str, bytes, int]]:
    """The samples of shard ``path`` before ordinal ``stop``, for which ``wanted(ordinal)``:
    (ordinal, image member name, image bytes, label or -1). The members of other samples
    are skipped by seeking, not read. DataError for a corrupt tar, one without images, or
    one with fewer samples than ``stop``."""
    exts = image_extensions()
    ordinal = 0
    try:
        with open(path, "rb", buffering=READ_BUFFER) as f, \
                tarfile.open(fileobj=f, mode="r:") as tar:
            group: list[tarfile.TarInfo] = []
            key = None
            members = iter(tar)
            while ordinal < stop:
                info = next(members, None)
                this = _key_ext(info.name)[0] if info is not None else None
                if group and this != key:
                    # A complete sample; a group without an image is no sample.
                    image = next((m for m in group if f".{_key_ext(m.name)[1]}" in exts), None)
                    if image is not None:
                        if wanted(ordinal):
                            yield ordinal, image.name, _read(tar, image), _label(tar, group)
                        ordinal += 1
                    group = []
                if info is None:
                    break
                key = this
                if info.isfile():
                    group.append(info)
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DataError(f"{path}: corrupt tar shard ({type(e).__name__}: {e}); write it "
                        "again with `iwm shards`, or leave it out of the pattern") from None
    if ordinal == 0 and stop > 0:
        raise DataError(f"{path}: no images in the shard (expected KEY.jpg, KEY.png or "
                        "KEY.webp members); leave it out of the pattern")
    if ordinal < stop:
        raise DataError(f"{path}: {ordinal} samples, but {INDEX_FILE} says at least {stop}; "
                        "write the shards again with `iwm shards`")


def _read(tar: tarfile.TarFile, info: tarfile.TarInfo) -> bytes:
    f = tar.extractfile(info)
    assert f is not None  # regular files only are grouped
    return f.read()


def _label(tar: tarfile.TarFile, group: list[tarfile.TarInfo]) -> int:
    member = next((m for m in group if _key_ext(m.name)[1] == LABEL_EXT), None)
    if member is None:
        return -1
    text = _read(tar, member).decode("utf-8", "replace").strip()
    if not text.lstrip("-").isdigit():
        raise tarfile.TarError(f"{member.name} holds {text[:20]!r}, not a class index")
    return int(text)


# ---------------------------------------------------------------- writing


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    # Fixed metadata, so that the same folder gives byte-identical shards.
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o644, 0
    tar.addfile(info, io.BytesIO(data))


def _size_stats(sizes: list[tuple[int, int]]) -> dict[str, list[float]]:
    hw = np.array(sizes, dtype=np.float64).reshape(-1, 2)
    if not len(hw):
        return {}
    return {"min": hw.min(0).tolist(), "max": hw.max(0).tolist(),
            "mean": hw.mean(0).round(1).tolist()}


def _write_split(folder: FolderSet, out: Path, shard_size: int, seed: int) -> int:
    from PIL import Image

    out.mkdir(parents=True, exist_ok=True)
    # Shuffled once here: a folder lists its images class by class, and a shuffle buffer
    # cannot mix classes that lie shards apart.
    order = np.random.default_rng(seed).permutation(len(folder)).tolist()
    shards, sizes, unreadable = [], [], []
    for start in range(0, len(order), shard_size):
        name = f"shard-{start // shard_size:06d}.tar"
        with tarfile.open(out / name, "w", format=tarfile.USTAR_FORMAT) as tar:
            for ordinal in order[start:start + shard_size]:
                path, label = folder.samples[ordinal]
                key, suffix = f"{ordinal:08d}", Path(path).suffix.lower().lstrip(".")
                data = Path(path).read_bytes()
                # Copied as they are: decoding is the reader's, and corrupt files are
                # replaced there as they are in a folder.
                _add(tar, f"{key}.{suffix}", data)
                _add(tar, f"{key}.{LABEL_EXT}", str(label).encode())
                try:
                    with Image.open(io.BytesIO(data)) as im:
                        sizes.append((im.height, im.width))
                except Exception:  # noqa: BLE001 - Pillow raises many types for bad files
                    unreadable.append(path)
        shards.append({"file": name, "samples": len(order[start:start + shard_size]),
                       "bytes": (out / name).stat().st_size})
    if unreadable:
        warnings.warn(f"{folder.name} ({folder.split}): {len(unreadable)} files Pillow cannot "
                      f"open copied as they are (e.g. {unreadable[0]}); training replaces "
                      "them by readable neighbours", stacklevel=3)
    index = {
        "format": INDEX_FORMAT, "version": INDEX_VERSION, "source": str(folder.root),
        "split": folder.split, "samples": len(folder), "classes": folder.classes,
        "channels": folder.channels, "mean": list(folder.mean), "std": list(folder.std),
        "image_size": _size_stats(sizes), "shards": shards,
    }
    # Last, so that an interrupted writer leaves shards a reader refuses.
    tmp = out / f".{INDEX_FILE}.tmp"
    tmp.write_text(json.dumps(index, indent=1) + "\n")
    tmp.replace(out / INDEX_FILE)
    return len(folder)


def write_shards(source: str | os.PathLike[str], out: str | os.PathLike[str],
                 shard_size: int = DEFAULT_SHARD_SIZE, holdout: float = DEFAULT_HOLDOUT,
                 seed: int = 0) -> dict[str, int]:
    """Write image folder ``source``'s splits as it is read for training
    (``imagefolder:<source>`` with ``data.holdout=holdout``) to ``out/<split>/shard-*.tar``
    with an ``index.json`` each; returns the samples of each split written."""
    if shard_size < 1:
        raise DataError(f"--shard-size {shard_size}: must be at least 1")
    out = Path(out).expanduser()
    written = {}
    for split in _WRITER_SPLITS:
        try:
            folder = open_image_folder(source, split, holdout)
        except DataError:
            if split == "train":
                raise
            continue  # no test split in this folder (or data.holdout=0)
        target = out / split
        if target.exists() and any(target.iterdir()):
            raise DataError(f"{target} is not empty; write the shards to a new folder")
        written[split] = _write_split(folder, target, shard_size, seed)
    return written
