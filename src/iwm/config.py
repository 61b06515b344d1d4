"""Typed run configuration: dataclasses, loaded from YAML and ``key=value`` overrides.

A config file only lists what differs from the defaults below. Every key is checked:
an unknown key or a value of the wrong type is a :class:`~iwm.errors.ConfigError` that
names the dotted key (with a "did you mean" suggestion for typos). Every rule on the
values lives in its section's ``check``, which runs when the section is built, so on every
load: a grid or sweep of configs fails on the bad cell when it is read, not when that
cell starts training. The rules that relate sections live in :class:`Config`.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import os
import re
import tempfile
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml

from iwm.data.factors import JITTER_FACTORS
from iwm.errors import ConfigError

_EXPONENT_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")

# The choices of every choice field, each listed once: the checks and error messages read
# them with typing.get_args.
Strength = Literal["none", "jitter", "destructive", "strong"]
Pairing = Literal["relative", "independent"]
BlockSizes = Literal["per_block", "per_batch"]
ContextTokens = Literal["pad", "thin"]
PredictorPass = Literal["union", "per_block"]
EncoderName = Literal["vit_micro", "vit_tiny", "vit_small", "vit_base", "vit_large", "vit_huge"]
"""The encoders :data:`iwm.models.vit.ENCODERS` describes (a test keeps the two in step)."""
Conditioning = Literal["none", "sequence", "feature", "adaln"]
Loss = Literal["l2", "smooth_l1"]
Precision = Literal["auto", "fp32", "bf16"]
AttentionKernel = Literal["auto", "sdpa", "matmul"]
DataParallel = Literal["ddp", "fsdp"]
ProbedEncoder = Literal["target", "context"]
LoggerName = Literal["tensorboard", "wandb"]
"""Where metrics go besides ``metrics.csv``, which is always written (reports read it)."""
SegClasses = Literal[2, 3]
FinetuneHead = Literal["attentive", "linear"]
HeadInit = Literal["random", "probe"]

# The Predictor takes its conditioning as a plain argument, checked against this.
CONDITIONINGS: tuple[str, ...] = typing.get_args(Conditioning)


class _Section:
    """A config section: :meth:`check` runs when it is built."""

    KEY: ClassVar[str]
    """The section's key in :class:`Config`, which every error message starts with."""

    if typing.TYPE_CHECKING:
        # Every section is a dataclass, so ``dataclasses.fields(self)`` is valid.
        __dataclass_fields__: ClassVar[dict[str, dataclasses.Field[Any]]]

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """Raise :class:`~iwm.errors.ConfigError`, naming the key and the fix, for an
        impossible value (run on construction; again after changing a field)."""
        # Widened to ``type``: mypy takes ``type[Self]`` for unhashable, which it is not.
        cls: type = type(self)
        hints = _type_hints(cls)
        for f in dataclasses.fields(self):
            if typing.get_origin(hints[f.name]) is not Literal:
                continue
            allowed, value = typing.get_args(hints[f.name]), getattr(self, f.name)
            if value not in allowed:
                near = _suggest(value, list(allowed)) if isinstance(value, str) else ""
                raise ConfigError(f"{self.KEY}.{f.name}={value!r}: must be one of "
                                  f"{', '.join(map(str, allowed))}{near}")

    def _at_least_one(self, *names: str) -> None:
        for name in names:
            if getattr(self, name) < 1:
                raise ConfigError(f"{self.KEY}.{name}={getattr(self, name)}: must be at least 1")

    def _positive(self, *names: str) -> None:
        for name in names:
            if not getattr(self, name) > 0:  # also rejects NaN
                raise ConfigError(f"{self.KEY}.{name}={getattr(self, name)}: must be positive")

    def _non_negative(self, *names: str) -> None:
        for name in names:
            if not getattr(self, name) >= 0:
                raise ConfigError(f"{self.KEY}.{name}={getattr(self, name)}: must be >= 0")

    def _fraction(self, *names: str) -> None:
        for name in names:
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"{self.KEY}.{name}={getattr(self, name)}: needs "
                                  "0 <= value < 1")

    def _scale_range(self, *names: str) -> None:
        for name in names:
            lo, hi = getattr(self, name)
            if not 0 < lo <= hi <= 1:
                raise ConfigError(f"{self.KEY}.{name}={[lo, hi]}: needs 0 < min <= max <= 1")

    def _ratio_range(self, *names: str) -> None:
        for name in names:
            lo, hi = getattr(self, name)
            if not 0 < lo <= hi:
                raise ConfigError(f"{self.KEY}.{name}={[lo, hi]}: needs 0 < min <= max")


@functools.cache
def _type_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


@dataclass
class DataConfig(_Section):
    KEY: ClassVar[str] = "data"

    name: str = "fashion-mnist"
    """Registry name: fashion-mnist, mnist, animal-mnist, shapes (colour, built offline),
    cifar10, cifar100, stl10, imagefolder:<path> or shards:<pattern> (tar shards written by
    ``iwm shards``; pretraining only)."""
    root: str | None = None
    """Where data sets are stored / downloaded (default: $IWM_DATA or ~/.cache/iwm)."""
    image_size: int = 28
    crop_scale: tuple[float, float] = (0.3, 1.0)
    crop_ratio: tuple[float, float] = (0.75, 4 / 3)
    hflip: bool = True
    limit: int | None = None
    """Use only the first N training images (quick experiments)."""
    num_workers: int | None = None
    """Decoding workers for streamed (image-folder) data sets; null (auto) = one fewer than
    the CPUs this process may use, at most 4 (0 on one CPU)."""
    shuffle_buffer: int = 1000
    """Samples each worker holds to shuffle tar shards (``shards:``) beyond their order;
    memory is about this many encoded images per worker."""
    holdout: float = 0.1
    """Fraction of an image folder without split sub-folders held out as its test split,
    chosen by a hash of each file's path (0: train on everything, no test split)."""

    def check(self) -> None:
        super().check()
        self._at_least_one("image_size", "shuffle_buffer")
        self._fraction("holdout")
        self._scale_range("crop_scale")
        self._ratio_range("crop_ratio")
        if self.num_workers is not None and self.num_workers < 0:
            raise ConfigError(f"data.num_workers={self.num_workers}: must be >= 0 "
                              "(0 decodes in the training process)")


@dataclass
class ViewsConfig(_Section):
    """Photometric views. ``strength`` picks a preset; any field set here overrides it."""

    KEY: ClassVar[str] = "views"

    strength: Strength = "jitter"
    pairing: Pairing = "relative"
    """How the target is rendered. ``relative``: the action (target jitter relative to the
    source's) applied to the source before its destructive ops, so the action explains
    every pair exactly, clipping included. ``independent``: the target's own jitter applied
    to the crop, the paper's description; where a factor clips (bright pixels at strong
    brightness or contrast) the action no longer maps source to target (docs/method.md)."""
    jitter_p: float | None = None
    brightness: float | None = None
    contrast: float | None = None
    saturation: float | None = None
    hue: float | None = None
    grayscale_p: float | None = None
    blur_p: float | None = None
    blur_sigma: tuple[float, float] | None = None
    solarize_p: float | None = None
    source_jitter_p: float | None = None
    """Probability that a source's colour jitter is applied; None: ``jitter_p``, as both
    views in the paper. Lower, more sources are clean crops, whose pairs' action is the
    target's own jitter: what a clean image meets at evaluation (a contrast increase then
    leaves Fashion-MNIST's black background clipped at 0; docs/world_model.md)."""

    def check(self) -> None:
        super().check()
        check_view_values(self)


def check_view_values(views: Any) -> None:
    """The rules of the photometric values, for a :class:`ViewsConfig` (where None means
    "the preset's") and for the resolved :class:`~iwm.data.views.ViewParams` alike."""
    for key in ("jitter_p", "source_jitter_p", "grayscale_p", "blur_p", "solarize_p"):
        value = getattr(views, key)
        if value is not None and not 0.0 <= value <= 1.0:
            raise ConfigError(f"views.{key}={value}: a probability must be in [0, 1]")
    for key in JITTER_FACTORS:
        value = getattr(views, key)
        if value is not None and not value >= 0:  # also rejects NaN
            raise ConfigError(f"views.{key}={value}: a jitter strength must be >= 0")
    if views.hue is not None and views.hue > 0.5:
        raise ConfigError(f"views.hue={views.hue}: hue shifts are in turns, needs <= 0.5")
    sigma = views.blur_sigma
    if sigma is not None and (len(sigma) != 2 or not 0 < sigma[0] <= sigma[1]):
        raise ConfigError(
            f"views.blur_sigma={list(sigma)}: needs [min, max] with 0 < min <= max"
        )


@dataclass
class MaskConfig(_Section):
    KEY: ClassVar[str] = "mask"

    num_targets: int = 4
    target_scale: tuple[float, float] = (0.15, 0.2)
    target_aspect: tuple[float, float] = (0.75, 1.5)
    context_scale: tuple[float, float] = (0.85, 1.0)
    min_context: float = 0.1
    """Smallest context, as a fraction of the patches; masks below it are redrawn."""
    wrap: bool = True
    """Place blocks on a torus so every patch is a target equally often (docs/masks.md)."""
    block_sizes: BlockSizes = "per_block"
    """per_block: every block draws its size; per_batch: one target size and one context
    size for the whole batch, as the official I-JEPA code (no padding; see docs/masks.md)."""
    context_tokens: ContextTokens = "pad"
    """pad: every image keeps its whole context, padded to the batch's largest (padding
    is masked out of attention); thin: every context is cut to the batch's smallest by a
    random subset, as the official I-JEPA code (at batch 128 on a 7x7 grid that drops
    about half of an image's context)."""
    predictor_pass: PredictorPass = "union"
    """union: one predictor pass predicts the union of an image's target blocks; per_block:
    one pass per block, the context repeated for each (the official I-JEPA code)."""

    def check(self) -> None:
        super().check()
        self._at_least_one("num_targets")
        self._scale_range("target_scale", "context_scale")
        self._ratio_range("target_aspect")
        self._fraction("min_context")


@dataclass
class ModelConfig(_Section):
    KEY: ClassVar[str] = "model"

    encoder: EncoderName = "vit_tiny"
    patch_size: int = 4
    predictor_depth: int = 6
    predictor_width: int = 192
    predictor_heads: int = 6
    conditioning: Conditioning = "feature"
    drop_path: float = 0.0
    loss: Loss = "l2"
    grad_checkpointing: bool = False
    """Recompute each block's activations in the backward pass (encoder and predictor):
    about a third more compute for far less activation memory, for models or batches that
    would not fit otherwise."""
    init_from: str | None = None
    """A run directory, checkpoint or export whose weights a new pretraining run starts
    from, e.g. an I-JEPA checkpoint imported with ``iwm import-ijepa``. Its encoders and
    predictor must have this model's shapes; action-conditioning weights it lacks start
    fresh (with a warning). ``--resume`` restores the run's own checkpoint instead."""

    def check(self) -> None:
        super().check()
        self._at_least_one("patch_size", "predictor_depth", "predictor_width",
                           "predictor_heads")
        if self.predictor_width % self.predictor_heads:
            raise ConfigError(
                f"model.predictor_width={self.predictor_width} is not divisible by "
                f"model.predictor_heads={self.predictor_heads}"
            )
        if self.predictor_width % 4:
            # Its fixed 2-D sin-cos positions give a quarter of the channels to each of
            # sin(row), cos(row), sin(column), cos(column).
            raise ConfigError(f"model.predictor_width={self.predictor_width}: needs a "
                              "multiple of 4 (the predictor's 2-D sin-cos positions)")
        self._fraction("drop_path")


@dataclass
class OptimConfig(_Section):
    KEY: ClassVar[str] = "optim"

    lr: float = 1e-3
    start_lr: float = 2e-4
    final_lr: float = 1e-6
    warmup_epochs: float = 1.0
    weight_decay: float = 0.04
    final_weight_decay: float = 0.4
    ema: tuple[float, float] = (0.996, 1.0)
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float | None = None
    predictor_lr_scale: float = 1.0
    """The predictor trains at this multiple of the scheduled lr (the encoder at 1x)."""

    def check(self) -> None:
        super().check()
        self._positive("lr", "predictor_lr_scale")
        self._non_negative("start_lr", "final_lr", "warmup_epochs", "weight_decay",
                           "final_weight_decay")
        if not all(0 <= m <= 1 for m in self.ema):
            raise ConfigError(f"optim.ema={list(self.ema)}: momenta need 0 <= value <= 1")
        if not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"optim.betas={list(self.betas)}: each needs 0 <= beta < 1")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ConfigError(f"optim.grad_clip={self.grad_clip}: must be positive, or null "
                              "for no clipping")


@dataclass
class TrainConfig(_Section):
    KEY: ClassVar[str] = "train"

    epochs: float = 10.0
    batch_size: int = 256
    seed: int = 0
    device: str = "auto"
    precision: Precision = "auto"
    """auto = bf16 autocast on CUDA GPUs with native bf16 (Ampere and newer), fp32
    elsewhere; bf16 = bf16 autocast on any device (on CPUs with AVX-512 BF16 or AMX it is
    faster too)."""
    compile: bool = False
    attention: AttentionKernel = "auto"
    """Self-attention kernel: ``sdpa`` (scaled_dot_product_attention: flash / memory-
    efficient kernels), ``matmul`` (two matmuls and a softmax), or auto = matmul on CPU
    (where the flash kernel measured slower, docs/RESULTS.md), sdpa on accelerators."""
    log_every: int = 20
    checkpoint_every: int = 500
    """Steps between checkpoints (one is always written at the end)."""
    monitor_every: int = 500
    """Steps between collapse monitors (RankMe, kNN accuracy; also at the last step),
    see :mod:`iwm.training.monitors`; 0 turns them off."""
    logger: tuple[LoggerName, ...] = ("tensorboard",)
    """Where metrics go besides ``metrics.csv`` (always written): ``tensorboard``,
    ``wandb`` (``pip install 'iwm[wandb]'``), both (``[tensorboard,wandb]``) or ``[]``."""
    wandb_project: str = "iwm"
    wandb_entity: str | None = None
    """The W&B project and entity (null: the account's default) of ``train.logger=wandb``."""
    keep_checkpoints: int = 2
    out_dir: str = "runs"
    run_name: str | None = None
    progress: bool = True
    max_nonfinite: int = 20
    """Steps in a row with a NaN/inf loss or gradients (each skipped) before training stops."""
    data_parallel: DataParallel = "ddp"
    """Several processes: ``ddp`` (every process holds the whole model) or ``fsdp``
    (parameters, gradients and optimiser state sharded; for models that do not fit)."""
    grad_accum_steps: int = 1
    """Micro-batches per optimisation step. ``batch_size`` stays the global batch of one
    step (over all processes); each process computes batch_size / (processes x steps)
    images at a time, with exactly the gradients of the whole batch at once."""

    def check(self) -> None:
        super().check()
        self._positive("epochs")
        self._at_least_one("batch_size", "log_every", "checkpoint_every", "keep_checkpoints",
                           "max_nonfinite", "grad_accum_steps")
        self._non_negative("monitor_every")
        allowed = typing.get_args(LoggerName)
        for name in self.logger:
            if name not in allowed:
                raise ConfigError(f"train.logger: {name!r} is not one of {', '.join(allowed)}"
                                  f"{_suggest(name, list(allowed))} (metrics.csv is always "
                                  "written)")
        if len(set(self.logger)) != len(self.logger):
            raise ConfigError(f"train.logger={list(self.logger)}: names a logger twice")
        self.check_batch_split(1)

    def check_batch_split(self, processes: int, launch: str = "") -> None:
        """The global batch splits evenly over ``processes`` x ``grad_accum_steps``
        micro-batches: the one batch-split rule, run with 1 process on load and with the
        real count where a launch knows it (``launch`` says how it got that count)."""
        parts = processes * self.grad_accum_steps
        if self.batch_size % parts:
            raise ConfigError(
                f"train.batch_size={self.batch_size} (the global batch) cannot be split evenly "
                f"over {processes} process(es){launch} x train.grad_accum_steps="
                f"{self.grad_accum_steps}: use a multiple of {parts}")


@dataclass
class ProbeConfig(_Section):
    KEY: ClassVar[str] = "probe"

    encoder: ProbedEncoder = "target"
    """Which encoder to probe: target (EMA) or context."""
    train_limit: int | None = None
    test_limit: int | None = None
    batch_size: int = 512
    bf16: bool = False
    """Extract the frozen features under bf16 autocast; the probe itself trains in fp32.
    On a 2-core bf16 CPU it extracts 2.4x faster, with the demo run's linear probe equal
    to the last digit (docs/RESULTS.md)."""
    weight_decay: float = 1e-4
    max_iter: int = 200
    """Linear probe: L2 penalty and L-BFGS iterations."""
    attentive_epochs: float = 10.0
    attentive_lr: float = 1e-3
    attentive_weight_decay: float = 0.01
    attentive_batch_size: int = 256
    attentive_heads: int = 4
    """Attentive probe: AdamW (cosine lr decay) on an AttentiveClassifier over frozen tokens."""
    knn_k: int = 20
    knn_temperature: float = 0.07
    """kNN probe: neighbours and the temperature T of the exp(cosine / T) vote weights."""
    seed: int = 0

    def check(self) -> None:
        super().check()
        self._at_least_one("batch_size", "max_iter")
        self._positive("knn_k", "knn_temperature", "attentive_epochs", "attentive_lr",
                       "attentive_batch_size", "attentive_heads")


@dataclass
class FinetuneConfig(_Section):
    """``iwm finetune``: the same budget, data and augmentation for every protocol."""

    KEY: ClassVar[str] = "finetune"

    epochs: float = 5.0
    batch_size: int = 128
    lr: float = 1e-3
    """Base lr: the head, a randomly initialised predictor and the task tokens."""
    predictor_lr_scale: float = 0.1
    """A PRETRAINED predictor trains at lr x this (the paper's 1/10)."""
    encoder_lr_scale: float = 1.0
    """A PRETRAINED encoder (protocols encoder, end-to-end) trains at lr x this; the
    scratch protocol's, randomly initialised, at lr. 1.0: at 0.1 a full-recipe encoder
    ended 4.3 points under scratch, at 1.0 level with it (docs/RESULTS.md)."""
    weight_decay: float = 0.05
    warmup_epochs: float = 0.5
    crop_scale: tuple[float, float] = (1.0, 1.0)
    """Random-resized crop (area fraction); (1, 1) = the whole image, flips only. On
    Fashion-MNIST at 5 epochs crops of 0.5-1 cost the encoder 3.3 points and scratch 3.9
    against none (85.39% vs 88.65%, 83.44% vs 87.30%; docs/RESULTS.md, "No crops")."""
    crop_ratio: tuple[float, float] = (1.0, 1.0)
    """Aspect ratios (w / h) of the crop: squares, as the test view (the centre square).
    With ``crop_scale`` (1, 1) a non-square image then trains on its largest centred
    square, where the pretraining's (3/4, 4/3) would squash the whole image into one."""
    hflip: bool = True
    train_limit: int | None = None
    test_limit: int | None = None
    seg_classes: SegClasses = 3
    """Segmentation labels per patch: 2 (background/foreground) or 3 (+ edge vs interior)."""
    seg_threshold: float = 0.2
    """A patch is foreground if its mean pixel intensity in [0, 1] exceeds this."""
    seed: int = 0
    eval_points: int = 5
    """Test evaluations during finetuning, evenly spaced in steps, the last at the end:
    the ``curve`` of the result (each on the ``test_limit`` images, as the final one)."""
    label_smoothing: float = 0.0
    """Of the cross entropy (0 = none; 0.1 is the usual ViT finetuning value)."""
    layer_decay: float = 1.0
    """Layer-wise lr decay of a PRETRAINED encoder (BEiT / MAE finetuning): block i of
    ``depth`` trains at its lr x layer_decay^(depth - i), the patch embedding one step
    lower, the final norm at the full lr; 1.0 = off."""
    head: FinetuneHead = "attentive"
    """Classification head: attentive (a learned query cross-attends to the tokens) or
    linear (LayerNorm + Linear on the mean-pooled tokens, as MAE finetuning)."""
    head_init: HeadInit = "random"
    """The head's last Linear layer: random (ViT init) or probe, fitted before finetuning
    as a linear probe (L-BFGS logistic regression, ``probe.weight_decay`` and
    ``probe.max_iter``) on the features that enter it, over the training images' centre
    views (LP-FT, Kumar et al. 2022): training starts at the probe's accuracy, and the
    backbone's first steps follow a head that already reads its features. Classification
    only."""

    def check(self) -> None:
        super().check()
        self._positive("epochs", "lr")
        self._at_least_one("batch_size", "eval_points")
        self._fraction("seg_threshold", "label_smoothing")
        self._scale_range("crop_scale")
        self._ratio_range("crop_ratio")
        if not 0 < self.layer_decay <= 1:
            raise ConfigError(f"finetune.layer_decay={self.layer_decay}: needs 0 < value <= 1 "
                              "(1.0 = off; 0.65-0.75 is usual)")


@dataclass
class DecoderConfig(_Section):
    """``iwm decoder RUN``: a small decoder from the frozen target encoder's latents to
    pixels (:mod:`iwm.training.decoder`); its architecture is saved with its weights."""

    KEY: ClassVar[str] = "decoder"

    width: int = 128
    depth: int = 3
    heads: int = 4
    """Transformer blocks of the decoder: ``depth`` timm ViT blocks of ``width`` channels
    and ``heads`` attention heads."""
    epochs: float = 1.0
    """Passes over the training split (``train_limit`` images), fractional allowed. One
    epoch of Fashion-MNIST: 469 steps, about 3 minutes on a CPU thread."""
    batch_size: int = 128
    lr: float = 1e-3
    """Peak AdamW learning rate, after a linear warmup, then cosine to 0."""
    warmup: float = 0.05
    """Fraction of the steps spent warming the learning rate up from 0."""
    weight_decay: float = 0.05
    l1_weight: float = 0.0
    """Loss = pixel MSE + l1_weight x pixel L1 (0: MSE alone, the PSNR's own loss)."""
    jitter_p: float = 0.5
    """Fraction of training images colour-jittered, with factors drawn from the run's view
    ranges (as the MRR bank draws them), so the decoder has rendered brightened or
    desaturated images before it is asked to render a predicted one."""
    crop_scale: tuple[float, float] = (0.5, 1.0)
    """Random-resized-crop area range of the training images (the run's aspect ratios and
    flips): close to the whole images that it decodes, with some variety."""
    train_limit: int | None = None
    """Use only the first N training images."""
    val_images: int = 512
    """Held-out test images whose PSNR is reported at the end (0: none)."""
    seed: int = 0

    def check(self) -> None:
        super().check()
        self._at_least_one("width", "depth", "heads", "batch_size")
        self._positive("epochs", "lr")
        self._non_negative("weight_decay", "l1_weight", "val_images")
        self._fraction("warmup")
        self._scale_range("crop_scale")
        if not 0 <= self.jitter_p <= 1:
            raise ConfigError(f"decoder.jitter_p={self.jitter_p}: a probability must be in "
                              "[0, 1]")
        if self.width % self.heads:
            raise ConfigError(f"decoder.width={self.width} is not divisible by "
                              f"decoder.heads={self.heads}")


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    views: ViewsConfig = field(default_factory=ViewsConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(dataclasses.asdict(self))

    def __post_init__(self) -> None:
        # Each section checked its own values when it was built; these rules span two.
        if self.data.image_size % self.model.patch_size:
            raise ConfigError(
                f"model.patch_size={self.model.patch_size} does not divide "
                f"data.image_size={self.data.image_size}: choose sizes with "
                "image_size % patch_size == 0"
            )


def _to_plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_plain(v) for v in obj]
    return obj


def _suggest(name: str, options: list[str]) -> str:
    close = difflib.get_close_matches(name, options, n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check ``value`` against the annotation ``tp`` (converting lists to tuples, int to float)."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        # The type of its values here; which values are allowed is the section's check.
        return _coerce(key, value, type(typing.get_args(tp)[0]))
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(key, value, arg)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: bad value {value!r}")
    if origin is tuple and typing.get_args(tp)[-1] is Ellipsis:
        # A list of any length; one value alone is a list of one (train.logger=wandb).
        items = value if isinstance(value, (list, tuple)) else [value]
        item = typing.get_args(tp)[0]
        return tuple(_coerce(f"{key}[{i}]", v, item) for i, v in enumerate(items))
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key}={value!r}: expected a list of {len(args)} values")
        pairs = enumerate(zip(value, args, strict=True))
        return tuple(_coerce(f"{key}[{i}]", v, a) for i, (v, a) in pairs)
    if tp is float:
        if isinstance(value, str) and _EXPONENT_FLOAT.fullmatch(value.strip()):
            # YAML 1.1 (PyYAML) reads 1e-3, without a dot, as a string; it means a number.
            return float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}={value!r}: expected a number")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}={value!r}: expected an integer")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}={value!r}: expected true or false")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}={value!r}: expected a string")
        return value
    raise ConfigError(f"{key}: unsupported type {tp}")  # pragma: no cover - schema bug


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(f"unknown config key '{full}'{_suggest(key, names)}")
        tp = hints[key]
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value, f"{full}.")
        else:
            kwargs[key] = _coerce(full, value, tp)
    return cls(**kwargs)


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in update.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """Turn ``["model.predictor_depth=12", ...]`` into a nested dict (values parsed as YAML)."""
    tree: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected key=value, e.g. train.epochs=2")
        try:
            value = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError:
            value = raw
        node = tree
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: '{part}' is not a section")
        node[parts[-1]] = value
    return tree


PRESET_DIR = Path(__file__).parent / "configs"
RUN_CONFIG_FILE = "config.yaml"
"""A run directory's config (:mod:`iwm.training.run_dir` writes it)."""


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def preset_description(name: str) -> str:
    """What a preset is, for ``iwm config``: the first sentence of its YAML's leading
    comment block, so the file stays the one place that describes it."""
    lines = []
    for line in (PRESET_DIR / f"{name}.yaml").read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#").strip())
    return re.split(r"(?<=\.)\s+", " ".join(lines), maxsplit=1)[0]


def resolve_config_path(name_or_path: str | Path) -> Path:
    """A YAML path, a run directory (its config) or the name of a packaged preset
    (``iwm-inv-tiny``)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    if (path / RUN_CONFIG_FILE).is_file():
        return path / RUN_CONFIG_FILE
    preset = PRESET_DIR / f"{name_or_path}.yaml"
    if preset.is_file():
        return preset
    raise ConfigError(
        f"config '{name_or_path}' is neither a file, a run directory nor a preset; "
        f"presets: {', '.join(preset_names())}"
    )


def load_config(source: str | Path | dict[str, Any] | None = None,
                overrides: list[str] | None = None) -> Config:
    """Build a validated :class:`Config` from a preset name, YAML path or dict, plus overrides."""
    data: dict[str, Any] = {}
    if isinstance(source, dict):
        data = source
    elif source is not None:
        path = resolve_config_path(source)
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({e})") from None
    if overrides:
        data = _merge(data, parse_overrides(overrides))
    return _build(Config, data, "")


def save_config(cfg: Config, path: Path) -> None:
    """Write ``cfg`` as YAML, atomically: ``--resume`` reads this file, so a process killed
    mid-write must leave the previous version, not half of one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
