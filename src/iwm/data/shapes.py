"""Shapes: a procedural colour data set that needs no download (``data.name=shapes``).

Ten shape classes drawn with colour, position, size, rotation, background, stripes and
lighting as nuisances; what each image holds and why it is a fair test of a colour world
model is in docs/data.md. Everything is drawn from one seeded ``torch.Generator``
for the whole set at once (one loop over ten classes, none over images) and rendered at
twice the size, then averaged down, for anti-aliased edges. The result is cached under
the data root, so the build runs once.
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path

import kornia
import torch
import torch.nn.functional as F
from torch import Tensor

from iwm.errors import DataError

SHAPES_CLASSES = ("circle", "ring", "ellipse", "triangle", "square", "pentagon", "star",
                  "cross", "crescent", "tee")
SHAPES_SPLITS = {"train": 50_000, "test": 10_000}
SHAPES_SIZE = 32
SHAPES_SEED = 0
# Bump when the rendering changes, so that old caches are not read as the new set.
SHAPES_VERSION = 2
_SUPERSAMPLE = 2
_CHUNK = 4096


def _polygon(r: Tensor, phi: Tensor, sides: int) -> Tensor:
    # Inside a regular polygon of circumradius 1: the distance to the nearest edge's line.
    sector = 2 * math.pi / sides
    local = torch.remainder(phi, sector) - sector / 2
    return r * torch.cos(local) <= math.cos(math.pi / sides)


def _star(r: Tensor, phi: Tensor) -> Tensor:
    sector = 2 * math.pi / 5
    t = (torch.remainder(phi, sector) / sector - 0.5).abs() * 2  # 1 at a tip, 0 between
    return r <= 0.42 + 0.58 * t


def shape_inside(label: int, u: Tensor, v: Tensor) -> Tensor:
    """Whether points ``(u, v)`` (shape-centred, unit size) lie inside class ``label``."""
    r = torch.sqrt(u * u + v * v)
    phi = torch.atan2(v, u)
    name = SHAPES_CLASSES[label]
    if name == "circle":
        return r <= 0.85
    if name == "ring":
        return (r <= 0.95) & (r >= 0.55)
    if name == "ellipse":
        return (u / 1.0) ** 2 + (v / 0.5) ** 2 <= 1.0
    if name == "triangle":
        return _polygon(r, phi + math.pi / 2, 3)
    if name == "square":
        return torch.maximum(u.abs(), v.abs()) <= 0.72
    if name == "pentagon":
        return _polygon(r, phi + math.pi / 2, 5)
    if name == "star":
        return _star(r, phi + math.pi / 2)
    if name == "cross":
        return ((u.abs() <= 0.28) & (v.abs() <= 0.95)) | ((v.abs() <= 0.28) & (u.abs() <= 0.95))
    if name == "crescent":
        return (r <= 0.95) & ((u - 0.45) ** 2 + v ** 2 > 0.75 ** 2)
    if name == "tee":
        # v grows downwards in the image: the bar on top, the stem below it.
        return (((u.abs() <= 0.9) & (v >= -0.9) & (v <= -0.45))
                | ((u.abs() <= 0.25) & (v > -0.45) & (v <= 0.9)))
    raise ValueError(f"no shape class {label}")


def _uniform(n: int, lo: float, hi: float, g: torch.Generator) -> Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g)


def _hsv(h: Tensor, s: Tensor, v: Tensor) -> Tensor:
    """(N, 3, 1, 1) RGB colours from hue in turns, saturation and value in [0, 1]."""
    hsv = torch.stack([h * 2 * math.pi, s, v], dim=1).view(-1, 3, 1, 1)
    return kornia.color.hsv_to_rgb(hsv)


def render_shapes(labels: Tensor, generator: torch.Generator, size: int = SHAPES_SIZE
                  ) -> Tensor:
    """uint8 (N, 3, size, size) images of the shape classes ``labels`` (N,), every nuisance
    drawn from ``generator`` in a fixed order, so the same generator state gives the same
    images."""
    n, g, res = len(labels), generator, size * _SUPERSAMPLE
    scale = _uniform(n, 0.4, 0.65, g)
    reach = 0.6 * (0.95 - scale)
    cx, cy = (2 * torch.rand(2, n, generator=g) - 1) * reach
    angle = _uniform(n, -0.6, 0.6, g)
    fg_value = _uniform(n, 0.6, 1.0, g)
    # The shape brighter than its background (at most 45% of its value), so the shape
    # never vanishes and its outline always has the same polarity; the hues are free, so
    # colour says nothing about the class.
    bg_value = fg_value * _uniform(n, 0.05, 0.45, g)
    fg = _hsv(torch.rand(n, generator=g), _uniform(n, 0.45, 1.0, g), fg_value)
    bg = _hsv(torch.rand(n, generator=g), _uniform(n, 0.0, 0.7, g), bg_value)
    stripe_amp = _uniform(n, 0.0, 0.3, g)
    stripe_freq = _uniform(n, 1.5, 4.0, g)
    stripe_dir = _uniform(n, 0.0, math.pi, g)
    stripe_phase = _uniform(n, 0.0, 2 * math.pi, g)
    light_dir = _uniform(n, 0.0, 2 * math.pi, g)
    light = _uniform(n, 0.0, 0.35, g)
    noise = torch.randn(n, 3, size, size, generator=g) * 0.015

    def col(t: Tensor) -> Tensor:
        return t.view(-1, 1, 1)

    axis = (torch.arange(res, dtype=torch.float32) + 0.5) / res * 2 - 1
    y, x = axis.view(1, -1, 1), axis.view(1, 1, -1)
    dx, dy = (x - col(cx)) / col(scale), (y - col(cy)) / col(scale)
    cos, sin = col(torch.cos(angle)), col(torch.sin(angle))
    u, v = dx * cos + dy * sin, -dx * sin + dy * cos
    inside = torch.zeros(n, res, res, dtype=torch.bool)
    for label in range(len(SHAPES_CLASSES)):
        rows = (labels == label).nonzero().flatten()
        if len(rows):
            inside[rows] = shape_inside(label, u[rows], v[rows])
    stripes = torch.sin(2 * math.pi * col(stripe_freq) * (u * col(torch.cos(stripe_dir))
                                                         + v * col(torch.sin(stripe_dir)))
                        + col(stripe_phase))
    shade = 1 - col(stripe_amp) * 0.5 * (1 + stripes)
    lighting = 1 + col(light) * (x * col(torch.cos(light_dir)) + y * col(torch.sin(light_dir)))
    mask = inside.unsqueeze(1).float()
    img = (fg * shade.unsqueeze(1) * mask + bg * (1 - mask)) * lighting.unsqueeze(1)
    img = F.avg_pool2d(img, _SUPERSAMPLE) + noise
    return (img.clamp(0, 1) * 255).round().to(torch.uint8)


def generate_shapes(seed: int = SHAPES_SEED, size: int = SHAPES_SIZE,
                    counts: dict[str, int] | None = None) -> dict[str, tuple[Tensor, Tensor]]:
    """The splits (``counts``, default :data:`SHAPES_SPLITS`) as ``{split: (uint8 images,
    int64 labels)}``, classes balanced. Drawn as one stream, split after, so no two splits
    share an image."""
    counts = counts or SHAPES_SPLITS
    g = torch.Generator().manual_seed(seed)
    total = sum(counts.values())
    labels = (torch.arange(total) % len(SHAPES_CLASSES))[torch.randperm(total, generator=g)]
    images = torch.cat([render_shapes(chunk, g, size) for chunk in labels.split(_CHUNK)])
    out, start = {}, 0
    for split, count in counts.items():
        out[split] = (images[start:start + count], labels[start:start + count])
        start += count
    return out


def shapes_cache_path(root: Path, seed: int = SHAPES_SEED, size: int = SHAPES_SIZE,
                      counts: dict[str, int] | None = None) -> Path:
    n = "-".join(f"{k}{v}" for k, v in (counts or SHAPES_SPLITS).items())
    return root / "shapes" / f"shapes-v{SHAPES_VERSION}-{size}px-seed{seed}-{n}.pt"


def load_shapes(root: Path, seed: int = SHAPES_SEED, size: int = SHAPES_SIZE,
                counts: dict[str, int] | None = None) -> dict[str, tuple[Tensor, Tensor]]:
    """The cached set under ``root``, built (and cached) on first use."""
    counts = counts or SHAPES_SPLITS
    path = shapes_cache_path(root, seed, size, counts)
    if path.is_file():
        try:
            data = torch.load(path, weights_only=True)
            return {split: (data[f"{split}_images"], data[f"{split}_labels"])
                    for split in counts}
        except Exception as e:  # noqa: BLE001 - a cut or foreign file: say which and how
            raise DataError(f"{path}: unreadable shapes cache ({type(e).__name__}); "
                            "delete it and it is built again") from None
    splits = generate_shapes(seed, size, counts)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save({f"{split}_{kind}": t for split, (images, labels) in splits.items()
                    for kind, t in (("images", images), ("labels", labels))}, tmp)
        tmp.replace(path)  # atomic: a concurrent reader never sees half a file
    except OSError as e:
        # The set is usable without its cache; only the next run pays the build again.
        warnings.warn(f"{path}: cannot cache the shapes data set ({e}); set data.root or "
                      "IWM_DATA to a writable folder to keep it", stacklevel=2)
    return splits
