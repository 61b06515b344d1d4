"""Python API: load a trained run and use its encoder and world model.

    >>> import iwm
    >>> model = iwm.load("runs/iwm-inv-tiny")          # run directory or checkpoint file
    >>> tokens = model.encode(images)                  # (B, N, D) target-encoder tokens
    >>> pred = model.predict(tokens, masks, action)    # latents of the transformed image
    >>> pred = model.apply(tokens, iwm.Action(brightness=1.3))   # the same, named action
    >>> scores, idx = model.retrieve(pred, bank_tokens, k=5)    # nearest bank entries
    >>> model.save_pretrained("out")                   # config.json + model.safetensors
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from iwm.config import Config, load_config
from iwm.data.actions import DestructiveParams, JitterParams, build_action
from iwm.data.masks import Masks
from iwm.data.normalize import Normalizer
from iwm.errors import CheckpointError
from iwm.interop.folder import (
    is_export_dir,
    normalization_lists,
    read_pretrained,
    write_pretrained,
)
from iwm.models.encoder_io import state_shapes_mismatch
from iwm.models.iwm import IWM, build_model
from iwm.models.predictor import Predictor
from iwm.models.tokens import gather_tokens
from iwm.models.vit import Encoder
from iwm.training.checkpoint import latest_checkpoint, load_checkpoint


@dataclass(frozen=True)
class Action:
    """A transformation for the world model: "the target is this jitter of the source".

    ``brightness``, ``contrast`` and ``saturation`` are multiplicative factors (1 = same),
    ``hue`` a shift in turns (0 = same), applied in that order. ``grayscale``,
    ``blur_sigma`` (pixels; 0 = none) and ``solarize`` say what was done to the SOURCE,
    which the predictor then undoes (in training they only ever hit the source).
    ``Action()`` is the identity, i.e. the null action. On 1-channel runs saturation, hue
    and grayscale are no-ops that training never varied: leave them at the identity.
    The vector layout is :mod:`iwm.data.actions`'s; this only names its inputs.
    """

    brightness: float = 1.0
    contrast: float = 1.0
    saturation: float = 1.0
    hue: float = 0.0
    grayscale: bool = False
    blur_sigma: float = 0.0
    solarize: bool = False

    def __post_init__(self) -> None:
        for name in ("brightness", "contrast", "saturation", "blur_sigma"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"Action.{name}={getattr(self, name)}: must be >= 0")

    def to_tensor(self, batch_size: int = 1,
                  device: str | torch.device | None = None) -> Tensor:
        """The (batch_size, ACTION_DIM) action vector, the same for every row."""

        def full(value: float | bool, dtype: torch.dtype = torch.float32) -> Tensor:
            return torch.full((batch_size,), value, dtype=dtype, device=device)

        target = JitterParams(brightness=full(self.brightness), contrast=full(self.contrast),
                              saturation=full(self.saturation), hue=full(self.hue),
                              applied=full(True, torch.bool))
        destructive = DestructiveParams(grayscale=full(self.grayscale, torch.bool),
                                        blur=full(self.blur_sigma > 0, torch.bool),
                                        blur_sigma=full(self.blur_sigma),
                                        solarize=full(self.solarize, torch.bool))
        return build_action(target, JitterParams.identity(batch_size, device), destructive)


def _pooled_direction(x: Tensor, name: str) -> Tensor:
    """Unit vectors (B, D) of tokens (B, N, D) or pooled features (B, D)."""
    if x.ndim == 3:
        # Into the predictor's target space (IWM.target_tokens: per-token layer norm, no
        # affine), where predictions live; idempotent on predictions, so both sides match.
        x = F.layer_norm(x.float(), x.shape[-1:]).mean(1)
    elif x.ndim != 2:
        raise ValueError(f"{name}: expected tokens (B, N, D) or features (B, D), "
                         f"got {tuple(x.shape)}")
    return F.normalize(x.float(), dim=-1)


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

    @property
    def in_chans(self) -> int:
        return self.encoder.patch_embed.proj.in_channels

    @property
    def image_size(self) -> int:
        return self.config.data.image_size

    @classmethod
    def create(cls, config: Config, in_chans: int, normalization: Mapping[str, Sequence[float]],
               state: Mapping[str, Tensor] | None = None, step: int = 0,
               where: str | os.PathLike[str] = "state") -> Pretrained:
        """The model ``config`` describes, with ``state`` loaded (random init if None)."""
        model = build_model(config, int(in_chans))
        if state is not None:
            mismatch = state_shapes_mismatch(model.state_dict(), state)
            if mismatch:
                raise CheckpointError(f"{where}: does not match its own config: {mismatch}")
            model.load_state_dict(state)
        model.eval()
        normalize = Normalizer.create(tuple(normalization["mean"]), tuple(normalization["std"]),
                                      torch.device("cpu"))
        return cls(config, model, normalize, int(step))

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
        if masks is None:
            return self.predictor.predict_all(latents, action=action)
        return self.predictor.predict_blocks(gather_tokens(latents, masks.context), masks,
                                             action=action)

    @torch.no_grad()
    def apply(self, latents: Tensor, action: Action | Tensor | None,
              masks: Masks | None = None) -> Tensor:
        """The world model: latents (B, N, D) of a source image -> predicted latents of the
        target ``action`` describes, at every position (B, N, D) when ``masks`` is None, else
        at each target block as in :meth:`predict`. Predictions live in the layer-normed
        target space (compare them with :meth:`retrieve`, which handles that).

        Without masks every position is predicted the way training poses the question:
        from context that does not contain it (two passes over a checkerboard of squares
        the size of a training target block, :meth:`Predictor.predict_by_halves`). On a
        trained demo run this scored 0.147 in ``iwm eval api-check`` against 0.094 when
        every query also saw its own source token (:meth:`predict` without masks)."""
        if isinstance(action, Action):
            action = action.to_tensor(latents.shape[0], latents.device)
        if masks is not None:
            return self.predict(latents, masks, action)
        return self.predictor.predict_by_halves(latents, action=action,
                                                 tile=self.apply_tile)

    @property
    def apply_tile(self) -> int:
        """Side of :meth:`apply`'s checkerboard squares: a training target block's, about
        sqrt(mean target scale x patches)."""
        height, width = self.encoder.grid
        scale = sum(self.config.mask.target_scale) / 2
        return max(1, round((scale * height * width) ** 0.5))

    @staticmethod
    @torch.no_grad()
    def retrieve(pred: Tensor, bank: Tensor, k: int = 5) -> tuple[Tensor, Tensor]:
        """Nearest neighbours of each prediction in ``bank`` by pooled cosine similarity.

        ``pred`` (B, N, D) or (B, D); ``bank`` (M, N, D) or (M, D), e.g. ``encode(images)``
        of candidate targets, shared by all queries. Tokens are layer-normed (the predictor's
        target space) and mean-pooled first. Returns ``(scores, indices)``, both (B, min(k,
        M)), most similar first; scores are cosines in [-1, 1].
        """
        query = _pooled_direction(pred, "pred")
        keys = _pooled_direction(bank, "bank").to(query.device)
        # One matmul against a bank shared by all queries; mrr.pairwise_scores instead
        # scores per-query banks (B, K, D) and would need the bank copied B times.
        scores, indices = (query @ keys.T).topk(min(k, keys.shape[0]), dim=1)
        return scores, indices

    def save_pretrained(self, directory: str | os.PathLike[str]) -> Path:
        """Write ``config.json`` + ``model.safetensors`` (Hugging Face layout; the whole
        model) to ``directory``; :func:`from_pretrained` and :func:`load` read it back."""
        return write_pretrained(
            directory, self.model.state_dict(), config=self.config.to_dict(),
            in_chans=self.in_chans, step=self.step,
            normalization=normalization_lists(self.normalize.mean, self.normalize.std))


def resolve_checkpoint(run_or_checkpoint: str | os.PathLike[str]) -> Path:
    path = Path(run_or_checkpoint)
    if path.is_dir():
        found = latest_checkpoint(path)
        if found is None:
            raise CheckpointError(f"{path}: no checkpoint found (is this a finished run?)")
        return found
    if not path.exists():
        raise CheckpointError(f"{path}: no such run directory or checkpoint file")
    return path


def load(run_or_checkpoint: str | os.PathLike[str],
         device: str | torch.device = "cpu") -> Pretrained:
    """Load a run directory (its latest checkpoint), a checkpoint file, or a folder written
    by :meth:`Pretrained.save_pretrained` / ``iwm export --format safetensors``."""
    if is_export_dir(run_or_checkpoint):
        return from_pretrained(run_or_checkpoint, device)
    path = resolve_checkpoint(run_or_checkpoint)
    state = load_checkpoint(path, map_location="cpu")
    for key in ("config", "model", "in_chans", "normalization"):
        if key not in state:
            raise CheckpointError(f"{path}: not an iwm pretraining checkpoint (no '{key}')")
    return Pretrained.create(load_config(state["config"]), state["in_chans"],
                             state["normalization"], state["model"], state["step"],
                             where=path).to(device)


def from_pretrained(directory: str | os.PathLike[str],
                    device: str | torch.device = "cpu") -> Pretrained:
    """Load a folder written by :meth:`Pretrained.save_pretrained` (``config.json`` +
    ``model.safetensors``)."""
    meta, state = read_pretrained(directory)
    return Pretrained.create(load_config(meta["config"]), meta["in_chans"], meta["normalization"],
                             state, meta["step"], where=directory).to(device)
