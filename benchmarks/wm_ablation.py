"""Ablations of the world-model recipe: short pretraining runs, each scored by MRR.

Every variant is the base preset plus the shared overrides plus its own overrides, run for
every seed, then scored with ``iwm eval mrr`` (bank and images as given, each image's own
context) and, optionally, the linear probe. One JSON line per (variant, seed) is appended
to ``OUT/results.jsonl`` (a finished pair is skipped when the command is run again), and
``OUT/table.md`` holds mean ± std over seeds.

    python benchmarks/wm_ablation.py --out runs/ablation --seeds 0 1 2 \\
        --base iwm-equi-tiny --common train.epochs=0.3 train.batch_size=128 \\
        --variant baseline= --variant thin=mask.context_tokens=thin \\
        --variant per-block=mask.predictor_pass=per_block

A variant is ``NAME=OVERRIDE,OVERRIDE,...`` (``NAME=`` for none); a list value keeps its
commas: ``ema=optim.ema=[0.99,1.0],train.epochs=1``.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import statistics
import time
from pathlib import Path

from iwm.config import load_config
from iwm.evaluation.mrr import run_mrr
from iwm.evaluation.probe import run_linear_probe
from iwm.evaluation.ranking import chance_mrr
from iwm.training.loop import pretrain


def parse_variant(text: str) -> tuple[str, list[str]]:
    name, sep, rest = text.partition("=")
    if not sep or not name:
        raise SystemExit(f"--variant {text!r}: expected NAME=OVERRIDE,OVERRIDE,... or NAME=")
    # Commas inside brackets belong to a list value (optim.ema=[0.99,1.0]).
    return name, [o for o in re.split(r",(?![^\[]*\])", rest) if o]


def _done(path: Path) -> set[tuple[str, int]]:
    if not path.is_file():
        return set()
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {(r["variant"], r["seed"]) for r in rows}


def _fmt(values: list[float], scale: float = 1.0) -> str:
    if not values:
        return "–"
    mean = statistics.fmean(values) * scale
    if len(values) == 1:
        return f"{mean:.3f}" if scale == 1.0 else f"{mean:.1f}"
    std = statistics.stdev(values) * scale
    return f"{mean:.3f} ± {std:.3f}" if scale == 1.0 else f"{mean:.1f} ± {std:.1f}"


def write_table(results: Path, table: Path, order: list[str]) -> str:
    rows = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
    keys = ["mrr", "brightness", "contrast", "loss", "linear", "steps_per_s"]
    lines = ["| variant | overrides | seeds | MRR | brightness | contrast | final loss | "
             "linear % | steps/s |", "|---|---|---|---|---|---|---|---|---|"]
    for name in order + sorted({r["variant"] for r in rows} - set(order)):
        mine = [r for r in rows if r["variant"] == name]
        if not mine:
            continue
        cols = [_fmt([r[k] for r in mine if r.get(k) is not None],
                     100.0 if k == "linear" else 1.0) for k in keys]
        lines.append(f"| {name} | {' '.join(mine[0]['overrides']) or '–'} | "
                     f"{','.join(str(r['seed']) for r in mine)} | " + " | ".join(cols) + " |")
    text = "\n".join(lines) + "\n"
    table.write_text(text)
    return text


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--base", default="iwm-equi-tiny", help="preset every variant starts from")
    ap.add_argument("--common", nargs="*", default=[], help="overrides shared by all variants")
    ap.add_argument("--variant", action="append", required=True, type=parse_variant)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--bank", type=int, default=64)
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--probe", nargs="*", default=None,
                    help="also run the linear probe with these overrides")
    args = ap.parse_args(argv)

    args.out.mkdir(parents=True, exist_ok=True)
    results = args.out / "results.jsonl"
    done = _done(results)
    print(f"chance MRR at bank {args.bank}: {chance_mrr(args.bank):.3f}")
    for seed in args.seeds:
        for name, overrides in args.variant:
            if (name, seed) in done:
                continue
            run_dir = args.out / f"{name}-s{seed}"
            cfg = load_config(args.base, [*args.common, *overrides, f"train.seed={seed}",
                                          "train.progress=false"])
            start = time.perf_counter()
            pretrain(cfg, run_dir)
            seconds = time.perf_counter() - start
            with (run_dir / "metrics.csv").open() as f:
                last = list(csv.DictReader(f))[-1]
            mrr = run_mrr(run_dir, n_images=args.images, bank_size=args.bank, seed=0)
            row = {"variant": name, "seed": seed, "overrides": overrides,
                   "mrr": mrr["mrr"], **{k: v for k, v in mrr["per_transform"].items()},
                   "loss": float(last["loss"]),
                   "steps": mrr["step"], "train_seconds": seconds,
                   "steps_per_s": mrr["step"] / seconds}
            if args.probe is not None:
                row["linear"] = run_linear_probe(run_dir, args.probe)["accuracy"]
            with results.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)
    print(write_table(results, args.out / "table.md", [n for n, _ in args.variant]))


if __name__ == "__main__":
    main()
