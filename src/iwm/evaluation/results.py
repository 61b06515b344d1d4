"""Where an evaluation's result file goes: beside the run it scored."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from iwm.training.checkpoint import CHECKPOINT_DIR


def write_result(run_or_checkpoint: str | Path, name: str, data: dict[str, Any]) -> Path:
    """Write ``data`` as ``NAME.json`` in the run's ``results/`` folder; returns the path.

    A run directory (or an exported folder) gets ``RUN/results/NAME.json``. A checkpoint
    file gets ``RUN/results/NAME_<checkpoint stem>.json`` (e.g. ``mrr_step_000750.json``),
    so scoring an older checkpoint never overwrites the run's own result; RUN is the run
    that holds the checkpoint, or the file's folder for a checkpoint outside a run.
    """
    path = Path(run_or_checkpoint)
    if path.is_file():
        run = path.parent.parent if path.parent.name == CHECKPOINT_DIR else path.parent
        target = run / "results" / f"{name}_{path.stem}.json"
    else:
        target = path / "results" / f"{name}.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(data, indent=2))
    return target
