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


def make_tiny_run_with_mnist(folder: Path) -> Path:
    """:func:`make_tiny_run`, plus a generated MNIST where ``find_mnist`` looks for it under
    the same ``IWM_DATA`` (``run.parent / "fmnist"``): a second task for finetuning."""
    run = make_tiny_run(folder)
    write_fake_mnist(run.parent / "fmnist" / "mnist")
    return run


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


DECODER_FAST = ["decoder.width=64", "decoder.depth=1", "decoder.heads=2",
                "decoder.batch_size=32", "decoder.epochs=12", "decoder.lr=3e-3",
                "decoder.val_images=64"]
"""A latent decoder trained in seconds: ~100 steps of a one-block decoder."""


def write_block_mnist(folder: Path, n_train: int = 256, n_test: int = 64) -> None:
    """MNIST-format files of 28 x 28 images made of four 14 x 14 squares, each of its own
    grey level: structure a decoder can learn in seconds, and images so unlike each
    other that their mean image is a poor reconstruction (about 11 dB)."""
    import torch

    from iwm.data.fetch import write_idx

    gen = torch.Generator().manual_seed(1)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        levels = torch.randint(0, 256, (n, 2, 2), generator=gen)
        images = levels.repeat_interleave(14, 1).repeat_interleave(14, 2)
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", images.to(torch.uint8))
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz",
                  torch.randint(0, 10, (n,), generator=gen).to(torch.uint8))


def make_tiny_decoder_run(folder: Path) -> Path:
    """:func:`make_tiny_run` whose data are then replaced by :func:`write_block_mnist`'s,
    with a latent decoder trained on them (:data:`DECODER_FAST`) in ``RUN/decoder``.
    Tests must set ``IWM_DATA`` to ``folder / "fmnist"`` to read the same data."""
    from iwm.training.decoder import run_decoder

    run = make_tiny_run(folder)
    write_block_mnist(folder / "fmnist")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("IWM_DATA", str(folder / "fmnist"))
        run_decoder(run, DECODER_FAST, device="cpu", progress=False)
    return run


def copy_without_outputs(run: Path, folder: Path) -> Path:
    """A copy of ``run`` at ``folder / "run"`` without its results and report, so that a
    test sees only what it writes itself."""
    import shutil

    copy = folder / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("results", "report"))
    return copy
