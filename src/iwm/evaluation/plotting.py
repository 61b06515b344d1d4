"""Matplotlib for the evaluations' figures, the one way they get it."""

from __future__ import annotations

from typing import Any

from torch import Tensor


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend.

    Agg: figures are written on servers without a display. Imported lazily because
    matplotlib is slow to import and only the commands that draw need it.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def show_image(ax: Any, image: Tensor) -> None:
    """One (C, H, W) image in [0, 1] on a matplotlib axis, without ticks."""
    img = image.float().clamp(0, 1)
    if img.shape[0] == 1:
        ax.imshow(img[0].numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    else:
        ax.imshow(img.permute(1, 2, 0).numpy(), interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
