"""Bad configs and bad inputs to ``iwm pretrain``: a one-line error, never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from iwm.config import load_config, save_config
from iwm.errors import ConfigError


@pytest.mark.parametrize("override, message", [
    # Impossible values (wrong types and unknown keys are tested in tests/cli).
    ("mask.target_scale=[0.1,1.5]", "needs 0 < min <= max <= 1"),
    ("mask.context_scale=[0,1]", "needs 0 < min <= max <= 1"),
    ("data.crop_scale=[0.5,0.2]", "needs 0 < min <= max <= 1"),
    ("model.patch_size=5", "does not divide data.image_size=28"),
    ("model.patch_size=0", "model.patch_size=0: must be at least 1"),
    ("model.predictor_heads=3", "not divisible by model.predictor_heads=3"),
    ("model.predictor_heads=0", "must be at least 1"),
    ("data.image_size=0", "must be at least 1"),
    ("train.batch_size=0", "must be at least 1"),
    ("train.max_nonfinite=0", "must be at least 1"),
    ("train.epochs=0", "must be positive"),
    ("optim.lr=-1e-3", "optim.lr=-0.001: must be positive"),
    ("optim.weight_decay=-0.1", "must be >= 0"),
    ("optim.ema=[0.99,1.5]", "momenta need 0 <= value <= 1"),
    ("optim.betas=[0.9,1.0]", "each needs 0 <= beta < 1"),
    ("optim.grad_clip=0", "must be positive, or null"),
    ("optim.predictor_lr_scale=0", "optim.predictor_lr_scale=0.0: must be positive"),
    ("mask.context_tokens=crop", "mask.context_tokens='crop'"),
    ("mask.predictor_pass=all", "mask.predictor_pass='all'"),
    ("model.drop_path=1.0", "needs 0 <= value < 1"),
    ("data.num_workers=-1", "must be >= 0"),
    ("mask.min_context=1.0", "needs 0 <= value < 1"),
    ("train.attention=flash", "train.attention='flash'"),
    ("model.encoder=vit_gigantic", "model.encoder='vit_gigantic': must be one of vit_micro"),
])
def test_impossible_values_are_config_errors(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")):
        load_config("iwm-inv-tiny", [override])


def test_exponent_without_a_dot_is_a_number():
    # PyYAML reads 1e-3 as a string; refusing it as "not a number" would be a trap.
    assert load_config("iwm-inv-tiny", ["optim.lr=1e-3"]).optim.lr == 1e-3
    with pytest.raises(ConfigError, match="expected a number"):
        load_config("iwm-inv-tiny", ["optim.lr=fast"])


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
