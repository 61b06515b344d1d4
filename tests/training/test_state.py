"""Checkpoint state: one dict out of a trainer and its batches, and back in exactly."""

import copy

import pytest
import torch

from iwm.config import load_config
from iwm.data.sources import make_source
from iwm.errors import CheckpointError
from iwm.training.distributed import DistInfo
from iwm.training.state import restore_training_state, training_state
from iwm.training.step import Trainer

CFG = ["train.batch_size=16", "model.predictor_depth=1", "model.predictor_width=64",
       "model.predictor_heads=2", "model.patch_size=7", "train.epochs=1"]


def _run(fake_mnist_dir, *extra: str):
    cfg = load_config("iwm-equi-tiny", [*CFG, f"data.root={fake_mnist_dir}", *extra])
    batches = make_source(cfg.data, cfg.train.batch_size, "cpu", seed=cfg.train.seed)
    trainer = Trainer.create(cfg, channels=1, mean=batches.mean, std=batches.std,
                             device=torch.device("cpu"),
                             steps_per_epoch=batches.steps_per_epoch)
    trainer.model.train()
    return trainer, batches


def test_a_restored_state_continues_the_same_steps(fake_mnist_dir):
    trainer, batches = _run(fake_mnist_dir)
    trainer.step(0, batches.next()[0])
    # A copy, as writing the file makes one: the dict holds the live tensors.
    state = copy.deepcopy(training_state(trainer, batches, DistInfo(), step=1))
    # Each generator is stored once, in its rank's entry.
    assert state.keys() == {"model", "optimizer", "nonfinite", "ranks", "step", "config",
                            "in_chans", "normalization"}
    assert len(state["ranks"]) == 1 and state["step"] == 1 and state["in_chans"] == 1

    losses = [trainer.step(step, batches.next()[0])[0].loss for step in (1, 2)]
    # Restoring also rewinds the global RNGs (drop-path draws from them) to the save.
    resumed, resumed_batches = _run(fake_mnist_dir)
    assert restore_training_state(state, resumed, resumed_batches, DistInfo()) == 1
    assert losses == [resumed.step(step, resumed_batches.next()[0])[0].loss for step in (1, 2)]
    for x, y in zip(trainer.model.parameters(), resumed.model.parameters(), strict=True):
        assert torch.equal(x, y)


def test_a_state_that_does_not_fit_is_a_checkpoint_error(fake_mnist_dir):
    trainer, batches = _run(fake_mnist_dir)
    state = training_state(trainer, batches, DistInfo(), step=0)
    with pytest.raises(CheckpointError, match=r"not an iwm training checkpoint \(no 'ranks'\)"):
        restore_training_state({k: v for k, v in state.items() if k != "ranks"}, trainer,
                               batches, DistInfo())
    with pytest.raises(CheckpointError, match=r"written by 1 processes; .*\(this run has 2\)"):
        restore_training_state(state, trainer, batches, DistInfo(rank=0, world_size=2))
    other, other_batches = _run(fake_mnist_dir, "model.predictor_depth=2")
    with pytest.raises(CheckpointError, match="another model configuration"):
        restore_training_state(state, other, other_batches, DistInfo())
