"""Pretrained.infer_action on a planted world model, whose true action is known exactly."""

from __future__ import annotations

import math

import pytest
import torch

import iwm
from iwm.data.factors import JITTER_FACTORS
from iwm.evaluation.infer_action import calibrate, draw_jitters, render_pairs
from iwm.models.action_search import SearchBudget
from planted_world_model import COLUMN, planted_images, planted_pretrained

N = 8


def pairs(channels: int, n: int = N, seed: int = 0):
    source = planted_images(channels, n, seed)
    jitters = draw_jitters(n, channels, torch.Generator().manual_seed(seed))
    target = render_pairs(source, jitters)
    # The premise of an exact planted model: nothing clipped.
    assert target.min() > 0 and target.max() < 1
    return source, target, jitters


def truth(jitters: torch.Tensor) -> torch.Tensor:
    return torch.cat([iwm.Action(**dict(zip(JITTER_FACTORS, j.tolist(), strict=True)))
                      .to_tensor(1) for j in jitters])


@pytest.mark.parametrize("channels", [1, 3])
def test_the_planted_action_is_the_energys_exact_minimum(channels):
    model = planted_pretrained(channels)
    source, target, jitters = pairs(channels)
    at_truth = model.action_energy(source, target, truth(jitters)[:, None])
    at_identity = model.action_energy(source, target, torch.zeros(N, 1, 8))
    assert at_truth.amax() < 1e-8 < at_identity.amin()


@pytest.mark.parametrize("channels, tolerance", [(1, 0.02), (3, 0.05)])
def test_infer_action_recovers_the_planted_action(channels, tolerance):
    model = planted_pretrained(channels)
    source, target, jitters = pairs(channels)
    found = model.infer_action(source, target)
    assert len(found) == N and all(isinstance(a, iwm.Action) for a in found)
    got = torch.tensor([[getattr(a, f) for f in JITTER_FACTORS] for a in found],
                       dtype=torch.float64)
    error = (got - jitters).abs()
    assert error.amax() < tolerance, error
    if channels == 1:  # saturation and hue do nothing to grey images: never moved
        assert (got[:, 2] == 1).all() and (got[:, 3] == 0).all()
    assert not any(a.grayscale or a.blur_sigma or a.solarize for a in found)
    # The budget is what it says: one predictor call per image and evaluation.
    assert model.predictor.calls >= N * SearchBudget().evaluations


class Inpainting(torch.nn.Module):
    """The planted predictor plus an error that depends on the source's tokens but not on
    the action: what a predictor that fills a masked block imperfectly adds to every
    candidate alike."""

    def __init__(self, exact: torch.nn.Module) -> None:
        super().__init__()
        self.exact = exact
        self.mix = torch.randn(32, 32, generator=torch.Generator().manual_seed(1)) / 32 ** 0.5

    def predict_by_halves(self, tokens, *, action, tile):
        return self.exact.predict_by_halves(tokens, action=action, tile=tile) + 0.3 * torch.tanh(
            tokens @ self.mix)


@pytest.mark.parametrize("channels", [1, 3])
def test_the_residual_energy_cancels_an_error_every_action_shares(channels):
    model = planted_pretrained(channels)
    model.model.predictor = Inpainting(model.predictor)
    source, target, jitters = pairs(channels)
    at_truth = {kind: model.action_energy(source, target, truth(jitters)[:, None], energy=kind)
                for kind in ("direct", "residual")}
    assert at_truth["residual"].amax() < 1e-8 < at_truth["direct"].amin()
    error = {}
    for kind in ("direct", "residual"):
        found = model.infer_action(source, target, energy=kind)
        got = torch.tensor([[getattr(a, f) for f in JITTER_FACTORS] for a in found],
                           dtype=torch.float64)
        error[kind] = (got - jitters).abs().amax()
    assert error["residual"] < 0.05 < error["direct"], error


def test_an_unknown_energy_kind_is_refused(grey_model):
    images = torch.rand(2, 1, 28, 28)
    with pytest.raises(ValueError, match="energy kind 'cosine': use one of direct, residual"):
        grey_model.action_energy(images, images, torch.zeros(2, 3, 8), energy="cosine")


def test_destructive_inference_finds_an_intact_source():
    # The planted predictor moves off the target for every flag: none is the answer.
    model = planted_pretrained(3)
    source, target, jitters = pairs(3)
    result = model.search_action(source, target, destructive=True)
    space = model.action_space(destructive=True)
    assert space.flags  # iwm-equi-shapes' views draw grayscale, blur and solarize
    assert (result.action[:, list(space.flags)] == 0).all()
    found = [iwm.Action.from_vector(v) for v in result.action]
    brightness = torch.tensor([a.brightness for a in found], dtype=torch.float64)
    assert (brightness - jitters[:, 0]).abs().amax() < 0.04


def test_a_seed_fixes_the_answer():
    model = planted_pretrained(3)
    source, target, _ = pairs(3, 4)
    budget = SearchBudget(iterations=2, population=8, elites=2)
    first = model.infer_action(source, target, budget=budget, seed=5)
    assert model.infer_action(source, target, budget=budget, seed=5) == first
    assert model.infer_action(source, target, budget=budget, seed=6) != first


def test_from_vector_inverts_to_tensor():
    action = iwm.Action(brightness=1.3, contrast=0.7, saturation=1.1, hue=-0.05,
                        grayscale=True, blur_sigma=1.2, solarize=True)
    back = iwm.Action.from_vector(action.to_tensor(1)[0])
    for name in ("brightness", "contrast", "saturation", "hue", "blur_sigma"):
        assert getattr(back, name) == pytest.approx(getattr(action, name), rel=1e-6)
    assert back.grayscale and back.solarize
    assert iwm.Action.from_vector(iwm.Action().to_tensor(1)[0]) == iwm.Action()


@pytest.fixture(scope="module")
def grey_model() -> iwm.Pretrained:
    return planted_pretrained(1)


@pytest.mark.parametrize("source, target, match", [
    (torch.rand(2, 1, 28, 28), torch.rand(3, 1, 28, 28), "one target per source"),
    (torch.rand(2, 3, 28, 28), torch.rand(2, 1, 28, 28), r"source: .*\(B, 1, 28, 28\)"),
    (torch.rand(2, 1, 28, 28), torch.rand(2, 1, 32, 32), r"target: .*resize to 28 x 28"),
    (torch.rand(2, 1, 28, 28), 2 * torch.rand(2, 1, 28, 28), r"target: .*\[0, 1\]"),
    (torch.rand(1, 28, 28), torch.rand(1, 28, 28), r"source: .*images\[None\]"),
    (torch.rand(0, 1, 28, 28), torch.rand(0, 1, 28, 28), "one target per source"),
    ([1.0], torch.rand(1, 1, 28, 28), "source: .*expected a tensor"),
])
def test_bad_images_get_one_line_errors_that_say_what_to_do(grey_model, source, target,
                                                            match):
    with pytest.raises(ValueError, match=match) as info:
        grey_model.infer_action(source, target)
    assert "\n" not in str(info.value)


def test_action_energy_checks_the_candidates_shape(grey_model):
    images = torch.rand(2, 1, 28, 28)
    with pytest.raises(ValueError, match=r"actions: expected \(2, P, 8\)"):
        grey_model.action_energy(images, images, torch.zeros(2, 8))
    energy = grey_model.action_energy(images, images, torch.zeros(2, 3, 8))
    assert energy.shape == (2, 3)


class Biased(torch.nn.Module):
    """The planted predictor with a systematic bias: it applies 1.25 times the brightness
    and 0.8 times the contrast it is asked for (in log ratio), so the energy's minimum sits
    at brightness^(1/1.25) and contrast^(1/0.8) for every image. (A constant offset would
    not do: the residual energy cancels what the null action shares.)"""

    def __init__(self, exact: torch.nn.Module) -> None:
        super().__init__()
        self.exact = exact

    def predict_by_halves(self, tokens, *, action, tile):
        action = action.clone()
        action[..., COLUMN["brightness"]] *= 1.25
        action[..., COLUMN["contrast"]] *= 0.8
        return self.exact.predict_by_halves(tokens, action=action, tile=tile)


def test_calibration_removes_a_planted_bias_and_leaves_an_exact_model_alone():
    model = planted_pretrained(1)
    fitting_images = planted_images(1, 32, seed=1)
    exact = calibrate(model, fitting_images, seed=1)
    for name in ("brightness", "contrast"):
        intercept, slope, curvature = exact.maps[name].coefficients
        assert slope == pytest.approx(1, abs=0.02) and intercept == pytest.approx(0, abs=0.005)
        assert curvature == pytest.approx(0, abs=0.1)
    model.model.predictor = Biased(model.predictor)
    source, target, jitters = pairs(1, 16)
    raw = infer(model, source, target)
    assert (raw - jitters).abs().amax() > 0.05
    cal = calibrate(model, fitting_images, seed=1)
    assert cal.maps["brightness"].coefficients[1] == pytest.approx(1.25, abs=0.03)
    assert cal.maps["contrast"].coefficients[1] == pytest.approx(0.8, abs=0.03)
    fixed = infer(model, source, target, calibration=cal)
    assert (fixed - jitters).abs().amax() < 0.02
    assert torch.allclose(fixed, cal.apply(raw))


def test_calibration_keeps_the_flags_and_refuses_too_few_images():
    model = planted_pretrained(3)
    source, target, _ = pairs(3, 2)
    shift = iwm.ActionCalibration.from_dict({"brightness": {"coefficients": [0.1, 1]}})
    budget = SearchBudget(iterations=2, population=8, elites=2)
    plain = model.infer_action(source, target, destructive=True, budget=budget)
    moved = model.infer_action(source, target, destructive=True, budget=budget,
                               calibration=shift)
    for a, b in zip(plain, moved, strict=True):
        assert b.brightness == pytest.approx(a.brightness * math.exp(0.1))
        assert (b.contrast, b.hue, b.grayscale, b.blur_sigma, b.solarize) == \
            (a.contrast, a.hue, a.grayscale, a.blur_sigma, a.solarize)
    with pytest.raises(ValueError, match="1 image"):
        calibrate(model, source[:1])


def infer(model, source, target, **kwargs) -> torch.Tensor:
    found = model.infer_action(source, target, **kwargs)
    return torch.tensor([[getattr(a, f) for f in JITTER_FACTORS] for a in found],
                        dtype=torch.float64)
