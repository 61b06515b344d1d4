"""Which kernel timm's self-attention runs: one fused SDPA call, or matmul + softmax.

The choice changes speed only (both compute softmax(q k^T / sqrt(d)) v with the same
padding mask). On CUDA, scaled_dot_product_attention reaches the flash and memory-
efficient kernels. On CPU its flash kernel loses to two MKL batched matmuls for the short
sequences of a ViT, clearly in bf16 (the measurements are in docs/RESULTS.md).
"""

from __future__ import annotations

import typing

import torch
from timm.models.vision_transformer import Attention
from torch import nn

from iwm.config import AttentionKernel

KERNELS = tuple(k for k in typing.get_args(AttentionKernel) if k != "auto")


def resolve_attention(setting: str, device: torch.device) -> str:
    """``train.attention`` on ``device``: auto is matmul on CPU, where it was measured to
    win, and sdpa on every accelerator (CUDA, MPS, ...)."""
    if setting == "auto":
        return "matmul" if device.type == "cpu" else "sdpa"
    if setting not in KERNELS:
        raise ValueError(f"attention kernel {setting!r}: choose auto, {' or '.join(KERNELS)}")
    return setting


def set_attention(module: nn.Module, kernel: str) -> int:
    """Make every timm self-attention layer in ``module`` use ``kernel``; returns how many
    layers it set (0 means the module has none, a sign of a wrong module)."""
    if kernel not in KERNELS:
        raise ValueError(f"attention kernel {kernel!r}: choose {' or '.join(KERNELS)}")
    layers = [m for m in module.modules() if isinstance(m, Attention)]
    for layer in layers:
        # timm marks it Final for TorchScript; timm itself sets it per layer like this.
        layer.fused_attn = kernel == "sdpa"  # type: ignore[misc]
    return len(layers)
