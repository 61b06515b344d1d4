"""The exported folder: ``config.json`` + ``model.safetensors`` (the Hugging Face layout).

Both exports write it (:mod:`iwm.interop.export` for timm, :meth:`iwm.Pretrained.save_pretrained`
for the whole model). :func:`iwm.load` / :func:`iwm.from_pretrained` read whole-model
folders back, :func:`iwm.load_encoder` either kind. It sits below both :mod:`iwm.api`
and :mod:`iwm.interop.export` so that neither has to import the other for the format.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from torch import Tensor

from iwm.errors import CheckpointError, IWMError
from iwm.version import __version__

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
DECODER_DIR = "decoder"
"""A run's latent decoder lives in ``RUN/decoder/``."""
DECODER_WEIGHTS_FILE = "decoder.safetensors"
DECODER_META_FILE = "decoder.json"
"""A latent decoder (``iwm decoder``), optional: in ``RUN/decoder/`` and in a whole-model
export beside ``model.safetensors``; :func:`write_decoder` / :func:`read_decoder`."""
FORMAT = "iwm"
"""``config.json["format"]`` of a whole-model export; a timm export has none."""
FORMAT_VERSION = 1
_REQUIRED = ("config", "in_chans", "normalization", "step")


def write_folder(folder: Path, state: dict[str, Tensor], config: dict[str, Any]) -> Path:
    """Write ``state`` as ``model.safetensors`` and ``config`` as ``config.json``."""
    from safetensors.torch import save_file

    if folder.exists() and not folder.is_dir():
        raise IWMError(f"{folder}: exists and is not a folder")
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    # "format": "pt" is the metadata Hugging Face loaders look for to pick the framework.
    save_file(tensors, folder / WEIGHTS_FILE, metadata={"format": "pt"})
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return folder


def normalization_lists(mean: Tensor, std: Tensor) -> dict[str, list[float]]:
    """``{"mean": [...], "std": [...]}`` for ``config.json``."""
    # The shortest decimal that is the same float32 (0.286, not 0.28600001335144043), so the
    # JSON reads as the run's config wrote it and loads back bit-identical.
    def values(t: Tensor) -> list[float]:
        return [float(str(v)) for v in t.detach().float().cpu().flatten().numpy()]

    return {"mean": values(mean), "std": values(std)}


def write_pretrained(directory: str | os.PathLike[str], state: dict[str, Tensor], *,
                     config: dict[str, Any], in_chans: int,
                     normalization: dict[str, list[float]], step: int) -> Path:
    """Write a whole-model folder: ``state`` plus what rebuilding the model needs."""
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "iwm_version": __version__,
        "step": step,
        "in_chans": in_chans,
        "normalization": normalization,
        "config": config,
    }
    return write_folder(Path(directory), state, meta)


def is_export_dir(path: str | os.PathLike[str]) -> bool:
    """True for a folder with a ``config.json`` (a run directory has ``config.yaml``)."""
    return Path(path).is_dir() and (Path(path) / CONFIG_FILE).is_file()


def _read_config(folder: Path) -> dict[str, Any]:
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{folder}: no {CONFIG_FILE} (not a folder written by "
                              "save_pretrained or `iwm export`)")
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read ({e})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: not an iwm export (not a JSON object)")
    return meta


def _read_weights(folder: Path) -> dict[str, Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(f"{folder}: no {WEIGHTS_FILE}")
    try:
        return load_file(weights)
    except (OSError, SafetensorError) as e:
        raise CheckpointError(f"{weights}: cannot read ({e})") from None


def is_timm_export(meta: dict[str, Any]) -> bool:
    """True for the ``config.json`` of ``iwm export --format timm`` (timm's hub format)."""
    return meta.get("format") != FORMAT and "architecture" in meta


def is_timm_export_dir(path: str | os.PathLike[str]) -> bool:
    """True for a folder written by ``iwm export --format timm``."""
    if not is_export_dir(path):
        return False
    try:
        meta = json.loads((Path(path) / CONFIG_FILE).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False  # the reader reports it
    return isinstance(meta, dict) and is_timm_export(meta)


def read_pretrained(directory: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """``(config.json contents, state dict)`` of a folder written by :func:`write_pretrained`."""
    folder = Path(directory)
    meta = _read_config(folder)
    path = folder / CONFIG_FILE
    if is_timm_export(meta):
        raise CheckpointError(
            f"{folder}: a timm export holds the encoder only; iwm.load needs the whole model "
            "(`iwm export RUN --format safetensors`), or read this one with iwm.load_encoder")
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not an iwm export (no \"format\": \"{FORMAT}\")")
    if int(meta.get("format_version", 0)) > FORMAT_VERSION:
        raise CheckpointError(f"{path}: format version {meta['format_version']} is newer than "
                              f"this iwm understands ({FORMAT_VERSION}); upgrade iwm")
    missing = [k for k in _REQUIRED if k not in meta]
    if missing:
        raise CheckpointError(f"{path}: missing {', '.join(missing)}")
    return meta, _read_weights(folder)


def read_timm_export(directory: str | os.PathLike[str]
                     ) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """``(config.json contents, encoder state dict)`` of an ``iwm export --format timm``
    folder; the ``iwm`` section must hold the run's config and step."""
    folder = Path(directory)
    meta = _read_config(folder)
    path = folder / CONFIG_FILE
    if not is_timm_export(meta):
        raise CheckpointError(f"{path}: not a timm export (no \"architecture\")")
    section = meta.get("iwm")
    missing = [f"iwm.{k}" for k in ("config", "step")
               if not isinstance(section, dict) or k not in section]
    missing += [f"model_args.{k}" for k in ("in_chans",)
                if k not in meta.get("model_args", {})]
    missing += [f"pretrained_cfg.{k}" for k in ("mean", "std")
                if k not in meta.get("pretrained_cfg", {})]
    if missing:
        raise CheckpointError(f"{path}: missing {', '.join(missing)} (not written by "
                              "`iwm export --format timm`?)")
    return meta, _read_weights(folder)


def write_decoder(folder: str | os.PathLike[str], state: dict[str, Tensor],
                  meta: dict[str, Any]) -> Path:
    """Write a latent decoder: ``decoder.safetensors`` + ``decoder.json`` (its spec, the
    encoder it reads, how it was trained) in ``folder``."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    # The JSON first: a reader finding weights without it would say the decoder is broken.
    (folder / DECODER_META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    save_file(tensors, folder / DECODER_WEIGHTS_FILE, metadata={"format": "pt"})
    return folder


def read_decoder(folder: str | os.PathLike[str]
                 ) -> tuple[dict[str, Any], dict[str, Tensor]] | None:
    """``(decoder.json contents, state dict)`` of the decoder in ``folder``; None if the
    folder has none. A damaged one is a :class:`CheckpointError` saying how to remake it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    weights, meta_path = folder / DECODER_WEIGHTS_FILE, folder / DECODER_META_FILE
    if not weights.is_file():
        return None
    fix = "train it again with `iwm decoder RUN`"
    try:
        meta = json.loads(meta_path.read_text())
        state = load_file(weights)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, SafetensorError) as e:
        raise CheckpointError(f"{folder}: unreadable decoder ({e}); {fix}") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{meta_path}: not a JSON object; {fix}")
    return meta, state
