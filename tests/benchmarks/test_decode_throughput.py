"""Smoke test of the decoding benchmark: both paths run and report a rate (no timing
assertions: shared machines say nothing about the code)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "decode_throughput.py"


def test_reports_every_path():
    spec = importlib.util.spec_from_file_location("decode_throughput", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    results = module.main(["--images", "3", "--size", "64x48", "--repeats", "1"])
    assert set(results) == {"load_image (torchvision.io)", "Pillow", "load_image + crop 224",
                            "Pillow + crop 224"}
    assert all(v > 0 for v in results.values())
