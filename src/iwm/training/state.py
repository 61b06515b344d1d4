"""What a training checkpoint holds: assembled by :func:`training_state`, restored by
:func:`restore_training_state`, and nowhere else.

    model, optimizer, [optimizer_format]   full tensors; "fqn" marks FSDP's optimiser keys
    nonfinite                              the skipped-step counters
    ranks[r]                               rank r's view and mask generators, data position
                                           and global RNGs
    step, config, in_chans, normalization  also what :func:`iwm.api.load` reads

Writing and reading the file is :mod:`iwm.training.checkpoint`'s job.
"""

from __future__ import annotations

from typing import Any

import torch

from iwm.data.sources import BatchSource
from iwm.errors import CheckpointError
from iwm.models.encoder_io import state_shapes_mismatch
from iwm.training.checkpoint import capture_rng_state, restore_rng_state
from iwm.training.distributed import DistInfo
from iwm.training.fsdp import OPTIMIZER_FORMAT, full_state, load_full_state
from iwm.training.step import Trainer

REQUIRED = ("model", "optimizer", "nonfinite", "ranks", "step")


def training_state(trainer: Trainer, batches: BatchSource, dist: DistInfo,
                   step: int) -> dict[str, Any] | None:
    """The checkpoint of ``step`` on the main process, ``None`` on the others.

    Collective: every rank calls it (the rank states are gathered, and FSDP's full state
    is too).
    """
    ranks = _gather(_rank_state(trainer, batches), dist)
    if trainer.fsdp:
        model, optimizer = full_state(trainer.model, trainer.optimizer)
        trained = {"model": model, "optimizer": optimizer, "optimizer_format": OPTIMIZER_FORMAT}
    else:
        trained = {"model": trainer.model.state_dict(),
                   "optimizer": trainer.optimizer.state_dict()}
    if not dist.is_main:
        return None
    return {
        **trained,
        "nonfinite": trainer.nonfinite.state_dict(),
        "ranks": ranks,
        "step": step,
        "config": trainer.cfg.to_dict(),
        "in_chans": batches.channels,
        "normalization": {"mean": [float(v) for v in batches.mean],
                          "std": [float(v) for v in batches.std]},
    }


def restore_training_state(state: dict[str, Any], trainer: Trainer, batches: BatchSource,
                           dist: DistInfo, where: str = "the checkpoint") -> int:
    """Put this rank's part of ``state`` back; returns the step it was written at.

    A :class:`CheckpointError` naming what does not fit if ``state`` comes from another
    model configuration, data-parallel mode or number of processes.
    """
    for key in REQUIRED:
        if key not in state:
            raise CheckpointError(f"{where} is not an iwm training checkpoint (no '{key}')")
    mismatch = state_shapes_mismatch(trainer.model.state_dict(), state["model"])
    if mismatch:
        raise CheckpointError(
            f"{where} was written by another model configuration ({mismatch}); resume "
            "with the run's own model.* settings"
        )
    if (state.get("optimizer_format") == OPTIMIZER_FORMAT) != trainer.fsdp:
        raise CheckpointError(
            f"{where} was written with train.data_parallel="
            f"{'fsdp' if not trainer.fsdp else 'ddp (or one process)'}; resume it the same "
            "way")
    ranks = state["ranks"]
    if len(ranks) != dist.world_size:
        raise CheckpointError(
            f"{where} was written by {len(ranks)} processes; resume it with the same number "
            f"(this run has {dist.world_size})"
        )
    mine = ranks[dist.rank]
    try:
        if trainer.fsdp:
            load_full_state(trainer.model, trainer.optimizer, state["model"], state["optimizer"])
        else:
            trainer.model.load_state_dict(state["model"])
            trainer.optimizer.load_state_dict(state["optimizer"])
        trainer.view_rng.set_state(mine["generator"].cpu())
        trainer.mask_rng.set_state(mine["mask_generator"].cpu())
    except (ValueError, RuntimeError, KeyError) as e:
        raise CheckpointError(f"{where}: optimiser or random state does not fit this run "
                              f"({type(e).__name__}: {e})") from None
    trainer.nonfinite.load_state_dict(state["nonfinite"])
    batches.load_state_dict(mine["source"])
    restore_rng_state(mine["rng"])
    return int(state["step"])


def _rank_state(trainer: Trainer, batches: BatchSource) -> dict[str, Any]:
    # The generators and the data position are the same on every rank (draws are made for
    # the global batch); the global RNGs are seeded per rank (drop-path) and differ. The
    # keys keep their first names so that existing checkpoints resume.
    return {"generator": trainer.view_rng.get_state(),
            "mask_generator": trainer.mask_rng.get_state(),
            "source": batches.state_dict(), "rng": capture_rng_state()}


def _gather(local: dict[str, Any], dist: DistInfo) -> list[dict[str, Any]]:
    if dist.world_size == 1:
        return [local]
    gathered: list = [None] * dist.world_size
    torch.distributed.all_gather_object(gathered, local)
    return gathered
