"""The action a(x -> y): what the predictor must do to turn the source view into the target.

Both views come from the same crop. The target is ``jitter_t(crop)``; the source is
``destructive(jitter_s(crop))``. The action tells the predictor the difference between
the two jitters and which destructive transforms hit the source. The paper did not
publish its layout or normalisation; this is the project's, and it lives only here
(:data:`ACTION_FIELDS`, :func:`build_action`).

====  ===================  ==============================================================
idx   field                value
====  ===================  ==============================================================
0     ``brightness``       log(b_t) - log(b_s)   (multiplicative factors; 0 = same)
1     ``contrast``         log(c_t) - log(c_s)
2     ``saturation``       log(s_t) - log(s_s)
3     ``hue``              2 * wrap(h_t - h_s)   (shifts in turns, wrapped into [-0.5, 0.5))
4     ``grayscale``        1 if the source was converted to grayscale, else 0
5     ``blur``             1 if the source was blurred, else 0
6     ``blur_sigma``       sigma / 2.0 if blurred, else 0 (2.0 = top of the default range)
7     ``solarize``         1 if the source was solarized, else 0
====  ===================  ==============================================================

Why this layout (log-ratios, a wrapped hue, fixed op orders, no "applied" flags) is in
docs/method.md, "The action vector".
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from iwm.data.factors import JITTER_FACTORS

ACTION_FIELDS: tuple[str, ...] = (*JITTER_FACTORS, "grayscale", "blur", "blur_sigma", "solarize")
"""Names of the action's dimensions, in order (see the module docstring for their values)."""

ACTION_DIM: int = len(ACTION_FIELDS)

MIN_FACTOR: float = 1e-2
"""Floor for multiplicative factors before the log (log(0.01) ~ -4.6)."""

BLUR_SIGMA_SCALE: float = 2.0
"""Blur sigma is divided by this (the top of the default sigma range) in the action."""


def _device(device: torch.device | str | None) -> torch.device:
    return torch.device("cpu") if device is None else torch.device(device)


@dataclass
class JitterParams:
    """Per-sample colour-jitter parameters, each a ``(B,)`` tensor.

    ``brightness``, ``contrast`` and ``saturation`` are torchvision factors (1 = identity),
    ``hue`` is a shift in turns (0 = identity), ``applied`` says whether the jitter was
    applied. Samples with ``applied`` false carry identity values, so the parameters alone
    describe what happened to the image.
    """

    brightness: Tensor
    contrast: Tensor
    saturation: Tensor
    hue: Tensor
    applied: Tensor

    @classmethod
    def identity(cls, batch_size: int, device: torch.device | str | None = None) -> JitterParams:
        dev = _device(device)
        ones = torch.ones(batch_size, device=dev)
        return cls(
            brightness=ones,
            contrast=ones.clone(),
            saturation=ones.clone(),
            hue=torch.zeros(batch_size, device=dev),
            applied=torch.zeros(batch_size, dtype=torch.bool, device=dev),
        )

    @property
    def batch_size(self) -> int:
        return self.applied.shape[0]


@dataclass
class DestructiveParams:
    """Per-sample source-only transforms, each a ``(B,)`` tensor.

    ``grayscale``, ``blur`` and ``solarize`` are bool flags; ``blur_sigma`` is the blur's
    standard deviation in pixels (0 where ``blur`` is false).
    """

    grayscale: Tensor
    blur: Tensor
    blur_sigma: Tensor
    solarize: Tensor

    @classmethod
    def identity(
        cls, batch_size: int, device: torch.device | str | None = None
    ) -> DestructiveParams:
        dev = _device(device)
        no = torch.zeros(batch_size, dtype=torch.bool, device=dev)
        return cls(
            grayscale=no,
            blur=no.clone(),
            blur_sigma=torch.zeros(batch_size, device=dev),
            solarize=no.clone(),
        )

    @property
    def batch_size(self) -> int:
        return self.blur.shape[0]


def _log_factor(f: Tensor) -> Tensor:
    return torch.log(f.float().clamp_min(MIN_FACTOR))


def _wrap_turns(d: Tensor) -> Tensor:
    return torch.remainder(d + 0.5, 1.0) - 0.5


def relative_jitter(target: JitterParams, source: JitterParams) -> JitterParams:
    """The jitter that :func:`build_action` says takes ``source``'s jitter to ``target``'s:
    factor ratios (through the same floored logs) and the wrapped hue difference; applied
    wherever either jitter was."""
    return JitterParams(
        brightness=torch.exp(_log_factor(target.brightness) - _log_factor(source.brightness)),
        contrast=torch.exp(_log_factor(target.contrast) - _log_factor(source.contrast)),
        saturation=torch.exp(_log_factor(target.saturation) - _log_factor(source.saturation)),
        hue=_wrap_turns(target.hue.float() - source.hue.float()),
        applied=target.applied | source.applied,
    )


def build_action(
    target: JitterParams, source: JitterParams, destructive: DestructiveParams
) -> Tensor:
    """The ``(B, ACTION_DIM)`` float32 action taking the source view to the target view."""
    b = target.batch_size
    if source.batch_size != b or destructive.batch_size != b:
        raise ValueError(
            f"batch sizes differ: target {b}, source {source.batch_size}, "
            f"destructive {destructive.batch_size}"
        )
    blur = destructive.blur.float()
    columns = {
        "brightness": _log_factor(target.brightness) - _log_factor(source.brightness),
        "contrast": _log_factor(target.contrast) - _log_factor(source.contrast),
        "saturation": _log_factor(target.saturation) - _log_factor(source.saturation),
        "hue": 2.0 * _wrap_turns(target.hue.float() - source.hue.float()),
        "grayscale": destructive.grayscale.float(),
        "blur": blur,
        "blur_sigma": blur * destructive.blur_sigma.float() / BLUR_SIGMA_SCALE,
        "solarize": destructive.solarize.float(),
    }
    # Keyed by name so the column order can only come from ACTION_FIELDS.
    return torch.stack([columns[name] for name in ACTION_FIELDS], dim=1)


def null_action(batch_size: int, device: torch.device | str | None = None) -> Tensor:
    """The identity transformation (all zeros): "reproduce the source's content"."""
    return torch.zeros(batch_size, ACTION_DIM, device=_device(device))
