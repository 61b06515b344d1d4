"""Collapse monitors of a pretraining run: RankMe and an online kNN accuracy.

A JEPA's loss can fall while its features become useless: a target encoder that maps
every image to (almost) the same point is trivially predictable. Every
``train.monitor_every`` steps (and at the last step) :class:`Monitor`
embeds a FIXED set of images with the target (EMA) encoder, mean-pooled as the probes
see it, and logs

* ``rankme``: the effective rank of those embeddings (Garrido et al., ICML 2023),
  ``exp(-sum_k p_k log p_k)`` with ``p_k = s_k / sum(s) + eps`` over their singular
  values ``s``; ``rankme_ratio`` is it divided by its ceiling, min(images, dim);
* ``knn_acc``: the top-1 accuracy of the weighted kNN classifier of
  :mod:`iwm.evaluation.knn` (``probe.knn_k``, ``probe.knn_temperature``), with a bank of
  :data:`BANK_IMAGES` training images, on the held-out images; only for labelled data.

The held-out images are the first :data:`HELD_OUT_IMAGES` of the test split, or, for a
data set without one, training images left out of the bank. They never change during a
run (nor across ``--resume``), so values at different steps compare. A collapse (see
:func:`collapse_warning`; thresholds measured in docs/reliability.md) is said in a
one-line warning.

Every process runs the monitor on the same images (with FSDP the target encoder's
forward is collective, so all must); only the main process logs and warns. A monitor
step reads its results on the host, like a log step.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor

from iwm.config import Config
from iwm.data.datasets import SHARDS_PREFIX, FolderSet, ImageSet, get_dataset
from iwm.data.normalize import Normalizer
from iwm.data.sources import iter_eval_batches
from iwm.errors import DataError
from iwm.evaluation.knn import knn_predict
from iwm.models.vit import Encoder

HELD_OUT_IMAGES = 512
"""Images RankMe and the kNN queries use: RankMe cannot exceed min(images, dim)."""
BANK_IMAGES = 1024
"""Labelled training images the kNN classifier votes with."""
RANK_EPS = 1e-7
"""RankMe's epsilon: keeps log p finite for zero singular values."""

RANK_COLLAPSE = 2.0
"""Warn when RankMe falls below this many effective dimensions: a constant embedding has
exactly 1 (its mean direction); measured values in docs/reliability.md."""
TARGET_STD_COLLAPSE = 0.05
"""Warn when a log step's target_std falls below this (measured values in
docs/reliability.md)."""


def effective_rank(features: Tensor, eps: float = RANK_EPS) -> Tensor:
    """RankMe of ``features`` (N, D): exp of the entropy of the normalised singular values.

    Not centred, as in the paper: a constant embedding has rank 1, not an undefined one.
    """
    s = torch.linalg.svdvals(features.float())
    p = s / s.sum().clamp_min(torch.finfo(s.dtype).tiny) + eps
    return torch.exp(-(p * p.log()).sum())


def collapse_warning(step: int, measured: Measured | None,
                     target_std: float | None) -> str | None:
    """The warning for a collapsed run at ``step``, or None when nothing says so."""
    signs = []
    if measured is not None and measured.rankme < RANK_COLLAPSE:
        signs.append(f"effective rank {measured.rankme:.2f} of {measured.ceiling} (below "
                     f"{RANK_COLLAPSE:g})")
    if target_std is not None and target_std < TARGET_STD_COLLAPSE:
        signs.append(f"target_std {target_std:.2g} (below {TARGET_STD_COLLAPSE:g})")
    if not signs:
        return None
    return (f"possible collapse at step {step}: {' and '.join(signs)}; the target "
            "encoder maps images to nearly one point, so a falling loss means nothing; "
            "see docs/reliability.md#monitoring-a-run")


@dataclass(frozen=True)
class Measured:
    """One monitor measurement."""

    rankme: float
    ceiling: int
    """RankMe's maximum: min(images, embedding dim)."""
    knn_acc: float | None
    """None without labels."""
    seconds: float

    def row(self) -> dict[str, float]:
        """The metrics: ``rankme``, ``rankme_ratio``, ``knn_acc`` and ``monitor_s``."""
        row = {"rankme": self.rankme, "rankme_ratio": self.rankme / self.ceiling}
        if self.knn_acc is not None:
            row["knn_acc"] = self.knn_acc
        return {**row, "monitor_s": self.seconds}


@dataclass
class Monitor:
    """The fixed monitor images (on the CPU, as uint8 to keep them small) and labels."""

    held_out: Tensor
    """(N, C, S, S) uint8: RankMe's images and the kNN queries."""
    held_out_labels: Tensor | None
    bank: Tensor | None
    """(M, C, S, S) uint8 labelled training images, or None without labels."""
    bank_labels: Tensor | None
    source: str
    """Where the held-out images come from, for the start-of-run note."""
    batch_size: int
    k: int
    temperature: float

    @classmethod
    def create(cls, cfg: Config) -> Monitor | None:
        """The monitor of ``cfg``'s data, or None if ``train.monitor_every`` is 0 or the
        data cannot be read by index (tar shards)."""
        if cfg.train.monitor_every == 0 or cfg.data.name.strip().lower().startswith(
                SHARDS_PREFIX):
            return None
        d = cfg.data
        train = get_dataset(d.name, "train", d.root, holdout=d.holdout).subset(d.limit)
        try:
            test: ImageSet | FolderSet | None = get_dataset(d.name, "test", d.root,
                                                            holdout=d.holdout)
        except DataError:  # no test split (e.g. an image folder with data.holdout=0)
            test = None
        labelled = len(train.classes) > 1
        size, batch = d.image_size, cfg.probe.batch_size
        if test is not None and len(test) > 0:
            held, held_y = _images(test, HELD_OUT_IMAGES, size, batch)
            source = f"{len(held)} images of the test split"
            bank, bank_y = _images(train, BANK_IMAGES, size, batch) if labelled else (None,
                                                                                     None)
        else:
            # One draw of images, split: a third held out, the rest the bank.
            wanted = HELD_OUT_IMAGES + (BANK_IMAGES if labelled else 0)
            images, labels = _images(train, wanted, size, batch)
            out = torch.arange(len(images)) % 3 == 2 if labelled else torch.ones(
                len(images), dtype=torch.bool)
            held, held_y = images[out][:HELD_OUT_IMAGES], labels[out][:HELD_OUT_IMAGES]
            bank, bank_y = (images[~out], labels[~out]) if labelled else (None, None)
            source = f"{len(held)} training images (the data set has no test split)"
        if bank is not None and (bank_y is None or len(bank) < 2 or int(bank_y.min()) < 0):
            bank = bank_y = None  # unlabelled images (label -1): no kNN
        return cls(held, held_y if bank is not None else None, bank, bank_y, source, batch,
                   cfg.probe.knn_k, cfg.probe.knn_temperature)

    @torch.no_grad()
    def measure(self, encoder: Encoder, normalize: Normalizer, device: torch.device,
                amp_dtype: torch.dtype | None) -> Measured:
        """Embed the monitor images with ``encoder`` (in eval mode, restored after)."""
        start = time.perf_counter()
        was_training = encoder.training
        encoder.eval()
        try:
            held = self._embed(encoder, normalize, self.held_out, device, amp_dtype)
            bank = (None if self.bank is None
                    else self._embed(encoder, normalize, self.bank, device, amp_dtype))
        finally:
            encoder.train(was_training)
        values = [effective_rank(held)]
        if bank is not None:
            assert self.bank_labels is not None and self.held_out_labels is not None
            classes = int(max(self.bank_labels.max(), self.held_out_labels.max())) + 1
            pred = knn_predict(bank, self.bank_labels.to(device), held, self.k,
                               self.temperature, num_classes=classes)
            values.append((pred == self.held_out_labels.to(device)).double().mean())
        got = torch.stack([v.double() for v in values]).tolist()  # the one host read
        return Measured(rankme=got[0], ceiling=min(held.shape),
                        knn_acc=got[1] if bank is not None else None,
                        seconds=time.perf_counter() - start)

    def _embed(self, encoder: Encoder, normalize: Normalizer, images: Tensor,
               device: torch.device, amp_dtype: torch.dtype | None) -> Tensor:
        out = []
        for start in range(0, len(images), self.batch_size):
            x = images[start:start + self.batch_size].to(device, non_blocking=True)
            x = normalize(x.float() / 255)
            if amp_dtype is not None:
                with torch.autocast(device.type, dtype=amp_dtype):
                    out.append(encoder(x).float())
            else:
                out.append(encoder(x).float())
        return torch.cat(out)


@dataclass
class CollapseAlarm:
    """Warns :func:`collapse_warning` once per run (the CLI prints it as one line
    ``iwm: warning: ...``, whatever ``train.progress`` says): a collapsed run stays
    collapsed, and a warning at every log step would bury the rest of the log."""

    enabled: bool
    """Whether this process warns (the main one)."""
    warned: bool = False

    def check(self, step: int, target_std: float | None,
              measured: Measured | None = None) -> None:
        """``measured``: this step's monitor measurement, if there is one."""
        if self.warned:
            return
        message = collapse_warning(step, measured, target_std)
        if message is not None:
            self.warned = True
            if self.enabled:
                warnings.warn(message, UserWarning, stacklevel=2)


def _images(data: ImageSet | FolderSet, limit: int, size: int, batch: int
            ) -> tuple[Tensor, Tensor]:
    """The first ``limit`` centre views of ``data`` (its subset), uint8 on the CPU."""
    images, labels = [], []
    for x, y in iter_eval_batches(data, batch, size, "cpu", limit=limit):
        images.append((x * 255).round().clamp(0, 255).to(torch.uint8))
        labels.append(y.long())
    if not images:
        raise DataError(f"{data.name}: no readable images to monitor the run on; set "
                        "train.monitor_every=0")
    return torch.cat(images), torch.cat(labels)
