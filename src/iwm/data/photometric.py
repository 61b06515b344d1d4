"""Batched photometric operations with per-sample parameters.

Every function takes float images ``(B, C, H, W)`` in [0, 1] (C = 1 or 3) and parameters
given per sample as ``(B,)`` tensors (a Python number or 0-d tensor is broadcast to the
batch). One call transforms the whole batch with tensor ops, so a batch of views with
independently drawn parameters costs the same as a batch sharing one set.

The semantics are torchvision's (``torchvision.transforms.v2.functional``), which the
tests check image by image: the world model is asked to undo/apply exactly these
transformations, and matching a well-known reference keeps the paper's "ColorJitter
semantics" literal. Where kornia's batched op agrees with torchvision (hue) it is used;
the blends are written here because kornia's grayscale weights (0.299) differ from
torchvision's (0.2989), and the Gaussian blur because kornia's reads its sigmas back on
the host (``gaussian_blur2d`` checks ``sigma > 0`` with a ``.item()``), which would make
every training step wait for the GPU.
"""

from __future__ import annotations

import math

import kornia
import torch
import torch.nn.functional as F
from torch import Tensor

# ITU-R 601 luma weights, as torchvision's rgb_to_grayscale (note 0.2989, not 0.299).
_LUMA = (0.2989, 0.587, 0.114)


def _per_sample(value: Tensor | float, x: Tensor) -> Tensor:
    """Broadcastable ``(B, 1, 1, 1)`` view of a per-sample parameter, in ``x``'s dtype."""
    v = torch.as_tensor(value, dtype=x.dtype, device=x.device)
    if v.ndim == 0:
        v = v.expand(x.shape[0])
    if v.shape != (x.shape[0],):
        raise ValueError(f"per-sample parameter has shape {tuple(v.shape)}, "
                         f"expected ({x.shape[0]},) for a batch of {x.shape[0]}")
    return v.view(-1, 1, 1, 1)


def _check_image(x: Tensor) -> int:
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"expected images (B, C, H, W) with C = 1 or 3, got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"expected float images in [0, 1], got dtype {x.dtype}")
    return x.shape[1]


def _luma(x: Tensor) -> Tensor:
    """``(B, 1, H, W)`` luma of RGB images."""
    r, g, b = x.unbind(dim=1)
    return (r * _LUMA[0] + g * _LUMA[1] + b * _LUMA[2]).unsqueeze(1)


def _blend(x: Tensor, other: Tensor, factor: Tensor) -> Tensor:
    """``factor * x + (1 - factor) * other``, clamped: factor > 1 extrapolates away from other."""
    return (x * factor + other * (1.0 - factor)).clamp(0.0, 1.0)


def adjust_brightness(x: Tensor, factor: Tensor | float) -> Tensor:
    """Multiply by ``factor`` (>= 0) and clamp to [0, 1]."""
    _check_image(x)
    return (x * _per_sample(factor, x)).clamp(0.0, 1.0)


def adjust_contrast(x: Tensor, factor: Tensor | float) -> Tensor:
    """Blend each image with the (scalar) mean of its grayscale version."""
    c = _check_image(x)
    gray = _luma(x) if c == 3 else x
    mean = gray.mean(dim=(1, 2, 3), keepdim=True)
    return _blend(x, mean, _per_sample(factor, x))


def adjust_saturation(x: Tensor, factor: Tensor | float) -> Tensor:
    """Blend each image with its grayscale version; identity on 1-channel images."""
    if _check_image(x) == 1:
        return x
    return _blend(x, _luma(x), _per_sample(factor, x))


def adjust_hue(x: Tensor, shift: Tensor | float) -> Tensor:
    """Rotate the hue by ``shift`` turns (in [-0.5, 0.5]); identity on 1-channel images."""
    if _check_image(x) == 1:
        return x
    # kornia measures hue in radians; its HSV round trip matches torchvision to ~1e-6.
    radians = _per_sample(shift, x).view(-1) * (2.0 * math.pi)
    return kornia.enhance.adjust_hue(x, radians)


def to_grayscale(x: Tensor) -> Tensor:
    """Luma replicated over the input's channels (so the shape, and the model input, stay)."""
    if _check_image(x) == 1:
        return x
    return _luma(x).expand_as(x).contiguous()


def gaussian_blur(x: Tensor, sigma: Tensor | float, kernel_size: int) -> Tensor:
    """Gaussian blur with a per-sample ``sigma``; samples with ``sigma <= 0`` are unchanged.

    The kernel is square and isotropic with reflect padding (torchvision's GaussianBlur).
    Non-positive sigmas mark "not blurred" so a batch where only some images are blurred
    is still one call.
    """
    _check_image(x)
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be a positive odd integer, got {kernel_size}")
    b, c, h, w = x.shape
    half = kernel_size // 2
    if half >= min(h, w):
        raise ValueError(f"kernel_size {kernel_size} needs images larger than {half} pixels "
                         f"for reflect padding, got {h} x {w}")
    s = _per_sample(sigma, x).view(-1)
    keep = s <= 0
    # A placeholder sigma keeps the kernel finite for the samples that are left unchanged.
    s_safe = torch.where(keep, torch.ones_like(s), s)
    # torchvision's kernel: a normalised Gaussian sampled at -half..half, separable. One
    # depthwise convolution per direction over the batch's B*C planes, each with its own
    # sample's kernel, so that nothing is read back on the host.
    t = torch.arange(-half, half + 1, dtype=x.dtype, device=x.device)
    kernel = torch.exp(-0.5 * (t / s_safe[:, None]) ** 2)
    kernel = (kernel / kernel.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)
    planes = F.pad(x, (half, half, half, half), mode="reflect").reshape(1, b * c, h + 2 * half,
                                                                         w + 2 * half)
    planes = F.conv2d(planes, kernel.view(b * c, 1, 1, kernel_size), groups=b * c)
    blurred = F.conv2d(planes, kernel.view(b * c, 1, kernel_size, 1), groups=b * c)
    return torch.where(keep.view(-1, 1, 1, 1), x, blurred.view(b, c, h, w))


def solarize(x: Tensor, apply: Tensor | bool, threshold: float = 0.5) -> Tensor:
    """Invert pixels ``>= threshold`` in the samples where ``apply`` is true."""
    _check_image(x)
    flag = torch.as_tensor(apply, dtype=torch.bool, device=x.device)
    if flag.ndim == 0:
        flag = flag.expand(x.shape[0])
    if flag.shape != (x.shape[0],):
        raise ValueError(f"apply has shape {tuple(flag.shape)}, expected ({x.shape[0]},)")
    hit = flag.view(-1, 1, 1, 1) & (x >= threshold)
    return torch.where(hit, 1.0 - x, x)
