"""benchmarks/matmul_rate.py: the FLOP arithmetic and its argument checks."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from types import ModuleType

import pytest
from scripts import load_script  # tests/benchmarks/scripts.py


@pytest.fixture(scope="module")
def script() -> ModuleType:
    return load_script("matmul_rate")


def test_rate_is_two_flops_per_multiply_add_over_the_best_time(
        script: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    # A clock whose readings are 0, 1, 1, 3, 3, 6, ...: the k-th multiply takes k seconds,
    # so the best timed one (the warm-up call is not counted) takes 2 s.
    ticks = itertools.accumulate(itertools.chain.from_iterable((k, 0) for k in range(1, 99)),
                                 initial=0)
    monkeypatch.setattr(script, "perf_counter", lambda: next(ticks))
    result = script.main(["--device", "cpu", "--dtype", "fp32", "--size", "64",
                          "--repeats", "3"])
    assert result["tflops"] == pytest.approx(2 * 64**3 / 2 / 1e12)


def test_real_rate_on_cpu_is_positive_and_written(script: ModuleType, tmp_path: Path) -> None:
    out = tmp_path / "rate" / "matmul.json"
    result = script.main(["--device", "cpu", "--dtype", "bf16", "--size", "128",
                          "--repeats", "2", "--json", str(out)])
    assert result["tflops"] > 0 and result["dtype"] == "bf16"
    assert json.loads(out.read_text()) == result


def test_bad_arguments_are_usage_errors(script: ModuleType,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        script.main(["--device", "cpu", "--size", "0"])
    assert "--size and --repeats must be at least 1" in capsys.readouterr().err
