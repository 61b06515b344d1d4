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
    cal = ActionCalibration.fit(inferred[:200], true[:200], factors)
    assert set(cal.maps) == set(factors)
    assert cal.maps["brightness"].intercept == pytest.approx(-0.08, abs=0.01)
    assert cal.maps["contrast"].slope == pytest.approx(1 / 0.7, rel=0.05)
    assert cal.maps["hue"].intercept == pytest.approx(-0.02, abs=0.005)
    fixed = cal.apply(inferred[200:])
    for name in factors:
        j = JITTER_FACTORS.index(name)
        before = score(inferred[200:, j], true[200:, j])["r2"]
        after = score(fixed[:, j], true[200:, j])["r2"]
        assert after > before and after > 0.9
        # Scatter stays: the map is affine, it cannot reach the truth exactly.
        assert (fixed[:, j] - true[200:, j]).abs().max() > 1e-3
    # Factors without a map are left alone.
    assert torch.equal(fixed[:, 2], inferred[200:, 2])


def test_a_factor_the_search_never_moved_keeps_the_identity():
    true = draw_jitters(20, 3, torch.Generator().manual_seed(1))
    constant = true.clone()
    constant[:, 2] = 1.0
    cal = ActionCalibration.fit(constant, true, ("saturation",))
    assert cal.maps == {"saturation": FactorMap(0.0, 1.0)}
    assert ActionCalibration.fit(true[:1], true[:1], ("brightness",)).maps["brightness"] == \
        FactorMap()
    assert torch.allclose(ActionCalibration().apply(true), true)


def test_the_dict_form_round_trips_and_bad_ones_are_refused():
    cal = ActionCalibration({"brightness": FactorMap(0.1, 0.9), "hue": FactorMap(-0.02, 1.1)})
    assert ActionCalibration.from_dict(cal.to_dict()) == cal
    assert cal.to_dict()["brightness"] == {"intercept": 0.1, "slope": 0.9}
    with pytest.raises(ValueError, match=r"calibration maps for \['sharpness'\]: not jitter"):
        ActionCalibration.from_dict({"sharpness": {"intercept": 0, "slope": 1}})
    with pytest.raises(ValueError, match="expected {factor: {'intercept'"):
        ActionCalibration.from_dict({"brightness": {"slope": 1}})
    with pytest.raises(ValueError, match="must be finite"):
        FactorMap(float("nan"), 1.0)


def test_fit_checks_the_shapes():
    true = draw_jitters(10, 1, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"expected the same \(n, 4\) jitters"):
        ActionCalibration.fit(true[:, :2], true[:, :2], ("brightness",))
    with pytest.raises(ValueError, match="inferred"):
        ActionCalibration.fit(true[:5], true, ("brightness",))
