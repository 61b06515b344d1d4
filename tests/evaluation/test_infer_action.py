"""``iwm eval infer-action``: the protocol's parts, its references, the command and the
report's section."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torchvision.transforms.v2.functional as TF

from iwm.cli.main import main
from iwm.data.factors import JITTER_FACTORS
from iwm.evaluation import report
from iwm.evaluation.infer_action import (
    LANDSCAPE_POINTS,
    RANGES,
    draw_jitters,
    load_calibration,
    pixel_features,
    pixel_regression,
    render_pairs,
    run_infer_action,
    score,
)
from iwm.models.action_calibration import ActionCalibration
from iwm.models.action_search import SearchBudget
from planted_world_model import planted_images
from tiny_run import make_tiny_run


def test_jitters_are_uniform_in_the_issues_ranges_and_identity_where_they_do_nothing():
    assert RANGES == {"brightness": (0.6, 1.4), "contrast": (0.6, 1.4),
                      "saturation": (0.8, 1.2), "hue": (-0.1, 0.1)}
    rgb = draw_jitters(2000, 3, torch.Generator().manual_seed(0))
    grey = draw_jitters(2000, 1, torch.Generator().manual_seed(0))
    for j, name in enumerate(JITTER_FACTORS):
        lo, hi = RANGES[name]
        assert lo <= rgb[:, j].min() < lo + 0.01 and hi - 0.01 < rgb[:, j].max() <= hi
    assert (grey[:, 2] == 1).all() and (grey[:, 3] == 0).all()
    torch.testing.assert_close(grey[:, :2], rgb[:, :2])  # one draw whatever the channels
    assert abs(torch.corrcoef(rgb.T)[0, 1]) < 0.1  # independent factors


def test_targets_are_torchvision_jitters_of_each_images_own_factors():
    images = planted_images(3, 3)
    jitters = draw_jitters(3, 3, torch.Generator().manual_seed(1))
    out = render_pairs(images, jitters)
    for i, (b, c, s, h) in enumerate(jitters.tolist()):
        expected = TF.adjust_hue(TF.adjust_saturation(TF.adjust_contrast(
            TF.adjust_brightness(images[i:i + 1], b), c), s), h)
        torch.testing.assert_close(out[i:i + 1], expected)


@pytest.mark.parametrize("channels", [1, 3])
def test_the_pixel_reference_reads_unclipped_jitters_off_the_pixels(channels):
    images = planted_images(channels, 64)
    jitters = draw_jitters(64, channels, torch.Generator().manual_seed(2))
    targets = render_pairs(images, jitters)
    features = pixel_features(images, targets)
    assert features.shape == (64, 2 if channels == 1 else 4)
    predicted = pixel_regression(features, jitters)
    for j, name in enumerate(JITTER_FACTORS[:2 if channels == 1 else 4]):
        assert score(predicted[:, j], jitters[:, j])["r2"] > 0.9, name
    assert pixel_regression(features[:5], jitters[:5]) is None  # too few to fit a half


def test_the_pixel_reference_never_sees_the_images_it_predicts():
    # Targets that are noise: a fit that saw them would still "explain" part of them.
    gen = torch.Generator().manual_seed(3)
    features = torch.randn(40, 8, generator=gen, dtype=torch.float64)
    jitters = draw_jitters(40, 3, gen)
    predicted = pixel_regression(features, jitters)
    assert score(predicted[:, 0], jitters[:, 0])["r2"] < 0.05


def test_score():
    true = torch.tensor([0.7, 1.0, 1.3], dtype=torch.float64)
    assert score(true, true) == {"r2": 1.0, "mae": 0.0}
    no_change = score(torch.ones(3, dtype=torch.float64), true)
    assert no_change["r2"] == pytest.approx(0.0) and no_change["mae"] == pytest.approx(0.2)
    assert score(true, torch.ones(3, dtype=torch.float64))["r2"] is None


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return make_tiny_run(tmp_path_factory.mktemp("infer"))


@pytest.fixture
def data(run, monkeypatch):
    monkeypatch.setenv("IWM_DATA", str(run.parent / "fmnist"))


def test_cli_scores_a_run_beside_its_references(run, data, capsys):
    assert main(["eval", "infer-action", str(run), "--images", "10", "--seed", "3",
                 "--calibration-images", "6"]) == 0
    out = capsys.readouterr().out
    assert "brightness" in out and "contrast" in out and "saturation" not in out
    assert "fitted on 6 training pairs" in out
    r = json.loads((run / "results" / "infer_action.json").read_text())
    assert r["calibration"]["n_images"] == 6 and r["calibration"]["split"] == "train"
    assert r["calibration"]["degree"] == 2
    assert set(r["calibration"]["maps"]) == {"brightness", "contrast"}
    assert r["n_images"] == 10 and r["seed"] == 3 and r["channels"] == 1
    assert r["budget"]["evaluations"] == SearchBudget().evaluations and r["ms_per_image"] > 0
    assert r["per_factor"]["saturation"] is None and r["per_factor"]["hue"] is None
    for name in ("brightness", "contrast"):
        scores = r["per_factor"][name]
        assert set(scores) == {"model", "calibrated", "no_change", "pixels"}
        assert all(set(s) == {"r2", "mae"} for s in scores.values())
        true = torch.tensor(r["pairs"]["true"][name])
        assert scores["no_change"]["mae"] == pytest.approx(float((true - 1).abs().mean()))
        inferred = torch.tensor(r["pairs"]["inferred"][name])
        assert scores["model"]["mae"] == pytest.approx(float((inferred - true).abs().mean()))
        fit = ActionCalibration.from_dict(r["calibration"]["maps"]).maps[name]
        mapped = fit(inferred.double().log()).exp().float()
        assert torch.tensor(r["pairs"]["calibrated"][name]) == pytest.approx(mapped)
        assert scores["calibrated"]["mae"] == pytest.approx(float((mapped - true).abs().mean()))
        lo, hi = r["search_bounds"][name]
        assert (inferred >= lo - 1e-6).all() and (inferred <= hi + 1e-6).all()
        scan = r["landscape"][name]
        assert len(scan["grid"]) == LANDSCAPE_POINTS and len(scan["energy"]) == 4
        assert all(len(e) == LANDSCAPE_POINTS for e in scan["energy"])
        assert scan["true"] == r["pairs"]["true"][name][:4]
    assert set(r["landscape"]) == {"brightness", "contrast"}


def test_a_seed_fixes_the_result(run, data):
    budget = SearchBudget(iterations=2, population=6, elites=2)
    first = run_infer_action(run, n_images=5, seed=1, progress=False, budget=budget)
    again = run_infer_action(run, n_images=5, seed=1, progress=False, budget=budget)
    assert again["pairs"] == first["pairs"]
    other = run_infer_action(run, n_images=5, seed=2, progress=False, budget=budget)
    assert other["pairs"]["true"] != first["pairs"]["true"]
    # The calibration pairs draw from a stream of their own: the test pairs do not move.
    alone = run_infer_action(run, n_images=5, seed=1, progress=False, budget=budget,
                             calibration_images=0)
    assert alone["calibration"] is None and "calibrated" not in alone["pairs"]
    assert alone["pairs"]["true"] == first["pairs"]["true"]
    assert alone["pairs"]["inferred"] == first["pairs"]["inferred"]


def test_the_fitted_calibration_loads_from_the_run_and_reproduces_its_scores(run, data,
                                                                           tmp_path):
    with pytest.raises(FileNotFoundError, match="run `iwm eval infer-action RUN` first"):
        load_calibration(tmp_path)
    budget = SearchBudget(iterations=2, population=6, elites=2)
    r = run_infer_action(run, n_images=4, progress=False, budget=budget, calibration_images=4)
    cal = load_calibration(run)
    assert cal.to_dict() == r["calibration"]["maps"]
    assert load_calibration(run / "results" / "infer_action.json") == cal
    inferred = torch.tensor([r["pairs"]["inferred"][f] for f in ("brightness", "contrast")]).T
    padded = torch.cat([inferred, torch.ones(len(inferred), 1), torch.zeros(len(inferred), 1)],
                       1)
    mapped = cal.apply(padded)[:, :2].T
    calibrated = torch.tensor([r["pairs"]["calibrated"][f] for f in ("brightness", "contrast")])
    assert torch.allclose(mapped.float(), calibrated)
    run_infer_action(run, n_images=4, progress=False, budget=budget, calibration_images=0)
    with pytest.raises(ValueError, match="without --calibration-images 0"):
        load_calibration(run)


def test_a_negative_calibration_count_is_a_clear_error(run, data, capsys):
    assert main(["eval", "infer-action", str(run), "--calibration-images", "-1"]) != 0
    assert "--calibration-images -1" in capsys.readouterr().err
    with pytest.raises(ValueError, match="calibration_degree=3: use one of 1, 2"):
        run_infer_action(run, n_images=2, progress=False, calibration_degree=3)


def test_the_affine_maps_remain_available(run, data, capsys):
    assert main(["eval", "infer-action", str(run), "--images", "4", "--calibration-images",
                 "4", "--calibration-degree", "1"]) == 0
    assert "per-factor affine maps fitted on 4 training pairs" in capsys.readouterr().out
    r = json.loads((run / "results" / "infer_action.json").read_text())
    assert r["calibration"]["degree"] == 1
    assert all(len(m["coefficients"]) == 2 for m in r["calibration"]["maps"].values())


def test_the_report_shows_the_table_and_the_landscape(run, data, tmp_path):
    assert "no action inference yet" in report._infer_action_section(run.parent / "nope",
                                                                     tmp_path)
    run_infer_action(run, n_images=4, progress=False,
                     budget=SearchBudget(iterations=2, population=6, elites=2))
    html = report._infer_action_section(run, tmp_path)
    assert "<td>brightness</td>" in html and "<td>saturation</td>" not in html
    assert "<th colspan=2>calibrated</th>" in html
    fitted = json.loads((run / "results" / "infer_action.json").read_text())["calibration"]
    assert f"fitted on {fitted['n_images']} training pairs" in html
    assert "None" not in html  # a missing score is a dash
    assert (tmp_path / report.INFER_ACTION_PNG).stat().st_size > 0


def _image_pairs(folder: Path, brightness: float = 1.25) -> list[str]:
    """Two test images of the tiny run's data as PNG files, each before and after a
    brightness jitter: SOURCE TARGET SOURCE TARGET."""
    from PIL import Image

    from iwm.data.datasets import get_dataset

    files = []
    for i, image in enumerate(get_dataset("fashion-mnist", "test").images[:2]):
        for name, pixels in (("src", image.float() / 255),
                             ("tgt", TF.adjust_brightness(image.float() / 255, brightness))):
            path = folder / f"{name}{i}.png"
            Image.fromarray((pixels[0] * 255).round().byte().numpy()).save(path)
            files.append(str(path))
    return files


def test_infer_answers_a_users_pairs_through_the_runs_calibration(run, data, tmp_path,
                                                                   capsys):
    from dataclasses import asdict

    from iwm.api import Action, calibrated_actions

    files = _image_pairs(tmp_path)
    budget = SearchBudget(iterations=2, population=6, elites=2)
    run_infer_action(run, n_images=4, progress=False, budget=budget, calibration_images=4)
    out = tmp_path / "answers.json"
    assert main(["infer", str(run), *files, "--json", str(out)]) == 0
    text = capsys.readouterr().out
    r = json.loads(out.read_text())
    # Searched as the stored map was fitted (its budget, not the default one), then mapped.
    assert r["calibrated"] and r["budget"]["iterations"] == 2 and r["energy"] == "residual"
    assert r["factors"] == ["brightness", "contrast"] and len(r["pairs"]) == 2
    cal = load_calibration(run)
    pairs = list(zip(files[::2], files[1::2], strict=True))
    for pair, (source, target) in zip(r["pairs"], pairs, strict=True):
        assert (pair["source"], pair["target"]) == (source, target)
        expected = asdict(calibrated_actions([Action(**pair["raw"])], cal)[0])
        assert pair["calibrated"] == pytest.approx(expected)
        assert f"{source} -> {target}: brightness {expected['brightness']:.3f}" in text
    assert text.startswith("calibrated: per-factor quadratic maps fitted by `iwm eval "
                           "infer-action` on 4 training pairs")

    assert main(["infer", str(run), *files[:2], "--raw", "--json", str(out)]) == 0
    raw = json.loads(out.read_text())
    assert not raw["calibrated"] and "calibrated" not in raw["pairs"][0]
    assert raw["calibration"].startswith("raw: asked for")
    assert raw["budget"]["evaluations"] == SearchBudget().evaluations  # the default search

    # A map fitted at another checkpoint is not applied, and the output says why.
    stored = run / "results" / "infer_action.json"
    result = json.loads(stored.read_text())
    stored.write_text(json.dumps({**result, "step": result["step"] + 1}))
    assert main(["infer", str(run), *files[:2]]) == 0
    assert f"fitted at step {result['step'] + 1}" in capsys.readouterr().out

    assert main(["infer", str(run), *files[:3]]) == 2
    err = capsys.readouterr().err
    assert "3 image files: give them in pairs" in err and err.count("\n") == 1
