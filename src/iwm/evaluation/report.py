"""``iwm report RUN``: one HTML page that says how a run went and what its model does.

``RUN/report/index.html`` with PNG figures beside it (referenced by relative paths, so
the folder can be copied or served as is; no network, scripts or external CSS):

- header: run name, step, data set, architecture, views;
- training curves from ``metrics.csv``: loss, the collapse monitor (``pred_std`` and
  ``target_std``: a collapsing encoder drives both towards 0), learning rate, gradient
  norm, and the monitors of :mod:`iwm.training.monitors` (``rankme``, ``knn_acc``);
- world-model quality from ``results/mrr.json`` (overall and per-transform bar chart);
- every ``results/{probe,finetune,segment}_*.json`` (the demo's baselines among them) and
  ``results/api_check.json`` in one table, whatever keys it has;
- each single-task classification finetuning beside its baselines (linear probe, raw
  pixels, scratch) and its cost, with its training curve;
- action inference from ``results/infer_action.json``: R^2 and MAE per factor beside its
  references, inferred against true, and the energy landscape along each factor;
- a retrieval grid: for a few test images, the requested transformation and the bank
  entries nearest to the predictor's output (MRR's protocol, small bank; see
  :mod:`iwm.evaluation.retrieval`). Needs a checkpoint; computed fresh on every report;
- what the world model imagines: a test image under each factor, the prediction rendered
  by the run's latent decoder beside the real transformed image (:mod:`iwm.evaluation.
  imagine`), and ``results/decoder.json`` (``iwm eval decoder``); needs ``iwm decoder``;
- the run's config.

A section whose inputs do not exist says so (and which command creates them) rather than
failing, so a report can be made of a run that is still training; a section that fails
(its data moved, a one-class folder) is replaced by a note saying why, with a one-line
warning, so the curves are always written. A folder that is not a run (nor an exported
model) is refused before anything is written into it.
"""

from __future__ import annotations

import html
import json
import math
import statistics
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from iwm.data.factors import JITTER_FACTORS, acts_on
from iwm.errors import IWMError
from iwm.evaluation.plotting import pyplot, show_image
from iwm.evaluation.ranking import chance_mrr, chance_mrr_stderr
from iwm.evaluation.retrieval import RetrievalExample, jitter_description, score_label
from iwm.training.metrics import read_metrics

if TYPE_CHECKING:
    from iwm.api import Pretrained

__all__ = ["REPORT_DIR", "build_report"]

REPORT_DIR = "report"
CURVES_PNG = "curves.png"
MRR_PNG = "mrr.png"
RETRIEVAL_PNG = "retrieval.png"
COLOUR_RETRIEVAL_PNG = "retrieval_colour.png"
INFER_ACTION_PNG = "infer_action.png"
# Results a report tabulates: linear/attentive probes, predictor/encoder finetuning,
# segmentation, the world model asked through the API (one row: MRR, chance, per factor).
# Anything else in results/ (mrr.json has its own section) is left out.
RESULT_PATTERNS = ("probe_*.json", "finetune_*.json", "segment_*.json", "api_check.json")
# Columns shown when present, in this order; any other scalar key goes to "other".
_METRIC_KEYS = ("accuracy", "miou", "mean_accuracy", "mean_miou", "top1", "mrr")
# Dicts of scalars spelled out in "other" (other dicts and lists are left out).
_SCORE_DICTS = ("per_factor",)
_COLUMNS = ("protocol", "kind", "encoder", "dataset", "train_accuracy", "n_train", "n_test",
            "trainable_params", "epochs", "step", "seconds")

_CSS = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto;
       padding: 0 1em; color: #222; line-height: 1.4; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ccc; margin-top: 1.8em; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.92em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; }
th { background: #f2f2f2; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
img { max-width: 100%; } .missing { color: #8a5a00; background: #fff6e0; padding: 0.5em; }
pre { background: #f6f6f6; padding: 0.8em; overflow-x: auto; font-size: 0.85em; }
.meta td:first-child { font-weight: 600; }
"""


def _esc(value: object) -> str:
    return html.escape(str(value))


def _fmt(value: Any) -> str:
    """A JSON scalar for a table: accuracies keep 4 decimals, big numbers fewer."""
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        if abs(value) < 1:
            return f"{value:.4f}"
        return f"{value:.2f}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def _missing(text: str) -> str:
    return f'<p class="missing">{text}</p>'


# ---------------------------------------------------------------- training curves


def _series(rows: list[dict[str, float]], key: str) -> tuple[list[float], list[float]]:
    points = [(r["step"], r[key]) for r in rows if key in r and math.isfinite(r[key])]
    return [p[0] for p in points], [p[1] for p in points]


def _smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average: the raw loss of a small batch is too noisy to read."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


_COLORS = {"loss": "C0", "pred_std": "C1", "target_std": "C2", "lr": "C3", "grad_norm": "C4",
           "rankme": "C5", "knn_acc": "C6"}


def plot_curves(rows: list[dict[str, float]], path: Path) -> list[str]:
    """Loss, collapse monitor, learning rate, gradient norm, RankMe and kNN accuracy vs
    step; returns the metrics that were plotted."""
    plt = pyplot()
    panels: list[tuple[str, list[str]]] = [
        ("loss", ["loss"]),
        ("collapse monitor (std of latents)", ["pred_std", "target_std"]),
        ("learning rate", ["lr"]),
        ("gradient norm", ["grad_norm"]),
        ("effective rank of the target features (RankMe)", ["rankme"]),
        ("online kNN accuracy (held-out images)", ["knn_acc"]),
    ]
    fig, axes = plt.subplots(2, 3, figsize=(15, 6.5))
    plotted = []
    for ax, (title, keys) in zip(axes.flat, panels, strict=True):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        drawn = False
        for key in keys:
            steps, values = _series(rows, key)
            if not steps:
                continue
            drawn = True
            plotted.append(key)
            color = _COLORS[key]
            if len(values) > 50:
                # Raw values faint, a moving average on top: trends stay readable.
                ax.plot(steps, values, alpha=0.25, color=color)
                ax.plot(steps, _smooth(values, max(5, len(values) // 50)), label=key,
                        color=color)
            else:
                ax.plot(steps, values, marker="." if len(values) < 20 else None, label=key,
                        color=color)
        if not drawn:
            ax.text(0.5, 0.5, f"no {' / '.join(keys)} logged", ha="center", va="center",
                    transform=ax.transAxes, color="gray")
        elif len(keys) > 1:
            ax.legend()
        if keys == ["loss"] and drawn and all(v > 0 for v in _series(rows, "loss")[1]):
            ax.set_yscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return plotted


def _curves_section(run_dir: Path, out_dir: Path, rows: list[dict[str, float]]) -> str:
    if not rows:
        return _missing(f"no metrics yet ({_esc(run_dir / 'metrics.csv')} is missing or "
                        "empty) — run <code>iwm pretrain</code>")
    plot_curves(rows, out_dir / CURVES_PNG)
    last = rows[-1]
    facts = [f"{len(rows)} logged rows, last step {int(last['step'])}"]
    for key, label in (("loss", "last loss"), ("pred_std", "pred_std"),
                       ("target_std", "target_std"), ("rankme", "rankme"),
                       ("knn_acc", "knn_acc"), ("epoch", "epoch")):
        steps, values = _series(rows, key)
        if values:
            facts.append(f"{label} {values[-1]:.4g}")
    speeds = _series(rows, "images_per_s")[1]
    if speeds:
        facts.append(f"median throughput {statistics.median(speeds):.0f} images/s")
    waits = _series(rows, "input_wait")[1]
    if waits:
        facts.append(f"waiting for input {100 * statistics.median(waits):.1f}% of the time "
                     "(median)")
    return (f"<p>{_esc('; '.join(facts))}. The collapse monitor is the std across the batch "
            "of the predicted and target latents: both falling towards 0 means the encoder "
            "is collapsing, as does an effective rank (RankMe) near 1.</p>"
            f'<img src="{CURVES_PNG}" alt="training curves">')


# ---------------------------------------------------------------- MRR


def plot_mrr(result: dict[str, Any], path: Path) -> None:
    """Bar chart: overall MRR, then each per-transform entry (hatched 'n/a' if None)."""
    plt = pyplot()
    per = result.get("per_transform") or {}
    names = ["all", *per]
    values = [result.get("mrr"), *per.values()]
    fig, ax = plt.subplots(figsize=(9, 3.6))
    for i, (name, value) in enumerate(zip(names, values, strict=True)):
        if isinstance(value, int | float) and math.isfinite(value):
            ax.bar(i, value, color="#1f4e79" if name == "all" else "#5b9bd5")
            ax.text(i, value + 0.02, f"{value:.3f}", ha="center", fontsize=9)
        else:
            ax.bar(i, 0.1, color="none", edgecolor="#bbb", hatch="//")
            ax.text(i, 0.12, "n/a", ha="center", color="gray", fontsize=9)
    bank = result.get("bank")
    if isinstance(bank, int) and bank >= 1:
        chance = _chance(result)
        ax.axhline(chance, color="#c00000", linestyle="--", linewidth=1,
                   label=f"chance (action ignored): {chance:.3f}")
        ax.legend(loc="upper right", fontsize=9)
    ax.set_xticks(range(len(names)), names)
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("MRR")
    ax.set_title(f"world-model quality: MRR, bank {bank}, {result.get('n_images')} images, "
                 f"{result.get('distance')} distance")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _chance(result: dict) -> float:
    """The result's own chance level (it depends on the tie rule); H_K / K for files
    written before the result carried one."""
    chance = result.get("chance")
    return float(chance) if isinstance(chance, int | float) else chance_mrr(result["bank"])


def _chance_text(result: dict) -> str:
    bank, n = result.get("bank"), result.get("n_images")
    if not (isinstance(bank, int) and isinstance(n, int) and bank > 0 and n > 0):
        return "unknown (no bank size in mrr.json)"
    protocol = (f" (blocks: {_esc(result['blocks'])}, ties: {_esc(result['ties'])})"
                if "blocks" in result and "ties" in result else "")
    return f"{_chance(result):.3f} ± {chance_mrr_stderr(bank, n):.3f}{protocol}"


def _mrr_section(run_dir: Path, out_dir: Path) -> str:
    path = run_dir / "results" / "mrr.json"
    if not path.exists():
        return _missing(f"not computed yet — run <code>iwm eval mrr {_esc(run_dir)}</code>")
    try:
        result = json.loads(path.read_text())
        if not isinstance(result, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as e:
        return _missing(f"{_esc(path)} is unreadable: {_esc(e)}")
    plot_mrr(result, out_dir / MRR_PNG)
    rows = [("all", result.get("mrr"))] + list((result.get("per_transform") or {}).items())
    notes = result.get("notes") or {}
    sens = result.get("sensitivity") or {}
    errors = {"all": result.get("stderr"), **(result.get("per_transform_stderr") or {})}
    chances = {"all": result.get("chance"), **(result.get("per_transform_chance") or {})}
    decomposition = result.get("decomposition") or {}
    recovered = result.get("recovered") or {}

    def cell(value: Any) -> str:
        return f"<td class=num>{'–' if value is None else _esc(_fmt(value))}</td>"

    def why_cells(name: str) -> str:
        d = decomposition.get(name) if isinstance(decomposition, dict) else None
        d = d if isinstance(d, dict) else {}
        rec = recovered.get(name) if isinstance(recovered, dict) else None
        rec = rec if isinstance(rec, dict) else {}
        return (cell(chances.get(name)) + cell(d.get("oracle")) + cell(d.get("residual"))
                + cell(rec.get("slope")))

    def err_cell(name: str) -> str:
        v = errors.get(name)
        return f"<td class=num>{'–' if v is None else _esc(_fmt(v))}</td>"

    def sens_cells(name: str) -> str:
        v = sens.get(name) if isinstance(sens, dict) else None
        v = v if isinstance(v, dict) else {}
        return "".join(f"<td class=num>{_esc(_fmt(v[k])) if k in v else '–'}</td>"
                       for k in ("encoder", "predictor", "alignment"))

    body = "".join(
        f"<tr><td>{_esc(name)}</td><td class=num>{_esc(_fmt(value))}</td>{err_cell(name)}"
        f"{why_cells(name)}{sens_cells(name)}<td>{_esc(notes.get(name, ''))}</td></tr>"
        for name, value in rows)
    extra = ", ".join(f"{k} {_fmt(result[k])}" for k in ("seed", "step", "seconds")
                      if k in result)
    return ("<p>Mean reciprocal rank of the true transformed image's latent among a bank of "
            "the same image under other transformations, given the predictor's output for "
            "the action (≈1: the predictor applies transformations; chance: it ignores "
            f"them). {_esc(extra)}</p>"
            f'<img src="{MRR_PNG}" alt="MRR per transform">'
            "<p>Sensitivity: how far a factor moves the latents from one end of its range to "
            "the other, as a fraction of the distance between two images, for the target "
            "encoder and for the predictor, and the cosine of the two changes. An encoder "
            "near 0 is invariant to the factor; a predictor near 0 while the encoder is not "
            "ignores that field of the action.</p>"
            "<p>Why a setting scores what it does, on the same bank: <b>oracle</b> is the "
            "MRR of the predictor given the really transformed image's context and the null "
            "action (what a perfect world model could reach through this predictor's "
            "inpainting); <b>residual</b> the MRR of p(a) − p(null) + the clean image's own "
            "latents (the world model without its inpainting error); <b>slope</b> the "
            "factor of the nearest bank entry against the requested one (1: the prediction "
            "moves as far as asked; below 1: it hedges).</p>"
            f"<p>± s.e.: standard error over the images; chance is {_chance_text(result)}.</p>"
            "<table><tr><th>setting</th><th>MRR</th><th>± s.e.</th><th>chance</th>"
            "<th>oracle</th><th>residual</th><th>slope</th><th>encoder</th>"
            "<th>predictor</th>"
            f"<th>alignment</th><th>note</th></tr>{body}</table>")


# ---------------------------------------------------------------- action inference


def plot_infer_action(result: dict[str, Any], path: Path) -> None:
    """Per scored factor: inferred (and calibrated, where the result has them) against
    true (top) and, for the landscape's images, the energy along the factor with the
    others at their true values (bottom; each curve minus its minimum, the true value
    dashed, the inferred one a dot)."""
    plt = pyplot()
    pairs, landscape = result.get("pairs") or {}, result.get("landscape") or {}
    true_of, found_of = pairs.get("true") or {}, pairs.get("inferred") or {}
    fixed_of = pairs.get("calibrated") or {}
    factors = [f for f in JITTER_FACTORS if f in true_of or f in landscape]
    if not factors:
        raise IWMError("infer_action.json holds no factor to plot")
    fig, axes = plt.subplots(2, len(factors), figsize=(3.6 * len(factors), 6.6),
                             squeeze=False)
    for j, name in enumerate(factors):
        ax = axes[0, j]
        true, found = true_of.get(name, []), found_of.get(name, [])
        ax.scatter(true, found, s=6, alpha=0.5, label="search")
        if fixed_of.get(name):
            ax.scatter(true, fixed_of[name], s=6, alpha=0.5, color="C2", label="calibrated")
            ax.legend(fontsize=7, loc="upper left")
        if true:
            lo, hi = min(true), max(true)
            ax.plot([lo, hi], [lo, hi], color="#c00000", linewidth=1)
        ax.set_title(f"{name}: inferred vs true")
        ax.set_xlabel("true")
        ax.set_ylabel("inferred")
        ax = axes[1, j]
        scan = landscape.get(name)
        if not scan:
            ax.set_axis_off()
            continue
        for i, energy in enumerate(scan["energy"]):
            color = f"C{i % 10}"
            base = min(energy)
            ax.plot(scan["grid"], [e - base for e in energy], color=color)
            ax.axvline(scan["true"][i], color=color, linestyle="--", linewidth=1)
            k = min(range(len(scan["grid"])), key=lambda g: abs(scan["grid"][g]
                                                                - scan["inferred"][i]))
            ax.plot(scan["inferred"][i], energy[k] - base, "o", color=color, markersize=4)
        ax.set_title(f"energy along {name}")
        ax.set_xlabel(name + (" (turns)" if name == "hue" else " (ratio)"))
        ax.set_ylabel("energy - its minimum")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _infer_action_section(run_dir: Path, out_dir: Path) -> str:
    path = run_dir / "results" / "infer_action.json"
    if not path.exists():
        return _missing("no action inference yet — run <code>iwm eval infer-action "
                        f"{_esc(run_dir)}</code>")
    result = json.loads(path.read_text())
    plot_infer_action(result, out_dir / INFER_ACTION_PNG)

    def cells(scores: Any) -> str:
        scores = scores if isinstance(scores, dict) else {}
        values = (scores.get(key) for key in ("r2", "mae"))
        return "".join(f"<td class=num>{'–' if v is None else _esc(_fmt(v))}</td>"
                       for v in values)

    body = "".join(
        f"<tr><td>{_esc(name)}</td>{cells(s.get('model'))}{cells(s.get('calibrated'))}"
        f"{cells(s.get('no_change'))}{cells(s.get('pixels'))}</tr>"
        for name, s in (result.get("per_factor") or {}).items() if isinstance(s, dict))
    budget = result.get("budget") or {}
    fitted = result.get("calibration") or {}
    # Results before maps had a degree were affine.
    kind = "affine" if fitted.get("degree", 1) == 1 else "quadratic"
    return (f"<p>Which jitter maps each of {_esc(result.get('n_images'))} test images onto "
            "its torchvision-jittered copy (factors drawn uniformly, all at once), found by "
            "searching the action that minimises the world model's energy (energy "
            f"{_esc(result.get('energy', 'residual'))}: docs/world_model.md): CEM, "
            f"{_esc(budget.get('iterations'))} rounds of {_esc(budget.get('population'))} "
            f"candidates, {_esc(budget.get('evaluations'))} predictor calls and "
            f"{_esc(_fmt(result.get('ms_per_image')))} ms per image on "
            f"{_esc(result.get('device'))}. R^2 and mean absolute error (ratios; hue in "
            "turns) of the inferred factor against the true one, as the search answers "
            f"(<b>model</b>) and through per-factor {kind} maps fitted on "
            f"{_esc(fitted.get('n_images', 'no'))} training "
            "pairs of known jitter (<b>calibrated</b>: the model's systematic bias "
            "removed), beside <b>no change</b> "
            "(always the identity: the floor) and <b>pixels</b> (least squares on pixel "
            "statistics, 2-fold cross-fitted: context, not a bar).</p>"
            "<table><tr><th rowspan=2>factor</th><th colspan=2>model</th>"
            "<th colspan=2>calibrated</th><th colspan=2>no change</th>"
            "<th colspan=2>pixels</th></tr><tr>"
            + "<th>R^2</th><th>MAE</th>" * 4 + f"</tr>{body}</table>"
            "<p>Top: inferred (blue) and calibrated (green) against true. Bottom: the "
            "energy along each factor for a few images, the other factors at their true "
            "values; a world model that explains the pair has its minimum at the dashed "
            "true value, and the dot is what the search returned.</p>"
            f'<img src="{INFER_ACTION_PNG}" alt="action inference">')


# ---------------------------------------------------------------- probes / finetuning


def _result_files(results_dir: Path) -> list[Path]:
    found: set[Path] = set()
    for pattern in RESULT_PATTERNS:
        found.update(results_dir.glob(pattern))
    return sorted(found)


def _metric_of(data: dict[str, Any]) -> tuple[str, Any]:
    for key in _METRIC_KEYS:
        if key in data:
            return key, data[key]
    return "", None


def _cell(value: Any) -> str:
    numeric = isinstance(value, int | float) and not isinstance(value, bool)
    return f"<td{' class=num' if numeric else ''}>{_esc(_fmt(value))}</td>"


def _results_section(run_dir: Path) -> str:
    files = _result_files(run_dir / "results")
    if not files:
        return _missing("no probe or finetuning results yet — run <code>iwm probe "
                        f"{_esc(run_dir)}</code>")
    records: list[tuple[str, dict[str, Any] | None, str]] = []
    for path in files:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            records.append((path.stem, None, f"unreadable: {e}"))
            continue
        if not isinstance(data, dict):
            records.append((path.stem, None, "not a JSON object"))
            continue
        records.append((path.stem, data, ""))
    # Only columns some file has, so a table of linear probes is not mostly empty cells.
    columns = [c for c in _COLUMNS if any(d is not None and c in d for _, d, _ in records)]
    head = "".join(f"<th>{_esc(c)}</th>" for c in ["result", "metric", "value", *columns,
                                                   "other"])
    body = []
    for name, data, problem in records:
        if data is None:
            body.append(f"<tr><td>{_esc(name)}</td><td colspan={len(columns) + 3}>"
                        f"{_esc(problem)}</td></tr>")
            continue
        metric, value = _metric_of(data)
        shown = {metric, *columns, "path"}
        other = ", ".join(f"{k}={_fmt(v)}" for k, v in data.items()
                          if k not in shown and not isinstance(v, dict | list))
        tasks = data.get("tasks")
        if isinstance(tasks, dict) and len(tasks) > 1:  # multitask: each task's metric
            per_task = ", ".join(f"{name} {_fmt(_metric_of(v)[1])}" for name, v in tasks.items()
                                 if isinstance(v, dict))
            other = f"tasks: {per_task}; {other}" if other else f"tasks: {per_task}"
        for key in _SCORE_DICTS:
            scores = data.get(key)
            if isinstance(scores, dict):  # e.g. the API check's MRR per factor
                listed = ", ".join(f"{k} {_fmt(v)}" for k, v in scores.items() if v is not None)
                other = f"{key}: {listed}; {other}" if other else f"{key}: {listed}"
        cells = [f"<td>{_esc(name)}</td>", f"<td>{_esc(metric or '?')}</td>",
                 f"<td class=num>{_esc(_fmt(value))}</td>"]
        cells += [_cell(data[c]) if c in data else "<td></td>" for c in columns]
        cells.append(f"<td>{_esc(other)}</td>")
        body.append(f"<tr>{''.join(cells)}</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


# ---------------------------------------------------------------- finetuning


def _finetune_section(run_dir: Path, out_dir: Path) -> str:
    from iwm.evaluation.finetune import PROTOCOLS
    from iwm.evaluation.finetune_run import (
        BASELINES,
        file_slug,
        plot_finetune_comparison,
        plot_finetune_curve,
    )

    found, multitask_figures = [], []
    for path in sorted((run_dir / "results").glob("finetune_*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # the table above says it is unreadable
        if not isinstance(data, dict) or data.get("task") != "classification":
            continue
        if "accuracy" in data:
            found.append((path.stem, data))
        elif isinstance(data.get("tasks"), dict):  # multitask: a row per task
            found += [(f"{path.stem} ({name})",
                       {**data, **task, "dataset": name, "curve": None,
                        "protocol": f"{data.get('protocol')} (multitask)"})
                      for name, task in data["tasks"].items()
                      if isinstance(task, dict) and "accuracy" in task]
            # One curve for the shared predictor: one shared loss, a test line per task.
            if isinstance(data.get("curve"), dict):
                multitask_figures.append((path.stem, data))
    if not found:
        return _missing("no single-task finetuning results yet — run <code>iwm finetune "
                        f"{_esc(run_dir)} --protocol encoder --baselines</code>")
    order = {p: i for i, p in enumerate(PROTOCOLS)}
    found.sort(key=lambda x: (str(x[1].get("dataset")), order.get(str(x[1].get("protocol")), 99)))

    def num(value: Any, fmt: str) -> str:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        return f"<td class=num>{format(value, fmt) if ok else '–'}</td>"

    def curve_figure(stem: str, d: dict[str, Any]) -> str:
        png = f"{stem}_curve.png"
        plot_finetune_curve(d, out_dir / png)
        return f'<img src="{_esc(png)}" alt="{_esc(stem)} curve">'

    rows, notes, figures = [], [], []
    for stem, d in found:
        base = d.get("baselines") or {}
        init = (d.get("head_init") or {}).get("kind", "random")
        head_name = f"{d.get('head', '?')}{', probe init' if init == 'probe' else ''}"
        cells = [f"<td>{_esc(d.get('protocol'))}</td>", f"<td>{_esc(d.get('dataset'))}</td>",
                 f"<td>{_esc(head_name)}</td>", num(d.get("accuracy"), ".4f")]
        cells += [num((base.get(k) or {}).get("accuracy"), ".4f")
                  for k in ("linear_probe", "raw_pixels", "scratch")]
        flops = d.get("flops_per_image")
        cells += [num(d.get("trainable_params"), ","),
                  num(flops / 1e9 if isinstance(flops, int | float) else None, ".3g"),
                  num(d.get("train_seconds", d.get("seconds")), ".1f")]
        rows.append(f"<tr>{''.join(cells)}</tr>")
        if not base:
            notes.append(f"{stem}: no baselines recorded — run <code>iwm finetune "
                         f"{_esc(run_dir)} --protocol {_esc(d.get('protocol'))} --baselines"
                         "</code> with its options")
        notes += [f"{stem}: {_esc(k)} — {_esc(base[k]['missing'])}" for k in BASELINES
                  if isinstance(base.get(k), dict) and "missing" in base[k]]
        if isinstance(d.get("curve"), dict):
            figures.append(curve_figure(stem, d))
    # Before the single curves: every protocol of a data set on one pair of axes.
    by_dataset: dict[str, list[dict[str, Any]]] = {}
    for _, d in found:
        if isinstance(d.get("curve"), dict):
            by_dataset.setdefault(str(d.get("dataset")), []).append(d)
    compared = []
    for dataset, results in by_dataset.items():
        if len(results) > 1:
            png = f"finetune_compare_{file_slug(dataset)}_curve.png"
            plot_finetune_comparison(results, out_dir / png)
            compared.append(f'<img src="{_esc(png)}" alt="{_esc(dataset)}: every protocol">')
    figures += [curve_figure(stem, d) for stem, d in multitask_figures]
    figures = compared + figures
    head = "".join(f"<th>{h}</th>" for h in (
        "protocol", "data set", "head", "accuracy", "linear probe", "raw pixels", "scratch",
        "trainable params", "GFLOPs/image", "seconds"))
    note = "".join(f"<li>{n}</li>" for n in notes)
    return ("<p>Each finetuning beside its baselines on the same train and test images: the "
            "linear probe of the run's frozen encoder, raw pixels, and the encoder's "
            "architecture trained from scratch with the same recipe. <b>probe init</b>: the "
            "head started as a linear probe of the backbone's features (the curve's step "
            "0). Cost: trainable "
            "parameters, FLOPs of one training image (forward + backward; frozen parts "
            "without backward), training wall time (without evaluations).</p>"
            f"<table><tr>{head}</tr>{''.join(rows)}</table>"
            + (f"<ul>{note}</ul>" if note else "") + "".join(figures))


# ---------------------------------------------------------------- retrieval grid


@dataclass
class _GridInfo:
    grid: tuple[int, int]
    bank_size: int
    distance: str
    varied: tuple[str, ...]


def _frame(ax: Any, color: str, width: float) -> None:
    for spine in ax.spines.values():
        spine.set_edgecolor(color)
        spine.set_linewidth(width)


def _mask_overlay(ax: Any, ex: RetrievalExample, grid: tuple[int, int], size: int) -> None:
    """Tint the patches the context encoder does not see; outline the predicted block."""
    from matplotlib.collections import LineCollection

    rows, cols = grid
    hidden = torch.ones(rows * cols)
    hidden[ex.context] = 0
    # One RGBA image over the whole picture: far cheaper to draw than a patch per cell.
    alpha = hidden.view(rows, cols).repeat_interleave(size // rows, 0)
    alpha = alpha.repeat_interleave(size // cols, 1)
    overlay = torch.zeros(*alpha.shape, 4)
    overlay[..., :3] = torch.tensor([0.3, 0.45, 1.0])
    overlay[..., 3] = 0.45 * alpha
    ax.imshow(overlay.numpy(), interpolation="nearest")
    # The block's outline, edge by edge: blocks may wrap around the grid (mask.wrap), so
    # a bounding box would be wrong.
    ph, pw = size / rows, size / cols
    block = {divmod(int(i), cols) for i in ex.target_block}
    segments = []
    for r, c in block:
        x0, y0, x1, y1 = c * pw - 0.5, r * ph - 0.5, (c + 1) * pw - 0.5, (r + 1) * ph - 0.5
        for (dr, dc), seg in (((-1, 0), ((x0, y0), (x1, y0))), ((1, 0), ((x0, y1), (x1, y1))),
                              ((0, -1), ((x0, y0), (x0, y1))), ((0, 1), ((x1, y0), (x1, y1)))):
            if (r + dr, c + dc) not in block:
                segments.append(seg)
    ax.add_collection(LineCollection(segments, colors="#ffc000", linewidths=2))


def plot_retrieval(examples: list[RetrievalExample], info: _GridInfo, path: Path) -> None:
    """One row per image: source (context + predicted block), requested transformation,
    then the nearest bank entries (the true one framed in green)."""
    plt = pyplot()
    top_k = max(len(ex.top) for ex in examples)
    n_cols, n_rows = 2 + top_k, len(examples)
    # Fixed layout in inches (tight_layout on ~40 axes is slow and still let the
    # parameter lines collide with the next row's titles).
    cell, gap, title_h, top_h = 1.45, 0.3, 0.42, 0.45
    label_h = 0.16 * max(1, len(info.varied)) + 0.12
    row_h = title_h + cell + label_h
    width, height = n_cols * (cell + gap) + gap, top_h + n_rows * row_h
    fig = plt.figure(figsize=(width, height))
    fig.suptitle(f"nearest of {info.bank_size} bank latents to the predictor's output "
                 "(green = the true transformation)", fontsize=10,
                 y=1 - 0.12 / height)

    def cell_axes(r: int, c: int) -> Any:
        left = gap + c * (cell + gap)
        bottom = height - top_h - r * row_h - title_h - cell
        return fig.add_axes((left / width, bottom / height, cell / width, cell / height))

    for r, ex in enumerate(examples):
        size = ex.image.shape[-1]
        ax = cell_axes(r, 0)
        show_image(ax, ex.image)
        _mask_overlay(ax, ex, info.grid, size)
        ax.set_title("source\n(blue: hidden, yellow: predicted)", fontsize=7)
        ax = cell_axes(r, 1)
        show_image(ax, ex.target)
        _frame(ax, "#2e7d32", 3)
        ax.set_title(f"requested: entry {ex.true_index}\ntrue rank {ex.rank}/{info.bank_size}",
                     fontsize=8)
        ax.set_xlabel(jitter_description(ex.true_params, info.varied).replace(", ", "\n"),
                      fontsize=7)
        for j, (entry, score) in enumerate(zip(ex.top, ex.top_scores, strict=True)):
            ax = cell_axes(r, 2 + j)
            show_image(ax, ex.top_images[j])
            hit = entry == ex.true_index
            _frame(ax, "#2e7d32" if hit else "#999", 3 if hit else 0.8)
            ax.set_title(f"#{j + 1}: entry {entry}" + (" (true)" if hit else ""), fontsize=8,
                         color="#2e7d32" if hit else "black")
            ax.set_xlabel(score_label(score, info.distance), fontsize=7)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def compute_retrieval(pretrained: Pretrained, n_images: int, bank_size: int, top_k: int, seed: int,
                      distance: str = "cosine", colour_only: bool = False
                      ) -> tuple[list[RetrievalExample], _GridInfo]:
    """Retrieval examples of a loaded run (:class:`iwm.api.Pretrained`) on the first
    ``n_images`` test images; ``colour_only`` banks vary saturation and hue alone (RGB)."""
    from iwm.data.datasets import get_dataset
    from iwm.data.sources import iter_eval_batches
    from iwm.data.views import ViewSampler, resolve_view_params
    from iwm.evaluation.bank import bank_view_params, protocol_masks
    from iwm.evaluation.retrieval import retrieval_examples

    cfg, model = pretrained.config, pretrained.model
    dataset = get_dataset(cfg.data.name, "test", cfg.data.root, holdout=cfg.data.holdout)
    batch = next(iter_eval_batches(dataset, n_images, cfg.data.image_size, pretrained.device,
                                   limit=n_images), None)
    if batch is None:
        raise IWMError(f"{cfg.data.name}: the test split has no images")
    images = batch[0]
    bank = bank_view_params(resolve_view_params(cfg.views))
    if colour_only:
        if dataset.channels != 3:
            raise IWMError(f"{cfg.data.name}: colour retrieval needs RGB images")
        bank = replace(bank, brightness=0.0, contrast=0.0)
    views = ViewSampler(bank, dataset.channels, cfg.data.image_size)
    masks = protocol_masks(model.encoder.grid, cfg.mask)
    examples = retrieval_examples(model, views, images, masks, bank_size=bank_size,
                                  top_k=min(top_k, bank_size), distance=distance,
                                  generator=torch.Generator().manual_seed(seed),
                                  normalize=pretrained.normalize)
    varied = tuple(f for f in JITTER_FACTORS
                   if getattr(bank, f) > 0 and acts_on(f, dataset.channels))
    return examples, _GridInfo(model.encoder.grid, bank_size, distance, varied)


def _grid_summary(examples: list[RetrievalExample]) -> str:
    hits = sum(ex.rank == 1 for ex in examples)
    mean_rr = sum(1 / ex.rank for ex in examples) / len(examples)
    return (f"true entry first for {hits} of {len(examples)} images, mean reciprocal rank "
            f"{mean_rr:.3f} on these images")


def _retrieval_section(pretrained: Pretrained | None, problem: str, out_dir: Path, n_images: int,
                       bank_size: int, top_k: int, seed: int) -> str:
    if pretrained is None:
        return _missing(f"needs a checkpoint: {_esc(problem)}")
    examples, info = compute_retrieval(pretrained, n_images, bank_size, top_k, seed)
    plot_retrieval(examples, info, out_dir / RETRIEVAL_PNG)
    text = (f"<p>For each of the first {len(examples)} test images: the context the encoder "
            "sees (masked-out patches shaded blue, the block to predict outlined in yellow), "
            "the requested transformation (the true target rendered with the action's "
            f"jitter parameters), and the {len(examples[0].top)} entries of a bank of "
            f"{bank_size} transformations of the same image whose target-encoder latents are "
            f"nearest to the predictor's output. Same protocol as MRR (seed {seed}); "
            f"{_grid_summary(examples)}.</p>"
            f'<img src="{RETRIEVAL_PNG}" alt="retrieval grid">')
    if pretrained.in_chans == 3:
        examples, info = compute_retrieval(pretrained, n_images, bank_size, top_k, seed,
                                           colour_only=True)
        plot_retrieval(examples, info, out_dir / COLOUR_RETRIEVAL_PNG)
        text += ("<h3>Colour only</h3><p>The same, with banks that vary saturation and hue "
                 "alone (brightness and contrast fixed): can the world model tell colours "
                 f"apart? {_grid_summary(examples).capitalize()}.</p>"
                 f'<img src="{COLOUR_RETRIEVAL_PNG}" alt="colour retrieval grid">')
    return text


# ---------------------------------------------------------------- latent decoder

IMAGINE_PNG = "imagine.png"


def _decoder_table(result: dict[str, Any]) -> str:
    """``results/decoder.json`` as HTML: the reconstruction line, then per factor the fits
    of the four settings and the decoded images' PSNR against the real transformed one."""
    from iwm.evaluation.decoder_eval import SETTINGS

    line = (f"<p>Reconstruction of {_esc(result.get('n_images'))} test images: PSNR "
            f"{_esc(_fmt(result.get('psnr')))} dB, SSIM {_esc(_fmt(result.get('ssim')))} "
            f"(their mean image: {_esc(_fmt(result.get('mean_image_psnr')))} dB, SSIM "
            f"{_esc(_fmt(result.get('mean_image_ssim')))}).</p>")
    factors = result.get("factors")
    if not isinstance(factors, dict) or not factors:
        return line

    def fit(entry: Any) -> str:
        entry = entry if isinstance(entry, dict) else {}
        return "".join(f"<td class=num>{_esc(_fmt(entry.get(k)))}</td>" for k in ("slope", "r2"))

    head = "".join(f"<th colspan=2>{_esc(name)}</th>" for name in SETTINGS)
    rows = []
    for factor, entry in factors.items():
        entry = entry if isinstance(entry, dict) else {}
        to_real = entry.get("psnr_to_real") or {}
        rows.append(f"<tr><td>{_esc(factor)}</td><td>{_esc(entry.get('range'))}</td>"
                    + "".join(fit(entry.get(name)) for name in SETTINGS)
                    + "".join(f"<td class=num>{_esc(_fmt(to_real.get(k)))}</td>"
                              for k in ("real_decoded", "predicted", "null")) + "</tr>")
    return (line + "<p>Each factor measured on the images against the requested one "
            "(slope and R² of a least-squares line; log ratios for brightness, contrast and "
            "saturation, turns for hue): <b>real</b> the transformed pixels, <b>real_decoded"
            "</b> them encoded and decoded (the decoder's ceiling), <b>predicted</b> the "
            "world model's prediction decoded, <b>null</b> the null action's (no world "
            "model: slope 0). The last columns: PSNR (dB) of the decoded images against the "
            "real transformed one.</p>"
            f"<table><tr><th rowspan=2>factor</th><th rowspan=2>range</th>{head}"
            "<th colspan=3>PSNR to the real image</th></tr><tr>"
            + "<th>slope</th><th>R²</th>" * len(SETTINGS)
            + "<th>real_decoded</th><th>predicted</th><th>null</th></tr>"
            + "".join(rows) + "</table>")


def _imagine_section(pretrained: Pretrained | None, problem: str, run_dir: Path,
                     out_dir: Path) -> str:
    (out_dir / IMAGINE_PNG).unlink(missing_ok=True)  # never a grid of an older decoder
    if pretrained is None:
        return _missing(f"needs a checkpoint: {_esc(problem)}")
    from iwm.evaluation.decoder_eval import held_out_images
    from iwm.evaluation.imagine import (
        describe_action,
        imagine,
        plot_imagine,
        require_decoder,
        showcase_actions,
    )

    run = _esc(run_dir)
    try:
        require_decoder(pretrained, run_dir)
    except IWMError as e:
        return _missing(f"{_esc(e)}; then <code>iwm eval decoder {run}</code> measures it")

    image = held_out_images(pretrained.config, 1, pretrained.device)
    actions = showcase_actions(pretrained.config, pretrained.in_chans)
    result = imagine(pretrained, image.expand(len(actions), -1, -1, -1), actions)
    plot_imagine(result, out_dir / IMAGINE_PNG, labels=[describe_action(a) for a in actions])
    text = ("<p>The first test image under the null action and under each factor at the end "
            "of the run's range that shows most: the source, the world model's prediction "
            "(<code>apply</code>, every position predicted from context without it) rendered "
            "by the run's latent decoder, the image really transformed, and that image "
            "encoded and decoded: as close as the decoder gets. The decoder renders the "
            "latents, so it shows what the encoder keeps, not every pixel.</p>"
            f'<img src="{IMAGINE_PNG}" alt="what the world model imagines">')
    path = run_dir / "results" / "decoder.json"
    if not path.exists():
        return text + _missing(f"not measured yet — run <code>iwm eval decoder {run}</code>")
    try:
        result_json = json.loads(path.read_text())
        if not isinstance(result_json, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as e:
        return text + _missing(f"{_esc(path)} is unreadable: {_esc(e)}")
    return text + _decoder_table(result_json)


# ---------------------------------------------------------------- page


def _header(run_dir: Path, cfg: Any, step: int | None, rows: list[dict[str, float]]) -> str:
    facts: list[tuple[str, str]] = [("run directory", str(run_dir))]
    if step is None and rows:
        step = int(rows[-1]["step"])
    facts.append(("step", "?" if step is None else str(step)))
    if cfg is not None:
        m = cfg.model
        facts += [
            ("data set", f"{cfg.data.name} ({cfg.data.image_size} px)"),
            ("encoder", f"{m.encoder}, patch {m.patch_size}"),
            ("predictor", f"depth {m.predictor_depth}, width {m.predictor_width}, "
                          f"conditioning '{m.conditioning}'"),
            ("views", f"'{cfg.views.strength}'"),
        ]
    facts.append(("report written", f"{datetime.now():%Y-%m-%d %H:%M:%S}"))
    body = "".join(f"<tr><td>{_esc(k)}</td><td>{_esc(v)}</td></tr>" for k, v in facts)
    return f'<table class="meta">{body}</table>'


def _config_text(run_dir: Path, cfg: Any) -> str | None:
    path = run_dir / "config.yaml"
    if path.exists():
        return path.read_text()
    if cfg is not None:
        import yaml

        return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
    return None


def _load_run(run_dir: Path, device: str) -> tuple[Pretrained | None, str]:
    """``(Pretrained, "")``, or ``(None, why)`` when the run has no usable checkpoint."""
    from iwm.api import load
    from iwm.training.distributed import resolve_device

    try:
        return load(run_dir, device=resolve_device(device)), ""
    except IWMError as e:
        return None, str(e)


def _config_from_file(run_dir: Path) -> Any:
    from iwm.config import load_config

    path = run_dir / "config.yaml"
    try:
        return load_config(str(path)) if path.exists() else None
    except IWMError:
        return None


def _guarded(heading: str, build: Callable[[], str]) -> tuple[str, str]:
    """``(heading, build())``, or a note saying why in place of a section that failed: one
    evaluation that cannot run (data moved, no labels, a bug) must not cost the page."""
    try:
        return heading, build()
    except Exception as e:  # noqa: BLE001 - whatever it was, the page says so and goes on
        why = " ".join((str(e) if isinstance(e, IWMError) else f"{type(e).__name__}: {e}")
                       .split())
        warnings.warn(f"report: '{heading}' left out: {why}", stacklevel=3)
        return heading, _missing(f"could not be made: {_esc(why)}")


def _page(title: str, sections: Iterable[tuple[str, str]], header: str) -> str:
    parts = [f"<!DOCTYPE html><html lang=en><head><meta charset=utf-8>"
             f"<title>{_esc(title)}</title><style>{_CSS}</style></head><body>",
             f"<h1>{_esc(title)}</h1>", header]
    for heading, content in sections:
        parts.append(f"<h2>{_esc(heading)}</h2>{content}" if heading else content)
    parts.append("</body></html>\n")
    return "\n".join(parts)


def build_report(run_dir: Path, out_dir: Path | None = None, n_images: int = 6,
                 bank_size: int = 32, top_k: int = 5, seed: int = 0,
                 device: str = "auto") -> Path:
    """Write the report of ``run_dir`` (default into ``RUN/report``); returns the path of
    its ``index.html``. ``n_images``, ``bank_size``, ``top_k`` and ``seed`` size the
    retrieval grid."""
    start = time.perf_counter()
    from iwm.interop.folder import is_export_dir
    from iwm.training.run_dir import CONFIG_FILE, is_run_dir

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise IWMError(f"{run_dir}: no such run directory")
    # Checked before the report folder is made: inside a data folder it would be a class.
    if not (is_run_dir(run_dir) or is_export_dir(run_dir)):
        raise IWMError(f"{run_dir} is not a run directory (no {CONFIG_FILE} or checkpoints/); "
                       "give the folder iwm pretrain wrote (--run-dir, or "
                       "train.out_dir/train.run_name)")
    if n_images < 1 or bank_size < 2 or top_k < 1:
        raise IWMError(f"retrieval grid: images={n_images} (>= 1), bank={bank_size} (>= 2), "
                       f"top_k={top_k} (>= 1)")
    out_dir = Path(out_dir) if out_dir is not None else run_dir / REPORT_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    # A figure left by an earlier report must not outlive the data it was drawn from.
    for name in (CURVES_PNG, MRR_PNG, RETRIEVAL_PNG, COLOUR_RETRIEVAL_PNG, INFER_ACTION_PNG):
        (out_dir / name).unlink(missing_ok=True)
    for old in out_dir.glob("finetune_*_curve.png"):
        old.unlink()

    rows = read_metrics(run_dir)
    pretrained, problem = _load_run(run_dir, device)
    cfg = pretrained.config if pretrained is not None else _config_from_file(run_dir)
    config = _config_text(run_dir, cfg)
    sections = [
        _guarded("Training curves", lambda: _curves_section(run_dir, out_dir, rows)),
        _guarded("World-model quality (MRR)", lambda: _mrr_section(run_dir, out_dir)),
        _guarded("Probes and finetuning", lambda: _results_section(run_dir)),
        _guarded("Finetuning against its baselines",
                 lambda: _finetune_section(run_dir, out_dir)),
        _guarded("Action inference", lambda: _infer_action_section(run_dir, out_dir)),
        _guarded("The world model at work: retrieval",
                 lambda: _retrieval_section(pretrained, problem, out_dir, n_images, bank_size,
                                            top_k, seed)),
        _guarded("What the world model imagines",
                 lambda: _imagine_section(pretrained, problem, run_dir, out_dir)),
        ("Config", f"<pre>{_esc(config)}</pre>" if config is not None
         else _missing("no config.yaml and no checkpoint")),
    ]
    header = _header(run_dir, cfg, None if pretrained is None else pretrained.step, rows)
    sections.append(("", f"<p><small>generated in {time.perf_counter() - start:.1f} s"
                         "</small></p>"))
    page = _page(f"iwm report: {run_dir.resolve().name}", sections, header)
    path = out_dir / "index.html"
    path.write_text(page, encoding="utf-8")
    return path
