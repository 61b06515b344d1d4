"""ViT encoder: timm's VisionTransformer with fixed sin-cos positions and token masking.

Subclassing timm (instead of re-writing blocks) keeps the state-dict keys identical to
timm's, so a trained encoder loads into ``timm.create_model`` unchanged; the only addition
is :meth:`Encoder.forward_tokens`, which drops tokens *before* the transformer so the
context encoder only pays for the context patches.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor

from iwm.config import EncoderName
from iwm.errors import ConfigError
from iwm.models.tokens import gather_tokens, grid_size, sincos_pos_embed


@dataclass(frozen=True)
class EncoderSpec:
    embed_dim: int
    depth: int
    num_heads: int
    timm_name: str
    """The timm architecture with the same blocks (for export; size kwargs override it)."""


ENCODERS: dict[EncoderName, EncoderSpec] = {
    # Not a published size: the tiny presets' encoder, small enough to pretrain on a CPU.
    "vit_micro": EncoderSpec(128, 6, 4, "vit_tiny_patch16_224"),
    "vit_tiny": EncoderSpec(192, 12, 3, "vit_tiny_patch16_224"),
    "vit_small": EncoderSpec(384, 12, 6, "vit_small_patch16_224"),
    "vit_base": EncoderSpec(768, 12, 12, "vit_base_patch16_224"),
    "vit_large": EncoderSpec(1024, 24, 16, "vit_large_patch16_224"),
    "vit_huge": EncoderSpec(1280, 32, 16, "vit_huge_patch14_224"),
}


def encoder_spec(name: str) -> EncoderSpec:
    if name not in ENCODERS:
        raise ConfigError(f"model.encoder={name!r}: unknown; choose from {', '.join(ENCODERS)}")
    return ENCODERS[name]


class Encoder(VisionTransformer):
    """A ViT without class token whose pooled output is the mean of the final-normed tokens."""

    def __init__(self, *, img_size: int, patch_size: int, in_chans: int, embed_dim: int,
                 depth: int, num_heads: int, drop_path_rate: float = 0.0) -> None:
        super().__init__(
            img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim,
            depth=depth, num_heads=num_heads, num_classes=0, global_pool="avg",
            class_token=False, fc_norm=False, drop_path_rate=drop_path_rate,
        )
        self.grid = grid_size(img_size, patch_size)
        assert self.pos_embed is not None  # timm leaves it None only for pos_embed="none"
        with torch.no_grad():
            self.pos_embed.copy_(sincos_pos_embed(self.grid, embed_dim).unsqueeze(0))
        self.pos_embed.requires_grad_(False)

    def forward_tokens(self, x: Tensor, keep: Tensor | None = None,
                       keep_valid: Tensor | None = None) -> Tensor:
        """Images (B, C, H, W) -> normed tokens (B, N, D), or (B, K, D) for ``keep`` (B, K).

        ``keep_valid`` (B, K) bool marks padding in ``keep`` (False): no token attends to
        it, so the valid tokens come out as if the padding were not there.
        """
        x = self.patch_embed(x) + self.pos_embed
        if keep is not None:
            x = gather_tokens(x, keep)
        attn_mask = None if keep_valid is None else keep_valid[:, None, None, :]
        for block in self.blocks:
            if self.grad_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(block, x, attn_mask, use_reentrant=False)
            else:
                x = block(x, attn_mask=attn_mask)
        return self.norm(x)

    def fingerprint(self) -> str:
        """A short hash of the first and last tensors: any training step moves them (the EMA
        moves every weight), so a result made with one encoder can tell another apart, even
        one of the same architecture at the same step (another seed or preset)."""
        state = self.state_dict()
        digest = hashlib.sha256()
        for key in ("patch_embed.proj.weight", "norm.weight", "norm.bias"):
            digest.update(state[key].detach().float().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()[:16]

    # Narrower than timm's forward on purpose: masking goes through forward_tokens.
    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        """Mean-pooled features (B, D), as timm's ``forward`` with ``num_classes=0``."""
        return self.forward_tokens(x).mean(dim=1)


def create_encoder(name: str, *, img_size: int, patch_size: int, in_chans: int,
                   drop_path_rate: float = 0.0) -> Encoder:
    spec = encoder_spec(name)
    return Encoder(img_size=img_size, patch_size=patch_size, in_chans=in_chans,
                   embed_dim=spec.embed_dim, depth=spec.depth, num_heads=spec.num_heads,
                   drop_path_rate=drop_path_rate)
