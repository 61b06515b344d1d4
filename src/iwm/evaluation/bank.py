"""The bank of a world-model evaluation: which transformations are ranked, and how each
entry is rendered, encoded and scored against the predictor's output.

One batch of images shares one draw of masks; each image gets ``K`` jitters of its own
(the bank), one of which (the true index) is the action the predictor is given. The
draws come from one ``torch.Generator`` in a fixed order (:func:`draw_main_bank`: masks,
bank, true index), which MRR (:mod:`iwm.evaluation.mrr`) and the retrieval grids
(:mod:`iwm.evaluation.retrieval`) both go through, so for the same images and seed they
rank the same entries. The protocol is in docs/evaluation.md, "The MRR protocol".
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from iwm.config import MaskConfig
from iwm.data.actions import DestructiveParams, JitterParams, build_action
from iwm.data.factors import JITTER_FACTORS
from iwm.data.masks import Masks, MultiBlockMaskSampler
from iwm.data.shard import take_rows
from iwm.data.views import STRENGTHS, ViewParams, ViewSampler
from iwm.evaluation.ranking import entry_scores
from iwm.models.iwm import IWM
from iwm.models.tokens import gather_tokens

__all__ = [
    "MRR_BLOCKS",
    "MRR_CONTEXTS",
    "MRR_TIES",
    "SAME_IMAGE_TOLERANCE",
    "BankEvaluator",
    "BankScores",
    "MainBank",
    "MaskSampler",
    "bank_view_params",
    "draw_main_bank",
    "draw_true_index",
    "forced_op",
    "has_no_jitter",
    "no_normalization",
    "only_factor",
    "protocol_masks",
]

#: ``own``: each image keeps its whole context; ``batch-min``: every context is thinned to
#: the smallest of its batch, the training masks' old form (kept to compare protocols).
MRR_CONTEXTS = ("own", "batch-min")
#: ``union``: the predictor predicts, and the score covers, every target block of an image
#: (about 4 x 8 tokens on a 7 x 7 grid); ``first``: the first block only (the protocol
#: before 2026-12-02, kept to compare).
MRR_BLOCKS = ("union", "first")
#: ``truth``: bank entries whose rendering no 8-bit image could tell from the true entry's
#: (no pixel more than :data:`SAME_IMAGE_TOLERANCE` apart) are the same answer and do not
#: compete with it; ``rank``: they are ranked like any other entry, i.e. by coin flips
#: between near-identical latents (the protocol before 2026-12-02).
MRR_TIES = ("truth", "rank")
SAME_IMAGE_TOLERANCE = 1 / 255
"""Largest pixel difference (in [0, 1] units) between two renderings that count as the
same image: one level of an 8-bit image."""

MaskSampler = Callable[[int, torch.Generator, torch.device], Masks]
"""``(batch, generator, device) -> Masks``, e.g. a :class:`MultiBlockMaskSampler`."""


def has_no_jitter(params: ViewParams) -> bool:
    return max(params.brightness, params.contrast, params.saturation, params.hue) == 0


def bank_view_params(params: ViewParams) -> ViewParams:
    """The jitter ranges a bank is drawn from: the run's, always applied; the 'jitter'
    preset's where the run has none (I-JEPA), so that every run is asked a question."""
    if has_no_jitter(params):
        jitter = STRENGTHS["jitter"]
        params = dataclasses.replace(params, brightness=jitter.brightness,
                                     contrast=jitter.contrast, saturation=jitter.saturation,
                                     hue=jitter.hue)
    return dataclasses.replace(params, jitter_p=1.0)


def only_factor(params: JitterParams, factor: str) -> JitterParams:
    """``params`` with every factor but ``factor`` reset to the identity."""
    identity = JitterParams.identity(params.batch_size, params.applied.device)
    kept = {name: getattr(identity, name) for name in JITTER_FACTORS}
    kept[factor] = getattr(params, factor)
    return JitterParams(**kept, applied=params.applied)


def forced_op(op: str, batch: int, params: ViewParams, generator: torch.Generator,
              device: torch.device) -> DestructiveParams:
    """Destructive params with exactly ``op`` applied to every image."""
    out = DestructiveParams.identity(batch, device)
    if op == "blur":
        lo, hi = params.blur_sigma
        u = torch.rand(batch, generator=generator, device=generator.device).to(device)
        out.blur = torch.ones(batch, dtype=torch.bool, device=device)
        out.blur_sigma = lo + (hi - lo) * u
    else:
        setattr(out, op, torch.ones(batch, dtype=torch.bool, device=device))
    return out


def no_normalization(x: Tensor) -> Tensor:
    return x


def draw_true_index(batch: int, k: int, generator: torch.Generator, device: torch.device
                    ) -> Tensor:
    return torch.randint(k, (batch,), generator=generator, device=generator.device).to(device)


@dataclass
class BankScores:
    """A bank scored against predictions: ``scores`` (B, K) closeness per prediction, and
    ``equivalent`` (B, K) bool, the entries whose rendering is the true entry's to within
    :data:`SAME_IMAGE_TOLERANCE` (the true entry included)."""

    scores: list[Tensor]
    equivalent: Tensor


class BankEvaluator:
    """One batch of images: shared masks, predictions and chunked bank scoring. The
    predictions and latents live at the first target block of the masks, which with
    ``predictor_pass="union"`` masks is the union of an image's blocks."""

    def __init__(self, model: IWM, bank_sampler: ViewSampler, images: Tensor, masks: Masks,
                 bank_size: int, distance: str, chunk_size: int,
                 normalize: Callable[[Tensor], Tensor], bf16: bool = False) -> None:
        self.model = model
        self.bf16 = bf16
        self.sampler = bank_sampler
        self.images = images
        self.k = bank_size
        self.distance = distance
        self.chunk = chunk_size
        self.norm = normalize
        self.context_idx = masks.context
        self.context_valid = masks.context_valid
        self.target_idx = masks.targets[:, 0]
        self.valid = masks.target_valid[:, 0]
        b, device = images.shape[0], images.device
        self.rows = torch.arange(b, device=device)
        self.identity_source = JitterParams.identity(b, device)

    def predict(self, source: Tensor, target: JitterParams,
                destructive: DestructiveParams) -> Tensor:
        """Predictor output (B, Kt, D) at the first block, from ``source``'s context."""
        action = build_action(target, self.identity_source, destructive)
        with self._autocast():
            context = self.model.encoder.forward_tokens(self.norm(source), self.context_idx,
                                                        self.context_valid)
            return self.model.predictor(
                context, self.context_idx, self.target_idx, context_valid=self.context_valid,
                target_valid=self.valid, action=action).float()

    def _autocast(self) -> torch.autocast:
        # Only the model runs in bf16: the views (blur is a convolution) stay fp32, so the
        # bank renders the same images either way.
        return torch.autocast(self.images.device.type, dtype=torch.bfloat16,
                              enabled=self.bf16)

    def _target_tokens(self, images: Tensor) -> Tensor:
        with self._autocast():
            return self.model.target_tokens(self.norm(images)).float()

    def latents(self, params: JitterParams) -> Tensor:
        """Target latents (B, Kt, D) at the block of the images jittered by ``params``."""
        views = self.sampler.apply_jitter(self.images, params)
        return gather_tokens(self._target_tokens(views), self.target_idx)

    def distance_between(self, a: Tensor, b: Tensor) -> Tensor:
        """Distance (B,) between two (B, Kt, D) latents over the block's valid tokens."""
        return -entry_scores(a.float(), b.float(), self.valid, self.distance)

    def image_distance(self) -> Tensor:
        """Distance (B,) from each image's latent to the next image's, at its positions."""
        tokens = self._target_tokens(self.images)
        own = gather_tokens(tokens, self.target_idx)
        other = gather_tokens(tokens.roll(1, 0), self.target_idx)
        return self.distance_between(own, other)

    def true_params(self, bank: JitterParams, true_index: Tensor) -> JitterParams:
        return take_rows(bank, self.rows * self.k + true_index)

    def clean_latents(self) -> Tensor:
        """Target latents (B, Kt, D) of the untransformed images at the block."""
        return gather_tokens(self._target_tokens(self.images), self.target_idx)

    def scores(self, bank: JitterParams, preds: list[Tensor], true_index: Tensor
               ) -> BankScores:
        """Closeness of each prediction in ``preds`` to every entry of ``bank`` (B*K
        params, image-major), rendered and encoded ``chunk`` views at a time, and which
        entries render as the ``true_index`` one does."""
        total, device = self.images.shape[0] * self.k, self.images.device
        truth = self.sampler.apply_jitter(self.images, self.true_params(bank, true_index))
        out = [torch.empty(total, device=device) for _ in preds]
        same = torch.empty(total, dtype=torch.bool, device=device)
        for start in range(0, total, self.chunk):
            rows = torch.arange(start, min(total, start + self.chunk), device=device)
            img = torch.div(rows, self.k, rounding_mode="floor")
            views = self.sampler.apply_jitter(self.images[img], take_rows(bank, rows))
            same[rows] = ((views - truth[img]).abs().flatten(1).amax(1)
                          <= SAME_IMAGE_TOLERANCE)
            latents = gather_tokens(self._target_tokens(views),
                                    self.target_idx[img])
            valid = self.valid[img]
            for o, pred in zip(out, preds, strict=True):
                o[start:start + rows.numel()] = entry_scores(pred[img], latents, valid,
                                                             self.distance)
        return BankScores([o.view(-1, self.k) for o in out], same.view(-1, self.k))


@dataclass
class MainBank:
    """The main setting's draws for one batch: the evaluator (with the batch's masks), the
    bank sampler, the bank (B*K jitters), each image's true index and its jitter."""

    evaluator: BankEvaluator
    sampler: ViewSampler
    bank: JitterParams
    true_index: Tensor
    target: JitterParams


def draw_main_bank(model: IWM, view_sampler: ViewSampler, images: Tensor,
                   mask_sampler: MaskSampler, bank_size: int, distance: str, chunk_size: int,
                   normalize: Callable[[Tensor], Tensor], generator: torch.Generator,
                   bf16: bool = False) -> MainBank:
    """Masks, bank and true indices for ``images`` (B, C, H, W) on the model's device, drawn
    from ``generator`` in this order; the one place that order is written down. ``bf16``
    runs the model under bf16 autocast (the renderings stay fp32)."""
    b, channels = images.shape[:2]
    sampler = ViewSampler(bank_view_params(view_sampler.params), channels,
                          view_sampler.image_size)
    masks = mask_sampler(b, generator, images.device)
    ev = BankEvaluator(model, sampler, images, masks, bank_size, distance, chunk_size,
                       normalize, bf16)
    bank = sampler.sample_jitter(b * bank_size, generator, images.device)
    true_index = draw_true_index(b, bank_size, generator, images.device)
    return MainBank(ev, sampler, bank, true_index, ev.true_params(bank, true_index))


def protocol_masks(grid: tuple[int, int], cfg: MaskConfig, context: str = "own",
                   blocks: str = "union") -> MultiBlockMaskSampler:
    """The protocol's masks: the run's multi-block masks, one pass over the union of an
    image's blocks (``blocks="union"``) or one per block of which the first is scored
    (``"first"``), whatever the run trained with, so that every run is asked the same
    question; ``context`` is one of :data:`MRR_CONTEXTS`. Both draw the same blocks."""
    if context not in MRR_CONTEXTS:
        raise ValueError(f"context={context!r}: must be one of {', '.join(MRR_CONTEXTS)}")
    if blocks not in MRR_BLOCKS:
        raise ValueError(f"blocks={blocks!r}: must be one of {', '.join(MRR_BLOCKS)}")
    return MultiBlockMaskSampler(grid, dataclasses.replace(
        cfg, predictor_pass="union" if blocks == "union" else "per_block",
        context_tokens="thin" if context == "batch-min" else "pad"))
