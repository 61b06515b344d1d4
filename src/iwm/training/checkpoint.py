"""Crash-safe checkpoints that load without unpickling arbitrary code.

Layout: ``<run_dir>/checkpoints/step_000500.pt``, one file per saved step, each a plain
``torch.save`` of a dict. Files hold only tensors, numbers, strings, ``None`` and
containers of those, so :func:`load_checkpoint` can use ``torch.load(weights_only=True)``
and a checkpoint downloaded from elsewhere cannot run code on load.

Writes are atomic: the file is written under a temporary name in the same directory,
flushed to disk, then renamed over the target. A crash, a full disk or a diverged model
(NaN weights) therefore never replaces a good checkpoint with a bad one.
"""

from __future__ import annotations

import collections
import contextlib
import os
import random
import re
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from iwm.errors import CheckpointError

CHECKPOINT_DIR = "checkpoints"
_NAME_RE = re.compile(r"^step_(\d+)\.pt$")

# Exactly what torch.load(weights_only=True) accepts without an allow-list. Checked by
# exact type: subclasses (numpy.float64 is a float, namedtuples are tuples) pickle via
# their own class and would be refused at load time.
_PLAIN_TYPES = (type(None), bool, int, float, complex, str, bytes,
                torch.Size, torch.dtype, torch.device)
_CONTAINER_TYPES = (dict, collections.OrderedDict, list, tuple, set)
_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)


def checkpoint_path(run_dir: Path, step: int) -> Path:
    """Where the checkpoint of ``step`` lives: ``run_dir/checkpoints/step_000100.pt``."""
    if step < 0:
        raise ValueError(f"step={step}: must be >= 0")
    return Path(run_dir) / CHECKPOINT_DIR / f"step_{step:06d}.pt"


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of every checkpoint file in the run, oldest first.

    Sorted by the parsed step, not by name, so ``step_1000000.pt`` (7 digits) comes after
    ``step_999999.pt``. Temporary files of an interrupted save never match.
    """
    folder = Path(run_dir) / CHECKPOINT_DIR
    if not folder.is_dir():
        return []
    found = []
    for p in folder.iterdir():
        m = _NAME_RE.match(p.name)
        if m and p.is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The highest-numbered checkpoint file of the run, or ``None`` if there is none.

    The file is not opened here: it may still turn out damaged (see
    :func:`load_latest_checkpoint`, which resuming uses).
    """
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def load_latest_checkpoint(run_dir: Path, map_location: str | torch.device = "cpu"
                           ) -> tuple[Path, dict[str, Any]] | None:
    """Load the newest checkpoint of the run that loads; ``None`` if the run has none.

    Saves are atomic, so a damaged newest file means something outside this library cut
    or corrupted it (a copy interrupted, a disk error). Stopping there would make every
    requeued job of the run fail until a person deletes the file, so each unloadable file
    is reported with a warning naming it and the previous one is tried; only when no
    checkpoint loads is that an error. The damaged file is left in place for inspection:
    the resumed run overwrites it when it reaches that step again.
    """
    found = list_checkpoints(run_dir)
    if not found:
        return None
    newest_error = ""
    for i in range(len(found) - 1, -1, -1):
        try:
            return found[i][1], load_checkpoint(found[i][1], map_location=map_location)
        except CheckpointError as e:
            newest_error = newest_error or str(e)
            if i > 0:
                warnings.warn(f"{e} (trying the previous one, {found[i - 1][1].name}, "
                              "instead)", stacklevel=2)
    if len(found) == 1:
        raise CheckpointError(newest_error)
    raise CheckpointError(f"none of the {len(found)} checkpoints of {run_dir} can be loaded; "
                          f"the newest: {newest_error}")


def prune_checkpoints(run_dir: Path, keep: int) -> list[Path]:
    """Delete all but the ``keep`` newest checkpoints; return the deleted paths.

    Also removes temporary files left behind by a save that was killed mid-write: only
    the (single) training process writes into a run's checkpoint folder, and it calls
    this after its own save has finished, so no live temporary file can be hit.
    """
    if keep < 1:
        raise ValueError(f"keep={keep}: must be at least 1 (never delete the newest)")
    found = list_checkpoints(run_dir)
    doomed = [p for _, p in found[:-keep]]
    folder = Path(run_dir) / CHECKPOINT_DIR
    if folder.is_dir():
        doomed += [p for p in folder.glob(".step_*.tmp") if p.is_file()]
    removed = []
    for p in doomed:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
            removed.append(p)
    return removed


def _check_state(obj: Any, where: str) -> None:
    """Refuse non-finite weights and objects that weights_only loading would reject."""
    if isinstance(obj, torch.Tensor):
        if type(obj) not in _TENSOR_TYPES:
            raise TypeError(f"{where} is a {type(obj).__name__}; store a plain tensor")
        if ((obj.is_floating_point() or obj.is_complex()) and obj.layout == torch.strided
                and not bool(torch.isfinite(obj).all())):
            raise _NonFinite(where)
        return
    if type(obj) in _PLAIN_TYPES:
        return
    if type(obj) in _CONTAINER_TYPES:
        if isinstance(obj, dict):
            for k, v in obj.items():
                _check_state(k, f"key {k!r} of {where}")
                _check_state(v, f"{where}[{k!r}]")
        else:
            for i, v in enumerate(obj):
                _check_state(v, f"{where}[{i}]")
        return
    t = type(obj)
    raise TypeError(
        f"{where} is a {t.__module__}.{t.__qualname__}; checkpoints hold only tensors, "
        "numbers, strings, None and dict/list/tuple/set of those (so they load with "
        "weights_only=True): convert it, e.g. float(x), x.tolist() or dataclasses.asdict(x)"
    )


class _NonFinite(Exception):
    def __init__(self, where: str) -> None:
        super().__init__(where)
        self.where = where


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically.

    Raises :class:`CheckpointError` (and leaves any existing file at ``path`` untouched,
    with no temporary file behind) if a floating tensor holds NaN/inf or the write fails
    (disk full, read-only directory, ...). Raises ``TypeError`` for values that
    ``weights_only`` loading would refuse (a bug in the caller, caught before writing).
    """
    path = Path(path)
    if not isinstance(state, dict):
        raise TypeError(f"checkpoint state must be a dict, got {type(state).__name__}")
    try:
        _check_state(state, "state")
    except _NonFinite as e:
        raise CheckpointError(
            f"refusing to save {path}: {e.where} contains NaN/inf (training diverged; "
            "lower the learning rate or set optim.grad_clip); the previous checkpoint is kept"
        ) from None

    tmp: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Same directory as the target: os.replace is only atomic within one filesystem.
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            # The data must be on disk before the rename is, or a power cut can leave
            # the new name pointing at an empty file.
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
    except (OSError, RuntimeError) as e:
        # Some torch versions wrap a failed write (disk full) in a RuntimeError from
        # their zip writer; anything else is a real bug and propagates.
        if isinstance(e, RuntimeError) and "PytorchStreamWriter" not in str(e):
            raise
        reason = (e.strerror if isinstance(e, OSError) else None) or str(e)
        raise CheckpointError(
            f"cannot write checkpoint {path}: {reason}; free disk space or fix the "
            "directory's permissions (the previous checkpoint is unchanged)"
        ) from None
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    # Makes the rename itself durable. Best effort: some platforms (Windows) and
    # filesystems cannot fsync a directory, and the new file is already in place.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` (or any weights-only file).

    Every failure is a :class:`CheckpointError` with a one-line message: missing file,
    unreadable file, truncated/corrupt file, or a file that needs unpickling arbitrary
    Python objects (refused: that could execute code).
    """
    state = load_weights_only(path, map_location)
    if not isinstance(state, dict):
        raise CheckpointError(
            f"checkpoint {path} holds a {type(state).__name__}, not a dict: it was not "
            "written by iwm"
        )
    return state


def load_weights_only(path: Path, map_location: str | torch.device = "cpu",
                      mmap: bool = False, *,
                      corrupt_fix: str = "use an earlier checkpoint") -> object:
    """Whatever the file holds, loaded as :func:`load_checkpoint` loads it (its errors too).

    ``mmap``: map the file instead of reading it, so that only the tensors used are read
    (for files of other codes, which also hold optimiser state); files in torch's legacy
    format cannot be mapped and are read whole. ``corrupt_fix``: what the error of an
    unreadable file tells the user to do.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} not found: check the path or the run directory")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} is not a file: pass a .pt file")
    try:
        # Reading a byte first separates "cannot read" (permissions) from "corrupt":
        # torch reports damaged archives as OSError too.
        with open(path, "rb") as f:
            f.read(1)
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {e.strerror or e}") from None
    try:
        try:
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
        except RuntimeError as e:
            if not mmap or "mmap" not in str(e):
                raise
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        unsafe = _unsafe_globals(path, e)
        if unsafe:
            raise CheckpointError(
                f"checkpoint {path} needs unpickling arbitrary Python objects "
                f"({', '.join(unsafe)}), which could run code, so it is refused; if you "
                "trust its source, re-save it as plain tensors and dicts"
            ) from None
        raise CheckpointError(
            f"checkpoint {path} is truncated or corrupt ({type(e).__name__}); something cut "
            f"it off or damaged it after it was written (an interrupted copy, a disk error): "
            f"{corrupt_fix}"
        ) from None


def _unsafe_globals(path: Path, error: Exception) -> list[str]:
    """Names of the Python objects a file would need to unpickle, if that is why it failed."""
    finder = getattr(torch.serialization, "get_unsafe_globals_in_checkpoint", None)
    if finder is not None:
        try:
            return list(finder(path))
        except Exception:
            return []  # cannot even parse it: corrupt, not unsafe
    # Older torch: fall back on the refusal message of the weights-only unpickler.
    m = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(error))
    return [m.group(1)] if m else []


def capture_rng_state() -> dict[str, Any]:
    """The state of every global random generator a training step may draw from.

    Covers Python ``random``, numpy's legacy global generator (``np.random.*``; separate
    ``np.random.Generator`` objects are not global and not covered), torch CPU, and every
    CUDA device when CUDA is available. Everything is stored as tensors and plain values so
    the result survives ``weights_only`` loading.
    """
    version, internal, gauss_next = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_cached = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": {
            "version": int(version),
            "state": torch.tensor(internal, dtype=torch.int64),
            "gauss_next": None if gauss_next is None else float(gauss_next),
        },
        "numpy": {
            "name": str(np_name),
            "keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Undo :func:`capture_rng_state`: the same random numbers come out afterwards.

    Parts missing from ``state`` are left alone. CUDA states are restored for as many
    devices as both the checkpoint and this machine have (resuming a GPU run on a CPU-only
    machine simply skips them).
    """
    try:
        if "python" in state:
            py = state["python"]
            internal = tuple(int(v) for v in py["state"].tolist())
            random.setstate((py["version"], internal, py["gauss_next"]))
        if "numpy" in state:
            n = state["numpy"]
            keys = n["keys"].cpu().numpy().astype(np.uint32)
            np.random.set_state(
                (n["name"], keys, n["pos"], n["has_gauss"], n["cached_gaussian"]))
        if "torch" in state:
            torch.set_rng_state(state["torch"].cpu())
        if "cuda" in state and torch.cuda.is_available():
            count = min(len(state["cuda"]), torch.cuda.device_count())
            for i in range(count):
                torch.cuda.set_rng_state(state["cuda"][i].cpu(), i)
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as e:
        raise CheckpointError(
            f"the checkpoint's random-number state is malformed ({type(e).__name__}: {e}); "
            "it was not written by iwm's capture_rng_state"
        ) from None
