"""Frozen-encoder linear probe of a run (``iwm probe RUN``)."""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

import torch
from torch import Tensor

from iwm.config import Config
from iwm.data.datasets import get_dataset
from iwm.data.sources import iter_eval_batches
from iwm.evaluation.linear_probe import ProbeResult, train_linear_probe
from iwm.models.vit import Encoder
from iwm.training.distributed import resolve_device
from iwm.training.loop import Normalizer


@torch.no_grad()
def extract_features(encoder: Encoder, normalize: Normalizer, cfg: Config, split: str,
                     limit: int | None, device: torch.device) -> tuple[Tensor, Tensor]:
    """Average-pooled frozen features and labels of a data split (no augmentation)."""
    encoder.eval()
    dataset = get_dataset(cfg.data.name, split, cfg.data.root)
    feats, labels = [], []
    for images, y in iter_eval_batches(dataset, cfg.probe.batch_size, cfg.data.image_size,
                                       device, limit=limit):
        feats.append(encoder.forward_tokens(normalize(images)).mean(1).float().cpu())
        labels.append(y.cpu())
    return torch.cat(feats), torch.cat(labels)


def probe_encoder(encoder: Encoder, normalize: Normalizer, cfg: Config,
                  device: torch.device) -> ProbeResult:
    p = cfg.probe
    train_x, train_y = extract_features(encoder, normalize, cfg, "train", p.train_limit, device)
    test_x, test_y = extract_features(encoder, normalize, cfg, "test", p.test_limit, device)
    return train_linear_probe(train_x, train_y, test_x, test_y, p.weight_decay, p.max_iter)


def run_linear_probe(run_dir: Path, overrides: list[str] | None = None,
                     device: str = "auto") -> dict:
    """Probe the run's encoder; writes and returns ``RUN/results/probe_linear.json``."""
    from iwm.api import load
    from iwm.config import load_config

    dev = resolve_device(device)
    pretrained = load(run_dir, device=dev)
    cfg = load_config(pretrained.config.to_dict(), overrides)
    encoder = pretrained.encoder if cfg.probe.encoder == "target" else pretrained.context_encoder
    start = time.perf_counter()
    result = probe_encoder(encoder, pretrained.normalize, cfg, dev)
    out = {**asdict(result), "encoder": cfg.probe.encoder, "step": pretrained.step,
           "seconds": time.perf_counter() - start}
    results_dir = Path(run_dir) / "results"
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / "probe_linear.json"
    path.write_text(json.dumps(out, indent=2))
    return {**out, "path": str(path)}
