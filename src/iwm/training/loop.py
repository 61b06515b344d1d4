"""The pretraining loop: one obvious path through a training step.

    crops  = source.next()                      # shared crop + flip, on the device
    # Trainer.step:
    views  = view_sampler(crops)                # target jitter; source jitter + destructive
    masks  = mask_generator(batch)              # multi-block context / targets, on the CPU
    loss   = model(source, target, action, masks)
    backward -> clip -> AdamW -> EMA

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
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from iwm.config import Config, load_config, save_config
from iwm.data.datasets import get_dataset
from iwm.data.masks import MultiBlockMaskGenerator, to_device
from iwm.data.normalize import Normalizer
from iwm.data.shard import Shard, take_rows
from iwm.data.sources import BatchSource, make_source
from iwm.data.views import ViewSampler, resolve_view_params
from iwm.errors import CheckpointError, ConfigError, Preempted, StorageError, TrainingError
from iwm.models.attention import resolve_attention, set_attention
from iwm.models.encoder_io import state_shapes_mismatch
from iwm.models.iwm import IWM, StepOutput, build_model
from iwm.training.checkpoint import (
    capture_rng_state,
    checkpoint_path,
    latest_checkpoint,
    load_latest_checkpoint,
    prune_checkpoints,
    restore_rng_state,
    save_checkpoint,
)
from iwm.training.distributed import (
    DistInfo,
    all_reduce_mean,
    cleanup_distributed,
    init_distributed,
)
from iwm.training.fsdp import (
    OPTIMIZER_FORMAT,
    full_state,
    full_tensor,
    load_full_state,
    shard_model,
)
from iwm.training.metrics import MetricsLogger
from iwm.training.schedules import Schedules
from iwm.training.signals import StopRequests

CONFIG_FILE = "config.yaml"


def new_run_dir(cfg: Config, config_name: str) -> Path:
    name = cfg.train.run_name or f"{config_name}-{datetime.now():%Y%m%d-%H%M%S}"
    return Path(cfg.train.out_dir) / name


def param_groups(model: IWM, predictor_lr_scale: float = 1.0) -> list[dict]:
    """Weight decay on matrices only; biases, norms and the mask token are not decayed.
    The predictor's groups train at ``predictor_lr_scale`` x the scheduled lr."""
    groups = []
    for module, scale in ((model.encoder, 1.0), (model.predictor, predictor_lr_scale)):
        decay, no_decay = [], []
        for p in module.parameters():
            if p.requires_grad:
                (decay if p.ndim >= 2 and p.shape[0] > 1 else no_decay).append(p)
        groups += [{"params": decay, "decay": True, "lr_scale": scale},
                   {"params": no_decay, "decay": False, "weight_decay": 0.0,
                    "lr_scale": scale}]
    return groups


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bf16 natively, i.e. faster than fp32: CUDA GPUs of compute
    capability 8.0 (Ampere) and newer, CPUs with AVX-512 BF16 or AMX. Elsewhere bf16 is
    emulated and slower than fp32."""
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= (8, 0)
    if device.type == "cpu":
        # Private probes (torch >= 2.1), hence the fallbacks: a torch without them answers no.
        probes = (getattr(torch.cpu, "_is_avx512_bf16_supported", None),
                  getattr(torch.cpu, "_is_amx_tile_supported", None))
        return any(bool(probe()) for probe in probes if probe is not None)
    return False


def autocast_dtype(cfg: Config, device: torch.device) -> torch.dtype | None:
    precision = cfg.train.precision
    if precision == "auto":
        # bf16 on GPUs that have it natively; CPUs stay fp32 (bit-stable across machines)
        # unless asked: the demo asks where native_bf16 says it pays.
        native = device.type == "cuda" and native_bf16(device)
        return torch.bfloat16 if native else None
    return torch.bfloat16 if precision == "bf16" else None


def _no_mark(phase: str) -> None:
    pass


@dataclass
class NonFiniteSteps:
    """Optimisation steps skipped because the loss or a gradient was NaN/inf.

    Device tensors, updated without being read back, so that counting adds no host sync to
    the step; the loop reads them where it syncs anyway (logging, checkpoints).
    """

    total: Tensor
    streak: Tensor
    """Skipped steps in a row, up to the latest step (0 after a good step)."""
    longest: Tensor
    """The longest streak so far: a streak that ended between two reads still counts."""

    KEYS = ("total", "streak", "longest")

    @classmethod
    def zeros(cls, device: torch.device) -> NonFiniteSteps:
        return cls(*(torch.zeros((), dtype=torch.int64, device=device) for _ in cls.KEYS))

    def update(self, ok: Tensor) -> None:
        bad = (~ok).long()
        self.total = self.total + bad
        self.streak = (self.streak + 1) * bad
        self.longest = torch.maximum(self.longest, self.streak)

    def read(self) -> tuple[int, int]:
        """``(total, longest)`` on the host (a sync)."""
        total, longest = torch.stack([self.total, self.longest]).tolist()
        return int(total), int(longest)

    def state_dict(self) -> dict[str, Tensor]:
        return {k: getattr(self, k) for k in self.KEYS}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        for k in self.KEYS:
            setattr(self, k, state[k].to(self.total.device, torch.int64))


@dataclass
class Trainer:
    """Everything one training step touches; :meth:`step` is the step.

    The benchmark drives the same object, so what it measures is what training runs.
    """

    cfg: Config
    model: IWM
    train_model: nn.Module
    """``model`` as the step calls it: wrapped in DDP and/or compiled when asked."""
    optimizer: torch.optim.Optimizer
    views: ViewSampler
    masks: MultiBlockMaskGenerator
    normalize: Normalizer
    generator: torch.Generator
    """Draws the views, on the training device; its state is checkpointed."""
    mask_generator: torch.Generator
    """Draws the masks, on the CPU: their sizes are read on the host, which on a GPU would
    wait for the queued kernels every step. Drawn on the CPU and copied asynchronously,
    the masks of step i are made while the GPU still runs step i - 1. Checkpointed."""
    schedules: Schedules
    amp_dtype: torch.dtype | None
    nonfinite: NonFiniteSteps
    shard: Shard
    """This process's part of every global batch (rank of world size)."""
    ddp: nn.parallel.DistributedDataParallel | None
    """The DDP wrapper (inside ``train_model``), for skipping the all-reduce of all but
    the last micro-batch."""
    fsdp: bool
    """``model`` is sharded with FSDP (its tensors are DTensors)."""

    @classmethod
    def create(cls, cfg: Config, *, channels: int, mean: tuple[float, ...],
               std: tuple[float, ...], device: torch.device, steps_per_epoch: int,
               dist: DistInfo | None = None) -> Trainer:
        dist = dist or DistInfo()
        model = build_model(cfg, channels).to(device)
        set_attention(model, resolve_attention(cfg.train.attention, device))
        fsdp = dist.world_size > 1 and cfg.train.data_parallel == "fsdp"
        if fsdp:
            shard_model(model)  # before the optimiser, which must see the sharded tensors
        generator = torch.Generator(device=device)
        # The same stream on every rank: views and masks are drawn for the global batch.
        generator.manual_seed(cfg.train.seed * 7919)
        mask_generator = torch.Generator().manual_seed(cfg.train.seed * 7919 + 1)
        # Fused on every device (CPU too, torch >= 2.4): the fused kernel is the one that
        # honours ``found_inf``, which is how :meth:`step` skips a non-finite update
        # without a host sync.
        optimizer = torch.optim.AdamW(param_groups(model, cfg.optim.predictor_lr_scale),
                                      lr=cfg.optim.lr,
                                      betas=cfg.optim.betas,
                                      weight_decay=cfg.optim.weight_decay, fused=True)
        train_model: nn.Module = model
        ddp = None
        if dist.world_size > 1 and not fsdp:
            train_model = ddp = nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None)
        if cfg.train.compile:
            # Compilation itself happens at the first forward (and at recompiles), where
            # :meth:`_forward` falls back to the uncompiled model if it fails; here only
            # an interpreter torch.compile does not support can fail.
            try:
                train_model = torch.compile(train_model)
            except Exception as e:  # noqa: BLE001 - compiling is an optimisation, never fatal
                warnings.warn(f"torch.compile unavailable ({e}); training uncompiled",
                              RuntimeWarning, stacklevel=2)
        return cls(
            cfg=cfg, model=model, train_model=train_model, optimizer=optimizer,
            views=ViewSampler(resolve_view_params(cfg.views), channels, cfg.data.image_size),
            masks=MultiBlockMaskGenerator(model.encoder.grid, cfg.mask),
            normalize=Normalizer.create(mean, std, device), generator=generator,
            mask_generator=mask_generator,
            schedules=Schedules.for_run(cfg.optim, cfg.train.epochs, steps_per_epoch),
            amp_dtype=autocast_dtype(cfg, device), nonfinite=NonFiniteSteps.zeros(device),
            shard=Shard(dist.rank, dist.world_size), ddp=ddp, fsdp=fsdp,
        )

    def step(self, step: int, crops: Tensor, mark: Callable[[str], None] = _no_mark
             ) -> tuple[StepOutput, Tensor]:
        """One optimisation step on a batch of crops; returns the output and grad norm.

        ``crops`` are this process's rows of the global batch (:attr:`shard`); views and
        masks are drawn for the global batch and sliced, and the loss is normalised by the
        global batch's target count, so that any number of processes and micro-batches
        (``train.grad_accum_steps``) make the same update as one process with the whole
        batch. The returned loss is this process's share (all-reduce-mean it for the
        global batch's loss).

        A step whose loss or gradient norm is not finite changes nothing: not the weights,
        not the optimiser state (moments, step count), not the EMA. It still consumes its
        batch and random draws, so a run stays reproducible. It is counted in
        :attr:`nonfinite`. The decision never leaves the device: the fused AdamW skips its
        whole update when its ``found_inf`` is 1 (the hook ``GradScaler`` uses), and the
        EMA moves by a weight that is 0 on such a step.

        ``mark(phase)`` is called after each phase (data, forward, backward, optimizer, ema)
        so a benchmark can time them; training passes nothing.
        """
        lr, wd = self.schedules.lr(step), self.schedules.weight_decay(step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"]
            if group["decay"]:
                group["weight_decay"] = wd
        local, world = crops.shape[0], self.shard.count
        v = self.views(crops, self.generator, self.shard)
        masks = self.masks(local * world, self.mask_generator, "cpu")
        # Every rank and micro-batch divides by the same global count; DDP then averages
        # over ranks, hence the division.
        denominator = to_device(masks.target_valid.sum().float() / world, crops.device,
                                non_blocking=True)
        masks = take_rows(masks, self.shard.rows(local)).to(crops.device, non_blocking=True)
        source, target = self.normalize(v.source), self.normalize(v.target)
        mark("data")
        autocast = (torch.autocast(crops.device.type, dtype=self.amp_dtype) if self.amp_dtype
                    else contextlib.nullcontext())
        self.optimizer.zero_grad(set_to_none=True)
        micro = self.cfg.train.grad_accum_steps
        size = local // micro
        loss = torch.zeros((), device=crops.device)
        for i in range(micro):
            rows = slice(i * size, (i + 1) * size)
            last = i == micro - 1
            sync = (self.ddp.no_sync() if self.ddp is not None and not last
                    else contextlib.nullcontext())
            if self.fsdp:
                self.model.set_requires_gradient_sync(last)  # type: ignore[operator]
            with sync:
                with autocast:
                    out = self._forward(source[rows], target[rows], v.action[rows],
                                        take_rows(masks, rows), denominator)
                mark("forward")
                out.loss.backward()
                mark("backward")
            loss = loss + out.loss.detach()
        out = StepOutput(loss=loss, pred_std=out.pred_std, target_std=out.target_std)
        # The norm is needed anyway to detect non-finite gradients; without clipping,
        # max_norm=inf only measures it (the scale factor clamps to exactly 1).
        grad_norm = full_tensor(nn.utils.clip_grad_norm_(
            self.model.parameters(), self.cfg.optim.grad_clip or float("inf")))
        ok = torch.isfinite(out.loss.detach()) & torch.isfinite(grad_norm)
        # Under DDP the gradients agree across ranks but the losses do not: all ranks must
        # skip together or their weights drift apart. (Single process: no-op.)
        ok = all_reduce_mean((~ok).float()) == 0
        self.optimizer.found_inf = (~ok).float()  # type: ignore[attr-defined]
        self.optimizer.step()
        mark("optimizer")
        # A skipped step must not move the EMA either, or resuming would not match.
        self.model.update_target(self.schedules.ema_momentum(step), ok)
        self.nonfinite.update(ok)
        mark("ema")
        return out, grad_norm

    def _forward(self, *args: Any) -> StepOutput:
        try:
            return self.train_model(*args)
        except torch._dynamo.exc.TorchDynamoException as e:
            eager = getattr(self.train_model, "_orig_mod", None)
            if eager is None:  # not compiled: a real error
                raise
            # Compiling is an optimisation, never fatal (no C compiler for Triton, an op
            # Inductor lacks, ...); the failed forward left no gradients behind, so the
            # micro-batch reruns uncompiled and so does the rest of the run. A genuine
            # error in the model raises again, uncompiled.
            reason = (str(e).strip().splitlines() or [""])[0][:300]
            warnings.warn(f"torch.compile failed ({type(e).__name__}: {reason}); training "
                          "continues uncompiled (train.compile=false avoids the attempt)",
                          RuntimeWarning, stacklevel=2)
            self.train_model = eager
            return self.train_model(*args)

    def state_dict(self) -> dict:
        """Full tensors on the main process. Collective under FSDP (every rank calls it;
        the other ranks get empty model and optimiser entries)."""
        common = {"generator": self.generator.get_state(),
                  "mask_generator": self.mask_generator.get_state(),
                  "nonfinite": self.nonfinite.state_dict()}
        if self.fsdp:
            model, optimizer = full_state(self.model, self.optimizer)
            return {"model": model, "optimizer": optimizer,
                    "optimizer_format": OPTIMIZER_FORMAT, **common}
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                **common}

    def load_state_dict(self, state: dict, where: str = "the checkpoint") -> None:
        """Restore :meth:`state_dict`; a :class:`CheckpointError` naming what does not fit
        if ``state`` comes from another model configuration."""
        for key in ("model", "optimizer", "generator"):
            if key not in state:
                raise CheckpointError(f"{where} is not an iwm training checkpoint (no '{key}')")
        mismatch = state_shapes_mismatch(self.model.state_dict(), state["model"])
        if mismatch:
            raise CheckpointError(
                f"{where} was written by another model configuration ({mismatch}); resume "
                "with the run's own model.* settings"
            )
        if (state.get("optimizer_format") == OPTIMIZER_FORMAT) != self.fsdp:
            raise CheckpointError(
                f"{where} was written with train.data_parallel="
                f"{'fsdp' if not self.fsdp else 'ddp (or one process)'}; resume it the same "
                "way")
        try:
            if self.fsdp:
                load_full_state(self.model, self.optimizer, state["model"], state["optimizer"])
            else:
                self.model.load_state_dict(state["model"])
                self.optimizer.load_state_dict(state["optimizer"])
            self.generator.set_state(state["generator"].cpu())
            if "mask_generator" in state:
                self.mask_generator.set_state(state["mask_generator"].cpu())
        except (ValueError, RuntimeError, KeyError) as e:
            raise CheckpointError(f"{where}: optimiser or random state does not fit this run "
                                  f"({type(e).__name__}: {e})") from None
        if "nonfinite" in state:
            self.nonfinite.load_state_dict(state["nonfinite"])


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


@contextlib.contextmanager
def _writing(what: str, path: Path) -> Iterator[None]:
    """Turn a failed write into a one-line :class:`StorageError` naming the file."""
    try:
        yield
    except OSError as e:
        raise StorageError(
            f"cannot write {what} {path}: {e.strerror or e}; free disk space or fix the "
            "directory's permissions (checkpoints already written are unchanged)"
        ) from None


def _check_nonfinite(total: int, longest: int, limit: int, done: int) -> None:
    """Stop training if ``limit`` steps in a row were skipped as non-finite."""
    if longest >= limit:
        raise TrainingError(
            f"training diverged: {longest} steps in a row had a NaN/inf loss or gradients "
            f"(train.max_nonfinite={limit}; {total} skipped by step {done}); lower optim.lr "
            "or set optim.grad_clip, then continue from the last checkpoint with "
            "`iwm pretrain RUN --resume optim.lr=...`"
        )


def _pretrain(cfg: Config, run_dir: Path, resume: bool, dist: DistInfo,
              device: torch.device) -> None:
    cfg.train.check_batch_split(dist.world_size)
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
            trainer.load_state_dict(state, str(path))
            mine = _own_rank_state(state, dist, path)
            trainer.generator.set_state(mine["generator"].cpu())
            if "mask_generator" in mine:
                trainer.mask_generator.set_state(mine["mask_generator"].cpu())
            source.load_state_dict(mine["source"])
            restore_rng_state(mine["rng"])
            start_step = int(state["step"])

    if dist.is_main:
        with _writing("the run's config", run_dir / CONFIG_FILE):
            run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, run_dir / CONFIG_FILE)

    def checkpoint_state(step: int, ranks: list[dict], trained: dict) -> dict:
        return {
            **trained,
            **ranks[0],
            "ranks": ranks,
            "step": step,
            "config": cfg.to_dict(),
            "in_chans": source.channels,
            "normalization": {"mean": [float(v) for v in source.mean],
                              "std": [float(v) for v in source.std]},
        }

    bar = tqdm(total=total_steps, initial=start_step, desc="pretrain", unit="step",
               disable=not (cfg.train.progress and dist.is_main), dynamic_ncols=True)
    with _writing("metrics to", run_dir):
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
                with _writing("metrics to", logger.path):
                    logger.log(done, values)
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{values['lr']:.2e}",
                                img_s=f"{values['images_per_s']:.0f}")
                tick, images_since, input_wait = now, 0, 0.0
            # Before saving: a checkpoint never holds a run that should have stopped.
            _check_nonfinite(skipped, longest, cfg.train.max_nonfinite, done)
            if save_now or stopping:
                # Every rank takes part in both (gathers; FSDP's full state is collective).
                ranks = _gather_rank_states(trainer, source, dist)
                trained = trainer.state_dict()
                if dist.is_main:
                    path = checkpoint_path(run_dir, done)
                    save_checkpoint(path, checkpoint_state(done, ranks, trained))
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
    with _writing("metrics to", logger.path):
        logger.close()


def _gather_rank_states(trainer: Trainer, source: BatchSource, dist: DistInfo) -> list[dict]:
    """Every rank's view/mask generator, data position and global RNGs. The first two
    are the same on every rank (draws are made for the global batch); the global RNGs
    (seeded per rank: drop-path) differ, and each rank resumes its own."""
    local = {"generator": trainer.generator.get_state(),
             "mask_generator": trainer.mask_generator.get_state(), "source": source.state_dict(),
             "rng": capture_rng_state()}
    if dist.world_size == 1:
        return [local]
    gathered: list = [None] * dist.world_size
    torch.distributed.all_gather_object(gathered, local)
    return gathered


def _own_rank_state(state: dict, dist: DistInfo, path: Path) -> dict:
    ranks = state.get("ranks")
    if ranks is None:  # written before per-rank states were kept
        return state
    if len(ranks) != dist.world_size:
        raise CheckpointError(
            f"{path} was written by {len(ranks)} processes; resume it with the same number "
            f"(this run has {dist.world_size})"
        )
    return ranks[dist.rank]


def load_run_config(run_dir: Path, overrides: list[str] | None = None) -> Config:
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        raise ConfigError(f"{run_dir} is not a run directory (no {CONFIG_FILE})")
    return load_config(path, overrides)
