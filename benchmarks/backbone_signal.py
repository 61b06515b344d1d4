"""How much of a finetuning backbone's output depends on the image, at initialisation and
over the first steps of training: why a protocol's loss can stay at ln(classes).

The *image dependence* of a (B, N, D) output is the across-image std of every (token,
feature), averaged, over the mean absolute across-image mean: about 1 for tokens that
vary from image to image as much as they are large, 0 for an output the image does not
change. For each protocol's backbone (iwm.evaluation.finetune.build_backbone, seeded as
`iwm finetune` seeds it) on random batches of the run's training images; ``--steps``
trains it with an attentive head (the finetuning optimizer and lr, ``finetune.*``
overrides apply, a linear warmup over the first 20 steps, then constant) and prints the
dependence and the mean train loss every ``--every`` steps; ``--head-only`` freezes the
backbone.

    python benchmarks/backbone_signal.py runs/full/iwm-equi-shapes-s0 --steps 120
    python benchmarks/backbone_signal.py RUN --protocols random-predictor --head-only \
        --steps 120 finetune.lr=3e-4
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from iwm.api import load
from iwm.config import load_config
from iwm.data.datasets import ImageSet
from iwm.evaluation.finetune import (
    build_backbone,
    build_head,
    load_task,
    make_optimizer,
    match_channels,
)
from iwm.training.step import autocast_dtype

WARMUP = 20


def image_dependence(out: Tensor) -> float:
    """Across-image std over mean |across-image mean| of a (B, ...) output."""
    out = out.float()
    return float(out.std(0).mean() / out.mean(0).abs().mean().clamp_min(1e-12))


def trace(run: Path, protocol: str, steps: int, every: int, batch: int, head_only: bool,
          overrides: list[str], seed: int = 0) -> list[dict]:
    pretrained = load(run, device="cpu")
    cfg = load_config(pretrained.config.to_dict(), overrides)
    task = load_task(cfg.data.name, cfg, "classification")
    if not isinstance(task.train, ImageSet):
        raise SystemExit(f"{cfg.data.name}: not a data set held in memory; this diagnostic "
                         "reads the run's images directly (Fashion-MNIST, Shapes, MNIST)")
    torch.manual_seed(cfg.finetune.seed)
    backbone = build_backbone(pretrained, protocol)
    head = build_head("classification", cfg, pretrained.encoder.embed_dim, task.num_classes)
    if head_only:
        backbone.requires_grad_(False)
    optimizer = make_optimizer(backbone, torch.nn.ModuleList([head]), cfg)
    base = [group["lr"] for group in optimizer.param_groups]
    amp = autocast_dtype(cfg, pretrained.device)
    draw = torch.Generator().manual_seed(seed)
    n = len(task.train.images)

    def batch_of(size: int) -> tuple[Tensor, Tensor]:
        i = torch.randint(0, n, (size,), generator=draw)
        images = match_channels(task.train.images[i].float() / 255, pretrained.in_chans)
        return pretrained.normalize(images), task.train.labels[i]

    probe_images, _ = batch_of(batch)  # one fixed batch on which the dependence is read

    def dependence() -> float:
        with torch.no_grad(), torch.autocast("cpu", dtype=amp, enabled=amp is not None):
            return image_dependence(backbone(probe_images))

    rows = [{"protocol": protocol, "step": 0, "dependence": dependence(), "loss": None}]
    losses: list[float] = []
    for step in range(1, steps + 1):
        for group, lr in zip(optimizer.param_groups, base, strict=True):
            group["lr"] = lr * min(1.0, step / WARMUP)
        images, labels = batch_of(batch)
        with torch.autocast("cpu", dtype=amp, enabled=amp is not None):
            loss = F.cross_entropy(head(backbone(images)).float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if step % every == 0 or step == steps:
            rows.append({"protocol": protocol, "step": step, "dependence": dependence(),
                         "loss": sum(losses) / len(losses)})
            losses = []
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("overrides", nargs="*", help="config overrides, e.g. finetune.lr=3e-4")
    ap.add_argument("--protocols", nargs="+", default=["random-predictor", "predictor"])
    ap.add_argument("--steps", type=int, default=0)
    ap.add_argument("--every", type=int, default=30)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--head-only", action="store_true")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_intermixed_args(argv)  # overrides may follow the options
    if args.steps < 0 or args.every < 1 or args.batch < 2:
        ap.error("--steps must be >= 0, --every >= 1 and --batch >= 2 (a std needs two images)")
    rows = []
    for protocol in args.protocols:
        for row in trace(args.run, protocol, args.steps, args.every, args.batch,
                         args.head_only, args.overrides):
            loss = "" if row["loss"] is None else f"  loss {row['loss']:.3f}"
            print(f"{protocol:17s} step {row['step']:5d}  dependence "
                  f"{row['dependence']:.4f}{loss}", flush=True)
            rows.append(row)
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
