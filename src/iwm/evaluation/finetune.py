"""Leveraging the world model: finetuning protocols (``iwm finetune``).

Five protocols on the same budget and head: ``encoder`` (the target encoder trained),
``random-predictor`` and ``predictor`` (a frozen encoder under a fresh or the pretrained
predictor, used with the null action and every token as context), ``end-to-end``, and
``scratch`` (the encoder's architecture at random initialisation: what pretraining is
worth). Several tasks tune one predictor with a learned task token per task. Each result
carries its training curve and, beside it, its baselines (scratch, the linear probe of the
same encoder, raw pixels on the same images). Learning rates, frozen parts, heads, the
multitask schedule, baselines and what is counted as compute are in docs/evaluation.md,
"The finetuning protocols".
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import difflib
import hashlib
import json
import re
import shlex
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from iwm.api import Pretrained
from iwm.config import Config, FinetuneConfig
from iwm.console import Progress
from iwm.data.actions import ACTION_DIM, null_action
from iwm.data.datasets import FOLDER_PREFIX, FolderSet, ImageSet, get_dataset, require_labels
from iwm.data.normalize import Normalizer
from iwm.data.photometric import to_grayscale
from iwm.data.sources import (
    StreamingBatchSource,
    derive_seed,
    make_source,
    tracked_eval_batches,
)
from iwm.errors import ConfigError, DataError
from iwm.evaluation.linear_probe import fit_logistic
from iwm.evaluation.plotting import pyplot
from iwm.evaluation.results import write_result
from iwm.evaluation.segmentation import (
    SEG_CLASS_NAMES,
    confusion_matrix,
    mean_iou,
    patch_labels,
)
from iwm.models.attention import resolve_attention, set_attention
from iwm.models.heads import AttentiveClassifier, LinearSegmentationHead, PooledLinearClassifier
from iwm.models.iwm import build_model
from iwm.models.predictor import Predictor
from iwm.models.vit import Encoder
from iwm.training.schedules import warmup_cosine
from iwm.training.step import autocast_dtype

PROTOCOLS = ("encoder", "random-predictor", "predictor", "end-to-end", "scratch")
PRETRAINED_ENCODER = ("encoder", "end-to-end")
"""Protocols that train the run's encoder (at ``encoder_lr_scale``, ``layer_decay``)."""
TASK_KINDS = ("classification", "segmentation")
LOG_POINTS = 10
"""Loss reports per run (with ``progress``): lines in a log, the bar's postfix on a terminal."""
LOSS_POINTS = 100
"""Train-loss points of a result's ``curve``: the mean loss over each 1% of the steps."""
BASELINES = ("scratch", "linear_probe", "raw_pixels")
"""What every single-task classification result is shown beside."""
# Keys of finetune_config a scratch result must share to be a baseline of another
# protocol: the budget, data and recipe (not the scales of pretrained parts it lacks).
_SCRATCH_RECIPE = ("epochs", "batch_size", "lr", "weight_decay", "warmup_epochs", "crop_scale",
                   "hflip", "train_limit", "test_limit", "seed", "label_smoothing", "head",
                   "head_init")


def check_protocol(protocol: str) -> None:
    """ConfigError, with the nearest name, unless ``protocol`` is one of :data:`PROTOCOLS`."""
    if protocol not in PROTOCOLS:
        close = difflib.get_close_matches(protocol, PROTOCOLS, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"--protocol {protocol!r}: must be one of {', '.join(PROTOCOLS)}"
                          f"{hint}")


def match_channels(images: Tensor, channels: int) -> Tensor:
    """Float images (B, C, H, W) -> (B, ``channels``, H, W): 1 -> 3 by replication,
    3 -> 1 by luma."""
    have = images.shape[1]
    if have == channels:
        return images
    if have == 1:
        return images.expand(-1, channels, -1, -1)
    if have == 3 and channels == 1:
        return to_grayscale(images)[:, :1]
    raise DataError(f"cannot convert {have}-channel images to {channels} channels")


class Backbone(nn.Module):
    """Normalised images -> tokens (B, N, D) for the head, under one protocol."""

    def __init__(self, encoder: Encoder, predictor: Predictor | None, *, train_encoder: bool,
                 pretrained_predictor: bool, num_tasks: int = 0,
                 pretrained_encoder: bool = True) -> None:
        super().__init__()
        self.encoder = encoder
        self.predictor = predictor
        self.train_encoder = train_encoder
        self.pretrained_predictor = pretrained_predictor
        self.pretrained_encoder = pretrained_encoder
        if not train_encoder:
            encoder.requires_grad_(False)
        self.task_tokens: nn.Embedding | None = None
        if num_tasks:
            if predictor is None:
                raise ConfigError("multitask tuning conditions the predictor on a task token: "
                                  "choose a protocol with a predictor")
            self.task_tokens = nn.Embedding(num_tasks, ACTION_DIM)
            # Zero = the null action: tuning starts from the pretrained world model exactly.
            nn.init.zeros_(self.task_tokens.weight)
        self.train(False)

    def train(self, mode: bool = True) -> Backbone:
        super().train(mode)
        if not self.train_encoder:
            # A frozen encoder stays in eval mode (no drop-path) whatever the rest does.
            self.encoder.eval()
        return self

    def frozen_state(self) -> dict[str, Tensor]:
        """Copies of every frozen tensor, to verify after training that none changed."""
        if self.train_encoder:
            return {}
        return {k: v.detach().clone() for k, v in self.encoder.state_dict().items()}

    def forward(self, images: Tensor, task: int | None = None) -> Tensor:
        if self.train_encoder:
            tokens = self.encoder.forward_tokens(images)
        else:
            with torch.no_grad():
                tokens = self.encoder.forward_tokens(images)
        if self.predictor is None:
            return tokens
        action = None
        if self.task_tokens is not None:
            if task is None:
                raise ValueError("a multitask backbone needs the task index")
            action = null_action(tokens.shape[0], tokens.device) + self.task_tokens.weight[task]
        return self.predictor.predict_all(tokens, action=action)


def build_backbone(pretrained: Pretrained, protocol: str, num_tasks: int = 0) -> Backbone:
    """The backbone of ``protocol``, made of COPIES of the run's modules (the run itself is
    never modified), on the run's device."""
    check_protocol(protocol)
    if protocol == "scratch":
        # The same architecture at random initialisation (seeded by the caller); a fresh
        # context encoder already has pretraining's flags (sin-cos positions frozen).
        encoder = build_model(pretrained.config, pretrained.in_chans).encoder
        encoder.set_grad_checkpointing(pretrained.encoder.grad_checkpointing)
    else:
        encoder = copy.deepcopy(pretrained.encoder)
    predictor: Predictor | None = None
    if protocol == "random-predictor":
        # build_model gives the exact architecture of the run's predictor, freshly initialised.
        in_chans = pretrained.in_chans
        predictor = build_model(pretrained.config, in_chans).predictor
    elif protocol in ("predictor", "end-to-end"):
        predictor = copy.deepcopy(pretrained.predictor)
    if predictor is not None:
        predictor.requires_grad_(True)
    train_encoder = protocol in (*PRETRAINED_ENCODER, "scratch")
    if protocol in PRETRAINED_ENCODER:
        # The copied EMA encoder is all requires_grad=False; train what pretraining trained
        # (the context encoder's flags: its fixed sin-cos positions stay frozen).
        for p, q in zip(encoder.parameters(), pretrained.context_encoder.parameters(),
                        strict=True):
            p.requires_grad_(q.requires_grad)
    backbone = Backbone(encoder, predictor,
                        train_encoder=train_encoder,
                        pretrained_predictor=protocol in ("predictor", "end-to-end"),
                        num_tasks=num_tasks, pretrained_encoder=protocol != "scratch")
    return backbone.to(pretrained.device)


def _split_decay(params: list[nn.Parameter]) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    # As in pretraining: matrices decay; biases, norms, tokens and queries do not.
    decay = [p for p in params if p.ndim >= 2 and p.shape[0] > 1]
    ids = {id(p) for p in decay}
    return decay, [p for p in params if id(p) not in ids]


def make_optimizer(backbone: Backbone, heads: nn.ModuleList, cfg: Config
                   ) -> torch.optim.AdamW:
    """AdamW with one group per (part, decay); each group carries its ``name``."""
    ft = cfg.finetune
    parts: list[tuple[str, list[nn.Parameter], float]] = [
        ("head", list(heads.parameters()), ft.lr)]
    if backbone.task_tokens is not None:
        parts.append(("task_tokens", list(backbone.task_tokens.parameters()), ft.lr))
    if backbone.predictor is not None:
        scale = ft.predictor_lr_scale if backbone.pretrained_predictor else 1.0
        parts.append(("predictor", list(backbone.predictor.parameters()), ft.lr * scale))
    if backbone.train_encoder:
        # Nothing pretrained to protect in a scratch encoder: the base lr, no layer decay.
        pretrained = backbone.pretrained_encoder
        parts += _encoder_parts(backbone.encoder,
                                ft.lr * (ft.encoder_lr_scale if pretrained else 1.0),
                                ft.layer_decay if pretrained else 1.0)
    groups = []
    for name, params, lr in parts:
        decay, no_decay = _split_decay(params)
        groups += [{"name": name, "params": decay, "lr": lr, "weight_decay": ft.weight_decay},
                   {"name": name, "params": no_decay, "lr": lr, "weight_decay": 0.0}]
    device = next(backbone.parameters()).device
    return torch.optim.AdamW([g for g in groups if g["params"]], fused=device.type == "cuda")


def encoder_layer(name: str, depth: int) -> int:
    """The layer of encoder parameter ``name`` for layer-wise lr decay, as MAE's
    ``util/lr_decay.py``: 0 the patch embedding, i + 1 block i, depth + 1 the final norm."""
    if name.startswith(("patch_embed.", "pos_embed")):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1


def _encoder_parts(encoder: Encoder, lr: float, layer_decay: float
                   ) -> list[tuple[str, list[nn.Parameter], float]]:
    """The trainable encoder parameters as (name, params, lr) parts: one part at ``lr``, or
    with ``layer_decay < 1`` one per layer at lr x layer_decay^(depth + 1 - layer)."""
    named = [(n, p) for n, p in encoder.named_parameters() if p.requires_grad]
    if layer_decay == 1.0:
        return [("encoder", [p for _, p in named], lr)]
    depth = len(encoder.blocks)
    layers: dict[int, list[nn.Parameter]] = {}
    for name, p in named:
        layers.setdefault(encoder_layer(name, depth), []).append(p)
    return [(f"encoder.layer{i}", params, lr * layer_decay ** (depth + 1 - i))
            for i, params in sorted(layers.items())]


def count_trainable(*modules: nn.Module) -> int:
    return sum(p.numel() for m in modules for p in m.parameters() if p.requires_grad)


@dataclass
class TaskData:
    name: str
    train: ImageSet | FolderSet
    test: ImageSet | FolderSet
    num_classes: int


def load_task(name: str, cfg: Config, kind: str) -> TaskData:
    train = get_dataset(name, "train", cfg.data.root, holdout=cfg.data.holdout)
    if kind == "classification":  # segmentation's labels come from the images
        require_labels(train, "classification finetuning")
    test = get_dataset(name, "test", cfg.data.root, holdout=cfg.data.holdout)
    n = cfg.finetune.seg_classes if kind == "segmentation" else len(train.classes)
    return TaskData(train.name or name, train, test, n)


@dataclass
class FinetuneOutcome:
    """What :func:`finetune` trained (for inspection) and its results."""

    backbone: Backbone
    heads: nn.ModuleList
    optimizer: torch.optim.Optimizer
    result: dict[str, Any] = field(default_factory=dict)


def _targets(images: Tensor, labels: Tensor, kind: str, cfg: Config) -> Tensor:
    if kind == "classification":
        return labels
    return patch_labels(images, cfg.model.patch_size, cfg.finetune.seg_threshold,
                        cfg.finetune.seg_classes)


def _loss(logits: Tensor, targets: Tensor, label_smoothing: float = 0.0) -> Tensor:
    # (B, C) for classification, (B, N, C) per token for segmentation.
    return F.cross_entropy(logits.flatten(0, -2).float(), targets.flatten(),
                           label_smoothing=label_smoothing)


def build_head(kind: str, cfg: Config, dim: int, num_classes: int) -> nn.Module:
    """The task head on (B, N, D) tokens: ``finetune.head`` for classification, a per-patch
    linear head for segmentation."""
    if kind == "segmentation":
        return LinearSegmentationHead(dim, num_classes)
    if cfg.finetune.head == "linear":
        return PooledLinearClassifier(dim, num_classes)
    return AttentiveClassifier(dim, num_classes)


def eval_steps(total: int, points: int) -> list[int]:
    """The steps (counted from 1) after which the curve evaluates: ``points`` evenly spaced,
    the last at ``total`` (fewer where there are fewer steps than points)."""
    return sorted({max(1, round(total * k / points)) for k in range(1, points + 1)})


def _step_schedule(steps: list[int], seed: int) -> list[int]:
    """Task index of every step: each task ``steps[i]`` times, in a seeded random order."""
    order = torch.cat([torch.full((n,), i) for i, n in enumerate(steps)])
    gen = torch.Generator().manual_seed(derive_seed("finetune-tasks", seed))
    return order[torch.randperm(len(order), generator=gen)].tolist()


@torch.no_grad()
def evaluate(backbone: Backbone, head: nn.Module, task: TaskData, task_index: int | None,
             kind: str, cfg: Config, normalize: Normalizer, channels: int,
             device: torch.device, progress: bool = False) -> dict[str, Any]:
    """Test-set accuracy (classification) or mIoU (segmentation), centre views."""
    backbone.eval()
    head.eval()
    amp = autocast_dtype(cfg, device)
    correct = torch.zeros((), dtype=torch.long, device=device)
    conf = torch.zeros(task.num_classes, task.num_classes, dtype=torch.long, device=device)
    n = 0
    for images, labels in tracked_eval_batches(task.test, cfg.finetune.batch_size,
                                               cfg.data.image_size, device,
                                               f"test {task.name}",
                                               limit=cfg.finetune.test_limit,
                                               progress=progress):
        images = match_channels(images, channels)
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            logits = head(backbone(normalize(images), task_index))
        pred = logits.argmax(-1)
        targets = _targets(images, labels, kind, cfg)
        if kind == "classification":
            correct += (pred == targets).sum()
        else:
            conf += confusion_matrix(pred, targets, task.num_classes)
        n += len(labels)
    if kind == "classification":
        return {"accuracy": correct.item() / max(n, 1), "n_test": n}
    miou, per_class = mean_iou(conf.cpu())
    return {"miou": miou, "per_class_iou": dict(zip(SEG_CLASS_NAMES[task.num_classes],
                                                    per_class, strict=True)),
            "patch_accuracy": conf.diag().sum().item() / max(conf.sum().item(), 1),
            "n_test": n}


@torch.no_grad()
def fit_heads_to_probe(backbone: Backbone, heads: nn.ModuleList, tasks: list[TaskData],
                       cfg: Config, normalize: Normalizer, channels: int,
                       device: torch.device, progress: bool = False) -> dict[str, Any]:
    """``finetune.head_init=probe``: each head's last Linear (``head.linear``) set to the
    logistic regression of its task's labels on the features entering it, over the
    training split's centre views (the first ``finetune.train_limit``), as the backbone and
    the rest of the head compute them now. Returns each task's train accuracy of the fit
    and the seconds it took."""
    start = time.perf_counter()
    backbone.eval()
    heads.eval()
    amp = autocast_dtype(cfg, device)
    ft = cfg.finetune
    accuracy = {}
    for i, (head, task) in enumerate(zip(heads, tasks, strict=True)):
        linear = head.linear
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"{type(head).__name__}: a probe-initialised head needs its last "
                            "layer as an nn.Linear named `linear`")
        captured: list[Tensor] = []
        hook = linear.register_forward_hook(
            lambda _module, inputs, _output, into=captured: into.append(inputs[0].float().cpu()))
        labels = []
        try:
            for images, y in tracked_eval_batches(task.train, ft.batch_size,
                                                  cfg.data.image_size, device,
                                                  f"probe head {task.name}",
                                                  limit=ft.train_limit, progress=progress):
                images = match_channels(images, channels)
                with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                    head(backbone(normalize(images), i if len(tasks) > 1 else None))
                labels.append(y.cpu())
        finally:
            hook.remove()
        x, y = torch.cat(captured), torch.cat(labels)
        weight, bias = fit_logistic(x, y, task.num_classes, cfg.probe.weight_decay,
                                    cfg.probe.max_iter)
        linear.weight.copy_(weight)
        linear.bias.copy_(bias)
        logits = x.double() @ weight.T + bias
        accuracy[task.name] = (logits.argmax(1) == y).double().mean().item()
    return {"kind": "probe", "train_accuracy": accuracy,
            "seconds": time.perf_counter() - start}


def finetune(pretrained: Pretrained, protocol: str, cfg: Config, tasks: list[TaskData],
             kind: str = "classification",
             progress: bool = False) -> FinetuneOutcome:
    """Train ``protocol`` on ``tasks`` (one: single task; several: multitask with task
    tokens) and evaluate; ``cfg`` supplies ``finetune.*``, ``data.*`` and ``model.*``.
    The result's ``curve`` holds the mean train loss of each 1% of the steps and the test
    metric at ``finetune.eval_points`` steps. ``progress``: of the steps and the
    evaluation, see :mod:`iwm.console`."""
    if kind not in TASK_KINDS:
        raise ConfigError(f"task {kind!r}: must be one of {', '.join(TASK_KINDS)}")
    if not tasks:
        raise ConfigError("no tasks to finetune on")
    ft = cfg.finetune
    device = pretrained.device
    torch.manual_seed(ft.seed)  # the random predictor or encoder, heads and task tokens
    start = time.perf_counter()
    multitask = len(tasks) > 1
    backbone = build_backbone(pretrained, protocol, num_tasks=len(tasks) if multitask else 0)
    # Finetuning trains like pretraining: same precision (amp below), same attention kernel.
    set_attention(backbone, resolve_attention(cfg.train.attention, device))
    dim = pretrained.encoder.embed_dim
    heads = nn.ModuleList(build_head(kind, cfg, dim, t.num_classes) for t in tasks).to(device)
    optimizer = make_optimizer(backbone, heads, cfg)
    frozen = backbone.frozen_state()
    channels = pretrained.in_chans
    normalize = pretrained.normalize
    amp = autocast_dtype(cfg, device)
    metric = "accuracy" if kind == "classification" else "miou"

    def test(i: int, show: bool = False) -> dict[str, Any]:
        return evaluate(backbone, heads[i], tasks[i], i if multitask else None, kind, cfg,
                        normalize, channels, device, show)

    curve: dict[str, Any] = {"metric": metric, "loss_steps": [], "loss": [], "eval_steps": [],
                             "eval": {t.name: [] for t in tasks}}
    curve_seconds = 0.0
    head_init: dict[str, Any] = {"kind": "random"}
    if ft.head_init == "probe":
        if kind != "classification":
            raise ConfigError("finetune.head_init=probe fits a classifier: use it with "
                              "classification tasks (segmentation heads start random)")
        head_init = fit_heads_to_probe(backbone, heads, tasks, cfg, normalize, channels,
                                       device, progress)
        # The start of the curve: the probe's own test accuracy, before any step.
        at = time.perf_counter()
        curve["eval_steps"].append(0)
        for j, t in enumerate(tasks):
            curve["eval"][t.name].append(test(j)[metric])
        curve_seconds += time.perf_counter() - at

    data_cfg = dataclasses.replace(cfg.data, crop_scale=ft.crop_scale, hflip=ft.hflip,
                                   limit=ft.train_limit)
    sources = [make_source(data_cfg, ft.batch_size, device, derive_seed("finetune", ft.seed, i),
                           dataset=t.train) for i, t in enumerate(tasks)]
    steps = [max(1, round(ft.epochs * len(s))) for s in sources]
    schedule = _step_schedule(steps, ft.seed)
    total = len(schedule)
    warmup = ft.warmup_epochs * total / ft.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: warmup_cosine(s, total, warmup, 0.0, 1.0, 0.0))
    flops_per_image = [0.0] * len(tasks)
    loss_every = max(1, total // LOSS_POINTS)
    # The last point is the final evaluation below, on the same test images.
    midway = set(eval_steps(total, ft.eval_points)) - {total}
    loss_sum = torch.zeros((), device=device)  # summed on the device: no sync per step
    loss_n = 0

    backbone.train()
    heads.train()
    bar = Progress(total, f"finetune {protocol}", unit="step", enabled=progress, auto=False)
    for step, i in enumerate(schedule):
        images, labels = sources[i].next()
        images = match_channels(images, channels)
        targets = _targets(images, labels, kind, cfg)
        # FLOPs of the first step of each task (forward + backward): the steps of a task
        # differ only in their data, not in their cost.
        counter = FlopCounterMode(display=False) if flops_per_image[i] == 0 else None
        with counter if counter is not None else contextlib.nullcontext():
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                loss = _loss(heads[i](backbone(normalize(images), i if multitask else None)),
                             targets, ft.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
        if counter is not None:
            flops_per_image[i] = counter.get_total_flops() / len(images)
        optimizer.step()
        scheduler.step()
        bar.update()
        done = step + 1
        loss_sum += loss.detach()
        loss_n += 1
        if done % loss_every == 0 or done == total:
            curve["loss_steps"].append(done)
            curve["loss"].append((loss_sum / loss_n).item())
            loss_sum.zero_()
            loss_n = 0
        if done in midway:
            at = time.perf_counter()
            curve["eval_steps"].append(done)
            for j, t in enumerate(tasks):
                curve["eval"][t.name].append(test(j)[metric])
            backbone.train()
            heads.train()
            curve_seconds += time.perf_counter() - at
        if progress and (done % max(1, total // LOG_POINTS) == 0 or done == total):
            bar.log({"task": tasks[i].name, "loss": f"{loss.item():.4f}"})
    bar.close()
    # The last loss point synchronised the device: the steps have all run.
    train_seconds = time.perf_counter() - start - curve_seconds

    for source in sources:
        if isinstance(source, StreamingBatchSource):
            source.close()  # stop its decoding workers now, not at garbage collection
    for key, before in frozen.items():
        if not torch.equal(before, backbone.encoder.state_dict()[key]):
            raise RuntimeError(f"frozen encoder tensor {key} changed during finetuning")
    per_task = {}
    curve["eval_steps"].append(total)
    for i, t in enumerate(tasks):
        per_task[t.name] = {**test(i, progress), "n_train": len(sources[i].dataset),
                            "steps": steps[i], "flops_per_image": flops_per_image[i]}
        curve["eval"][t.name].append(per_task[t.name][metric])
    seconds = time.perf_counter() - start
    result: dict[str, Any] = {
        "protocol": protocol,
        "task": kind,
        "tasks": per_task,
        "trainable_params": count_trainable(backbone, heads),
        "seconds": seconds,
        "train_seconds": train_seconds,
        "train_flops": sum(f * n * ft.batch_size
                           for f, n in zip(flops_per_image, steps, strict=True)),
        "epochs": ft.epochs,
        "steps": total,
        "batch_size": ft.batch_size,
        "head": ft.head if kind == "classification" else "linear-per-patch",
        "head_init": head_init,
        "lr": {g["name"]: g["initial_lr"] for g in optimizer.param_groups},
        "frozen": ["encoder"] if frozen else [],
        "frozen_unchanged": True,  # checked above; a change raises instead
        "pretrain_step": pretrained.step,
        "finetune_config": dataclasses.asdict(ft),
        "curve": curve,
    }
    if not multitask:
        # The single task's metrics at the top level, where the table reads them.
        result.update(dataset=tasks[0].name, **per_task[tasks[0].name])
    else:
        result[f"mean_{metric}"] = sum(r[metric] for r in per_task.values()) / len(per_task)
    return FinetuneOutcome(backbone, heads, optimizer, result)


def task_key(name: str) -> str:
    """A data set's name as :func:`~iwm.data.datasets.get_dataset` names what it loads
    (registry names lowercased, a folder's path kept as written)."""
    key = name.strip()
    if key.lower().startswith(FOLDER_PREFIX):
        return FOLDER_PREFIX + key[len(FOLDER_PREFIX):]
    return key.lower()


def result_name(kind: str, protocol: str, tasks: list[str], run_data: str) -> str:
    """The stem of a result file: ``finetune_<protocol>`` (``segment_`` for segmentation)
    on the run's own data set, ``..._<task>`` on another (``..._<folder name>-<hash of
    its path>`` for an image folder), so transfer results never overwrite the run's own;
    ``..._multitask`` for several tasks."""
    prefix = "finetune" if kind == "classification" else "segment"
    if len(tasks) > 1:
        return f"{prefix}_multitask"
    if task_key(tasks[0]) == task_key(run_data):
        return f"{prefix}_{protocol}"
    key = task_key(tasks[0])
    if key.startswith(FOLDER_PREFIX):
        # The folder's name, and a hash of its path to tell two "train/" folders apart.
        path = key[len(FOLDER_PREFIX):].rstrip("/")
        key = f"{Path(path).name}-{hashlib.blake2b(path.encode(), digest_size=3).hexdigest()}"
    return f"{prefix}_{protocol}_{re.sub(r'[^a-z0-9]+', '-', key.lower()).strip('-')}"


def plot_finetune_curve(result: dict[str, Any], path: Path) -> None:
    """A finetuning result's ``curve``: train loss (mean of each 1% of the steps) and the
    test metric against steps, the baselines' accuracies as horizontal lines."""
    plt = pyplot()
    curve = result["curve"]
    metric = curve.get("metric", "accuracy")
    fig, (loss_ax, test_ax) = plt.subplots(1, 2, figsize=(11, 3.6))
    loss_ax.plot(curve["loss_steps"], curve["loss"], color="C0")
    loss_ax.set_title("train loss (mean of each 1% of the steps)")
    for name, values in curve["eval"].items():
        test_ax.plot(curve["eval_steps"], values, marker="o", label=name)
    for key, label, color, style in (("linear_probe", "linear probe", "C3", "--"),
                                     ("raw_pixels", "raw pixels", "C7", ":"),
                                     ("scratch", "scratch", "C2", "-.")):
        base = (result.get("baselines") or {}).get(key) or {}
        if isinstance(base.get("accuracy"), int | float):
            test_ax.axhline(base["accuracy"], color=color, linestyle=style, linewidth=1.2,
                            label=f"{label} {base['accuracy']:.3f}")
    test_ax.set_title(f"test {metric} ({result.get('n_test', '?')} images)")
    test_ax.legend(fontsize=8)
    for ax in (loss_ax, test_ax):
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle(f"finetune {result.get('protocol')} on {result.get('dataset', 'several tasks')}"
                 f", {result.get('epochs')} epochs", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_finetune_comparison(results: Sequence[dict[str, Any]], path: Path) -> None:
    """Several finetunings of one data set on shared axes: each one's train loss and test
    metric against steps (labelled by protocol and head init), and the first recorded
    linear probe and raw pixels as horizontal lines, so that which protocol wins and
    whether each has levelled off read off one figure."""
    if not results:
        raise ValueError("no finetuning results to compare")
    plt = pyplot()
    fig, (loss_ax, test_ax) = plt.subplots(1, 2, figsize=(11, 3.8))
    metric = results[0]["curve"].get("metric", "accuracy")
    for k, result in enumerate(results):
        curve = result["curve"]
        init = (result.get("head_init") or {}).get("kind", "random")
        label = f"{result.get('protocol')}{', probe init' if init == 'probe' else ''}"
        color = f"C{k % 10}"
        loss_ax.plot(curve["loss_steps"], curve["loss"], color=color, label=label)
        for values in curve["eval"].values():
            test_ax.plot(curve["eval_steps"], values, marker="o", color=color,
                         label=f"{label} {values[-1]:.3f}")
    for key, label, style in (("linear_probe", "linear probe", "--"),
                              ("raw_pixels", "raw pixels", ":")):
        for result in results:
            base = (result.get("baselines") or {}).get(key) or {}
            if isinstance(base.get("accuracy"), int | float):
                test_ax.axhline(base["accuracy"], color="black", linestyle=style,
                                linewidth=1.1, label=f"{label} {base['accuracy']:.3f}")
                break
    loss_ax.set_title("train loss (mean of each 1% of the steps)")
    loss_ax.set_yscale("log")
    test_ax.set_title(f"test {metric}")
    for ax in (loss_ax, test_ax):
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"finetuning protocols on {results[0].get('dataset', 'several tasks')}",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_finetune_result(run_dir: Path, name: str, result: dict[str, Any]) -> dict[str, Any]:
    """``RUN/results/<name>.json`` and, for a result with a curve, its plot beside it
    (``<name>_curve.png``); returns the result with their ``path`` and ``curve_png``."""
    path = write_result(run_dir, name, result)
    extra = {"path": str(path)}
    if result.get("curve"):
        png = path.with_name(f"{path.stem}_curve.png")
        plot_finetune_curve(result, png)
        extra["curve_png"] = str(png)
    return {**result, **extra}


def _summary(result: dict[str, Any], source: str) -> dict[str, Any]:
    """What a table shows of a finetuning result used as a baseline."""
    keys = ("accuracy", "n_train", "n_test", "trainable_params", "flops_per_image",
            "train_seconds", "seconds", "dataset", "protocol")
    return {**{k: result[k] for k in keys if k in result}, "source": source}


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _find_scratch(path: Path, result: dict[str, Any]) -> tuple[dict[str, Any] | None, str]:
    """The scratch result at ``path`` if it was trained on the same images with the same
    recipe as ``result``, else (None, why not)."""
    data = _read_json(path)
    if data is None:
        return None, f"no {path.name}"
    mine = result["finetune_config"]
    # A key an older result lacks was added later with a default that keeps the old
    # behaviour (head_init: random), so it reads as that default.
    theirs = {**dataclasses.asdict(FinetuneConfig()), **(data.get("finetune_config") or {})}
    differ = [f"{k} {theirs.get(k)!r} there, {mine[k]!r} here" for k in _SCRATCH_RECIPE
              if _plain(theirs.get(k)) != _plain(mine[k])]
    differ += [f"{k} {data.get(k)!r} there, {result[k]!r} here"
               for k in ("dataset", "n_train", "n_test") if data.get(k) != result[k]]
    if differ:
        return None, f"{path.name} is of another recipe ({'; '.join(differ)})"
    return _summary(data, str(path)), ""


def _plain(value: Any) -> Any:
    # JSON has lists where the config has tuples (crop_scale).
    return list(value) if isinstance(value, tuple) else value


def _find_probe(results: Path, key: str, want: dict[str, Any], run_data: bool
                ) -> dict[str, Any] | None:
    """A probe baseline ``key`` computed before on the same images: the file ``iwm probe``
    (linear_probe) or ``iwm demo`` (raw_pixels) wrote, else one in another finetuning
    result. A file without ``dataset`` is of the run's own data set, one without ``step``
    of its current checkpoint (the demo writes neither)."""
    own = results / ("probe_linear.json" if key == "linear_probe"
                     else "probe_linear_raw_pixels.json")
    candidates: list[tuple[Path, dict[str, Any] | None]] = [(own, _read_json(own))]
    for path in sorted(results.glob("finetune_*.json")):
        data = _read_json(path)
        entry = (data or {}).get("baselines", {}).get(key)
        candidates.append((path, entry if isinstance(entry, dict) else None))
    for path, entry in candidates:
        if entry is None or "accuracy" not in entry:
            continue
        if key == "linear_probe" and entry.get("encoder", "target") != "target":
            continue
        if "dataset" not in entry and not run_data:
            continue
        if "dataset" in entry:
            entry = {**entry, "dataset": task_key(entry["dataset"])}
        if all(entry.get(k, v) == v for k, v in want.items()):
            return {**entry, "source": str(path)}  # where it was found
    return None


def _compute_probe(key: str, pretrained: Pretrained, cfg: Config, task: TaskData,
                   progress: bool) -> dict[str, Any]:
    """The linear probe of the run's target encoder (``linear_probe``) or of raw pixels
    (``raw_pixels``) on the finetuning's own train and test images (its limits)."""
    from iwm.evaluation.probe import probe_encoder, probe_pixels

    ft = cfg.finetune
    pcfg = dataclasses.replace(
        cfg, data=dataclasses.replace(cfg.data, name=task.name),
        probe=dataclasses.replace(cfg.probe, train_limit=ft.train_limit,
                                  test_limit=ft.test_limit))
    start = time.perf_counter()
    if key == "linear_probe":
        channels, normalize = pretrained.in_chans, pretrained.normalize

        def prepare(images: Tensor) -> Tensor:  # another data set in the run's input format
            return normalize(match_channels(images, channels))

        r = probe_encoder(pretrained.encoder, prepare, pcfg, pretrained.device,
                          progress=progress)
        extra: dict[str, Any] = {"encoder": "target", "step": pretrained.step}
    else:
        r = probe_pixels(pcfg, pretrained.device, progress=progress)
        extra = {"encoder": "raw pixels"}
    return {**dataclasses.asdict(r), **extra, "dataset": task.name,
            "trainable_params": (r.feature_dim + 1) * task.num_classes,
            "seconds": time.perf_counter() - start, "source": "computed"}


def finetune_command(run_dir: Path, protocol: str, args: list[str],
                     baselines: bool = False) -> str:
    """The ``iwm finetune`` line of ``protocol`` with the other arguments ``args``."""
    return shlex.join(["iwm", "finetune", str(run_dir), "--protocol", protocol,
                       *(["--baselines"] if baselines else []), *args])


def finetune_baselines(run_dir: Path, pretrained: Pretrained, cfg: Config, task: TaskData,
                       result: dict[str, Any], *, compute: bool, args: list[str],
                       progress: bool = False) -> dict[str, dict[str, Any]]:
    """The baselines of a single-task classification ``result`` (:data:`BASELINES`), each
    found in ``RUN/results`` if made before on the same images (scratch: also with the same
    recipe), else computed with ``compute`` (scratch: written as its own result), else
    ``{"missing": why and the command that makes it}``. ``args``: the command line of
    ``result`` after ``--protocol P`` (tasks, overrides), for those commands."""
    results = Path(run_dir) / "results"
    run_data = task_key(task.name) == task_key(pretrained.config.data.name)
    out: dict[str, dict[str, Any]] = {}
    scratch: dict[str, Any] | None = None  # trained here, as a baseline
    name = result_name("classification", "scratch", [task.name], pretrained.config.data.name)
    if result["protocol"] == "scratch":
        out["scratch"] = _summary(result, "this result")
    else:
        found, why = _find_scratch(results / f"{name}.json", result)
        if found is None and compute:
            scratch = finetune(pretrained, "scratch", cfg, [task], progress=progress).result
            found = _summary(scratch, str(results / f"{name}.json"))
        out["scratch"] = found or {
            "missing": f"{why}: run `{finetune_command(run_dir, 'scratch', args)}`"}
    want = {"dataset": task_key(task.name), "n_train": result["n_train"],
            "n_test": result["n_test"]}
    again = finetune_command(run_dir, result["protocol"], args, baselines=True)
    for key in ("linear_probe", "raw_pixels"):
        need = {**want, "step": pretrained.step} if key == "linear_probe" else want
        probe = _find_probe(results, key, need, run_data)
        if probe is None and compute:
            probe = _compute_probe(key, pretrained, cfg, task, progress)
        out[key] = probe or {"missing": f"none on these {result['n_train']} train / "
                                        f"{result['n_test']} test images: run `{again}`"}
    if scratch is not None:  # a result of its own, beside the same baselines
        write_finetune_result(run_dir, name, {**scratch, "baselines": {
            **out, "scratch": _summary(scratch, "this result")}})
    return out


def baselines_text(result: dict[str, Any]) -> list[str]:
    """Lines saying a result's baselines, or the commands that make the missing ones."""
    base = result.get("baselines")
    if not base:
        return []
    labels = {"scratch": "scratch", "linear_probe": "linear probe", "raw_pixels": "raw pixels"}
    shown = ", ".join(f"{labels[k]} {base[k]['accuracy']:.4f}" for k in BASELINES
                      if "accuracy" in base.get(k, {}))
    lines = [f"  beside it: {shown or 'no baselines yet'}"]
    lines += [f"  {labels[k]} missing: {base[k]['missing']}" for k in BASELINES
              if "missing" in base.get(k, {})]
    return lines


def run_finetune(run_dir: Path, protocol: str, tasks: list[str] | None = None,
                 kind: str = "classification", overrides: list[str] | None = None,
                 device: str = "auto", compare_separate: bool = False,
                 progress: bool = True, baselines: bool = False) -> dict[str, Any]:
    """``iwm finetune``: writes and returns ``RUN/results/finetune_<protocol>.json`` (see
    :func:`result_name`: ``segment_*`` for segmentation, ``*_<task>`` for another data set
    than the run's, ``*_multitask.json`` for several tasks, with the separately tuned
    predictors under ``separate`` if ``compare_separate``) and its curve's plot beside it.
    A single classification task's result carries its ``baselines``
    (:func:`finetune_baselines`; ``baselines`` computes the missing ones)."""
    from iwm.api import load
    from iwm.config import load_config
    from iwm.training.distributed import resolve_device

    check_protocol(protocol)
    if baselines and (kind != "classification" or (tasks is not None and len(tasks) > 1)):
        raise ConfigError("--baselines: the linear probe and raw-pixel baselines are of a "
                          "single classification task; drop --baselines, or pass one --tasks "
                          "without --task segmentation")
    pretrained = load(run_dir, device=resolve_device(device))
    cfg = load_config(pretrained.config.to_dict(), overrides)
    names = tasks or [cfg.data.name]
    if len(set(names)) != len(names):
        raise ConfigError(f"--tasks {','.join(names)}: a task is listed twice")
    data = [load_task(name, cfg, kind) for name in names]
    out = finetune(pretrained, protocol, cfg, data, kind, progress).result
    name = result_name(kind, protocol, names, pretrained.config.data.name)
    if compare_separate and len(data) > 1:
        runs = [finetune(pretrained, protocol, cfg, [t], kind, progress).result for t in data]
        metric = "accuracy" if kind == "classification" else "miou"
        out["separate"] = {
            "tasks": {r["dataset"]: {metric: r[metric]} for r in runs},
            f"mean_{metric}": sum(r[metric] for r in runs) / len(runs),
            "trainable_params": sum(r["trainable_params"] for r in runs),
            "seconds": sum(r["seconds"] for r in runs),
            "train_flops": sum(r["train_flops"] for r in runs),
        }
    if kind == "classification" and len(data) == 1:
        args = [*(["--tasks", ",".join(tasks)] if tasks else []), *(overrides or [])]
        out["baselines"] = finetune_baselines(run_dir, pretrained, cfg, data[0], out,
                                              compute=baselines, args=args, progress=progress)
    return write_finetune_result(run_dir, name, out)
