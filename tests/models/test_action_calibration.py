"""ActionCalibration: a per-factor affine map fitted on pairs of known jitter."""

from __future__ import annotations

import pytest
import torch

from iwm.data.factors import JITTER_FACTORS
from iwm.evaluation.infer_action import draw_jitters, score
from iwm.models.action_calibration import (
    ActionCalibration,
    FactorMap,
    jitter_coordinates,
    jitters_from_coordinates,
)

HUE = JITTER_FACTORS.index("hue")


def test_coordinates_are_log_ratios_and_turns_and_invert():
    jitters = draw_jitters(50, 3, torch.Generator().manual_seed(0))
    coords = jitter_coordinates(jitters)
    assert torch.allclose(coords[:, 0], jitters[:, 0].log())
    assert torch.equal(coords[:, HUE], jitters[:, HUE])
    assert torch.allclose(jitters_from_coordinates(coords), jitters)


def test_calibration_undoes_a_systematic_bias_but_not_scatter():
    gen = torch.Generator().manual_seed(0)
    true = draw_jitters(400, 3, gen)
    coords = jitter_coordinates(true)
    # A biased model: every answer 8% too bright, contrast answers shrunk towards 1, hue
    # shifted by 0.02 turns; plus scatter that no map can remove.
    biased = coords.clone()
    biased[:, 0] += 0.08
    biased[:, 1] *= 0.7
    biased[:, HUE] += 0.02
    inferred = jitters_from_coordinates(
        biased + 0.01 * torch.randn(biased.shape, generator=gen, dtype=biased.dtype))
    factors = ("brightness", "contrast", "hue")
    for degree in (1, 2):
        cal = ActionCalibration.fit(inferred[:200], true[:200], factors, degree=degree)
        assert set(cal.maps) == set(factors)
        assert all(len(m.coefficients) == degree + 1 for m in cal.maps.values())
        assert cal.maps["brightness"].coefficients[0] == pytest.approx(-0.08, abs=0.01)
        assert cal.maps["contrast"].coefficients[1] == pytest.approx(1 / 0.7, rel=0.05)
        assert cal.maps["hue"].coefficients[0] == pytest.approx(-0.02, abs=0.005)
        if degree == 2:  # the bias is affine: no curvature to find
            assert all(abs(m.coefficients[2]) < 0.2 for m in cal.maps.values())
        fixed = cal.apply(inferred[200:])
        for name in factors:
            j = JITTER_FACTORS.index(name)
            before = score(inferred[200:, j], true[200:, j])["r2"]
            after = score(fixed[:, j], true[200:, j])["r2"]
            assert after > before and after > 0.9
            # Scatter stays: a smooth map cannot reach the truth exactly.
            assert (fixed[:, j] - true[200:, j]).abs().max() > 1e-3
        # Factors without a map are left alone.
        assert torch.equal(fixed[:, 2], inferred[200:, 2])


def saturating(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Answers right below the identity and compressed above it (log ratio x 0.4), as
    contrast answers where a dark background clips; plus a little scatter."""
    gen = torch.Generator().manual_seed(seed)
    true = draw_jitters(n, 1, gen)
    coords = jitter_coordinates(true)
    c = coords[:, 1]
    coords[:, 1] = torch.where(c > 0, 0.4 * c, c) + 0.01 * torch.randn(n, generator=gen,
                                                                         dtype=c.dtype)
    return jitters_from_coordinates(coords), true


def test_a_quadratic_map_undoes_a_bias_that_grows_along_the_range():
    inferred, true = saturating(200, 0)
    held_inferred, held_true = saturating(200, 1)
    r2 = {}
    for degree in (1, 2):
        cal = ActionCalibration.fit(inferred, true, ("contrast",), degree=degree)
        r2[degree] = score(cal.apply(held_inferred)[:, 1], held_true[:, 1])["r2"]
    assert r2[2] > r2[1] + 0.02 and r2[2] > 0.95, r2
    fit = ActionCalibration.fit(inferred, true, ("contrast",)).maps["contrast"]
    # Increasing over the data, and beyond it continued along the tangent (no turning).
    grid = torch.linspace(fit.low - 1, fit.high + 1, 200, dtype=torch.float64)
    assert (fit(grid).diff() > 0).all()
    end = torch.tensor([fit.high], dtype=torch.float64)
    step = fit(end + 0.5) - fit(end)
    assert float(step) == pytest.approx(0.5 * float(fit.derivative(end)))


def test_a_quadratic_that_would_turn_back_falls_back_to_the_affine_map():
    x = torch.linspace(-0.5, 0.5, 101, dtype=torch.float64)
    true = torch.ones(101, 4, dtype=torch.float64)
    true[:, 3] = 0.0
    inferred = true.clone()
    inferred[:, 0] = x.exp()
    true[:, 0] = (x + 2 * x ** 2).exp()  # decreasing below x = -0.25
    fit = ActionCalibration.fit(inferred, true, ("brightness",)).maps["brightness"]
    assert len(fit.coefficients) == 2 and fit.coefficients[1] > 0


def test_a_factor_the_search_never_moved_keeps_the_identity():
    true = draw_jitters(20, 3, torch.Generator().manual_seed(1))
    constant = true.clone()
    constant[:, 2] = 1.0
    cal = ActionCalibration.fit(constant, true, ("saturation",))
    assert cal.maps == {"saturation": FactorMap()}
    assert ActionCalibration.fit(true[:1], true[:1], ("brightness",)).maps["brightness"] == \
        FactorMap()
    assert torch.allclose(ActionCalibration().apply(true), true)


def test_the_dict_form_round_trips_and_bad_ones_are_refused():
    cal = ActionCalibration({"brightness": FactorMap((0.1, 0.9, 0.2), -0.4, 0.3),
                             "hue": FactorMap((-0.02, 1.1))})
    assert ActionCalibration.from_dict(cal.to_dict()) == cal
    assert cal.to_dict()["brightness"] == {"coefficients": [0.1, 0.9, 0.2], "low": -0.4,
                                           "high": 0.3}
    assert cal.to_dict()["hue"]["low"] is None  # JSON has no infinity
    # The affine maps of earlier results still read.
    old = ActionCalibration.from_dict({"contrast": {"intercept": 0.05, "slope": 0.9}})
    assert old.maps["contrast"] == FactorMap((0.05, 0.9))
    with pytest.raises(ValueError, match=r"calibration maps for \['sharpness'\]: not jitter"):
        ActionCalibration.from_dict({"sharpness": {"coefficients": [0, 1]}})
    with pytest.raises(ValueError, match="expected {factor: {'coefficients'"):
        ActionCalibration.from_dict({"brightness": {"slope": 1}})
    with pytest.raises(ValueError, match="must be finite"):
        FactorMap((float("nan"), 1.0))
    with pytest.raises(ValueError, match="low <= high"):
        FactorMap((0.0, 1.0), 1.0, -1.0)
    with pytest.raises(ValueError, match="calibration degree 3: use one of 1, 2"):
        ActionCalibration.fit(torch.ones(3, 4), torch.ones(3, 4), ("brightness",), degree=3)


def test_fit_checks_the_shapes():
    true = draw_jitters(10, 1, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"expected the same \(n, 4\) jitters"):
        ActionCalibration.fit(true[:, :2], true[:, :2], ("brightness",))
    with pytest.raises(ValueError, match="inferred"):
        ActionCalibration.fit(true[:5], true, ("brightness",))
