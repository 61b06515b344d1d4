"""Few-step pretraining runs on a tiny generated Fashion-MNIST (no network)."""

import shutil

import pytest
import torch

from iwm.config import load_config
from iwm.training.checkpoint import list_checkpoints, load_checkpoint
from iwm.training.loop import pretrain
from iwm.training.metrics import read_metrics

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


def _params(path):
    return load_checkpoint(path)["model"]


def test_resume_continues_the_same_run_exactly(tmp_path):
    cfg = load_config("iwm-equi-tiny", SMALL + ["train.epochs=1.5", "train.checkpoint_every=3",
                                                "train.keep_checkpoints=5"])
    full = pretrain(cfg, tmp_path / "full")  # 6 steps, checkpoints at 3 and 6, crossing an epoch
    (s3, p3), (s6, p6) = list_checkpoints(full)
    assert (s3, s6) == (3, 6)

    # An interrupted run: only the step-3 checkpoint survived. Resuming must give the same
    # step-6 weights, optimiser state and EMA as the uninterrupted run.
    part = tmp_path / "part"
    shutil.copytree(full, part)
    (part / "checkpoints" / p6.name).unlink()
    pretrain(cfg, part, resume=True)
    a, b = load_checkpoint(p6), load_checkpoint(part / "checkpoints" / p6.name)
    for key, value in a["model"].items():
        torch.testing.assert_close(b["model"][key], value, rtol=0, atol=0, msg=key)
    for pid, st in a["optimizer"]["state"].items():
        torch.testing.assert_close(b["optimizer"]["state"][pid]["exp_avg"], st["exp_avg"],
                                   rtol=0, atol=0)
    assert a["source"] == b["source"]
    # The metrics file has each step once, also after the resume.
    assert [r["step"] for r in read_metrics(part)] == list(range(1, 7))


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
