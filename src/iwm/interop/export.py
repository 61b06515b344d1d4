"""Exports of a trained model: the encoder for timm, the whole model for iwm (safetensors).

Both write a folder in the Hugging Face layout, ``config.json`` + ``model.safetensors``
(:mod:`iwm.interop.folder`). ``timm``: the EMA target encoder under timm's own key
names, with a ``config.json`` in timm's hub format (architecture, ``model_args``,
``pretrained_cfg``) so that ``timm.create_model`` builds the iwm encoder. ``safetensors``:
the whole model, written by :meth:`~iwm.api.Pretrained.save_pretrained`. How to load each
is in docs/evaluation.md, "Using the model elsewhere".
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from iwm.api import Pretrained, load
from iwm.errors import IWMError
from iwm.interop.folder import normalization_lists, write_folder
from iwm.models.vit import encoder_spec

EXPORT_FORMATS = ("timm", "safetensors")


def timm_config(model: Pretrained) -> dict[str, Any]:
    """The ``config.json`` of a timm export (timm's hub format, plus an ``iwm`` section)."""
    spec = encoder_spec(model.config.model.encoder)
    size, channels = model.image_size, model.in_chans
    norm = normalization_lists(model.normalize.mean, model.normalize.std)
    # The kwargs that make timm's registry architecture the iwm Encoder: its size, no class
    # token, mean pooling of the final-normed tokens, no extra norm or head.
    model_args = {
        "img_size": size, "patch_size": model.config.model.patch_size, "in_chans": channels,
        "embed_dim": spec.embed_dim, "depth": spec.depth, "num_heads": spec.num_heads,
        "class_token": False, "global_pool": "avg", "fc_norm": False,
    }
    pretrained_cfg = {
        "input_size": [channels, size, size], "fixed_input_size": True,
        # iwm evaluates on the central square resized (bilinear) to the image size.
        "interpolation": "bilinear", "crop_pct": 1.0, "crop_mode": "center",
        "mean": norm["mean"], "std": norm["std"],
        "num_classes": 0, "first_conv": "patch_embed.proj", "classifier": "head",
    }
    return {
        "architecture": spec.timm_name,
        "num_classes": 0,
        "num_features": spec.embed_dim,
        "model_args": model_args,
        "pretrained_cfg": pretrained_cfg,
        "iwm": {"weights": "EMA target encoder", "encoder": model.config.model.encoder,
                "step": model.step, "config": model.config.to_dict()},
    }


def export_timm(model: Pretrained, directory: str | Path) -> Path:
    """Write the target encoder for ``timm.create_model`` (docs/evaluation.md)."""
    return write_folder(Path(directory), model.encoder.state_dict(), timm_config(model))


def export(run_or_checkpoint: str | Path, fmt: str, directory: str | Path,
           device: str | torch.device = "cpu") -> Path:
    """``iwm export``: load a run (or checkpoint, or export) and write it as ``fmt``."""
    if fmt not in EXPORT_FORMATS:
        raise IWMError(f"--format {fmt}: choose from {', '.join(EXPORT_FORMATS)}")
    model = load(run_or_checkpoint, device=device)
    return export_timm(model, directory) if fmt == "timm" else model.save_pretrained(directory)
