"""Smoke tests of the world-model benchmarks on the generated Fashion-MNIST: they train,
score with the real MRR and probe, and write what their docstrings promise."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from scripts import load_script  # tests/benchmarks/scripts.py

TINY = ["train.batch_size=16", "train.epochs=0.5", "model.predictor_depth=1",
        "train.checkpoint_every=1"]


@pytest.fixture(autouse=True)
def fake_fashion_mnist(fake_mnist_dir, monkeypatch):
    monkeypatch.setenv("IWM_DATA", str(fake_mnist_dir))


def test_ablation_runs_each_variant_and_seed_once(tmp_path: Path) -> None:
    script = load_script("wm_ablation")
    argv = ["--out", str(tmp_path), "--seeds", "0", "1", "--bank", "4", "--images", "4",
            "--common", *TINY, "--variant", "base=",
            "--variant", "feature=model.conditioning=feature"]
    script.main(argv)
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert sorted((r["variant"], r["seed"]) for r in rows) == [
        ("base", 0), ("base", 1), ("feature", 0), ("feature", 1)]
    assert all(0 < r["mrr"] <= 1 and r["steps"] == 2 for r in rows)
    assert rows[0]["overrides"] == [] and rows[1]["overrides"] == ["model.conditioning=feature"]
    table = (tmp_path / "table.md").read_text()
    assert "| base | – | 0,1 |" in table and "model.conditioning=feature" in table
    script.main(argv)  # finished pairs are skipped, not appended again
    assert len((tmp_path / "results.jsonl").read_text().splitlines()) == 4
    assert script.parse_variant("ema=optim.ema=[0.99,1.0],train.epochs=1") == (
        "ema", ["optim.ema=[0.99,1.0]", "train.epochs=1"])
    with pytest.raises(SystemExit, match="NAME=OVERRIDE"):
        script.parse_variant("no-equals-sign")


def test_curves_score_every_checkpoint(tmp_path: Path) -> None:
    script = load_script("wm_curves")
    out = tmp_path / "run"
    script.main(["--config", "iwm-equi-tiny", "--out", str(out), "--bank", "4",
                 "--images", "4", *TINY])
    rows = json.loads((out / "curves.json").read_text())
    assert [r["step"] for r in rows] == [1, 2]  # every checkpoint kept and scored
    assert all(0 < r["mrr"] <= 1 and 0 <= r["linear"] <= 1 for r in rows)
    assert (out / "curves.png").stat().st_size > 0
