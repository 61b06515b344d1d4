"""The vocabulary of the photometric transformations, in one place.

Names and order of the jitter factors and of the source-side destructive ops, and which of
them act only on RGB images. Views (:mod:`iwm.data.views`), the action vector
(:mod:`iwm.data.actions`) and every evaluation import these; the ranges the factors are
drawn from are the view presets' (:func:`iwm.data.views.jitter_ranges`).
"""

from __future__ import annotations

__all__ = ["DESTRUCTIVE_OPS", "IDENTITY", "JITTER_FACTORS", "RGB_ONLY", "acts_on"]

JITTER_FACTORS: tuple[str, ...] = ("brightness", "contrast", "saturation", "hue")
"""The colour-jitter factors, in the order they are applied (torchvision ColorJitter
semantics: multiplicative factors, and a hue shift in turns)."""

IDENTITY: dict[str, float] = {"brightness": 1.0, "contrast": 1.0, "saturation": 1.0,
                              "hue": 0.0}
"""The value of each jitter factor that leaves an image unchanged."""

DESTRUCTIVE_OPS: tuple[str, ...] = ("grayscale", "blur", "solarize")
"""The source-only transforms, in the order they are applied."""

RGB_ONLY: frozenset[str] = frozenset({"saturation", "hue", "grayscale"})
"""Factors and ops that are the identity on 1-channel images: never drawn, varied or
scored there."""


def acts_on(name: str, channels: int) -> bool:
    """Whether the factor or op ``name`` changes images of ``channels`` channels."""
    return channels != 1 or name not in RGB_ONLY
