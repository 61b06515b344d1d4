"""The ``torch.hub`` entry points (``hubconf.py`` at the repository root calls these).

``torch.hub.load(REPO, "iwm_vit_base", source="local", checkpoint=RUN)`` returns the
:class:`~iwm.api.Pretrained` of ``RUN`` (a run directory, checkpoint file or exported
folder, anything :func:`iwm.load` takes), after checking that it holds that encoder size.
Without ``checkpoint`` it returns an UNTRAINED model of that size, randomly initialised,
shaped for ImageNet (the ``iwm-inv-vitb16`` preset with ``model.encoder`` replaced:
3 x 224 x 224 input, patch 16, ImageNet normalisation), e.g. to fine-tune from scratch.
"""

from __future__ import annotations

import os

import torch

from iwm.api import Pretrained, load
from iwm.config import load_config
from iwm.errors import CheckpointError
from iwm.models.vit import encoder_spec

UNTRAINED_PRESET = "iwm-inv-vitb16"


def hub_model(encoder: str, checkpoint: str | os.PathLike[str] | None = None,
              device: str | torch.device = "cpu") -> Pretrained:
    """The model behind ``iwm_<encoder>`` (see the module docstring)."""
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    encoder_spec(encoder)  # an unknown size is a one-line ConfigError
    if checkpoint is None:
        cfg = load_config(UNTRAINED_PRESET, [f"model.encoder={encoder}"])
        norm = {"mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD}
        return Pretrained.create(cfg, in_chans=3, normalization=norm).to(device)
    model = load(checkpoint, device=device)
    found = model.config.model.encoder
    if found != encoder:
        raise CheckpointError(f"{checkpoint}: holds a {found} encoder, not {encoder}; load it "
                              f"with the entry point 'iwm_{found}'")
    return model
