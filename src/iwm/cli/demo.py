"""``iwm demo``: the main job on the embedded data, end to end on a laptop CPU.

Fetch Fashion-MNIST, pretrain a tiny IWM, measure its world model (MRR), probe its frozen
encoder against the same architecture at random initialisation, write the HTML report and
print a summary.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from datetime import datetime
from pathlib import Path

import torch

from iwm.config import load_config
from iwm.data.datasets import get_dataset
from iwm.evaluation.mrr import chance_mrr, run_mrr
from iwm.evaluation.probe import probe_encoder
from iwm.evaluation.report import build_report
from iwm.models.iwm import build_model
from iwm.training.distributed import resolve_device
from iwm.training.loop import pretrain

DEMO_PRESET = "iwm-equi-tiny"
# Sized so that the whole demo fits in about 10 minutes on 2 CPU cores.
# The EMA starts at 0.98 rather than I-JEPA's 0.996: over a few hundred steps the target
# encoder (the one probed) would otherwise still be mostly its random initialisation.
DEMO_OVERRIDES = ["train.epochs=0.6", "train.batch_size=128", "optim.warmup_epochs=0.1",
                  "optim.ema=[0.98,1.0]", "train.checkpoint_every=100",
                  "probe.train_limit=10000", "probe.test_limit=5000"]
QUICK_OVERRIDES = ["data.limit=2048", "train.epochs=1", "train.batch_size=32",
                   "probe.train_limit=1000", "probe.test_limit=500", "train.log_every=4"]
# MRR (images, bank size): a smaller bank than the paper's 256 so that the evaluation
# takes well under a minute on 2 CPU cores (all 7 settings; chance = H_K / K = 0.127 for 32).
DEMO_MRR = (64, 32)
QUICK_MRR = (16, 16)


def run_demo(out: Path, quick: bool = False, device: str = "auto",
             overrides: list[str] | None = None) -> dict:
    start = time.perf_counter()
    dev = resolve_device(device)
    cfg = load_config(DEMO_PRESET, [*DEMO_OVERRIDES, *(QUICK_OVERRIDES if quick else []),
                                    f"train.device={dev}", *(overrides or [])])
    run_dir = out / f"{DEMO_PRESET}-{datetime.now():%Y%m%d-%H%M%S}"
    print(f"[1/5] data: {cfg.data.name}")
    train = get_dataset(cfg.data.name, "train", cfg.data.root)
    print(f"      {len(train)} training images")

    print(f"[2/5] pretraining {DEMO_PRESET} ({cfg.model.encoder}, predictor "
          f"{cfg.model.predictor_depth}x{cfg.model.predictor_width}, views "
          f"'{cfg.views.strength}') on {dev} -> {run_dir}")
    pretrain(cfg, run_dir)

    n_images, bank = QUICK_MRR if quick else DEMO_MRR
    print(f"[3/5] world model: MRR on {n_images} test images, bank of {bank} transformations")
    mrr = run_mrr(run_dir, n_images=n_images, bank_size=bank, device=str(dev),
                  seed=cfg.train.seed)
    chance = chance_mrr(bank)
    print(f"      MRR {mrr['mrr']:.3f} (chance {chance:.3f}, {mrr['seconds']:.0f} s)")

    print("[4/5] linear probe (frozen target encoder vs. the same ViT at random init)")
    from iwm.api import load

    trained = load(run_dir, device=dev)
    probe_trained = probe_encoder(trained.encoder, trained.normalize, cfg, dev)
    torch.manual_seed(cfg.train.seed)
    random_model = build_model(cfg, trained.model.encoder.patch_embed.proj.in_channels).to(dev)
    probe_random = probe_encoder(random_model.target_encoder, trained.normalize, cfg, dev)

    summary = {
        "run_dir": str(run_dir),
        "probe_linear": asdict(probe_trained),
        "probe_linear_random_encoder": asdict(probe_random),
        "seconds": time.perf_counter() - start,
    }
    results = run_dir / "results"
    results.mkdir(parents=True, exist_ok=True)
    (results / "probe_linear.json").write_text(json.dumps(
        {**asdict(probe_trained), "encoder": "target"}, indent=2))
    # The baseline, as a result file of its own so the report's table shows it too.
    (results / "probe_linear_random_init.json").write_text(json.dumps(
        {**asdict(probe_random), "encoder": "random init (baseline)"}, indent=2))

    print("[5/5] report")
    report = build_report(run_dir, device=str(dev))
    summary.update(mrr=mrr["mrr"], mrr_bank=bank, report=str(report),
                   seconds=time.perf_counter() - start)
    (results / "demo_summary.json").write_text(json.dumps(summary, indent=2))

    gain = probe_trained.accuracy - probe_random.accuracy
    print()
    print("summary")
    print(f"  linear probe, pretrained IWM encoder : {probe_trained.accuracy:.2%}")
    print(f"  linear probe, random-init encoder    : {probe_random.accuracy:.2%}")
    print(f"  difference                           : {gain:+.2%}")
    print(f"  {f'world-model MRR (bank {bank})':<37}: {mrr['mrr']:.3f} (chance {chance:.3f})")
    print(f"  run directory                        : {run_dir}")
    print(f"  report                               : {report}")
    print(f"  wall time                            : {summary['seconds']:.0f} s")
    return summary
