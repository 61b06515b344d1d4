"""The world model at work, one image at a time: which bank entries does a prediction hit?

MRR (:mod:`iwm.evaluation.mrr`) condenses the predictor's retrieval into one number; this
module keeps the individual cases so that a report can show them: for each image, the
requested transformation (the true bank entry and its jitter parameters), the rank of the
true entry, and the ``top_k`` bank entries whose target latents are nearest to the
prediction, rendered as images.

The protocol is exactly MRR's main setting: the draws come from the same
:func:`~iwm.evaluation.bank.draw_main_bank` (masks, bank, true index, in that order), and
the rendering, latents, distance and tie rule from the same evaluator, so for the same
images and seed the ranks here are the ranks behind ``evaluate_mrr(...,
per_transform=False)``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from iwm.data.actions import DestructiveParams, JitterParams
from iwm.data.factors import JITTER_FACTORS
from iwm.data.shard import take_rows
from iwm.data.views import ViewSampler
from iwm.evaluation.bank import MRR_TIES, MaskSampler, draw_main_bank, no_normalization
from iwm.evaluation.ranking import check_distance, ranks_from_scores
from iwm.models.iwm import IWM

__all__ = ["RetrievalExample", "jitter_description", "retrieval_examples", "score_label"]


@dataclass
class RetrievalExample:
    """One image's retrieval. Images are (C, H, W) float in [0, 1] on the CPU."""

    image: Tensor  # the clean source (the predictor sees its context patches)
    context: Tensor  # (Kc,) patch indices given to the context encoder
    target_block: Tensor  # (Kt,) patch indices predicted (padding removed)
    true_index: int  # bank entry whose action the predictor was given
    true_params: dict[str, float]  # its jitter parameters (factors; hue in turns)
    target: Tensor  # the source rendered with those parameters (the right answer)
    rank: int  # 1-based rank of the true entry (ties count as the worst rank)
    top: list[int]  # the ``top_k`` bank entries nearest to the prediction, nearest first
    top_scores: list[float]  # their closeness (see :func:`score_label`)
    top_images: Tensor  # (top_k, C, H, W) those entries rendered


def _params_of(params: JitterParams, row: int) -> dict[str, float]:
    return {name: float(getattr(params, name)[row]) for name in JITTER_FACTORS}


def jitter_description(params: dict[str, float],
                       varied: tuple[str, ...] = JITTER_FACTORS) -> str:
    """Human-readable jitter, e.g. ``brightness x1.23, contrast x0.81, hue +0.05``; only
    the ``varied`` factors (a grayscale data set never varies saturation or hue)."""
    parts = []
    for name in varied:
        if name not in params:
            continue
        value = params[name]
        parts.append(f"{name} {value:+.2f}" if name == "hue" else f"{name} x{value:.2f}")
    return ", ".join(parts) if parts else "identity"


def score_label(score: float, distance: str) -> str:
    """A readable closeness: the cosine itself, or the mean squared error for ``l2``.

    ``pairwise_scores`` returns ``2 cos - 2`` (cosine) and ``-MSE`` (l2), which rank
    correctly but mean little to a reader.
    """
    return f"cos {1 + score / 2:.3f}" if distance == "cosine" else f"mse {-score:.3g}"


@torch.no_grad()
def retrieval_examples(model: IWM, view_sampler: ViewSampler, images: Tensor,
                       mask_sampler: MaskSampler, bank_size: int = 32, top_k: int = 5,
                       distance: str = "cosine", generator: torch.Generator | None = None,
                       normalize: Callable[[Tensor], Tensor] | None = None,
                       chunk_size: int = 512, ties: str = "truth") -> list[RetrievalExample]:
    """One :class:`RetrievalExample` per image of ``images`` (B, C, H, W) in [0, 1].

    Arguments as in :func:`iwm.evaluation.mrr.evaluate_mrr`; ``top_k`` (at most
    ``bank_size``) entries are kept per image; with ``ties="truth"`` the entries that
    render as the true one are not listed beside it (they are the same answer). The model
    is put in eval mode for the call and restored afterwards.
    """
    check_distance(distance)
    if ties not in MRR_TIES:
        raise ValueError(f"ties={ties!r}: must be one of {', '.join(MRR_TIES)}")
    if bank_size < 2 or not 1 <= top_k <= bank_size:
        raise ValueError(f"bank_size={bank_size}, top_k={top_k}: need 1 <= top_k <= bank_size"
                         " and bank_size >= 2")
    if images.ndim != 4 or images.shape[1] != view_sampler.channels or not len(images):
        raise ValueError(f"expected images (B, {view_sampler.channels}, H, W) with B >= 1, "
                         f"got {tuple(images.shape)}")
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    was_training = model.training
    model.eval()
    try:
        return _examples(model, view_sampler, images, mask_sampler, bank_size, top_k,
                         distance, generator, normalize or no_normalization, chunk_size,
                         ties)
    finally:
        model.train(was_training)


def _examples(model: IWM, view_sampler: ViewSampler, images: Tensor, mask_sampler: MaskSampler,
              bank_size: int, top_k: int, distance: str, generator: torch.Generator,
              normalize: Callable[[Tensor], Tensor], chunk_size: int, ties: str
              ) -> list[RetrievalExample]:
    device = next(model.parameters()).device
    images = images.to(device=device, dtype=torch.float32)
    b = images.shape[0]
    main = draw_main_bank(model, view_sampler, images, mask_sampler, bank_size, distance,
                          chunk_size, normalize, generator)
    ev, sampler, bank, true_index, target = (main.evaluator, main.sampler, main.bank,
                                             main.true_index, main.target)
    pred = ev.predict(images, target, DestructiveParams.identity(b, device))
    scored = ev.scores(bank, [pred], true_index)
    scores = scored.scores[0]
    equivalent = scored.equivalent if ties == "truth" else torch.zeros_like(scored.equivalent)
    ranks = ranks_from_scores(scores, true_index, equivalent if ties == "truth" else None)
    order = torch.nan_to_num(scores.float(), nan=-torch.inf).argsort(dim=1, descending=True,
                                                                     stable=True)
    examples = []
    for i in range(b):
        t, rank = int(true_index[i]), int(ranks[i])
        # Place the true entry at its reported rank: ties count against it, so every
        # entry tied with it goes first (a plain sort could list it ahead of them).
        others = [int(k) for k in order[i] if int(k) != t and not equivalent[i, k]]
        top = (others[:rank - 1] + [t] + others[rank - 1:])[:top_k]
        rows = torch.tensor([i * bank_size + k for k in top], device=device)
        rendered = sampler.apply_jitter(images[i].expand(len(top), -1, -1, -1),
                                        take_rows(bank, rows))
        true_row = torch.tensor([i * bank_size + t], device=device)
        valid = ev.valid[i]
        examples.append(RetrievalExample(
            image=images[i].cpu(),
            context=ev.context_idx[i].cpu(),
            target_block=ev.target_idx[i][valid].cpu(),
            true_index=t,
            true_params=_params_of(target, i),
            target=sampler.apply_jitter(images[i:i + 1], take_rows(bank, true_row))[0].cpu(),
            rank=rank,
            top=top,
            top_scores=[float(scores[i, k]) for k in top],
            top_images=rendered.cpu(),
        ))
    return examples
