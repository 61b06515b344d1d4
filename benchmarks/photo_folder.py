"""Build a small colour photo folder: random crops of the natural photos two PyPI packages
ship, written as ``imagefolder:`` reads them.

No colour natural-image data set is reachable without the open web here, but PyPI is:
scikit-image's wheel carries nine colour photos (astronaut, cat, coffee, Hubble field,
IHC stain, two motorcycle views, retina, rocket) and matplotlib, a dependency of iwm,
ships ``grace_hopper.jpg``. Each photo is one class. So that the test split is no copy of
the train split, a photo's right-most ``--test-fraction`` of columns is cut off for
``test/`` and the rest for ``train/``; crops are squares of a side drawn uniformly in
[``--min-side``, ``--max-side``] pixels (clamped to the strip), resized with antialiasing
to ``--size`` and saved as PNG. The result is the "user's own small colour folder" the
world-model targets of docs/RESULTS.md are measured on.

    python benchmarks/photo_folder.py --out data/photos                  # 4,000 crops
    python benchmarks/photo_folder.py --out data/photos --wheel skimage.whl --per-photo 800
    iwm pretrain iwm-equi-photos data.name=imagefolder:data/photos
"""

from __future__ import annotations

import argparse
import io
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image

SKIMAGE_WHEEL = "scikit-image==0.26.0"
SKIMAGE_PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "hubble_deep_field.jpg",
                  "ihc.png", "motorcycle_left.png", "motorcycle_right.png", "retina.jpg",
                  "rocket.jpg")


def fetch_wheel(into: Path) -> Path:
    """Download (never install) scikit-image's wheel into ``into``."""
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d",
                    str(into), SKIMAGE_WHEEL], check=True)
    found = sorted(into.glob("scikit_image-*.whl"))
    if not found:
        raise SystemExit(f"pip download {SKIMAGE_WHEEL} left no wheel in {into}")
    return found[0]


def load_photos(wheel: Path | None) -> dict[str, torch.Tensor]:
    """name -> uint8 (3, H, W): matplotlib's Grace Hopper, and the wheel's photos."""
    import matplotlib

    sample = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    photos = {"grace_hopper": _decode(sample.read_bytes())}
    if wheel is not None:
        with zipfile.ZipFile(wheel) as z:
            for name in SKIMAGE_PHOTOS:
                photos[name.rsplit(".", 1)[0]] = _decode(z.read(f"skimage/data/{name}"))
    return photos


def _decode(data: bytes) -> torch.Tensor:
    with Image.open(io.BytesIO(data)) as image:
        return TF.pil_to_tensor(image.convert("RGB"))


def crops(photo: torch.Tensor, n: int, size: int, sides: tuple[int, int],
          generator: torch.Generator) -> torch.Tensor:
    """``n`` random square crops (n, 3, size, size) uint8 of ``photo`` (3, H, W)."""
    h, w = photo.shape[1:]
    hi = min(sides[1], h, w)
    lo = min(sides[0], hi)
    side = torch.randint(lo, hi + 1, (n,), generator=generator)
    u = torch.rand(n, 2, generator=generator)
    top = (u[:, 0] * (h - side + 1)).long()
    left = (u[:, 1] * (w - side + 1)).long()
    out = [TF.resize(photo[:, t:t + s, x:x + s], [size, size], antialias=True)
           for t, x, s in zip(top.tolist(), left.tolist(), side.tolist(), strict=True)]
    return torch.stack(out)


def build(out: Path, photos: dict[str, torch.Tensor], per_photo: int, size: int,
          sides: tuple[int, int], test_fraction: float, seed: int) -> dict[str, int]:
    """Write ``out/{train,test}/<photo>/<i>.png``; returns the count per split."""
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction={test_fraction}: must lie strictly between 0 and "
                         "1, so that both splits get columns of every photo")
    if per_photo < 2:
        raise ValueError(f"per_photo={per_photo}: needs at least 2 (a train and a test crop)")
    generator = torch.Generator().manual_seed(seed)
    counts = {"train": 0, "test": 0}
    for name, photo in sorted(photos.items()):
        cut = round(photo.shape[2] * (1 - test_fraction))
        n_test = max(1, round(per_photo * test_fraction))
        for split, strip, n in (("train", photo[:, :, :cut], per_photo - n_test),
                                ("test", photo[:, :, cut:], n_test)):
            folder = out / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i, crop in enumerate(crops(strip, n, size, sides, generator)):
                TF.to_pil_image(crop).save(folder / f"{i:05d}.png")
            counts[split] += n
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--wheel", type=Path, help="scikit-image wheel (else pip download)")
    parser.add_argument("--per-photo", type=int, default=400)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--min-side", type=int, default=48)
    parser.add_argument("--max-side", type=int, default=160)
    parser.add_argument("--test-fraction", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.out.exists() and any(args.out.iterdir()):
        raise SystemExit(f"{args.out} is not empty: pick a new --out (nothing is overwritten)")
    with tempfile.TemporaryDirectory() as tmp:
        wheel = args.wheel or fetch_wheel(Path(tmp))
        photos = load_photos(wheel)
        counts = build(args.out, photos, args.per_photo, args.size,
                       (args.min_side, args.max_side), args.test_fraction, args.seed)
    print(f"{args.out}: {len(photos)} photos, {counts['train']} train and {counts['test']} "
          f"test crops of {args.size} px")


if __name__ == "__main__":
    main()
