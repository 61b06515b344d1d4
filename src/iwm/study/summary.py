"""A study's table, statistics per finding, and plots, from the cells' JSON files.

Everything here is recomputed from ``cells/*.json`` (``iwm study table``), so a table is
never out of date with the numbers it summarises. Verdicts are mechanical, with one rule
for all findings: a comparison *holds* when its difference has the paper's sign and a
two-sided test gives p < 0.05 (Welch's t-test between cells, paired t-test where the same
seed and encoder are compared), *does not hold* when the sign is the opposite one at
p < 0.05, and is *not significant* otherwise. Findings referring to grid axes expect the
axes ``conditioning``, ``depth`` and ``strength`` and the roles ``invariant`` and
``equivariant``; with other grids only the table and correlations are written.
"""

from __future__ import annotations

import csv
import json
import math
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from iwm.errors import ConfigError
from iwm.study.grid import Cell, Study
from iwm.study.runner import BASELINES

METRICS = ("mrr", "linear", "finetune_predictor", "finetune_random_predictor")
ALPHA = 0.05


@dataclass
class Stat:
    mean: float
    std: float
    n: int

    def text(self, scale: float = 1.0, digits: int = 3) -> str:
        if self.n == 0:
            return "–"
        if self.n == 1:
            return f"{self.mean * scale:.{digits}f}"
        return f"{self.mean * scale:.{digits}f} ± {self.std * scale:.{digits}f}"


def stat(values: list[float]) -> Stat:
    if not values:
        return Stat(math.nan, math.nan, 0)
    arr = np.asarray(values, dtype=float)
    return Stat(float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else 0.0, len(arr))


@dataclass
class Comparison:
    """``a`` expected above ``b``."""

    claim: str
    a: Stat
    b: Stat
    diff: float
    p: float | None
    test: str
    verdict: str


def _verdict(diff: float, p: float | None) -> str:
    if p is None or math.isnan(p) or p >= ALPHA:
        return "not significant"
    return "holds" if diff > 0 else "does not hold"


def compare(claim: str, a: list[float], b: list[float], paired: bool = False) -> Comparison:
    """Is ``a`` above ``b``? (Welch's t-test, or paired t-test on matched lists.)"""
    sa, sb = stat(a), stat(b)
    diff = sa.mean - sb.mean
    with warnings.catch_warnings():
        # Near-equal seeds make scipy warn about precision; the p-value is still right.
        warnings.simplefilter("ignore", RuntimeWarning)
        p, test = _p_value(a, b, diff, paired)
    return Comparison(claim, sa, sb, diff, p, test, _verdict(diff, p))


def _p_value(a: list[float], b: list[float], diff: float, paired: bool
             ) -> tuple[float | None, str]:
    from scipy import stats

    p: float | None = None
    if paired and len(a) == len(b) and len(a) > 1:
        d = np.asarray(a) - np.asarray(b)
        p = float(stats.ttest_rel(a, b).pvalue) if d.std() > 0 else (0.0 if d.mean() else 1.0)
        test = f"paired t, n={len(a)}"
    elif len(a) > 1 and len(b) > 1:
        if np.std(a) == 0 and np.std(b) == 0:
            p = 0.0 if diff else 1.0
        else:
            p = float(stats.ttest_ind(a, b, equal_var=False).pvalue)
        test = f"Welch t, n={len(a)} vs {len(b)}"
    else:
        test = "one value per side: no test"
    return p, test


def load_cells(out: Path) -> tuple[dict[str, list[dict]], list[dict]]:
    """(cell name -> its seeds' JSON, baselines' JSON)."""
    by_cell: dict[str, list[dict]] = {}
    baselines = []
    for path in sorted((out / "cells").glob("*.json")):
        data = json.loads(path.read_text())
        if data.get("cell") == BASELINES:
            baselines.append(data)
        else:
            by_cell.setdefault(data["cell"], []).append(data)
    return by_cell, baselines


def _values(rows: list[dict], key: str) -> list[float]:
    return [r[key] for r in sorted(rows, key=lambda r: r["seed"]) if r.get(key) is not None]


def _find(cells: list[Cell], **levels: str) -> Cell | None:
    for c in cells:
        if all(c.levels.get(k) == v for k, v in levels.items()):
            return c
    return None


def _correlation(x: list[float], y: list[float]) -> dict[str, float] | None:
    from scipy import stats

    if len(x) < 3 or np.std(x) == 0 or np.std(y) == 0:
        return None
    return {"pearson": float(stats.pearsonr(x, y).statistic),
            "spearman": float(stats.spearmanr(x, y).statistic), "n": len(x)}


def _equivariant_levels(study: Study, scale: str) -> dict[str, str]:
    name = study.role_cell("equivariant")
    return next((c.levels for c in study.cells(scale) if c.name == name), {})


def _world_model_cells(study: Study, scale: str, cells: list[Cell]) -> list[Cell]:
    """The depth x strength table: cells with the equivariant role's conditioning."""
    level = _equivariant_levels(study, scale).get("conditioning", "feature")
    return [c for c in cells if c.levels["conditioning"] == level]


def _equivariant_at(study: Study, scale: str) -> dict[str, str]:
    """The equivariant role's levels other than its conditioning (its depth, strength)."""
    return {k: v for k, v in _equivariant_levels(study, scale).items() if k != "conditioning"}


def _conditioning_cells(study: Study, scale: str, cells: list[Cell]) -> list[Cell]:
    """Every conditioning at the equivariant role's depth and strength."""
    at = _equivariant_at(study, scale)
    return [c for c in cells if at and all(c.levels.get(k) == v for k, v in at.items())]


def findings(study: Study, scale: str, by_cell: dict[str, list[dict]],
             baselines: list[dict]) -> dict[str, Any]:
    cells = [c for c in study.cells(scale) if c.name in by_cell]
    vals = {c.name: {m: _values(by_cell[c.name], m) for m in METRICS} for c in cells}
    out: dict[str, Any] = {}
    have_axes = {"conditioning", "depth", "strength"} <= set(study.axes)
    equi, inv = study.role_cell("equivariant"), study.role_cell("invariant")
    iwm_cells = [c for c in cells if c.levels.get("conditioning") != "none"]

    if have_axes and equi in vals:
        at = _equivariant_at(study, scale)
        cond = {c.levels["conditioning"]: c.name
                for c in _conditioning_cells(study, scale, cells)}
        chance = by_cell[equi][0]["mrr_chance"]
        rows = []
        if "none" in cond:
            none = vals[cond["none"]]["mrr"]
            rows.append(compare("no conditioning: MRR above chance (paper: ~0, i.e. chance)",
                                none, [chance] * len(none)))
            for level in ("sequence", "feature"):
                if level in cond:
                    rows.append(compare(f"{level} conditioning: MRR above no conditioning",
                                        vals[cond[level]]["mrr"], none))
        out["1_conditioning"] = {"at": at, "chance": chance, "comparisons": rows}

    if have_axes:
        wm = _world_model_cells(study, scale, cells)
        depths = [d for d in study.axes["depth"] if any(c.levels["depth"] == d for c in wm)]
        strengths = [s for s in study.axes["strength"]
                     if any(c.levels["strength"] == s for c in wm)]
        rows = []
        if len(depths) >= 2:
            lo, hi = depths[0], depths[-1]
            for s in strengths:
                a, b = _find(wm, depth=hi, strength=s), _find(wm, depth=lo, strength=s)
                if a and b:
                    rows.append(compare(f"{s}: {hi} predictor above {lo}", vals[a.name]["mrr"],
                                        vals[b.name]["mrr"]))
        if strengths:
            base = strengths[0]
            for d in depths:
                b = _find(wm, depth=d, strength=base)
                for s in strengths[1:]:
                    a = _find(wm, depth=d, strength=s)
                    if a and b:
                        rows.append(compare(f"{d}: {s} above {base}", vals[a.name]["mrr"],
                                            vals[b.name]["mrr"]))
        out["2_depth_strength"] = {"comparisons": rows}

    if inv in vals and equi in vals:
        out["3_invariant_vs_equivariant"] = {"comparisons": [
            compare("linear probe: invariant above equivariant", vals[inv]["linear"],
                    vals[equi]["linear"]),
            compare("predictor finetuning: equivariant above invariant",
                    vals[equi]["finetune_predictor"], vals[inv]["finetune_predictor"])]}

    rows = []
    pooled_a = [v for c in cells for v in vals[c.name]["finetune_predictor"]]
    pooled_b = [v for c in cells for v in vals[c.name]["finetune_random_predictor"]]
    if pooled_a and len(pooled_a) == len(pooled_b):
        rows.append(compare("all cells: pretrained predictor above random predictor",
                            pooled_a, pooled_b, paired=True))
    for role in ("ijepa", "invariant", "equivariant"):
        name = study.role_cell(role)
        if name in vals:
            rows.append(compare(f"{role} ({name}): pretrained above random predictor",
                                vals[name]["finetune_predictor"],
                                vals[name]["finetune_random_predictor"], paired=True))
    out["4_pretrained_vs_random_predictor"] = {"comparisons": rows}

    multi = [r["multitask"] for rows_ in by_cell.values() for r in rows_ if "multitask" in r]
    if multi:
        out["5_multitask"] = {
            "comparisons": [compare("multitask mean accuracy vs separate predictors "
                                    "(paper: about equal)", [m["mean"] for m in multi],
                                    [m["separate_mean"] for m in multi], paired=True)],
            "trainable_params": multi[0]["trainable_params"],
            "separate_trainable_params": multi[0]["separate_trainable_params"],
            "train_flops": multi[0]["train_flops"],
            "separate_train_flops": multi[0]["separate_train_flops"]}

    if baselines:
        pixels = [b["pixels"] for b in baselines]
        rand = [b["random_encoder"] for b in baselines]
        rows = []
        for c in cells:
            rows.append(compare(f"{c.name}: above raw pixels", vals[c.name]["linear"], pixels))
            rows.append(compare(f"{c.name}: above random-init encoder", vals[c.name]["linear"],
                                rand))
        out["6_ssl_beats_baselines"] = {"pixels": stat(pixels), "random_encoder": stat(rand),
                                        "comparisons": rows}

    means = {c.name: {m: float(np.mean(vals[c.name][m])) if vals[c.name][m] else math.nan
                      for m in METRICS} for c in iwm_cells}
    names = [n for n in means if not any(math.isnan(v) for v in means[n].values())]
    out["correlations"] = {
        "cells": names,
        "mrr_vs_finetune_predictor": _correlation([means[n]["mrr"] for n in names],
                                                  [means[n]["finetune_predictor"] for n in names]),
        "mrr_vs_linear": _correlation([means[n]["mrr"] for n in names],
                                      [means[n]["linear"] for n in names]),
        "linear_vs_finetune_predictor": _correlation(
            [means[n]["linear"] for n in names], [means[n]["finetune_predictor"] for n in names]),
    }
    return out


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, (Comparison, Stat)):
        return _jsonable(asdict(obj))
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float) and math.isnan(obj):
        return None
    return obj


def table_rows(study: Study, scale: str, by_cell: dict[str, list[dict]]) -> list[dict]:
    rows = []
    for c in study.cells(scale):
        if c.name not in by_cell:
            continue
        r = by_cell[c.name]
        row: dict[str, Any] = {"cell": c.name, **c.levels,
                               "seeds": ",".join(str(x["seed"]) for x in
                                                 sorted(r, key=lambda x: x["seed"]))}
        for m in METRICS:
            s = stat(_values(r, m))
            row[f"{m}_mean"], row[f"{m}_std"], row["n"] = s.mean, s.std, s.n
        rows.append(row)
    return rows


def _markdown(study: Study, scale: str, rows: list[dict], found: dict[str, Any],
              baselines: list[dict], chance: float | None) -> str:
    lines = [f"# Study `{study.source}`, scale `{scale}`", "",
             "Mean ± sample std over seeds; accuracies in %. "
             + (f"MRR chance level: {chance:.3f}." if chance else ""), "",
             "| cell | " + " | ".join(study.axes) + " | seeds | MRR | linear | pred. FT | "
             "random-pred. FT |", "|" + "---|" * (len(study.axes) + 6)]
    for r in rows:
        def fmt(m: str, pct: bool, r: dict = r) -> str:
            s = Stat(r[f"{m}_mean"], r[f"{m}_std"], r["n"])
            return s.text(100.0, 1) if pct else s.text()
        lines.append(f"| {r['cell']} | " + " | ".join(r[a] for a in study.axes)
                     + f" | {r['seeds']} | {fmt('mrr', False)} | {fmt('linear', True)} | "
                     f"{fmt('finetune_predictor', True)} | "
                     f"{fmt('finetune_random_predictor', True)} |")
    if baselines:
        pix = stat([b["pixels"] for b in baselines])
        rnd = stat([b["random_encoder"] for b in baselines])
        lines += ["", f"Linear-probe baselines: raw pixels {pix.text(100, 1)}, "
                  f"random-init encoder {rnd.text(100, 1)}."]
    lines += ["", "## Findings", "",
              f"Verdict rule: difference in the paper's direction with p < {ALPHA} → holds; "
              f"opposite direction with p < {ALPHA} → does not hold; else not significant.",
              ""]
    for key, f in found.items():
        if key == "correlations":
            continue
        if not f["comparisons"]:
            lines += [f"### {key}", "", "No comparison: this scale's blocks have no cells "
                      "for it.", ""]
            continue
        lines += [f"### {key}", "", "| claim | a | b | a − b | test | p | verdict |",
                  "|---|---|---|---|---|---|---|"]
        for c in f["comparisons"]:
            p = "–" if c.p is None else f"{c.p:.3g}"
            lines.append(f"| {c.claim} | {c.a.text()} | {c.b.text()} | {c.diff:+.3f} | "
                         f"{c.test} | {p} | {c.verdict} |")
        lines.append("")
    corr = found["correlations"]
    lines += ["### correlations across IWM cells (cell means)", ""]
    for k in ("mrr_vs_finetune_predictor", "mrr_vs_linear", "linear_vs_finetune_predictor"):
        v = corr[k]
        lines.append(f"- {k}: " + ("too few cells" if v is None else
                                    f"Pearson {v['pearson']:+.2f}, Spearman "
                                    f"{v['spearman']:+.2f} (n={v['n']})"))
    return "\n".join(lines) + "\n"


def _plots(study: Study, scale: str, by_cell: dict[str, list[dict]], out: Path,
           chance: float | None) -> list[Path]:
    from iwm.evaluation.plotting import pyplot

    plt = pyplot()

    cells = [c for c in study.cells(scale) if c.name in by_cell]
    written: list[Path] = []

    def save(fig: Any, name: str) -> None:
        fig.tight_layout()
        written.append(out / f"{name}.png")
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)

    if {"conditioning", "depth", "strength"} <= set(study.axes):
        wm = _world_model_cells(study, scale, cells)
        strengths = [s for s in study.axes["strength"] if any(c.levels["strength"] == s
                                                               for c in wm)]
        if wm:
            fig, ax = plt.subplots(figsize=(5, 3.5))
            for d in study.axes["depth"]:
                pts = [(i, stat(_values(by_cell[c.name], "mrr")))
                       for i, s in enumerate(strengths) if (c := _find(wm, depth=d, strength=s))]
                if pts:
                    ax.errorbar([i for i, _ in pts], [s.mean for _, s in pts],
                                yerr=[s.std for _, s in pts], marker="o", capsize=3,
                                label=f"{d} predictor")
            if chance:
                ax.axhline(chance, color="grey", ls="--", lw=1, label="chance")
            ax.set_xticks(range(len(strengths)), strengths)
            ax.set_xlabel("transformations")
            ax.set_ylabel("MRR")
            ax.set_title("World-model quality vs depth and strength")
            ax.legend()
            save(fig, "mrr_depth_strength")
        cond = _conditioning_cells(study, scale, cells)
        if cond:
            fig, ax = plt.subplots(figsize=(5, 3.5))
            ss = [stat(_values(by_cell[c.name], "mrr")) for c in cond]
            ax.bar(range(len(cond)), [s.mean for s in ss], yerr=[s.std for s in ss], capsize=3)
            ax.set_xticks(range(len(cond)), [c.name for c in cond], rotation=20, ha="right",
                          fontsize=8)
            if chance:
                ax.axhline(chance, color="grey", ls="--", lw=1, label="chance")
                ax.legend()
            ax.set_ylabel("MRR")
            ax.set_title("World-model quality vs conditioning")
            save(fig, "mrr_conditioning")
    rows = [(c, stat(_values(by_cell[c.name], "linear")),
             stat(_values(by_cell[c.name], "finetune_predictor")),
             stat(_values(by_cell[c.name], "mrr"))) for c in cells]
    if rows:
        fig, ax = plt.subplots(figsize=(5.5, 4))
        for _, lin, ft, _ in rows:
            ax.errorbar(lin.mean * 100, ft.mean * 100, xerr=lin.std * 100, yerr=ft.std * 100,
                        fmt="none", ecolor="lightgrey", zorder=1)
        sc = ax.scatter([p[1].mean * 100 for p in rows], [p[2].mean * 100 for p in rows],
                        c=[p[3].mean for p in rows], cmap="viridis", zorder=2)
        for c, lin, ft, _ in rows:
            ax.annotate(c.name, (lin.mean * 100, ft.mean * 100), fontsize=6,
                        xytext=(3, 3), textcoords="offset points")
        fig.colorbar(sc, label="MRR")
        corr = _correlation([p[1].mean for p in rows], [p[2].mean for p in rows])
        title = "Linear probe vs predictor finetuning"
        if corr:
            title += f" (Pearson {corr['pearson']:+.2f})"
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("linear probe accuracy (%)")
        ax.set_ylabel("predictor finetuning accuracy (%)")
        save(fig, "linear_vs_predictor_ft")
    return written


def summarise(study: Study, scale: str, out: Path) -> dict[str, Path]:
    """Write ``table.md``, ``table.csv``, ``summary.json`` and the plots into ``out``."""
    by_cell, baselines = load_cells(out)
    if not by_cell:
        raise ConfigError(f"{out / 'cells'} holds no finished cell yet: run "
                          f"`iwm study run {study.source} --scale {scale} --out {out}` first")
    rows = table_rows(study, scale, by_cell)
    found = findings(study, scale, by_cell, baselines)
    chance = next(iter(by_cell.values()))[0].get("mrr_chance")
    paths = {"table": out / "table.md", "csv": out / "table.csv", "json": out / "summary.json"}
    paths["table"].write_text(_markdown(study, scale, rows, found, baselines, chance))
    with open(paths["csv"], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    paths["json"].write_text(json.dumps(_jsonable(
        {"study": study.source, "scale": scale, "rows": rows, "findings": found,
         "baselines": baselines}), indent=2))
    for p in _plots(study, scale, by_cell, out, chance):
        paths[p.stem] = p
    return paths
