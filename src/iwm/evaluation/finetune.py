"""Leveraging the world model: finetuning protocols (``iwm finetune``).

Five protocols on the same budget and head: ``encoder`` (the target encoder trained),
``random-predictor`` and ``predictor`` (a frozen encoder under a fresh or the pretrained
predictor, used with the null action and every token as context), ``end-to-end``, and
``scratch`` (the encoder's architecture at random initialisation: what pretraining is
worth). Several tasks tune one predictor with a learned task token per task. Each result
carries its training curve and, beside it, its baselines (scratch, the linear probe of the
same encoder, raw pixels on the same images: :mod:`iwm.evaluation.finetune_run`).
Learning rates, frozen parts, heads, the
multitask schedule, baselines and what is counted as compute are in docs/evaluation.md,
"The finetuning protocols".
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import difflib
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from iwm.api import Pretrained
from iwm.config import Config
from iwm.console import Progress
from iwm.data.actions import ACTION_DIM, null_action
from iwm.data.datasets import FolderSet, ImageSet, get_dataset, require_labels
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

    data_cfg = dataclasses.replace(cfg.data, crop_scale=ft.crop_scale,
                                   crop_ratio=ft.crop_ratio, hflip=ft.hflip,
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
