"""The world model asked through the public API (iwm.evaluation.api_check)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torchvision.transforms.v2.functional as TF
from torch import Tensor

import iwm
from iwm.cli.main import main
from iwm.config import load_config
from iwm.data.factors import JITTER_FACTORS
from iwm.evaluation.api_check import (
    RANGES,
    render,
    run_api_check,
    sample_jitters,
    world_model_api_check,
)
from iwm.evaluation.ranking import chance_mrr, chance_mrr_stderr
from tiny_run import make_tiny_run

SIZE = 16  # 4 x 4 patches: the check's code path at a fraction of 28 x 28's cost
K = 16


def tiny_pretrained(channels: int) -> iwm.Pretrained:
    torch.manual_seed(0)
    cfg = load_config("iwm-equi-tiny", [f"data.image_size={SIZE}", "model.predictor_depth=1"])
    return iwm.Pretrained.create(cfg, channels, {"mean": [0.5] * channels,
                                                 "std": [0.25] * channels})


def images_for(channels: int, n: int) -> Tensor:
    """Noise around a level and with a spread of each image's own, so that images differ
    in more than their noise."""
    gen = torch.Generator().manual_seed(1)
    level, spread = torch.rand(2, n, 1, 1, 1, generator=gen)
    noise = torch.rand(n, channels, SIZE, SIZE, generator=gen) - 0.5
    return (0.2 + 0.6 * level + spread * noise).clamp(0, 1)


def torchvision_jitter(images: Tensor, a: iwm.Action) -> Tensor:
    """What an Action's jitter means, written out with torchvision's ops (all four)."""
    out = TF.adjust_brightness(images, a.brightness)
    out = TF.adjust_contrast(out, a.contrast)
    out = TF.adjust_saturation(out, a.saturation)
    return TF.adjust_hue(out, a.hue)


def install_oracle(pretrained: iwm.Pretrained, images: Tensor,
                   monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Make ``pretrained.apply`` a perfect world model for ``images``: it returns the
    latents of each image really jittered as asked. It learns which jitter a row of the
    action tensor means by recording every ``iwm.Action.to_tensor`` call (so it does not
    depend on the vector's layout), and checks that it is asked about the clean images.
    Returns a list that counts the rows it answered."""
    meaning: dict[bytes, iwm.Action] = {}
    to_tensor = iwm.Action.to_tensor

    def recording(self: iwm.Action, batch_size: int = 1, device=None) -> Tensor:
        out = to_tensor(self, batch_size, device)
        for row in out:
            meaning[row.cpu().numpy().tobytes()] = self
        return out

    clean = pretrained.encode(images)
    answered = [0]

    def apply(latents: Tensor, action: iwm.Action | Tensor, masks=None) -> Tensor:
        assert masks is None
        assert torch.equal(latents, clean), "the check must ask about the clean latents"
        if isinstance(action, iwm.Action):
            action = action.to_tensor(len(latents))
        asked = [meaning[row.cpu().numpy().tobytes()] for row in action]
        answered[0] += len(asked)
        views = torch.stack([torchvision_jitter(images[i:i + 1], a)[0]
                             for i, a in enumerate(asked)])
        return pretrained.encode(views)

    monkeypatch.setattr(iwm.Action, "to_tensor", recording)
    monkeypatch.setattr(pretrained, "apply", apply)
    return answered


@pytest.mark.parametrize("channels", [1, 3])
def test_an_oracle_world_model_scores_one(channels, monkeypatch):
    pretrained, images = tiny_pretrained(channels), images_for(channels, 12)
    answered = install_oracle(pretrained, images, monkeypatch)
    r = world_model_api_check(pretrained, images, k=K)
    varied = JITTER_FACTORS if channels == 3 else ("brightness", "contrast")
    assert answered[0] == 12 * (1 + len(varied))  # one query per image and bank
    assert r.mrr == 1.0 and r.bank == K and r.n_images == 12
    assert r.stderr == 0.0  # every rank is 1: no spread
    assert r.chance == pytest.approx(chance_mrr(K))
    for factor in JITTER_FACTORS:
        if factor in varied:
            assert r.per_factor[factor] == 1.0 and r.per_factor_stderr[factor] == 0.0, factor
        else:  # saturation and hue do nothing to grey images
            assert r.per_factor[factor] is None and factor in r.notes
            assert r.per_factor_stderr[factor] is None


@pytest.mark.parametrize("channels", [1, 3])
def test_a_world_model_that_ignores_the_action_scores_chance(channels, monkeypatch):
    pretrained, images = tiny_pretrained(channels), images_for(channels, 128)
    real_apply = pretrained.apply
    monkeypatch.setattr(pretrained, "apply",
                        lambda latents, action, masks=None: real_apply(latents, iwm.Action()))
    r = world_model_api_check(pretrained, images, k=K)
    # 128 independent true indices: the standard error of the mean is ~0.02 at K = 16.
    assert abs(r.mrr - chance_mrr(K)) < 0.07, r
    # The spread of a rank uniform on 1..K over 128 images (0.022); a wrong divisor (n
    # for sqrt(n)) would be 11x off.
    noise = chance_mrr_stderr(K, 128)
    assert r.stderr == pytest.approx(noise, rel=0.35), r
    for factor in ("brightness", "contrast"):
        assert abs(r.per_factor[factor] - chance_mrr(K)) < 0.07, (factor, r)
        assert r.per_factor_stderr[factor] == pytest.approx(noise, rel=0.35), (factor, r)


def test_a_world_model_that_answers_for_the_wrong_image_fails(monkeypatch):
    # The right jitter applied to another image must not be credited: each image's bank
    # is its own, so this scores far below 1.
    pretrained, images = tiny_pretrained(1), images_for(1, 32)
    install_oracle(pretrained, images, monkeypatch)
    oracle = pretrained.apply

    def shifted(latents: Tensor, action: Tensor, masks=None) -> Tensor:
        return oracle(latents, action).roll(1, dims=0)

    monkeypatch.setattr(pretrained, "apply", shifted)
    assert world_model_api_check(pretrained, images, k=K).mrr < 0.5


@pytest.mark.parametrize("channels", [1, 3])
def test_render_is_torchvision_functional_ops_in_order(channels):
    images = images_for(channels, 3)
    a = iwm.Action(brightness=1.3, contrast=0.7, saturation=1.15, hue=0.08)
    assert torch.equal(render(images, a), torchvision_jitter(images, a))
    # Per-image semantics although torchvision's ops see a batch: contrast blends with
    # each image's own mean.
    assert torch.equal(render(images, a)[1], torchvision_jitter(images[1:2], a)[0])
    # Hue 0 is skipped (the identity), which differs from torchvision's HSV round trip
    # by rounding only.
    b = iwm.Action(brightness=0.8, contrast=1.2, saturation=0.9)
    torch.testing.assert_close(render(images, b), torchvision_jitter(images, b),
                               atol=1e-6, rtol=0)
    assert torch.equal(render(images, iwm.Action()), images)
    with pytest.raises(ValueError, match="source-side"):
        render(images, iwm.Action(solarize=True))


def test_jitters_vary_only_the_asked_factors_in_their_ranges():
    gen = torch.Generator().manual_seed(0)
    jitters = sample_jitters(200, ("contrast", "hue"), gen)
    identity = iwm.Action()
    for name in ("brightness", "saturation"):
        assert {getattr(a, name) for a in jitters} == {getattr(identity, name)}
    for name in ("contrast", "hue"):
        values = [getattr(a, name) for a in jitters]
        lo, hi = RANGES[name]
        assert all(lo <= v <= hi for v in values) and len(set(values)) == 200
        assert max(values) - min(values) > 0.9 * (hi - lo)  # spread over the range


def test_the_seed_fixes_the_result():
    pretrained, images = tiny_pretrained(1), images_for(1, 8)

    def once(seed: int) -> float:
        return world_model_api_check(pretrained, images, k=8,
                                     generator=torch.Generator().manual_seed(seed)).mrr

    assert once(3) == once(3)


@pytest.mark.parametrize("shape, k, message", [
    ((4, 1, SIZE, SIZE), 1, "k=1: a ranking needs at least 2"),
    ((4, 3, SIZE, SIZE), 8, r"expected images \(B, 1, 16, 16\)"),
    ((4, 1, 28, 28), 8, r"got \(4, 1, 28, 28\)"),
    ((1, SIZE, SIZE), 8, "expected images"),
    ((0, 1, SIZE, SIZE), 8, "B >= 1"),
])
def test_bad_input_is_a_clear_value_error(shape, k, message):
    with pytest.raises(ValueError, match=message):
        world_model_api_check(tiny_pretrained(1), torch.rand(shape), k=k)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return make_tiny_run(tmp_path_factory.mktemp("api_check"))


def test_run_api_check_writes_its_result_and_the_cli_prints_it(run, monkeypatch, capsys):
    monkeypatch.setenv("IWM_DATA", str(run.parent / "fmnist"))
    r = run_api_check(run, n_images=6, k=4, device="cpu", batch_size=4)
    err = capsys.readouterr().err
    assert [line.split()[4] for line in err.splitlines()
            if line.startswith("iwm: eval api-check batch ")] == ["1/2", "2/2"]
    saved = json.loads((run / "results" / "api_check.json").read_text())
    assert r["path"] == str(run / "results" / "api_check.json")
    assert saved["n_images"] == 6 and saved["bank"] == 4  # 2 batches, 4 + 2 images
    assert 0 < saved["mrr"] <= 1 and saved["chance"] == pytest.approx(chance_mrr(4))
    assert saved["per_factor"]["saturation"] is None  # Fashion-MNIST is grey
    assert set(saved["ranges"]) == {"brightness", "contrast"}
    with pytest.raises(ValueError, match="k=1"):
        run_api_check(run, k=1, device="cpu")

    assert main(["eval", "api-check", str(run), "--bank", "4", "--images", "3"]) == 0
    out = capsys.readouterr().out
    assert "chance 0.521 ± " in out and "brightness" in out and "3 images" in out
    printed = json.loads((run / "results" / "api_check.json").read_text())
    assert printed["n_images"] == 3
    assert f"MRR {printed['mrr']:.4f} ± {printed['stderr']:.4f}" in out
