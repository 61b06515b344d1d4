"""Smoke test of the decoding benchmark: both paths run and report a rate (no timing
assertions: shared machines say nothing about the code)."""

from __future__ import annotations

from scripts import load_script  # tests/benchmarks/scripts.py


def test_reports_every_path():
    results = load_script("decode_throughput").main(["--images", "3", "--size", "64x48",
                                                     "--repeats", "1"])
    assert set(results) == {"load_image (torchvision.io)", "Pillow", "load_image + crop 224",
                            "Pillow + crop 224"}
    assert all(v > 0 for v in results.values())
