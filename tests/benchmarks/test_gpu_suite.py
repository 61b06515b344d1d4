"""benchmarks/gpu_suite.py: every piece runs (at toy sizes on the CPU), a failing or slow
piece costs only itself, and the figures land in suite.json and summary.md."""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType

import pytest
import torch
from ijepa_stand_in import forget_stand_in, write_stand_in
from scripts import load_script  # tests/benchmarks/scripts.py


@pytest.fixture(scope="module")
def suite() -> ModuleType:
    return load_script("gpu_suite")


def test_smoke_runs_every_piece_and_reports_its_figures(suite: ModuleType,
                                                        tmp_path: Path) -> None:
    out, work = tmp_path / "out", tmp_path / "work"
    # `tests` (a nested pytest) is left out for time; it is one command, `pytest -m cuda`.
    pieces = ["env", "matmul", "throughput", "official", "input", "ddp"]
    try:
        results = suite.main(["--smoke", "--out", str(out), "--work", str(work), "--only",
                              ",".join(pieces), "--ijepa-repo",
                              str(write_stand_in(tmp_path / "ijepa"))])
    finally:
        forget_stand_in()
    assert list(results) == pieces
    assert {name: r["status"] for name, r in results.items()} == dict.fromkeys(pieces, "ok")
    assert json.loads((out / "suite.json").read_text()) == json.loads(json.dumps(results))

    fig = {name: r["figures"] for name, r in results.items()}
    assert fig["env"]["torch"] == torch.__version__ and fig["env"]["iwm_imports"] == "ok"
    assert fig["matmul"]["tflops"] > 0 and fig["matmul"]["dtype"] == "bf16"
    run = fig["throughput"]["runs"]["vit_micro"]
    assert run["images_per_s"] > 0 and run["flops_per_image"] > 0
    # Beside the datasheet MFU (none for a CPU): achieved over the measured matmul rate.
    assert run["of_matmul_rate"] == pytest.approx(run["achieved_tflops"]
                                                  / fig["matmul"]["tflops"])
    assert set(fig["official"]["speedup"]) == {"iwm"}
    # 32 JPEGs at batch 8 for one epoch; torchrun's 2 processes share a batch of 32.
    assert fig["input"]["steps"] == 4 and 0 <= fig["input"]["input_wait_median"] < 1
    assert fig["ddp"]["processes"] == 2 and fig["ddp"]["steps"] == 1
    jpegs = work / "jpegs"
    assert sorted(p.name for p in jpegs.iterdir()) == [f"c{i}" for i in range(8)]
    assert len(list(jpegs.rglob("*.jpg"))) == 32 and not (work / "jpegs-distinct").exists()

    table = (out / "summary.md").read_text()
    for name in pieces:
        assert f"| {name} | ok |" in table
    assert "vit_micro:" in table and "input_wait median" in table
    log = (out / "suite.log").read_text()
    assert "train_throughput.py" in log and "torch.distributed.run" in log


def test_a_failing_command_is_an_error_with_its_last_line(suite: ModuleType,
                                                          tmp_path: Path) -> None:
    s = suite.Suite(out=tmp_path, work=tmp_path, sizes=suite.Sizes.smoke(), ijepa_repo=None)
    with open(tmp_path / "log", "w") as s.log:
        with pytest.raises(suite.PieceFailed, match="exit 3: boom"):
            s.python("-c", "import sys; print('start'); print('boom'); sys.exit(3)",
                     timeout=60)
        with pytest.raises(suite.PieceFailed, match="timed out after 1 s"):
            s.python("-c", "import time; time.sleep(30)", timeout=1)
    log = (tmp_path / "log").read_text()
    assert "start\nboom" in log and "[timed out after 1 s]" in log


def test_one_broken_piece_costs_only_itself(suite: ModuleType, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(s: object) -> dict:
        raise RuntimeError("a bug in this piece")

    monkeypatch.setitem(suite.RUNNERS, "env", broken)
    results = suite.main(["--smoke", "--out", str(tmp_path), "--only", "env,matmul"])
    assert results["env"] == {"status": "failed", "seconds": pytest.approx(0, abs=5),
                              "error": "RuntimeError: a bug in this piece"}
    assert results["matmul"]["status"] == "ok"
    assert "| env | failed |" in (tmp_path / "summary.md").read_text()


def test_official_piece_is_skipped_without_a_clone(suite: ModuleType, tmp_path: Path) -> None:
    results = suite.main(["--smoke", "--out", str(tmp_path), "--only", "official"])
    assert results["official"]["status"] == "ok"
    assert "no --ijepa-repo" in results["official"]["figures"]["skipped"]


def test_no_time_left_skips_the_pieces(suite: ModuleType, tmp_path: Path) -> None:
    results = suite.main(["--smoke", "--out", str(tmp_path), "--only", "env,matmul",
                          "--time-limit", "10"])
    assert {r["status"] for r in results.values()} == {"skipped"}
    assert "no time left" in (tmp_path / "summary.md").read_text()


def test_a_command_gets_no_more_than_the_time_left(suite: ModuleType, tmp_path: Path) -> None:
    import time

    s = suite.Suite(out=tmp_path, work=tmp_path, sizes=suite.Sizes.smoke(), ijepa_repo=None,
                    deadline=time.monotonic() + 2)
    with open(tmp_path / "log", "w") as s.log, pytest.raises(suite.PieceFailed,
                                                               match="no time left"):
        s.python("-c", "pass", timeout=60)


@pytest.mark.parametrize(("argv", "message"), [
    (["--only", "env,warp"], "unknown pieces ['warp']"),
    (["--only", ","], "unknown pieces []"),
    (["--ijepa-repo", "."], "not a clone of the official I-JEPA code"),
])
def test_bad_arguments_are_usage_errors(suite: ModuleType, tmp_path: Path, argv: list[str],
                                        message: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        suite.parse_args(["--smoke", "--out", str(tmp_path), *argv])
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_a_gpu_run_without_a_gpu_says_so(suite: ModuleType, tmp_path: Path,
                                         capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        suite.parse_args(["--out", str(tmp_path)])
    assert "no CUDA device here" in capsys.readouterr().err
