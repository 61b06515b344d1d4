"""Training input speed of tar shards against the image folder they were written from.

    python benchmarks/shards_throughput.py [--images 3000] [--size 160x120] [--workers 2]

Writes ``--images`` synthetic JPEGs into class folders, turns them into shards with
``iwm shards``'s writer, then times one epoch of each training source
(:class:`~iwm.data.sources.StreamingBatchSource` on ``imagefolder:``,
:class:`~iwm.data.sources.ShardBatchSource` on ``shards:``) with the same decoding
workers, batch and crop (random-resized to ``--crop``), and prints images/s of both. The
files are freshly written, so both read from the page cache: what differs is the work per
file, not a shared file system's cost per open, which only favours shards more.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from decode_throughput import write_jpegs  # benchmarks/decode_throughput.py

from iwm.data.datasets import open_image_folder
from iwm.data.sources import ShardBatchSource, StreamingBatchSource
from iwm.data.tarshards import open_shards, write_shards


def epoch_rate(source: StreamingBatchSource | ShardBatchSource) -> float:
    """Images/s over one epoch, after a first batch (worker start-up) that is not timed."""
    source.next()
    start = time.perf_counter()
    n = 0
    for _ in range(source.steps_per_epoch - 1):
        n += source.next()[0].shape[0]
    rate = n / (time.perf_counter() - start)
    source.close()
    return rate


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--size", default="160x120", help="JPEG width x height")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--shard-size", type=int, default=500)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--crop", type=int, default=96)
    args = parser.parse_args(argv)
    width, height = (int(v) for v in args.size.split("x"))

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for c in range(args.classes):
            folder = root / "images" / f"class{c}"
            folder.mkdir(parents=True)
            write_jpegs(folder, args.images // args.classes, width, height)
        start = time.perf_counter()
        write_shards(root / "images", root / "shards", args.shard_size, holdout=0)
        written = time.perf_counter() - start
        common = dict(batch_size=args.batch, image_size=args.crop, num_workers=args.workers)
        folder_rate = epoch_rate(StreamingBatchSource(
            open_image_folder(root / "images", holdout=0), **common))  # type: ignore[arg-type]
        shard_rate = epoch_rate(ShardBatchSource(
            open_shards(f"{root}/shards/train/shard-*.tar"), **common))  # type: ignore[arg-type]
    n = args.images // args.classes * args.classes
    print(f"{n} JPEGs {width}x{height}, batch {args.batch}, crop {args.crop}, "
          f"{args.workers} workers; shards written in {written:.1f} s")
    print(f"image folder: {folder_rate:8.0f} images/s")
    print(f"tar shards:   {shard_rate:8.0f} images/s ({shard_rate / folder_rate:.2f}x)")
    return {"image folder": folder_rate, "tar shards": shard_rate}


if __name__ == "__main__":
    main()
