from __future__ import annotations

import math

import pytest
import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from iwm.data.crops import center_resize, random_resized_crop, resized_crops, sample_crop_boxes


def _images(n=16, c=3, h=20, w=30, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, c, h, w), dtype=torch.uint8, generator=g)


def _reference(images, boxes, size):
    return torch.stack([
        TF.resized_crop(img.float() / 255, *box.tolist(), [size, size], antialias=False)
        for img, box in zip(images, boxes, strict=True)
    ])


@pytest.mark.parametrize("size", [40, 64])
def test_matches_torchvision_when_upscaling(size):
    images = _images()
    boxes = sample_crop_boxes(16, 20, 30, (0.1, 1.0), (0.75, 4 / 3),
                              torch.Generator().manual_seed(1))
    out = resized_crops(images, boxes, size)
    torch.testing.assert_close(out, _reference(images, boxes, size), atol=1e-5, rtol=0)


def test_matches_torchvision_when_downscaling_without_antialias():
    images = _images(h=60, w=50)
    boxes = torch.tensor([[0, 0, 60, 50], [5, 7, 40, 33], [20, 10, 36, 24], [1, 2, 17, 17]])
    out = resized_crops(images[:4], boxes, 16)
    torch.testing.assert_close(out, _reference(images[:4], boxes, 16), atol=1e-5, rtol=0)


def test_flip_mirrors_the_crop():
    images = _images(n=4)
    boxes = torch.tensor([[2, 3, 10, 12]] * 4)
    flip = torch.tensor([True, False, True, False])
    out = resized_crops(images, boxes, 24, flip)
    plain = resized_crops(images, boxes, 24)
    torch.testing.assert_close(out[0], plain[0].flip(-1))
    torch.testing.assert_close(out[1], plain[1])


def test_output_shape_range_and_determinism():
    images = _images(n=32)
    kw = dict(size=28, scale=(0.3, 1.0), ratio=(0.75, 4 / 3), hflip=True)
    a = random_resized_crop(images, generator=torch.Generator().manual_seed(5), **kw)
    b = random_resized_crop(images, generator=torch.Generator().manual_seed(5), **kw)
    c = random_resized_crop(images, generator=torch.Generator().manual_seed(6), **kw)
    assert a.shape == (32, 3, 28, 28) and a.dtype == torch.float32
    assert a.min() >= 0 and a.max() <= 1
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_flip_probability_is_half():
    # A full-image box (scale 1, ratio = image ratio): the output is the image or its mirror.
    images = _images(n=2000, c=1, h=8, w=8)
    out = random_resized_crop(images, 8, (1.0, 1.0), (1.0, 1.0), True,
                              torch.Generator().manual_seed(0))
    x = images.float() / 255
    same = (out - x).abs().amax(dim=(1, 2, 3)) < 1e-5
    mirrored = (out - x.flip(-1)).abs().amax(dim=(1, 2, 3)) < 1e-5
    assert (same ^ mirrored).all()
    assert 0.45 < mirrored.float().mean() < 0.55
    never = random_resized_crop(images[:50], 8, (1.0, 1.0), (1.0, 1.0), False,
                                torch.Generator().manual_seed(0))
    torch.testing.assert_close(never, x[:50], atol=1e-5, rtol=0)


def test_drawn_boxes_fit_and_follow_the_ranges():
    h, w = 32, 48
    scale, ratio = (0.2, 0.6), (0.5, 2.0)
    boxes = sample_crop_boxes(5000, h, w, scale, ratio, torch.Generator().manual_seed(0))
    top, left, bh, bw = boxes.unbind(1)
    assert (top >= 0).all() and (left >= 0).all()
    assert (top + bh <= h).all() and (left + bw <= w).all() and (bh > 0).all()
    area = (bh * bw).float() / (h * w)
    # Rounding to whole pixels moves the area fraction by up to ~(bh + bw) / (h * w).
    slack = ((bh + bw).float() / (h * w))
    assert (area >= scale[0] - slack).all() and (area <= scale[1] + slack).all()
    aspect = bw.float() / bh.float()
    assert aspect.min() > ratio[0] * 0.8 and aspect.max() < ratio[1] * 1.25
    # Offsets use the whole free range.
    free = (w - bw).clamp_min(1).float()
    assert (left.float() / free).max() > 0.95 and (left.float() / free).min() < 0.05


def test_box_distribution_matches_torchvision():
    h, w, n = 32, 32, 4000
    scale, ratio = (0.08, 1.0), (3 / 4, 4 / 3)
    ours = sample_crop_boxes(n, h, w, scale, ratio, torch.Generator().manual_seed(0)).float()
    torch.manual_seed(0)
    img = torch.zeros(1, h, w)
    theirs = torch.tensor(
        [v2.RandomResizedCrop.get_params(img, list(scale), list(ratio)) for _ in range(n)]
    ).float()
    for k in (2, 3):  # box height and width
        assert abs(ours[:, k].mean() - theirs[:, k].mean()) < 0.5
        assert abs(ours[:, k].std() - theirs[:, k].std()) < 0.5
    area = lambda b: (b[:, 2] * b[:, 3]).mean() / (h * w)  # noqa: E731
    assert abs(area(ours) - area(theirs)) < 0.02


def test_fallback_is_the_centre_crop():
    # No candidate with an aspect ratio of 10..20 fits a square image: torchvision falls
    # back to the widest centred box with ratio 10.
    boxes = sample_crop_boxes(8, 40, 40, (0.5, 1.0), (10.0, 20.0),
                              torch.Generator().manual_seed(0))
    assert boxes.tolist() == [[18, 0, 4, 40]] * 8
    boxes = sample_crop_boxes(3, 40, 40, (0.5, 1.0), (0.01, 0.02),
                              torch.Generator().manual_seed(0))
    assert boxes.tolist() == [[0, 19, 40, 1]] * 3  # tall: full height, w = round(40 * 0.02)


@pytest.mark.parametrize("h, w", [(20, 30), (30, 20), (24, 24)])
def test_whole_square_crops_are_the_test_view(h, w):
    # Finetuning's default (scale 1, ratio 1): every training view is the centre square
    # the evaluation sees, wide, tall or square; a ratio range would squash instead.
    images = _images(h=h, w=w)
    out = random_resized_crop(images, 40, (1.0, 1.0), (1.0, 1.0), hflip=False,
                              generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, center_resize(images, 40), atol=1e-5, rtol=0)
    squashed = random_resized_crop(images, 40, (1.0, 1.0), (0.75, 4 / 3), hflip=False,
                                   generator=torch.Generator().manual_seed(0))
    assert (h == w) == torch.allclose(squashed, center_resize(images, 40), atol=1e-5)


def test_random_draw_count_is_fixed():
    # The stream stays aligned whatever fits: after one call, the generator has advanced
    # by the same amount for any scale/ratio.
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    sample_crop_boxes(10, 40, 40, (0.5, 1.0), (10.0, 20.0), g1)
    sample_crop_boxes(10, 40, 40, (0.1, 0.2), (1.0, 1.0), g2)
    assert torch.equal(torch.rand(3, generator=g1), torch.rand(3, generator=g2))


@pytest.mark.cuda
def test_cpu_generator_can_drive_other_device_tensors():
    images = _images().cuda()
    g = torch.Generator(device="cuda").manual_seed(0)
    out = random_resized_crop(images, 16, (0.3, 1.0), (0.75, 4 / 3), True, g)
    assert out.device.type == "cuda"
    out_cpu = random_resized_crop(images, 16, (0.3, 1.0), (0.75, 4 / 3), True,
                                  torch.Generator().manual_seed(0))
    assert out_cpu.device.type == "cuda"


def test_center_resize():
    sq = _images(n=3, h=28, w=28)
    torch.testing.assert_close(center_resize(sq, 28), sq.float() / 255)
    up = center_resize(sq, 56)
    assert up.shape == (3, 3, 56, 56) and up.min() >= 0 and up.max() <= 1
    wide = _images(n=2, h=20, w=30)
    out = center_resize(wide, 20)
    torch.testing.assert_close(out, wide[..., 5:25].float() / 255)
    down = center_resize(_images(n=2, h=64, w=64), 16)
    ref = TF.resize(_images(n=2, h=64, w=64).float() / 255, [16, 16], antialias=True)
    torch.testing.assert_close(down, ref, atol=1e-5, rtol=0)
    assert math.isclose(float(center_resize(torch.full((1, 1, 9, 9), 255, dtype=torch.uint8),
                                            4).min()), 1.0, abs_tol=1e-6)
