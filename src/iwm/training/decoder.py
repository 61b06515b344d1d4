"""``iwm decoder RUN``: train a latent decoder on a run's frozen target encoder.

The decoder (:class:`iwm.models.decoder.LatentDecoder`) learns to render the target
encoder's tokens as pixels, on the run's own training data: random resized crops
(``decoder.crop_scale``, the run's aspect ratios and flips), a share of them
(``decoder.jitter_p``) colour-jittered over the run's view ranges, so that a decoded
prediction of a brightened image is an image it has learnt to draw. The encoder never
changes: it runs without autograd, in eval mode. AdamW with a linear warmup and cosine
decay; loss = MSE (+ ``decoder.l1_weight`` x L1) in pixel space. At the end the PSNR on
held-out test images is measured beside that of their mean image, and the decoder is
saved to ``RUN/decoder/`` with the step and fingerprint of the encoder it reads, so
:func:`iwm.load` can refuse it once the run has trained on.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from iwm.api import Pretrained
from iwm.config import Config
from iwm.console import Progress, say
from iwm.data.sources import StreamingBatchSource, derive_seed, make_source
from iwm.data.views import ViewSampler, resolve_view_params
from iwm.errors import DataError
from iwm.evaluation.bank import bank_view_params
from iwm.evaluation.decoder_eval import held_out_images, reconstruction_psnr
from iwm.interop.folder import DECODER_DIR, write_decoder
from iwm.models.attention import resolve_attention, set_attention
from iwm.models.decoder import DecoderSpec, LatentDecoder, decoder_meta
from iwm.training.schedules import warmup_cosine
from iwm.training.step import autocast_dtype

LOG_POINTS = 10
"""Loss reports per training (lines in a log, the bar's postfix on a terminal)."""


def _param_groups(module: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    # As in pretraining: matrices decay; biases, norms and the position embedding do not.
    decay = [p for n, p in module.named_parameters() if p.ndim >= 2 and n != "pos_embed"]
    ids = {id(p) for p in decay}
    rest = [p for p in module.parameters() if id(p) not in ids]
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": rest, "weight_decay": 0.0}]


def train_decoder(pretrained: Pretrained, cfg: Config, progress: bool = True
                  ) -> LatentDecoder:
    """Train a decoder for ``pretrained``'s target encoder with ``cfg.decoder`` on
    ``cfg.data``'s training split, and attach it: afterwards ``pretrained.decode`` uses
    it and ``pretrained.decoder_info`` holds its ``decoder.json`` (spec, encoder step and
    fingerprint, and under ``train`` the steps, time, final loss and held-out PSNR)."""
    dc = cfg.decoder
    device = pretrained.device
    start = time.perf_counter()
    torch.manual_seed(dc.seed)
    encoder = pretrained.encoder.eval()
    spec = DecoderSpec.for_encoder(encoder, dc.width, dc.depth, dc.heads)
    decoder = LatentDecoder(spec).to(device)
    kernel = resolve_attention(cfg.train.attention, device)
    set_attention(decoder, kernel)
    set_attention(encoder, kernel)  # a speed choice only: the tokens are the same

    data_cfg = dataclasses.replace(cfg.data, crop_scale=dc.crop_scale, limit=dc.train_limit)
    source = make_source(data_cfg, dc.batch_size, device, derive_seed("decoder", dc.seed))
    if source.channels != pretrained.in_chans:
        raise DataError(f"{cfg.data.name} has {source.channels}-channel images, the encoder "
                        f"takes {pretrained.in_chans}: train the decoder on the run's data")
    # Read before training: a data set without a test split fails now, not after it.
    held_out = held_out_images(cfg, dc.val_images, device) if dc.val_images else None
    views = dataclasses.replace(bank_view_params(resolve_view_params(cfg.views)),
                                jitter_p=dc.jitter_p)
    sampler = ViewSampler(views, source.channels, cfg.data.image_size)
    generator = torch.Generator().manual_seed(derive_seed("decoder-jitter", dc.seed))

    total = max(1, round(dc.epochs * len(source)))
    optimizer = torch.optim.AdamW(_param_groups(decoder, dc.weight_decay), lr=dc.lr,
                                  fused=device.type == "cuda")
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: warmup_cosine(s, total, dc.warmup * total, 0.0, 1.0, 0.0))
    amp = autocast_dtype(cfg, device)
    decoder.train()
    loss = torch.zeros((), device=device)
    bar = Progress(total, "decoder", unit="step", enabled=progress, auto=False)
    try:
        for step in range(total):
            crops, _ = source.next()
            images = sampler.apply_jitter(crops, sampler.sample_jitter(len(crops), generator,
                                                                       device))
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                with torch.no_grad():
                    tokens = encoder.forward_tokens(pretrained.normalize(images))
                out = decoder(tokens)
            loss = F.mse_loss(out, images)
            if dc.l1_weight:
                loss = loss + dc.l1_weight * F.l1_loss(out, images)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            bar.update()
            if progress and ((step + 1) % max(1, total // LOG_POINTS) == 0
                             or step + 1 == total):
                bar.log({"loss": f"{loss.item():.5f}"})
    finally:
        bar.close()
        if isinstance(source, StreamingBatchSource):
            source.close()  # stop its decoding workers now, not at garbage collection
    decoder.eval()
    seconds = time.perf_counter() - start
    summary: dict[str, Any] = {
        "steps": total, "batch_size": dc.batch_size, "images_seen": total * dc.batch_size,
        "n_train": source.num_images, "seconds": seconds, "final_loss": loss.item(),
        "decoder_config": dataclasses.asdict(dc)}
    pretrained.decoder = decoder
    if held_out is not None:
        val, mean_image = reconstruction_psnr(pretrained, held_out)
        summary.update(val_psnr=val, val_mean_image_psnr=mean_image, val_images=len(held_out))
    pretrained.decoder_info = decoder_meta(decoder, encoder, pretrained.step, train=summary)
    return decoder


def run_decoder(run_dir: Path, overrides: list[str] | None = None, device: str = "auto",
                progress: bool = True) -> dict[str, Any]:
    """``iwm decoder RUN``: train a decoder for the run's latest checkpoint and save it to
    ``RUN/decoder/`` (replacing any earlier one); returns its ``decoder.json`` contents
    plus ``path``. Afterwards ``iwm.load(RUN)`` has it (``model.decode``)."""
    from iwm.api import load, resolve_checkpoint
    from iwm.config import load_config
    from iwm.training.distributed import resolve_device

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise DataError(f"{run_dir}: not a run directory; pass the folder `iwm pretrain` "
                        "wrote (the decoder is saved inside it)")
    resolve_checkpoint(run_dir)  # a run without a checkpoint fails before anything else
    pretrained = load(run_dir, device=resolve_device(device))
    cfg = load_config(pretrained.config.to_dict(), overrides)
    say(f"training a latent decoder on the encoder of step {pretrained.step} "
        f"({cfg.decoder.width} wide, depth {cfg.decoder.depth})", progress)
    decoder = train_decoder(pretrained, cfg, progress)
    folder = write_decoder(run_dir / DECODER_DIR, decoder.state_dict(),
                           pretrained.decoder_info)
    return {**pretrained.decoder_info, "path": str(folder)}
