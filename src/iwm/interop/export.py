"""Exports of a trained model: the encoder for timm, the whole model for iwm (safetensors).

Both write a folder in the Hugging Face layout, ``config.json`` + ``model.safetensors``:

``timm``
    The EMA target encoder (the one iwm evaluates) under timm's own key names, and a
    ``config.json`` in timm's hub format (architecture, ``model_args``, ``pretrained_cfg``
    with the run's input size and normalisation). Load it with either of::

        timm.create_model("local-dir:DIR", pretrained=True)
        cfg = json.loads((DIR / "config.json").read_text())
        timm.create_model(cfg["architecture"], pretrained=True, num_classes=0,
                          pretrained_cfg_overlay=dict(file=str(DIR / "model.safetensors")),
                          **cfg["model_args"])

    and ``model(normalised_images)`` gives the features of ``Pretrained.encode(images,
    pooled=True)``. The second form needs only the weights file and the kwargs; timm then
    loads non-strictly (its registry entry has a 1000-class head), which is why the tests
    compare every tensor instead of trusting timm's key check.

``safetensors``
    Encoder, target encoder and predictor (the ``IWM`` module's state dict) plus a
    ``config.json`` with the run's config, input channels, normalisation and step:
    everything :func:`iwm.from_pretrained` (or :func:`iwm.load`) needs to rebuild the
    :class:`~iwm.api.Pretrained`, without pickles (safetensors cannot run code on load).
    :meth:`~iwm.api.Pretrained.save_pretrained` writes it; the folder format itself is
    :mod:`iwm.interop.folder`'s.
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
    """Write the target encoder for ``timm.create_model`` (see the module docstring)."""
    return write_folder(Path(directory), model.encoder.state_dict(), timm_config(model))


def export(run_or_checkpoint: str | Path, fmt: str, directory: str | Path,
           device: str | torch.device = "cpu") -> Path:
    """``iwm export``: load a run (or checkpoint, or export) and write it as ``fmt``."""
    if fmt not in EXPORT_FORMATS:
        raise IWMError(f"--format {fmt}: choose from {', '.join(EXPORT_FORMATS)}")
    model = load(run_or_checkpoint, device=device)
    return export_timm(model, directory) if fmt == "timm" else model.save_pretrained(directory)
