"""The pretraining loop (:func:`pretrain`): one obvious path from batches to checkpoints.

    for step in range(start_step, total_steps):
        crops = batches.next()                  # shared crop + flip, on the device
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
  :mod:`iwm.training.signals`; Ctrl-C (SIGINT) the same, but
  :class:`~iwm.errors.Interrupted` (exit status 130), and a second Ctrl-C quits at once;
* SIGKILL / power loss: checkpoints are atomic, so the newest one is whole and ``--resume``
  continues from it (falling back to an older one, with a warning, if something else
  damaged it); rows the metrics logged after it are replaced by the resumed run's;
* full disk / unwritable run directory: :class:`~iwm.errors.CheckpointError` or
  :class:`~iwm.errors.StorageError`, the previous checkpoint untouched.

What it says (main process only, all of it silenced by ``train.progress=false``, through
:mod:`iwm.console`): the run directory and data at the start, then a progress bar on a
terminal or a plain line every ``train.log_every`` steps otherwise.
"""

from __future__ import annotations

import contextlib
import random
import signal
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from iwm.config import Config
from iwm.console import Progress, say
from iwm.data.datasets import FolderSet, ImageSet
from iwm.data.shard import Shard
from iwm.data.sources import (
    BatchSource,
    ShardBatchSource,
    StreamingBatchSource,
    make_source,
    resolve_num_workers,
)
from iwm.errors import CheckpointError, ConfigError, Interrupted, Preempted
from iwm.models.iwm import StepOutput
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
from iwm.training.metrics import TENSORBOARD_DIR, MetricsLogger, WandbRun, require_wandb
from iwm.training.monitors import CollapseAlarm, Measured, Monitor
from iwm.training.run_dir import CONFIG_FILE, save_run_config, writing
from iwm.training.signals import StopRequests
from iwm.training.state import restore_training_state, training_state
from iwm.training.step import Trainer, check_nonfinite


def pretrain(cfg: Config, run_dir: Path, resume: bool = False) -> Path:
    """Pretrain the model ``cfg`` describes into ``run_dir``; returns ``run_dir``.

    ``resume`` continues from the newest loadable checkpoint of ``run_dir`` (a run already
    at its last step is left as it is). Raises :class:`~iwm.errors.Preempted` after writing
    a checkpoint if SIGTERM or SIGUSR1 arrives, :class:`~iwm.errors.Interrupted` for a
    Ctrl-C (see :mod:`iwm.training.signals`), and :class:`~iwm.errors.IWMError` subclasses
    for everything the user can fix.
    """
    dist, device = init_distributed(cfg.train.device)
    try:
        _pretrain(cfg, run_dir, resume, dist, device)
    finally:
        cleanup_distributed()
    return run_dir


def _pretrain(cfg: Config, run_dir: Path, resume: bool, dist: DistInfo,
              device: torch.device) -> None:
    cfg.train.check_batch_split(dist.world_size)
    if "wandb" in cfg.train.logger:
        require_wandb()
    # From before the first (slow) set-up step, so that a stop requested during set-up is
    # honoured after the first training step instead of killing the process.
    with StopRequests(note=dist.is_main) as stop:
        _train(cfg, run_dir, resume, dist, device, stop)


def _train(cfg: Config, run_dir: Path, resume: bool, dist: DistInfo, device: torch.device,
           stop: StopRequests) -> None:
    _seed_global_rngs(cfg.train.seed + dist.rank)
    # One permutation and one stream of crops for the global batch, of which each rank
    # takes its rows: together the ranks see exactly what one process would. (Tar shards
    # are the exception: each rank reads its own, see iwm.data.sources.shard_plan.)
    batches = make_source(cfg.data, cfg.train.batch_size, device, seed=cfg.train.seed,
                          shard=Shard(dist.rank, dist.world_size))
    trainer = Trainer.create(cfg, channels=batches.channels, mean=batches.mean,
                             std=batches.std, device=device,
                             steps_per_epoch=batches.steps_per_epoch, dist=dist,
                             init_state=_init_state(cfg, run_dir, resume))
    talk = cfg.train.progress and dist.is_main
    start_step = _resume(run_dir, trainer, batches, dist, device, talk) if resume else 0
    if dist.is_main:
        save_run_config(cfg, run_dir)
    total_steps = trainer.schedules.total_steps
    if start_step >= total_steps:
        batches.close()
        more = _epochs_text(2 * cfg.train.epochs)
        say(f"{run_dir} is already complete at step {start_step}/{total_steps} (raise "
            f"train.epochs to train further, e.g. `iwm pretrain {run_dir} --resume "
            f"train.epochs={more}`)", talk)
        return
    if talk:
        watch = [f"`tensorboard --logdir {run_dir / TENSORBOARD_DIR}`"
                 ] if "tensorboard" in cfg.train.logger else []
        if "wandb" in cfg.train.logger:
            watch.append(f"W&B project {cfg.train.wandb_project}")
        say(f"run directory: {run_dir}" + (f"; watch it with {' or '.join(watch)}"
                                            if watch else ""))
        say(_data_summary(cfg, batches, total_steps))
    bar = Progress(total_steps, "pretrain", unit="step", initial=start_step, enabled=talk,
                   auto=False)
    with writing("metrics to", run_dir):
        # Resuming drops the rows a killed run logged after its checkpoint (the resumed
        # run logs those steps again); also when it had no checkpoint at all (step 0).
        logger = MetricsLogger(run_dir, enabled=dist.is_main,
                               resume_step=start_step if resume else None,
                               tensorboard="tensorboard" in cfg.train.logger,
                               wandb=_wandb_run(cfg, run_dir))
    monitor = Monitor.create(cfg)
    every = cfg.train.monitor_every
    if monitor is not None:
        say(f"monitors: rankme{', knn_acc' if monitor.bank is not None else ''} of the "
            f"target encoder on {monitor.source}, every {every} steps", talk)
    elif every:
        say("monitors: off (tar shards cannot be read by index; the loss, pred_std and "
            "target_std still watch for collapse)", talk)
    alarm = CollapseAlarm(enabled=dist.is_main)
    meter = _Throughput()
    trainer.model.train()
    with _closing(bar, batches, logger):
        for step in range(start_step, total_steps):
            # Host time spent getting the batch: on a GPU, which the host runs ahead of,
            # an upper bound on what the input pipeline costs (it may overlap queued work).
            asked = time.perf_counter()
            crops, _ = batches.next()
            meter.waited += time.perf_counter() - asked
            out, grad_norm = trainer.step(step, crops)
            meter.images += crops.shape[0] * dist.world_size
            bar.update(1)

            done = step + 1
            last = done == total_steps
            log_now = done % cfg.train.log_every == 0 or last
            save_now = done % cfg.train.checkpoint_every == 0 or last
            monitor_now = monitor is not None and (done % every == 0 or last)
            stopping = _stop_requested(stop, dist, device, agree=log_now)
            if not (log_now or save_now or stopping or monitor_now):
                continue  # the common case: no host sync

            skipped, longest = trainer.nonfinite.read()
            measured = (_monitor(trainer, monitor, device)
                        if monitor is not None and monitor_now else None)
            if log_now or measured is not None:
                row = (_metrics(trainer, batches, step, out, grad_norm, meter, skipped)
                       if log_now else {})
                if measured is not None:
                    row.update(measured.row())
                with writing("metrics to", logger.path):
                    logger.log(done, row)
                alarm.check(done, row.get("target_std"), measured)
                if log_now:
                    bar.log({"loss": f"{row['loss']:.4f}", "lr": f"{row['lr']:.2e}",
                             "img/s": f"{row['images_per_s']:.0f}"})
            # Before saving: a checkpoint never holds a run that should have stopped.
            check_nonfinite(skipped, longest, cfg.train.max_nonfinite, done)
            if save_now or stopping:
                _save(run_dir, trainer, batches, dist, done)
            if stopping and not last:
                written = (f"checkpoint {checkpoint_path(run_dir, done)} written; continue "
                           f"with `iwm pretrain {run_dir} --resume`")
                if stop.signal == signal.SIGINT:
                    raise Interrupted(f"interrupted at step {done}/{total_steps}, {written}",
                                      step=done)
                name = stop.signal.name if stop.signal else "a stop signal"
                raise Preempted(f"stopped by {name} at step {done}/{total_steps}, {written}",
                                step=done)


def _seed_global_rngs(seed: int) -> None:
    # Every global generator, not only torch's: a fresh run must not depend on what the
    # caller drew before, and the checkpoint captures (and resume restores) all three.
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _epochs_text(epochs: float) -> str:
    return f"{epochs:g}"


def _data_summary(cfg: Config, batches: BatchSource, total_steps: int) -> str:
    """One line: what is trained on, at which size, for how many steps."""
    data, size = batches.dataset, cfg.data.image_size
    channels = f"{data.channels} channel{'s' if data.channels != 1 else ''}"
    facts = [f"{len(data)} images", f"{len(data.classes)} classes", channels]
    crops = (f"random crops of {cfg.data.crop_scale[0]:.0%}-{cfg.data.crop_scale[1]:.0%} of "
             f"the area, resized to {size}x{size} (data.image_size)")
    if isinstance(data, FolderSet):
        native = _first_image_size(data)
        if native is not None and native != (size, size):
            facts.append(f"the first {native[1]}x{native[0]}")
            crops += "; images of another size are resized to it"
    elif isinstance(data, ImageSet):
        height, width = data.images.shape[-2:]
        facts.append(f"{width}x{height}")
    if isinstance(batches, StreamingBatchSource | ShardBatchSource):
        facts.append(f"{resolve_num_workers(cfg.data.num_workers)} decoding workers")
    return (f"data: {cfg.data.name} ({', '.join(facts)}); {crops}; "
            f"{batches.steps_per_epoch} steps per epoch, {total_steps} steps "
            f"({_epochs_text(cfg.train.epochs)} epochs of batch {cfg.train.batch_size})")


def _first_image_size(data: FolderSet) -> tuple[int, int] | None:
    """(height, width) of the folder's first image, from its header (cheap), if readable."""
    from PIL import Image

    try:
        with Image.open(data.samples[0][0]) as im:
            width, height = im.size
    except Exception:  # noqa: BLE001 - a summary only; training reports bad files itself
        return None
    return height, width


def _init_state(cfg: Config, run_dir: Path, resume: bool) -> dict[str, Tensor] | None:
    """The weights of ``model.init_from`` for a run starting at step 0; None for a run
    that resumes from a checkpoint of its own (the source may be gone by then)."""
    if cfg.model.init_from is None or (resume and latest_checkpoint(run_dir) is not None):
        return None
    from iwm.api import load

    try:
        return load(cfg.model.init_from).model.state_dict()
    except CheckpointError as e:
        raise CheckpointError(f"model.init_from: {e}") from None


def _resume(run_dir: Path, trainer: Trainer, batches: BatchSource, dist: DistInfo,
            device: torch.device, talk: bool) -> int:
    """Restore the newest loadable checkpoint of ``run_dir``; the step to start from."""
    loaded = load_latest_checkpoint(run_dir, map_location=device)
    if loaded is None:
        if not (run_dir / CONFIG_FILE).is_file():
            raise ConfigError(f"--resume: no checkpoint in {run_dir / 'checkpoints'}")
        # The run was stopped before its first checkpoint. Starting over is what the
        # user would do by hand; refusing would fail every requeue of the job.
        warnings.warn(f"--resume: {run_dir} has no checkpoint yet; starting it from step 0",
                      stacklevel=3)
        return 0
    path, state = loaded
    if dist.is_main and path == latest_checkpoint(run_dir):
        # A kill between a save and its pruning leaves one checkpoint too many; without
        # this, a second such kill after resuming would leave two. An older fallback
        # (newest damaged) is kept: it may be the only good one.
        prune_checkpoints(run_dir, trainer.cfg.train.keep_checkpoints)
    step = restore_training_state(state, trainer, batches, dist, str(path))
    say(f"resumed from step {step} (checkpoint {path})", talk)
    return step


def _stop_requested(stop: StopRequests, dist: DistInfo, device: torch.device,
                    agree: bool) -> bool:
    """Whether to stop after this step. Ranks get the signal at different steps but must
    stop at the same one; they agree at log steps (``agree``), where they sync anyway."""
    if dist.world_size == 1:
        return stop.requested
    if not agree:
        return False
    flag = torch.tensor(float(stop.requested), device=device)
    return all_reduce_mean(flag).item() > 0


@dataclass
class _Throughput:
    """Images trained and host time spent waiting for batches since the last log row."""

    images: int = 0
    waited: float = 0.0
    since: float = field(default_factory=time.perf_counter)

    def take(self) -> dict[str, float]:
        now = time.perf_counter()
        elapsed = max(now - self.since, 1e-9)
        rates = {"images_per_s": self.images / elapsed, "input_wait": self.waited / elapsed}
        self.images, self.waited, self.since = 0, 0.0, now
        return rates


def _metrics(trainer: Trainer, batches: BatchSource, step: int, out: StepOutput,
             grad_norm: Tensor, meter: _Throughput, skipped: int) -> dict[str, float]:
    """The metrics row of ``step``. Collective (the loss is averaged over ranks)."""
    rates = meter.take()
    loss, pred_std, target_std, gnorm = torch.stack([
        all_reduce_mean(out.loss.detach()).float(), out.pred_std.float(),
        out.target_std.float(), grad_norm.float()]).tolist()
    row = {
        "loss": loss,
        "lr": trainer.schedules.lr(step),
        "weight_decay": trainer.schedules.weight_decay(step),
        "ema": trainer.schedules.ema_momentum(step),
        "pred_std": pred_std, "target_std": target_std, "grad_norm": gnorm,
        **rates,
        "epoch": (step + 1) / batches.steps_per_epoch,
        "skipped_steps": skipped,
    }
    if batches.skipped:
        row["data_skipped"] = batches.skipped
    return row


def _wandb_run(cfg: Config, run_dir: Path) -> WandbRun | None:
    if "wandb" not in cfg.train.logger:
        return None
    return WandbRun(project=cfg.train.wandb_project, entity=cfg.train.wandb_entity,
                    name=cfg.train.run_name or run_dir.name, config=cfg.to_dict())


def _monitor(trainer: Trainer, monitor: Monitor, device: torch.device) -> Measured:
    return monitor.measure(trainer.model.target_encoder, trainer.normalize, device,
                           trainer.amp_dtype)


def _save(run_dir: Path, trainer: Trainer, batches: BatchSource, dist: DistInfo,
          step: int) -> None:
    state = training_state(trainer, batches, dist, step)  # collective: every rank calls it
    if dist.is_main:
        assert state is not None  # the main process always gets the checkpoint
        save_checkpoint(checkpoint_path(run_dir, step), state)
        prune_checkpoints(run_dir, trainer.cfg.train.keep_checkpoints)


@contextlib.contextmanager
def _closing(bar: Progress, batches: BatchSource, logger: MetricsLogger) -> Iterator[None]:
    """Close what the loop opened, however it ends; failing to close the metrics file is
    an error only when nothing failed before."""
    try:
        yield
    except BaseException:
        bar.close()
        batches.close()
        with contextlib.suppress(OSError):  # already failing; keep the first error
            logger.close()
        raise
    bar.close()
    batches.close()
    with writing("metrics to", logger.path):
        logger.close()
