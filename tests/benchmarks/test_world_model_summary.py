"""The world-model study's summary: per-run rows and mean +- std over the runs."""

from __future__ import annotations

import json
from pathlib import Path

from scripts import load_script  # tests/benchmarks/scripts.py


def _write(run: Path, psnr: float, slope: float, raw: float, calibrated: float) -> None:
    (run / "eval").mkdir(parents=True)
    fit = {"slope": slope, "r2": 0.5}
    ceiling = {"slope": 0.9, "r2": 0.97}
    (run / "eval" / "decoder.json").write_text(json.dumps({
        "psnr": psnr, "ssim": 0.8,
        "factors": {"brightness": {"predicted": fit, "real_decoded": ceiling}}}))
    scores = {"model": {"r2": raw}, "calibrated": {"r2": calibrated}, "pixels": {"r2": 0.9}}
    (run / "eval" / "infer_action_residual.json").write_text(json.dumps({
        "per_factor": {"brightness": scores, "hue": None}, "ms_per_image": 500.0}))


def test_summary_averages_the_runs_and_marks_missing_ones(tmp_path: Path, capsys) -> None:
    _write(tmp_path / "s0", psnr=20.0, slope=0.8, raw=0.6, calibrated=0.8)
    _write(tmp_path / "s1", psnr=22.0, slope=1.0, raw=0.8, calibrated=0.9)
    (tmp_path / "s2").mkdir()  # not evaluated yet
    load_script("world_model_summary").main([str(tmp_path / s) for s in ("s0", "s1", "s2")])
    out = capsys.readouterr().out
    assert "| s0 | 20.000 | 0.800 | 0.800 / 0.500 (0.900 / 0.970) |" in out
    assert "| s2 | – | – | – / – (– / –) |" in out
    # Mean +- sample std of the two evaluated runs only.
    assert ("| mean ± std | 21.000 ± 1.414 | 0.800 ± 0.000 | 0.900 ± 0.141 / 0.500 ± 0.000 "
            "(0.900 ± 0.000 / 0.970 ± 0.000) |") in out
    assert "| s1 | 0.800 / 0.900 (0.900) | 500 |" in out
    assert "0.700 ± 0.141 / 0.850 ± 0.071 (0.900 ± 0.000)" in out
    assert "hue" not in out  # a factor the runs do not score (1-channel) gets no column
