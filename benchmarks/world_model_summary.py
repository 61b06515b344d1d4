"""Tabulate `benchmarks/world_model_study.sh` over seeds: the latent decoder and action
inference of each run, then mean +- std over the runs (docs/RESULTS.md, "Seeing and using
the world model").

    python benchmarks/world_model_summary.py runs/full/iwm-equi-shapes-s{0,1,2}

Reads RUN/eval/decoder.json (`iwm eval decoder`) and RUN/eval/infer_action_residual.json
(`iwm eval infer-action --energy residual`, the default energy); a run missing one gets
dashes in that table. Prints two markdown tables.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from iwm.study.summary import stat


def _load(run: Path, name: str) -> dict[str, Any] | None:
    path = run / "eval" / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _row(label: str, cells: list[str]) -> str:
    return "| " + " | ".join([label, *cells]) + " |"


def _mean_row(columns: list[list[float | None]], digits: int) -> list[str]:
    out = []
    for values in columns:
        kept = [v for v in values if v is not None]
        out.append(stat(kept).text(digits=digits) if kept else "–")
    return out


def decoder_table(runs: list[Path]) -> list[str]:
    results = [_load(r, "decoder") for r in runs]
    factors = next((list(d["factors"]) for d in results if d), [])
    head = ["PSNR dB", "SSIM"] + [f"{f}: predicted slope / R² (ceiling)" for f in factors]
    lines = [_row("run", head), "|" + "---|" * (len(head) + 1)]
    # Per factor: the decoded prediction's slope and R², then the decoded real image's
    # (the decoder's ceiling).
    columns: list[list[float | None]] = [[] for _ in range(2 + 4 * len(factors))]

    def cells(texts: list[str]) -> list[str]:
        four = [texts[i:i + 4] for i in range(2, len(texts), 4)]
        return texts[:2] + [f"{a} / {b} ({c} / {d})" for a, b, c, d in four]

    for run, d in zip(runs, results, strict=True):
        values: list[float | None] = [None] * len(columns)
        if d:
            values[:2] = [d["psnr"], d["ssim"]]
            for i, f in enumerate(factors):
                p, c = d["factors"][f]["predicted"], d["factors"][f]["real_decoded"]
                values[2 + 4 * i:6 + 4 * i] = [p["slope"], p["r2"], c["slope"], c["r2"]]
        for column, v in zip(columns, values, strict=True):
            column.append(v)
        lines.append(_row(run.name, cells(["–" if v is None else f"{v:.3f}"
                                           for v in values])))
    lines.append(_row("mean ± std", cells(_mean_row(columns, 3))))
    return lines


def infer_table(runs: list[Path]) -> list[str]:
    results = [_load(r, "infer_action_residual") for r in runs]
    # 1-channel runs score no saturation or hue (null).
    factors = next(([f for f, v in d["per_factor"].items() if v] for d in results if d), [])
    head = [f"{f} R²: raw / calibrated (pixels)" for f in factors] + ["ms per image"]
    lines = [_row("run", head), "|" + "---|" * (len(head) + 1)]
    columns: list[list[float | None]] = [[] for _ in range(3 * len(factors))]
    for run, d in zip(runs, results, strict=True):
        values: list[float | None] = [None] * len(columns)
        if d:
            for i, f in enumerate(factors):
                scores = d["per_factor"].get(f)
                if not scores:
                    continue
                cal = scores.get("calibrated") or {}
                values[3 * i:3 * i + 3] = [scores["model"]["r2"], cal.get("r2"),
                                           scores["pixels"]["r2"]]
        for column, v in zip(columns, values, strict=True):
            column.append(v)
        cells = ["–" if v is None else f"{v:.3f}" for v in values]
        row = [f"{a} / {b} ({c})" for a, b, c in zip(cells[::3], cells[1::3], cells[2::3],
                                                     strict=True)]
        lines.append(_row(run.name, [*row, f"{d['ms_per_image']:.0f}" if d else "–"]))
    means = _mean_row(columns, 3)
    lines.append(_row("mean ± std", [f"{a} / {b} ({c})" for a, b, c in
                                     zip(means[::3], means[1::3], means[2::3], strict=True)]
                      + [""]))
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run directories of the study")
    args = parser.parse_args(argv)
    print("\n".join(decoder_table(args.runs)))
    print()
    print("\n".join(infer_table(args.runs)))


if __name__ == "__main__":
    main()
