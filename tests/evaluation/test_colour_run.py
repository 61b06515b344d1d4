"""A run on the colour Shapes set end to end: every field of the action is scored, by MRR
and through the public API, and the report's retrieval grid is in colour."""

from __future__ import annotations

from pathlib import Path

import pytest

from iwm.config import load_config
from iwm.data import shapes
from iwm.data.actions import ACTION_FIELDS
from iwm.evaluation.api_check import run_api_check
from iwm.evaluation.mrr import run_mrr
from iwm.evaluation.report import build_report, compute_retrieval

TINY = ["train.batch_size=16", "train.epochs=0.125", "train.progress=false",
        "model.predictor_depth=1", "model.predictor_width=64", "model.predictor_heads=2"]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    from iwm.training.loop import pretrain

    folder = tmp_path_factory.mktemp("colour")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(shapes, "SHAPES_SPLITS", {"train": 128, "test": 32})
        mp.setenv("IWM_DATA", str(folder / "data"))
        yield pretrain(load_config("iwm-equi-shapes", TINY), folder / "run")


@pytest.fixture
def data(run, monkeypatch):
    monkeypatch.setattr(shapes, "SHAPES_SPLITS", {"train": 128, "test": 32})
    monkeypatch.setenv("IWM_DATA", str(run.parent / "data"))


def test_mrr_scores_every_field_of_the_action(run, data):
    result = run_mrr(run, n_images=8, bank_size=4, device="cpu", batch_size=8)
    per = result["per_transform"]
    for field in ACTION_FIELDS:
        name = "blur" if field == "blur_sigma" else field
        assert per[name] is not None, (name, result.get("notes"))
        assert 0.25 <= per[name] <= 1.0  # a mean reciprocal rank with a bank of 4


def test_api_check_scores_the_colour_factors(run, data):
    result = run_api_check(run, n_images=8, k=4, device="cpu", batch_size=8)
    per = result["per_factor"]
    for factor in ("brightness", "contrast", "saturation", "hue"):
        assert per[factor] is not None and 0.25 <= per[factor] <= 1.0


def test_report_retrieval_grid_is_in_colour(run, data):
    import iwm

    examples, info = compute_retrieval(iwm.load(run), n_images=2, bank_size=4, top_k=2,
                                       seed=0)
    # Every jitter factor is listed under the images, hue and saturation included...
    assert set(info.varied) == {"brightness", "contrast", "saturation", "hue"}
    # ...and the images drawn are RGB with colour in them (channels differ).
    for ex in examples:
        for img in (ex.image, ex.target, *ex.top_images):
            assert img.shape[0] == 3 and (img.amax(0) - img.amin(0)).max() > 0.1
    # A second grid whose banks vary colour alone.
    examples, info = compute_retrieval(iwm.load(run), n_images=2, bank_size=4, top_k=2,
                                       seed=0, colour_only=True)
    assert info.varied == ("saturation", "hue")
    for ex in examples:
        p = ex.true_params
        assert p["brightness"] == p["contrast"] == 1.0
        assert p["saturation"] != 1.0 and p["hue"] != 0.0
    page = build_report(run, n_images=2, bank_size=4, top_k=2, device="cpu")
    for png in ("retrieval.png", "retrieval_colour.png"):
        assert f'src="{png}"' in page.read_text()
        assert (page.parent / png).stat().st_size > 1000
