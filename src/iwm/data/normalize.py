"""Per-channel normalisation of [0, 1] images, as stored with a trained model."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Normalizer:
    """Per-channel normalisation of [0, 1] images, stored with the model."""

    mean: Tensor
    std: Tensor

    @classmethod
    def create(cls, mean: tuple[float, ...], std: tuple[float, ...], device: torch.device
               ) -> Normalizer:
        return cls(torch.tensor(mean, device=device).view(1, -1, 1, 1),
                   torch.tensor(std, device=device).view(1, -1, 1, 1))

    def __call__(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std
