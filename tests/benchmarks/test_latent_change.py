"""benchmarks/latent_change.py on a planted world model, whose predicted latent change is
exactly the true one, and on images whose black half a contrast increase clips."""

from __future__ import annotations

import math

import pytest
import torch
from scripts import load_script  # tests/benchmarks/scripts.py

from iwm.api import Action
from iwm.evaluation.api_check import render
from planted_world_model import planted_images, planted_pretrained

script = load_script("latent_change")


def test_changed_patches_finds_the_clipped_background():
    image = torch.zeros(2, 1, 28, 28)
    image[..., 14:] = 0.3 + 0.4 * torch.rand(2, 1, 28, 14, generator=torch.Generator()
                                              .manual_seed(0))
    target = render(image, Action(contrast=1.5)).clamp(0, 1)
    moved = script.changed_patches(image, target, (7, 7)).view(2, 7, 7)
    # Patches 0-2 lie in the black half (columns 0-11), 4-6 in the bright one; patch 3
    # straddles both and moves.
    assert not moved[..., :3].any() and moved[..., 3:].all()
    assert script.changed_patches(image, image, (7, 7)).sum() == 0


def test_the_planted_model_predicts_the_true_change():
    model = planted_pretrained(1)
    source = planted_images(1, 8)
    action = Action(contrast=1.25, brightness=0.9)
    target = render(source, action)
    assert target.min() > 0 and target.max() < 1  # nothing clips: the planted model is exact
    out = script.alignment(model, source, target, action)
    assert out["unchanged_tokens"] == 0 and math.isnan(out["cos_unchanged"])
    assert out["cos_all"] == pytest.approx(1, abs=1e-4)
    assert out["pred_all"] == pytest.approx(out["true_all"], rel=1e-3)
    # The inverse action predicts the opposite change.
    wrong = script.alignment(model, source, target, Action(contrast=0.8, brightness=1 / 0.9))
    assert wrong["cos_all"] < -0.9


def test_the_energy_argmin_lands_on_the_planted_contrast():
    model = planted_pretrained(1)
    source = planted_images(1, 8)
    grid = torch.linspace(0.5, 1.5, 41, dtype=torch.float64)
    for value in (0.75, 1.25):
        target = render(source, Action(contrast=value))
        assert script.energy_argmin(model, source, target, "contrast", grid) == pytest.approx(
            value, abs=0.025 / 2 + 1e-9)  # half the grid's step
