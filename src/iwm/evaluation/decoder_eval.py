"""``iwm eval decoder RUN``: how well the latent decoder renders, and what it shows the
world model doing. Writes ``RUN/results/decoder.json``.

1. **Reconstruction.** PSNR and SSIM of ``decode(encode(x))`` on held-out test images,
   beside those of the images' own mean image (what a decoder ignoring its input gets).
2. **Factors.** For every jitter factor the run's images can vary, each image gets a
   requested value drawn uniformly from :data:`RANGES`; the factor is then measured
   (:mod:`iwm.evaluation.photometry`) on four images against the requested one:

   - ``real``: the really transformed image, against the source (the truth, clipping
     included);
   - ``real_decoded``: that image encoded and decoded, against the decoded source (the
     decoder's ceiling);
   - ``predicted``: the world model's prediction for the action, decoded, against the
     decoded source;
   - ``null``: the prediction for the null action, decoded (no world model: slope 0).

   Each is a least-squares line of measured on requested: log ratio on log factor for
   brightness, contrast and saturation, turns on turns for hue. Slope 1 means the
   decoded prediction changes as much as asked; R^2 how consistently. ``psnr_to_real``
   scores the three decoded images against the real transformed one.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from iwm.api import Pretrained
from iwm.config import Config
from iwm.data.actions import DestructiveParams, JitterParams, build_action
from iwm.data.datasets import get_dataset
from iwm.data.factors import JITTER_FACTORS, acts_on
from iwm.data.sources import iter_eval_batches
from iwm.data.views import STRENGTHS, jitter_ranges
from iwm.errors import DataError
from iwm.evaluation.imagine import render_jitter, require_decoder
from iwm.evaluation.photometry import LineFit, fit_line, measure_factor, psnr, ssim
from iwm.evaluation.results import write_result

__all__ = ["RANGES", "RESULT_NAME", "SETTINGS", "evaluate_decoder", "held_out_images",
           "reconstruction_psnr", "run_decoder_eval"]

RANGES: dict[str, tuple[float, float]] = jitter_ranges(STRENGTHS["jitter"])
"""Requested factors are uniform in these (the 'jitter' preset's, hue in turns): inside
every IWM preset's training ranges, so no question is out of the world model's
distribution. Brightness and contrast [0.6, 1.4], saturation [0.8, 1.2], hue +-0.1."""
RESULT_NAME = "decoder"
SETTINGS = ("real", "real_decoded", "predicted", "null")
MULTIPLICATIVE = ("brightness", "contrast", "saturation")


def held_out_images(cfg: Config, n: int, device: torch.device | str) -> Tensor:
    """The first ``n`` test images of the run's data set, centre views in [0, 1]."""
    dataset = get_dataset(cfg.data.name, "test", cfg.data.root, holdout=cfg.data.holdout)
    batches = [b for b, _ in iter_eval_batches(dataset, 256, cfg.data.image_size, device,
                                               limit=n)]
    if not batches:
        raise DataError(f"{cfg.data.name}: the test split has no images")
    return torch.cat(batches)


@torch.no_grad()
def reconstruction_psnr(model: Pretrained, images: Tensor, batch_size: int = 256
                        ) -> tuple[float, float]:
    """Mean PSNR (dB) of ``decode(encode(images))``, and that of the images' mean image."""
    scores = torch.cat([psnr(model.decode(model.encode(chunk)), chunk).cpu()
                        for chunk in images.split(batch_size)])
    mean_image = images.mean(0, keepdim=True).expand_as(images)
    return float(scores.mean()), float(psnr(mean_image, images).mean())


def _requested_space(factor: str, values: Tensor) -> Tensor:
    return values.log() if factor in MULTIPLICATIVE else values


def _fit_dict(fit: LineFit) -> dict[str, float | int | None]:
    return {"slope": fit.slope, "intercept": fit.intercept, "r2": fit.r2, "n": fit.n}


@torch.no_grad()
def _batch(model: Pretrained, x: Tensor, factors: tuple[str, ...],
           generator: torch.Generator) -> dict[str, Any]:
    """Per-image scores of one batch (lists of (B,) CPU tensors, keyed as the result)."""
    b, device = len(x), model.device
    tokens = model.encode(x)
    source_dec = model.decode(tokens)
    null_dec = model.decode(model.apply(tokens, None))
    out: dict[str, Any] = {"psnr": psnr(source_dec, x).cpu(), "ssim": ssim(source_dec, x).cpu()}
    for factor in factors:
        lo, hi = RANGES[factor]
        requested = lo + (hi - lo) * torch.rand(b, generator=generator)
        real = render_jitter(x, {factor: requested})
        jitter = JitterParams.identity(b, device)
        setattr(jitter, factor, requested.to(device))
        jitter.applied = torch.ones(b, dtype=torch.bool, device=device)
        action = build_action(jitter, JitterParams.identity(b, device),
                              DestructiveParams.identity(b, device))
        predicted = model.decode(model.apply(tokens, action))
        real_dec = model.decode(model.encode(real))
        images = {"real": (real, x), "real_decoded": (real_dec, source_dec),
                  "predicted": (predicted, source_dec), "null": (null_dec, source_dec)}
        out[factor] = {
            "requested": requested,
            **{name: measure_factor(factor, a, ref).cpu() for name, (a, ref) in images.items()},
            "psnr_to_real": {name: psnr(images[name][0], real).cpu()
                             for name in ("real_decoded", "predicted", "null")}}
    return out


def evaluate_decoder(model: Pretrained, images: Tensor, generator: torch.Generator | None = None,
                     batch_size: int = 64) -> dict[str, Any]:
    """The scores of the module docstring on ``images`` (B, C, H, W) in [0, 1], at the
    model's channels and size; ``generator`` (CPU, default seeded 0) draws the factors."""
    require_decoder(model)
    images = model.check_images(images).to(model.device, torch.float32)
    if not len(images):
        raise ValueError("evaluate_decoder: no images")
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    channels = images.shape[1]
    factors = tuple(f for f in JITTER_FACTORS if acts_on(f, channels))
    parts = [_batch(model, chunk, factors, generator) for chunk in images.split(batch_size)]

    def cat(get: Any) -> Tensor:
        return torch.cat([get(p) for p in parts])

    mean_image = images.mean(0, keepdim=True).expand_as(images)
    result: dict[str, Any] = {
        "psnr": float(cat(lambda p: p["psnr"]).mean()),
        "ssim": float(cat(lambda p: p["ssim"]).mean()),
        "mean_image_psnr": float(psnr(mean_image, images).mean()),
        "mean_image_ssim": float(ssim(mean_image, images).mean()),
        "n_images": len(images), "factors": {},
        "notes": {f: "no-op on 1-channel images" for f in JITTER_FACTORS if f not in factors},
    }
    for factor in factors:
        requested = cat(lambda p, f=factor: p[f]["requested"])
        x = _requested_space(factor, requested)
        entry: dict[str, Any] = {"range": list(RANGES[factor]),
                                 "space": "log" if factor in MULTIPLICATIVE else "turns"}
        for name in SETTINGS:
            measured = cat(lambda p, f=factor, n=name: p[f][n])
            entry[name] = _fit_dict(fit_line(x, _requested_space(factor, measured)))
        entry["psnr_to_real"] = {
            name: float(cat(lambda p, f=factor, n=name: p[f]["psnr_to_real"][n]).mean())
            for name in ("real_decoded", "predicted", "null")}
        result["factors"][factor] = entry
    return result


def run_decoder_eval(run_dir: str | Path, n_images: int = 512, seed: int = 0,
                     device: str = "auto", batch_size: int = 64) -> dict[str, Any]:
    """:func:`evaluate_decoder` of a run on its first ``n_images`` test images; writes and
    returns ``RUN/results/decoder.json`` (plus ``path``)."""
    from iwm.api import load
    from iwm.training.distributed import resolve_device

    if n_images < 1 or batch_size < 1:
        raise ValueError(f"n_images={n_images}, batch_size={batch_size}: must be at least 1")
    start = time.perf_counter()
    model = load(run_dir, device=resolve_device(device))
    require_decoder(model, run_dir)
    images = held_out_images(model.config, n_images, model.device)
    result = evaluate_decoder(model, images, torch.Generator().manual_seed(seed), batch_size)
    result.update(seed=seed, step=model.step,
                  decoder_val_psnr=model.decoder_info.get("train", {}).get("val_psnr"),
                  seconds=time.perf_counter() - start)
    path = write_result(run_dir, RESULT_NAME, result)
    return {**result, "path": str(path)}
