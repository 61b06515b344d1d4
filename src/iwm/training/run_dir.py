"""A pretraining run's directory: what ``iwm pretrain RUN --resume`` reads back.

    <run_dir>/config.yaml                  the run's config (this module)
    <run_dir>/checkpoints/step_*.pt        :mod:`iwm.training.checkpoint`
    <run_dir>/metrics.csv, tensorboard/    :mod:`iwm.training.metrics`
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

from iwm.config import RUN_CONFIG_FILE, Config, load_config, save_config
from iwm.errors import ConfigError, StorageError
from iwm.training.checkpoint import CHECKPOINT_DIR

CONFIG_FILE = RUN_CONFIG_FILE


def new_run_dir(cfg: Config, config_name: str) -> Path:
    """``train.out_dir / train.run_name``, or a time-stamped name when none is set."""
    name = cfg.train.run_name or f"{config_name}-{datetime.now():%Y%m%d-%H%M%S}"
    return Path(cfg.train.out_dir) / name


def is_run_dir(path: Path) -> bool:
    """True for a folder ``iwm pretrain`` wrote (its config, or a checkpoints folder)."""
    return (path / CONFIG_FILE).is_file() or (path / CHECKPOINT_DIR).is_dir()


def load_run_config(run_dir: Path, overrides: list[str] | None = None) -> Config:
    """The config a run was started with, ``overrides`` applied."""
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        raise ConfigError(f"{run_dir} is not a run directory (no {CONFIG_FILE} in it): pass "
                          "the folder `iwm pretrain` wrote (it holds config.yaml and "
                          "checkpoints/), or start a new run from a preset or YAML file")
    return load_config(path, overrides)


def save_run_config(cfg: Config, run_dir: Path) -> None:
    """Create ``run_dir`` and write ``cfg`` into it."""
    with writing("the run's config", run_dir / CONFIG_FILE):
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / CONFIG_FILE)


@contextlib.contextmanager
def writing(what: str, path: Path) -> Iterator[None]:
    """Turn a failed write into a one-line :class:`StorageError` naming the file."""
    try:
        yield
    except OSError as e:
        raise StorageError(
            f"cannot write {what} {path}: {e.strerror or e}; free disk space or fix the "
            "directory's permissions (checkpoints already written are unchanged)"
        ) from None
