"""How far each jitter factor moves the latents: the diagnosis beside a per-factor MRR.

A factor can score at chance for two reasons: the target encoder is invariant to it (no
predictor could rank it), or the predictor ignores that field of the action. Rendering the
two ends of the factor's range tells them apart: the encoder's latents of the two images,
and the predictor's outputs for the two actions, each as a distance relative to the
distance between two different images (docs/evaluation.md, "Sensitivity").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from iwm.data.actions import DestructiveParams, JitterParams
from iwm.data.views import ViewParams, jitter_range
from iwm.evaluation.bank import BankEvaluator

__all__ = ["FactorSensitivity", "factor_sensitivity", "range_end", "summarise_sensitivity"]

BETWEEN = "between"
"""Key of the image-to-image distances among the per-factor measures."""


@dataclass
class FactorSensitivity:
    """How far one jitter factor moves the latents, from one end of its range to the other,
    as a fraction of the distance between two different images (same distance as the MRR).

    ``encoder``: the target encoder's latents of the really transformed image; near 0, the
    encoder is invariant to the factor and no predictor can rank it. ``predictor``: the
    predictor's outputs for the two actions; near 0 while ``encoder`` is not, the predictor
    ignores that field of the action. ``alignment``: cosine of the two changes (1: the
    predictor moves the way the encoder does).
    """

    encoder: float
    predictor: float
    alignment: float


def range_end(params: ViewParams, factor: str, end: int, batch: int,
              device: torch.device) -> JitterParams:
    """Jitter with ``factor`` at the low (``end`` -1) or high (+1) end of the range that
    :meth:`~iwm.data.views.ViewSampler.sample_jitter` draws it from, every other factor the
    identity. Hue ends are at most a quarter turn each way: shifts of -0.5 and +0.5 turn
    are the same image, and half a turn apart is as far apart as two hues get."""
    lo, hi = jitter_range(params, factor)
    if factor == "hue":
        lo, hi = max(lo, -0.25), min(hi, 0.25)
    value = lo if end < 0 else hi
    out = JitterParams.identity(batch, device)
    setattr(out, factor, torch.full((batch,), value, device=device))
    out.applied = torch.ones(batch, dtype=torch.bool, device=device)
    return out


def _change_alignment(pred_change: Tensor, target_change: Tensor, valid: Tensor) -> Tensor:
    """Cosine (B,) of two (B, T, D) changes over the valid tokens (0 where one is zero)."""
    w = valid.to(pred_change.dtype).unsqueeze(-1)
    return F.cosine_similarity((pred_change * w).flatten(1), (target_change * w).flatten(1),
                               dim=1)


def factor_sensitivity(ev: BankEvaluator, params: ViewParams, factor: str) -> Tensor:
    """Per-image measures (B, 3) of ``factor`` on ``ev``'s batch: the distance between the
    target latents at the two ends of its range, the same for the predictions, and the
    alignment of the two changes. Draws nothing from any generator."""
    b, device = ev.images.shape[0], ev.images.device
    no_op = DestructiveParams.identity(b, device)
    lo, hi = (range_end(params, factor, end, b, device) for end in (-1, 1))
    z_lo, z_hi = ev.latents(lo), ev.latents(hi)
    p_lo = ev.predict(ev.images, lo, no_op).float()
    p_hi = ev.predict(ev.images, hi, no_op).float()
    return torch.stack([ev.distance_between(z_hi, z_lo), ev.distance_between(p_hi, p_lo),
                        _change_alignment(p_hi - p_lo, z_hi.float() - z_lo.float(), ev.valid)],
                       dim=1)


def summarise_sensitivity(sens: dict[str, Tensor], notes: dict[str, str]
                          ) -> dict[str, FactorSensitivity]:
    """Means of the per-image measures of every factor in ``sens``, scaled by the mean
    image-to-image distance (``sens[BETWEEN]``); a reason goes into ``notes`` if none."""
    if not sens:
        return {}
    between = float(sens[BETWEEN].mean())
    if between <= 0:
        notes["sensitivity"] = "needs two different images in a batch to scale the distances"
        return {}
    return {factor: FactorSensitivity(encoder=float(v[:, 0].mean()) / between,
                                      predictor=float(v[:, 1].mean()) / between,
                                      alignment=float(v[:, 2].mean()))
            for factor, v in sens.items() if factor != BETWEEN}
