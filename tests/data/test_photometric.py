"""Each batched op must equal torchvision's functional op applied image by image."""

from __future__ import annotations

import pytest
import torch
import torchvision.transforms.v2.functional as TF

from iwm.data import photometric as P
from iwm.data.actions import JitterParams
from iwm.data.factors import IDENTITY, JITTER_FACTORS

B = 12


def _images(channels: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(B, channels, 16, 20, generator=g)
    # Edge cases for the HSV round trip and the clamps: flat gray, pure black/white
    # pixels, saturated primaries and quantised values with ties between channels.
    x[0] = x[0, :1].expand_as(x[0])
    x[1] = (x[1] > 0.5).float()
    x[2] = (x[2] * 4).round() / 4
    x[3, :, :4] = 0.0
    x[3, :, 4:8] = 1.0
    return x


def _reference(fn, x: torch.Tensor, params) -> torch.Tensor:
    return torch.stack([fn(x[i], p) for i, p in enumerate(params)])


def _factors(seed: int, lo: float = 0.0, hi: float = 2.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    f = lo + (hi - lo) * torch.rand(B, generator=g)
    f[0], f[1] = 1.0, 0.0  # identity and the degenerate factor
    return f


@pytest.mark.parametrize("channels", [3, 1])
def test_brightness_matches_torchvision(channels: int) -> None:
    x, f = _images(channels), _factors(1)
    ref = _reference(lambda im, v: TF.adjust_brightness(im, float(v)), x, f)
    torch.testing.assert_close(P.adjust_brightness(x, f), ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize("channels", [3, 1])
def test_contrast_matches_torchvision(channels: int) -> None:
    x, f = _images(channels), _factors(2)
    ref = _reference(lambda im, v: TF.adjust_contrast(im, float(v)), x, f)
    torch.testing.assert_close(P.adjust_contrast(x, f), ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize("channels", [3, 1])
def test_saturation_matches_torchvision(channels: int) -> None:
    x, f = _images(channels), _factors(3)
    ref = _reference(lambda im, v: TF.adjust_saturation(im, float(v)), x, f)
    out = P.adjust_saturation(x, f)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)
    if channels == 1:
        torch.testing.assert_close(out, x, atol=0, rtol=0)


@pytest.mark.parametrize("channels", [3, 1])
def test_hue_matches_torchvision(channels: int) -> None:
    x = _images(channels)
    g = torch.Generator().manual_seed(4)
    shift = torch.rand(B, generator=g) - 0.5
    shift[:4] = torch.tensor([0.0, 0.5, -0.5, 0.25])
    ref = _reference(lambda im, v: TF.adjust_hue(im, float(v)), x, shift)
    out = P.adjust_hue(x, shift)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    if channels == 1:
        torch.testing.assert_close(out, x, atol=0, rtol=0)


def test_hue_shift_actually_changes_colour() -> None:
    # Guards against a unit mix-up (turns vs radians) that a 0-shift test would not catch.
    red = torch.zeros(1, 3, 2, 2)
    red[:, 0] = 1.0
    green = P.adjust_hue(red, torch.tensor([1 / 3]))
    torch.testing.assert_close(green[0, :, 0, 0], torch.tensor([0.0, 1.0, 0.0]), atol=1e-5,
                               rtol=0)


@pytest.mark.parametrize("channels", [3, 1])
def test_grayscale_matches_torchvision(channels: int) -> None:
    x = _images(channels)
    out = P.to_grayscale(x)
    assert out.shape == x.shape
    ref = TF.rgb_to_grayscale(x, num_output_channels=channels)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize("channels", [3, 1])
@pytest.mark.parametrize("kernel_size", [3, 7])
def test_gaussian_blur_matches_torchvision(channels: int, kernel_size: int) -> None:
    x = _images(channels)
    g = torch.Generator().manual_seed(5)
    sigma = 0.1 + 1.9 * torch.rand(B, generator=g)
    sigma[0], sigma[1] = 0.0, -1.0  # not blurred
    out = P.gaussian_blur(x, sigma, kernel_size)
    for i in range(B):
        if sigma[i] <= 0:
            torch.testing.assert_close(out[i], x[i], atol=0, rtol=0)
        else:
            s = float(sigma[i])
            ref = TF.gaussian_blur(x[i], [kernel_size, kernel_size], [s, s])
            torch.testing.assert_close(out[i], ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize("channels", [3, 1])
def test_solarize_matches_torchvision(channels: int) -> None:
    x = _images(channels)
    apply = torch.arange(B) % 2 == 0
    out = P.solarize(x, apply, threshold=0.5)
    for i in range(B):
        ref = TF.solarize(x[i], 0.5) if apply[i] else x[i]
        torch.testing.assert_close(out[i], ref, atol=0, rtol=0)


def test_parameters_are_per_sample_not_shared() -> None:
    # Two copies of one image with different factors must come out different, and each
    # must equal the op run alone on its own copy.
    x = _images(3)[4:5].repeat(2, 1, 1, 1)
    f = torch.tensor([0.5, 1.5])
    out = P.adjust_contrast(x, f)
    assert not torch.allclose(out[0], out[1])
    torch.testing.assert_close(out[1:], P.adjust_contrast(x[1:], f[1:]), atol=0, rtol=0)


def test_scalar_parameters_broadcast() -> None:
    x = _images(3)
    torch.testing.assert_close(P.adjust_brightness(x, 1.2),
                               P.adjust_brightness(x, torch.full((B,), 1.2)))


def test_rejects_wrong_shapes() -> None:
    x = _images(3)
    with pytest.raises(ValueError, match="per-sample"):
        P.adjust_brightness(x, torch.ones(B + 1))
    with pytest.raises(ValueError, match="C = 1 or 3"):
        P.adjust_brightness(torch.rand(2, 4, 8, 8), 1.0)
    with pytest.raises(ValueError, match="odd"):
        P.gaussian_blur(x, torch.ones(B), 4)
    with pytest.raises(ValueError, match="larger than 4 pixels"):
        P.gaussian_blur(x[..., :4, :4], torch.ones(B), 9)


@pytest.mark.parametrize("name", JITTER_FACTORS)
def test_each_factors_identity_leaves_images_unchanged(name):
    x = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    op = getattr(P, f"adjust_{name}")
    torch.testing.assert_close(op(x, IDENTITY[name]), x, atol=2e-6, rtol=0)
    moved = IDENTITY[name] + 0.1
    assert (op(x, moved) - x).abs().amax() > 1e-3  # the op is not a no-op elsewhere
    assert float(getattr(JitterParams.identity(1), name)) == IDENTITY[name]
