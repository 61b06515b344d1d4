"""Weighted k-nearest-neighbour probe on frozen pooled features (as DINO's kNN evaluation).

Cosine similarity between L2-normalised features; each of the k nearest training features
votes for its label with weight exp(similarity / T). The small temperature (0.07) lets a few
very close neighbours outvote many merely-close ones. No training, no hyper-parameter search:
a cheap complement to the linear probe that rewards features whose *local* neighbourhoods
are label-consistent rather than linearly separable.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from iwm.evaluation.linear_probe import ProbeResult

CHUNK = 256
"""Queries per similarity block: bounds memory to CHUNK x n_train similarities."""

LOO_QUERIES = 10_000
"""Training queries for the leave-one-out train accuracy (the full one is O(n_train^2))."""


@torch.no_grad()
def knn_predict(train_x: Tensor, train_y: Tensor, query_x: Tensor, k: int = 20,
                temperature: float = 0.07, num_classes: int | None = None,
                exclude_self: bool = False, chunk: int = CHUNK) -> Tensor:
    """Predicted labels (Q,) of ``query_x`` (Q, D) from the bank ``train_x`` (N, D).

    ``exclude_self``: query i is bank item i (leave-one-out), so it may not vote for itself.
    """
    if k < 1:
        raise ValueError(f"k={k} must be >= 1")
    if temperature <= 0:
        raise ValueError(f"temperature={temperature} must be > 0")
    bank = F.normalize(train_x.float(), dim=1)
    queries = F.normalize(query_x.float().to(bank.device), dim=1)
    labels = train_y.to(bank.device)
    num_classes = num_classes or int(labels.max()) + 1
    k = min(k, len(bank) - int(exclude_self))
    preds = []
    for start in range(0, len(queries), chunk):
        sim = queries[start:start + chunk] @ bank.T  # (C, N)
        if exclude_self:
            rows = torch.arange(len(sim), device=sim.device)
            sim[rows, rows + start] = -float("inf")
        top_sim, top_idx = sim.topk(k, dim=1)
        # Subtracting the row max before exp changes no vote ratio but keeps exp finite
        # for any T (T = 0.01 would give exp(100), beyond float32).
        weights = ((top_sim - top_sim[:, :1]) / temperature).exp()
        votes = torch.zeros(len(sim), num_classes, device=sim.device)
        votes.scatter_add_(1, labels[top_idx], weights)
        preds.append(votes.argmax(1))
    return torch.cat(preds) if preds else torch.empty(0, dtype=torch.long)


def train_knn_probe(train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor,
                    k: int = 20, temperature: float = 0.07) -> ProbeResult:
    """Top-1 test accuracy of the weighted kNN classifier; ``train_accuracy`` is leave-one-out
    on the first :data:`LOO_QUERIES` training features."""
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    pred = knn_predict(train_x, train_y, test_x, k, temperature, num_classes)
    n_loo = min(len(train_x), LOO_QUERIES)
    loo = knn_predict(train_x, train_y, train_x[:n_loo], k, temperature, num_classes,
                      exclude_self=True)
    test_y, loo_y = test_y.to(pred.device), train_y[:n_loo].to(loo.device)
    return ProbeResult(accuracy=(pred == test_y).double().mean().item(),
                       train_accuracy=(loo == loo_y).double().mean().item(),
                       n_train=len(train_y), n_test=len(test_y), feature_dim=train_x.shape[1])
