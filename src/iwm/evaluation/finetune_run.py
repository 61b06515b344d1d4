"""``iwm finetune`` on a run directory: the finetuning of :mod:`iwm.evaluation.finetune`
written as ``RUN/results/<name>.json`` with its curve's plot, beside its baselines
(docs/evaluation.md, "Baselines"): the same architecture trained from scratch with the same
recipe and budget, the linear probe of the run's frozen target encoder and raw pixels,
each on the finetuning's own train and test images. A baseline is found among the run's
earlier results when it was made on the same images (scratch: also with the same recipe),
computed on request, or reported missing with the command that makes it."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import shlex
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import Tensor

from iwm.api import Pretrained
from iwm.config import Config, DataConfig, FinetuneConfig
from iwm.data.datasets import FOLDER_PREFIX
from iwm.errors import ConfigError
from iwm.evaluation.finetune import TaskData, check_protocol, finetune, load_task, match_channels
from iwm.evaluation.plotting import pyplot
from iwm.evaluation.results import write_result

BASELINES = ("scratch", "linear_probe", "raw_pixels")
"""What every single-task classification result is shown beside."""
# Keys of finetune_config a scratch result must share to be a baseline of another
# protocol: the budget, data and recipe (not the scales of pretrained parts it lacks).
_SCRATCH_RECIPE = ("epochs", "batch_size", "lr", "weight_decay", "warmup_epochs", "crop_scale",
                   "crop_ratio", "hflip", "train_limit", "test_limit", "seed",
                   "label_smoothing", "head", "head_init")


def _summary(result: dict[str, Any], source: str) -> dict[str, Any]:
    """What a table shows of a finetuning result used as a baseline."""
    keys = ("accuracy", "n_train", "n_test", "trainable_params", "flops_per_image",
            "train_seconds", "seconds", "dataset", "protocol")
    return {**{k: result[k] for k in keys if k in result}, "source": source}


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _find_scratch(path: Path, result: dict[str, Any]) -> tuple[dict[str, Any] | None, str]:
    """The scratch result at ``path`` if it was trained on the same images with the same
    recipe as ``result``, else (None, why not)."""
    data = _read_json(path)
    if data is None:
        return None, f"no {path.name}"
    mine = result["finetune_config"]
    # A key an older result lacks was added later with a default that keeps the old
    # behaviour (head_init: random), so it reads as that default; crop_ratio's default
    # changed the behaviour: before it, finetuning drew the data's ratios.
    theirs = {**dataclasses.asdict(FinetuneConfig()), "crop_ratio": DataConfig().crop_ratio,
              **(data.get("finetune_config") or {})}
    differ = [f"{k} {theirs.get(k)!r} there, {mine[k]!r} here" for k in _SCRATCH_RECIPE
              if _plain(theirs.get(k)) != _plain(mine[k])]
    differ += [f"{k} {data.get(k)!r} there, {result[k]!r} here"
               for k in ("dataset", "n_train", "n_test") if data.get(k) != result[k]]
    if differ:
        return None, f"{path.name} is of another recipe ({'; '.join(differ)})"
    return _summary(data, str(path)), ""


def _plain(value: Any) -> Any:
    # JSON has lists where the config has tuples (crop_scale).
    return list(value) if isinstance(value, tuple) else value


def _find_probe(results: Path, key: str, want: dict[str, Any], run_data: bool
                ) -> dict[str, Any] | None:
    """A probe baseline ``key`` computed before on the same images: the file ``iwm probe``
    (linear_probe) or ``iwm demo`` (raw_pixels) wrote, else one in another finetuning
    result. A file without ``dataset`` is of the run's own data set, one without ``step``
    of its current checkpoint (the demo writes neither). A linear probe in a finetuning
    result counts only with the fingerprint of the encoder it probed: such a result may
    have been copied from another run at the same step (another seed or preset)."""
    own = results / ("probe_linear.json" if key == "linear_probe"
                     else "probe_linear_raw_pixels.json")
    candidates: list[tuple[Path, dict[str, Any] | None]] = [(own, _read_json(own))]
    for path in sorted(results.glob("finetune_*.json")):
        data = _read_json(path) or {}
        tasks = data.get("tasks")
        # A multitask result keeps them per task.
        for holder in (data, *(tasks.values() if isinstance(tasks, dict) else ())):
            entry = (holder.get("baselines") or {}).get(key) if isinstance(holder, dict) else None
            candidates.append((path, entry if isinstance(entry, dict) else None))
    for path, entry in candidates:
        if entry is None or "accuracy" not in entry:
            continue
        if key == "linear_probe" and entry.get("encoder", "target") != "target":
            continue
        if key == "linear_probe" and path != own and "encoder_fingerprint" not in entry:
            continue
        if "dataset" not in entry and not run_data:
            continue
        if "dataset" in entry:
            entry = {**entry, "dataset": task_key(entry["dataset"])}
        if all(entry.get(k, v) == v for k, v in want.items()):
            return {**entry, "source": str(path)}  # where it was found
    return None


def _compute_probe(key: str, pretrained: Pretrained, cfg: Config, task: TaskData,
                   progress: bool) -> dict[str, Any]:
    """The linear probe of the run's target encoder (``linear_probe``) or of raw pixels
    (``raw_pixels``) on the finetuning's own train and test images (its limits)."""
    from iwm.evaluation.probe import probe_encoder, probe_pixels

    ft = cfg.finetune
    pcfg = dataclasses.replace(
        cfg, data=dataclasses.replace(cfg.data, name=task.name),
        probe=dataclasses.replace(cfg.probe, train_limit=ft.train_limit,
                                  test_limit=ft.test_limit))
    start = time.perf_counter()
    if key == "linear_probe":
        channels, normalize = pretrained.in_chans, pretrained.normalize

        def prepare(images: Tensor) -> Tensor:  # another data set in the run's input format
            return normalize(match_channels(images, channels))

        r = probe_encoder(pretrained.encoder, prepare, pcfg, pretrained.device,
                          progress=progress)
        extra: dict[str, Any] = {"encoder": "target", "step": pretrained.step,
                                 "encoder_fingerprint": pretrained.encoder.fingerprint()}
    else:
        r = probe_pixels(pcfg, pretrained.device, progress=progress)
        extra = {"encoder": "raw pixels"}
    return {**dataclasses.asdict(r), **extra, "dataset": task.name,
            "trainable_params": (r.feature_dim + 1) * task.num_classes,
            "seconds": time.perf_counter() - start, "source": "computed"}


def finetune_command(run_dir: Path, protocol: str, args: list[str],
                     baselines: bool = False) -> str:
    """The ``iwm finetune`` line of ``protocol`` with the other arguments ``args``."""
    return shlex.join(["iwm", "finetune", str(run_dir), "--protocol", protocol,
                       *(["--baselines"] if baselines else []), *args])


def finetune_baselines(run_dir: Path, pretrained: Pretrained, cfg: Config, task: TaskData,
                       result: dict[str, Any], *, compute: bool, args: list[str],
                       progress: bool = False, with_scratch: bool = True
                       ) -> dict[str, dict[str, Any]]:
    """The baselines of a single-task classification ``result`` (:data:`BASELINES`), each
    found in ``RUN/results`` if made before on the same images (scratch: also with the same
    recipe), else computed with ``compute`` (scratch: written as its own result), else
    ``{"missing": why and the command that makes it}``. ``args``: the command line of
    ``result`` after ``--protocol P`` (tasks, overrides), for those commands. Without
    ``with_scratch`` (one task of a multitask result: no single-task architecture to
    match) only the probes."""
    results = Path(run_dir) / "results"
    run_data = task_key(task.name) == task_key(pretrained.config.data.name)
    out: dict[str, dict[str, Any]] = {}
    scratch: dict[str, Any] | None = None  # trained here, as a baseline
    name = result_name("classification", "scratch", [task.name], pretrained.config.data.name)
    if with_scratch and result["protocol"] == "scratch":
        out["scratch"] = _summary(result, "this result")
    elif with_scratch:
        found, why = _find_scratch(results / f"{name}.json", result)
        if found is None and compute:
            scratch = finetune(pretrained, "scratch", cfg, [task], progress=progress).result
            found = _summary(scratch, str(results / f"{name}.json"))
        command = finetune_command(run_dir, "scratch", args)
        out["scratch"] = found or {"missing": f"{why}: run `{command}`", "command": command}
    want = {"dataset": task_key(task.name), "n_train": result["n_train"],
            "n_test": result["n_test"]}
    again = finetune_command(run_dir, result["protocol"], args, baselines=True)
    for key in ("linear_probe", "raw_pixels"):
        need = ({**want, "step": pretrained.step,
                 "encoder_fingerprint": pretrained.encoder.fingerprint()}
                if key == "linear_probe" else want)
        probe = _find_probe(results, key, need, run_data)
        if probe is None and compute:
            probe = _compute_probe(key, pretrained, cfg, task, progress)
        out[key] = probe or {"missing": f"none on these {result['n_train']} train / "
                                        f"{result['n_test']} test images: run `{again}`",
                             "command": again}
    if scratch is not None:  # a result of its own, beside the same baselines
        write_finetune_result(run_dir, name, {**scratch, "baselines": {
            **out, "scratch": _summary(scratch, "this result")}})
    return out


def baselines_text(result: dict[str, Any]) -> list[str]:
    """Lines saying a result's baselines, or the commands that make the missing ones (for
    a multitask result, each task's)."""
    labels = {"scratch": "scratch", "linear_probe": "linear probe", "raw_pixels": "raw pixels"}

    def shown(base: dict[str, Any]) -> str:
        return ", ".join(f"{labels[k]} {base[k]['accuracy']:.4f}" for k in BASELINES
                         if "accuracy" in base.get(k, {})) or "no baselines yet"

    if "baselines" in result:
        base = result["baselines"] or {}
        return [f"  beside it: {shown(base)}"] + [
            f"  {labels[k]} missing: {base[k]['missing']}" for k in BASELINES
            if "missing" in base.get(k, {})]
    # Several tasks: a line each, and the one command that makes what they all miss.
    lines, commands = [], []
    for name, entry in result.get("tasks", {}).items():
        base = entry.get("baselines") or {}
        if not base:
            continue
        missing = [k for k in BASELINES if "missing" in base.get(k, {})]
        lines.append(f"  {name}: beside it: {shown(base)}" + (
            f" ({', '.join(labels[k] for k in missing)} missing)" if missing else ""))
        commands += [base[k].get("command") or base[k]["missing"] for k in missing]
    return lines + [f"  missing baselines: run `{c}`" for c in dict.fromkeys(commands)]


def task_key(name: str) -> str:
    """A data set's name as :func:`~iwm.data.datasets.get_dataset` names what it loads
    (registry names lowercased, a folder's path kept as written)."""
    key = name.strip()
    if key.lower().startswith(FOLDER_PREFIX):
        return FOLDER_PREFIX + key[len(FOLDER_PREFIX):]
    return key.lower()


def result_name(kind: str, protocol: str, tasks: list[str], run_data: str) -> str:
    """The stem of a result file: ``finetune_<protocol>`` (``segment_`` for segmentation)
    on the run's own data set, ``..._<task>`` on another (``..._<folder name>-<hash of
    its path>`` for an image folder), so transfer results never overwrite the run's own;
    ``..._multitask`` for several tasks."""
    prefix = "finetune" if kind == "classification" else "segment"
    if len(tasks) > 1:
        return f"{prefix}_multitask"
    if task_key(tasks[0]) == task_key(run_data):
        return f"{prefix}_{protocol}"
    key = task_key(tasks[0])
    if key.startswith(FOLDER_PREFIX):
        # The folder's name, and a hash of its path to tell two "train/" folders apart.
        path = key[len(FOLDER_PREFIX):].rstrip("/")
        key = f"{Path(path).name}-{hashlib.blake2b(path.encode(), digest_size=3).hexdigest()}"
    return f"{prefix}_{protocol}_{file_slug(key)}"


def file_slug(name: str) -> str:
    """``name`` as a part of a file name: lowercase letters and digits, runs of anything
    else one ``-``."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def plot_finetune_curve(result: dict[str, Any], path: Path) -> None:
    """A finetuning result's ``curve``: train loss (mean of each 1% of the steps) and the
    test metric against steps, the baselines' accuracies as horizontal lines."""
    plt = pyplot()
    curve = result["curve"]
    metric = curve.get("metric", "accuracy")
    fig, (loss_ax, test_ax) = plt.subplots(1, 2, figsize=(11, 3.6))
    loss_ax.plot(curve["loss_steps"], curve["loss"], color="C0")
    loss_ax.set_title("train loss (mean of each 1% of the steps)")
    for name, values in curve["eval"].items():
        test_ax.plot(curve["eval_steps"], values, marker="o", label=name)
    for key, label, color, style in (("linear_probe", "linear probe", "C3", "--"),
                                     ("raw_pixels", "raw pixels", "C7", ":"),
                                     ("scratch", "scratch", "C2", "-.")):
        base = (result.get("baselines") or {}).get(key) or {}
        if isinstance(base.get("accuracy"), int | float):
            test_ax.axhline(base["accuracy"], color=color, linestyle=style, linewidth=1.2,
                            label=f"{label} {base['accuracy']:.3f}")
    test_ax.set_title(f"test {metric} ({result.get('n_test', '?')} images)")
    test_ax.legend(fontsize=8)
    for ax in (loss_ax, test_ax):
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle(f"finetune {result.get('protocol')} on {result.get('dataset', 'several tasks')}"
                 f", {result.get('epochs')} epochs", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_finetune_comparison(results: Sequence[dict[str, Any]], path: Path) -> None:
    """Several finetunings of one data set on shared axes: each one's train loss and test
    metric against steps (labelled by protocol and head init), and the first recorded
    linear probe and raw pixels as horizontal lines, so that which protocol wins and
    whether each has levelled off read off one figure."""
    if not results:
        raise ValueError("no finetuning results to compare")
    plt = pyplot()
    fig, (loss_ax, test_ax) = plt.subplots(1, 2, figsize=(11, 3.8))
    metric = results[0]["curve"].get("metric", "accuracy")
    for k, result in enumerate(results):
        curve = result["curve"]
        init = (result.get("head_init") or {}).get("kind", "random")
        label = f"{result.get('protocol')}{', probe init' if init == 'probe' else ''}"
        color = f"C{k % 10}"
        loss_ax.plot(curve["loss_steps"], curve["loss"], color=color, label=label)
        for values in curve["eval"].values():
            test_ax.plot(curve["eval_steps"], values, marker="o", color=color,
                         label=f"{label} {values[-1]:.3f}")
    for key, label, style in (("linear_probe", "linear probe", "--"),
                              ("raw_pixels", "raw pixels", ":")):
        for result in results:
            base = (result.get("baselines") or {}).get(key) or {}
            if isinstance(base.get("accuracy"), int | float):
                test_ax.axhline(base["accuracy"], color="black", linestyle=style,
                                linewidth=1.1, label=f"{label} {base['accuracy']:.3f}")
                break
    loss_ax.set_title("train loss (mean of each 1% of the steps)")
    loss_ax.set_yscale("log")
    test_ax.set_title(f"test {metric}")
    for ax in (loss_ax, test_ax):
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"finetuning protocols on {results[0].get('dataset', 'several tasks')}",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_finetune_result(run_dir: Path, name: str, result: dict[str, Any]) -> dict[str, Any]:
    """``RUN/results/<name>.json`` and, for a result with a curve, its plot beside it
    (``<name>_curve.png``); returns the result with their ``path`` and ``curve_png``."""
    path = write_result(run_dir, name, result)
    extra = {"path": str(path)}
    if result.get("curve"):
        png = path.with_name(f"{path.stem}_curve.png")
        plot_finetune_curve(result, png)
        extra["curve_png"] = str(png)
    return {**result, **extra}


def run_finetune(run_dir: Path, protocol: str, tasks: list[str] | None = None,
                 kind: str = "classification", overrides: list[str] | None = None,
                 device: str = "auto", compare_separate: bool = False,
                 progress: bool = True, baselines: bool = False) -> dict[str, Any]:
    """``iwm finetune``: writes and returns ``RUN/results/finetune_<protocol>.json`` (see
    :func:`result_name`: ``segment_*`` for segmentation, ``*_<task>`` for another data set
    than the run's, ``*_multitask.json`` for several tasks, with the separately tuned
    predictors under ``separate`` if ``compare_separate``) and its curve's plot beside it.
    A single classification task's result carries its ``baselines``
    (:func:`finetune_baselines`; ``baselines`` computes the missing ones), each task of a
    multitask one its linear probe and raw pixels under ``tasks[name]["baselines"]``."""
    from iwm.api import load
    from iwm.config import load_config
    from iwm.training.distributed import resolve_device

    check_protocol(protocol)
    if baselines and kind != "classification":
        raise ConfigError("--baselines: the linear probe and raw-pixel baselines are of "
                          "classification tasks; drop --baselines, or drop --task "
                          "segmentation")
    pretrained = load(run_dir, device=resolve_device(device))
    cfg = load_config(pretrained.config.to_dict(), overrides)
    names = tasks or [cfg.data.name]
    if len(set(names)) != len(names):
        raise ConfigError(f"--tasks {','.join(names)}: a task is listed twice")
    data = [load_task(name, cfg, kind) for name in names]
    out = finetune(pretrained, protocol, cfg, data, kind, progress).result
    name = result_name(kind, protocol, names, pretrained.config.data.name)
    if compare_separate and len(data) > 1:
        runs = [finetune(pretrained, protocol, cfg, [t], kind, progress).result for t in data]
        metric = "accuracy" if kind == "classification" else "miou"
        out["separate"] = {
            "tasks": {r["dataset"]: {metric: r[metric]} for r in runs},
            f"mean_{metric}": sum(r[metric] for r in runs) / len(runs),
            "trainable_params": sum(r["trainable_params"] for r in runs),
            "seconds": sum(r["seconds"] for r in runs),
            "train_flops": sum(r["train_flops"] for r in runs),
        }
    if kind == "classification":
        args = [*(["--tasks", ",".join(tasks)] if tasks else []), *(overrides or [])]
        if len(data) == 1:
            out["baselines"] = finetune_baselines(run_dir, pretrained, cfg, data[0], out,
                                                  compute=baselines, args=args,
                                                  progress=progress)
        else:
            for t in data:  # each task's probes, on its own images
                entry = out["tasks"][t.name]
                mine = {"protocol": protocol, "dataset": t.name,
                        "n_train": entry["n_train"], "n_test": entry["n_test"]}
                entry["baselines"] = finetune_baselines(
                    run_dir, pretrained, cfg, t, mine, compute=baselines, args=args,
                    progress=progress, with_scratch=False)
    return write_finetune_result(run_dir, name, out)
