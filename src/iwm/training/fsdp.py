"""Fully sharded data parallelism (torch's FSDP2, ``fully_shard``): ``train.data_parallel=fsdp``.

Parameters, gradients and optimiser moments are split over the processes, so a model
that does not fit on one GPU with DDP (ViT-H and up) trains; the math is DDP's (gradients
are averaged over ranks), so the same global batch gives the same update.

Units: every transformer block of the online encoder, the target encoder and the
predictor, then each of the three networks, then the model. The target encoder is
sharded exactly like the online one, so the EMA (``IWM.update_target``) runs on local
shards with no communication. Needs torch >= 2.6.

Checkpoints hold FULL tensors (gathered to rank 0, on the CPU), so a run trained with
FSDP is loaded, evaluated and exported like any other; its optimiser state is keyed by
parameter name, the form ``torch.distributed.checkpoint`` restores into a sharded model.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from iwm.errors import ConfigError
from iwm.models.iwm import IWM

OPTIMIZER_FORMAT = "fqn"
"""Marks a checkpoint whose optimiser state is keyed by parameter name (FSDP)."""


def shard_model(model: IWM) -> None:
    """Apply ``fully_shard`` in place: blocks, then networks, then the root."""
    import torch.distributed as dist

    try:
        from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method
    except ImportError as e:  # public from torch 2.6
        raise ConfigError(f"train.data_parallel=fsdp needs torch >= 2.6 (its fully_shard); "
                          f"this is torch {torch.__version__}: upgrade torch, or train with "
                          "train.data_parallel=ddp") from e

    # Each rank keeps ITS OWN chunk of every tensor, and ranks initialise with different
    # seeds: start everyone from rank 0's weights, as DDP does when it wraps a model.
    for tensor in model.state_dict().values():
        dist.broadcast(tensor, src=0)

    for network in (model.encoder, model.target_encoder, model.predictor):
        for block in network.blocks:
            fully_shard(block)
        fully_shard(network)
    for encoder in (model.encoder, model.target_encoder):
        # The model calls the encoders' forward_tokens, not forward: FSDP must gather
        # their own tensors (patch embedding, norm) around that method too.
        register_fsdp_forward_method(encoder, "forward_tokens")
    fully_shard(model)


def _options(**kwargs: Any) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(**kwargs)


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """(model, optimiser) full state dicts on rank 0's CPU; empty on the other ranks.
    Collective: every rank must call it."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    return get_state_dict(model, optimizer,
                          options=_options(full_state_dict=True, cpu_offload=True))


def load_full_state(model: nn.Module, optimizer: torch.optim.Optimizer, model_state: dict,
                    optimizer_state: dict) -> None:
    """Load full state dicts (as :func:`full_state` wrote them) into the sharded model;
    every rank passes the whole dicts (each reads the checkpoint file)."""
    from torch.distributed.checkpoint.state_dict import set_state_dict

    set_state_dict(model, optimizer, model_state_dict=model_state,
                   optim_state_dict=optimizer_state, options=_options(full_state_dict=True))


def full_tensor(x: torch.Tensor) -> torch.Tensor:
    """A DTensor's full value (e.g. the global grad norm); anything else unchanged."""
    full = getattr(x, "full_tensor", None)
    return full() if full is not None else x
