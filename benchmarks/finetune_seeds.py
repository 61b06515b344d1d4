"""Finetuning over seeds: one cell of the recipe study (benchmarks/finetune_recipe.sh, one
OUT per seed) as mean ± std per protocol, and the leveraging claims as paired t-tests
over the seeds, with the verdict rule of `iwm study table` (iwm.study.summary).

    python benchmarks/finetune_seeds.py runs/ft-s0 runs/ft-s1 runs/ft-s2 --cell e5-lr1e-3 \
        --target encoder=0.90 --target predictor=0.85 [--vs runs/ft-inv-s0 runs/ft-inv-s1] \
        [--out summary.md]

Seeds are read from each result's finetuning config and paired by value, so the OUTs can
be given in any order and a protocol missing on some seed is compared on the others.
The linear probe and raw pixels come from the results' baselines. ``--vs`` names the same
cell of a second preset (the invariant one) for finding 3: Equi above Inv in predictor
finetuning, Inv above Equi in linear probing.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from iwm.evaluation.finetune import PROTOCOLS
from iwm.evaluation.finetune_run import BASELINES as RESULT_BASELINES
from iwm.study.summary import Comparison, compare, stat

# The probes a result carries; its scratch baseline is read from the scratch result itself.
BASELINES = tuple(name for name in RESULT_BASELINES if name != "scratch")
# (a, b, claim): a is expected above b.
CLAIMS = (
    ("predictor", "linear_probe", "frozen encoder + pretrained predictor > linear probe"),
    ("linear_probe", "raw_pixels", "linear probe > raw pixels"),
    ("predictor", "random-predictor", "pretrained predictor > random predictor"),
    ("end-to-end", "encoder", "end-to-end > encoder finetuning"),
    ("encoder", "scratch", "encoder finetuning > from scratch"),
    ("predictor", "scratch", "frozen encoder + pretrained predictor > from scratch"),
)

Scores = dict[str, dict[int, float]]  # protocol or baseline -> seed -> accuracy


def load(outs: list[Path], cell: str) -> tuple[Scores, dict[str, list[dict]]]:
    """Accuracies per protocol and seed, and each protocol's results for their costs."""
    scores: Scores = {}
    costs: dict[str, list[dict]] = {}
    for out in outs:
        paths = sorted((out / "cells" / cell).glob("finetune_*.json"))
        if not paths:
            raise SystemExit(f"{out}: no cells/{cell}/finetune_*.json; run "
                             "benchmarks/finetune_recipe.sh into it, or pick --cell")
        for path in paths:
            r = json.loads(path.read_text())
            seed = int(r["finetune_config"]["seed"])
            protocol = r["protocol"]
            if seed in scores.get(protocol, {}):
                raise SystemExit(f"{path}: a second {protocol} result for seed {seed}; "
                                 "give one OUT per seed")
            scores.setdefault(protocol, {})[seed] = r["accuracy"]
            costs.setdefault(protocol, []).append(r)
            for name in BASELINES:
                acc = (r.get("baselines", {}).get(name) or {}).get("accuracy")
                if acc is None:
                    continue
                # Scratch is encoder-free and may come from another run's cell, carrying
                # that run's probe: the other protocols' baselines take precedence.
                if protocol == "scratch":
                    scores.setdefault(name, {}).setdefault(seed, acc)
                else:
                    scores.setdefault(name, {})[seed] = acc
    return scores, costs


def paired(claim: str, a: dict[int, float], b: dict[int, float]) -> Comparison | None:
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return None
    return compare(claim, [a[s] for s in seeds], [b[s] for s in seeds], paired=True)


def claims(scores: Scores, vs: Scores | None) -> list[Comparison]:
    found = [paired(text, scores.get(a, {}), scores.get(b, {})) for a, b, text in CLAIMS]
    if vs is not None:
        found += [paired("Equi > Inv, predictor finetuning", scores.get("predictor", {}),
                         vs.get("predictor", {})),
                  paired("Inv > Equi, linear probe", vs.get("linear_probe", {}),
                         scores.get("linear_probe", {}))]
    return [c for c in found if c is not None]


def _pct(x: float) -> str:
    return f"{100 * x:.2f}"


def markdown(scores: Scores, costs: dict[str, list[dict]], found: list[Comparison],
             targets: dict[str, float], vs: Scores | None) -> str:
    seeds = sorted({s for by_seed in scores.values() for s in by_seed})
    head = " | ".join(f"seed {s}" for s in seeds)
    lines = [f"| protocol | {head} | mean ± std | trainable params | GFLOPs/image "
             "| train s, mean |", "|" + "---|" * (len(seeds) + 5)]
    groups = [("", scores)] + ([("Inv ", vs)] if vs is not None else [])
    for prefix, table in groups:
        for name in (*PROTOCOLS, *BASELINES):
            if name not in table:
                continue
            by_seed = table[name]
            cells = " | ".join(_pct(by_seed[s]) if s in by_seed else "–" for s in seeds)
            results = costs.get(name, []) if prefix == "" else []
            extra = "– | – | –"
            if results:  # parameters and FLOPs are the protocol's; seconds the seeds' mean
                seconds = stat([r["train_seconds"] for r in results]).mean
                extra = (f"{results[0]['trainable_params']:,} | "
                         f"{results[0]['flops_per_image'] / 1e9:.3g} | {seconds:.0f}")
            lines.append(f"| {prefix}{name} | {cells} | "
                         f"{stat(list(by_seed.values())).text(100, 2)} | {extra} |")
    lines += ["", "| claim (a > b) | a | b | a − b | test | p | verdict |",
              "|" + "---|" * 7]
    for c in found:
        p = "–" if c.p is None else f"{c.p:.3f}"
        lines.append(f"| {c.claim} | {c.a.text(100, 2)} | {c.b.text(100, 2)} | "
                     f"{100 * c.diff:+.2f} | {c.test} | {p} | {c.verdict} |")
    if targets:
        lines += ["", "| target | seeds met | lowest |", "|---|---|---|"]
        for name, goal in targets.items():
            by_seed = scores.get(name, {})
            met = sum(v >= goal for v in by_seed.values())
            low = _pct(min(by_seed.values())) if by_seed else "–"
            lines.append(f"| {name} ≥ {_pct(goal)} | {met} of {len(by_seed)} | {low} |")
    return "\n".join(lines) + "\n"


def parse_target(text: str) -> tuple[str, float]:
    name, sep, value = text.partition("=")
    if not sep or name not in (*PROTOCOLS, *BASELINES):
        raise SystemExit(f"--target {text!r}: expected PROTOCOL=ACCURACY with PROTOCOL one "
                         f"of {', '.join(PROTOCOLS + BASELINES)}, e.g. encoder=0.90")
    try:
        return name, float(value)
    except ValueError:
        raise SystemExit(f"--target {text!r}: {value!r} is not a number") from None


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("outs", nargs="+", type=Path, help="finetune_recipe.sh OUTs, one per seed")
    ap.add_argument("--cell", default="e5-lr1e-3", help="cell name under OUT/cells")
    ap.add_argument("--vs", nargs="+", type=Path, default=None,
                    help="the same cell of the invariant preset, one OUT per seed")
    ap.add_argument("--target", action="append", default=[], type=parse_target,
                    metavar="PROTOCOL=ACC")
    ap.add_argument("--out", type=Path, default=None, help="also write the tables here")
    args = ap.parse_args(argv)
    scores, costs = load(args.outs, args.cell)
    vs = load(args.vs, args.cell)[0] if args.vs else None
    text = markdown(scores, costs, claims(scores, vs), dict(args.target), vs)
    if args.out is not None:
        args.out.write_text(text)
    print(text, end="")
    return text


if __name__ == "__main__":
    main()
