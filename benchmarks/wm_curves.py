"""World-model MRR and linear-probe accuracy against training steps, for one run.

Pretrains ``--config`` (with overrides; every checkpoint is kept) unless the run already
finished, then scores every checkpoint: ``iwm eval mrr`` (bank ``--bank``, ``--images``
test images, brightness and contrast on their own) and the linear probe of the frozen
target encoder. Writes ``OUT/curves.json`` and ``OUT/curves.png``.

    python benchmarks/wm_curves.py --config iwm-equi-long --out runs/curves \\
        --plot docs/long_curves.png
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from iwm.config import load_config  # noqa: E402
from iwm.evaluation.mrr import run_mrr  # noqa: E402
from iwm.evaluation.probe import run_linear_probe  # noqa: E402
from iwm.evaluation.ranking import chance_mrr  # noqa: E402
from iwm.training.checkpoint import list_checkpoints  # noqa: E402
from iwm.training.loop import pretrain  # noqa: E402


def score(out: Path, bank: int, images: int, probe: list[str]) -> list[dict]:
    """MRR and linear probe of every checkpoint of the run in ``out``, oldest first."""
    rows = []
    for step, path in list_checkpoints(out):
        start = time.perf_counter()
        mrr = run_mrr(path, n_images=images, bank_size=bank)
        linear = run_linear_probe(path, probe)
        rows.append({"step": step, "mrr": mrr["mrr"],
                     "brightness": mrr["per_transform"].get("brightness"),
                     "contrast": mrr["per_transform"].get("contrast"),
                     "linear": linear["accuracy"], "seconds": time.perf_counter() - start})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def plot(rows: list[dict], bank: int, title: str, path: Path) -> None:
    steps = [r["step"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    for key, style in (("mrr", "-o"), ("brightness", "--"), ("contrast", ":")):
        left.plot(steps, [r[key] for r in rows], style, label=key)
    left.axhline(chance_mrr(bank), color="grey", lw=0.8, label="chance")
    left.set(xlabel="step", ylabel=f"MRR (bank {bank})", ylim=(0, 1), title="world model")
    left.legend(fontsize=8)
    right.plot(steps, [100 * r["linear"] for r in rows], "-o", color="C3")
    right.set(xlabel="step", ylabel="linear probe top-1 (%)", title="frozen target encoder")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", required=True, help="preset name or YAML path")
    ap.add_argument("--out", type=Path, required=True, help="the run directory")
    ap.add_argument("--bank", type=int, default=64)
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--probe", nargs="*", default=["probe.train_limit=10000",
                                                   "probe.test_limit=5000"],
                    help="linear-probe overrides (default: the demo's probe sizes)")
    ap.add_argument("--plot", type=Path, default=None, help="PNG path (default OUT/curves.png)")
    ap.add_argument("overrides", nargs="*", help="config overrides, key=value")
    args = ap.parse_args(argv)

    cfg = load_config(args.config, [*args.overrides, "train.keep_checkpoints=1000",
                                    "train.progress=false"])
    if not (args.out / "results" / "train_done").exists():
        pretrain(cfg, args.out, resume=bool(list_checkpoints(args.out)))
        (args.out / "results").mkdir(parents=True, exist_ok=True)
        (args.out / "results" / "train_done").touch()
    rows = score(args.out, args.bank, args.images, args.probe)
    (args.out / "curves.json").write_text(json.dumps(rows, indent=2))
    plot(rows, args.bank, f"{args.config} {' '.join(args.overrides)}",
         args.plot or args.out / "curves.png")


if __name__ == "__main__":
    main()
