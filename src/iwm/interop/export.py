"""Exports of a trained model: the encoder for timm, the whole model for iwm (safetensors).

Both write a folder in the Hugging Face layout, ``config.json`` + ``model.safetensors``
(:mod:`iwm.interop.folder`). ``timm``: the EMA target encoder under timm's own key
names, with a ``config.json`` in timm's hub format (architecture, ``model_args``,
``pretrained_cfg``) so that ``timm.create_model`` builds the iwm encoder.

timm only builds architectures in its registry, and iwm's sizes (vit_micro, patch 4 at
28 px, ...) are mostly not there. So ``architecture`` is the closest registered ViT
(:func:`timm_architecture`: the same size, patch and resolution when registered, else the
encoder size's base) and ``model_args`` state every dimension of the real encoder, which
override the base's; ``iwm.architecture_note`` says so in the file itself. ``safetensors``:
the whole model, written by :meth:`~iwm.api.Pretrained.save_pretrained`. How to load each
is in docs/evaluation.md, "Using the model elsewhere".
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from timm.models.vision_transformer import Attention
from torch import nn

from iwm.api import PretrainedEncoder, load, load_encoder
from iwm.errors import IWMError
from iwm.interop.folder import normalization_lists, write_folder
from iwm.models.vit import Encoder, encoder_spec

EXPORT_FORMATS = ("timm", "safetensors")


def timm_architecture(encoder: str, patch_size: int, image_size: int) -> str:
    """The registered timm name to build ``encoder`` from: ``vit_<size>_patch<P>_<S>`` when
    timm has it (e.g. vit_base_patch16_224), else the size's base (:class:`EncoderSpec`)."""
    import timm

    exact = f"{encoder}_patch{patch_size}_{image_size}"
    return exact if timm.is_model(exact) else encoder_spec(encoder).timm_name


def timm_model_args(encoder: Encoder) -> dict[str, Any]:
    """The ``create_model`` kwargs that rebuild ``encoder``, read off the module itself so
    that they cannot drift from it: every dimension, no class token, mean pooling of the
    final-normed tokens, no extra norm or head."""
    block = encoder.blocks[0]
    attn, fc1 = block.attn, block.mlp.fc1  # type: ignore[union-attr]
    assert isinstance(attn, Attention) and isinstance(fc1, nn.Linear)
    return {
        "img_size": encoder.patch_embed.img_size[0],
        "patch_size": encoder.patch_embed.patch_size[0],
        "in_chans": encoder.patch_embed.proj.in_channels,
        "embed_dim": encoder.embed_dim, "depth": len(encoder.blocks),
        "num_heads": attn.num_heads,
        "mlp_ratio": fc1.out_features / encoder.embed_dim,
        "qkv_bias": attn.qkv.bias is not None,
        "class_token": False, "global_pool": "avg", "fc_norm": False,
    }


def timm_config(model: PretrainedEncoder) -> dict[str, Any]:
    """The ``config.json`` of a timm export (timm's hub format, plus an ``iwm`` section)."""
    size, channels = model.image_size, model.in_chans
    norm = normalization_lists(model.normalize.mean, model.normalize.std)
    model_args = timm_model_args(model.encoder)
    architecture = timm_architecture(model.config.model.encoder, model_args["patch_size"],
                                     size)
    note = (f"timm builds registered architectures only: {architecture} is the closest to "
            f"this {model.config.model.encoder} encoder, and model_args (patch "
            f"{model_args['patch_size']}, width {model_args['embed_dim']}, depth "
            f"{model_args['depth']}, {model_args['num_heads']} heads, {size} px, {channels} "
            "channel(s)) override its size")
    pretrained_cfg = {
        "input_size": [channels, size, size], "fixed_input_size": True,
        # iwm evaluates on the central square resized (bilinear) to the image size.
        "interpolation": "bilinear", "crop_pct": 1.0, "crop_mode": "center",
        "mean": norm["mean"], "std": norm["std"],
        "num_classes": 0, "first_conv": "patch_embed.proj", "classifier": "head",
    }
    return {
        "architecture": architecture,
        "num_classes": 0,
        "num_features": model_args["embed_dim"],
        "model_args": model_args,
        "pretrained_cfg": pretrained_cfg,
        "iwm": {"weights": "EMA target encoder", "encoder": model.config.model.encoder,
                "architecture_note": note, "step": model.step,
                "config": model.config.to_dict()},
    }


def export_timm(model: PretrainedEncoder, directory: str | Path) -> Path:
    """Write the target encoder for ``timm.create_model`` (docs/evaluation.md)."""
    return write_folder(Path(directory), model.encoder.state_dict(), timm_config(model))


def export(run_or_checkpoint: str | Path, fmt: str, directory: str | Path,
           device: str | torch.device = "cpu") -> Path:
    """``iwm export``: load a run (or checkpoint, or export) and write it as ``fmt``."""
    if fmt not in EXPORT_FORMATS:
        raise IWMError(f"--format {fmt}: choose from {', '.join(EXPORT_FORMATS)}")
    if fmt == "timm":  # the encoder is all it needs, so a timm export re-exports too
        return export_timm(load_encoder(run_or_checkpoint, device=device), directory)
    return load(run_or_checkpoint, device=device).save_pretrained(directory)
