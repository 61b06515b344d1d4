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


def train_linear_probe(train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor,
                       weight_decay: float = 1e-4, max_iter: int = 200) -> ProbeResult:
    """Fit on (train_x, train_y), report top-1 accuracy on (test_x, test_y)."""
    train_x, test_x = train_x.double(), test_x.double()
    mean, std = train_x.mean(0), train_x.std(0).clamp_min(1e-6)
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    n_classes = int(max(train_y.max(), test_y.max())) + 1
    weight = torch.zeros(train_x.shape[1], n_classes, dtype=torch.float64,
                         device=train_x.device, requires_grad=True)
    bias = torch.zeros(n_classes, dtype=torch.float64, device=train_x.device, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter,
                                  history_size=20, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(train_x @ weight + bias, train_y)
        loss = loss + 0.5 * weight_decay * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        train_acc = ((train_x @ weight + bias).argmax(1) == train_y).double().mean().item()
        test_acc = ((test_x @ weight + bias).argmax(1) == test_y).double().mean().item()
    return ProbeResult(accuracy=test_acc, train_accuracy=train_acc, n_train=len(train_y),
                       n_test=len(test_y), feature_dim=train_x.shape[1])
