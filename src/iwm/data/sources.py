"""Batch sources for the training loop, with exact resume.

All sources hand out ``(crops, labels)``: float (B, C, S, S) in [0, 1] on the training
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
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from iwm.config import DataConfig
from iwm.console import batches_of, track
from iwm.data.crops import center_resize, random_resized_crop, sample_crop_boxes
from iwm.data.datasets import SHARDS_PREFIX, FolderSet, ImageSet, get_dataset, load_image
from iwm.data.shard import SINGLE, Shard
from iwm.data.tarshards import ShardSet, iter_samples, open_shards
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

    dataset: ImageSet | FolderSet | ShardSet
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


def _crop(img: torch.Tensor, size: int, scale: tuple[float, float],
          ratio: tuple[float, float], hflip: bool, gen: torch.Generator) -> torch.Tensor:
    """A random resized crop (and flip) of one decoded image, uint8 (3, size, size)."""
    from torchvision.transforms.v2 import functional as TF

    top, left, h, w = sample_crop_boxes(1, img.shape[1], img.shape[2], scale, ratio,
                                        gen)[0].tolist()
    out = TF.resized_crop(img, top, left, h, w, [size, size], antialias=True)
    if hflip and torch.rand((), generator=gen) < 0.5:
        out = TF.horizontal_flip(out)
    return out


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
            out = _crop(img, self.size, self.scale, self.ratio, self.hflip, gen)
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


Loaded = tuple[torch.Tensor | None, torch.Tensor, list[str], str | None]
"""What a streamed source's DataLoader yields: uint8 crops (None if the batch has none),
labels, the unreadable files met and replaced, and an error that ends the run."""


def _collate(items: list[tuple[torch.Tensor | None, int, list[str]]]) -> Loaded:
    bad = [msg for it in items for msg in it[2]]
    if any(it[0] is None for it in items):
        return None, torch.empty(0, dtype=torch.long), bad, None
    images = torch.stack([it[0] for it in items])  # type: ignore[misc]
    labels = torch.tensor([it[1] for it in items], dtype=torch.long)
    return images, labels, bad, None


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


class _LoaderSource(_ResumableSource):
    """A source whose batches a DataLoader makes (decoded and cropped in its workers), as
    ordered by a batch sampler that the source moves to its (epoch, position)."""

    device: torch.device

    def _start_loader(self, dataset: Dataset, sampler: Any, collate: Callable[..., Loaded],
                      num_workers: int) -> None:
        if num_workers > 0:
            # Imported here, so that forked workers inherit it: each would spend seconds
            # importing it at its first crop.
            from torchvision.transforms.v2 import functional  # noqa: F401
        self.skipped = 0
        """Unreadable files met so far (each replaced by a readable neighbour)."""
        self.bad_files: set[str] = set()
        """One message per distinct unreadable file, starting with its path."""
        self._epoch_bad: list[str] = []
        self._sampler = sampler
        self._loader = DataLoader(
            dataset,
            batch_sampler=sampler,
            num_workers=num_workers,
            collate_fn=collate,
            pin_memory=self.device.type == "cuda",
            persistent_workers=num_workers > 0,
            worker_init_fn=_worker_ignores_stop_signals,
            # Its own: each new iterator draws the workers' base seed (unused: every draw
            # here is derived from the key), which from torch's global generator would
            # make a resumed run's global random state differ from the uninterrupted one.
            generator=torch.Generator().manual_seed(0),
        )
        self._iter: Iterator[Loaded] | None = None

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
        images, labels, bad, fatal = next(self._iter)
        if fatal is not None:
            raise DataError(fatal)
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


class StreamingBatchSource(_LoaderSource):
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
        self._start_loader(
            _CropDataset(folder, image_size, crop_scale, crop_ratio, hflip),
            _EpochBatches(len(folder), batch_size, seed, shard), _collate, num_workers)


# ---------------------------------------------------------------- tar shards


def shard_plan(counts: list[int], seed: int, epoch: int, local: int, steps: int,
               shard: Shard, workers: int) -> list[list[tuple[int, int, int]]]:
    """What each DataLoader worker of process ``shard`` reads in ``epoch``: its pieces
    ``(shard index, first ordinal, stop ordinal)``, in reading order.

    The epoch reads the shards (of ``counts`` samples) in an order drawn from ``(seed,
    epoch)``, as one stream. Process r of R takes the r-th of R contiguous ranges of it,
    of equal size (+-1), and uses the first ``steps * local`` samples of that (fewer than
    one batch are left over; another epoch's shard order leaves others). Its batches
    w, w + W, ... are made by worker w of W, which therefore reads the w-th contiguous
    piece of the range, as many batches long. So every sample is read by one worker of one
    process, and most shards are read whole by one worker; only where a range ends is a
    shard shared, each reader skipping the other's members.
    """
    order = epoch_permutation(len(counts), seed, epoch).tolist()
    starts = [0]
    for i in order:
        starts.append(starts[-1] + counts[i])
    begin = starts[-1] * shard.index // shard.count
    plans = []
    for w in range(workers):
        end = begin + len(range(w, steps, workers)) * local
        pieces = []
        for pos, i in enumerate(order):
            lo, hi = max(begin, starts[pos]), min(end, starts[pos + 1])
            if lo < hi:
                pieces.append((i, lo - starts[pos], hi - starts[pos]))
        plans.append(pieces)
        begin = end
    return plans


def buffer_shuffle(items: list[int], size: int, gen: torch.Generator) -> list[int]:
    """``items`` (in reading order) as a shuffle buffer of ``size`` hands them out: each
    next one drawn from the ``size`` read but not yet handed out. Computed on ids alone, so
    a resumed worker knows which samples are gone without reading them."""
    draws = torch.rand(len(items), generator=gen, dtype=torch.float64).tolist()
    held, out = items[:size], []
    for t, item in enumerate(items[size:]):
        j = int(draws[t] * len(held))
        out.append(held[j])
        held[j] = item
    while held:  # the stream is read: empty the buffer
        j = int(draws[len(out)] * len(held))
        out.append(held[j])
        held[j] = held[-1]
        held.pop()
    return out


Sample = tuple[int, str, bytes, int]
"""A shard sample: (id, name for messages, image file bytes, label or -1)."""


class _WorkerStream:
    """One worker's samples of an epoch in shuffled order, from batch ``batch`` on.

    Reads the worker's pieces in order and holds the samples read before their turn (at
    most the shuffle buffer's worth), so an uninterrupted and a resumed run hand out the
    same samples; a resumed one neither opens shards whose samples are all gone nor reads
    the members of the ones that are.
    """

    def __init__(self, shards: ShardSet, pieces: list[tuple[int, int, int]],
                 order: list[int], batch: int, local: int) -> None:
        self.batch = batch
        self.local = local
        self._todo = order[batch * local:]
        self._done = 0
        self._held: dict[int, Sample] = {}
        self._reader = self._read(shards, pieces, set(self._todo))

    @staticmethod
    def _read(shards: ShardSet, pieces: list[tuple[int, int, int]], needed: set[int]
              ) -> Iterator[Sample]:
        for i, first, stop in pieces:
            base = shards.offsets[i]
            wanted = {o for o in range(first, stop) if base + o in needed}
            if not wanted:
                continue
            path = shards.paths[i]
            for o, member, data, label in iter_samples(path, stop, wanted.__contains__):
                yield base + o, f"{path}:{member}", data, label

    def take(self) -> list[Sample]:
        """The next batch's samples; DataError for a shard that cannot be read."""
        out = []
        for sid in self._todo[self._done:self._done + self.local]:
            while sid not in self._held:
                got = next(self._reader, None)
                if got is None:  # iter_samples raises first, for a shard short of samples
                    raise DataError(f"sample {sid} was not found in its shard")
                self._held[got[0]] = got
            out.append(self._held.pop(sid))
        self._done += self.local
        self.batch += 1
        return out


class _ShardBatches(Dataset):
    """Runs in DataLoader workers: batch ``step`` of a process's epoch, decoded and cropped
    to uint8 (local, 3, S, S). Each worker keeps the stream it is reading, and starts one
    wherever a key does not continue it (a new epoch, a resume)."""

    def __init__(self, shards: ShardSet, shard: Shard, workers: int, local: int, steps: int,
                 buffer: int, size: int, scale: tuple[float, float],
                 ratio: tuple[float, float], hflip: bool) -> None:
        self.shards = shards
        self.shard = shard
        self.workers = workers
        self.local = local
        self.steps = steps
        self.buffer = buffer
        self.crop = (size, scale, ratio, hflip)
        self._streams: dict[tuple[int, int, int], _WorkerStream] = {}

    def __len__(self) -> int:
        return self.steps

    def stream(self, seed: int, epoch: int, worker: int, batch: int) -> _WorkerStream:
        key = (seed, epoch, worker)
        stream = self._streams.get(key)
        if stream is None or stream.batch != batch:
            pieces = shard_plan(self.shards.counts, seed, epoch, self.local, self.steps,
                                self.shard, self.workers)[worker]
            ids = [self.shards.offsets[i] + o for i, first, stop in pieces
                   for o in range(first, stop)]
            gen = torch.Generator().manual_seed(
                derive_seed("shuffle", seed, epoch, self.shard.index, worker))
            self._streams = {k: v for k, v in self._streams.items() if k[:2] == key[:2]}
            stream = self._streams[key] = _WorkerStream(
                self.shards, pieces, buffer_shuffle(ids, self.buffer, gen), batch, self.local)
        return stream

    def __getitem__(self, key: tuple[int, int, int]) -> Loaded:
        seed, epoch, step = key
        worker = step % self.workers
        try:
            samples = self.stream(seed, epoch, worker, step // self.workers).take()
        except DataError as e:
            # Raised by the main process: from here it would come wrapped in a traceback.
            self._streams.pop((seed, epoch, worker), None)
            return None, torch.empty(0, dtype=torch.long), [], str(e)
        decoded: list[torch.Tensor | None] = []
        bad: list[str] = []
        for _, name, data, _ in samples:
            try:
                decoded.append(load_image(name, data=data))
            except DataError as e:
                decoded.append(None)
                bad.append(str(e))
        readable = [j for j, img in enumerate(decoded) if img is not None]
        if not readable:
            return None, torch.empty(0, dtype=torch.long), bad, (
                f"{self.shards.name}: a whole batch of {len(samples)} unreadable images (e.g. "
                f"{bad[0]}); the data set is mostly unusable: fix or remove the bad files")
        crops, labels = [], []
        for j, (sid, _, _, _) in enumerate(samples):
            # An unreadable image is replaced by the batch's next readable one, so the batch
            # keeps its size; the crop stays the sample's own, seeded by its id.
            src = next((r for r in readable if r >= j), readable[0])
            gen = torch.Generator().manual_seed(derive_seed("sample", seed, epoch, sid))
            crops.append(_crop(decoded[src], *self.crop, gen))  # type: ignore[arg-type]
            labels.append(samples[src][3])
        return torch.stack(crops), torch.tensor(labels, dtype=torch.long), bad, None


def _the_batch(items: list[Loaded]) -> Loaded:
    return items[0]  # the dataset makes whole batches


class _ShardSteps:
    """Batch sampler of a shard source: one key ``(seed, epoch, step)`` per batch of
    ``epoch`` from batch ``start`` on."""

    def __init__(self, steps: int, seed: int) -> None:
        self.steps = steps
        self.seed = seed
        self.epoch = 0
        self.start = 0

    def __len__(self) -> int:
        return self.steps - self.start

    def __iter__(self) -> Iterator[list[tuple[int, int, int]]]:
        for step in range(self.start, self.steps):
            yield [(self.seed, self.epoch, step)]


class ShardBatchSource(_LoaderSource):
    """Tar shards streamed by DataLoader workers (see :func:`shard_plan` for who reads
    what, :func:`buffer_shuffle` for the order); crops as for an image folder.

    Unlike the other sources, the samples of a process depend on the number of processes
    and of workers (each reads its own shards): a checkpoint resumes with the same ones.
    """

    def __init__(
        self,
        shards: ShardSet,
        batch_size: int,
        image_size: int,
        crop_scale: tuple[float, float] = (0.3, 1.0),
        crop_ratio: tuple[float, float] = (0.75, 4 / 3),
        hflip: bool = True,
        device: torch.device | str = "cpu",
        seed: int = 0,
        num_workers: int = 4,
        shuffle_buffer: int = 1000,
        shard: Shard = SINGLE,
    ) -> None:
        if shuffle_buffer < 1:
            raise DataError(f"shuffle buffer {shuffle_buffer} must be at least 1")
        self.dataset = shards
        self.batch_size = batch_size
        """The global batch: this source returns ``shard``'s share of it."""
        self.steps_per_epoch = _check_batch(len(shards), batch_size, shards.name, shard)
        self.image_size = image_size
        self.device = torch.device(device)
        self.seed = seed
        self.epoch = 0
        self.position = 0
        self.workers = max(1, num_workers)
        """Streams per process: 0 workers read in this process, as one."""
        self.shuffle_buffer = shuffle_buffer
        self._start_loader(
            _ShardBatches(shards, shard, self.workers, batch_size // shard.count,
                          self.steps_per_epoch, shuffle_buffer, image_size, crop_scale,
                          crop_ratio, hflip),
            _ShardSteps(self.steps_per_epoch, seed), _the_batch, num_workers)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "workers": self.workers,
                "shuffle_buffer": self.shuffle_buffer}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, option in (("workers", "num_workers"), ("shuffle_buffer", "shuffle_buffer")):
            if state.get(key) != getattr(self, key):
                raise CheckpointError(
                    f"the checkpoint's shard stream had {key}={state.get(key)}, this run has "
                    f"{getattr(self, key)}: resume with data.{option}={state.get(key)}")
        super().load_state_dict(state)


BatchSource = TensorBatchSource | StreamingBatchSource | ShardBatchSource


def make_source(cfg: DataConfig, batch_size: int, device: torch.device | str, seed: int,
                dataset: ImageSet | FolderSet | None = None, shard: Shard = SINGLE
                ) -> BatchSource:
    """The training batch source for ``cfg`` (in memory or streamed, by data set type), on
    ``dataset`` if given (already loaded train split) else on ``cfg.name``'s train split
    (or its tar shards); ``cfg.limit`` is applied either way. ``batch_size`` is the global
    batch, of which the source returns ``shard``'s rows."""
    common: dict[str, Any] = dict(
        batch_size=batch_size, image_size=cfg.image_size, crop_scale=cfg.crop_scale,
        crop_ratio=cfg.crop_ratio, hflip=cfg.hflip, device=device, seed=seed, shard=shard)
    name = cfg.name.strip()
    if dataset is None and name.lower().startswith(SHARDS_PREFIX):
        shards = open_shards(name[len(SHARDS_PREFIX):]).subset(cfg.limit)
        return ShardBatchSource(shards, num_workers=resolve_num_workers(cfg.num_workers),
                                shuffle_buffer=cfg.shuffle_buffer, **common)
    if dataset is None:
        dataset = get_dataset(cfg.name, "train", cfg.root, holdout=cfg.holdout)
    data = dataset.subset(cfg.limit)
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


def tracked_eval_batches(
    data: ImageSet | FolderSet,
    batch_size: int,
    image_size: int,
    device: torch.device | str,
    desc: str,
    *,
    limit: int | None = None,
    progress: bool = True,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """:func:`iter_eval_batches` behind a progress bar ``desc`` (see :mod:`iwm.console`)
    counted in batches of the images ``limit`` keeps: the loop every evaluation runs."""
    total = batches_of(len(data.subset(limit)), batch_size)
    return track(iter_eval_batches(data, batch_size, image_size, device, limit=limit), total,
                 desc, enabled=progress)
