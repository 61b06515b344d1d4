"""Scalar metrics: a CSV file for reports and scripts; TensorBoard and/or Weights & Biases
(``train.logger``) for watching a run.

``run_dir/metrics.csv`` has a ``step`` column followed by one column per metric, in the
order they were first logged. A row is flushed as soon as it is logged, so a report can
read a run while it trains and a crash loses nothing already logged. When a later call
brings a metric not seen before (say, an evaluation every N steps), the file is
rewritten with the widened header; rows logged before it get an empty cell there.
Rewrites go through a temporary file and a rename, so a crash cannot lose history.

Resuming: pass ``resume_step`` (the step of the checkpoint resumed from). Rows logged
after that step by the crashed run describe a future that is about to be replayed, so
they are dropped from the CSV and purged from TensorBoard; without this, a resumed run
would have every step in that stretch twice. W&B cannot forget what it was sent: a
resumed run continues the same W&B run (its id is kept in ``run_dir/wandb-id``) and W&B
ignores the steps it has already seen, so that stretch keeps the crashed run's values there.
"""

from __future__ import annotations

import csv
import math
import os
import secrets
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from iwm.errors import ConfigError

METRICS_FILE = "metrics.csv"
TENSORBOARD_DIR = "tensorboard"
WANDB_ID_FILE = "wandb-id"
"""The W&B run id of a run directory, so that ``--resume`` continues the same W&B run."""
WANDB_EXTRA = "pip install 'iwm[wandb]'"


@dataclass(frozen=True)
class WandbRun:
    """What a W&B run is started with (``train.logger=wandb``)."""

    project: str
    entity: str | None
    name: str
    config: dict[str, Any] = field(default_factory=dict)
    """The resolved config, shown and filterable in W&B."""


def require_wandb() -> None:
    """ConfigError unless the wandb package can be imported (checked by every process
    before set-up, so that none waits for one that failed)."""
    import importlib.util

    if importlib.util.find_spec("wandb") is None:
        raise ConfigError(f"train.logger=wandb needs the wandb package: {WANDB_EXTRA}")


def _start_wandb(run_dir: Path, run: WandbRun) -> Any:
    require_wandb()
    import wandb

    id_file = run_dir / WANDB_ID_FILE
    run_id = id_file.read_text().strip() if id_file.is_file() else None
    if not run_id:
        run_id = secrets.token_hex(4)  # W&B ids are [a-z0-9]
        id_file.write_text(run_id + "\n")
    # console="off": W&B would otherwise wrap stderr, where iwm's progress lines go.
    return wandb.init(project=run.project, entity=run.entity, name=run.name, id=run_id,
                      resume="allow", config=run.config, dir=str(run_dir),
                      settings=wandb.Settings(console="off"))


def _read_rows(path: Path) -> tuple[list[str], list[list[str]], bool]:
    """``(header, rows, clean)`` of a metrics CSV; ``clean`` is False if rows were dropped.

    Tolerates damage from a crash mid-write: a last line without its newline may be a
    prefix of the real row (``0.12`` of ``0.1234``), so it is dropped, as are rows with
    the wrong number of cells or an unreadable step.
    """
    with open(path, newline="") as f:  # newline="": csv handles quoting of embedded newlines
        text = f.read()
    clean = text == "" or text.endswith("\n")
    if not clean:
        text = text[: text.rfind("\n") + 1]
    lines = list(csv.reader(text.splitlines(keepends=True)))
    if not lines or not lines[0] or lines[0][0] != "step":
        return ["step"], [], clean and not lines
    header, rows = lines[0], []
    for row in lines[1:]:
        if len(row) != len(header) or _parse_step(row[0]) is None:
            clean = False
            continue
        rows.append(row)
    return header, rows, clean


def _parse_step(cell: str) -> int | None:
    try:
        return int(cell)
    except ValueError:
        return None


def _write_rows(path: Path, header: list[str], rows: list[list[str]]) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(header)
            writer.writerows(rows)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class MetricsLogger:
    """Log scalars per step to ``run_dir/metrics.csv``, ``run_dir/tensorboard``
    (``tensorboard``) and a W&B run (``wandb``, files under ``run_dir/wandb``).

    With ``enabled=False`` (every rank but 0 in distributed training) all methods do
    nothing and no file or directory is created, so callers need no rank checks.
    Several calls at the same step (e.g. train and eval metrics) give several rows.
    """

    def __init__(self, run_dir: Path, enabled: bool = True, *,
                 resume_step: int | None = None, tensorboard: bool = True,
                 wandb: WandbRun | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self.path = self.run_dir / METRICS_FILE
        self._fields: list[str] = []
        self._file: Any = None
        self._csv: Any = None
        self._tb: Any = None
        self._wandb: Any = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            header, rows, clean = _read_rows(self.path)
            if resume_step is not None:
                kept = [r for r in rows if int(r[0]) <= resume_step]
                clean = clean and len(kept) == len(rows)
                rows = kept
            if not clean:
                _write_rows(self.path, header, rows)
            self._fields = header[1:]
            self._open()
        if tensorboard:
            # Imported here: tensorboard is slow to import and only rank 0 needs it.
            from torch.utils.tensorboard import SummaryWriter

            purge = None if resume_step is None else resume_step + 1
            self._tb = SummaryWriter(log_dir=str(self.run_dir / TENSORBOARD_DIR),
                                     purge_step=purge)
        if wandb is not None:
            self._wandb = _start_wandb(self.run_dir, wandb)

    def _open(self) -> None:
        self._file = open(self.path, "a", newline="")  # noqa: SIM115 - kept open across calls
        self._csv = csv.writer(self._file)

    def _close_file(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = self._csv = None

    def log(self, step: int, values: dict[str, Any]) -> None:
        """Record ``values`` (floats, or anything ``float()`` accepts, e.g. 0-dim tensors)."""
        if not self.enabled:
            return
        if "step" in values:
            raise ValueError("'step' is reserved for the step column; pass it as `step`")
        floats = {str(k): float(v) for k, v in values.items()}
        new = [k for k in floats if k not in self._fields]
        if new or self._file is None:
            self._close_file()
            rows = _read_rows(self.path)[1] if self.path.exists() else []
            self._fields += new
            width = len(self._fields) + 1
            rows = [r + [""] * (width - len(r)) for r in rows]
            _write_rows(self.path, ["step", *self._fields], rows)
            self._open()
        self._csv.writerow([int(step)] + [repr(floats[k]) if k in floats else ""
                                          for k in self._fields])
        self._file.flush()
        if self._tb is not None:
            for k, v in floats.items():
                self._tb.add_scalar(k, v, int(step))
        if self._wandb is not None:
            self._wandb.log(floats, step=int(step))

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        """Flush and close both outputs; safe to call twice."""
        self._close_file()
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def read_metrics(run_dir: Path) -> list[dict[str, float]]:
    """The rows of ``run_dir/metrics.csv``, oldest first; ``[]`` if nothing was logged.

    Each row maps ``step`` (an int) and every metric logged in that row to its value;
    metrics with an empty cell in that row are left out rather than given a fake value.
    """
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return []
    header, rows, _ = _read_rows(path)
    out: list[dict[str, float]] = []
    for row in rows:
        entry: dict[str, float] = {"step": int(row[0])}
        for key, cell in zip(header[1:], row[1:], strict=True):
            if cell == "":
                continue
            try:
                entry[key] = float(cell)
            except ValueError:
                entry[key] = math.nan
        out.append(entry)
    return out
