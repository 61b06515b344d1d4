"""The action layout: null action, one field per parameter, documented dimension."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from iwm.data import actions
from iwm.data.actions import (
    ACTION_DIM,
    ACTION_FIELDS,
    DestructiveParams,
    JitterParams,
    build_action,
    null_action,
    relative_jitter,
)

B = 3


def _identity() -> tuple[JitterParams, JitterParams, DestructiveParams]:
    return JitterParams.identity(B), JitterParams.identity(B), DestructiveParams.identity(B)


def test_dimension_matches_fields_and_docstring() -> None:
    assert ACTION_DIM == len(ACTION_FIELDS) == 8
    assert len(set(ACTION_FIELDS)) == ACTION_DIM
    for name in ACTION_FIELDS:  # the table documents every field
        assert f"``{name}``" in actions.__doc__
    assert build_action(*_identity()).shape == (B, ACTION_DIM)


def test_null_action_is_zeros_and_identity_params() -> None:
    null = null_action(B)
    assert null.shape == (B, ACTION_DIM)
    assert null.dtype == torch.float32
    assert torch.equal(null, torch.zeros(B, ACTION_DIM))
    assert torch.equal(build_action(*_identity()), null)


def test_action_says_what_changes_not_how_the_views_were_drawn() -> None:
    # A preset that always jitters (strong, p = 1) must give the same action for the same
    # change as an evaluation whose clean source was never jittered.
    target, source, destructive = _identity()
    target.brightness = torch.full((B,), 1.5)
    target.applied = torch.ones(B, dtype=torch.bool)
    jittered_source = JitterParams.identity(B)
    jittered_source.applied = torch.ones(B, dtype=torch.bool)
    assert torch.equal(build_action(target, jittered_source, destructive),
                       build_action(target, source, destructive))


def _field(name: str) -> int:
    return ACTION_FIELDS.index(name)


# (which params, attribute, new value for sample 1, field, expected value)
CASES = [
    ("target", "brightness", 1.5, "brightness", math.log(1.5)),
    ("source", "brightness", 1.5, "brightness", -math.log(1.5)),
    ("target", "contrast", 0.5, "contrast", math.log(0.5)),
    ("source", "contrast", 0.5, "contrast", -math.log(0.5)),
    ("target", "saturation", 2.0, "saturation", math.log(2.0)),
    ("source", "saturation", 2.0, "saturation", -math.log(2.0)),
    ("target", "hue", 0.1, "hue", 0.2),
    ("source", "hue", 0.1, "hue", -0.2),
    ("destructive", "grayscale", True, "grayscale", 1.0),
    ("destructive", "solarize", True, "solarize", 1.0),
]


@pytest.mark.parametrize(("which", "attr", "value", "field", "expected"), CASES)
def test_each_field_responds_to_its_own_parameter_only(which, attr, value, field, expected):
    params = dict(zip(("target", "source", "destructive"), _identity(), strict=True))
    tensor = getattr(params[which], attr).clone()
    tensor[1] = value
    params[which] = dataclasses.replace(params[which], **{attr: tensor})
    a = build_action(params["target"], params["source"], params["destructive"])
    want = torch.zeros(B, ACTION_DIM)
    want[1, _field(field)] = expected
    torch.testing.assert_close(a, want)


def test_blur_sets_flag_and_normalised_sigma() -> None:
    t, s, d = _identity()
    d = DestructiveParams(
        grayscale=d.grayscale,
        blur=torch.tensor([False, True, True]),
        blur_sigma=torch.tensor([1.0, 1.0, 2.0]),  # sample 0: sigma without blur is ignored
        solarize=d.solarize,
    )
    a = build_action(t, s, d)
    want = torch.zeros(B, ACTION_DIM)
    want[1:, _field("blur")] = 1.0
    want[1:, _field("blur_sigma")] = torch.tensor([0.5, 1.0])
    torch.testing.assert_close(a, want)


def test_same_jitter_on_both_views_cancels() -> None:
    t, s, d = _identity()
    jit = JitterParams(
        brightness=torch.tensor([0.7, 1.2, 1.4]),
        contrast=torch.tensor([0.9, 1.1, 0.6]),
        saturation=torch.tensor([1.0, 0.8, 1.2]),
        hue=torch.tensor([0.05, -0.1, 0.0]),
        applied=torch.ones(B, dtype=torch.bool),
    )
    a = build_action(jit, jit, d)
    assert torch.equal(a[:, :4], torch.zeros(B, 4))


def test_zero_factor_stays_finite() -> None:
    t, s, d = _identity()
    t = dataclasses.replace(t, brightness=torch.tensor([0.0, 1.0, 1.0]))
    a = build_action(t, s, d)
    assert torch.isfinite(a).all()
    assert a[0, _field("brightness")] == pytest.approx(math.log(actions.MIN_FACTOR))


def test_rejects_mismatched_batch_sizes() -> None:
    with pytest.raises(ValueError, match="batch sizes"):
        build_action(JitterParams.identity(2), JitterParams.identity(3),
                     DestructiveParams.identity(2))


def test_hue_difference_is_the_shortest_rotation() -> None:
    # +0.6 turn and -0.4 turn are the same rotation, so they must give the same action.
    t, s, d = _identity()
    t = dataclasses.replace(t, hue=torch.tensor([0.3, 0.2, 0.0]))
    s = dataclasses.replace(s, hue=torch.tensor([-0.3, -0.2, 0.0]))
    a = build_action(t, s, d)[:, _field("hue")]
    torch.testing.assert_close(a, torch.tensor([2 * -0.4, 2 * 0.4, 0.0]))


def test_relative_jitter_is_the_action_of_the_pair() -> None:
    # Its action from an untouched source is the pair's action: the same log ratios and
    # wrapped hue, whichever views were jittered.
    g = torch.Generator().manual_seed(0)
    b = 64

    def draw() -> JitterParams:
        return JitterParams(brightness=0.2 + 1.6 * torch.rand(b, generator=g),
                            contrast=0.2 + 1.6 * torch.rand(b, generator=g),
                            saturation=0.2 + 1.6 * torch.rand(b, generator=g),
                            hue=torch.rand(b, generator=g) - 0.5,
                            applied=torch.rand(b, generator=g) < 0.7)

    target, source = draw(), draw()
    none = DestructiveParams.identity(b)
    rel = relative_jitter(target, source)
    torch.testing.assert_close(build_action(rel, JitterParams.identity(b), none),
                               build_action(target, source, none), atol=1e-6, rtol=0)
    assert torch.equal(rel.applied, target.applied | source.applied)
    assert (rel.hue >= -0.5).all() and (rel.hue < 0.5).all()
