"""Ranking math of the world-model evaluations: closeness, ranks, reciprocal ranks, chance.

Closeness is "higher = closer" for both distances; ties count as the worst rank in the
tie, so a predictor that cannot tell entries apart is never credited for it. The protocol
that uses these is in docs/evaluation.md, "The MRR protocol".
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "DISTANCES",
    "chance_mrr",
    "chance_mrr_stderr",
    "chance_reciprocal_rank",
    "check_distance",
    "entry_scores",
    "mean_reciprocal_rank",
    "pairwise_scores",
    "ranks_from_scores",
    "reciprocal_rank_stderr",
]

DISTANCES = ("cosine", "l2")


def chance_mrr(bank_size: int) -> float:
    """The MRR of a predictor that ignores the action: H_K / K (see "Chance level")."""
    return sum(1 / r for r in range(1, bank_size + 1)) / bank_size


def chance_mrr_stderr(bank_size: int, n_images: int) -> float:
    """Standard error of the MRR over ``n_images`` of a predictor that ignores the action.

    Its rank is uniform on 1..K, so one image's 1/rank has mean H_K / K and second moment
    H2_K / K (H2_K = sum of 1/r^2); an MRR is "above chance" by how many of these it sits
    above :func:`chance_mrr`.
    """
    if bank_size < 1 or n_images < 1:
        raise ValueError(f"bank_size={bank_size}, n_images={n_images}: must be at least 1")
    mean = chance_mrr(bank_size)
    second = sum(1 / r**2 for r in range(1, bank_size + 1)) / bank_size
    return math.sqrt(max(second - mean**2, 0.0) / n_images)


def reciprocal_rank_stderr(reciprocal_ranks: Tensor) -> float | None:
    """Standard error of the mean of ``reciprocal_ranks`` (std / sqrt(n)); None for one
    value, where there is no spread to measure (and NaN is not valid JSON)."""
    n = reciprocal_ranks.numel()
    return float(reciprocal_ranks.float().std()) / math.sqrt(n) if n > 1 else None


def check_distance(distance: str) -> None:
    if distance not in DISTANCES:
        raise ValueError(f"distance={distance!r}: must be one of {', '.join(DISTANCES)}")


def entry_scores(pred: Tensor, entries: Tensor, valid: Tensor | None, distance: str) -> Tensor:
    """Closeness (higher = closer) of ``pred`` and ``entries``, both (..., T, D), over the
    T tokens marked by ``valid`` (..., T) (all if None) -> (...)."""
    pred, entries = pred.float(), entries.float()
    weights = pred.new_ones(pred.shape[-2]) if valid is None else valid.to(pred.dtype)
    weights = weights.unsqueeze(-1)  # (..., T, 1)
    count = weights.sum(-2).clamp_min(1.0)
    if distance == "cosine":
        a = (pred * weights).sum(-2) / count
        b = (entries * weights).sum(-2) / count
        # -|a - b|^2 = 2 cos - 2 for unit vectors; the subtraction form resolves near-1
        # cosines that a float32 dot product would round together.
        score = -(F.normalize(a, dim=-1) - F.normalize(b, dim=-1)).pow(2).sum(-1)
        # A zero vector has no direction: cos = 0 exactly, so a zero prediction ties with
        # every entry (rounding in |b/|b||^2 would otherwise rank them arbitrarily).
        zero = (a.abs().amax(-1) == 0) | (b.abs().amax(-1) == 0)
        return torch.where(zero, torch.full_like(score, -2.0), score)
    per_token = (pred - entries).pow(2).mean(-1, keepdim=True)
    return -((per_token * weights).sum(-2) / count).squeeze(-1)


def pairwise_scores(pred: Tensor, bank: Tensor, distance: str = "cosine",
                    valid: Tensor | None = None) -> Tensor:
    """Closeness (higher = closer) of each prediction to each of its bank entries.

    ``pred`` (B, D) or (B, T, D); ``bank`` (B, K, D) or (B, K, T, D); ``valid`` (B, T)
    optional token mask. Any dims between the leading ones and the channel dim D are
    treated as tokens. Returns (B, K).
    """
    check_distance(distance)
    b, k, d = bank.shape[0], bank.shape[1], bank.shape[-1]
    if pred.shape[0] != b or pred.shape[-1] != d or pred[0].numel() != bank[0, 0].numel():
        raise ValueError(f"pred {tuple(pred.shape)} does not match bank {tuple(bank.shape)}")
    p = pred.reshape(b, 1, -1, d)
    e = bank.reshape(b, k, -1, d)
    v = None if valid is None else valid.reshape(b, 1, -1)
    return entry_scores(p, e, v, distance)


def ranks_from_scores(scores: Tensor, true_index: Tensor,
                      equivalent: Tensor | None = None) -> Tensor:
    """1-based rank (B,) of ``scores[b, true_index[b]]`` in each row of ``scores`` (B, K),
    higher = better; ties count as the worst rank in the tie, NaN as the lowest score.

    ``equivalent`` (B, K) bool marks entries that are the same answer as the true one
    (e.g. renderings no 8-bit image could tell apart): they do not compete with it, so
    the rank is 1 + the number of other entries scoring at least as high."""
    scores = torch.nan_to_num(scores.float(), nan=-torch.inf)
    true = scores.gather(1, true_index.long().view(-1, 1))
    if equivalent is None:
        return (scores >= true).sum(1)
    return ((scores >= true) & ~equivalent).sum(1) + 1


def chance_reciprocal_rank(entries: Tensor) -> Tensor:
    """Expected 1/rank (same shape) of an action-blind predictor among ``entries``
    competing answers (long, >= 1), the truth included: H_n / n."""
    n = int(entries.max()) if entries.numel() else 1
    harmonic = torch.cat([torch.zeros(1, dtype=torch.float64),
                          (1.0 / torch.arange(1, n + 1, dtype=torch.float64)).cumsum(0)])
    return (harmonic.to(entries.device)[entries.long()] / entries.double()).float()


def mean_reciprocal_rank(pred: Tensor, bank: Tensor, true_index: Tensor,
                         distance: str = "cosine", valid: Tensor | None = None) -> Tensor:
    """Reciprocal rank (B,) of the true bank entry for each prediction (mean it for MRR).

    ``pred`` (B, D...) and ``bank`` (B, K, D...) as in :func:`pairwise_scores`;
    ``true_index`` (B,) the entry each prediction should match.
    """
    scores = pairwise_scores(pred, bank, distance, valid)
    return 1.0 / ranks_from_scores(scores, true_index.to(scores.device)).float()
