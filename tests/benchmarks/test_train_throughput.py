"""Smoke test of the throughput benchmark: it runs on CPU and reports sane numbers.

No timing assertions: CI machines are shared and their speed says nothing about the code.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import ModuleType

import pytest
from scripts import load_script  # tests/benchmarks/scripts.py


@pytest.fixture(scope="module")
def script() -> ModuleType:
    return load_script("train_throughput")


def test_two_steps_on_cpu_write_consistent_json(script: ModuleType, tmp_path: Path) -> None:
    out = tmp_path / "bench" / "result.json"
    returned = script.main([
        "--config", "iwm-equi-tiny", "train.batch_size=4", "--steps", "2", "--warmup", "1",
        "--device", "cpu", "--channels", "1", "--json", str(out),
    ])
    result = json.loads(out.read_text())
    assert result["batch_size"] == 4 and result["steps"] == 2 and result["device"] == "cpu"
    assert result["images_per_s"] > 0
    assert result["step_time_ms"] > 0
    assert result["flops_per_image"] > 0
    assert result["peak_memory_bytes"] > 0
    assert set(result["split"]) == set(script.PHASES)
    assert all(f >= 0 for f in result["split"].values())
    assert math.isclose(sum(result["split"].values()), 1.0, abs_tol=1e-6)
    assert result["mfu"] is None  # no peak is known for a CPU unless one is given
    assert returned["images_per_s"] == result["images_per_s"]


def test_mfu_against_a_given_peak(script: ModuleType) -> None:
    result = script.main(["--config", "iwm-equi-tiny", "train.batch_size=4", "--steps", "1",
                          "--warmup", "0", "--device", "cpu", "--peak-tflops", "0.5"])
    achieved = result["flops_per_image"] * result["images_per_s"] / 1e12
    assert result["peak_tflops"] == 0.5
    assert math.isclose(result["mfu"], achieved / 0.5, rel_tol=1e-9)
    assert "% of 0.5 TFLOP/s" in script.format_table(result)


def test_profile_and_step_options(script: ModuleType, tmp_path: Path) -> None:
    plain = script.main(["--config", "iwm-equi-tiny", "train.batch_size=4", "--steps", "1",
                         "--warmup", "0", "--device", "cpu"])
    result = script.main([
        "--config", "iwm-equi-tiny", "train.batch_size=4", "train.grad_accum_steps=2",
        "model.grad_checkpointing=true", "--steps", "1", "--warmup", "0", "--device", "cpu",
        "--profile", str(tmp_path / "prof")])
    trace = json.loads((tmp_path / "prof" / "trace.json").read_text())
    assert trace["traceEvents"]
    ops = (tmp_path / "prof" / "ops.txt").read_text()
    assert "aten::" in ops and "Self CPU" in ops
    # Checkpointing recomputes the forward in the backward: counted FLOPs go up.
    assert result["flops_per_image"] > plain["flops_per_image"]


def test_attention_flops_are_counted_on_cpu(script: ModuleType) -> None:
    # The CPU attention kernel is unknown to FlopCounterMode; the script's formula must
    # give what the decomposed (math) attention counts: QK^T and PV, 2 FLOPs per MAC.
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    q, k, v = (torch.randn(2, 3, 5, 8, requires_grad=True) for _ in range(3))

    def count(mapping: dict, backend: SDPBackend) -> int:
        counter = FlopCounterMode(display=False, custom_mapping=mapping)
        with sdpa_kernel(backend), counter:
            F.scaled_dot_product_attention(q, k, v).sum().backward()
        return counter.get_total_flops()

    expected = count({}, SDPBackend.MATH)
    assert expected > 0
    assert count(script._extra_flop_formulas(), SDPBackend.FLASH_ATTENTION) == expected


@pytest.mark.parametrize(("name", "peak"), [
    ("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H200", 989.0),
    ("NVIDIA A100-SXM4-80GB", 312.0), ("Some Other GPU", None),
])
def test_peak_lookup(script: ModuleType, name: str, peak: float | None) -> None:
    assert script.lookup_peak_tflops(name) == peak


def test_profile_into_a_file_is_refused_before_any_step(script: ModuleType, tmp_path: Path,
                                                        capsys) -> None:
    taken = tmp_path / "prof"
    taken.write_text("not a folder")
    with pytest.raises(SystemExit):
        script.parse_args(["--profile", str(taken)])
    assert "is a file; give a folder" in capsys.readouterr().err
    assert taken.read_text() == "not a folder"


def test_split_apart_times_unsynchronised_steps_and_splits_more(script: ModuleType,
                                                                monkeypatch) -> None:
    # The GPU path, forced on the CPU: images/s from `steps` steps as training runs them,
    # the split from `steps` more with a sync at every phase boundary.
    from iwm.config import load_config
    from iwm.training.step import Trainer

    seen: list[int] = []
    real_step = Trainer.step

    def counting_step(self, step, crops, **kwargs):
        seen.append(step)
        return real_step(self, step, crops, **kwargs)

    monkeypatch.setattr(Trainer, "step", counting_step)
    cfg = load_config("iwm-equi-tiny", ["train.batch_size=4", "train.device=cpu"])
    r = script.benchmark(cfg, steps=3, warmup=1, channels=1, split_apart=True)
    assert seen == list(range(1 + 2 * 3))  # warm-up, timed, split: the schedule's order
    assert r["split_apart"] is True
    assert r["step_time_ms"] > 0 and r["step_time_ms_synced"] > 0
    assert math.isclose(sum(r["split"].values()), 1.0, abs_tol=1e-6)
    assert math.isclose(sum(r["phase_ms"].values()), r["step_time_ms_synced"], rel_tol=1e-6)
    assert r["images_per_s"] == pytest.approx(4 / (r["step_time_ms"] / 1e3), rel=1e-9)
