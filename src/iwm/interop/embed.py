"""Features of image files on disk (``iwm embed``): pooled target-encoder features.

Images go through the evaluation pipeline of the linear probe
(:func:`iwm.data.sources.eval_view`: central square, resized to the run's image size),
are converted to the run's channel count (RGB -> luma for 1-channel runs,
:func:`iwm.interop.images.to_channels`) and normalised as in training;
:meth:`iwm.PretrainedEncoder.load_images` reads files the same way. Unreadable files are
skipped with a warning, so the output lists the files it actually holds. Any source
:func:`iwm.load_encoder` reads will do, the timm export included: only the target encoder
is used.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from iwm.console import Progress, batches_of
from iwm.data.datasets import FolderSet, image_extensions, image_files
from iwm.data.sources import iter_eval_batches
from iwm.errors import DataError, IWMError
from iwm.interop.images import check_channels, to_channels

if TYPE_CHECKING:
    from iwm.api import PretrainedEncoder

OUTPUT_SUFFIXES = (".npy", ".parquet")


def collect_images(inputs: Sequence[str | os.PathLike[str]]) -> list[Path]:
    """Files to embed, in order: folders are searched recursively (sorted, any format Pillow
    reads, hidden files skipped); files are taken as given."""
    exts = image_extensions()
    files: list[Path] = []
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_dir():
            found = image_files(path, True, exts)
            if not found:
                raise DataError(f"{path}: no images in this folder or below (any format "
                                "Pillow reads, e.g. .png, .jpg)")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise DataError(f"{path}: no such file or folder")
    if not files:
        raise DataError("no images given")
    return files


def sidecar_path(out: Path) -> Path:
    """``features.npy`` -> ``features.paths.txt``: the files of an ``.npy``'s rows."""
    return out.with_suffix(".paths.txt")


def check_output(out: str | os.PathLike[str]) -> Path:
    """Validate ``--out`` before any work: a known suffix, and pyarrow for ``.parquet``."""
    path = Path(out)
    if path.suffix not in OUTPUT_SUFFIXES:
        raise IWMError(f"--out {path}: must end in {' or '.join(OUTPUT_SUFFIXES)}")
    if path.suffix == ".parquet":
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            raise IWMError(f"--out {path}: writing .parquet needs pyarrow (pip install "
                           "pyarrow); or write .npy instead") from None
    return path


@torch.no_grad()
def embed_images(model: PretrainedEncoder, files: Sequence[Path], batch_size: int = 64,
                 num_workers: int = 0, progress: bool = True) -> tuple[np.ndarray, list[Path]]:
    """Pooled features (N, D) float32 of ``files``, and the N files read (unreadable ones
    are skipped)."""
    channels = model.in_chans
    check_channels(channels)
    # Each file's "label" is its index, so the batches say which files survived decoding.
    data = FolderSet(Path("."), [(str(f), i) for i, f in enumerate(files)], ["images"],
                     name="embed")
    feats, kept = [], []
    batches = iter_eval_batches(data, batch_size, model.image_size, model.device,
                                num_workers=num_workers)
    # Updated by hand rather than wrapping the iterator, so that the loader's warnings about
    # unreadable files point here and not into the progress code.
    with Progress(batches_of(len(files), batch_size), "embed", enabled=progress) as bar:
        for images, index in batches:
            feats.append(model.encode(to_channels(images, channels), pooled=True).float().cpu())
            kept += index.tolist()
            bar.update()
    if not kept:
        raise DataError(f"none of the {len(files)} images could be read")
    return torch.cat(feats).numpy(), [files[i] for i in kept]


def write_features(out: str | os.PathLike[str], features: np.ndarray,
                   files: Sequence[Path]) -> list[Path]:
    """Write ``features`` (N, D) and their files to ``out`` (.npy + ``.paths.txt`` sidecar,
    or .parquet with columns ``path`` and ``embedding``); returns the files written."""
    out = check_output(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    names = [str(f) for f in files]
    if out.suffix == ".npy":
        np.save(out, features.astype(np.float32, copy=False))
        sidecar = sidecar_path(out)
        sidecar.write_text("".join(f"{n}\n" for n in names))
        return [out, sidecar]
    import pyarrow as pa
    import pyarrow.parquet as pq

    flat = pa.array(features.astype(np.float32, copy=False).reshape(-1))
    embedding = pa.FixedSizeListArray.from_arrays(flat, features.shape[1])
    pq.write_table(pa.table({"path": names, "embedding": embedding}), out)
    return [out]


def embed_files(run_or_checkpoint: str | os.PathLike[str],
                inputs: Sequence[str | os.PathLike[str]], out: str | os.PathLike[str],
                batch_size: int = 64, device: str = "auto", num_workers: int = 0,
                progress: bool = True) -> dict:
    """``iwm embed``: load the model, embed ``inputs``, write ``out``; returns a summary."""
    from iwm.api import load_encoder
    from iwm.training.distributed import resolve_device

    out = check_output(out)  # fail before loading anything
    files = collect_images(inputs)
    model = load_encoder(run_or_checkpoint, device=resolve_device(device))
    features, kept = embed_images(model, files, batch_size, num_workers, progress)
    written = write_features(out, features, kept)
    return {"n_images": len(kept), "n_skipped": len(files) - len(kept),
            "dim": int(features.shape[1]), "written": written}
