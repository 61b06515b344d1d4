"""benchmarks/finetune_seeds.py: seeds paired by value, the claims' paired t-tests, targets
and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from scipy import stats
from scripts import load_script  # tests/benchmarks/scripts.py

CELL = "e5-lr1e-3"


def write(out: Path, protocol: str, seed: int, acc: float, probe: float = 0.80,
          pixels: float = 0.84, seconds: float = 100.0) -> None:
    cell = out / "cells" / CELL
    cell.mkdir(parents=True, exist_ok=True)
    result = {"protocol": protocol, "accuracy": acc, "finetune_config": {"seed": seed},
              "trainable_params": 1000, "flops_per_image": 2e9, "train_seconds": seconds,
              "baselines": {"linear_probe": {"accuracy": probe},
                            "raw_pixels": {"accuracy": pixels}}}
    (cell / f"finetune_{protocol}.json").write_text(json.dumps(result))


def test_claims_pair_seeds_by_value_and_use_the_paired_test(tmp_path: Path) -> None:
    script = load_script("finetune_seeds")
    encoder = {0: 0.885, 1: 0.884, 2: 0.889}
    scratch = {0: 0.873, 1: 0.877, 2: 0.874}
    probe = {0: 0.80, 1: 0.81, 2: 0.79}
    for seed in (0, 1, 2):
        out = tmp_path / f"ft-s{seed}"
        write(out, "encoder", seed, encoder[seed], probe=probe[seed], seconds=100 + seed)
        write(out, "scratch", seed, scratch[seed], probe=probe[seed])
        if seed != 1:  # a protocol missing on one seed is compared on the others
            write(out, "predictor", seed, 0.88 - seed / 100, probe=probe[seed])
    # Given out of order: seeds come from the results, not the argument order.
    outs = [str(tmp_path / f"ft-s{s}") for s in (2, 0, 1)]
    text = script.main([*outs, "--cell", CELL, "--target", "encoder=0.885",
                        "--out", str(tmp_path / "summary.md")])
    assert (tmp_path / "summary.md").read_text() == text
    rows = {line.split(" | ")[0].lstrip("| "): line for line in text.splitlines()}
    assert rows["encoder"].startswith("| encoder | 88.50 | 88.40 | 88.90 | 88.60 ± 0.26 |")
    assert "| 101 |" in rows["encoder"]  # the seeds' mean training time
    assert "| – | – | – |" in rows["linear_probe"]
    p = stats.ttest_rel(list(encoder.values()), list(scratch.values())).pvalue
    claim = rows["encoder finetuning > from scratch"]
    assert f"| +1.13 | paired t, n=3 | {p:.3f} |" in claim
    assert claim.endswith("holds |") == (p < 0.05)
    assert "paired t, n=2" in rows["frozen encoder + pretrained predictor > linear probe"]
    # No random-predictor result: that claim is left out, not reported as a test.
    assert "pretrained predictor > random predictor" not in text
    assert rows["encoder ≥ 88.50"] == "| encoder ≥ 88.50 | 2 of 3 | 88.40 |"


def test_vs_tests_finding_3_in_both_directions(tmp_path: Path) -> None:
    script = load_script("finetune_seeds")
    for seed in (0, 1, 2):
        write(tmp_path / f"equi-s{seed}", "predictor", seed, 0.88 + seed / 1000, probe=0.80)
        write(tmp_path / f"inv-s{seed}", "predictor", seed, 0.86 - seed / 1000,
              probe=0.82 + seed / 1000)
        # A scratch result copied from the Equi cell carries the Equi encoder's probe.
        write(tmp_path / f"inv-s{seed}", "scratch", seed, 0.87, probe=0.80)
    text = script.main([str(tmp_path / f"equi-s{s}") for s in range(3)] + ["--vs"]
                       + [str(tmp_path / f"inv-s{s}") for s in range(3)])
    rows = {line.split(" | ")[0].lstrip("| "): line for line in text.splitlines()}
    assert rows["Equi > Inv, predictor finetuning"].endswith("| holds |")
    # Inv's probe is above Equi's on every seed: that claim holds too.
    assert "| +2.10 |" in rows["Inv > Equi, linear probe"]
    assert rows["Inv > Equi, linear probe"].endswith("| holds |")
    assert rows["Inv predictor"].startswith("| Inv predictor | 86.00 | 85.90 | 85.80 |")


def test_bad_input_names_the_fix(tmp_path: Path) -> None:
    script = load_script("finetune_seeds")
    with pytest.raises(SystemExit, match="no cells/e5-lr1e-3/finetune_.*finetune_recipe.sh"):
        script.main([str(tmp_path)])
    write(tmp_path / "a", "encoder", 0, 0.9)
    write(tmp_path / "b", "encoder", 0, 0.9)
    with pytest.raises(SystemExit, match="second encoder result for seed 0"):
        script.main([str(tmp_path / "a"), str(tmp_path / "b")])
    with pytest.raises(SystemExit, match="PROTOCOL=ACCURACY"):
        script.parse_target("encoder")
    with pytest.raises(SystemExit, match="PROTOCOL=ACCURACY"):
        script.parse_target("decoder=0.9")
    with pytest.raises(SystemExit, match="not a number"):
        script.parse_target("encoder=high")
