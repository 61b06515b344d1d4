"""Dense per-patch task for ``iwm finetune --task segmentation``: labels and mIoU.

Small data sets (Fashion-MNIST, MNIST, Animal-MNIST) have no segmentation masks, so the
labels are derived from the pixels themselves, one label per patch (= per token, in the
encoder's row-major token order):

- a patch is **foreground** if the mean intensity of its pixels (mean over channels, in
  [0, 1], before normalisation) exceeds ``threshold`` (``finetune.seg_threshold``);
- with 3 classes (``finetune.seg_classes=3``, the default) foreground is split into
  **edge** (a foreground patch with at least one background patch among its 8 neighbours)
  and **interior** (all 8 neighbours foreground). The image border does not count as
  background, so an object filling the image is all interior.

Why 3 classes by default: foreground vs background is nearly a per-patch brightness
test that a linear head reads off any token; edge vs interior needs the neighbouring
patches, so it rewards features (and predictors) that carry spatial context.

The labels are computed on the same geometric view the model sees (after the random
crop/flip in training, the centre view in evaluation) so that they stay aligned with the
tokens; the pixel values are the original ones (crops only resample them, and no colour
transformation is applied in finetuning).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

SEG_CLASS_NAMES: dict[int, tuple[str, ...]] = {
    2: ("background", "foreground"),
    3: ("background", "edge", "interior"),
}


def patch_labels(images: Tensor, patch_size: int, threshold: float,
                 num_classes: int = 3) -> Tensor:
    """Per-patch labels of float images (B, C, H, W) in [0, 1] -> int64 (B, N), N = the
    number of patches in row-major order (the encoder's token order)."""
    if num_classes not in SEG_CLASS_NAMES:
        raise ValueError(f"num_classes={num_classes}: must be 2 or 3")
    intensity = images.float().mean(dim=1, keepdim=True)
    foreground = F.avg_pool2d(intensity, patch_size) > threshold  # (B, 1, gh, gw)
    if num_classes == 2:
        return foreground.long().flatten(1)
    # Erosion over the 8-neighbourhood: max_pool2d pads with -inf, so outside the image
    # is ignored rather than treated as background.
    interior = -F.max_pool2d(-foreground.float(), 3, stride=1, padding=1) > 0.5
    labels = torch.where(interior, 2, foreground.long())
    return labels.flatten(1)


def confusion_matrix(pred: Tensor, target: Tensor, num_classes: int) -> Tensor:
    """(num_classes, num_classes) int64 counts, rows = true class, columns = predicted."""
    flat = target.reshape(-1).long() * num_classes + pred.reshape(-1).long()
    counts = torch.bincount(flat, minlength=num_classes * num_classes)
    return counts.view(num_classes, num_classes)


def mean_iou(confusion: Tensor) -> tuple[float, list[float | None]]:
    """mIoU from a confusion matrix, and the per-class IoU (None for a class that is
    neither present nor predicted: it has no IoU and is left out of the mean, the usual
    convention, so a test set without e.g. interior patches is not penalised)."""
    conf = confusion.double()
    tp = conf.diag()
    union = conf.sum(0) + conf.sum(1) - tp
    per_class = [float(t / u) if u > 0 else None for t, u in zip(tp, union, strict=True)]
    present = [v for v in per_class if v is not None]
    return (sum(present) / len(present) if present else 0.0), per_class
