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
from collections.abc import Callable
from pathlib import Path
from typing import Any

from iwm.study.summary import stat


def _load(run: Path, name: str) -> dict[str, Any] | None:
    path = run / "eval" / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _row(label: str, cells: list[str]) -> str:
    return "| " + " | ".join([label, *cells]) + " |"


def _table(runs: list[Path], head: list[str], values: list[list[float | None]],
           group: Callable[[list[str]], list[str]],
           extra: list[str] | None = None) -> list[str]:
    """A row per run of ``values`` (None: not measured) as ``group`` joins their texts
    into cells, ``extra`` a last cell per run, then the mean ± std of each value over the
    runs that measured it."""
    lines = [_row("run", head), "|" + "---|" * (len(head) + 1)]
    tail = [[cell] for cell in extra] if extra is not None else [[] for _ in runs]
    for run, row, last in zip(runs, values, tail, strict=True):
        lines.append(_row(run.name, group(["–" if v is None else f"{v:.3f}" for v in row])
                          + last))
    means = []
    for column in zip(*values, strict=True):
        kept = [v for v in column if v is not None]
        means.append(stat(kept).text(digits=3) if kept else "–")
    lines.append(_row("mean ± std", group(means) + ([""] if extra is not None else [])))
    return lines


def decoder_table(runs: list[Path]) -> list[str]:
    results = [_load(r, "decoder") for r in runs]
    factors = next((list(d["factors"]) for d in results if d), [])
    # Per factor: the decoded prediction's slope and R², then the decoded real image's
    # (the decoder's ceiling).
    values: list[list[float | None]] = []
    for d in results:
        row: list[float | None] = [None] * (2 + 4 * len(factors))
        if d:
            row[:2] = [d["psnr"], d["ssim"]]
            for i, f in enumerate(factors):
                p, c = d["factors"][f]["predicted"], d["factors"][f]["real_decoded"]
                row[2 + 4 * i:6 + 4 * i] = [p["slope"], p["r2"], c["slope"], c["r2"]]
        values.append(row)

    def group(texts: list[str]) -> list[str]:
        four = [texts[i:i + 4] for i in range(2, len(texts), 4)]
        return texts[:2] + [f"{a} / {b} ({c} / {d})" for a, b, c, d in four]

    head = ["PSNR dB", "SSIM"] + [f"{f}: predicted slope / R² (ceiling)" for f in factors]
    return _table(runs, head, values, group)


def infer_table(runs: list[Path]) -> list[str]:
    results = [_load(r, "infer_action_residual") for r in runs]
    # 1-channel runs score no saturation or hue (null).
    factors = next(([f for f, v in d["per_factor"].items() if v] for d in results if d), [])
    values: list[list[float | None]] = []
    for d in results:
        row: list[float | None] = [None] * (3 * len(factors))
        for i, f in enumerate(factors):
            scores = d["per_factor"].get(f) if d else None
            if scores:
                cal = scores.get("calibrated") or {}
                row[3 * i:3 * i + 3] = [scores["model"]["r2"], cal.get("r2"),
                                        scores["pixels"]["r2"]]
        values.append(row)

    def group(texts: list[str]) -> list[str]:
        return [f"{a} / {b} ({c})" for a, b, c in zip(texts[::3], texts[1::3], texts[2::3],
                                                      strict=True)]

    head = [f"{f} R²: raw / calibrated (pixels)" for f in factors] + ["ms per image"]
    ms = [f"{d['ms_per_image']:.0f}" if d else "–" for d in results]
    return _table(runs, head, values, group, extra=ms)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run directories of the study")
    args = parser.parse_args(argv)
    print("\n".join(decoder_table(args.runs)))
    print()
    print("\n".join(infer_table(args.runs)))


if __name__ == "__main__":
    main()
