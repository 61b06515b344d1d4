"""Faults during pretraining: NaN/inf steps, full disks, damaged checkpoints, preemption."""

from __future__ import annotations

import copy
import dataclasses
import errno
import os
import shutil
import signal
import time

import numpy as np
import pytest
import torch
from forking import ForkedCLI  # tests/training/forking.py
from PIL import Image

from iwm.cli.main import main
from iwm.config import load_config
from iwm.errors import ConfigError, StorageError, TrainingError
from iwm.models.iwm import IWM
from iwm.training import checkpoint as ckpt
from iwm.training.checkpoint import list_checkpoints, load_checkpoint
from iwm.training.loop import pretrain
from iwm.training.metrics import MetricsLogger, read_metrics
from iwm.training.step import Trainer

SMALL = ["train.batch_size=16", "train.log_every=1", "train.progress=false",
         "model.predictor_depth=1", "model.predictor_width=64", "model.predictor_heads=2",
         "model.patch_size=7"]
STEPS_PER_EPOCH = 4  # 64 fake images / batch 16


@pytest.fixture(autouse=True)
def fake_fashion_mnist(fake_mnist_dir, monkeypatch):
    monkeypatch.setenv("IWM_DATA", str(fake_mnist_dir))


@pytest.fixture
def forked_cli(fake_mnist_dir, monkeypatch) -> ForkedCLI:
    """Children inherit the environment: the tiny fake Fashion-MNIST, one thread."""
    monkeypatch.setenv("IWM_DATA", str(fake_mnist_dir))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    return ForkedCLI()


def _cfg(*extra: str):
    return load_config("iwm-inv-tiny", [*SMALL, *extra])


def _snapshot(trainer: Trainer) -> dict:
    """Weights (online and EMA) and optimiser moments and step counts; not the param
    groups, whose lr and weight decay follow the schedule whether a step is skipped or not."""
    return copy.deepcopy({"model": trainer.model.state_dict(),
                          "optimizer": trainer.optimizer.state_dict()["state"]})


def _assert_same_tree(a, b, where: str = "state") -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_same_tree(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same_tree(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


# ---------------------------------------------------------------- non-finite steps


def test_a_nonfinite_step_changes_nothing():
    cfg = _cfg("train.epochs=1")
    trainer = Trainer.create(cfg, channels=1, mean=(0.5,), std=(0.25,),
                             device=torch.device("cpu"), steps_per_epoch=STEPS_PER_EPOCH)
    trainer.model.train()
    crops = torch.rand(16, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    trainer.step(0, crops)
    before = _snapshot(trainer)

    # A NaN loss (from NaN pixels) ...
    out, _ = trainer.step(1, torch.full_like(crops, float("nan")))
    assert not torch.isfinite(out.loss)
    _assert_same_tree(_snapshot(trainer), before)  # weights, EMA, moments, step count
    # ... and a finite loss with an infinite gradient are skipped alike.
    hook = trainer.model.predictor.embed.weight.register_hook(lambda g: g * float("inf"))
    out, grad_norm = trainer.step(2, crops)
    hook.remove()
    assert torch.isfinite(out.loss) and not torch.isfinite(grad_norm)
    _assert_same_tree(_snapshot(trainer), before)
    assert trainer.nonfinite.read() == (2, 2)

    trainer.step(3, crops)  # a good step updates again and ends the streak
    after = _snapshot(trainer)
    for key in ("encoder.patch_embed.proj.weight", "target_encoder.patch_embed.proj.weight"):
        assert not torch.equal(after["model"][key], before["model"][key])
    assert int(trainer.nonfinite.streak) == 0 and trainer.nonfinite.read() == (2, 2)
    assert after["optimizer"][0]["step"] == 2  # steps 0 and 3 only


def _nan_at(calls: set[int], monkeypatch) -> None:
    """Make the model's loss NaN on the given (1-based) forward calls."""
    real = IWM.forward
    count = [0]

    def forward(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        count[0] += 1
        if count[0] in calls:
            return dataclasses.replace(out, loss=out.loss * float("nan"))
        return out

    monkeypatch.setattr(IWM, "forward", forward)


def test_nan_steps_are_skipped_counted_and_never_checkpointed(tmp_path, monkeypatch):
    _nan_at({2, 3}, monkeypatch)
    cfg = _cfg("train.epochs=1", "train.checkpoint_every=1", "train.keep_checkpoints=4",
               "train.max_nonfinite=3")
    run = pretrain(cfg, tmp_path / "run")
    rows = read_metrics(run)
    assert [r["skipped_steps"] for r in rows] == [0, 1, 2, 2]
    assert [np.isnan(r["loss"]) for r in rows] == [False, True, True, False]
    states = {s: load_checkpoint(p) for s, p in list_checkpoints(run)}  # all finite: saved
    # Steps 2 and 3 changed nothing that a checkpoint holds but the counters.
    _assert_same_tree(states[3]["model"], states[1]["model"])
    _assert_same_tree(states[3]["optimizer"]["state"], states[1]["optimizer"]["state"])
    assert int(states[3]["nonfinite"]["longest"]) == 2
    assert not torch.equal(states[4]["model"]["encoder.blocks.0.attn.qkv.weight"],
                           states[1]["model"]["encoder.blocks.0.attn.qkv.weight"])


def test_divergence_stops_with_a_clear_error(tmp_path):
    # A huge learning rate: the first update blows the weights up, every later loss is NaN.
    cfg = _cfg("train.epochs=5", "optim.lr=1e30", "optim.start_lr=1e30", "optim.grad_clip=null",
               "train.checkpoint_every=1", "train.max_nonfinite=3")
    with pytest.raises(TrainingError, match=r"3 steps in a row .*max_nonfinite=3.*optim.lr"):
        pretrain(cfg, tmp_path / "run")
    # Logged up to the stop; no checkpoint of a run that should have stopped.
    assert [r["skipped_steps"] for r in read_metrics(tmp_path / "run")] == [0, 1, 2, 3]
    assert [s for s, _ in list_checkpoints(tmp_path / "run")][-1] == 3


# ---------------------------------------------------------------- full disk


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_disk_full_during_a_save_is_one_line_and_keeps_the_run(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    real_save = torch.save
    calls = [0]

    def save_then_fill(obj, f, *args, **kwargs):
        calls[0] += 1
        if calls[0] == 3:
            _enospc()
        real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(ckpt.torch, "save", save_then_fill)
    argv = ["pretrain", "iwm-inv-tiny", *SMALL, "train.epochs=1", "train.checkpoint_every=1",
            "--run-dir", str(run)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "No space left on device" in err
    assert "step_000003.pt" in err and "Traceback" not in err
    # The previous checkpoints are whole, no temporary file is left, the metrics readable.
    assert [s for s, _ in list_checkpoints(run)] == [1, 2]
    assert load_checkpoint(run / "checkpoints" / "step_000002.pt")["step"] == 2
    assert not list((run / "checkpoints").glob(".*"))
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3]

    monkeypatch.setattr(ckpt.torch, "save", real_save)  # space freed: resume finishes
    assert main(["pretrain", str(run), "--resume"]) == 0
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3, 4]


def test_disk_full_for_metrics_is_a_storage_error(tmp_path, monkeypatch):
    real_log = MetricsLogger.log

    def log(self, step, values):
        if step == 2:
            _enospc()
        real_log(self, step, values)

    monkeypatch.setattr(MetricsLogger, "log", log)
    with pytest.raises(StorageError, match="cannot write metrics .*No space left on device"):
        pretrain(_cfg("train.epochs=1", "train.checkpoint_every=1"), tmp_path / "run")
    assert [s for s, _ in list_checkpoints(tmp_path / "run")] == [1]


def test_unwritable_run_directory_is_a_storage_error(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(StorageError, match="cannot write the run's config"):
        pretrain(_cfg("train.epochs=0.25"), tmp_path / "file" / "run")


# ---------------------------------------------------------------- resuming


def test_resume_falls_back_from_a_truncated_checkpoint(tmp_path, capsys):
    full = tmp_path / "run"
    assert main(["pretrain", "iwm-inv-tiny", *SMALL, "train.epochs=0.75",
                 "train.checkpoint_every=1", "train.keep_checkpoints=3",
                 "--run-dir", str(full)]) == 0
    part = tmp_path / "part"
    shutil.copytree(full, part)
    newest = part / "checkpoints" / "step_000003.pt"
    newest.write_bytes(newest.read_bytes()[:1000])  # cut off, e.g. by an interrupted copy

    with pytest.warns(UserWarning, match="step_000003.pt is truncated or corrupt"):
        assert main(["pretrain", str(part), "--resume"]) == 0
    # Resumed from step 2, it rewrote step 3 exactly as the uninterrupted run did.
    a = load_checkpoint(full / "checkpoints" / "step_000003.pt")
    b = load_checkpoint(newest)
    _assert_same_tree(b["model"], a["model"])
    _assert_same_tree(b["optimizer"], a["optimizer"])
    assert [r["step"] for r in read_metrics(part)] == [1, 2, 3]

    for _, path in list_checkpoints(part):
        path.write_bytes(b"garbage")
    capsys.readouterr()
    with pytest.warns(UserWarning):
        assert main(["pretrain", str(part), "--resume"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "none of the 3 checkpoints" in err


def test_resume_with_another_model_lists_the_mismatch(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["pretrain", "iwm-inv-tiny", *SMALL, "train.epochs=0.5",
                 "--run-dir", str(run)]) == 0
    capsys.readouterr()
    assert main(["pretrain", str(run), "--resume", "model.predictor_depth=2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "another model configuration" in err
    assert "missing: predictor.blocks.1." in err


def test_resume_before_the_first_checkpoint_starts_over(tmp_path):
    run = tmp_path / "run"
    pretrain(_cfg("train.epochs=0.5"), run)
    shutil.rmtree(run / "checkpoints")  # as if killed before the first save
    with pytest.warns(UserWarning, match="no checkpoint yet; starting it from step 0"):
        pretrain(_cfg("train.epochs=0.5"), run, resume=True)
    assert [r["step"] for r in read_metrics(run)] == [1, 2]  # the old rows were replaced
    with pytest.raises(ConfigError, match="no checkpoint"):  # not a run at all: an error
        pretrain(_cfg(), tmp_path / "elsewhere", resume=True)


# ---------------------------------------------------------------- preemption


def _image_folder(root, n: int = 32):
    rng = np.random.default_rng(0)
    for i in range(n):
        d = root / f"c{i % 2}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (30, 32, 3), dtype=np.uint8)).save(d / f"{i}.png")
    return root


def _wait_for_rows(run, proc, log, n: int = 1) -> None:
    deadline = time.monotonic() + 120
    while len(read_metrics(run)) < n:
        assert proc.is_alive(), log.read_text()
        assert time.monotonic() < deadline
        time.sleep(0.01)


@pytest.mark.parametrize("signame, data", [("SIGTERM", "fashion-mnist"), ("SIGTERM", "imagefolder"),
                                           ("SIGUSR1", "imagefolder")])
def test_stop_signal_checkpoints_and_exits_75(signame, data, forked_cli, tmp_path):
    run, log = tmp_path / "run", tmp_path / "child.log"
    extra = ["train.epochs=1000"]
    if data == "imagefolder":
        # Streamed with a DataLoader worker, and the signal goes to the whole process group
        # as SLURM sends it: the worker must not die of it.
        folder = _image_folder(tmp_path / "images")
        extra += [f"data.name=imagefolder:{folder}", "data.holdout=0", "data.num_workers=1",
                  "train.batch_size=8"]
    proc = forked_cli.start(["pretrain", "iwm-inv-tiny", *SMALL, *extra, "--run-dir", str(run)],
                            log, own_group=True)
    _wait_for_rows(run, proc, log)
    os.killpg(proc.pid, getattr(signal, signame))
    proc.join(60)
    text = log.read_text()
    assert proc.exitcode == 75, text
    last = text.strip().splitlines()[-1]
    assert "Traceback" not in text and last.startswith(f"iwm: stopped by {signame} at step ")
    assert f"iwm pretrain {run} --resume" in last
    [(step, path)] = list_checkpoints(run)  # only the one written on the signal
    assert load_checkpoint(path)["step"] == step and f"step {step}/4000" in last
    assert [r["step"] for r in read_metrics(run)] == list(range(1, step + 1))

    # The requeued job resumes it; two more steps finish the (shortened) run.
    assert main(["pretrain", str(run), "--resume",
                 f"train.epochs={(step + 2) / STEPS_PER_EPOCH}"]) == 0
    assert list_checkpoints(run)[-1][0] == step + 2
    assert [r["step"] for r in read_metrics(run)] == list(range(1, step + 3))


def test_stop_signals_are_restored_after_training(tmp_path):
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    pretrain(_cfg("train.epochs=0.25"), tmp_path / "run")
    assert {sig: signal.getsignal(sig) for sig in before} == before


def test_ctrl_c_checkpoints_exits_130_and_resume_continues(forked_cli, tmp_path, capsys):
    run, log = tmp_path / "run", tmp_path / "child.log"
    # An image folder streamed by a worker, and SIGINT to the whole process group, as a
    # terminal sends Ctrl-C: the worker must not quit on it.
    folder = _image_folder(tmp_path / "images")
    proc = forked_cli.start(["pretrain", "iwm-inv-tiny", *SMALL, "train.epochs=1000",
                             f"data.name=imagefolder:{folder}", "data.holdout=0",
                             "data.num_workers=1",
                             "train.batch_size=8", "--run-dir", str(run)], log, own_group=True)
    _wait_for_rows(run, proc, log)
    os.killpg(proc.pid, signal.SIGINT)
    proc.join(60)
    text = log.read_text()
    assert proc.exitcode == 130, text  # not 75: a requeue script must not restart it
    assert "Traceback" not in text and "press Ctrl-C again to quit at once" in text
    [(step, path)] = list_checkpoints(run)  # only the one written on Ctrl-C
    assert load_checkpoint(path)["step"] == step
    assert text.strip().splitlines()[-1] == (
        f"iwm: interrupted at step {step}/4000, checkpoint {path} written; continue with "
        f"`iwm pretrain {run} --resume`")

    capsys.readouterr()
    steps_per_epoch = 32 // 8
    assert main(["pretrain", str(run), "--resume", "train.progress=true",
                 f"train.epochs={(step + 2) / steps_per_epoch}"]) == 0
    assert f"iwm: resumed from step {step} (checkpoint {path})" in capsys.readouterr().err
    assert list_checkpoints(run)[-1][0] == step + 2
    assert [r["step"] for r in read_metrics(run)] == list(range(1, step + 3))


def _slow_saves() -> None:
    """In the child: every checkpoint save takes a minute, as on a slow file system."""
    from iwm.training import loop

    def save(*args: object) -> None:
        time.sleep(60)

    loop.save_checkpoint = save  # type: ignore[assignment]


def test_a_second_ctrl_c_quits_at_once(forked_cli, tmp_path):
    run, log = tmp_path / "run", tmp_path / "child.log"
    proc = forked_cli.start(["pretrain", "iwm-inv-tiny", *SMALL, "train.epochs=1000",
                             "--run-dir", str(run)], log, own_group=True, hook=_slow_saves)
    _wait_for_rows(run, proc, log)
    os.kill(proc.pid, signal.SIGINT)
    deadline = time.monotonic() + 60
    while "press Ctrl-C again" not in log.read_text():  # the first one was handled
        assert proc.is_alive() and time.monotonic() < deadline, log.read_text()
        time.sleep(0.01)
    time.sleep(0.5)  # into the (minute-long) save the first Ctrl-C asked for
    started = time.monotonic()
    os.kill(proc.pid, signal.SIGINT)
    proc.join(30)
    text = log.read_text()
    assert proc.exitcode == 130, text
    assert time.monotonic() - started < 30  # did not wait for the save
    assert text.strip().splitlines()[-1] == "iwm: interrupted" and "Traceback" not in text
    assert list_checkpoints(run) == []
