"""Frozen-encoder probes of a run: ``iwm eval probe RUN --kind linear|attentive|knn``.

``iwm probe RUN`` is the linear one. All kinds extract the features once (no augmentation)
and never backpropagate into the encoder. linear and knn use mean-pooled features (N, D);
attentive needs every token, kept as one float16 tensor on the CPU (N x T x D x 2 bytes:
~1.1 GB for Fashion-MNIST's 60k train images with vit_tiny, patch 4) and moved to the
device a minibatch at a time. Use ``probe.train_limit`` where that does not fit.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
from torch import Tensor

from iwm.config import Config
from iwm.data.datasets import get_dataset, require_labels
from iwm.data.normalize import Normalizer
from iwm.data.sources import tracked_eval_batches
from iwm.errors import ConfigError
from iwm.evaluation.attentive_probe import train_attentive_probe
from iwm.evaluation.knn import train_knn_probe
from iwm.evaluation.linear_probe import ProbeResult, train_linear_probe
from iwm.evaluation.results import write_result
from iwm.models.vit import Encoder
from iwm.training.distributed import resolve_device

PROBE_KINDS = ("linear", "attentive", "knn")


def _map_split(cfg: Config, split: str, limit: int | None, device: torch.device,
               fn: Callable[[Tensor], Tensor], progress: bool = True
               ) -> tuple[Tensor, Tensor]:
    """``fn`` of every batch of a split's centre views (no augmentation), concatenated on
    the CPU, and the labels; under bf16 autocast with ``probe.bf16``."""
    dataset = get_dataset(cfg.data.name, split, cfg.data.root, holdout=cfg.data.holdout)
    require_labels(dataset, "a probe")
    batches = tracked_eval_batches(dataset, cfg.probe.batch_size, cfg.data.image_size, device,
                                   f"features of {split}", limit=limit, progress=progress)
    outs, labels = [], []
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16,
                                         enabled=cfg.probe.bf16):
        for images, y in batches:
            outs.append(fn(images).cpu())
            labels.append(y.cpu())
    return torch.cat(outs), torch.cat(labels)


def extract_features(encoder: Encoder, normalize: Normalizer | Callable[[Tensor], Tensor],
                     cfg: Config, split: str,
                     limit: int | None, device: torch.device,
                     pool: bool = True, progress: bool = True) -> tuple[Tensor, Tensor]:
    """Frozen features and labels of a data split (no augmentation), on the CPU: average-pooled
    (N, D) float32, or with ``pool=False`` every token (N, T, D) in float16 (half the memory;
    the consumer upcasts each minibatch)."""
    encoder.eval()

    def features(images: Tensor) -> Tensor:
        tokens = encoder.forward_tokens(normalize(images))
        return tokens.mean(1).float() if pool else tokens.half()

    return _map_split(cfg, split, limit, device, features, progress)


def probe_encoder(encoder: Encoder, normalize: Normalizer | Callable[[Tensor], Tensor],
                  cfg: Config, device: torch.device, kind: str = "linear",
                  progress: bool = True) -> ProbeResult:
    """Probe a frozen encoder with ``cfg.probe`` settings; top-1 accuracy on the test split.
    ``normalize`` maps [0, 1] images to the encoder's input (finetuning's baselines also
    convert another data set's channels there). ``progress``: of the feature extraction,
    see :mod:`iwm.console`."""
    if kind not in PROBE_KINDS:
        raise ConfigError(f"probe kind {kind!r}: must be one of {', '.join(PROBE_KINDS)}")
    p = cfg.probe
    # Checked here, before minutes of feature extraction: the width is the encoder's.
    if kind == "attentive" and encoder.embed_dim % p.attentive_heads:
        raise ConfigError(f"probe.attentive_heads={p.attentive_heads} does not divide the "
                          f"encoder width {encoder.embed_dim}")
    pool = kind != "attentive"
    train_x, train_y = extract_features(encoder, normalize, cfg, "train", p.train_limit, device,
                                        pool, progress)
    test_x, test_y = extract_features(encoder, normalize, cfg, "test", p.test_limit, device,
                                      pool, progress)
    if kind == "attentive":
        return train_attentive_probe(
            train_x, train_y, test_x, test_y, epochs=p.attentive_epochs, lr=p.attentive_lr,
            weight_decay=p.attentive_weight_decay, batch_size=p.attentive_batch_size,
            num_heads=p.attentive_heads, device=device, seed=p.seed)
    if kind == "knn":
        return train_knn_probe(train_x.to(device), train_y, test_x, test_y, p.knn_k,
                               p.knn_temperature)
    return train_linear_probe(train_x, train_y, test_x, test_y, p.weight_decay, p.max_iter)


def probe_pixels(cfg: Config, device: torch.device, progress: bool = True) -> ProbeResult:
    """The linear probe on raw pixels: the floor any encoder must beat. Same splits,
    limits and solver settings (``cfg.probe``) as :func:`probe_encoder`'s linear probe; the
    probe standardises each pixel, so the data set's normalisation would change nothing."""
    p = cfg.probe
    def pixels(images: Tensor) -> Tensor:  # flattened centre views in [0, 1]
        return images.flatten(1).float()

    return train_linear_probe(*_map_split(cfg, "train", p.train_limit, device, pixels, progress),
                              *_map_split(cfg, "test", p.test_limit, device, pixels, progress),
                              weight_decay=p.weight_decay, max_iter=p.max_iter)


def run_linear_probe(run_dir: Path, overrides: list[str] | None = None,
                     device: str = "auto") -> dict:
    """``iwm probe RUN``: :func:`run_probe` with ``kind="linear"``."""
    return run_probe(run_dir, "linear", overrides, device)


def run_probe(run_dir: Path, kind: str = "linear", overrides: list[str] | None = None,
              device: str = "auto", progress: bool = True) -> dict:
    """Probe the run's encoder; writes and returns ``RUN/results/probe_<kind>.json``."""
    from iwm.api import load
    from iwm.config import load_config

    dev = resolve_device(device)
    pretrained = load(run_dir, device=dev)
    cfg = load_config(pretrained.config.to_dict(), overrides)
    encoder = pretrained.encoder if cfg.probe.encoder == "target" else pretrained.context_encoder
    start = time.perf_counter()
    result = probe_encoder(encoder, pretrained.normalize, cfg, dev, kind, progress)
    out = {**asdict(result), "kind": kind, "encoder": cfg.probe.encoder,
           "dataset": cfg.data.name,
           "step": pretrained.step, "encoder_fingerprint": encoder.fingerprint(),
           "seconds": time.perf_counter() - start,
           "probe_config": asdict(cfg.probe)}  # k, T, epochs, limits...: to reproduce it
    path = write_result(run_dir, f"probe_{kind}", out)
    return {**out, "path": str(path)}
