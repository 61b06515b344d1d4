import math

import pytest
import torch

from iwm.training.metrics import MetricsLogger, read_metrics


def test_rows_read_back_and_header_widens(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=False) as log:
        log.log(0, {"loss": 1.5, "lr": 2e-4})
        log.log(10, {"loss": torch.tensor(0.25), "lr": 3e-4})
        log.log(10, {"probe_acc": 0.5})  # a new metric mid-run widens the file
        log.log(20, {"loss": float("nan"), "lr": 1e-6})
    rows = read_metrics(tmp_path)
    assert (tmp_path / "metrics.csv").read_text().splitlines()[0] == "step,loss,lr,probe_acc"
    assert rows[:3] == [{"step": 0, "loss": 1.5, "lr": 2e-4},
                        {"step": 10, "loss": 0.25, "lr": 3e-4},
                        {"step": 10, "probe_acc": 0.5}]
    assert rows[3]["step"] == 20 and math.isnan(rows[3]["loss"]) and "probe_acc" not in rows[3]


def test_reopening_appends_and_keeps_history(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=False) as log:
        log.log(1, {"loss": 1.0})
    with MetricsLogger(tmp_path, tensorboard=False) as log:
        log.log(2, {"loss": 0.5})
        log.log(3, {"loss": 0.25, "ema": 0.99})
    assert read_metrics(tmp_path) == [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.5},
                                      {"step": 3, "loss": 0.25, "ema": 0.99}]


def test_resume_drops_rows_after_the_checkpoint(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=False) as log:
        for step in (10, 20, 30, 40):
            log.log(step, {"loss": float(step)})
    # Crashed after logging step 40; resumed from the checkpoint at step 20.
    with MetricsLogger(tmp_path, resume_step=20, tensorboard=False) as log:
        log.log(30, {"loss": -30.0})
    assert [(r["step"], r["loss"]) for r in read_metrics(tmp_path)] == [
        (10, 10.0), (20, 20.0), (30, -30.0)]


def test_partial_last_line_from_a_crash_is_dropped(tmp_path):
    (tmp_path / "metrics.csv").write_text("step,loss\n1,0.5\n2,0.12")  # "0.1234" cut off
    with MetricsLogger(tmp_path, tensorboard=False) as log:
        log.log(2, {"loss": 0.1234})
    assert read_metrics(tmp_path) == [{"step": 1, "loss": 0.5}, {"step": 2, "loss": 0.1234}]


def test_tensorboard_events_are_written(tmp_path):
    with MetricsLogger(tmp_path) as log:
        log.log(0, {"loss": 1.0})
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_disabled_logger_creates_nothing(tmp_path):
    run = tmp_path / "run"
    with MetricsLogger(run, enabled=False) as log:
        log.log(0, {"loss": 1.0})
    assert not run.exists()
    assert read_metrics(run) == []


def test_step_is_reserved(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=False) as log, pytest.raises(ValueError):
        log.log(0, {"step": 1.0})
