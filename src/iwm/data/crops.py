"""Batched random-resized crops on any device.

Same distribution of boxes as torchvision's ``RandomResizedCrop`` (area fraction uniform in
``scale``, aspect ratio log-uniform in ``ratio``, up to 10 tries, then a centre crop), but
for a whole batch at once: every sample draws all its candidate boxes in one call, and all
crops are resampled in one ``grid_sample``. That keeps the data pipeline of in-memory data
sets on the GPU with no per-sample Python work.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from iwm.data.shard import SINGLE, Shard

ATTEMPTS = 10
"""Candidate boxes per sample, as torchvision's retries."""


def _rand(n: tuple[int, ...], generator: torch.Generator | None,
          device: torch.device) -> torch.Tensor:
    # Draw where the generator lives, then move: lets a CPU generator drive GPU crops.
    gen_device = generator.device if generator is not None else device
    return torch.rand(n, generator=generator, device=gen_device).to(device)


def sample_crop_boxes(
    n: int,
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Draw ``n`` boxes ``(top, left, h, w)`` (int64, shape (n, 4)) in a ``height`` x
    ``width`` image. The number of random numbers drawn does not depend on which candidate
    fits, so the generator's stream stays aligned across runs."""
    device = torch.device(device) if device is not None else (
        generator.device if generator is not None else torch.device("cpu"))
    area = float(height * width)
    u_area = _rand((n, ATTEMPTS), generator, device)
    u_ratio = _rand((n, ATTEMPTS), generator, device)
    u_pos = _rand((n, 2), generator, device)
    target = area * (scale[0] + (scale[1] - scale[0]) * u_area)
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * u_ratio)
    # float64 so rounding to whole pixels matches torchvision's Python-float arithmetic.
    w = torch.round(torch.sqrt(target.double() * aspect.double())).long()
    h = torch.round(torch.sqrt(target.double() / aspect.double())).long()
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.to(torch.uint8).argmax(dim=1, keepdim=True)  # first True (0 if none)
    ok = fits.any(dim=1)
    w = w.gather(1, first).squeeze(1)
    h = h.gather(1, first).squeeze(1)

    # torchvision's fallback: the largest centred box whose ratio is clamped into range.
    in_ratio = width / height
    if in_ratio < min(ratio):
        fw, fh = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        fw, fh = int(round(height * max(ratio))), height
    else:
        fw, fh = width, height
    w = torch.where(ok, w, fw)
    h = torch.where(ok, h, fh)
    # Uniform integer offsets in [0, H - h] and [0, W - w] (randint with per-sample bounds).
    top = torch.floor(u_pos[:, 0].double() * (height - h + 1)).long().clamp_max(height - h)
    left = torch.floor(u_pos[:, 1].double() * (width - w + 1)).long().clamp_max(width - w)
    top = torch.where(ok, top, (height - fh) // 2)
    left = torch.where(ok, left, (width - fw) // 2)
    return torch.stack([top, left, h, w], dim=1)


def resized_crops(
    images: torch.Tensor,
    boxes: torch.Tensor,
    size: int,
    flip: torch.Tensor | None = None,
) -> torch.Tensor:
    """Crop ``boxes`` (n, 4: top, left, h, w) out of uint8 ``images`` (n, C, H, W), resize
    each to ``size`` x ``size`` (bilinear, no antialiasing) and mirror where ``flip``.
    Returns float (n, C, size, size) in [0, 1]; equals torchvision's ``resized_crop``
    (``antialias=False``) on the same box."""
    n, _, height, width = images.shape
    x = images.float().div_(255) if images.dtype == torch.uint8 else images.float()
    b = boxes.to(device=x.device, dtype=torch.float32)
    top, left, h, w = b.unbind(1)
    sx = w / width
    if flip is not None:
        sx = torch.where(flip.to(x.device), -sx, sx)
    # Output pixel u (normalised, align_corners=False) samples the input at
    # x = u * w/W + (2*left + w)/W - 1: the box's pixel grid stretched over the output.
    theta = torch.zeros(n, 2, 3, device=x.device)
    theta[:, 0, 0] = sx
    theta[:, 0, 2] = (2 * left + w) / width - 1
    theta[:, 1, 1] = h / height
    theta[:, 1, 2] = (2 * top + h) / height - 1
    grid = F.affine_grid(theta, [n, x.shape[1], size, size], align_corners=False)
    # When upscaling, edge outputs fall outside the box's outer pixel centres; resize-of-crop
    # clamps there (replicates the box edge) instead of blending in pixels beyond the box.
    lo_x = (2 * left + 1) / width - 1
    hi_x = (2 * (left + w) - 1) / width - 1
    lo_y = (2 * top + 1) / height - 1
    hi_y = (2 * (top + h) - 1) / height - 1
    lo = torch.stack([lo_x, lo_y], dim=1)[:, None, None, :]
    hi = torch.stack([hi_x, hi_y], dim=1)[:, None, None, :]
    grid = torch.maximum(torch.minimum(grid, hi), lo)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out.clamp_(0.0, 1.0)


def random_resized_crop(
    images: torch.Tensor,
    size: int,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    hflip: bool = True,
    generator: torch.Generator | None = None,
    shard: Shard = SINGLE,
) -> torch.Tensor:
    """Random-resized crop (+ horizontal flip with p=0.5 if ``hflip``) of every image of
    uint8 (B, C, H, W) ``images``; float (B, C, size, size) in [0, 1] on the same device.

    With a ``shard``, ``images`` are that shard's rows of a global batch: the boxes are
    drawn for the whole global batch and this shard's rows used."""
    n, _, height, width = images.shape
    rows = shard.rows(n)
    boxes = sample_crop_boxes(n * shard.count, height, width, scale, ratio, generator,
                              images.device)[rows]
    flip = (_rand((n * shard.count,), generator, images.device) < 0.5)[rows] if hflip else None
    return resized_crops(images, boxes, size, flip)


def center_resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """Deterministic evaluation view: the central square of each image resized to ``size``
    x ``size`` (antialiased when shrinking). uint8 (B, C, H, W) -> float in [0, 1]."""
    x = images.float().div_(255) if images.dtype == torch.uint8 else images.float()
    height, width = x.shape[-2:]
    side = min(height, width)
    if height != width:
        top, left = (height - side) // 2, (width - side) // 2
        x = x[..., top:top + side, left:left + side]
    if side != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                          antialias=side > size)
    return x.clamp(0.0, 1.0)
