"""The grid runner on a 2-cell, few-step grid over the generated Fashion-MNIST: every task
writes its JSON, a second run skips them, a half-finished cell resumes, a changed grid is
refused, and parallel workers produce the same files."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import yaml

from conftest import write_fake_mnist
from iwm.errors import ConfigError
from iwm.study.grid import load_study, parse_study
from iwm.study.runner import Task, plan, run_study, task_json
from iwm.study.summary import summarise

GRID = {
    "seeds": [0, 1],
    "axes": {
        "conditioning": {"none": ["model.conditioning=none"],
                         "feature": ["model.conditioning=feature"]},
        "depth": {"shallow": ["model.predictor_depth=1"]},
        "strength": {"jitter": ["views.strength=jitter"]},
    },
    "blocks": {"all": {"conditioning": "all", "depth": "all", "strength": "all"}},
    "roles": {"equivariant": "feature-shallow-jitter"},
    "scales": {"tiny": {
        "preset": "iwm-equi-tiny",
        "overrides": ["train.batch_size=16", "train.epochs=0.25", "train.log_every=1",
                      "model.predictor_width=32", "model.predictor_heads=2"],
        "evaluate": {"mrr": {"images": 8, "bank": 4},
                     "probe": ["probe.train_limit=32", "probe.test_limit=16"],
                     "finetune": ["finetune.epochs=1", "finetune.train_limit=32",
                                  "finetune.test_limit=16", "finetune.batch_size=16"]}}},
}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fmnist")
    write_fake_mnist(folder)
    return folder


@pytest.fixture(scope="module")
def finished(tmp_path_factory, data):
    """The whole tiny grid, run once in this process."""
    out = tmp_path_factory.mktemp("study")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("IWM_DATA", str(data))
        failed = run_study(parse_study(GRID), "tiny", out, device="cpu", log=lambda m: None)
    assert failed == []
    return out


def test_every_task_writes_its_json(finished):
    study = parse_study(GRID)
    for seed in (0, 1):
        base = json.loads(task_json(finished, Task(None, seed)).read_text())
        assert 0 <= base["pixels"] <= 1 and 0 <= base["random_encoder"] <= 1
        for cell in study.cells("tiny"):
            row = json.loads(task_json(finished, Task(cell, seed)).read_text())
            assert row["cell"] == cell.name and row["seed"] == seed
            assert row["steps"] == 1  # 0.25 epoch of 64 images at batch 16
            assert row["fingerprint"] == cell.fingerprint()
            assert row["mrr_chance"] == pytest.approx((1 + 1 / 2 + 1 / 3 + 1 / 4) / 4)
            for key in ("mrr", "linear", "finetune_predictor", "finetune_random_predictor"):
                assert 0 <= row[key] <= 1
            # The numbers are the evaluations' own result files.
            results = finished / "runs" / f"{cell.name}-s{seed}" / "results"
            assert row["mrr"] == json.loads((results / "mrr.json").read_text())["mrr"]
            assert row["linear"] == json.loads(
                (results / "probe_linear.json").read_text())["accuracy"]


def test_seeds_differ(finished):
    rows = [json.loads(task_json(finished, Task(parse_study(GRID).cells("tiny")[1], s))
                       .read_text()) for s in (0, 1)]
    assert rows[0]["finetune_random_predictor"] != rows[1]["finetune_random_predictor"] or \
        rows[0]["mrr"] != rows[1]["mrr"]


def test_table_has_one_row_per_cell_from_the_jsons(finished):
    study = parse_study(GRID)
    summary = json.loads(summarise(study, "tiny", finished)["json"].read_text())
    assert [r["cell"] for r in summary["rows"]] == ["none-shallow-jitter",
                                                    "feature-shallow-jitter"]
    for row, cell in zip(summary["rows"], study.cells("tiny"), strict=True):
        values = [json.loads(task_json(finished, Task(cell, s)).read_text())["mrr"]
                  for s in (0, 1)]
        assert row["mrr_mean"] == pytest.approx(np.mean(values))
        assert row["mrr_std"] == pytest.approx(np.std(values, ddof=1))


def test_a_second_run_skips_finished_tasks(finished, data, monkeypatch):
    monkeypatch.setenv("IWM_DATA", str(data))
    pending, done = plan(parse_study(GRID), "tiny", finished)
    assert pending == [] and len(done) == 6
    before = {p: p.stat().st_mtime_ns for p in (finished / "cells").glob("*.json")}
    assert run_study(parse_study(GRID), "tiny", finished, device="cpu",
                     log=lambda m: None) == []
    assert {p: p.stat().st_mtime_ns for p in (finished / "cells").glob("*.json")} == before


def test_a_half_finished_cell_resumes_without_redoing_work(finished, data, monkeypatch,
                                                           tmp_path):
    monkeypatch.setenv("IWM_DATA", str(data))
    out = tmp_path / "copy"
    shutil.copytree(finished, out)
    cell = parse_study(GRID).cells("tiny")[1]
    # Interrupted after pretraining and MRR: the cell's JSON and later results are missing.
    task_json(out, Task(cell, 0)).unlink()
    results = out / "runs" / f"{cell.name}-s0" / "results"
    (results / "probe_linear.json").unlink()
    mrr_written = (results / "mrr.json").stat().st_mtime_ns
    pending, _ = plan(parse_study(GRID), "tiny", out)
    assert [t.name for t in pending] == [f"{cell.name}-s0"]
    assert run_study(parse_study(GRID), "tiny", out, device="cpu", log=lambda m: None) == []
    assert (results / "mrr.json").stat().st_mtime_ns == mrr_written  # reused, not redone
    assert (results / "probe_linear.json").is_file()
    row = json.loads(task_json(out, Task(cell, 0)).read_text())
    assert row["steps"] == 1  # resumed from the final checkpoint, no extra steps


def test_an_edited_grid_does_not_reuse_stale_cells(finished, data, monkeypatch):
    monkeypatch.setenv("IWM_DATA", str(data))
    grid = json.loads(json.dumps(GRID))
    grid["scales"]["tiny"]["overrides"].append("optim.lr=0.01")
    with pytest.raises(ConfigError, match="other overrides than the grid's"):
        plan(parse_study(grid), "tiny", finished)


def test_parallel_workers_run_each_task_in_a_process(tmp_path, data, monkeypatch):
    monkeypatch.setenv("IWM_DATA", str(data))
    grid = json.loads(json.dumps(GRID))
    grid["seeds"] = [0]
    grid["scales"]["tiny"]["workers"] = 2
    grid["scales"]["tiny"]["threads"] = 1
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid))
    out = tmp_path / "out"
    messages: list[str] = []
    failed = run_study(load_study(path), "tiny", out, device="cpu", log=messages.append)
    assert failed == [], messages
    assert len(list((out / "cells").glob("*.json"))) == 3
    assert len(list((out / "logs").glob("*.log"))) == 3


def test_a_failing_cell_is_reported_and_the_rest_still_run(tmp_path, data, monkeypatch):
    monkeypatch.setenv("IWM_DATA", str(data))
    grid = json.loads(json.dumps(GRID))
    grid["seeds"] = [0]
    # The MRR evaluation of this scale asks for more bank entries than are valid.
    grid["scales"]["tiny"]["evaluate"]["mrr"]["bank"] = 0
    messages: list[str] = []
    failed = run_study(parse_study(grid), "tiny", tmp_path, device="cpu", log=messages.append)
    assert failed == ["none-shallow-jitter-s0", "feature-shallow-jitter-s0"]
    assert task_json(tmp_path, Task(None, 0)).is_file()  # the baselines still ran
    assert any("FAILED none-shallow-jitter-s0" in m for m in messages)
