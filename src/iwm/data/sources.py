"""Batch sources for the training loop, with exact resume.

Both sources hand out ``(crops, labels)``: float (B, C, S, S) in [0, 1] on the training
device. All randomness is a pure function of ``(seed, epoch, position)``: the order of an
epoch comes from a generator seeded by ``(seed, epoch)``, and the crops of a batch (or of a
sample, for streamed data) from a generator seeded by its position. So a source's whole
state is ``(epoch, position)``; a resumed run draws exactly the batches the uninterrupted
run would have, on any device, however many batches the loader had prefetched.
"""

from __future__ import annotations

import hashlib
import os
import signal
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from iwm.config import DataConfig
from iwm.data.crops import center_resize, random_resized_crop, sample_crop_boxes
from iwm.data.datasets import FolderSet, ImageSet, get_dataset
from iwm.data.shard import SINGLE, Shard
from iwm.errors import CheckpointError, DataError

MAX_SUBSTITUTES = 16
"""Unreadable files in a row a streamed batch tolerates before giving up."""
MAX_WARNINGS = 20
"""Unreadable files reported one by one (evaluation); later ones are only counted."""
REPORT_EXAMPLES = 3
"""Unreadable files named in a training epoch's report."""


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from ``parts``, stable across Python versions and platforms (unlike
    ``hash()``), so derived streams are reproducible anywhere."""
    text = ":".join(str(p) for p in parts).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") >> 1


def epoch_permutation(num_items: int, seed: int, epoch: int) -> torch.Tensor:
    """The order of ``epoch`` (int64, on the CPU): the same on every device."""
    gen = torch.Generator().manual_seed(derive_seed("order", seed, epoch))
    return torch.randperm(num_items, generator=gen)


def _check_batch(num_items: int, batch_size: int, name: str, shard: Shard = SINGLE) -> int:
    if batch_size < 1:
        raise DataError(f"batch size {batch_size} must be at least 1")
    if batch_size % shard.count:
        raise DataError(f"batch size {batch_size} does not split into {shard.count} equal "
                        "parts (processes x gradient-accumulation steps): make "
                        "train.batch_size a multiple of it")
    if num_items < batch_size:
        raise DataError(
            f"{name}: {num_items} images are fewer than one batch of {batch_size}; lower "
            f"train.batch_size or raise data.limit"
        )
    return num_items // batch_size  # the last, incomplete batch is dropped


class _ResumableSource:
    """Epoch/position bookkeeping shared by both sources."""

    seed: int
    batch_size: int
    steps_per_epoch: int
    epoch: int
    position: int

    dataset: ImageSet | FolderSet
    skipped: int = 0
    """Unreadable images replaced so far by this source (always 0 in memory)."""

    def __len__(self) -> int:
        return self.steps_per_epoch

    @property
    def num_images(self) -> int:
        return len(self.dataset)

    @property
    def channels(self) -> int:
        return self.dataset.channels

    @property
    def mean(self) -> tuple[float, ...]:
        """Per-channel statistics of the data set, for normalising the crops."""
        return self.dataset.mean

    @property
    def std(self) -> tuple[float, ...]:
        return self.dataset.std

    @property
    def classes(self) -> list[str]:
        return self.dataset.classes

    @property
    def progress(self) -> float:
        """Epochs consumed, fractional."""
        return self.epoch + self.position / self.steps_per_epoch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.next()

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "num_images": self.num_images,
            "batch_size": self.batch_size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("num_images", "batch_size"):
            if int(state[key]) != getattr(self, key):
                raise CheckpointError(
                    f"the checkpoint's data source had {key}={int(state[key])}, this run has "
                    f"{getattr(self, key)}: resume with the same data set, data.limit and "
                    f"train.batch_size"
                )
        position = int(state["position"])
        if not 0 <= position <= self.steps_per_epoch:
            raise CheckpointError(f"data source position {position} is out of range")
        # The checkpoint's seed defines the stream being resumed.
        self.seed = int(state["seed"])
        self.epoch = int(state["epoch"])
        self.position = position
        self._restart()

    def _restart(self) -> None:
        """Drop anything derived from the old (epoch, position)."""

    def close(self) -> None:
        """Report what is pending and release resources; the source stays resumable."""


class TensorBatchSource(_ResumableSource):
    """In-memory data set kept on the training device; crops drawn there in one batch."""

    def __init__(
        self,
        images: ImageSet,
        batch_size: int,
        image_size: int,
        crop_scale: tuple[float, float] = (0.3, 1.0),
        crop_ratio: tuple[float, float] = (0.75, 4 / 3),
        hflip: bool = True,
        device: torch.device | str = "cpu",
        seed: int = 0,
        shard: Shard = SINGLE,
    ) -> None:
        self.dataset = images
        self.batch_size = batch_size
        """The global batch: this source returns ``shard``'s rows of it."""
        self.shard = shard
        self.steps_per_epoch = _check_batch(len(images), batch_size, images.name, shard)
        self.image_size = image_size
        self.crop_scale = crop_scale
        self.crop_ratio = crop_ratio
        self.hflip = hflip
        self.device = torch.device(device)
        self.seed = seed
        self.epoch = 0
        self.position = 0
        self._images = images.images.to(self.device)
        self._labels = images.labels.to(self.device)
        self._gen = torch.Generator(device=self.device)
        self._order: torch.Tensor | None = None

    def _restart(self) -> None:
        self._order = None

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.position >= self.steps_per_epoch:
            self.epoch += 1
            self.position = 0
            self._order = None
        if self._order is None:
            self._order = epoch_permutation(self.num_images, self.seed, self.epoch).to(self.device)
        start = self.position * self.batch_size
        idx = self._order[start:start + self.batch_size]
        idx = idx[self.shard.rows(self.batch_size // self.shard.count)]
        # Reseeding per batch (cheap) instead of carrying generator state is what makes the
        # state device-independent: a CUDA generator's state cannot be loaded on the CPU.
        self._gen.manual_seed(derive_seed("crop", self.seed, self.epoch, self.position))
        self.position += 1
        crops = random_resized_crop(
            self._images.index_select(0, idx), self.image_size, self.crop_scale,
            self.crop_ratio, self.hflip, self._gen, self.shard,
        )
        return crops, self._labels.index_select(0, idx)


# ---------------------------------------------------------------- streamed folders


class _CropDataset(Dataset):
    """Runs in DataLoader workers: decode one image, crop + flip it to uint8 (3, S, S)."""

    def __init__(self, folder: FolderSet, size: int, scale: tuple[float, float],
                 ratio: tuple[float, float], hflip: bool) -> None:
        self.folder = folder
        self.size = size
        self.scale = scale
        self.ratio = ratio
        self.hflip = hflip

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, key: tuple[int, int, int, int]
                    ) -> tuple[torch.Tensor | None, int, list[str]]:
        from torchvision.transforms.v2 import functional as TF

        # The seed travels with the key: persistent workers hold a copy of this object made
        # at start-up, so state changed later in the main process would not reach them.
        index, seed, epoch, slot = key
        gen = torch.Generator().manual_seed(derive_seed("sample", seed, epoch, slot))
        bad: list[str] = []
        # An unreadable file is replaced by the next one, so batches keep their size and the
        # run goes on; the substitute is deterministic, so resume stays exact.
        for attempt in range(MAX_SUBSTITUTES):
            i = (index + attempt) % len(self.folder)
            try:
                img = self.folder.load(i)
            except DataError as e:
                bad.append(str(e))
                continue
            top, left, h, w = sample_crop_boxes(
                1, img.shape[1], img.shape[2], self.scale, self.ratio, gen)[0].tolist()
            out = TF.resized_crop(img, top, left, h, w, [self.size, self.size], antialias=True)
            if self.hflip and torch.rand((), generator=gen) < 0.5:
                out = TF.horizontal_flip(out)
            return out, self.folder.samples[i][1], bad
        # No image: the main process raises. An exception raised here would reach the
        # user wrapped in the worker's traceback, not as a one-line DataError.
        return None, -1, bad


def _worker_ignores_stop_signals(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: SIGTERM, SIGUSR1, SIGUSR2 and SIGINT do not end a
    worker.

    A cluster preempting a job signals every process of it, workers included, and so does
    Ctrl-C in a terminal (the whole foreground process group); torch's workers die of
    SIGTERM and quit on SIGINT. But the training process answers either by finishing its
    step and writing a checkpoint (:mod:`iwm.training.signals`), for which it needs its
    workers. They still stop when the training process shuts them down, or exits (they
    watch it).
    """
    # SIGUSR2: submitit's time-limit signal, which a SLURM job turns into the same stop.
    for name in ("SIGTERM", "SIGUSR1", "SIGUSR2", "SIGINT"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_IGN)


def _collate(items: list[tuple[torch.Tensor | None, int, list[str]]]
             ) -> tuple[torch.Tensor | None, torch.Tensor, list[str]]:
    bad = [msg for it in items for msg in it[2]]
    if any(it[0] is None for it in items):
        return None, torch.empty(0, dtype=torch.long), bad
    images = torch.stack([it[0] for it in items])  # type: ignore[misc]
    labels = torch.tensor([it[1] for it in items], dtype=torch.long)
    return images, labels, bad


class _EpochBatches:
    """Batch sampler: the batches of ``epoch`` from batch ``start`` on, as keys
    (index, seed, epoch, slot). Iterated in the main process, so the source can move it."""

    def __init__(self, num_items: int, batch_size: int, seed: int, shard: Shard) -> None:
        self.num_items = num_items
        self.batch_size = batch_size
        self.seed = seed
        self.shard = shard
        self.epoch = 0
        self.start = 0

    def _steps(self) -> int:
        return self.num_items // self.batch_size

    def __len__(self) -> int:
        return self._steps() - self.start

    def __iter__(self) -> Iterator[list[tuple[int, int, int, int]]]:
        seed, epoch, b = self.seed, self.epoch, self.batch_size
        order = epoch_permutation(self.num_items, seed, epoch).tolist()
        # Crops are seeded by global slot, so a shard's rows match one process's exactly.
        rows = self.shard.rows(b // self.shard.count)
        for step in range(self.start, self._steps()):
            yield [(order[s], seed, epoch, s)
                   for s in range(step * b + rows.start, step * b + rows.stop)]


class StreamingBatchSource(_ResumableSource):
    """Image folder decoded by DataLoader workers; crops are made there at uint8 and turned
    into floats on the training device."""

    def __init__(
        self,
        folder: FolderSet,
        batch_size: int,
        image_size: int,
        crop_scale: tuple[float, float] = (0.3, 1.0),
        crop_ratio: tuple[float, float] = (0.75, 4 / 3),
        hflip: bool = True,
        device: torch.device | str = "cpu",
        seed: int = 0,
        num_workers: int = 4,
        shard: Shard = SINGLE,
    ) -> None:
        if len(folder) == 0:
            raise DataError(f"{folder.name or folder.root}: no images")
        self.dataset = folder
        self.batch_size = batch_size
        """The global batch: this source returns ``shard``'s rows of it."""
        self.steps_per_epoch = _check_batch(len(folder), batch_size, folder.name, shard)
        self.image_size = image_size
        self.device = torch.device(device)
        self.seed = seed
        self.epoch = 0
        self.position = 0
        self.skipped = 0
        """Unreadable files met so far (each replaced by a readable neighbour)."""
        self.bad_files: set[str] = set()
        """One message per distinct unreadable file, starting with its path."""
        self._epoch_bad: list[str] = []
        self._sampler = _EpochBatches(len(folder), batch_size, seed, shard)
        self._loader = DataLoader(
            _CropDataset(folder, image_size, crop_scale, crop_ratio, hflip),
            batch_sampler=self._sampler,
            num_workers=num_workers,
            collate_fn=_collate,
            pin_memory=self.device.type == "cuda",
            persistent_workers=num_workers > 0,
            worker_init_fn=_worker_ignores_stop_signals,
        )
        self._iter: Iterator[Any] | None = None

    def _restart(self) -> None:
        self._iter = None
        self._sampler.seed = self.seed
        self._epoch_bad = []

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.position >= self.steps_per_epoch:
            self.epoch += 1
            self.position = 0
            self._iter = None
        if self._iter is None:
            self._sampler.epoch = self.epoch
            self._sampler.start = self.position
            self._iter = iter(self._loader)
        images, labels, bad = next(self._iter)
        self.position += 1
        self.skipped += len(bad)
        self.bad_files.update(bad)
        self._epoch_bad += bad
        if images is None:
            raise DataError(
                f"{self.dataset.name}: {MAX_SUBSTITUTES} unreadable images in a row (e.g. "
                f"{bad[0]}); the data set is mostly unusable: fix or remove the bad files"
            )
        if self.position == self.steps_per_epoch:
            self._report_epoch()
        # Pinned host memory makes the copy asynchronous; the float conversion then runs
        # on the device, where it is cheap.
        images = images.to(self.device, non_blocking=True).float().div_(255)
        return images, labels.to(self.device, non_blocking=True)

    def _report_epoch(self) -> None:
        """One warning for the epoch's unreadable images, however many there were: a
        broken file is met again every epoch, and a line per meeting would bury the log."""
        if not self._epoch_bad:
            return
        distinct = sorted(set(self._epoch_bad))
        more = len(distinct) - REPORT_EXAMPLES
        examples = "; ".join(distinct[:REPORT_EXAMPLES]) + (f"; {more} more" if more > 0 else "")
        warnings.warn(
            f"{self.dataset.name}, epoch {self.epoch}: {len(distinct)} unreadable files "
            f"({len(self._epoch_bad)} reads) replaced by readable neighbours: {examples}",
            stacklevel=3,
        )
        self._epoch_bad = []

    def close(self) -> None:
        """Report the unreadable images of the unfinished epoch and stop the worker
        processes (they also stop when the source is garbage-collected)."""
        self._report_epoch()
        self._iter = None
        self._loader = None  # type: ignore[assignment]


BatchSource = TensorBatchSource | StreamingBatchSource


def make_source(cfg: DataConfig, batch_size: int, device: torch.device | str, seed: int,
                dataset: ImageSet | FolderSet | None = None, shard: Shard = SINGLE
                ) -> TensorBatchSource | StreamingBatchSource:
    """The training batch source for ``cfg`` (in memory or streamed, by data set type), on
    ``dataset`` if given (already loaded train split) else on ``cfg.name``'s train split;
    ``cfg.limit`` is applied either way. ``batch_size`` is the global batch, of which the
    source returns ``shard``'s rows."""
    if dataset is None:
        dataset = get_dataset(cfg.name, "train", cfg.root, holdout=cfg.holdout)
    data = dataset.subset(cfg.limit)
    common: dict[str, Any] = dict(
        batch_size=batch_size, image_size=cfg.image_size, crop_scale=cfg.crop_scale,
        crop_ratio=cfg.crop_ratio, hflip=cfg.hflip, device=device, seed=seed, shard=shard)
    if isinstance(data, ImageSet):
        return TensorBatchSource(data, **common)
    return StreamingBatchSource(data, num_workers=resolve_num_workers(cfg.num_workers),
                                **common)


MAX_AUTO_WORKERS = 4
"""The most decoding workers ``data.num_workers: null`` (auto) starts."""


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity mask, e.g. a SLURM or container
    allocation), else all of the machine's: what torch's DataLoader compares workers to."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def resolve_num_workers(requested: int | None) -> int:
    """``data.num_workers``: as given, or for None (auto) one fewer than the available CPUs
    (the training process keeps one), at most :data:`MAX_AUTO_WORKERS`; 0 on one CPU. Never
    more than the CPUs, beyond which torch warns that workers may be slow or freeze."""
    if requested is not None:
        return requested
    return min(MAX_AUTO_WORKERS, available_cpus() - 1)


# ---------------------------------------------------------------- evaluation


def eval_view(img: torch.Tensor, size: int) -> torch.Tensor:
    """The evaluation view of one decoded image: uint8 (C, H, W) -> its central square
    resized (antialiased) to uint8 (C, size, size). The same as resizing the shorter side
    to ``size`` and cropping the centre."""
    from torchvision.transforms.v2 import functional as TF

    side = min(img.shape[1:])
    img = TF.center_crop(img, [side, side])
    if side != size:
        img = TF.resize(img, [size, size], antialias=True)
    return img


class _EvalDataset(Dataset):
    def __init__(self, folder: FolderSet, size: int) -> None:
        self.folder = folder
        self.size = size

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int] | str:
        try:
            img = self.folder.load(index)
        except DataError as e:
            return str(e)
        return eval_view(img, self.size), self.folder.samples[index][1]


def _eval_collate(items: list[tuple[torch.Tensor, int] | str]
                  ) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    good = [it for it in items if not isinstance(it, str)]
    bad = [it for it in items if isinstance(it, str)]
    if not good:
        return torch.empty(0, dtype=torch.uint8), torch.empty(0, dtype=torch.long), bad
    return (torch.stack([g[0] for g in good]),
            torch.tensor([g[1] for g in good], dtype=torch.long), bad)


def iter_eval_batches(
    data: ImageSet | FolderSet,
    batch_size: int,
    image_size: int,
    device: torch.device | str = "cpu",
    limit: int | None = None,
    num_workers: int = 0,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Every image of ``data`` (or of ``data.subset(limit)``) once, in order, without
    augmentation (central square resized to ``image_size``): (float (B, C, S, S) in [0, 1]
    on ``device``, labels). The last batch may be smaller; unreadable files of a folder are
    skipped with a warning."""
    device = torch.device(device)
    data = data.subset(limit)
    if isinstance(data, ImageSet):
        for start in range(0, len(data), batch_size):
            images = data.images[start:start + batch_size].to(device, non_blocking=True)
            labels = data.labels[start:start + batch_size].to(device, non_blocking=True)
            yield center_resize(images, image_size), labels
        return
    loader = DataLoader(
        _EvalDataset(data, image_size), batch_size=batch_size, shuffle=False,
        num_workers=num_workers, collate_fn=_eval_collate, pin_memory=device.type == "cuda",
    )
    skipped = 0
    for images, labels, bad in loader:
        for msg in bad:
            skipped += 1
            if skipped <= MAX_WARNINGS:
                warnings.warn(f"skipping unreadable image: {msg}", stacklevel=2)
        if len(labels):
            images = images.to(device, non_blocking=True).float().div_(255)
            yield images, labels.to(device, non_blocking=True)
