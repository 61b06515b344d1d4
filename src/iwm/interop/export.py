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
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from iwm.errors import CheckpointError, IWMError
from iwm.models.vit import encoder_spec

if TYPE_CHECKING:
    from iwm.api import Pretrained

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT = "iwm"
"""``config.json["format"]`` of a whole-model export; a timm export has none."""
FORMAT_VERSION = 1
EXPORT_FORMATS = ("timm", "safetensors")
_REQUIRED = ("config", "in_chans", "normalization", "step")


def _write(folder: Path, state: dict[str, Tensor], config: dict[str, Any]) -> Path:
    from safetensors.torch import save_file

    if folder.exists() and not folder.is_dir():
        raise IWMError(f"{folder}: exists and is not a folder")
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    # "format": "pt" is the metadata Hugging Face loaders look for to pick the framework.
    save_file(tensors, folder / WEIGHTS_FILE, metadata={"format": "pt"})
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return folder


def _normalization(model: Pretrained) -> dict[str, list[float]]:
    # The shortest decimal that is the same float32 (0.286, not 0.28600001335144043), so the
    # JSON reads as the run's config wrote it and loads back bit-identical.
    def values(t: Tensor) -> list[float]:
        return [float(str(v)) for v in t.detach().float().cpu().flatten().numpy()]

    return {"mean": values(model.normalize.mean), "std": values(model.normalize.std)}


def save_pretrained(model: Pretrained, directory: str | Path) -> Path:
    """Write ``config.json`` + ``model.safetensors`` (the whole model); returns the folder."""
    from iwm.version import __version__

    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "iwm_version": __version__,
        "step": model.step,
        "in_chans": model.in_chans,
        "normalization": _normalization(model),
        "config": model.config.to_dict(),
    }
    return _write(Path(directory), model.model.state_dict(), config)


def is_export_dir(path: str | Path) -> bool:
    """True for a folder with a ``config.json`` (a run directory has ``config.yaml``)."""
    return Path(path).is_dir() and (Path(path) / CONFIG_FILE).is_file()


def read_pretrained(directory: str | Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """``(config.json contents, state dict)`` of a folder written by :func:`save_pretrained`."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(directory)
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{folder}: no {CONFIG_FILE} (not a folder written by "
                              "save_pretrained or `iwm export --format safetensors`)")
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        if isinstance(meta, dict) and "architecture" in meta:
            raise CheckpointError(
                f"{folder}: a timm export (encoder only); load it with "
                f"timm.create_model('local-dir:{folder}', pretrained=True)")
        raise CheckpointError(f"{path}: not an iwm export (no \"format\": \"{FORMAT}\")")
    if int(meta.get("format_version", 0)) > FORMAT_VERSION:
        raise CheckpointError(f"{path}: format version {meta['format_version']} is newer than "
                              f"this iwm understands ({FORMAT_VERSION}); upgrade iwm")
    missing = [k for k in _REQUIRED if k not in meta]
    if missing:
        raise CheckpointError(f"{path}: missing {', '.join(missing)}")
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(f"{folder}: no {WEIGHTS_FILE}")
    try:
        state = load_file(weights)
    except (OSError, SafetensorError) as e:
        raise CheckpointError(f"{weights}: cannot read ({e})") from None
    return meta, state


def timm_config(model: Pretrained) -> dict[str, Any]:
    """The ``config.json`` of a timm export (timm's hub format, plus an ``iwm`` section)."""
    spec = encoder_spec(model.config.model.encoder)
    size, channels = model.image_size, model.in_chans
    norm = _normalization(model)
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
    return _write(Path(directory), model.encoder.state_dict(), timm_config(model))


def export(run_or_checkpoint: str | Path, fmt: str, directory: str | Path,
           device: str | torch.device = "cpu") -> Path:
    """``iwm export``: load a run (or checkpoint, or export) and write it as ``fmt``."""
    from iwm.api import load

    if fmt not in EXPORT_FORMATS:
        raise IWMError(f"--format {fmt}: choose from {', '.join(EXPORT_FORMATS)}")
    model = load(run_or_checkpoint, device=device)
    return export_timm(model, directory) if fmt == "timm" else model.save_pretrained(directory)
