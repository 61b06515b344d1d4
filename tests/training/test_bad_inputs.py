"""Bad configs and bad inputs to ``iwm pretrain``: a one-line error, never a traceback.

Each config rule has its own case in tests/test_config.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from iwm.config import load_config, save_config
from iwm.errors import ConfigError


def test_more_processes_than_images_per_batch(tmp_path, monkeypatch, fake_mnist_dir):
    from iwm.training.distributed import DistInfo
    from iwm.training.loop import _pretrain

    monkeypatch.setenv("IWM_DATA", str(fake_mnist_dir))
    cfg = load_config("iwm-inv-tiny", ["train.batch_size=2"])
    with pytest.raises(ConfigError,
                       match=r"batch_size=2 \(the global batch\) cannot be split evenly over 4"):
        _pretrain(cfg, tmp_path / "run", False, DistInfo(rank=0, world_size=4), None)


def _console_script() -> str:
    return str(Path(sys.executable).with_name("iwm"))


def test_console_script_errors_are_one_line(tmp_path, fake_mnist_dir):
    """The installed ``iwm`` in real processes (started together: each spends seconds
    importing torch)."""
    empty = tmp_path / "empty" / "cls"
    empty.mkdir(parents=True)
    run = tmp_path / "run"  # a run whose only checkpoint was cut off
    (run / "checkpoints").mkdir(parents=True)
    save_config(load_config("iwm-inv-tiny", ["train.batch_size=16"]), run / "config.yaml")
    (run / "checkpoints" / "step_000010.pt").write_bytes(b"PK\x03\x04 cut off")
    cases = {
        "config": (["pretrain", "iwm-inv-tiny", "model.patch_size=5"],
                   "model.patch_size=5 does not divide"),
        "data": (["pretrain", "iwm-inv-tiny", f"data.name=imagefolder:{empty.parent}",
                  "--run-dir", str(tmp_path / "r")], "no images in"),
        "checkpoint": (["pretrain", str(run), "--resume"],
                       "step_000010.pt is truncated or corrupt"),
    }
    env = {**os.environ, "IWM_DATA": str(fake_mnist_dir), "OMP_NUM_THREADS": "1"}
    procs = {name: subprocess.Popen([_console_script(), *argv], env=env, text=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for name, (argv, _) in cases.items()}
    for name, proc in procs.items():
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 2, (name, err)
        assert err.startswith("iwm: error: ") and err.count("\n") == 1, (name, err)
        assert "Traceback" not in err and cases[name][1] in err, (name, err)
