from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from iwm.config import DataConfig
from iwm.data.datasets import ImageSet, open_image_folder
from iwm.data.shard import Shard
from iwm.data.sources import (
    ShardBatchSource,
    StreamingBatchSource,
    TensorBatchSource,
    buffer_shuffle,
    iter_eval_batches,
    make_source,
    shard_plan,
    tracked_eval_batches,
)
from iwm.data.tarshards import open_shards
from iwm.errors import CheckpointError, DataError

# Full-image crops without flips: every output pixel equals the source image's value, so
# a crop tells which image it came from.
IDENTITY = dict(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), hflip=False)
AUGMENT = dict(crop_scale=(0.3, 1.0), crop_ratio=(0.75, 4 / 3), hflip=True)


def _indexed_set(n: int = 50, size: int = 8) -> ImageSet:
    """Image i is constant i (so crops identify it); label = i % 7."""
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, size, size)
    labels = torch.arange(n) % 7
    return ImageSet(images.contiguous(), labels, [str(k) for k in range(7)], (0.5,), (0.5,))


def _ids(crops: torch.Tensor) -> list[int]:
    return (crops.flatten(1).mean(1) * 255).round().long().tolist()


def _take(source, k):
    return [source.next() for _ in range(k)]


def _assert_same(batches_a, batches_b):
    assert len(batches_a) == len(batches_b)
    for (xa, ya), (xb, yb) in zip(batches_a, batches_b, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_tensor_source_epochs_cover_each_image_once():
    src = TensorBatchSource(_indexed_set(50), 16, 8, **IDENTITY, seed=3)
    assert src.steps_per_epoch == 3  # 50 // 16: the incomplete batch is dropped
    for _epoch in range(2):
        seen = []
        for x, y in _take(src, 3):
            assert x.shape == (16, 1, 8, 8) and x.dtype == torch.float32
            ids = _ids(x)
            assert [i % 7 for i in ids] == y.tolist()  # labels match images
            seen += ids
        assert len(set(seen)) == 48 and all(0 <= i < 50 for i in seen)
    assert src.epoch == 1 and src.position == 3
    src.next()
    assert src.epoch == 2 and src.position == 1 and src.progress == pytest.approx(2 + 1 / 3)


def test_tensor_source_seeds():
    data = _indexed_set(64)
    a = _take(TensorBatchSource(data, 8, 6, **AUGMENT, seed=1), 10)
    b = _take(TensorBatchSource(data, 8, 6, **AUGMENT, seed=1), 10)
    c = _take(TensorBatchSource(data, 8, 6, **AUGMENT, seed=2), 10)
    _assert_same(a, b)
    assert not all(torch.equal(x1, x2) for (x1, _), (x2, _) in zip(a, c, strict=True))
    # Epoch orders differ.
    first = TensorBatchSource(data, 64, 8, **IDENTITY, seed=1)
    assert _ids(first.next()[0]) != _ids(first.next()[0])


@pytest.mark.parametrize("k", [0, 2, 7, 8])
def test_tensor_source_resume(k):
    data = _indexed_set(64)
    ref = TensorBatchSource(data, 16, 6, **AUGMENT, seed=9)
    expected = _take(ref, k + 6)[k:]
    run = TensorBatchSource(data, 16, 6, **AUGMENT, seed=9)
    _take(run, k)
    state = run.state_dict()
    fresh = TensorBatchSource(data, 16, 6, **AUGMENT, seed=12345)  # seed comes from state
    fresh.load_state_dict(state)
    _assert_same(_take(fresh, 6), expected)


def test_tensor_source_rejects_mismatched_state_and_small_sets():
    src = TensorBatchSource(_indexed_set(64), 16, 8, **IDENTITY)
    other = TensorBatchSource(_indexed_set(64), 8, 8, **IDENTITY)
    with pytest.raises(CheckpointError, match="batch_size"):
        other.load_state_dict(src.state_dict())
    with pytest.raises(DataError, match="fewer than one batch"):
        TensorBatchSource(_indexed_set(10), 16, 8, **IDENTITY)


@pytest.fixture
def coloured_folder(tmp_path):
    """24 constant-colour PNGs (of several sizes) in 3 classes; colour encodes the index.
    Opened with holdout=0: these tests count on every file being in the split."""
    root = tmp_path / "coloured"
    for i in range(24):
        d = root / f"class{i % 3}"
        d.mkdir(parents=True, exist_ok=True)
        size = (10 + i % 4, 12)
        Image.fromarray(np.full((*size, 3), (i * 10, 0, 0), np.uint8)).save(d / f"{i:02d}.png")
    return root


def _colour_ids(crops: torch.Tensor) -> list[int]:
    return (crops[:, 0].flatten(1).mean(1) * 255 / 10).round().long().tolist()


def test_streaming_source_epoch_and_labels(coloured_folder):
    folder = open_image_folder(coloured_folder, holdout=0)
    src = StreamingBatchSource(folder, 5, 8, **AUGMENT, seed=0, num_workers=0)
    assert src.steps_per_epoch == 4
    seen = []
    for x, y in _take(src, 4):
        assert x.shape == (5, 3, 8, 8) and x.dtype == torch.float32
        assert x.min() >= 0 and x.max() <= 1
        ids = _colour_ids(x)
        assert [i % 3 for i in ids] == y.tolist()
        seen += ids
    assert len(set(seen)) == 20
    x, _ = src.next()  # next epoch starts
    assert src.epoch == 1 and src.position == 1


@pytest.mark.parametrize("workers", [0, 1])
def test_streaming_source_resume(coloured_folder, workers):
    folder = open_image_folder(coloured_folder, holdout=0)
    kw = dict(**AUGMENT, num_workers=workers)
    expected = _take(StreamingBatchSource(folder, 4, 6, seed=5, **kw), 9)[5:]
    run = StreamingBatchSource(folder, 4, 6, seed=5, **kw)
    _take(run, 5)  # 6 steps per epoch: the 4 resumed batches cross into epoch 1
    state = run.state_dict()
    run.close()
    fresh = StreamingBatchSource(folder, 4, 6, seed=0, **kw)
    fresh.load_state_dict(state)
    _assert_same(_take(fresh, 4), expected)
    fresh.close()


def test_streaming_source_same_seed_same_batches(coloured_folder):
    folder = open_image_folder(coloured_folder, holdout=0)
    a = _take(StreamingBatchSource(folder, 4, 6, **AUGMENT, seed=1, num_workers=0), 3)
    b = _take(StreamingBatchSource(folder, 4, 6, **AUGMENT, seed=1, num_workers=0), 3)
    _assert_same(a, b)


def test_streaming_source_skips_unreadable_files(coloured_folder):
    (coloured_folder / "class0" / "zz_broken.png").write_bytes(b"\x89PNG\r\n\x1a\ngarbage")
    folder = open_image_folder(coloured_folder, holdout=0)
    assert len(folder) == 25
    src = StreamingBatchSource(folder, 5, 8, **IDENTITY, seed=0, num_workers=0)
    with pytest.warns(UserWarning, match="zz_broken.png"):
        batches = _take(src, 5)  # one whole epoch: the broken file is drawn once
    assert all(x.shape[0] == 5 for x, _ in batches)
    assert src.skipped == 1 and len(src.bad_files) == 1
    for x, y in batches:
        assert [i % 3 for i in _colour_ids(x)] == y.tolist()


def test_streaming_source_empty_folder(coloured_folder):
    folder = open_image_folder(coloured_folder, holdout=0)
    folder.samples = []
    with pytest.raises(DataError, match="no images"):
        StreamingBatchSource(folder, 4, 8, num_workers=0)


def test_make_source_picks_by_type(fake_mnist_dir, image_folder):
    cfg = DataConfig(name="fashion-mnist", root=str(fake_mnist_dir), image_size=16, limit=40)
    src = make_source(cfg, batch_size=8, device="cpu", seed=0)
    assert isinstance(src, TensorBatchSource)
    assert src.num_images == 40 and src.steps_per_epoch == 5
    x, y = src.next()
    assert x.shape == (8, 1, 16, 16) and y.shape == (8,)
    cfg = DataConfig(name=f"imagefolder:{image_folder}", image_size=8, num_workers=0, limit=10)
    src = make_source(cfg, batch_size=4, device="cpu", seed=0)
    assert isinstance(src, StreamingBatchSource) and src.num_images == 10
    assert src.channels == 3 and len(src.mean) == 3 and src.classes == ["cat", "dog"]
    x, y = src.next()
    assert x.shape == (4, 3, 8, 8)
    # A data set loaded by the caller is used as is (limit still applied).
    data = _indexed_set(64)
    src = make_source(DataConfig(image_size=8, limit=32), 8, "cpu", 0, dataset=data)
    assert src.num_images == 32 and src.channels == 1 and src.mean == (0.5,)


def test_eval_batches_image_set():
    data = _indexed_set(20, size=6)
    batches = list(iter_eval_batches(data, 8, 12))
    assert [x.shape[0] for x, _ in batches] == [8, 8, 4]  # nothing dropped
    ids = [i for x, _ in batches for i in _ids(x)]
    assert ids == list(range(20))
    labels = torch.cat([y for _, y in batches])
    assert torch.equal(labels, data.labels)
    again = list(iter_eval_batches(data, 8, 12))
    _assert_same(batches, again)
    limited = list(iter_eval_batches(data, 8, 12, limit=10))
    assert [x.shape[0] for x, _ in limited] == [8, 2]


def test_tracked_eval_batches_count_the_batches_the_limit_keeps(capsys):
    data = _indexed_set(20, size=6)
    tracked = list(tracked_eval_batches(data, 8, 12, "cpu", "eval x", limit=10))
    _assert_same(tracked, list(iter_eval_batches(data, 8, 12, limit=10)))
    # The bar's total is 2 batches (10 images), not 3 (the set's 20): its last line ends it.
    assert capsys.readouterr().err.splitlines()[-1].startswith("iwm: eval x batch 2/2 ")


def test_eval_batches_folder(coloured_folder):
    (coloured_folder / "class1" / "zz_broken.png").write_bytes(b"junk")
    folder = open_image_folder(coloured_folder, holdout=0)
    with pytest.warns(UserWarning, match="zz_broken"):
        batches = list(iter_eval_batches(folder, 10, 8))
    assert sum(x.shape[0] for x, _ in batches) == 24
    for x, y in batches:
        assert x.shape[1:] == (3, 8, 8)
        assert [i % 3 for i in _colour_ids(x)] == y.tolist()


@pytest.mark.cuda
def test_sources_on_cuda(coloured_folder):
    data = _indexed_set(64)
    src = TensorBatchSource(data, 16, 8, **AUGMENT, device="cuda", seed=0)
    x, y = src.next()
    assert x.device.type == "cuda" and y.device.type == "cuda"
    state = src.state_dict()
    ref = src.next()
    fresh = TensorBatchSource(data, 16, 8, **AUGMENT, device="cuda", seed=0)
    fresh.load_state_dict(state)
    _assert_same([fresh.next()], [ref])
    stream = StreamingBatchSource(open_image_folder(coloured_folder, holdout=0), 4, 8,
                                  device="cuda", num_workers=1)
    x, y = stream.next()
    assert x.device.type == "cuda" and x.dtype == torch.float32
    stream.close()


@pytest.mark.parametrize("cpus", [1, 2, 3, 8, 64])
def test_auto_workers_leave_the_training_process_a_cpu(cpus, monkeypatch):
    import os

    from iwm.data.sources import MAX_AUTO_WORKERS, resolve_num_workers

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cpus)), raising=False)
    assert resolve_num_workers(None) == min(MAX_AUTO_WORKERS, cpus - 1)
    assert resolve_num_workers(3) == 3  # an explicit count is the user's
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: cpus)
    assert resolve_num_workers(None) == min(MAX_AUTO_WORKERS, cpus - 1)
    assert DataConfig().num_workers is None  # auto is the default


def _worker_warnings(folder, num_workers) -> list[str]:
    import warnings

    cfg = DataConfig(name=f"imagefolder:{folder}", image_size=8, num_workers=num_workers)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        src = make_source(cfg, batch_size=4, device="cpu", seed=0)
        src.next()  # starts the workers, where torch checks their number
        src.close()
    # torch: "This DataLoader will create N worker processes in total. Our suggested max
    # number of worker in current system is M, ..."
    return [str(w.message) for w in caught if "suggested max number of worker" in str(w.message)]


def test_default_workers_draw_no_excessive_worker_warning_here(image_folder):
    from iwm.data.sources import available_cpus

    assert _worker_warnings(image_folder, None) == []
    # The check can see the warning: one worker more than the CPUs draws it.
    assert _worker_warnings(image_folder, available_cpus() + 1)


# ---------------------------------------------------------------- tar shards


def _red_ids(crops: torch.Tensor) -> list[int]:
    """conftest.write_coloured_shards's images: red = 5 x their number."""
    return (crops[:, 0].flatten(1).mean(1) * 255 / 5).round().long().tolist()


def _plan_ids(counts, epoch, local, ranks, workers):
    steps = sum(counts) // (local * ranks)
    offsets = np.concatenate([[0], np.cumsum(counts)[:-1]])
    return [[[int(offsets[i]) + o for i, a, b in pieces for o in range(a, b)]
             for pieces in shard_plan(counts, 0, epoch, local, steps, Shard(r, ranks), workers)]
            for r in range(ranks)]


@pytest.mark.parametrize("counts", [[7] * 6 + [6], [10, 3, 9, 1, 5]])
def test_shard_plan_splits_an_epoch_over_ranks_and_workers(counts):
    n, local = sum(counts), 3
    for epoch in range(3):
        plan = _plan_ids(counts, epoch, local, ranks=2, workers=2)
        ids = [i for rank in plan for worker in rank for i in worker]
        assert len(ids) == len(set(ids))  # no sample twice
        steps = n // (2 * local)
        # Each rank has the same number of whole batches; worker w makes batches w, w+2, ...
        for rank in plan:
            assert [len(w) for w in rank] == [local * len(range(w, steps, 2)) for w in range(2)]
        # Less than a batch per rank is left over; nothing when the batches divide the set.
        assert n - len(ids) < 2 * local and (n % (2 * local) or len(ids) == n)
    # The shard order, so the leftovers, change with the epoch.
    assert _plan_ids(counts, 0, local, 2, 2) != _plan_ids(counts, 1, local, 2, 2)


def test_buffer_shuffle_is_a_local_permutation():
    gen = torch.Generator().manual_seed(0)
    out = buffer_shuffle(list(range(1000)), 10, gen)
    assert sorted(out) == list(range(1000)) and out != list(range(1000))
    # Nothing comes out before it is read: the t-th draw is from the first 10 + t.
    assert all(x < 10 + t for t, x in enumerate(out))
    whole = buffer_shuffle(list(range(20)), 100, torch.Generator().manual_seed(0))
    assert sorted(whole) == list(range(20))


def _shard_epoch(pattern, ranks, workers, seed=0, epoch=0, batch=12):
    """The images each rank sees in epoch ``epoch`` (its batches in order)."""
    seen = []
    for r in range(ranks):
        src = ShardBatchSource(open_shards(pattern), batch, 8, **IDENTITY, seed=seed,
                               num_workers=workers, shard=Shard(r, ranks))
        src.load_state_dict({**src.state_dict(), "epoch": epoch})
        seen.append([_red_ids(x) for x, _ in _take(src, src.steps_per_epoch)])
        src.close()
    return seen


def test_shard_source_covers_an_epoch_over_two_ranks_and_two_workers(coloured_shards):
    # 48 images in shards of 7: a global batch of 12 is 6 per rank, 4 steps per epoch.
    epochs = [_shard_epoch(coloured_shards, 2, 2, epoch=e) for e in (0, 1)]
    for seen in epochs:
        ids = [i for rank in seen for batch in rank for i in batch]
        assert sorted(ids) == list(range(48))  # no duplicates, no gaps
        assert [len(rank) for rank in seen] == [4, 4]
        assert all(len(b) == 6 for rank in seen for b in rank)
    assert epochs[0] != epochs[1]  # shuffled anew each epoch
    assert _shard_epoch(coloured_shards, 2, 2, epoch=1) == epochs[1]  # and deterministically
    assert _shard_epoch(coloured_shards, 2, 2, seed=1) != epochs[0]


def test_shard_source_labels_and_augmented_crops(coloured_shards):
    src = ShardBatchSource(open_shards(coloured_shards), 8, 6, **AUGMENT, seed=3,
                           num_workers=0)
    x, y = src.next()
    assert x.shape == (8, 3, 6, 6) and x.dtype == torch.float32
    assert [i % 3 for i in _red_ids(x)] == y.tolist()
    assert src.classes == ["class0", "class1", "class2"] and src.num_images == 48


@pytest.mark.parametrize("k", [2, 5])
def test_shard_source_resumes_at_the_exact_sample(coloured_shards, k):
    # 48 images / 8 = 6 steps per epoch: 9 steps cross an epoch; k=5 resumes mid-shard.
    def source():
        return ShardBatchSource(open_shards(coloured_shards), 8, 6, **AUGMENT, seed=4,
                                num_workers=2, shuffle_buffer=5)

    full = source()
    expected = _take(full, 9)
    part = source()
    _take(part, k)
    state = part.state_dict()
    part.close()
    resumed = source()
    resumed.load_state_dict(state)
    _assert_same(_take(resumed, 9 - k), expected[k:])
    for s in (full, resumed):
        s.close()
    other = ShardBatchSource(open_shards(coloured_shards), 8, 6, num_workers=0)
    with pytest.raises(CheckpointError, match="workers=2, this run has 1: .*num_workers=2"):
        other.load_state_dict(state)


def test_shard_source_reports_a_corrupt_shard_in_one_line(coloured_shards):
    path = open_shards(coloured_shards).paths[3]
    size = path.stat().st_size
    path.write_bytes(b"\x01" * size)
    src = make_source(DataConfig(name=f"shards:{coloured_shards}", num_workers=1), 48, "cpu",
                      seed=0)
    with pytest.raises(DataError, match="shard-000003.tar: corrupt tar shard") as e:
        src.next()
    assert "\n" not in str(e.value)
    src.close()
