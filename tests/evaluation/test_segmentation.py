"""Per-patch labels derived from pixels, and mIoU."""

import pytest
import torch

from iwm.evaluation.segmentation import confusion_matrix, mean_iou, patch_labels


def constructed_image() -> torch.Tensor:
    """10 x 10 pixels = a 5 x 5 grid of 2 x 2 patches: a bright 3 x 3-patch square at patch
    rows/cols 1..3, and one dim patch (mean 0.15, below the 0.2 threshold) at (0, 4)."""
    img = torch.zeros(1, 1, 10, 10)
    img[..., 2:8, 2:8] = 0.9
    img[..., 0, 8:10] = 0.3  # half of patch (0, 4) at 0.3 -> mean 0.15
    return img


def test_two_class_labels_threshold_the_patch_mean():
    labels = patch_labels(constructed_image(), patch_size=2, threshold=0.2, num_classes=2)
    expected = torch.zeros(5, 5, dtype=torch.long)
    expected[1:4, 1:4] = 1
    assert torch.equal(labels, expected.flatten()[None])
    # Just under the patch mean, the dim patch becomes foreground.
    assert patch_labels(constructed_image(), 2, 0.14, 2).view(5, 5)[0, 4] == 1


def test_three_class_labels_split_edge_from_interior():
    labels = patch_labels(constructed_image(), 2, 0.2, 3).view(5, 5)
    expected = torch.zeros(5, 5, dtype=torch.long)
    expected[1:4, 1:4] = 1  # edge
    expected[2, 2] = 2  # the only patch whose 8 neighbours are all foreground
    assert torch.equal(labels, expected)
    # The image border is not background: a full image is all interior.
    assert (patch_labels(torch.ones(1, 3, 8, 8), 2, 0.2, 3) == 2).all()


def test_miou_is_one_for_a_perfect_prediction_and_lower_for_a_wrong_one():
    target = patch_labels(constructed_image(), 2, 0.2, 3)
    perfect, per_class = mean_iou(confusion_matrix(target, target, 3))
    assert perfect == 1.0 and per_class == [1.0, 1.0, 1.0]
    everything_background = torch.zeros_like(target)
    wrong, per_class = mean_iou(confusion_matrix(everything_background, target, 3))
    assert per_class == [pytest.approx(16 / 25), 0.0, 0.0]
    assert wrong == pytest.approx(16 / 75)


def test_miou_known_value_and_absent_classes_left_out():
    target = torch.tensor([0, 0, 1, 1])
    pred = torch.tensor([0, 1, 1, 1])
    miou, per_class = mean_iou(confusion_matrix(pred, target, 3))
    # class 0: 1 / 2; class 1: 2 / 3; class 2 neither present nor predicted.
    assert per_class == [pytest.approx(0.5), pytest.approx(2 / 3), None]
    assert miou == pytest.approx((0.5 + 2 / 3) / 2)
