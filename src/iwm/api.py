"""Python API: load a trained run and use its encoder and world model.

    >>> import iwm
    >>> model = iwm.load("runs/iwm-inv-tiny")          # run directory or checkpoint file
    >>> tokens = model.encode(images)                  # (B, N, D) target-encoder tokens
    >>> pred = model.predict(tokens, masks, action)    # latents of the transformed image
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from iwm.config import Config, load_config
from iwm.data.masks import Masks
from iwm.errors import CheckpointError
from iwm.models.encoder_io import state_shapes_mismatch
from iwm.models.iwm import IWM, build_model
from iwm.models.predictor import Predictor
from iwm.models.tokens import gather_tokens
from iwm.models.vit import Encoder
from iwm.training.checkpoint import latest_checkpoint, load_checkpoint
from iwm.training.loop import Normalizer


@dataclass
class Pretrained:
    """A trained IWM model in eval mode, with the normalisation it was trained with."""

    config: Config
    model: IWM
    normalize: Normalizer
    step: int

    @property
    def encoder(self) -> Encoder:
        """The EMA target encoder: the one the paper evaluates and finetunes."""
        return self.model.target_encoder

    @property
    def context_encoder(self) -> Encoder:
        return self.model.encoder

    @property
    def predictor(self) -> Predictor:
        return self.model.predictor

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device: str | torch.device) -> Pretrained:
        self.model.to(device)
        self.normalize = Normalizer(self.normalize.mean.to(device), self.normalize.std.to(device))
        return self

    @torch.no_grad()
    def encode(self, images: Tensor, pooled: bool = False) -> Tensor:
        """Images (B, C, H, W), float in [0, 1] or uint8 -> tokens (B, N, D) or pooled (B, D)."""
        if images.dtype == torch.uint8:
            images = images.float() / 255
        tokens = self.encoder.forward_tokens(self.normalize(images.to(self.device)))
        return tokens.mean(1) if pooled else tokens

    @torch.no_grad()
    def predict(self, latents: Tensor, masks: Masks | None = None,
                action: Tensor | None = None) -> Tensor:
        """Run the world model on encoder tokens ``latents`` (B, N, D).

        With ``masks``, the context tokens predict each target block: (B, T, Kt, D).
        Without, every token is context and every position is predicted: (B, N, D) — the
        way the predictor is reused downstream. ``action`` (B, ACTION_DIM) defaults to the
        null action (identity transformation).
        """
        batch, n = latents.shape[:2]
        if masks is None:
            idx = torch.arange(n, device=latents.device).expand(batch, -1)
            return self.predictor(latents, idx, idx, action)
        n_blocks = masks.targets.shape[1]
        context = gather_tokens(latents, masks.context)
        rep = None if action is None else action.repeat_interleave(n_blocks, 0)
        pred = self.predictor(context.repeat_interleave(n_blocks, 0),
                              masks.context.repeat_interleave(n_blocks, 0),
                              masks.targets.flatten(0, 1), rep, masks.target_valid.flatten(0, 1))
        return pred.unflatten(0, (batch, n_blocks))


def resolve_checkpoint(run_or_checkpoint: str | Path) -> Path:
    path = Path(run_or_checkpoint)
    if path.is_dir():
        found = latest_checkpoint(path)
        if found is None:
            raise CheckpointError(f"{path}: no checkpoint found (is this a finished run?)")
        return found
    if not path.exists():
        raise CheckpointError(f"{path}: no such run directory or checkpoint file")
    return path


def load(run_or_checkpoint: str | Path, device: str | torch.device = "cpu") -> Pretrained:
    """Load a run directory (its latest checkpoint) or a checkpoint file."""
    path = resolve_checkpoint(run_or_checkpoint)
    state = load_checkpoint(path, map_location="cpu")
    for key in ("config", "model", "in_chans", "normalization"):
        if key not in state:
            raise CheckpointError(f"{path}: not an iwm pretraining checkpoint (no '{key}')")
    cfg = load_config(state["config"])
    model = build_model(cfg, int(state["in_chans"]))
    mismatch = state_shapes_mismatch(model.state_dict(), state["model"])
    if mismatch:
        raise CheckpointError(f"{path}: does not match its own config: {mismatch}")
    model.load_state_dict(state["model"])
    model.eval()
    norm = state["normalization"]
    normalize = Normalizer.create(tuple(norm["mean"]), tuple(norm["std"]), torch.device("cpu"))
    return Pretrained(cfg, model, normalize, int(state["step"])).to(device)
