"""The pretraining loop: one obvious path through a training step.

    crops  = source.next()                      # shared crop + flip, on the device
    # Trainer.step:
    views  = view_sampler(crops)                # target jitter; source jitter + destructive
    masks  = mask_generator(batch)              # multi-block context / targets
    loss   = model(source, target, action, masks)
    backward -> clip -> AdamW -> EMA

Schedules are functions of the step, all randomness comes from generators whose state
is checkpointed, so ``--resume`` continues the same run instead of replaying it.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from iwm.config import Config, load_config, save_config
from iwm.data.datasets import get_dataset
from iwm.data.masks import MultiBlockMaskGenerator
from iwm.data.sources import make_source
from iwm.data.views import ViewSampler, resolve_view_params
from iwm.errors import ConfigError
from iwm.models.iwm import IWM, StepOutput, build_model
from iwm.training.checkpoint import (
    capture_rng_state,
    checkpoint_path,
    latest_checkpoint,
    load_checkpoint,
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
from iwm.training.metrics import MetricsLogger
from iwm.training.schedules import Schedules

CONFIG_FILE = "config.yaml"


@dataclass
class Normalizer:
    """Per-channel normalisation of [0, 1] images, stored with the model."""

    mean: Tensor
    std: Tensor

    @classmethod
    def create(cls, mean: tuple[float, ...], std: tuple[float, ...], device: torch.device
               ) -> Normalizer:
        return cls(torch.tensor(mean, device=device).view(1, -1, 1, 1),
                   torch.tensor(std, device=device).view(1, -1, 1, 1))

    def __call__(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std


def new_run_dir(cfg: Config, config_name: str) -> Path:
    name = cfg.train.run_name or f"{config_name}-{datetime.now():%Y%m%d-%H%M%S}"
    return Path(cfg.train.out_dir) / name


def param_groups(model: IWM) -> list[dict]:
    """Weight decay on matrices only; biases, norms and the mask token are not decayed."""
    decay, no_decay = [], []
    for module in (model.encoder, model.predictor):
        for p in module.parameters():
            if p.requires_grad:
                (decay if p.ndim >= 2 and p.shape[0] > 1 else no_decay).append(p)
    return [{"params": decay, "decay": True}, {"params": no_decay, "decay": False,
                                               "weight_decay": 0.0}]


def autocast_dtype(cfg: Config, device: torch.device) -> torch.dtype | None:
    precision = cfg.train.precision
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return torch.bfloat16 if precision == "bf16" else None


def _no_mark(phase: str) -> None:
    pass


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
    """Draws views and masks; its state is checkpointed."""
    schedules: Schedules
    amp_dtype: torch.dtype | None

    @classmethod
    def create(cls, cfg: Config, *, channels: int, mean: tuple[float, ...],
               std: tuple[float, ...], device: torch.device, steps_per_epoch: int,
               dist: DistInfo | None = None) -> Trainer:
        dist = dist or DistInfo()
        model = build_model(cfg, channels).to(device)
        generator = torch.Generator(device=device)
        generator.manual_seed(cfg.train.seed * 7919 + dist.rank)
        optimizer = torch.optim.AdamW(param_groups(model), lr=cfg.optim.lr,
                                      betas=cfg.optim.betas,
                                      weight_decay=cfg.optim.weight_decay,
                                      fused=device.type == "cuda")
        train_model: nn.Module = model
        if dist.world_size > 1:
            train_model = nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None)
        if cfg.train.compile:
            try:
                train_model = torch.compile(train_model)
            except Exception as e:  # noqa: BLE001 - compiling is an optimisation, never fatal
                print(f"torch.compile failed ({e}); continuing uncompiled")
        return cls(
            cfg=cfg, model=model, train_model=train_model, optimizer=optimizer,
            views=ViewSampler(resolve_view_params(cfg.views), channels, cfg.data.image_size),
            masks=MultiBlockMaskGenerator(model.encoder.grid, cfg.mask),
            normalize=Normalizer.create(mean, std, device), generator=generator,
            schedules=Schedules.for_run(cfg.optim, cfg.train.epochs, steps_per_epoch),
            amp_dtype=autocast_dtype(cfg, device),
        )

    def step(self, step: int, crops: Tensor, mark: Callable[[str], None] = _no_mark
             ) -> tuple[StepOutput, Tensor | None]:
        """One optimisation step on a batch of crops; returns the output and grad norm.

        ``mark(phase)`` is called after each phase (data, forward, backward, optimizer, ema)
        so a benchmark can time them; training passes nothing.
        """
        lr, wd = self.schedules.lr(step), self.schedules.weight_decay(step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
            if group["decay"]:
                group["weight_decay"] = wd
        v = self.views(crops, self.generator)
        m = self.masks(crops.shape[0], self.generator, crops.device)
        mark("data")
        autocast = (torch.autocast(crops.device.type, dtype=self.amp_dtype) if self.amp_dtype
                    else contextlib.nullcontext())
        with autocast:
            out = self.train_model(self.normalize(v.source), self.normalize(v.target),
                                   v.action, m)
        mark("forward")
        self.optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        mark("backward")
        grad_norm = None
        if self.cfg.optim.grad_clip:
            grad_norm = nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip)
        self.optimizer.step()
        mark("optimizer")
        self.model.update_target(self.schedules.ema_momentum(step))
        mark("ema")
        return out, grad_norm

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"].cpu())


def pretrain(cfg: Config, run_dir: Path, resume: bool = False) -> Path:
    """Pretrain the model ``cfg`` describes into ``run_dir``; returns ``run_dir``."""
    dist, device = init_distributed(cfg.train.device)
    try:
        _pretrain(cfg, run_dir, resume, dist, device)
    finally:
        cleanup_distributed()
    return run_dir


def _pretrain(cfg: Config, run_dir: Path, resume: bool, dist: DistInfo,
              device: torch.device) -> None:
    if cfg.train.batch_size % dist.world_size:
        raise ConfigError(f"train.batch_size={cfg.train.batch_size} is not divisible by the "
                          f"{dist.world_size} processes")
    torch.manual_seed(cfg.train.seed + dist.rank)
    dataset = get_dataset(cfg.data.name, "train", cfg.data.root)
    # Each rank draws its own random batches (seed offset by rank): for random-sampling
    # SSL this is statistically equivalent to sharding one permutation.
    source = make_source(cfg.data, cfg.train.batch_size // dist.world_size, device,
                         seed=cfg.train.seed + 1000 * dist.rank, dataset=dataset)
    trainer = Trainer.create(cfg, channels=source.channels, mean=source.mean, std=source.std,
                             device=device, steps_per_epoch=source.steps_per_epoch, dist=dist)
    total_steps = trainer.schedules.total_steps

    start_step = 0
    if resume:
        path = latest_checkpoint(run_dir)
        if path is None:
            raise ConfigError(f"--resume: no checkpoint in {run_dir / 'checkpoints'}")
        state = load_checkpoint(path, map_location=device)
        trainer.load_state_dict(state)
        source.load_state_dict(state["source"])
        restore_rng_state(state["rng"])
        start_step = int(state["step"])

    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / CONFIG_FILE)

    def checkpoint_state(step: int) -> dict:
        return {
            **trainer.state_dict(),
            "step": step,
            "source": source.state_dict(),
            "rng": capture_rng_state(),
            "config": cfg.to_dict(),
            "in_chans": source.channels,
            "normalization": {"mean": [float(v) for v in source.mean],
                              "std": [float(v) for v in source.std]},
        }

    bar = tqdm(total=total_steps, initial=start_step, desc="pretrain", unit="step",
               disable=not (cfg.train.progress and dist.is_main), dynamic_ncols=True)
    logger = MetricsLogger(run_dir, enabled=dist.is_main,
                           resume_step=start_step if resume else None)
    trainer.model.train()
    tick, images_since = time.perf_counter(), 0
    try:
        for step in range(start_step, total_steps):
            crops, _ = source.next()
            out, grad_norm = trainer.step(step, crops)
            images_since += crops.shape[0] * dist.world_size
            bar.update(1)

            done = step + 1
            if done % cfg.train.log_every == 0 or done == total_steps:
                # The only host syncs of the loop, once every log_every steps.
                now = time.perf_counter()
                values = {
                    "loss": all_reduce_mean(out.loss.detach()).item(),
                    "lr": trainer.schedules.lr(step),
                    "weight_decay": trainer.schedules.weight_decay(step),
                    "ema": trainer.schedules.ema_momentum(step),
                    "pred_std": out.pred_std.item(), "target_std": out.target_std.item(),
                    "images_per_s": images_since / max(now - tick, 1e-9),
                    "epoch": done / source.steps_per_epoch,
                }
                if grad_norm is not None:
                    values["grad_norm"] = float(grad_norm)
                logger.log(done, values)
                bar.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{values['lr']:.2e}",
                                img_s=f"{values['images_per_s']:.0f}")
                tick, images_since = now, 0
            if dist.is_main and (done % cfg.train.checkpoint_every == 0 or done == total_steps):
                save_checkpoint(checkpoint_path(run_dir, done), checkpoint_state(done))
                prune_checkpoints(run_dir, cfg.train.keep_checkpoints)
    finally:
        bar.close()
        logger.close()


def load_run_config(run_dir: Path, overrides: list[str] | None = None) -> Config:
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        raise ConfigError(f"{run_dir} is not a run directory (no {CONFIG_FILE})")
    return load_config(path, overrides)
