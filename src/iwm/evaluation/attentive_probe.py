"""Attentive probe: an :class:`~iwm.models.heads.AttentiveClassifier` on frozen encoder tokens.

The JEPA papers' second frozen evaluation. A linear probe sees only the mean of the tokens,
so whatever an encoder stores in *which* token carries *what* is averaged away; a learned
query that cross-attends to the tokens can read it. The tokens are extracted once by the
caller (the encoder never runs here), so the encoder can neither get gradients nor change.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from iwm.evaluation.linear_probe import ProbeResult
from iwm.models.heads import AttentiveClassifier
from iwm.training.schedules import cosine


def train_attentive_probe(train_tokens: Tensor, train_y: Tensor, test_tokens: Tensor,
                          test_y: Tensor, *, epochs: float = 10.0, lr: float = 1e-3,
                          weight_decay: float = 0.01, batch_size: int = 256,
                          num_heads: int = 4, device: torch.device | str | None = None,
                          seed: int = 0) -> ProbeResult:
    """Train on tokens (N, T, D) with AdamW + cosine lr decay; top-1 accuracy on the test set.

    The tokens may live anywhere (e.g. float16 on the CPU to save memory): each minibatch is
    moved to ``device`` (default: the tokens' device) and computed in float32.
    """
    device = torch.device(device) if device is not None else train_tokens.device
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    # Own seeded RNGs: the result is reproducible and the caller's global RNG is untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = AttentiveClassifier(train_tokens.shape[-1], num_classes, num_heads).to(device)
    shuffle = torch.Generator().manual_seed(seed)

    # As in pretraining: decay weight matrices only, not biases, norms or the query tokens.
    decay = [p for p in head.parameters() if p.ndim == 2]
    no_decay = [p for p in head.parameters() if p.ndim != 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=lr)
    n = len(train_tokens)
    steps_per_epoch = math.ceil(n / batch_size)
    total_steps = max(1, round(epochs * steps_per_epoch))
    head.train()
    for step in range(total_steps):
        if step % steps_per_epoch == 0:
            order = torch.randperm(n, generator=shuffle)
        idx = order[(step % steps_per_epoch) * batch_size:][:batch_size]
        for group in optimizer.param_groups:
            group["lr"] = cosine(step, total_steps, lr, 0.0)
        logits = head(train_tokens[idx].to(device, non_blocking=True).float())
        loss = F.cross_entropy(logits, train_y[idx].to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return ProbeResult(accuracy=_accuracy(head, test_tokens, test_y, batch_size, device),
                       train_accuracy=_accuracy(head, train_tokens, train_y, batch_size, device),
                       n_train=n, n_test=len(test_tokens), feature_dim=train_tokens.shape[-1])


@torch.no_grad()
def _accuracy(head: nn.Module, tokens: Tensor, labels: Tensor, batch_size: int,
              device: torch.device) -> float:
    head.eval()
    correct = 0
    for start in range(0, len(tokens), batch_size):
        x = tokens[start:start + batch_size].to(device, non_blocking=True).float()
        y = labels[start:start + batch_size].to(device)
        correct += (head(x).argmax(1) == y).sum().item()
    return correct / max(len(tokens), 1)
