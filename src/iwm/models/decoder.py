"""The latent decoder: target-space tokens -> pixels, to see what the world model predicts.

The predictor predicts the EMA target encoder's tokens layer-normed without affine
(:meth:`iwm.models.iwm.IWM.target_tokens`). The decoder reads exactly that space: it
layer-norms its input the same way first, which is the identity on a prediction and turns
raw encoder tokens (``Pretrained.encode``) into targets, so both decode alike. It renders
only what the latents hold: an encoder invariant to a factor leaves nothing to render.

Architecture (a small MAE-style decoder): linear to ``width``, a learned position
embedding, ``depth`` timm ViT blocks, LayerNorm, a linear map of every token to its
``patch_size x patch_size x channels`` pixels, unpatchify, sigmoid into [0, 1].
:class:`DecoderSpec` holds every shape; it is saved beside the weights so the decoder can
be rebuilt without the run's config.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from iwm.errors import CheckpointError
from iwm.models.encoder_io import state_shapes_mismatch
from iwm.models.vit import Encoder


@dataclass(frozen=True)
class DecoderSpec:
    """Everything that shapes a :class:`LatentDecoder` (and so its state dict)."""

    embed_dim: int
    """Width of the encoder tokens it reads."""
    grid: tuple[int, int]
    """Token grid (rows, columns) of the encoder."""
    patch_size: int
    in_chans: int
    width: int
    depth: int
    num_heads: int
    mlp_ratio: float = 4.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "grid", tuple(int(g) for g in self.grid))

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "grid": list(self.grid)}

    @classmethod
    def from_dict(cls, data: Any, where: str = "decoder") -> DecoderSpec:
        names = [f.name for f in dataclasses.fields(cls)]
        if not isinstance(data, dict) or any(k not in data for k in names[:-1]):
            raise CheckpointError(f"{where}: no decoder spec with {', '.join(names[:-1])}; "
                                  "train it again with `iwm decoder RUN`")
        try:
            return cls(**{k: data[k] for k in names if k in data})
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{where}: bad decoder spec ({e})") from None

    @classmethod
    def for_encoder(cls, encoder: Encoder, width: int, depth: int, num_heads: int,
                    mlp_ratio: float = 4.0) -> DecoderSpec:
        """The spec of a decoder for ``encoder``'s tokens, read off the encoder itself."""
        return cls(embed_dim=encoder.embed_dim, grid=encoder.grid,
                   patch_size=encoder.patch_embed.patch_size[0],
                   in_chans=encoder.patch_embed.proj.in_channels, width=width, depth=depth,
                   num_heads=num_heads, mlp_ratio=mlp_ratio)


class LatentDecoder(nn.Module):
    """Tokens (B, N, D) of the encoder's grid -> images (B, C, H, W) in [0, 1]."""

    def __init__(self, spec: DecoderSpec) -> None:
        super().__init__()
        if spec.width % spec.num_heads:
            raise ValueError(f"decoder width {spec.width} is not divisible by "
                             f"{spec.num_heads} heads")
        self.spec = spec
        rows, cols = spec.grid
        self.embed = nn.Linear(spec.embed_dim, spec.width)
        # Learned, not sin-cos: the decoder is trained on one grid only, and a learned
        # embedding costs nothing at 49-256 tokens.
        self.pos_embed = nn.Parameter(torch.zeros(1, rows * cols, spec.width))
        self.blocks = nn.Sequential(*(
            Block(spec.width, spec.num_heads, mlp_ratio=spec.mlp_ratio, qkv_bias=True,
                  norm_layer=nn.LayerNorm) for _ in range(spec.depth)))
        self.norm = nn.LayerNorm(spec.width)
        self.head = nn.Linear(spec.width, spec.patch_size ** 2 * spec.in_chans)
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    @property
    def num_tokens(self) -> int:
        return self.spec.grid[0] * self.spec.grid[1]

    def forward(self, tokens: Tensor) -> Tensor:
        s = self.spec
        # The predictor's target space; a no-op on predictions, which are already in it.
        x = F.layer_norm(tokens, tokens.shape[-1:])
        x = self.blocks(self.embed(x) + self.pos_embed)
        return torch.sigmoid(unpatchify(self.head(self.norm(x)).float(), s.grid,
                                        s.patch_size))


def unpatchify(patches: Tensor, grid: tuple[int, int], patch_size: int) -> Tensor:
    """(B, N, C * p * p) per-token pixels, each token's (C, p, p) flattened, tokens in
    row-major grid order -> images (B, C, rows * p, cols * p)."""
    rows, cols = grid
    return F.fold(patches.transpose(1, 2), (rows * patch_size, cols * patch_size),
                  kernel_size=patch_size, stride=patch_size)


def decoder_meta(decoder: LatentDecoder, encoder: Encoder, step: int,
                 **extra: Any) -> dict[str, Any]:
    """What ``decoder.json`` holds: the spec, the encoder it reads (the step of its
    checkpoint and :meth:`Encoder.fingerprint`), plus ``extra`` (how it was trained)."""
    return {"format": "iwm-decoder", "format_version": 1, "spec": decoder.spec.to_dict(),
            "encoder_step": int(step), "encoder_fingerprint": encoder.fingerprint(),
            **extra}


def decoder_for(meta: dict[str, Any], state: dict[str, Tensor], encoder: Encoder,
                where: str) -> tuple[LatentDecoder | None, str]:
    """The decoder ``meta`` + ``state`` describe, if it reads ``encoder``'s tokens:
    ``(decoder, "")``, else ``(None, why)``, e.g. a decoder trained before the run
    trained on (its encoder changed since, so its renderings would be of another one)."""
    spec = DecoderSpec.from_dict(meta.get("spec"), where)
    own = DecoderSpec.for_encoder(encoder, spec.width, spec.depth, spec.num_heads,
                                  spec.mlp_ratio)
    if own != spec:
        return None, (f"{where} was trained for another encoder ({spec.embed_dim}-wide "
                      f"tokens on a {spec.grid[0]}x{spec.grid[1]} grid, {spec.in_chans} "
                      "channel(s)); run `iwm decoder RUN` for this one")
    if meta.get("encoder_fingerprint") != encoder.fingerprint():
        return None, (f"{where} was trained on the encoder of step "
                      f"{meta.get('encoder_step', '?')}, which has changed since (training "
                      "went on?); run `iwm decoder RUN` again")
    decoder = LatentDecoder(spec)
    mismatch = state_shapes_mismatch(decoder.state_dict(), state)
    if mismatch:
        raise CheckpointError(f"{where}: the weights do not match its spec ({mismatch}); "
                              "run `iwm decoder RUN` again")
    decoder.load_state_dict(state)
    return decoder.eval(), ""
