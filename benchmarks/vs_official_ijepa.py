"""iwm's I-JEPA training step against the official I-JEPA code's: same model, batch, masks.

    git clone https://github.com/facebookresearch/ijepa ~/ijepa
    python benchmarks/vs_official_ijepa.py --ijepa-repo ~/ijepa --model vit_tiny \
        --image-size 112 --patch-size 8 --batch-size 32 --pred-depth 6 --pred-width 192 \
        --steps 20 --warmup 5 --rounds 2 [--device cuda] [--bf16] [--json out.json]

The official code is imported from the clone (nothing of it is in this repository) and
run as its ``src/train.py`` runs it, on one process.

What is matched on both sides and what is timed: docs/performance.md, "Against the
official I-JEPA code".
"""

from __future__ import annotations

import argparse
import copy
import importlib
import logging
import math
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F

# A sibling script: benchmarks/ is on sys.path when this one runs (tests put it there too).
import train_throughput as tt
from torch import Tensor
from torch.utils.flop_counter import FlopCounterMode

from iwm.config import Config, load_config
from iwm.errors import ConfigError
from iwm.models.vit import ENCODERS
from iwm.training.distributed import resolve_device
from iwm.training.step import Trainer

CLONE_HINT = "git clone https://github.com/facebookresearch/ijepa PATH"

# The official I-JEPA ImageNet recipe (configs/in1k_vith14_ep300.yaml), shared by both sides.
PRED_SCALE, ENC_SCALE, ASPECT, N_PRED, MIN_KEEP = (0.15, 0.2), (0.85, 1.0), (0.75, 1.5), 4, 10
FLOP_DRAWS = 8
LR, START_LR, FINAL_LR, WD, FINAL_WD, EMA = 1e-3, 2e-4, 1e-6, 0.04, 0.4, (0.996, 1.0)


def import_official(repo: Path) -> dict[str, ModuleType]:
    """The official code's modules from a clone; a one-line error if it is not one."""
    repo = repo.expanduser().resolve()
    if not (repo / "src" / "helper.py").is_file():
        raise SystemExit(f"--ijepa-repo {repo}: no src/helper.py there; clone the official "
                         f"code first: {CLONE_HINT}")
    # Its modules are called src.*; nothing else of that name may shadow them.
    for name in [m for m in sys.modules if m == "src" or m.startswith("src.")]:
        del sys.modules[name]
    sys.path.insert(0, str(repo))
    try:
        mods = {name: importlib.import_module(f"src.{name}")
                for name in ("helper", "masks.multiblock", "masks.utils", "utils.tensors",
                             "utils.logging")}
    except ImportError as e:
        raise SystemExit(f"--ijepa-repo {repo}: importing the official code failed ({e}); "
                         "use an unmodified clone") from e
    finally:
        sys.path.remove(str(repo))
    # src.helper points the root logger at stdout at INFO and prints whole models there.
    logging.getLogger().setLevel(logging.WARNING)
    for name, mod in mods.items():
        if repo not in Path(mod.__file__ or "").resolve().parents:
            raise SystemExit(f"--ijepa-repo {repo}: src.{name} came from {mod.__file__}, "
                             "not from the clone; run from another folder")
    return mods


def timed(device: torch.device, fn: Callable[[], Any]) -> float:
    """Wall seconds of ``fn``, with the device's queue drained before and after: a block of
    steps timed as a whole leaves the host free to run ahead inside it, as in training."""
    tt.synchronize(device)
    t0 = time.perf_counter()
    fn()
    tt.synchronize(device)
    return time.perf_counter() - t0


class OfficialSide:
    """The official code's model, optimiser, schedules and masks, stepped as train.py does."""

    def __init__(self, mods: dict[str, ModuleType], args: argparse.Namespace,
                 device: torch.device, total_steps: int) -> None:
        helper = mods["helper"]
        self.apply_masks = mods["masks.utils"].apply_masks
        self.repeat_interleave_batch = mods["utils.tensors"].repeat_interleave_batch
        self.grad_logger = mods["utils.logging"].grad_logger
        self.encoder, self.predictor = helper.init_model(
            device=device, patch_size=args.patch_size, crop_size=args.image_size,
            pred_depth=args.pred_depth, pred_emb_dim=args.pred_width, model_name=args.model)
        self.target_encoder = copy.deepcopy(self.encoder)
        for p in self.target_encoder.parameters():
            p.requires_grad = False
        self.collator = mods["masks.multiblock"].MaskCollator(
            input_size=args.image_size, patch_size=args.patch_size, pred_mask_scale=PRED_SCALE,
            enc_mask_scale=ENC_SCALE, aspect_ratio=ASPECT, nenc=1, npred=N_PRED,
            allow_overlap=False, min_keep=MIN_KEEP)
        self.optimizer, self.scaler, self.scheduler, self.wd_scheduler = helper.init_opt(
            encoder=self.encoder, predictor=self.predictor, wd=WD, final_wd=FINAL_WD,
            start_lr=START_LR, ref_lr=LR, final_lr=FINAL_LR, iterations_per_epoch=total_steps,
            warmup=0.1, num_epochs=1, ipe_scale=1.0, use_bfloat16=args.bf16)
        self.momentum = _linear(EMA, total_steps)
        self.bf16, self.device = args.bf16, device

    def masks(self, images: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        # The collator collates (image, label) pairs; its image batch is not used here,
        # the images already wait on the device.
        _, enc, pred = self.collator([(torch.zeros(()), 0)] * images.shape[0])
        return enc, pred

    def step(self, imgs: Tensor, masks: tuple[list[Tensor], list[Tensor]]) -> float:
        masks_enc = [u.to(self.device, non_blocking=True) for u in masks[0]]
        masks_pred = [u.to(self.device, non_blocking=True) for u in masks[1]]
        self.scheduler.step()
        self.wd_scheduler.step()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.bf16):
            loss = self.loss(imgs, masks_enc, masks_pred)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
        self.grad_logger(self.encoder.named_parameters())
        self.optimizer.zero_grad()
        with torch.no_grad():
            m = next(self.momentum)
            for q, k in zip(self.encoder.parameters(), self.target_encoder.parameters(),
                            strict=True):
                k.data.mul_(m).add_((1.0 - m) * q.detach().data)
        return float(loss)

    def loss(self, imgs: Tensor, masks_enc: list[Tensor], masks_pred: list[Tensor]) -> Tensor:
        with torch.no_grad():
            h = self.target_encoder(imgs)
            h = F.layer_norm(h, (h.size(-1),))
            h = self.apply_masks(h, masks_pred)
            h = self.repeat_interleave_batch(h, len(imgs), repeat=len(masks_enc))
        z = self.predictor(self.encoder(imgs, masks_enc), masks_enc, masks_pred)
        return F.smooth_l1_loss(z, h)

    def flops_per_image(self, imgs: Tensor, formulas: dict[Any, Any]) -> float:
        masks = [[u.to(self.device) for u in m] for m in self.masks(imgs)]
        counter = FlopCounterMode(display=False, custom_mapping=formulas)
        with counter, torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.bf16):
            self.loss(imgs, *masks).backward()
        self.optimizer.zero_grad()
        return counter.get_total_flops() / imgs.shape[0]


def smallest_target_block(side: int) -> int:
    """Patches in the official collator's smallest target block on a ``side``-square grid
    (its size formula, over the range of its one random number)."""
    sizes = []
    for i in range(101):
        t = i / 100
        keep = int(side * side * (PRED_SCALE[0] + t * (PRED_SCALE[1] - PRED_SCALE[0])))
        aspect = ASPECT[0] + t * (ASPECT[1] - ASPECT[0])
        h = min(round(math.sqrt(keep * aspect)), side - 1)
        w = min(round(math.sqrt(keep / aspect)), side - 1)
        sizes.append(h * w)
    return min(sizes)


def _linear(ends: tuple[float, float], steps: int) -> Iterator[float]:
    while True:  # as train.py's momentum generator, without running out after `steps`
        for i in range(steps + 1):
            yield ends[0] + i * (ends[1] - ends[0]) / steps


def iwm_config(args: argparse.Namespace, device: torch.device) -> Config:
    """The ijepa preset with the official code's model, masks, loss and optimiser."""
    side = args.image_size // args.patch_size
    n_patches = side * side
    # The official context block is never the whole grid (its size is clamped below the
    # side, e.g. always 13 x 13 on 14 x 14); iwm's reaches it for scales near 1. Capping
    # the scale just under a side - 0.5 rounding gives the same blocks.
    ctx_hi = min(ENC_SCALE[1], 0.999 * ((side - 0.5) / side) ** 2)
    return load_config("ijepa-tiny", [
        f"data.image_size={args.image_size}", f"train.batch_size={args.batch_size}",
        f"model.encoder={args.model}", f"model.patch_size={args.patch_size}",
        f"model.predictor_depth={args.pred_depth}", f"model.predictor_width={args.pred_width}",
        f"model.predictor_heads={ENCODERS[args.model].num_heads}",
        "model.loss=smooth_l1", "model.drop_path=0.0",
        f"mask.num_targets={N_PRED}", f"mask.target_scale={list(PRED_SCALE)}",
        f"mask.target_aspect={list(ASPECT)}", f"mask.context_scale={[ENC_SCALE[0], ctx_hi]}",
        f"mask.min_context={MIN_KEEP / n_patches}", "mask.wrap=false",
        "mask.block_sizes=per_batch", "mask.context_tokens=thin",
        "mask.predictor_pass=per_block",
        f"optim.lr={LR}", f"optim.start_lr={START_LR}", f"optim.final_lr={FINAL_LR}",
        f"optim.weight_decay={WD}", f"optim.final_weight_decay={FINAL_WD}",
        f"optim.ema={list(EMA)}", "optim.grad_clip=null", "optim.warmup_epochs=0.1",
        "train.epochs=1", f"train.precision={'bf16' if args.bf16 else 'fp32'}",
        f"train.device={device}", "train.compile=false",
    ])


def run(args: argparse.Namespace, mods: dict[str, ModuleType]) -> dict[str, Any]:
    """Time both sides, with train_throughput's FLOP counting and device sync."""
    device = resolve_device(args.device)
    if args.bf16 and device.type != "cuda":
        raise SystemExit("--bf16: the official code's autocast is CUDA-only; on "
                         f"{device.type} compare in fp32 (leave --bf16 out; time iwm's CPU "
                         "bf16 with --iwm-variant train.precision=bf16)")
    torch.manual_seed(args.seed)
    total = args.rounds * (args.warmup + args.steps) + 2
    base = iwm_config(args, device)
    # Crops in [0, 1], as iwm's batch sources hand them to the step, which normalises them;
    # the official side gets them normalised (its transform does that in the workers).
    gen = torch.Generator().manual_seed(args.seed)
    shape = (args.batch_size, 3, args.image_size, args.image_size)
    pixels = torch.randint(0, 256, shape, dtype=torch.uint8, generator=gen).to(device)
    crops = pixels.float() / 255
    imgs = ((crops - 0.45) / 0.225).contiguous()

    official = OfficialSide(mods, args, device, total)
    official.encoder.train()
    official.predictor.train()
    configs = {"iwm": base, **{f"iwm {v}": load_config(base.to_dict(), v.split())
                               for v in args.iwm_variant}}
    trainers = {name: Trainer.create(cfg, channels=3, mean=(0.45,) * 3, std=(0.225,) * 3,
                                     device=device, steps_per_epoch=total)
                for name, cfg in configs.items()}
    for trainer in trainers.values():
        trainer.model.train()
    formulas = tt._extra_flop_formulas()
    # Mask sizes, and so FLOPs, vary from batch to batch on both sides: a mean over draws.
    flops = {"official": statistics.mean(official.flops_per_image(imgs, formulas)
                                         for _ in range(FLOP_DRAWS)),
             "iwm": statistics.mean(tt.count_flops(trainers["iwm"], crops)
                                    for _ in range(FLOP_DRAWS)) / args.batch_size}
    params = {"official": sum(p.numel() for m in (official.encoder, official.predictor)
                              for p in m.parameters()),
              "iwm": sum(p.numel() for n, p in trainers["iwm"].model.named_parameters()
                         if not n.startswith("target_encoder."))}

    # Per round and side: seconds per step over `steps` steps timed as one block, as each
    # loop runs them. The official step reads its loss on the host (float(loss)); iwm's
    # does not, so the host queues iwm's next step while the GPU still runs this one.
    # The official masks come from its collator, which train.py runs in DataLoader
    # workers: drawn before the block and timed apart.
    times: dict[str, list[float]] = {"official": [], "collator": []}

    def official_block(n: int) -> tuple[float, ...]:
        t0 = time.perf_counter()
        masks = [official.masks(imgs) for _ in range(n)]
        collator = (time.perf_counter() - t0) / n
        return timed(device, lambda: [official.step(imgs, m) for m in masks]) / n, collator

    def iwm_block(name: str) -> Callable[[int], tuple[float, ...]]:
        trainer, done = trainers[name], [0]

        def block(n: int) -> tuple[float, ...]:
            def steps() -> None:
                for _ in range(n):
                    trainer.step(done[0], crops)
                    done[0] += 1
            return (timed(device, steps) / n,)

        return block

    sides = [("official", official_block)] + [(k, iwm_block(k)) for k in trainers]
    peak: dict[str, int] = {}
    for r in range(args.rounds):
        for name, block in sides if r % 2 == 0 else sides[::-1]:
            if args.warmup:
                block(args.warmup)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            per_step = block(args.steps)
            for key, seconds in zip((name, "collator"), per_step, strict=False):
                times.setdefault(key, []).append(seconds)
            if device.type == "cuda":
                peak[name] = max(peak.get(name, 0), torch.cuda.max_memory_allocated(device))

    step_s = {k: statistics.median(v) for k, v in times.items()}
    ips = {k: args.batch_size / v for k, v in step_s.items() if k != "collator"}
    ips["official_with_collator"] = args.batch_size / (step_s["official"]
                                                       + step_s["collator"])
    return {
        "device": str(device),
        "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda"
                        else device.type),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "precision": "bf16" if args.bf16 else "fp32",
        "model": args.model, "image_size": args.image_size, "patch_size": args.patch_size,
        "batch_size": args.batch_size, "pred_depth": args.pred_depth,
        "pred_width": args.pred_width, "steps": args.steps, "warmup": args.warmup,
        "rounds": args.rounds, "seed": args.seed,
        "params": params,
        "flops_per_image": flops,
        "step_time_ms": {k: 1e3 * v for k, v in step_s.items()},
        "step_time_ms_per_round": {k: [1e3 * x for x in v] for k, v in times.items()},
        "images_per_s": ips,
        "speedup": {k: v / ips["official"] for k, v in ips.items() if k.startswith("iwm")},
        "speedup_with_collator": {k: v / ips["official_with_collator"]
                                  for k, v in ips.items() if k.startswith("iwm")},
        "peak_memory_bytes": peak or None,
    }


def format_table(r: dict[str, Any]) -> str:
    ms, ips, fl = r["step_time_ms"], r["images_per_s"], r["flops_per_image"]
    rows = [
        ("device", f"{r['device_name']}, {r['precision']}, {r['threads']} threads, "
                   f"torch {r['torch']}"),
        ("model", f"{r['model']}/{r['patch_size']} at {r['image_size']} px, predictor "
                  f"{r['pred_depth']} x {r['pred_width']}, batch {r['batch_size']}"),
        ("params", f"iwm {r['params']['iwm'] / 1e6:.2f} M, official "
                   f"{r['params']['official'] / 1e6:.2f} M (encoder + predictor)"),
        ("GFLOP/image", f"iwm {fl['iwm'] / 1e9:.3f}, official {fl['official'] / 1e9:.3f}"),
        ("timing", f"{r['steps']} steps after {r['warmup']} warm-up, median of "
                   f"{r['rounds']} alternating rounds"),
        ("official", f"{ms['official']:8.2f} ms/step  {ips['official']:8.1f} img/s "
                     "(masks from workers)"),
        ("  + collator", f"{ms['collator']:8.2f} ms/step  {ips['official_with_collator']:8.1f}"
                         " img/s (masks on the critical path)"),
    ]
    for name, speedup in r["speedup"].items():
        rows.append((name, f"{ms[name]:8.2f} ms/step  {ips[name]:8.1f} img/s  "
                           f"{speedup:.2f}x ({r['speedup_with_collator'][name]:.2f}x against "
                           "the official with its collator)"))
    if r["peak_memory_bytes"]:
        rows.append(("peak memory", ", ".join(f"{k} {v / 2**30:.2f} GiB"
                                              for k, v in r["peak_memory_bytes"].items())))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ijepa-repo", type=Path, required=True,
                   help=f"a clone of the official code ({CLONE_HINT})")
    p.add_argument("--model", default="vit_tiny",
                   choices=("vit_tiny", "vit_small", "vit_base", "vit_large", "vit_huge"))
    p.add_argument("--image-size", type=int, default=112)
    p.add_argument("--patch-size", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--pred-depth", type=int, default=6)
    p.add_argument("--pred-width", type=int, default=192)
    p.add_argument("--steps", type=int, default=20, help="timed steps per side and round")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps before each timing")
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds (A B A B ...)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (CUDA only)")
    p.add_argument("--iwm-variant", action="append", default=[], metavar="'KEY=VALUE ...'",
                   help="also time iwm with these config overrides (repeatable), e.g. "
                        "'train.compile=true' or 'train.precision=bf16'")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, metavar="PATH",
                   help="also write the results here as JSON")
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.rounds < 1:
        p.error("--steps and --rounds must be >= 1 and --warmup >= 0")
    if args.image_size % args.patch_size:
        p.error(f"--image-size {args.image_size} is not a multiple of --patch-size "
                f"{args.patch_size}")
    side = args.image_size // args.patch_size
    if smallest_target_block(side) <= MIN_KEEP:
        p.error(f"a {side}x{side} patch grid is too small: the official MaskCollator redraws "
                f"target blocks of at most {MIN_KEEP} patches forever; use at least a 10x10 "
                "grid (e.g. --image-size 112 --patch-size 8, the official 14x14)")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    mods = import_official(args.ijepa_repo)
    # Its step calls float() on a loss that still requires grad; torch warns every step.
    warnings.filterwarnings("ignore", message="Converting a tensor with requires_grad")
    try:
        results = run(args, mods)
    except ConfigError as e:  # sizes iwm cannot build, e.g. a width the heads do not divide
        raise SystemExit(f"error: {e}") from e
    print(format_table(results))
    if args.json is not None:
        tt.write_json(args.json, results)
    return results


if __name__ == "__main__":
    main()
