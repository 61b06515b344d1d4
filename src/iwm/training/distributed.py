"""Single-process or torchrun (DDP) execution, with one code path for both.

``torchrun --nproc_per_node=N`` sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
MASTER_PORT for every process; without them this is an ordinary single process and
nothing here touches ``torch.distributed``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from iwm.errors import ConfigError


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job. Defaults describe a single process."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process that logs, writes checkpoints and prints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"environment variable {name}={raw!r} is not an integer") from None


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return backend is not None and backend.is_available()


def resolve_device(device_pref: str) -> torch.device:
    """``auto`` → cuda if available, else mps, else cpu; anything else must be usable here."""
    if device_pref == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(device_pref)
    except (RuntimeError, ValueError):
        raise ConfigError(
            f"train.device={device_pref!r} is not a device: use auto, cpu, cuda, cuda:N or mps"
        ) from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                f"train.device={device_pref!r} but CUDA is not available here "
                "(no GPU, or torch built without CUDA): use train.device=auto or cpu"
            )
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ConfigError(
                f"train.device={device_pref!r} but only {count} CUDA device(s) exist here"
            )
    elif device.type == "mps":
        if not _mps_available():
            raise ConfigError(
                f"train.device={device_pref!r} but MPS is not available: use auto or cpu"
            )
    elif device.type != "cpu":
        raise ConfigError(
            f"train.device={device_pref!r} is not supported: use auto, cpu, cuda, cuda:N or mps"
        )
    return device


def init_distributed(device_pref: str) -> tuple[DistInfo, torch.device]:
    """Read the torchrun environment, join the process group if there is one, pick a device.

    Under torchrun each process uses ``cuda:LOCAL_RANK`` (backend nccl), or the CPU
    (backend gloo). Pinning one GPU (``cuda:1``) with several processes is refused, since
    they would all share it.
    """
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", rank)
    if world_size < 1 or not 0 <= rank < world_size or local_rank < 0:
        raise ConfigError(
            f"inconsistent torchrun environment: RANK={rank}, WORLD_SIZE={world_size}, "
            f"LOCAL_RANK={local_rank}"
        )
    info = DistInfo(rank=rank, world_size=world_size, local_rank=local_rank)
    device = resolve_device(device_pref)
    if world_size == 1:
        return info, device

    if device.type == "cuda":
        if device.index is not None and device.index != local_rank:
            raise ConfigError(
                f"train.device={device_pref!r} pins one GPU, but torchrun starts {world_size} "
                "processes that each take the GPU of their LOCAL_RANK: use auto or cuda"
            )
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(
                f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} CUDA device(s) "
                "exist: start at most one process per GPU"
            )
        device = torch.device("cuda", local_rank)
        # Before init_process_group, so that NCCL binds this process to its own GPU.
        torch.cuda.set_device(device)
        backend = "nccl"
    elif device.type == "cpu":
        backend = "gloo"
    else:
        raise ConfigError(
            f"multi-process training is not supported on {device.type}: use cuda or cpu"
        )
    missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(v)]
    if missing:
        raise ConfigError(
            f"WORLD_SIZE={world_size} but {', '.join(missing)} is not set: launch with torchrun"
        )
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, init_method="env://",
                                rank=rank, world_size=world_size)
    return info, device


def cleanup_distributed() -> None:
    """Leave the process group, if one was joined (safe to call either way)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Mean of ``tensor`` over all processes, as a new tensor (the input is not modified).

    Single-process: returns ``tensor`` itself. Floating tensors only: an integer mean
    would be silently truncated.
    """
    if not _active():
        return tensor
    if not (tensor.is_floating_point() or tensor.is_complex()):
        raise TypeError(f"all_reduce_mean needs a floating tensor, got {tensor.dtype}")
    out = tensor.detach().clone()
    # SUM then divide: ReduceOp.AVG exists only for nccl, and this must work on gloo too.
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    out /= dist.get_world_size()
    return out


def barrier() -> None:
    """Wait for every process (no-op single-process), e.g. before reading rank 0's files."""
    if _active():
        dist.barrier()
