"""Task heads on top of encoder tokens: attentive pooling/classification and dense linear heads.

The attentive probe follows the JEPA papers (I-JEPA/V-JEPA evaluation): a small set of learned
queries cross-attends to the frozen patch tokens, so the head can *select* the tokens that matter
instead of averaging them away as the linear probe on mean-pooled features does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import Mlp, trunc_normal_
from torch import Tensor, nn


class CrossAttentionBlock(nn.Module):
    """Pre-norm block: queries cross-attend to tokens, then an MLP, each with a residual."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim={dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.norm_q = nn.LayerNorm(dim)
        # Tokens get their own norm: the queries are free parameters whose scale can drift,
        # the tokens come from a (possibly differently scaled) frozen encoder.
        self.norm_kv = nn.LayerNorm(dim)
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def _heads(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        return x.view(b, n, self.num_heads, d // self.num_heads).transpose(1, 2)

    def forward(self, queries: Tensor, tokens: Tensor) -> Tensor:
        q = self._heads(self.q(self.norm_q(queries)))
        k, v = (self._heads(t) for t in self.kv(self.norm_kv(tokens)).chunk(2, dim=-1))
        out = F.scaled_dot_product_attention(q, k, v)  # (B, H, Q, D/H)
        queries = queries + self.proj(out.transpose(1, 2).flatten(2))
        return queries + self.mlp(self.norm_mlp(queries))


class AttentivePooler(nn.Module):
    """(B, N, D) tokens -> (B, num_queries, D): learned queries cross-attend to the tokens.

    ``depth`` stacks cross-attention blocks; every block attends to the same input tokens, so a
    later block can refine *what* to look at given what the earlier one pooled.
    """

    def __init__(self, dim: int, num_heads: int = 4, num_queries: int = 1,
                 mlp_ratio: float = 4.0, depth: int = 1) -> None:
        super().__init__()
        if depth < 1 or num_queries < 1:
            raise ValueError(f"depth={depth} and num_queries={num_queries} must be >= 1")
        self.query_tokens = nn.Parameter(torch.zeros(1, num_queries, dim))
        self.blocks = nn.ModuleList(
            CrossAttentionBlock(dim, num_heads, mlp_ratio) for _ in range(depth))
        trunc_normal_(self.query_tokens, std=0.02)
        self.apply(_init_weights)

    def forward(self, tokens: Tensor) -> Tensor:
        queries = self.query_tokens.expand(tokens.shape[0], -1, -1)
        for block in self.blocks:
            queries = block(queries, tokens)
        return queries


class AttentiveClassifier(nn.Module):
    """(B, N, D) tokens -> (B, num_classes) logits: 1-query attentive pooler, LayerNorm, Linear."""

    def __init__(self, dim: int, num_classes: int, num_heads: int = 4) -> None:
        super().__init__()
        self.pooler = AttentivePooler(dim, num_heads=num_heads, num_queries=1)
        self.norm = nn.LayerNorm(dim)
        self.linear = nn.Linear(dim, num_classes)
        _init_weights(self.linear)

    def forward(self, tokens: Tensor) -> Tensor:
        return full_precision_logits(self.linear, self.norm(self.pooler(tokens).squeeze(1)))


class PooledLinearClassifier(nn.Module):
    """(B, N, D) tokens -> (B, num_classes) logits: mean over tokens, LayerNorm, Linear (the
    head of MAE / BEiT finetuning; no learned pooling, so the backbone must do the work)."""

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.linear = nn.Linear(dim, num_classes)
        _init_weights(self.linear)

    def forward(self, tokens: Tensor) -> Tensor:
        return full_precision_logits(self.linear, self.norm(tokens.mean(1)))


class LinearSegmentationHead(nn.Module):
    """(B, N, D) tokens -> (B, N, num_classes): the same linear classifier applied to every token.

    Deliberately linear: on frozen features it measures how much per-patch semantics the
    encoder itself carries (reshape to the patch grid and upsample for pixel-level masks).
    """

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.linear = nn.Linear(dim, num_classes)
        _init_weights(self.linear)

    def forward(self, tokens: Tensor) -> Tensor:
        return full_precision_logits(self.linear, self.norm(tokens))


def full_precision_logits(linear: nn.Linear, x: Tensor) -> Tensor:
    """``linear(x)`` in float32 even under autocast: a head started as a linear probe
    (``finetune.head_init=probe``) can have large weights and a large bias that cancel,
    and in bf16 (8 bits of mantissa) that cancellation leaves noise instead of logits. A
    (D x classes) product costs nothing beside the backbone."""
    with torch.autocast(x.device.type, enabled=False):
        return linear(x.float())


def _init_weights(module: nn.Module) -> None:
    # ViT-style init (as timm/I-JEPA): small truncated-normal weights, zero biases.
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
