"""One training step: views, masks, forward, backward, clip, AdamW, EMA (:class:`Trainer`).

    views  = view_sampler(crops)                # target jitter; source jitter + destructive
    masks  = mask_sampler(batch)                # multi-block context / targets, on the CPU
    loss   = model(source, target, action, masks)
    backward -> clip -> AdamW -> EMA

A step whose loss or gradients are NaN/inf is skipped exactly (weights, optimiser state
and EMA untouched) and counted in :class:`NonFiniteSteps`, without a host sync.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor, nn

from iwm.config import Config
from iwm.data.masks import MultiBlockMaskSampler, to_device
from iwm.data.normalize import Normalizer
from iwm.data.shard import Shard, take_rows
from iwm.data.views import ViewSampler, resolve_view_params
from iwm.errors import TrainingError
from iwm.models.attention import resolve_attention, set_attention
from iwm.models.iwm import IWM, StepOutput, build_model, init_from_state
from iwm.torch_internals import (
    cpu_has_native_bf16,
    is_compile_error,
    skip_next_step_if,
    uncompiled,
)
from iwm.training.distributed import DistInfo, all_reduce_mean
from iwm.training.fsdp import full_tensor, shard_model
from iwm.training.schedules import Schedules


def param_groups(model: IWM, predictor_lr_scale: float = 1.0) -> list[dict]:
    """Weight decay on matrices only; biases, norms and the mask token are not decayed.
    The predictor's groups train at ``predictor_lr_scale`` x the scheduled lr."""
    groups = []
    for module, scale in ((model.encoder, 1.0), (model.predictor, predictor_lr_scale)):
        decay: list[nn.Parameter] = []
        no_decay: list[nn.Parameter] = []
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
        return cpu_has_native_bf16()
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


def check_nonfinite(total: int, longest: int, limit: int, done: int) -> None:
    """Stop training if ``limit`` steps in a row were skipped as non-finite."""
    if longest >= limit:
        raise TrainingError(
            f"training diverged: {longest} steps in a row had a NaN/inf loss or gradients "
            f"(train.max_nonfinite={limit}; {total} skipped by step {done}); lower optim.lr "
            "or set optim.grad_clip, then continue from the last checkpoint with "
            "`iwm pretrain RUN --resume optim.lr=...`"
        )


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
    view_sampler: ViewSampler
    mask_sampler: MultiBlockMaskSampler
    normalize: Normalizer
    view_rng: torch.Generator
    """Draws the views, on the training device; its state is checkpointed."""
    mask_rng: torch.Generator
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
               dist: DistInfo | None = None,
               init_state: Mapping[str, Tensor] | None = None) -> Trainer:
        """``init_state``: the weights of ``cfg.model.init_from`` to start from (see
        :func:`~iwm.models.iwm.init_from_state`); None starts from initialisation."""
        dist = dist or DistInfo()
        model = build_model(cfg, channels)
        if init_state is not None:
            init_from_state(model, init_state, str(cfg.model.init_from))
        model = model.to(device)
        set_attention(model, resolve_attention(cfg.train.attention, device))
        fsdp = dist.world_size > 1 and cfg.train.data_parallel == "fsdp"
        if fsdp:
            shard_model(model)  # before the optimiser, which must see the sharded tensors
        view_rng = torch.Generator(device=device)
        # The same stream on every rank: views and masks are drawn for the global batch.
        view_rng.manual_seed(cfg.train.seed * 7919)
        mask_rng = torch.Generator().manual_seed(cfg.train.seed * 7919 + 1)
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
                # A compiled Module is a Module; torch.compile's annotation keeps only Callable.
                train_model = cast(nn.Module, torch.compile(train_model))
            except Exception as e:  # noqa: BLE001 - compiling is an optimisation, never fatal
                warnings.warn(f"torch.compile unavailable ({e}); training uncompiled",
                              RuntimeWarning, stacklevel=2)
        return cls(
            cfg=cfg, model=model, train_model=train_model, optimizer=optimizer,
            view_sampler=ViewSampler(resolve_view_params(cfg.views), channels,
                                     cfg.data.image_size),
            mask_sampler=MultiBlockMaskSampler(model.encoder.grid, cfg.mask),
            normalize=Normalizer.create(mean, std, device), view_rng=view_rng,
            mask_rng=mask_rng,
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
        v = self.view_sampler(crops, self.view_rng, self.shard)
        masks = self.mask_sampler(local * world, self.mask_rng, "cpu")
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
        skip_next_step_if(self.optimizer, ~ok)
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
        except Exception as e:
            eager = uncompiled(self.train_model)
            if eager is None or not is_compile_error(e):  # a real error
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
