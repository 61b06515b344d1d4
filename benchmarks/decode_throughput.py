"""Image-folder decoding speed: what one DataLoader worker does per training image.

    python benchmarks/decode_throughput.py [--images 100] [--size 500x375] [--repeats 3]

Writes synthetic JPEGs of the given size (ImageNet's typical 500 x 375 by default), then
times, on one thread, ``iwm.data.datasets.load_image`` (JPEG through torchvision.io)
against the Pillow path it falls back to, each alone and then with the training crop
(random-resized crop to 224 + flip, as ``iwm.data.sources`` does in the workers).
Prints images/s per path; the fastest of ``--repeats`` runs counts.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from iwm.data.crops import sample_crop_boxes
from iwm.data.datasets import load_image


def write_jpegs(folder: Path, n: int, width: int, height: int) -> list[Path]:
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        # Smooth random colour fields: compress like photos, unlike white noise.
        small = rng.integers(0, 256, (height // 8, width // 8, 3), dtype=np.uint8)
        image = Image.fromarray(small).resize((width, height), Image.BICUBIC)
        paths.append(folder / f"{i:05d}.jpg")
        image.save(paths[-1], quality=90)
    return paths


def pillow_path(path: Path) -> torch.Tensor:
    # A max_side larger than any image: load_image's Pillow branch, without downscaling.
    return load_image(path, max_side=1 << 30)


def with_crop(decode: Callable[[Path], torch.Tensor], size: int = 224
              ) -> Callable[[Path], torch.Tensor]:
    from torchvision.transforms.v2 import functional as TF

    gen = torch.Generator().manual_seed(0)

    def run(path: Path) -> torch.Tensor:
        img = decode(path)
        top, left, h, w = sample_crop_boxes(1, img.shape[1], img.shape[2], (0.3, 1.0),
                                            (3 / 4, 4 / 3), gen)[0].tolist()
        return TF.horizontal_flip(TF.resized_crop(img, top, left, h, w, [size, size],
                                                  antialias=True))
    return run


def images_per_s(fn: Callable[[Path], torch.Tensor], paths: list[Path], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for p in paths:
            fn(p)
        best = min(best, time.perf_counter() - start)
    return len(paths) / best


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=100)
    p.add_argument("--size", default="500x375", help="WIDTHxHEIGHT")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    width, height = (int(v) for v in args.size.lower().split("x"))
    torch.set_num_threads(1)  # one DataLoader worker
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_jpegs(Path(tmp), args.images, width, height)
        results = {
            "load_image (torchvision.io)": images_per_s(load_image, paths, args.repeats),
            "Pillow": images_per_s(pillow_path, paths, args.repeats),
            "load_image + crop 224": images_per_s(with_crop(load_image), paths, args.repeats),
            "Pillow + crop 224": images_per_s(with_crop(pillow_path), paths, args.repeats),
        }
    for name, value in results.items():
        print(f"{name:<30} {value:8.1f} images/s")
    return results


if __name__ == "__main__":
    main()
