"""The predictor p_φ: a narrow ViT that is also the world model.

Input: context tokens (projected to the predictor width) plus one mask token per target
position (shared learned vector + fixed sin-cos position). Output: predictions at the
target positions, projected back to the encoder width. The action a(x→y) enters in one
of four ways (docs/method.md; the first three are the paper's):

- ``none``: ignored (I-JEPA; the predictor cannot apply a transformation);
- ``sequence``: a linear projection of the action is appended as one extra token;
- ``feature``: the action is concatenated onto every mask token (after its position
  embedding) and a 3-layer MLP maps the result back to the predictor width, added to
  the token (residual, so the token keeps its position).
- ``adaln``: every block's layer norms are shifted, scaled and gated by an MLP of the
  action (zero-initialised), as DiT's adaptive layer norm.
"""

from __future__ import annotations

from typing import cast

import torch
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from iwm.config import CONDITIONINGS
from iwm.data.masks import Masks
from iwm.models.tokens import gather_tokens, sincos_pos_embed


def _modulated_block(block: Block):
    """``block``'s forward with its two branches modulated by the action (adaptive layer
    norm, as DiT's adaLN): ``x + (1 + gate) * branch(norm(x) * (1 + scale) + shift)``."""

    def forward(x: Tensor, attn_mask: Tensor | None, mod: Tensor) -> Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = mod.unbind(1)
        h = block.norm1(x) * (1 + scale1) + shift1
        x = x + block.drop_path1(block.ls1(block.attn(h, attn_mask=attn_mask))) * (1 + gate1)
        h = block.norm2(x) * (1 + scale2) + shift2
        return x + block.drop_path2(block.ls2(block.mlp(h))) * (1 + gate2)

    return forward


CONDITIONING_MODULES = ("action_embed", "action_mlp", "action_mod")
"""The submodules that only some conditionings have (the rest is the same for all)."""


class Predictor(nn.Module):
    pos_embed: Tensor  # a buffer, registered in __init__

    def __init__(self, *, grid: tuple[int, int], embed_dim: int, width: int, depth: int,
                 num_heads: int, action_dim: int, conditioning: str = "feature",
                 drop_path_rate: float = 0.0) -> None:
        super().__init__()
        if conditioning not in CONDITIONINGS:
            raise ValueError(f"unknown conditioning {conditioning!r}")
        self.conditioning = conditioning
        self.action_dim = action_dim
        self.grid = grid
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
        elif conditioning == "adaln":
            # Per block: shift, scale and gate of the attention and of the MLP branch.
            self.action_mod = nn.Sequential(nn.Linear(action_dim, width), nn.SiLU(),
                                            nn.Linear(width, depth * 6 * width))
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
        if conditioning == "adaln":
            # Zero: every block starts as the plain block, whatever the action.
            last = self.action_mod[-1]
            assert isinstance(last, nn.Linear)
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)

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

    def forward(self, context: Tensor, context_idx: Tensor, target_idx: Tensor, *,
                context_valid: Tensor | None = None, target_valid: Tensor | None = None,
                action: Tensor | None = None) -> Tensor:
        """Predict encoder tokens at ``target_idx``.

        context: (B, Kc, D) encoder tokens at positions ``context_idx`` (B, Kc);
        target_idx: (B, Kt) positions to predict; context_valid (B, Kc) / target_valid
        (B, Kt): bool, False for padding, which no token attends to; action:
        (B, action_dim) or None (= null action). Returns (B, Kt, D).
        """
        batch, n_ctx = context.shape[:2]
        n_tgt = target_idx.shape[1]
        pos = self.pos_embed.unsqueeze(0).expand(batch, -1, -1)
        x = self.embed(context) + gather_tokens(pos, context_idx)
        queries = self.mask_token + gather_tokens(pos, target_idx)
        if self.conditioning != "none" and action is None:
            action = context.new_zeros(batch, self.action_dim)
        if self.conditioning == "feature":
            assert action is not None
            a = action.to(queries.dtype).unsqueeze(1).expand(-1, n_tgt, -1)
            # Residual: at initialisation the MLP's output is ~0.002 RMS, so replacing the
            # query by it would erase the position the query carries until relearnt.
            queries = queries + self.action_mlp(torch.cat([queries, a], dim=-1))
        parts = [x, queries]
        if self.conditioning == "sequence":
            assert action is not None
            parts.append(self.action_embed(action.to(x.dtype)).unsqueeze(1))
        x = torch.cat(parts, dim=1)

        attn_mask = None
        # Always masked when given: checking for padding first would sync with the device.
        if context_valid is not None or target_valid is not None:
            keep = torch.ones(batch, x.shape[1], dtype=torch.bool, device=x.device)
            if context_valid is not None:
                keep[:, :n_ctx] = context_valid
            if target_valid is not None:
                keep[:, n_ctx:n_ctx + n_tgt] = target_valid
            attn_mask = keep[:, None, None, :]  # broadcast over heads and queries
        mods = None
        if self.conditioning == "adaln":
            assert action is not None
            mods = self.action_mod(action.to(x.dtype)).view(batch, len(self.blocks), 6, 1, -1)
        for i, block in enumerate(self.blocks):
            args = (x, attn_mask) if mods is None else (x, attn_mask, mods[:, i])
            fn = block if mods is None else _modulated_block(cast(Block, block))
            if self.grad_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False)
            else:
                x = fn(*args)
        x = self.norm(x[:, n_ctx:n_ctx + n_tgt])
        return self.proj(x)

    def predict_blocks(self, context: Tensor, masks: Masks, *,
                       action: Tensor | None = None) -> Tensor:
        """Predict every target block of ``masks``: (B, T, Kt, D).

        context: (B, Kc, D) encoder tokens at ``masks.context``. All blocks go through one
        batched call, the context repeated once per block, so blocks never see each
        other's mask tokens (with ``predictor_pass="union"`` masks hold one block, T = 1).
        """
        batch, n_blocks = masks.targets.shape[:2]

        def rep(t: Tensor | None) -> Tensor | None:
            # One copy of the context per block; a union (T = 1) needs none.
            return t if t is None or n_blocks == 1 else t.repeat_interleave(n_blocks, 0)

        pred = self(rep(context), rep(masks.context), masks.targets.flatten(0, 1),
                    context_valid=rep(masks.context_valid),
                    target_valid=masks.target_valid.flatten(0, 1), action=rep(action))
        return pred.unflatten(0, (batch, n_blocks))

    def predict_all(self, tokens: Tensor, *, action: Tensor | None = None) -> Tensor:
        """The predictor as reused downstream: every token is context and every position a
        target, (B, N, D) -> (B, N, D); ``action`` None = the null action."""
        batch, n = tokens.shape[:2]
        idx = torch.arange(n, device=tokens.device).expand(batch, -1)
        return self(tokens, idx, idx, action=action)

    def predict_by_halves(self, tokens: Tensor, *, action: Tensor | None = None,
                          tile: int = 1) -> Tensor:
        """Every position predicted as in training, from context it does not overlap:
        (B, N, D) -> (B, N, D). The grid is split into a checkerboard of ``tile`` x ``tile``
        squares; each colour is predicted from the tokens of the other, in two passes.
        ``predict_all`` instead lets every query see its own position's source token,
        a question training never poses."""
        height, width = self.grid
        rows = torch.arange(height, device=tokens.device) // tile
        cols = torch.arange(width, device=tokens.device) // tile
        black = ((rows[:, None] + cols[None, :]) % 2 == 0).flatten()
        if black.all():  # one square covers the grid: no half to predict from
            return self.predict_all(tokens, action=action)
        out = torch.empty_like(tokens)
        batch = tokens.shape[0]
        for queries in (black, ~black):
            q_idx = queries.nonzero().squeeze(1)
            c_idx = (~queries).nonzero().squeeze(1)
            out[:, q_idx] = self(tokens[:, c_idx], c_idx.expand(batch, -1),
                                 q_idx.expand(batch, -1), action=action).to(out.dtype)
        return out
