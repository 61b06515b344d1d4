"""What the device's matrix multiply actually reaches: the ceiling a training step works
against, and on a CPU (no spec-sheet peak) the number to pass as
``train_throughput.py --peak-tflops``.

    python benchmarks/matmul_rate.py --device cpu --dtype bf16 --size 2048 [--json out.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from time import perf_counter
from typing import Any

import torch

from iwm.training.distributed import resolve_device

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def matmul_tflops(device: torch.device, dtype: torch.dtype, size: int, repeats: int) -> float:
    """Best-of-``repeats`` TFLOP/s of a ``size``-cubed matmul (2 FLOPs per multiply-add)."""
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, device=device, generator=gen).to(dtype)
    b = torch.randn(size, size, device=device, generator=gen).to(dtype)
    best = float("inf")
    for i in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed = perf_counter() - start
        if i:  # the first call pays for kernel selection and warm caches
            best = min(best, elapsed)
    return 2 * size**3 / best / 1e12


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--size", type=int, default=4096, help="square matrix side")
    p.add_argument("--repeats", type=int, default=5, help="timed multiplies (best counts)")
    p.add_argument("--json", type=Path, default=None, metavar="PATH",
                   help="also write the result here as JSON")
    args = p.parse_args(argv)
    if args.size < 1 or args.repeats < 1:
        p.error("--size and --repeats must be at least 1")
    device = resolve_device(args.device)
    tflops = matmul_tflops(device, DTYPES[args.dtype], args.size, args.repeats)
    print(f"{device} {args.dtype} {args.size}^3 matmul: {tflops:.3f} TFLOP/s "
          f"(best of {args.repeats}, torch {torch.__version__}, {torch.get_num_threads()} "
          "CPU threads)")
    result = {"device": str(device), "dtype": args.dtype, "size": args.size, "tflops": tflops}
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
