"""The IWM training model: context encoder, EMA target encoder and predictor.

One forward pass is one JEPA/IWM prediction problem per image and target block:
the context encoder sees the source view's context patches, the target encoder sees the
whole target view, and the predictor, given the action a(x→y), predicts the target
encoder's (layer-normed) tokens at each target block. I-JEPA is the special case where
source == target and the conditioning is ``none``.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from iwm.config import Config
from iwm.data.actions import ACTION_DIM
from iwm.data.masks import Masks
from iwm.errors import CheckpointError
from iwm.models.encoder_io import state_shapes_mismatch
from iwm.models.predictor import CONDITIONING_MODULES, Predictor
from iwm.models.tokens import gather_tokens
from iwm.models.vit import Encoder, create_encoder
from iwm.torch_internals import lerp_


@dataclass
class StepOutput:
    loss: Tensor
    pred_std: Tensor
    """Std of predictions over tokens and images (collapse monitor; ~0 means collapse)."""
    target_std: Tensor
    """Std of target features over images (collapse monitor)."""


class IWM(nn.Module):
    def __init__(self, encoder: Encoder, predictor: Predictor, loss: str = "l2") -> None:
        super().__init__()
        self.encoder = encoder
        self.target_encoder = copy.deepcopy(encoder)
        self.target_encoder.requires_grad_(False)
        self.predictor = predictor
        self.loss_name = loss

    @torch.no_grad()
    def target_tokens(self, images: Tensor) -> Tensor:
        """Regression targets: the EMA encoder's tokens, layer-normed without affine (I-JEPA)."""
        h = self.target_encoder.forward_tokens(images)
        return F.layer_norm(h, h.shape[-1:])

    def forward(self, source: Tensor, target: Tensor, action: Tensor, masks: Masks,
                denominator: Tensor | None = None) -> StepOutput:
        """The loss: mean squared error over the valid target tokens of the batch.

        ``denominator`` replaces this batch's count of valid target tokens: when the batch
        is one part of a larger one (a process's shard, a micro-batch), dividing by the
        share of the WHOLE batch's count that the averaging of gradients expects makes the
        parts' gradients add up to exactly the whole batch's.
        """
        targets = self.target_tokens(target)
        context = self.encoder.forward_tokens(source, masks.context, masks.context_valid)
        pred = self.predictor.predict_blocks(context, masks, action=action).flatten(0, 1)
        valid = masks.target_valid.flatten(0, 1)
        truth = gather_tokens(targets, masks.targets.flatten(1, 2)).view_as(pred)
        if self.loss_name == "smooth_l1":
            per_token = F.smooth_l1_loss(pred.float(), truth.float(), reduction="none").mean(-1)
        else:
            per_token = (pred.float() - truth.float()).pow(2).mean(-1)
        weights = valid.float()
        loss = (per_token * weights).sum() / (weights.sum() if denominator is None
                                               else denominator)
        with torch.no_grad():
            pred_std = pred.detach().float().std(dim=0).mean()
            target_std = targets.float().mean(dim=1).std(dim=0).mean()
        return StepOutput(loss=loss, pred_std=pred_std, target_std=target_std)

    @torch.no_grad()
    def update_target(self, momentum: float, apply: Tensor | None = None) -> None:
        """EMA: target ← m·target + (1−m)·online, fused over all tensors.

        ``apply``: a bool device tensor; where False (a skipped, non-finite step) the EMA
        does not move. A tensor rather than a Python bool keeps the step free of host syncs.
        """
        online: list[Tensor] = list(self.encoder.parameters())
        ema: list[Tensor] = list(self.target_encoder.parameters())
        lerp_(ema, online, 1.0 - momentum if apply is None
              else apply.to(ema[0].dtype) * (1.0 - momentum))


def build_model(cfg: Config, in_chans: int) -> IWM:
    """The IWM model a config describes, for images with ``in_chans`` channels."""
    m = cfg.model
    encoder = create_encoder(m.encoder, img_size=cfg.data.image_size, patch_size=m.patch_size,
                             in_chans=in_chans, drop_path_rate=m.drop_path)
    predictor = Predictor(grid=encoder.grid, embed_dim=encoder.embed_dim,
                          width=m.predictor_width, depth=m.predictor_depth,
                          num_heads=m.predictor_heads, action_dim=ACTION_DIM,
                          conditioning=m.conditioning, drop_path_rate=m.drop_path)
    model = IWM(encoder, predictor, loss=m.loss)
    # Only the networks that backpropagate: the EMA target encoder runs without autograd.
    model.encoder.set_grad_checkpointing(m.grad_checkpointing)
    model.predictor.grad_checkpointing = m.grad_checkpointing
    return model


def _conditioning_key(key: str) -> bool:
    return any(key.startswith(f"predictor.{m}.") for m in CONDITIONING_MODULES)


def init_from_state(model: IWM, state: Mapping[str, Tensor], where: str) -> None:
    """Start ``model`` from another run's weights ``state`` (``model.init_from``).

    Everything but the action conditioning must match exactly: the source is meant to be
    this very model, trained before (an imported I-JEPA run, another IWM run). Conditioning
    weights the source lacks start as initialised (an I-JEPA predictor has none); those
    this model does not use are dropped. Both are said in a warning.
    """
    own = model.state_dict()
    shared = {k: v for k, v in own.items() if not _conditioning_key(k)}
    found = {k: v for k, v in state.items() if not _conditioning_key(k)}
    mismatch = state_shapes_mismatch(shared, found)
    if mismatch:
        raise CheckpointError(
            f"model.init_from={where}: its weights do not fit this run's model ({mismatch}); "
            "use its model.* and data.image_size settings")
    fresh = sorted({k.split(".")[1] for k in own if _conditioning_key(k)
                    and (k not in state or state[k].shape != own[k].shape)})
    dropped = sorted({k.split(".")[1] for k in state if _conditioning_key(k) and k not in own})
    if fresh:
        warnings.warn(f"model.init_from={where} has no weights for this run's "
                      f"conditioning: predictor.{', predictor.'.join(fresh)} start from "
                      "random initialisation", stacklevel=2)
    if dropped:
        warnings.warn(f"model.init_from={where}: its predictor.{', predictor.'.join(dropped)}"
                      " (another conditioning) are not used by this run's", stacklevel=2)
    merged = {**own, **found}
    merged.update({k: state[k] for k in own if _conditioning_key(k) and k in state
                   and state[k].shape == own[k].shape})
    model.load_state_dict(merged)
