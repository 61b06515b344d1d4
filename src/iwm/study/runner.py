"""Runs a study's cells: pretrain, then every evaluation, one JSON per (cell, seed).

Layout under the output folder::

    runs/<cell>-s<seed>/     the pretraining run (checkpoints, logs, results/*.json)
    cells/<cell>-s<seed>.json    the cell's numbers, written last and atomically
    cells/baselines-s<seed>.json raw pixels and a random-init encoder on the same probe
    logs/<task>.log          each worker process's output

A task whose JSON exists is finished and skipped; a half-finished one resumes (pretraining
from its last checkpoint, evaluations whose result file is missing), so an interrupted
study is continued by running the same command again. A finished cell trained with other
overrides than the grid's now (the grid file was edited) is an error, never reused.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from iwm.errors import ConfigError, TrainingError
from iwm.study.grid import Cell, Scale, Study

BASELINES = "baselines"


@dataclass(frozen=True)
class Task:
    """One unit of work: a cell at a seed, or the seed's baselines (``cell is None``)."""

    cell: Cell | None
    seed: int

    @property
    def name(self) -> str:
        return f"{self.cell.name if self.cell else BASELINES}-s{self.seed}"


def task_json(out: Path, task: Task) -> Path:
    return out / "cells" / f"{task.name}.json"


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(path)  # atomic: a JSON that exists is complete


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def _cached(path: Path, compute: Callable[[], dict]) -> dict:
    """An evaluation's result file if a previous attempt wrote it, else compute it."""
    return _read_json(path) if path.is_file() else compute()


def run_cell(study: Study, scale: Scale, cell: Cell, seed: int, out: Path,
             device: str = "auto") -> dict[str, Any]:
    """Pretrain one cell at one seed and evaluate it; returns (and writes) its JSON."""
    from iwm.config import load_config
    from iwm.evaluation.finetune_run import run_finetune
    from iwm.evaluation.mrr import run_mrr
    from iwm.evaluation.probe import run_probe
    from iwm.evaluation.ranking import chance_mrr
    from iwm.training.loop import pretrain
    from iwm.training.run_dir import CONFIG_FILE

    start = time.perf_counter()
    ev = scale.evaluations
    run_dir = out / "runs" / f"{cell.name}-s{seed}"
    cfg = load_config(cell.preset, [*cell.overrides, f"train.seed={seed}",
                                    "train.progress=false", f"train.device={device}"])
    pretrain(cfg, run_dir, resume=(run_dir / CONFIG_FILE).is_file())
    results = run_dir / "results"
    # The protocol of the published study tables (first block, ties ranked), so that a
    # cell run now is comparable with the cells already on disk.
    mrr = _cached(results / "mrr.json", lambda: run_mrr(
        run_dir, n_images=ev.mrr_images, bank_size=ev.mrr_bank, device=device, seed=seed,
        per_transform=False, blocks="first", ties="rank", progress=False))
    probe = _cached(results / "probe_linear.json", lambda: run_probe(
        run_dir, "linear", list(ev.probe), device=device, progress=False))
    ft_overrides = [*ev.finetune, f"finetune.seed={seed}"]
    finetuned = {
        protocol: _cached(results / f"finetune_{protocol}.json", functools.partial(
            run_finetune, run_dir, protocol, overrides=ft_overrides, device=device,
            progress=False))
        for protocol in ("predictor", "random-predictor")}
    out_json: dict[str, Any] = {
        "cell": cell.name, "seed": seed, "levels": cell.levels, "preset": cell.preset,
        "overrides": list(cell.overrides), "fingerprint": cell.fingerprint(),
        "run_dir": str(run_dir),
        "mrr": mrr["mrr"], "mrr_bank": mrr["bank"],
        "mrr_chance": chance_mrr(mrr["bank"]),
        "steps": probe["step"],  # the evaluated checkpoint's, as the probe recorded it
        "linear": probe["accuracy"],
        "finetune_predictor": finetuned["predictor"]["accuracy"],
        "finetune_random_predictor": finetuned["random-predictor"]["accuracy"],
    }
    roles = [r for r in ev.multitask_roles if study.role_cell(r) == cell.name]
    if roles and len(ev.multitask_tasks) > 1:
        multi = _cached(results / "finetune_multitask.json", lambda: run_finetune(
            run_dir, "predictor", list(ev.multitask_tasks), overrides=ft_overrides,
            device=device, compare_separate=True, progress=False))
        out_json["multitask"] = {
            "tasks": {k: v["accuracy"] for k, v in multi["tasks"].items()},
            "mean": multi["mean_accuracy"], "trainable_params": multi["trainable_params"],
            "train_flops": multi["train_flops"],
            "separate_mean": multi["separate"]["mean_accuracy"],
            "separate_tasks": {k: v["accuracy"] for k, v in multi["separate"]["tasks"].items()},
            "separate_trainable_params": multi["separate"]["trainable_params"],
            "separate_train_flops": multi["separate"]["train_flops"]}
    out_json["seconds"] = time.perf_counter() - start
    _write_json(task_json(out, Task(cell, seed)), out_json)
    return out_json


def run_baselines(scale: Scale, seed: int, out: Path, device: str = "auto") -> dict[str, Any]:
    """The probe's floor on the same data and budget: raw pixels, and the cells' encoder
    architecture at random initialisation (seeded)."""
    from iwm.config import load_config
    from iwm.data.datasets import get_dataset
    from iwm.data.normalize import Normalizer
    from iwm.evaluation.probe import probe_encoder, probe_pixels
    from iwm.models.iwm import build_model
    from iwm.training.distributed import resolve_device

    start = time.perf_counter()
    dev = resolve_device(device)
    cfg = load_config(scale.preset, [*scale.overrides, *scale.evaluations.probe])
    train = get_dataset(cfg.data.name, "train", cfg.data.root, holdout=cfg.data.holdout)
    raw = probe_pixels(cfg, dev)
    torch.manual_seed(seed)
    model = build_model(cfg, train.channels).to(dev)
    normalize = Normalizer.create(train.mean, train.std, dev)
    rand = probe_encoder(model.target_encoder, normalize, cfg, dev)
    result = {"cell": BASELINES, "seed": seed, "pixels": raw.accuracy,
              "random_encoder": rand.accuracy, "encoder": cfg.model.encoder,
              "seconds": time.perf_counter() - start}
    _write_json(task_json(out, Task(None, seed)), result)
    return result


def _check_fresh(out: Path, task: Task) -> bool:
    """True when the task's JSON exists and matches the grid; stale ones are an error."""
    path = task_json(out, task)
    if not path.is_file():
        return False
    if task.cell is not None:
        done = _read_json(path)
        if done.get("fingerprint") != task.cell.fingerprint():
            raise ConfigError(
                f"{path} was trained with other overrides than the grid's cell "
                f"{task.cell.name} now ({done.get('overrides')} vs {list(task.cell.overrides)})"
                f": use another --out, or delete that JSON and {out / 'runs' / task.name} to "
                "rerun it")
    return True


def plan(study: Study, scale: str, out: Path, seeds: list[int] | None = None,
         only: list[str] | None = None) -> tuple[list[Task], list[Task]]:
    """(pending, finished) tasks of the scale: baselines first, then cells seed-major, so
    that an interrupted study has whole seeds rather than one cell at every seed."""
    cells = study.cells(scale)
    names = {c.name for c in cells} | {BASELINES}
    for name in only or []:
        if name not in names:
            raise ConfigError(f"--cell {name!r}: not a cell of scale {scale}; "
                              f"cells: {', '.join(sorted(names))}")
    use_seeds = list(seeds) if seeds else list(study.seeds)
    tasks = [Task(None, s) for s in use_seeds]
    tasks += [Task(c, s) for s in use_seeds for c in cells]
    if only:
        tasks = [t for t in tasks if (t.cell.name if t.cell else BASELINES) in only]
    pending: list[Task] = []
    finished: list[Task] = []
    for t in tasks:
        (finished if _check_fresh(out, t) else pending).append(t)
    return pending, finished


def _run_in_process(study: Study, scale: Scale, task: Task, out: Path, device: str) -> None:
    if task.cell is None:
        run_baselines(scale, task.seed, out, device)
    else:
        run_cell(study, scale, task.cell, task.seed, out, device)


def _run_subprocess(study: Study, scale: Scale, task: Task, out: Path, device: str) -> None:
    """One task in its own process (parallel workers must not share torch's threads)."""
    log = out / "logs" / f"{task.name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    if scale.threads:
        env["OMP_NUM_THREADS"] = str(scale.threads)
    cmd = [sys.executable, "-m", "iwm.cli.main", "study", "run", study.source,
           "--scale", scale.name, "--out", str(out), "--seed", str(task.seed),
           "--cell", task.cell.name if task.cell else BASELINES, "--workers", "1",
           "--device", device, "--no-summary"]
    with open(log, "a") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        code = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    if code != 0:
        raise TrainingError(f"{task.name} failed (exit {code}); see {log}")


def run_study(study: Study, scale: str, out: Path, *, seeds: list[int] | None = None,
              only: list[str] | None = None, workers: int | None = None,
              device: str = "auto", log: Callable[[str], None] = print) -> list[str]:
    """Run every pending task of the scale; returns the names of failed tasks (the others
    still run: one diverged cell must not cost the rest of the grid)."""
    s = study.scale(scale)
    pending, finished = plan(study, scale, out, seeds, only)
    workers = s.workers if workers is None else workers
    log(f"study {study.source} scale {scale}: {len(finished)} task(s) finished, "
        f"{len(pending)} to run, {workers} at a time -> {out}")
    if workers > 1 and Path(study.source).suffix not in (".yaml", ".yml"):
        raise ConfigError("parallel workers re-read the grid from its file: load the study "
                          "with load_study(path), or run with workers=1")
    failed: list[str] = []
    started = time.perf_counter()
    done = 0

    def one(task: Task) -> None:
        nonlocal done
        t0 = time.perf_counter()
        try:
            if workers > 1:
                _run_subprocess(study, s, task, out, device)
            else:
                if s.threads:
                    torch.set_num_threads(s.threads)
                _run_in_process(study, s, task, out, device)
        except Exception as e:  # noqa: BLE001 - reported, and the grid goes on
            failed.append(task.name)
            log(f"  FAILED {task.name}: {e}")
            return
        done += 1
        log(f"  done {task.name} in {time.perf_counter() - t0:.0f} s "
            f"({done}/{len(pending)}, {time.perf_counter() - started:.0f} s elapsed)")

    if workers > 1:
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(one, pending))
    else:
        for task in pending:
            one(task)
    return failed
