"""Throughput of one preset's pretraining step, without a data set.

    python benchmarks/train_throughput.py --config iwm-equi-tiny [key=value ...] \
        --steps 20 --warmup 5 --device auto --channels 1 [--json out.json] [--profile DIR]

Options of the step are config overrides: train.precision=bf16, train.compile=true,
train.grad_accum_steps=N, model.grad_checkpointing=true.

Synthetic uint8 images of the preset's size and channel count are held on the device, so
the numbers cover what the training loop does per step on the device (crop, views, masks,
forward, backward, optimiser, EMA) and nothing of disk or decoding. Model, views, masks,
optimiser and autocast are built by the training loop's own ``iwm.training.step.Trainer``,
and each timed step is its ``Trainer.step``; only the timing marks between phases are
added.

Reported: images/s, mean step time, the per-phase split, peak memory, FLOPs per image
(one forward + backward, counted with ``torch.utils.flop_counter``) and MFU: on a known
GPU in bf16 against its dense peak, elsewhere against ``--peak-tflops`` when given.
On a GPU, images/s and step time come from steps run as training runs them (nothing waits
for the device between steps; CUDA events time them), and the split from as many more
steps with a device sync at every phase boundary, whose mean is reported beside.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.flop_counter import FlopCounterMode

from iwm.config import Config, load_config
from iwm.data.crops import random_resized_crop
from iwm.training.distributed import resolve_device
from iwm.training.step import Trainer

PHASES = ("data", "forward", "backward", "optimizer", "ema")

#: Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) by a substring of the CUDA device
#: name; the first match wins, so the specific H100 variants come before plain "h100".
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("h200", 989.0),
    ("h100 pcie", 756.0),
    ("h100 nvl", 835.0),
    ("h100", 989.0),  # SXM ("NVIDIA H100 80GB HBM3")
    ("a100", 312.0),
)

#: Data sets stored with one channel; everything else (CIFAR, STL, image folders) is RGB.
GRAYSCALE_DATA = ("mnist", "fashion-mnist")


def lookup_peak_tflops(device_name: str) -> float | None:
    name = device_name.lower()
    for key, tflops in PEAK_BF16_TFLOPS:
        if key in name:
            return tflops
    return None


def default_channels(cfg: Config) -> int:
    return 1 if cfg.data.name.strip().lower() in GRAYSCALE_DATA else 3


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels, so a phase's wall time is its own and not the next one's."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


# ---------------------------------------------------------------- FLOP counting

# FlopCounterMode knows the CUDA attention kernels (flash, efficient, cudnn) but not the
# CPU one that F.scaled_dot_product_attention dispatches to, so on CPU attention would
# silently count as zero. These formulas count its two matmuls the same way: 2 FLOPs per
# multiply-add, QK^T and PV forward, four matmuls of the same sizes backward.


def _sdpa_forward_flops(q: tuple[int, ...], k: tuple[int, ...], v: tuple[int, ...]) -> int:
    *batch, s_q, d_qk = q
    s_k, d_v = k[-2], v[-1]
    return 2 * math.prod(batch) * s_q * s_k * (d_qk + d_v)


def _cpu_sdpa_flop(query_shape: tuple[int, ...], key_shape: tuple[int, ...],
                   value_shape: tuple[int, ...], *args: Any, out_shape: Any = None,
                   **kwargs: Any) -> int:
    return _sdpa_forward_flops(query_shape, key_shape, value_shape)


def _cpu_sdpa_backward_flop(grad_out_shape: tuple[int, ...], query_shape: tuple[int, ...],
                            key_shape: tuple[int, ...], value_shape: tuple[int, ...],
                            *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    return 2 * _sdpa_forward_flops(query_shape, key_shape, value_shape)


def _extra_flop_formulas() -> dict[Any, Callable[..., int]]:
    aten = torch.ops.aten
    formulas: dict[Any, Callable[..., int]] = {}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        formulas[aten._scaled_dot_product_flash_attention_for_cpu] = _cpu_sdpa_flop
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward"):
        formulas[aten._scaled_dot_product_flash_attention_for_cpu_backward] = (
            _cpu_sdpa_backward_flop)
    return formulas


# ---------------------------------------------------------------- the benchmark


class PhaseTimer:
    """Wall time between marks, with a device sync at every mark."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.times: dict[str, float] = {}
        self._last = time.perf_counter()

    def mark(self, phase: str) -> None:
        synchronize(self.device)
        now = time.perf_counter()
        self.times[phase] = self.times.get(phase, 0.0) + (now - self._last)
        self._last = now


class StepClock:
    """Seconds per step without draining the device between steps, so the host queues step
    i + 1 while the device runs step i, as in training: CUDA events recorded at step
    boundaries and read after the last step; the host clock elsewhere."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._events: list[Any] = []
        self._host: list[float] = []

    def tick(self) -> None:
        if self.device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record(torch.cuda.current_stream(self.device))  # cuda:N, not the current
            self._events.append(event)
        else:
            synchronize(self.device)
            self._host.append(time.perf_counter())

    def seconds(self) -> list[float]:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return [a.elapsed_time(b) / 1e3 for a, b in itertools.pairwise(self._events)]
        return [b - a for a, b in itertools.pairwise(self._host)]


class SyntheticCrops:
    """The in-memory source's work per batch (crop + flip of uint8 images on the device),
    on random images: one pool of ``batch_size`` images, cropped afresh every step."""

    def __init__(self, cfg: Config, channels: int, device: torch.device) -> None:
        size = cfg.data.image_size
        gen = torch.Generator().manual_seed(cfg.train.seed)
        self.images = torch.randint(0, 256, (cfg.train.batch_size, channels, size, size),
                                    dtype=torch.uint8, generator=gen).to(device)
        self.cfg = cfg.data
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(cfg.train.seed + 1)
        self.kind = "random_resized_crop"

    def next(self) -> Tensor:
        return random_resized_crop(self.images, self.cfg.image_size, self.cfg.crop_scale,
                                   self.cfg.crop_ratio, self.cfg.hflip, self.generator)


def count_flops(trainer: Trainer, crops: Tensor) -> int:
    """FLOPs of one forward + backward on a batch like the training one (mask sizes vary
    from batch to batch, so this is one sample of a slightly varying number)."""
    v = trainer.view_sampler(crops, trainer.view_rng)
    m = trainer.mask_sampler(crops.shape[0], trainer.view_rng, crops.device)
    norm = trainer.normalize
    # The uncompiled model: the counter sees the same aten ops, and compiled graphs may hide
    # them from it.
    counter = FlopCounterMode(display=False, custom_mapping=_extra_flop_formulas())
    with counter:
        with _autocast(crops.device, trainer.amp_dtype):
            out = trainer.model(norm(v.source), norm(v.target), v.action, m)
        out.loss.backward()
    trainer.model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def _autocast(device: torch.device, amp_dtype: torch.dtype | None
              ) -> contextlib.AbstractContextManager[Any]:
    # As in the loop: no autocast context at all when running in fp32.
    return torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else \
        contextlib.nullcontext()


def _peak_memory(device: torch.device) -> tuple[int, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "cuda max_memory_allocated"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # ru_maxrss is KiB on Linux but bytes on macOS.
    return (rss if sys.platform == "darwin" else rss * 1024), "process peak RSS"


def benchmark(cfg: Config, *, steps: int, warmup: int, channels: int,
              peak_tflops: float | None = None, profile: Path | None = None,
              split_apart: bool | None = None) -> dict[str, Any]:
    """Run ``warmup`` untimed and ``steps`` timed training steps of ``cfg``; the results.

    ``split_apart``: time the phase split in ``steps`` more steps, so that the timed ones
    run unsynchronised (default: on devices that run ahead of the host, CUDA and MPS).
    With ``profile``, 3 more steps run under ``torch.profiler`` afterwards (so the
    profiler's overhead is not in the timings): a Chrome/Perfetto trace and the operators
    sorted by self time are written there."""
    device = resolve_device(cfg.train.device)
    torch.manual_seed(cfg.train.seed)
    batch = cfg.train.batch_size

    # The training loop's own Trainer, so the benchmark times exactly the training step.
    # Statistics only shift the inputs; any plausible values cost the same. Schedules span
    # exactly these steps: their values change, their cost does not.
    cfg = load_config(cfg.to_dict(), ["train.epochs=1"])
    # A device that runs ahead of the host is timed twice: as training runs (no sync in
    # the step) for images/s, then with a sync at every phase boundary for the split.
    if split_apart is None:
        split_apart = device.type in ("cuda", "mps")
    trainer = Trainer.create(cfg, channels=channels, mean=(0.5,) * channels,
                             std=(0.25,) * channels, device=device,
                             steps_per_epoch=warmup + steps * (1 + split_apart) + 3)
    batches = SyntheticCrops(cfg, channels, device)
    trainer.model.train()
    flops_per_image = count_flops(trainer, batches.next()) / batch

    def train_step(step: int) -> None:
        trainer.step(step, batches.next())

    def marked_step(step: int) -> dict[str, float]:
        timer = PhaseTimer(device)
        trainer.step(step, batches.next(), mark=timer.mark)
        return timer.times

    for step in range(warmup):
        train_step(step)
    if device.type == "cuda":
        # Peak of the steady state: warm-up and FLOP counting allocate no more, but the
        # counter's bookkeeping and one-off autotuning should not be in the number.
        torch.cuda.reset_peak_memory_stats(device)
    clock = StepClock(device)
    clock.tick()
    if split_apart:
        for i in range(steps):
            train_step(warmup + i)
            clock.tick()
        per_step = [marked_step(warmup + steps + i) for i in range(steps)]
    else:  # syncing is free here: one pass gives both
        per_step = []
        for i in range(steps):
            per_step.append(marked_step(warmup + i))
            clock.tick()
    step_s = clock.seconds()
    done = warmup + steps * (1 + split_apart)

    if profile is not None:
        write_profile(profile, device, lambda i: train_step(done + i))

    total_s = sum(step_s)
    phase_s = {p: sum(t[p] for t in per_step) for p in PHASES}
    synced_s = sum(phase_s.values())
    images_per_s = batch * steps / total_s
    peak_bytes, peak_kind = _peak_memory(device)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    if peak_tflops is None and device.type == "cuda" and trainer.amp_dtype == torch.bfloat16:
        # The table holds bf16 peaks; an fp32 run has a different (much lower) ceiling.
        peak_tflops = lookup_peak_tflops(device_name)
    achieved_tflops = flops_per_image * images_per_s / 1e12
    # A CPU has no table entry; a peak given for it (such as a measured matmul rate) counts.
    mfu = achieved_tflops / peak_tflops if peak_tflops else None
    return {
        "config": cfg.to_dict(),
        "device": str(device),
        "device_name": device_name,
        "precision": (str(trainer.amp_dtype).removeprefix("torch.") if trainer.amp_dtype
                      else "fp32"),
        "compile": cfg.train.compile,
        "batch_size": batch,
        "channels": channels,
        "image_size": cfg.data.image_size,
        "crops": batches.kind,
        "steps": steps,
        "warmup": warmup,
        "split_apart": split_apart,
        "images_per_s": images_per_s,
        "step_time_ms": 1e3 * total_s / steps,
        "step_time_ms_median": 1e3 * statistics.median(step_s),
        "step_time_ms_synced": 1e3 * synced_s / steps,
        "phase_ms": {p: 1e3 * s / steps for p, s in phase_s.items()},
        "split": {p: s / synced_s for p, s in phase_s.items()},
        "peak_memory_bytes": peak_bytes,
        "peak_memory_kind": peak_kind,
        "flops_per_image": flops_per_image,
        "achieved_tflops": achieved_tflops,
        "peak_tflops": peak_tflops,
        "mfu": mfu,
    }


def write_profile(folder: Path, device: torch.device, run_step: Callable[[int], Any],
                  n_steps: int = 3) -> None:
    """Profile ``n_steps`` calls of ``run_step``: ``trace.json`` (open in Perfetto or
    chrome://tracing) and ``ops.txt``, the operators by self time."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    folder.mkdir(parents=True, exist_ok=True)
    with profile(activities=activities, record_shapes=True) as prof:
        for i in range(n_steps):
            run_step(i)
    prof.export_chrome_trace(str(folder / "trace.json"))
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=30)
    (folder / "ops.txt").write_text(table + "\n")
    print(f"profile of {n_steps} steps -> {folder / 'trace.json'}, {folder / 'ops.txt'}")


def format_table(r: dict[str, Any]) -> str:
    mfu = f"{100 * r['mfu']:.1f} % of {r['peak_tflops']:.3g} TFLOP/s" if r["mfu"] is not None \
        else "n/a"
    rows = [
        ("device", f"{r['device_name']} ({r['device']}), {r['precision']}"
                   + (", compiled" if r["compile"] else "")),
        ("batch", f"{r['batch_size']} x {r['channels']}x{r['image_size']}x{r['image_size']}"
                  f" (crops: {r['crops']})"),
        ("steps", f"{r['steps']} timed after {r['warmup']} warm-up"),
        ("images/s", f"{r['images_per_s']:.1f}"),
        ("step time", f"{r['step_time_ms']:.2f} ms mean, {r['step_time_ms_median']:.2f} ms "
                      "median"),
    ]
    if not math.isclose(r["step_time_ms_synced"], r["step_time_ms"], rel_tol=1e-3):
        rows.append(("split", f"of {r['step_time_ms_synced']:.2f} ms per step, a device sync "
                              "at every phase boundary"))
    rows += [(f"  {p}", f"{r['phase_ms'][p]:8.2f} ms  {100 * r['split'][p]:5.1f} %")
             for p in PHASES]
    rows += [
        ("peak memory", f"{r['peak_memory_bytes'] / 2**20:.1f} MiB ({r['peak_memory_kind']})"),
        ("FLOPs/image", f"{r['flops_per_image'] / 1e9:.3f} GFLOP (forward + backward)"),
        ("achieved", f"{r['achieved_tflops']:.3f} TFLOP/s"),
        ("MFU", mfu),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def write_json(path: Path, results: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides, e.g. train.batch_size=64")
    p.add_argument("--config", default="iwm-equi-tiny", help="preset name or YAML path")
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps before timing")
    p.add_argument("--device", default=None,
                   help="auto, cpu, cuda, cuda:N or mps (default: the config's train.device)")
    p.add_argument("--channels", type=int, choices=(1, 3), default=None,
                   help="image channels (default: 1 for MNIST-family data, else 3)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="device peak for MFU (default: looked up for bf16 on known GPUs; "
                        "on a CPU give one, e.g. its measured bf16 matmul rate)")
    p.add_argument("--json", type=Path, default=None, metavar="PATH",
                   help="also write the results here as JSON")
    p.add_argument("--profile", type=Path, default=None, metavar="DIR",
                   help="also profile 3 steps (torch.profiler): DIR/trace.json, DIR/ops.txt")
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    if args.profile is not None and args.profile.exists() and not args.profile.is_dir():
        p.error(f"--profile {args.profile} is a file; give a folder for trace.json and ops.txt")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    overrides = list(args.overrides)
    if args.device is not None:
        overrides.append(f"train.device={args.device}")
    cfg = load_config(args.config, overrides)
    channels = args.channels or default_channels(cfg)
    results = benchmark(cfg, steps=args.steps, warmup=args.warmup, channels=channels,
                        peak_tflops=args.peak_tflops, profile=args.profile)
    results["config_name"] = args.config
    results["overrides"] = overrides
    print(format_table(results))
    if args.json is not None:
        write_json(args.json, results)
    return results


if __name__ == "__main__":
    main()
