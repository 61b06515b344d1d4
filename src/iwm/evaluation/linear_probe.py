"""Linear probe: multinomial logistic regression on frozen, average-pooled features.

Full-batch L-BFGS on standardised features: deterministic, needs no learning-rate
tuning, and runs on whatever device holds the features.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class ProbeResult:
    accuracy: float
    train_accuracy: float
    n_train: int
    n_test: int
    feature_dim: int


def fit_logistic(x: Tensor, y: Tensor, n_classes: int, weight_decay: float = 1e-4,
                 max_iter: int = 200) -> tuple[Tensor, Tensor]:
    """Multinomial logistic regression of labels ``y`` (N,) on features ``x`` (N, D),
    fitted by full-batch L-BFGS on standardised features (``weight_decay`` penalises the
    standardised weights). Returns ``(weight (n_classes, D), bias (n_classes,))`` in float64
    with the standardisation folded in, so ``x @ weight.T + bias`` are the logits on the
    raw features: the layout of an ``nn.Linear`` that can be loaded with them."""
    x = x.double()
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6) if len(x) > 1 else torch.ones_like(x[0])
    z = (x - mean) / std
    weight = torch.zeros(x.shape[1], n_classes, dtype=torch.float64, device=x.device,
                         requires_grad=True)
    bias = torch.zeros(n_classes, dtype=torch.float64, device=x.device, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter,
                                  history_size=20, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(z @ weight + bias, y)
        loss = loss + 0.5 * weight_decay * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        raw = weight / std[:, None]
        return raw.T.contiguous(), bias - mean @ raw


def train_linear_probe(train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor,
                       weight_decay: float = 1e-4, max_iter: int = 200) -> ProbeResult:
    """Fit on (train_x, train_y), report top-1 accuracy on (test_x, test_y)."""
    n_classes = int(max(train_y.max(), test_y.max())) + 1
    weight, bias = fit_logistic(train_x, train_y, n_classes, weight_decay, max_iter)

    def accuracy(x: Tensor, y: Tensor) -> float:
        return ((x.double() @ weight.T + bias).argmax(1) == y).double().mean().item()

    return ProbeResult(accuracy=accuracy(test_x, test_y),
                       train_accuracy=accuracy(train_x, train_y), n_train=len(train_y),
                       n_test=len(test_y), feature_dim=train_x.shape[1])
