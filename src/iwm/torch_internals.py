"""Every private torch API iwm relies on, behind one small function each.

These are not covered by torch's compatibility promise, so ``tests/test_torch_internals.py``
checks that each still exists and behaves as used here: a torch release that changes one
fails that test, not a training run.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor


def skip_next_step_if(optimizer: torch.optim.Optimizer, skip: Tensor) -> None:
    """Make the next ``optimizer.step()`` change nothing where ``skip`` (a 0-dim device
    tensor) is true, without reading it on the host: a fused optimiser skips its whole
    update, moments and step count included, when its ``found_inf`` is 1 (GradScaler's hook).
    """
    optimizer.found_inf = skip.float()  # type: ignore[attr-defined]


def uncompiled(module: nn.Module) -> nn.Module | None:
    """The module ``torch.compile`` wrapped into ``module``; None if it is not compiled."""
    return getattr(module, "_orig_mod", None)


def is_compile_error(error: BaseException) -> bool:
    """Whether ``error`` comes from torch.compile's compiler (Dynamo, a backend)."""
    import torch._dynamo.exc  # already loaded wherever torch.compile ran

    return isinstance(error, torch._dynamo.exc.TorchDynamoException)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX-512 BF16 or AMX). A torch without the
    private probes answers no rather than failing."""
    probes = (getattr(torch.cpu, "_is_avx512_bf16_supported", None),
              getattr(torch.cpu, "_is_amx_tile_supported", None))
    return any(bool(probe()) for probe in probes if probe is not None)


def lerp_(starts: list[Tensor], ends: list[Tensor], weight: float | Tensor) -> None:
    """``start += weight * (end - start)`` for every pair, fused over the list (torch's
    foreach kernels, as its optimisers use). A tensor ``weight`` stays on the device."""
    if not isinstance(weight, Tensor):
        torch._foreach_lerp_(starts, ends, weight)
    elif isinstance(starts[0], DTensor):
        # FSDP's sharded parameters: DTensor has no sharding rule for a lerp with tensor
        # weights before torch 2.14, so the same update in three steps.
        diff = torch._foreach_sub(ends, starts)
        torch._foreach_mul_(diff, weight)
        torch._foreach_add_(starts, diff)
    else:
        torch._foreach_lerp_(starts, ends, [weight] * len(starts))
