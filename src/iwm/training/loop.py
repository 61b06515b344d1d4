"""The pretraining loop (:func:`pretrain`): one obvious path from batches to checkpoints.

    for step in range(start_step, total_steps):
        crops = source.next()                   # shared crop + flip, on the device
        trainer.step(step, crops)               # iwm.training.step
        log at log_every, checkpoint at checkpoint_every, stop when asked to

Schedules are functions of the step, all randomness comes from generators whose state
is checkpointed, so ``--resume`` continues the same run instead of replaying it.

Faults, and what each costs:

* a step whose loss or gradients are NaN/inf is skipped exactly (weights, optimiser state
  and EMA untouched) and counted (``skipped_steps`` in the metrics); ``train.max_nonfinite``
  such steps in a row stop training with a :class:`~iwm.errors.TrainingError`. The check
  is read at log and checkpoint steps, the only host syncs, so the stop comes at the first
  of those after the limit is reached;
* SIGTERM / SIGUSR1: the current step finishes, a checkpoint is written and
  :class:`~iwm.errors.Preempted` is raised (CLI exit status 75), see
  :mod:`iwm.training.signals`;
* SIGKILL / power loss: checkpoints are atomic, so the newest one is whole and ``--resume``
  continues from it (falling back to an older one, with a warning, if something else
  damaged it); rows the metrics logged after it are replaced by the resumed run's;
* full disk / unwritable run directory: :class:`~iwm.errors.CheckpointError` or
  :class:`~iwm.errors.StorageError`, the previous checkpoint untouched.
"""

from __future__ import annotations

import contextlib
import random
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from iwm.config import Config
from iwm.data.datasets import get_dataset
from iwm.data.shard import Shard
from iwm.data.sources import make_source
from iwm.errors import ConfigError, Preempted
from iwm.training.checkpoint import (
    checkpoint_path,
    latest_checkpoint,
    load_latest_checkpoint,
    prune_checkpoints,
    save_checkpoint,
)
from iwm.training.distributed import (
    DistInfo,
    all_reduce_mean,
    cleanup_distributed,
    init_distributed,
)
from iwm.training.metrics import MetricsLogger
from iwm.training.run_dir import CONFIG_FILE, save_run_config, writing
from iwm.training.signals import StopRequests
from iwm.training.state import restore_training_state, training_state
from iwm.training.step import Trainer, check_nonfinite


def pretrain(cfg: Config, run_dir: Path, resume: bool = False) -> Path:
    """Pretrain the model ``cfg`` describes into ``run_dir``; returns ``run_dir``.

    ``resume`` continues from the newest loadable checkpoint of ``run_dir``. Raises
    :class:`~iwm.errors.Preempted` after writing a checkpoint if SIGTERM or SIGUSR1 arrives
    (see :mod:`iwm.training.signals`), and :class:`~iwm.errors.IWMError` subclasses for
    everything the user can fix.
    """
    dist, device = init_distributed(cfg.train.device)
    try:
        _pretrain(cfg, run_dir, resume, dist, device)
    finally:
        cleanup_distributed()
    return run_dir


def _pretrain(cfg: Config, run_dir: Path, resume: bool, dist: DistInfo,
              device: torch.device) -> None:
    parts = dist.world_size * cfg.train.grad_accum_steps
    if cfg.train.batch_size % parts:
        raise ConfigError(
            f"train.batch_size={cfg.train.batch_size} (the global batch) cannot be split evenly "
            f"over {dist.world_size} process(es) x train.grad_accum_steps="
            f"{cfg.train.grad_accum_steps}: use a multiple of {parts}")
    # From before the first (slow) set-up step, so that a stop requested during set-up is
    # honoured after the first training step instead of killing the process.
    with StopRequests() as stop:
        _train(cfg, run_dir, resume, dist, device, stop)


def _train(cfg: Config, run_dir: Path, resume: bool, dist: DistInfo, device: torch.device,
           stop: StopRequests) -> None:
    # Every global generator, not only torch's: a fresh run must not depend on what the
    # caller drew before, and the checkpoint captures (and resume restores) all three.
    random.seed(cfg.train.seed + dist.rank)
    np.random.seed(cfg.train.seed + dist.rank)
    torch.manual_seed(cfg.train.seed + dist.rank)
    dataset = get_dataset(cfg.data.name, "train", cfg.data.root)
    # One permutation and one stream of crops for the global batch, of which each rank
    # takes its rows: together the ranks see exactly what one process would.
    source = make_source(cfg.data, cfg.train.batch_size, device, seed=cfg.train.seed,
                         dataset=dataset, shard=Shard(dist.rank, dist.world_size))
    steps_per_epoch = source.steps_per_epoch
    trainer = Trainer.create(cfg, channels=source.channels, mean=source.mean, std=source.std,
                             device=device, steps_per_epoch=steps_per_epoch, dist=dist)
    total_steps = trainer.schedules.total_steps

    start_step = 0
    if resume:
        loaded = load_latest_checkpoint(run_dir, map_location=device)
        if loaded is None:
            if not (run_dir / CONFIG_FILE).is_file():
                raise ConfigError(f"--resume: no checkpoint in {run_dir / 'checkpoints'}")
            # The run was stopped before its first checkpoint. Starting over is what the
            # user would do by hand; refusing would fail every requeue of the job.
            warnings.warn(f"--resume: {run_dir} has no checkpoint yet; starting it from step 0",
                          stacklevel=2)
        else:
            path, state = loaded
            if dist.is_main and path == latest_checkpoint(run_dir):
                # A kill between a save and its pruning leaves one checkpoint too many;
                # without this, a second such kill after resuming would leave two. An
                # older fallback (newest damaged) is kept: it may be the only good one.
                prune_checkpoints(run_dir, cfg.train.keep_checkpoints)
            start_step = restore_training_state(state, trainer, source, dist, str(path))

    if dist.is_main:
        save_run_config(cfg, run_dir)

    bar = tqdm(total=total_steps, initial=start_step, desc="pretrain", unit="step",
               disable=not (cfg.train.progress and dist.is_main), dynamic_ncols=True)
    with writing("metrics to", run_dir):
        # Resuming drops the rows a killed run logged after its checkpoint (the resumed
        # run logs those steps again); also when it had no checkpoint at all (step 0).
        logger = MetricsLogger(run_dir, enabled=dist.is_main,
                               resume_step=start_step if resume else None)
    trainer.model.train()
    tick, images_since, input_wait = time.perf_counter(), 0, 0.0
    try:
        for step in range(start_step, total_steps):
            # Host time spent getting the batch: on a GPU, which the host runs ahead of,
            # an upper bound on what the input pipeline costs (it may overlap queued work).
            asked = time.perf_counter()
            crops, _ = source.next()
            input_wait += time.perf_counter() - asked
            out, grad_norm = trainer.step(step, crops)
            images_since += crops.shape[0] * dist.world_size
            bar.update(1)

            done = step + 1
            last = done == total_steps
            log_now = done % cfg.train.log_every == 0 or last
            save_now = done % cfg.train.checkpoint_every == 0 or last
            if dist.world_size == 1:
                stopping = stop.requested
            elif log_now:
                # Ranks get the signal at different steps but must stop at the same one;
                # they agree at log steps, where they synchronise anyway.
                flag = torch.tensor(float(stop.requested), device=device)
                stopping = all_reduce_mean(flag).item() > 0
            else:
                stopping = False
            if not (log_now or save_now or stopping):
                continue  # the common case: no host sync

            skipped, longest = trainer.nonfinite.read()
            if log_now:
                now = time.perf_counter()
                loss, pred_std, target_std, gnorm = torch.stack([
                    all_reduce_mean(out.loss.detach()).float(), out.pred_std.float(),
                    out.target_std.float(), grad_norm.float()]).tolist()
                values = {
                    "loss": loss,
                    "lr": trainer.schedules.lr(step),
                    "weight_decay": trainer.schedules.weight_decay(step),
                    "ema": trainer.schedules.ema_momentum(step),
                    "pred_std": pred_std, "target_std": target_std, "grad_norm": gnorm,
                    "images_per_s": images_since / max(now - tick, 1e-9),
                    "input_wait": input_wait / max(now - tick, 1e-9),
                    "epoch": done / steps_per_epoch,
                    "skipped_steps": skipped,
                }
                if source.skipped:
                    values["data_skipped"] = source.skipped
                with writing("metrics to", logger.path):
                    logger.log(done, values)
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{values['lr']:.2e}",
                                img_s=f"{values['images_per_s']:.0f}")
                tick, images_since, input_wait = now, 0, 0.0
            # Before saving: a checkpoint never holds a run that should have stopped.
            check_nonfinite(skipped, longest, cfg.train.max_nonfinite, done)
            if save_now or stopping:
                # Collective: every rank takes part, the main process writes.
                state = training_state(trainer, source, dist, done)
                if dist.is_main:
                    save_checkpoint(checkpoint_path(run_dir, done), state)
                    prune_checkpoints(run_dir, cfg.train.keep_checkpoints)
            if stopping and not last:
                name = stop.signal.name if stop.signal else "a stop signal"
                raise Preempted(
                    f"stopped by {name} at step {done}/{total_steps}, checkpoint "
                    f"{checkpoint_path(run_dir, done)} written; continue with "
                    f"`iwm pretrain {run_dir} --resume`", step=done)
    except BaseException:
        bar.close()
        source.close()
        with contextlib.suppress(OSError):  # already failing; keep the first error
            logger.close()
        raise
    bar.close()
    source.close()
    with writing("metrics to", logger.path):
        logger.close()

