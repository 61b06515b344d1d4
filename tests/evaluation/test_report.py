"""``iwm report``: the HTML page, its figures and the retrieval grid behind it."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from iwm.cli.main import main
from iwm.config import load_config
from iwm.data.actions import JitterParams
from iwm.data.masks import MultiBlockMaskSampler
from iwm.data.views import ViewSampler, resolve_view_params
from iwm.errors import DataError, IWMError
from iwm.evaluation import report
from iwm.evaluation.mrr import evaluate_mrr
from iwm.evaluation.report import build_report
from iwm.evaluation.retrieval import jitter_description, retrieval_examples
from iwm.models.iwm import build_model
from iwm.models.tokens import gather_tokens
from tiny_run import copy_without_outputs, make_tiny_run

SECTIONS = ("Training curves", "World-model quality (MRR)", "Probes and finetuning",
            "The world model at work: retrieval", "Config")


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return make_tiny_run(tmp_path_factory.mktemp("report"))


@pytest.fixture
def fresh_run(run, tmp_path, monkeypatch) -> Path:
    """A copy of the tiny run, so each test adds its own results."""
    monkeypatch.setenv("IWM_DATA", str(run.parent / "fmnist"))
    return copy_without_outputs(run, tmp_path)


def _build(run_dir: Path, out: Path | None = None) -> Path:
    # A small retrieval grid: the page's structure is what these tests check.
    return build_report(run_dir, out, n_images=2, bank_size=4, top_k=3, device="cpu")


def _referenced(page: Path) -> list[str]:
    return re.findall(r'(?:src|href)="([^"]+)"', page.read_text())


def _check_links(page: Path) -> list[str]:
    refs = _referenced(page)
    for ref in refs:
        assert not re.match(r"[a-z]+:", ref) and not ref.startswith("/"), ref  # relative only
        assert (page.parent / ref).is_file(), ref
    return refs


def test_report_of_a_bare_run(fresh_run):
    page = _build(fresh_run)
    assert page == fresh_run / "report" / "index.html"
    text = page.read_text()
    for heading in SECTIONS:
        assert f"<h2>{heading}</h2>" in text
    assert "not computed yet" in text and f"iwm eval mrr {fresh_run}" in text
    assert "no probe or finetuning results yet" in text
    assert "fashion-mnist" in text and "predictor_depth: 2" in text  # header and config
    assert set(_check_links(page)) == {"curves.png", "retrieval.png"}


def test_report_with_results(fresh_run):
    results = fresh_run / "results"
    results.mkdir()
    mrr = {"mrr": 0.4321, "stderr": 0.0123, "bank": 8, "n_images": 4, "distance": "cosine",
           "per_transform": {"brightness": 0.6543, "saturation": None},
           "per_transform_stderr": {"brightness": 0.0456, "saturation": None},
           "notes": {"saturation": "no-op on 1-channel images"}, "seed": 0}
    (results / "mrr.json").write_text(json.dumps(mrr))
    (results / "probe_linear.json").write_text(json.dumps(
        {"accuracy": 0.8125, "train_accuracy": 0.9375, "n_train": 64, "n_test": 16,
         "encoder": "target", "unexpected": "kept"}))
    (results / "finetune_frozen_pretrained.json").write_text(json.dumps(
        {"protocol": "frozen_pretrained", "accuracy": 0.7777, "trainable_params": 12345,
         "seconds": 3.5, "lr": {"head": 0.001}}))
    (results / "segment_end_to_end.json").write_text(json.dumps({"miou": 0.2468}))
    (results / "finetune_multitask.json").write_text(json.dumps(
        {"protocol": "frozen_pretrained", "mean_accuracy": 0.55,
         "tasks": {"mnist": {"accuracy": 0.6}, "fashion-mnist": {"accuracy": 0.5}}}))
    (results / "probe_broken.json").write_text("{not json")
    (results / "demo_summary.json").write_text(json.dumps({"accuracy": 0.1111}))
    # The demo's baseline and the API check (iwm eval api-check) are rows of the table too.
    (results / "probe_linear_raw_pixels.json").write_text(json.dumps(
        {"accuracy": 0.7131, "n_train": 64, "n_test": 16, "encoder": "raw pixels (baseline)"}))
    (results / "api_check.json").write_text(json.dumps(
        {"mrr": 0.8765, "bank": 64, "n_images": 256, "chance": 0.0741,
         "per_factor": {"brightness": 0.9012, "contrast": 0.6789, "saturation": None},
         "notes": {"saturation": "no-op on 1-channel images"}, "seed": 0}))

    page = _build(fresh_run)
    text = page.read_text()
    for number in ("0.4321", "0.6543", "0.8125", "0.9375", "0.7777", "12345", "0.2468",
                   "0.5500", "mnist 0.6000", "unexpected=kept"):
        assert number in text, number
    assert "no-op on 1-channel images" in text
    # Each MRR beside its standard error, and chance (H_8 / 8) with its own for 4 images.
    assert "<td>all</td><td class=num>0.4321</td><td class=num>0.0123</td>" in text
    assert "<td>brightness</td><td class=num>0.6543</td><td class=num>0.0456</td>" in text
    assert "<td>saturation</td><td class=num>None</td><td class=num>–</td>" in text
    assert re.search(r"chance is 0\.340 ± 0\.1\d\d", text)
    assert "probe_broken" in text and "unreadable" in text
    assert re.search(r"<td>probe_linear_raw_pixels</td><td>accuracy</td><td class=num>0.7131"
                     r"</td>.*?raw pixels \(baseline\)", text)
    assert re.search(r"<td>api_check</td><td>mrr</td><td class=num>0.8765</td>.*?"
                     r"per_factor: brightness 0.9012, contrast 0.6789;[^<]*chance=0.0741", text)
    assert "0.1111" not in text  # only probe/finetune/segment results are tabulated
    assert "not computed yet" not in text
    assert set(_check_links(page)) == {"curves.png", "mrr.png", "retrieval.png"}

    # Rebuilt without mrr.json: its figure goes with it.
    (results / "mrr.json").unlink()
    page = _build(fresh_run)
    assert not (page.parent / "mrr.png").exists()
    assert "mrr.png" not in _check_links(page)


def test_report_without_checkpoint_or_metrics(fresh_run, tmp_path):
    shutil.rmtree(fresh_run / "checkpoints")
    page = _build(fresh_run, tmp_path / "out")
    text = page.read_text()
    assert "needs a checkpoint" in text and "predictor_depth: 2" in text
    assert _check_links(page) == ["curves.png"]

    started = tmp_path / "started"  # a run that has written its config, nothing else
    started.mkdir()
    shutil.copy(fresh_run / "config.yaml", started / "config.yaml")
    page = _build(started)
    assert "no metrics yet" in page.read_text() and _check_links(page) == []


def test_report_refuses_a_folder_that_is_not_a_run(tmp_path):
    data = tmp_path / "photos"  # e.g. the image folder the run trained on
    (data / "cat").mkdir(parents=True)
    (data / "cat" / "a.png").write_bytes(b"")
    with pytest.raises(IWMError, match="is not a run directory .*iwm pretrain wrote") as info:
        _build(data)
    assert "\n" not in str(info.value)
    assert sorted(p.relative_to(data).as_posix() for p in data.rglob("*")) == ["cat",
                                                                               "cat/a.png"]


def test_a_failing_section_leaves_a_note_and_the_rest_of_the_page(fresh_run, monkeypatch):
    def gone(*args, **kwargs):
        raise DataError("imagefolder:/data/photos: /data/photos is not a folder")

    monkeypatch.setattr(report, "compute_retrieval", gone)
    with pytest.warns(UserWarning, match="^report: 'The world model at work: retrieval' left "
                                         "out: imagefolder:/data/photos: .* is not a folder$"):
        page = _build(fresh_run)
    text = page.read_text()
    assert "could not be made: imagefolder:/data/photos: /data/photos is not a folder" in text
    for heading in SECTIONS:
        assert f"<h2>{heading}</h2>" in text
    assert _check_links(page) == ["curves.png"]  # the curves, whatever else failed


def test_cli_report(fresh_run, capsys):
    assert main(["report", str(fresh_run), "--bank", "4", "--images", "2"]) == 0
    assert str(fresh_run / "report" / "index.html") in capsys.readouterr().out
    assert main(["report", str(fresh_run / "nope")]) == 2
    assert "no such run directory" in capsys.readouterr().err
    assert main(["report", str(fresh_run / "checkpoints")]) == 2  # a folder, not a run
    err = capsys.readouterr().err
    assert "is not a run directory" in err and err.count("\n") == 1
    assert not (fresh_run / "checkpoints" / "report").exists()
    assert main(["report", str(fresh_run), "--bank", "1"]) == 2


# ---------------------------------------------------------------- retrieval grid

SIZE = 16


def _setup(channels: int = 3):
    torch.manual_seed(0)
    cfg = load_config("iwm-inv-tiny", [f"data.image_size={SIZE}", "model.predictor_depth=1",
                                       "model.predictor_width=64", "views.strength=strong"])
    model = build_model(cfg, in_chans=channels)
    views = ViewSampler(resolve_view_params(cfg.views), channels, SIZE)
    masks = MultiBlockMaskSampler(model.encoder.grid, cfg.mask)
    images = torch.rand(3, channels, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    return model, views, masks, images


class Oracle(nn.Module):
    """Predicts the target latent of the image really rendered with the action's target
    jitter (the source jitter is the identity in this protocol): a perfect world model."""

    def __init__(self, model, images: Tensor, views: ViewSampler) -> None:
        super().__init__()
        self.images, self.views = images, views
        self.encode = lambda x: model.target_tokens(x)  # not a submodule: no recursion

    def forward(self, context, context_idx, target_idx, *, action, context_valid=None,
                target_valid=None):
        target = JitterParams(brightness=action[:, 0].exp(), contrast=action[:, 1].exp(),
                              saturation=action[:, 2].exp(), hue=action[:, 3] / 2,
                              applied=torch.ones(action.shape[0], dtype=torch.bool))
        return gather_tokens(self.encode(self.views.apply_jitter(self.images, target)),
                             target_idx)


def test_oracle_predictor_puts_the_true_entry_first():
    model, views, masks, images = _setup()
    model.predictor = Oracle(model, images, views)
    examples = retrieval_examples(model, views, images, masks, bank_size=12, top_k=4)
    assert len(examples) == len(images)
    for ex in examples:
        assert ex.rank == 1 and ex.top[0] == ex.true_index
        assert len(ex.top) == len(set(ex.top)) == 4
        assert ex.top_scores == sorted(ex.top_scores, reverse=True)
        assert ex.top_images.shape == (4, 3, SIZE, SIZE)
        torch.testing.assert_close(ex.top_images[0], ex.target)
        assert ex.target_block.numel() > 0 and ex.context.numel() > 0
        assert not set(ex.target_block.tolist()) & set(ex.context.tolist())


def test_grid_uses_the_mrr_protocol_and_draws():
    # Same seed, same images: the grid's ranks are exactly those behind MRR's main setting.
    model, views, masks, images = _setup()
    examples = retrieval_examples(model, views, images, masks, bank_size=8, top_k=8,
                                  generator=torch.Generator().manual_seed(3))
    result = evaluate_mrr(model, views, images, masks, bank_size=8, per_transform=False,
                          generator=torch.Generator().manual_seed(3))
    mrr = sum(1 / ex.rank for ex in examples) / len(examples)
    assert mrr == pytest.approx(result.mrr, abs=1e-6)
    for ex in examples:
        # The whole bank, nearest first, with the true entry exactly at its rank.
        assert sorted(ex.top) == list(range(8)) and ex.top[ex.rank - 1] == ex.true_index


def test_tied_entries_go_before_the_true_one():
    model, views, masks, images = _setup()
    # A zero prediction is equidistant from every entry: the true one ranks last.
    model.predictor.forward = lambda c, ci, ti, **kw: torch.zeros(
        ti.shape[0], ti.shape[1], model.encoder.embed_dim)
    examples = retrieval_examples(model, views, images, masks, bank_size=6, top_k=6)
    for ex in examples:
        assert ex.rank == 6 and ex.top[-1] == ex.true_index


def test_jitter_description():
    params = {"brightness": 1.234, "contrast": 0.8, "saturation": 1.0, "hue": -0.05}
    assert jitter_description(params) == ("brightness x1.23, contrast x0.80, "
                                          "saturation x1.00, hue -0.05")
    assert jitter_description(params, ("brightness",)) == "brightness x1.23"


def test_curves_draw_the_monitors(tmp_path):
    # The training rows every step, the monitors every other: each series is drawn.
    rows = [{"step": s, "loss": 1 / s, "pred_std": 0.2, "target_std": 0.3, "lr": 1e-3,
             "grad_norm": 1.0} for s in range(1, 7)]
    for row in rows[1::2]:
        row.update(rankme=4.0 + row["step"], knn_acc=0.5)
    plotted = report.plot_curves(rows, tmp_path / "curves.png")
    assert {"rankme", "knn_acc", "loss", "target_std"} <= set(plotted)
    assert (tmp_path / "curves.png").stat().st_size > 0
