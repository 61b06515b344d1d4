"""Image files as a model's input: the one conversion :meth:`iwm.PretrainedEncoder.load_images`
and ``iwm embed`` share (below :mod:`iwm.api`, so that neither imports the other)."""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from iwm.data.datasets import load_image
from iwm.data.photometric import to_grayscale
from iwm.data.sources import eval_view
from iwm.errors import IWMError


def check_channels(channels: int) -> None:
    if channels not in (1, 3):
        raise IWMError(f"the model takes {channels}-channel images; only 1 (grayscale) and 3 "
                       "(RGB) can be made from image files")


def to_channels(images: torch.Tensor, channels: int) -> torch.Tensor:
    """Decoded RGB images (B, 3, H, W) -> the model's channels: luma for 1, as is for 3."""
    return to_grayscale(images)[:, :1] if channels == 1 else images


def read_images(files: Sequence[str | os.PathLike[str]], image_size: int,
                channels: int) -> torch.Tensor:
    """Image files -> (B, channels, image_size, image_size) floats in [0, 1] on the CPU,
    each file's evaluation view; a :class:`DataError` for a file that cannot be read."""
    check_channels(channels)
    if not files:
        raise ValueError("no image files given")
    views = torch.stack([eval_view(load_image(f), image_size) for f in files])
    return to_channels(views.float().div_(255), channels)
