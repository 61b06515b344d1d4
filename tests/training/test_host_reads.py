"""A training step reads no device value on the host, checked on the CPU.

On a GPU such a read (``.item()``, ``bool(tensor)``, ``nonzero``, boolean indexing, ...)
makes the host wait for every queued kernel, so it cannot prepare the next batch while
the GPU works. A CUDA test runs a step under ``torch.cuda.set_sync_debug_mode("error")``;
this one needs no GPU: it records, under a dispatch mode, every op that would read a
device value back, outside the mask generator (which draws on the CPU by design).
"""

from __future__ import annotations

import traceback

import pytest
import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

from tiny_run import tiny_trainer

# Ops whose result depends on a tensor's values in a way the host must see.
READS = {"_local_scalar_dense", "is_nonzero", "nonzero", "nonzero_static", "masked_select",
         "unique", "_unique2", "unique_dim", "unique_consecutive", "equal", "masked_scatter"}


def _reads_back(func: torch._ops.OpOverload, args: tuple, kwargs: dict) -> bool:
    name = func._schema.name.split("::")[-1]
    if name in READS:
        return True
    if name in ("index", "index_put", "index_put_", "_index_put_impl_"):  # x[bool_mask]
        return any(isinstance(i, Tensor) and i.dtype == torch.bool
                   for i in args[1] if i is not None)
    if name == "repeat_interleave":  # tensor repeats: the output size is their sum
        return func._overloadname in ("Tensor", "self_Tensor") and \
            kwargs.get("output_size") is None
    return False


class HostReads(TorchDispatchMode):
    """Records ``(op, where)`` for every op that reads a value back, except in masks.py."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[tuple[str, str]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _reads_back(func, args, kwargs):
            frames = [f for f in traceback.extract_stack() if "/iwm/" in f.filename
                      or "site-packages" in f.filename]
            # The masks are drawn on the CPU, whose values the host reads for free.
            if not any(f.filename.endswith("iwm/data/masks.py") for f in frames):
                where = " <- ".join(f"{f.filename.rsplit('/', 2)[-1]}:{f.lineno}"
                                    for f in frames[-4:][::-1])
                self.found.append((str(func), where))
        return func(*args, **kwargs)


def test_the_probe_sees_reads() -> None:
    x = torch.randn(6)
    with HostReads() as probe:
        _ = x.sum().item()
        _ = x[x > 0]
        _ = torch.nonzero(x)
        _ = torch.repeat_interleave(x, torch.tensor([1, 2, 0, 1, 1, 1]))
        _ = torch.repeat_interleave(x, 2)  # int repeats: no read
        _ = x * 2 + 1
    assert len(probe.found) == 4, probe.found


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("extra", [[], ["train.grad_accum_steps=2", "optim.grad_clip=1.0"]],
                         ids=["plain", "accumulated-clipped"])
def test_a_training_step_reads_nothing_back(channels: int, extra: list[str]) -> None:
    # The equivariant preset draws every view op (jitter incl. hue on RGB, grayscale,
    # blur, solarize), so all of them are in the step.
    trainer = tiny_trainer("train.batch_size=8", *extra, channels=channels)
    crops = torch.rand(8, channels, 28, 28)
    trainer.step(0, crops)  # first step: lazy state (optimizer moments) is made
    with HostReads() as probe:
        trainer.step(1, crops)
    assert probe.found == []
