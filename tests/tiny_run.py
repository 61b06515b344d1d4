"""Tiny training for tests: a pretrained run on the generated Fashion-MNIST (for tests of
the trained-model API) and a CPU :class:`~iwm.training.step.Trainer` (for tests of the step).

One ~1 s pretraining per test module that asks for it (module-scoped fixtures call
:func:`make_tiny_run`); not a fixture in conftest.py because only a few modules need it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import write_fake_mnist

TINY = ["train.batch_size=16", "train.epochs=0.25", "train.progress=false",
        "model.predictor_depth=2"]


def make_tiny_run(folder: Path, preset: str = "iwm-equi-tiny") -> Path:
    """Pretrain ``preset`` for one step into ``folder / "run"`` (vit_micro, 1 x 28 x 28)."""
    from iwm.config import load_config
    from iwm.training.loop import pretrain

    data = folder / "fmnist"
    write_fake_mnist(data)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("IWM_DATA", str(data))
        return pretrain(load_config(preset, TINY), folder / "run")


def tiny_trainer(*overrides: str, channels: int = 1):
    """The iwm-equi-tiny preset's Trainer on the CPU (batch 16, predictor depth 2, seeded),
    in train mode, for ``channels``-channel 28 x 28 crops."""
    import torch

    from iwm.config import load_config
    from iwm.training.step import Trainer

    torch.manual_seed(0)
    cfg = load_config("iwm-equi-tiny", ["train.batch_size=16", "model.predictor_depth=2",
                                         "train.progress=false", "train.device=cpu",
                                         *overrides])
    trainer = Trainer.create(cfg, channels=channels, mean=(0.5,) * channels,
                             std=(0.25,) * channels, device=torch.device("cpu"),
                             steps_per_epoch=4)
    trainer.model.train()
    return trainer
