"""benchmarks/backbone_signal.py: the image-dependence measure on known tensors, and a
trace on a tiny run that trains what it says."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from scripts import load_script  # tests/benchmarks/scripts.py

from tiny_run import make_tiny_run

script = load_script("backbone_signal")


def test_image_dependence_is_zero_for_a_constant_and_the_ratio_otherwise():
    level = torch.randn(1, 5, 8)
    assert script.image_dependence(level.expand(4, -1, -1)) == 0.0
    # Two images at level +- delta: std over images sqrt(2) * delta, mean |level| = 1.
    delta = 0.1
    out = torch.stack([torch.ones(5, 8) * (1 + delta), torch.ones(5, 8) * (1 - delta)])
    assert script.image_dependence(out) == pytest.approx(2 ** 0.5 * delta, rel=1e-5)


def test_trace_trains_the_backbone_unless_head_only(tmp_path: Path, monkeypatch) -> None:
    run = make_tiny_run(tmp_path)
    monkeypatch.setenv("IWM_DATA", str(tmp_path / "fmnist"))
    rows = script.main([str(run), "--steps", "2", "--every", "1", "--batch", "8",
                        "--json", str(tmp_path / "rows.json")])
    assert [(r["protocol"], r["step"]) for r in rows] == [
        ("random-predictor", 0), ("random-predictor", 1), ("random-predictor", 2),
        ("predictor", 0), ("predictor", 1), ("predictor", 2)]
    assert rows[0]["loss"] is None and all(r["loss"] > 0 for r in rows if r["step"])
    assert (tmp_path / "rows.json").exists()
    assert rows[0]["dependence"] != rows[2]["dependence"]  # the trained predictor moved
    # --head-only: the backbone does not move, so its output's dependence does not either.
    frozen = script.main([str(run), "--protocols", "random-predictor", "--head-only",
                          "--steps", "2", "--every", "2", "--batch", "8",
                          "finetune.lr=3e-4"])  # overrides may follow the options
    assert frozen[0]["dependence"] == frozen[-1]["dependence"]
    with pytest.raises(SystemExit):
        script.main([str(run), "--batch", "1"])
