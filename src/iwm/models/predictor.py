"""The predictor p_φ: a narrow ViT that is also the world model.

Input: context tokens (projected to the predictor width) plus one mask token per target
position (shared learned vector + fixed sin-cos position). Output: predictions at the
target positions, projected back to the encoder width. The action a(x→y) enters in one
of three ways (PAPER.md §2):

- ``none``: ignored (I-JEPA; the predictor cannot apply a transformation);
- ``sequence``: a linear projection of the action is appended as one extra token;
- ``feature``: the action is concatenated onto every mask token (after its position
  embedding) and a 3-layer MLP maps the result back to the predictor width.
"""

from __future__ import annotations

import torch
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from iwm.models.tokens import gather_tokens, sincos_pos_embed


class Predictor(nn.Module):
    def __init__(self, *, grid: tuple[int, int], embed_dim: int, width: int, depth: int,
                 num_heads: int, action_dim: int, conditioning: str = "feature",
                 drop_path_rate: float = 0.0) -> None:
        super().__init__()
        if conditioning not in ("none", "sequence", "feature"):
            raise ValueError(f"unknown conditioning {conditioning!r}")
        self.conditioning = conditioning
        self.action_dim = action_dim
        self.embed = nn.Linear(embed_dim, width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        self.register_buffer("pos_embed", sincos_pos_embed(grid, width), persistent=False)
        if conditioning == "sequence":
            self.action_embed = nn.Linear(action_dim, width)
        elif conditioning == "feature":
            self.action_mlp = nn.Sequential(
                nn.Linear(width + action_dim, width), nn.GELU(),
                nn.Linear(width, width), nn.GELU(),
                nn.Linear(width, width),
            )
        rates = torch.linspace(0, drop_path_rate, depth).tolist()
        self.blocks = nn.ModuleList(
            Block(width, num_heads, mlp_ratio=4.0, qkv_bias=True, drop_path=r,
                  norm_layer=nn.LayerNorm)
            for r in rates
        )
        self.norm = nn.LayerNorm(width)
        self.proj = nn.Linear(width, embed_dim)
        self.grad_checkpointing = False
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, context: Tensor, context_idx: Tensor, target_idx: Tensor,
                action: Tensor | None = None, target_valid: Tensor | None = None) -> Tensor:
        """Predict encoder tokens at ``target_idx``.

        context: (B, Kc, D) encoder tokens at positions ``context_idx`` (B, Kc);
        target_idx: (B, Kt) positions to predict; action: (B, action_dim) or None (= null
        action); target_valid: (B, Kt) bool, False for padding tokens, which other tokens
        must not attend to. Returns (B, Kt, D).
        """
        batch, n_ctx = context.shape[:2]
        pos = self.pos_embed.unsqueeze(0).expand(batch, -1, -1)
        x = self.embed(context) + gather_tokens(pos, context_idx)
        queries = self.mask_token + gather_tokens(pos, target_idx)
        if self.conditioning != "none" and action is None:
            action = context.new_zeros(batch, self.action_dim)
        if self.conditioning == "feature":
            a = action.to(queries.dtype).unsqueeze(1).expand(-1, queries.shape[1], -1)
            queries = self.action_mlp(torch.cat([queries, a], dim=-1))
        parts = [x, queries]
        if self.conditioning == "sequence":
            parts.append(self.action_embed(action.to(x.dtype)).unsqueeze(1))
        x = torch.cat(parts, dim=1)

        attn_mask = None
        # Always masked when given: checking for padding first would sync with the device.
        if target_valid is not None:
            keep = torch.ones(batch, x.shape[1], dtype=torch.bool, device=x.device)
            keep[:, n_ctx:n_ctx + target_valid.shape[1]] = target_valid
            attn_mask = keep[:, None, None, :]  # broadcast over heads and queries
        for block in self.blocks:
            if self.grad_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(block, x, attn_mask, use_reentrant=False)
            else:
                x = block(x, attn_mask=attn_mask)
        x = self.norm(x[:, n_ctx:n_ctx + target_idx.shape[1]])
        return self.proj(x)

    def predict_blocks(self, context: Tensor, context_idx: Tensor, targets: Tensor,
                       target_valid: Tensor, action: Tensor | None = None) -> Tensor:
        """Predict every target block of multi-block masks: (B, T, Kt, D).

        context: (B, Kc, D) at ``context_idx``; targets / target_valid: (B, T, Kt). All
        blocks go through one batched call, the context repeated once per block, so blocks
        never see each other's mask tokens.
        """
        batch, n_blocks = targets.shape[:2]
        pred = self(
            context.repeat_interleave(n_blocks, 0),
            context_idx.repeat_interleave(n_blocks, 0),
            targets.flatten(0, 1),
            None if action is None else action.repeat_interleave(n_blocks, 0),
            target_valid.flatten(0, 1),
        )
        return pred.unflatten(0, (batch, n_blocks))

    def predict_all(self, tokens: Tensor, action: Tensor | None = None) -> Tensor:
        """The predictor as reused downstream: every token is context and every position a
        target, (B, N, D) -> (B, N, D); ``action`` None = the null action."""
        batch, n = tokens.shape[:2]
        idx = torch.arange(n, device=tokens.device).expand(batch, -1)
        return self(tokens, idx, idx, action)
