"""Few-step pretraining runs on a tiny generated Fashion-MNIST (no network)."""

import random
import shutil

import numpy as np
import pytest
import torch
from compare import assert_identical  # tests/training/compare.py

from iwm.config import load_config
from iwm.training.checkpoint import list_checkpoints, load_checkpoint
from iwm.training.loop import pretrain
from iwm.training.metrics import read_metrics
from iwm.training.step import Trainer

SMALL = ["train.batch_size=16", "train.log_every=1", "train.progress=false",
         "model.predictor_depth=2"]


@pytest.fixture(autouse=True)
def fake_fashion_mnist(fake_mnist_dir, monkeypatch):
    monkeypatch.setenv("IWM_DATA", str(fake_mnist_dir))


@pytest.mark.parametrize("preset", ["ijepa-tiny", "iwm-inv-tiny", "iwm-equi-tiny"])
def test_presets_pretrain_a_few_steps(preset, tmp_path):
    cfg = load_config(preset, SMALL + ["train.epochs=0.5"])  # 64 images / 16 = 4 steps/epoch
    run = pretrain(cfg, tmp_path / "run")
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == [1, 2]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    assert (run / "config.yaml").is_file() and (run / "tensorboard").is_dir()
    [(step, path)] = list_checkpoints(run)
    state = load_checkpoint(path)
    assert step == 2 and state["step"] == 2 and state["in_chans"] == 1
    assert load_config(state["config"]) == cfg


def test_resume_continues_the_same_run_exactly(tmp_path, monkeypatch):
    # Each step also draws from the global generators (Python, numpy, torch), as user code
    # or a library might: a resume that did not restore them would draw other numbers.
    draws: list[tuple[float, float, float]] = []
    real_step = Trainer.step

    def step(self, *args, **kwargs):
        draws.append((random.random(), float(np.random.rand()), float(torch.rand(()))))
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "step", step)
    cfg = load_config("iwm-equi-tiny", SMALL + ["train.epochs=1.5", "train.checkpoint_every=3",
                                                "train.keep_checkpoints=5"])
    full = pretrain(cfg, tmp_path / "full")  # 6 steps, checkpoints at 3 and 6, crossing an epoch
    (s3, p3), (s6, p6) = list_checkpoints(full)
    assert (s3, s6) == (3, 6)
    full_draws, draws[:] = draws[:], []

    # An interrupted run: only the step-3 checkpoint survived. The resumed run must end in
    # the state the uninterrupted one did: weights, EMA, optimiser (moments, step counts,
    # lr and weight decay of the schedules), view/mask generator, data position, global
    # random states, skip counters; and it must log the same values.
    part = tmp_path / "part"
    shutil.copytree(full, part)
    (part / "checkpoints" / p6.name).unlink()
    pretrain(cfg, part, resume=True)
    assert draws == full_draws[3:]
    a, b = load_checkpoint(p6), load_checkpoint(part / "checkpoints" / p6.name)
    assert a.keys() == b.keys() >= {"model", "optimizer", "nonfinite", "ranks", "step"}
    assert a["ranks"][0].keys() == {"generator", "mask_generator", "source", "rng"}
    for key in a:
        assert_identical(a[key], b[key], key)
    assert any(k.startswith("target_encoder.") for k in a["model"])  # the EMA is compared
    assert a["ranks"][0]["source"]["epoch"] == 1  # and the data order crossed an epoch
    # The metrics file has each step once, also after the resume, with the same values.
    rows_full, rows_part = read_metrics(full), read_metrics(part)
    assert [r["step"] for r in rows_part] == list(range(1, 7))
    timings = {"images_per_s", "input_wait", "monitor_s"}
    for x, y in zip(rows_full, rows_part, strict=True):
        assert {k: v for k, v in x.items() if k not in timings} == \
            {k: v for k, v in y.items() if k not in timings}


class _StopAtSave(Exception):
    pass


def _checkpoints_when_resumed(cfg, run, monkeypatch) -> list[int]:
    """The steps of the run's checkpoints after ``--resume`` loaded, before it saved."""
    from iwm.training import loop

    def stop(path, state):
        raise _StopAtSave

    with monkeypatch.context() as m:
        m.setattr(loop, "save_checkpoint", stop)
        with pytest.raises(_StopAtSave):
            pretrain(cfg, run, resume=True)
    return [s for s, _ in list_checkpoints(run)]


def test_resume_prunes_what_a_kill_left_but_keeps_a_fallback(tmp_path, monkeypatch):
    every = ["train.epochs=1", "train.checkpoint_every=1"]
    run = pretrain(load_config("iwm-inv-tiny", SMALL + every + ["train.keep_checkpoints=5"]),
                   tmp_path / "run")
    (run / "checkpoints" / "step_000004.pt").unlink()
    cfg = load_config("iwm-inv-tiny", SMALL + every + ["train.keep_checkpoints=2"])
    # Steps 1-3 with keep=2: a kill between the save of 3 and its pruning. Resuming must
    # prune, or a second such kill would leave four (the CI failure this guards).
    assert _checkpoints_when_resumed(cfg, run, monkeypatch) == [2, 3]
    # A damaged newest: the run resumes from 2, and 2 must survive until 3 is saved again.
    newest = run / "checkpoints" / "step_000003.pt"
    newest.write_bytes(newest.read_bytes()[:100])
    shutil.copy(run / "checkpoints" / "step_000002.pt", run / "checkpoints" / "step_000001.pt")
    with pytest.warns(UserWarning, match="previous one"):
        assert _checkpoints_when_resumed(cfg, run, monkeypatch) == [1, 2, 3]


def test_training_changes_the_encoder_and_moves_the_ema(tmp_path):
    cfg = load_config("iwm-inv-tiny", SMALL + ["train.epochs=0.5", "optim.ema=[0.5,0.5]"])
    run = pretrain(cfg, tmp_path / "run")
    state = load_checkpoint(list_checkpoints(run)[-1][1])["model"]
    online = state["encoder.blocks.0.attn.qkv.weight"]
    ema = state["target_encoder.blocks.0.attn.qkv.weight"]
    torch.manual_seed(cfg.train.seed)
    assert not torch.equal(online, ema)  # EMA lags the online encoder
    assert (online - ema).abs().max() < (online.abs().max())  # but follows it


def test_resume_without_checkpoint_is_a_clear_error(tmp_path):
    from iwm.errors import ConfigError

    cfg = load_config("iwm-inv-tiny", SMALL)
    with pytest.raises(ConfigError, match="no checkpoint"):
        pretrain(cfg, tmp_path / "empty", resume=True)


def test_input_wait_is_the_share_of_time_spent_getting_batches(tmp_path, monkeypatch):
    import time

    from iwm.data.sources import TensorBatchSource

    cfg = load_config("ijepa-tiny", SMALL + ["train.epochs=0.5"])
    fast = read_metrics(pretrain(cfg, tmp_path / "fast"))
    original = TensorBatchSource.next

    def slow_next(self):
        time.sleep(0.5)  # a loader that cannot keep up
        return original(self)

    monkeypatch.setattr(TensorBatchSource, "next", slow_next)
    slow = read_metrics(pretrain(cfg, tmp_path / "slow"))
    assert [r["step"] for r in slow] == [1, 2]
    assert all(0.2 < r["input_wait"] <= 1 for r in slow)
    assert max(r["input_wait"] for r in fast) < min(r["input_wait"] for r in slow)


# ---------------------------------------------------------------- what it says


TALK = ["train.batch_size=16", "train.log_every=2", "model.predictor_depth=1",
        "train.epochs=1.5"]  # 6 steps; progress on (the default)


def test_without_a_terminal_it_logs_one_line_per_log_every(tmp_path, capsys):
    run = tmp_path / "run"
    pretrain(load_config("iwm-inv-tiny", TALK), run)
    captured = capsys.readouterr()
    err = captured.err
    assert captured.out == "" and "\r" not in err
    lines = err.splitlines()
    assert lines[0] == (f"iwm: run directory: {run}; watch it with `tensorboard --logdir "
                        f"{run / 'tensorboard'}`")
    assert lines[1].startswith("iwm: data: fashion-mnist (64 images, 10 classes, 1 channel, "
                               "28x28); random crops")
    assert "4 steps per epoch, 6 steps (1.5 epochs of batch 16)" in lines[1]
    steps = [line for line in lines if line.startswith("iwm: pretrain ")]
    assert [line.split()[3] for line in steps] == ["2/6", "4/6", "6/6"]
    for line in steps:
        assert all(f" {key} " in line for key in ("loss", "lr", "img/s", "elapsed", "left"))


def test_progress_false_silences_it(tmp_path, capsys):
    pretrain(load_config("iwm-inv-tiny", [*TALK, "train.progress=false"]), tmp_path / "run")
    assert capsys.readouterr().err == ""


def test_resume_says_where_from_and_a_finished_run_stays_as_it_is(tmp_path, capsys):
    run = tmp_path / "run"
    pretrain(load_config("iwm-inv-tiny", [*TALK, "train.epochs=0.5"]), run)
    capsys.readouterr()
    pretrain(load_config("iwm-inv-tiny", TALK), run, resume=True)
    err = capsys.readouterr().err
    assert f"iwm: resumed from step 2 (checkpoint {run / 'checkpoints' / 'step_000002.pt'})" \
        in err.splitlines()
    assert [line.split()[3] for line in err.splitlines()
            if line.startswith("iwm: pretrain ")] == ["4/6", "6/6"]  # from step 2, not 0

    rows, checkpoints = read_metrics(run), list_checkpoints(run)
    pretrain(load_config("iwm-inv-tiny", TALK), run, resume=True)
    lines = capsys.readouterr().err.splitlines()
    assert lines[-1] == (f"iwm: {run} is already complete at step 6/6 (raise train.epochs to "
                         f"train further, e.g. `iwm pretrain {run} --resume train.epochs=3`)")
    assert not any(line.startswith("iwm: pretrain ") for line in lines)
    assert read_metrics(run) == rows and list_checkpoints(run) == checkpoints


def test_resume_on_tar_shards_continues_at_the_exact_sample(tmp_path):
    from conftest import write_coloured_shards

    # 48 RGB images, global batch 16: 3 steps per epoch, checkpoints at 2 and 4 (mid-epoch).
    pattern = write_coloured_shards(tmp_path / "data")
    cfg = load_config("iwm-equi-tiny", SMALL + [
        f"data.name=shards:{pattern}", "data.image_size=16", "data.num_workers=2",
        "data.shuffle_buffer=8", "train.epochs=1.5", "train.checkpoint_every=2",
        "train.keep_checkpoints=5"])
    full = pretrain(cfg, tmp_path / "full")
    (s2, _), (s4, p4) = list_checkpoints(full)[:2]
    assert (s2, s4) == (2, 4)
    part = tmp_path / "part"
    shutil.copytree(full, part)
    for _, path in list_checkpoints(part)[1:]:
        path.unlink()
    pretrain(cfg, part, resume=True)
    a, b = load_checkpoint(p4), load_checkpoint(part / "checkpoints" / p4.name)
    for key in ("model", "optimizer", "ranks", "step"):
        assert_identical(a[key], b[key], key)
    assert a["ranks"][0]["source"] == {"epoch": 1, "position": 1, "seed": 0, "num_images": 48,
                                       "batch_size": 16, "workers": 2, "shuffle_buffer": 8}
    assert a["in_chans"] == 3
