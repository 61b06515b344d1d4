"""Two gloo processes under torchrun: every rank's streams survive a resume."""

import os
import shutil
import subprocess
import sys

import torch
from compare import assert_identical  # tests/training/compare.py

from iwm.training.checkpoint import list_checkpoints, load_checkpoint

ARGS = ["iwm-inv-tiny", "train.batch_size=16", "train.epochs=2", "model.predictor_depth=2",
        "train.progress=false", "train.checkpoint_every=4", "train.keep_checkpoints=5"]


def _torchrun(run_dir, data_dir, *extra):
    env = {**os.environ, "IWM_DATA": str(data_dir), "OMP_NUM_THREADS": "1"}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "iwm.cli.main", "pretrain", *extra, "--run-dir", str(run_dir)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]


def test_two_process_resume_continues_every_ranks_streams(tmp_path, fake_mnist_dir):
    full = tmp_path / "full"
    _torchrun(full, fake_mnist_dir, *ARGS)  # 64 images / 16 = 4 global steps per epoch
    (s4, _), (s8, p8) = list_checkpoints(full)
    assert (s4, s8) == (4, 8)
    ranks = load_checkpoint(p8)["ranks"]
    # Every rank's streams are kept. The view/mask generator and the data order are the
    # global batch's (the same on every rank); the global RNGs are seeded per rank.
    assert len(ranks) == 2
    assert torch.equal(ranks[0]["generator"], ranks[1]["generator"])
    assert ranks[0]["source"] == ranks[1]["source"]
    assert not torch.equal(ranks[0]["rng"]["torch"], ranks[1]["rng"]["torch"])

    part = tmp_path / "part"
    shutil.copytree(full, part)
    (part / "checkpoints" / p8.name).unlink()
    _torchrun(part, fake_mnist_dir, "--resume", *ARGS)
    a, b = load_checkpoint(p8), load_checkpoint(part / "checkpoints" / p8.name)
    for key in ("model", "optimizer", "ranks", "step"):
        assert_identical(a[key], b[key], key)
