"""Token-level helpers shared by the encoder, predictor and training model."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def gather_tokens(x: Tensor, idx: Tensor) -> Tensor:
    """Select tokens: ``x`` (B, N, D), ``idx`` (B, K) long -> (B, K, D)."""
    return torch.gather(x, 1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def sincos_pos_embed(grid: tuple[int, int], dim: int) -> Tensor:
    """Fixed 2-D sine-cosine position embedding, (H*W, dim), rows in row-major patch order.

    Half the channels encode the row, half the column, each as sin/cos at geometric
    frequencies (as in MAE / I-JEPA); fixed embeddings keep the encoder resolution-agnostic
    and give the predictor's mask tokens a position it cannot overfit.
    """
    if dim % 4:
        raise ValueError(f"embedding width {dim} must be divisible by 4 for 2-D sin-cos")
    h, w = grid
    rows, cols = torch.meshgrid(
        torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij"
    )
    quarter = dim // 4
    freqs = 1.0 / (10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter))

    def encode(pos: Tensor) -> Tensor:
        angles = pos.reshape(-1, 1) * freqs
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([encode(rows), encode(cols)], dim=1).float()


def grid_size(image_size: int, patch_size: int) -> tuple[int, int]:
    return (image_size // patch_size, image_size // patch_size)


def num_patches(image_size: int, patch_size: int) -> int:
    return math.prod(grid_size(image_size, patch_size))
