"""Photometric factors measured on images, and image-quality scores: pure tensor functions.

Each ``*_ratio`` / :func:`hue_shift` reads one jitter factor of :mod:`iwm.data.photometric`
off a pair of images, per image: how much brighter, more contrasted, more saturated or
hue-rotated ``out`` is than ``ref``. Without clipping each recovers the factor exactly
(tested): luminance is linear, brightness scales it, contrast scales its deviations from
the mean, saturation scales every pixel's distance from its grey, hue rotates the HSV hue.
Where the op clipped (bright pixels at brightness > 1) the measure is what the pixels
show, which is less than was asked. :func:`fit_line` turns requested-vs-measured pairs
into a slope and R^2; :func:`psnr` / :func:`ssim` score reconstructions per image.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import kornia
import torch
from torch import Tensor

from iwm.data.photometric import to_grayscale

__all__ = ["MEASURES", "LineFit", "brightness_ratio", "contrast_ratio", "fit_line",
           "hue_shift", "luminance", "measure_factor", "psnr", "saturation_ratio", "ssim"]

_EPS = 1e-3
"""Below this (a quarter of an 8-bit level) a mean, std or chroma is nothing to measure:
grey pixels keep a chroma of 1e-4 of their value, as torchvision's luma weights sum to
0.9999."""
SSIM_WINDOW = 11
"""Gaussian window of :func:`ssim` (sigma 1.5, kornia's), the standard SSIM setting."""


def luminance(x: Tensor) -> Tensor:
    """(B, H*W) luma (ITU-R 601, torchvision's weights) of images (B, C, H, W), C = 1 or 3."""
    return to_grayscale(x.float())[:, 0].flatten(1)


def _ratio(num: Tensor, den: Tensor) -> Tensor:
    # An image with nothing to measure (black, flat) gives NaN, which fit_line drops.
    return torch.where(den > _EPS, num / den.clamp_min(_EPS), torch.full_like(num, math.nan))


def brightness_ratio(out: Tensor, ref: Tensor) -> Tensor:
    """(B,) mean luminance of ``out`` over that of ``ref``: b for adjust_brightness(ref, b)."""
    return _ratio(luminance(out).mean(1), luminance(ref).mean(1))


def contrast_ratio(out: Tensor, ref: Tensor) -> Tensor:
    """(B,) std of the luminance of ``out`` over that of ``ref``: c for adjust_contrast."""
    return _ratio(luminance(out).std(1), luminance(ref).std(1))


def _chroma(x: Tensor) -> Tensor:
    """(B,) mean distance of every channel from the pixel's luma."""
    return (x.float() - to_grayscale(x.float())).abs().flatten(1).mean(1)


def saturation_ratio(out: Tensor, ref: Tensor) -> Tensor:
    """(B,) mean |pixel - its luma| of ``out`` over that of ``ref`` (RGB): s for
    adjust_saturation, which blends every pixel with its luma and keeps the luma."""
    return _ratio(_chroma(out), _chroma(ref))


def _pixel_chroma(x: Tensor) -> Tensor:
    """(B, H*W) max - min over the channels: 0 for a grey pixel, whose hue means nothing."""
    return (x.float().amax(1) - x.float().amin(1)).flatten(1)


def hue_shift(out: Tensor, ref: Tensor) -> Tensor:
    """(B,) circular mean of the per-pixel hue change from ``ref`` to ``out``, in turns in
    (-0.5, 0.5] (RGB): h for adjust_hue. Pixels count by their chroma in both images, so
    greys (whose hue is arbitrary) count for nothing; NaN where no pixel has colour."""
    hsv_out, hsv_ref = kornia.color.rgb_to_hsv(out.float()), kornia.color.rgb_to_hsv(ref.float())
    delta = (hsv_out[:, 0] - hsv_ref[:, 0]).flatten(1)
    weight = _pixel_chroma(out) * _pixel_chroma(ref)
    turns = torch.atan2((weight * delta.sin()).sum(1), (weight * delta.cos()).sum(1))
    turns = turns / (2 * math.pi)
    return torch.where(weight.sum(1) > _EPS, turns, torch.full_like(turns, math.nan))


MEASURES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "brightness": brightness_ratio, "contrast": contrast_ratio,
    "saturation": saturation_ratio, "hue": hue_shift}
"""The measure of each factor of :data:`~iwm.data.factors.JITTER_FACTORS`."""


def measure_factor(factor: str, out: Tensor, ref: Tensor) -> Tensor:
    """(B,) ``factor`` of ``out`` relative to ``ref`` (a ratio, or a hue shift in turns)."""
    if factor not in MEASURES:
        raise ValueError(f"no measure for {factor!r}; factors: {', '.join(MEASURES)}")
    return MEASURES[factor](out, ref)


@dataclass(frozen=True)
class LineFit:
    """Least-squares ``y = intercept + slope * x`` over the finite pairs."""

    slope: float | None
    intercept: float | None
    r2: float | None
    """1 - residual / total sum of squares of y; None where y does not vary."""
    n: int


def fit_line(x: Tensor, y: Tensor) -> LineFit:
    """The least-squares line through ``(x, y)`` (both (N,)); pairs with a NaN/inf are left
    out; slope and R^2 are None with fewer than 2 pairs or no spread in ``x``."""
    x, y = x.double().flatten(), y.double().flatten()
    keep = x.isfinite() & y.isfinite()
    x, y = x[keep], y[keep]
    n = int(keep.sum())
    if n < 2 or float(x.var()) < 1e-18:
        return LineFit(None, None, None, n)
    dx, dy = x - x.mean(), y - y.mean()
    slope = float((dx * dy).sum() / (dx * dx).sum())
    intercept = float(y.mean() - slope * x.mean())
    total = float((dy * dy).sum())
    residual = float(((y - intercept - slope * x) ** 2).sum())
    r2 = None if total < 1e-18 else 1.0 - residual / total
    return LineFit(slope, intercept, r2, n)


def psnr(x: Tensor, y: Tensor) -> Tensor:
    """(B,) peak signal-to-noise ratio in dB of images in [0, 1], per image."""
    mse = (x.float() - y.float()).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-10))


def ssim(x: Tensor, y: Tensor) -> Tensor:
    """(B,) mean structural similarity per image (kornia: Gaussian window 11, sigma 1.5,
    the standard constants), over the positions the whole window fits ('valid')."""
    window = min(SSIM_WINDOW, x.shape[-1], x.shape[-2]) | 1
    if window > min(x.shape[-2:]):
        window -= 2
    return kornia.metrics.ssim(x.float(), y.float(), window, max_val=1.0,
                               padding="valid").flatten(1).mean(1)
