"""Factor measures on images: exact on the photometric ops where nothing clips."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from iwm.data import photometric as P
from iwm.data.factors import JITTER_FACTORS
from iwm.evaluation.photometry import (
    MEASURES,
    brightness_ratio,
    contrast_ratio,
    fit_line,
    hue_shift,
    measure_factor,
    psnr,
    saturation_ratio,
    ssim,
)


def _images(channels: int, n: int = 5, lo: float = 0.3, hi: float = 0.6) -> torch.Tensor:
    # Mid-range values: no op below pushes a pixel past 0 or 1, so nothing clips.
    gen = torch.Generator().manual_seed(0)
    return lo + (hi - lo) * torch.rand(n, channels, 16, 16, generator=gen)


FACTORS = torch.tensor([0.6, 0.85, 1.0, 1.2, 1.4])


@pytest.mark.parametrize("channels", [1, 3])
def test_brightness_and_contrast_are_recovered_exactly(channels):
    x = _images(channels)
    torch.testing.assert_close(brightness_ratio(P.adjust_brightness(x, FACTORS), x), FACTORS)
    torch.testing.assert_close(contrast_ratio(P.adjust_contrast(x, FACTORS), x), FACTORS)


def test_saturation_and_hue_are_recovered_exactly():
    x = _images(3)
    torch.testing.assert_close(saturation_ratio(P.adjust_saturation(x, FACTORS), x), FACTORS)
    shifts = torch.tensor([-0.3, -0.1, 0.0, 0.05, 0.45])
    torch.testing.assert_close(hue_shift(P.adjust_hue(x, shifts), x), shifts, atol=1e-4,
                               rtol=0)


def test_each_measure_ignores_the_other_factors():
    x = _images(3)
    # Brightness keeps the hue and the saturation ratio (both scale with the pixels)...
    bright = P.adjust_brightness(x, 1.3)
    torch.testing.assert_close(hue_shift(bright, x), torch.zeros(5), atol=1e-5, rtol=0)
    torch.testing.assert_close(saturation_ratio(bright, x), torch.full((5,), 1.3))
    # ...contrast and saturation keep the mean luminance (up to torchvision's luma weights
    # summing to 0.9999, not 1); a hue rotation keeps HSV's value, not the luma.
    for out in (P.adjust_contrast(x, 1.3), P.adjust_saturation(x, 0.7)):
        torch.testing.assert_close(brightness_ratio(out, x), torch.ones(5), atol=1e-4, rtol=0)
    torch.testing.assert_close(saturation_ratio(P.adjust_contrast(x, 1.3), x),
                               torch.full((5,), 1.3), atol=1e-4, rtol=0)


def test_clipping_shows_as_less_than_was_asked():
    x = _images(1, lo=0.5, hi=0.9)
    assert (brightness_ratio(P.adjust_brightness(x, 1.4), x) < 1.39).all()


def test_nothing_to_measure_is_nan_not_a_number_that_misleads():
    grey = torch.full((2, 3, 8, 8), 0.5)
    assert contrast_ratio(grey, grey).isnan().all()
    assert saturation_ratio(grey, grey).isnan().all()
    assert hue_shift(grey, grey).isnan().all()


def test_every_jitter_factor_has_a_measure():
    assert set(MEASURES) == set(JITTER_FACTORS)
    x = _images(3)
    torch.testing.assert_close(measure_factor("contrast", P.adjust_contrast(x, 0.7), x),
                               torch.full((5,), 0.7))
    with pytest.raises(ValueError, match="no measure for 'blur'"):
        measure_factor("blur", x, x)


def test_fit_line_slope_intercept_and_r2():
    x = torch.arange(6.0)
    fit = fit_line(x, 2 * x + 1)
    assert (fit.slope, fit.intercept, fit.r2, fit.n) == pytest.approx((2.0, 1.0, 1.0, 6))
    y = torch.tensor([0.0, 2.0, 1.0, 3.0, 2.0, 4.0])
    noisy = fit_line(x, y)
    slope, intercept = np.polyfit(x.numpy(), y.numpy(), 1)
    r = np.corrcoef(x.numpy(), y.numpy())[0, 1]
    assert (noisy.slope, noisy.intercept, noisy.r2) == pytest.approx((slope, intercept, r * r))
    flat = fit_line(x, torch.full((6,), 3.0))
    assert flat.slope == 0 and flat.r2 is None
    # NaN pairs are left out; no spread in x gives no slope.
    assert fit_line(torch.tensor([0.0, 1.0, math.nan]), torch.tensor([0.0, 1.0, 5.0])).n == 2
    assert fit_line(torch.ones(4), torch.arange(4.0)).slope is None


def test_psnr_and_ssim_per_image():
    x = _images(3)
    y = (x + 0.1).clamp(0, 1)
    torch.testing.assert_close(psnr(y, x), torch.full((5,), 20.0))  # MSE 0.01 -> 20 dB
    torch.testing.assert_close(ssim(x, x), torch.ones(5))
    noisy = (x + 0.2 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
             ).clamp(0, 1)
    score = ssim(noisy, x)
    assert score.shape == (5,) and (score < 0.9).all()
    torch.testing.assert_close(ssim(x, noisy), score)  # symmetric
    assert ssim(torch.rand(2, 1, 8, 8), torch.rand(2, 1, 8, 8)).shape == (2,)  # small images
