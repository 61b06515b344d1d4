"""Smoke test of the shard benchmark: both sources run an epoch and report a rate (no
timing assertions: shared machines say nothing about the code)."""

from __future__ import annotations

from scripts import load_script  # tests/benchmarks/scripts.py


def test_reports_both_sources():
    results = load_script("shards_throughput").main([
        "--images", "40", "--size", "32x24", "--classes", "2", "--shard-size", "7",
        "--workers", "0", "--batch", "8", "--crop", "16"])
    assert set(results) == {"image folder", "tar shards"}
    assert all(v > 0 for v in results.values())
