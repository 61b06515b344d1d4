"""A per-factor affine map that removes a world model's systematic bias in inferred actions.

Action inference (:meth:`iwm.api.Pretrained.infer_action`) answers with the action whose
predicted latents sit nearest the target's. Where the predictor's energy has its minimum
off the truth by the same amount for every image (it under-applies contrast, say), the
answers are biased though well ordered. :class:`ActionCalibration` is fitted on pairs of
known jitter (``iwm.evaluation.infer_action.calibrate``) and maps answers back; it cannot
undo image-to-image scatter. Maps act on the action's own coordinates: log ratios for the
multiplicative factors, turns for hue, where a bias is additive.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

from iwm.data.factors import JITTER_FACTORS

__all__ = ["ActionCalibration", "FactorMap", "jitter_coordinates", "jitters_from_coordinates"]

_EPS = 1e-6
_HUE = JITTER_FACTORS.index("hue")


def jitter_coordinates(jitters: Tensor) -> Tensor:
    """Jitters (n, len(JITTER_FACTORS)) in factor units (ratios; hue in turns) -> the
    action's coordinates (log ratios; hue stays in turns)."""
    out = jitters.clamp_min(_EPS).log()
    out[:, _HUE] = jitters[:, _HUE]
    return out


def jitters_from_coordinates(coordinates: Tensor) -> Tensor:
    """The inverse of :func:`jitter_coordinates`."""
    out = coordinates.exp()
    out[:, _HUE] = coordinates[:, _HUE]
    return out


@dataclass(frozen=True)
class FactorMap:
    """``true = intercept + slope * inferred`` in one factor's coordinate."""

    intercept: float = 0.0
    slope: float = 1.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.intercept) and math.isfinite(self.slope)):
            raise ValueError(f"{self}: intercept and slope must be finite numbers")


@dataclass(frozen=True)
class ActionCalibration:
    """Maps per jitter factor (names of :data:`~iwm.data.factors.JITTER_FACTORS`); a factor
    without a map is left as inferred. ``ActionCalibration()`` is the identity."""

    maps: Mapping[str, FactorMap] = field(default_factory=dict)

    def __post_init__(self) -> None:
        unknown = sorted(set(self.maps) - set(JITTER_FACTORS))
        if unknown:
            raise ValueError(f"calibration maps for {unknown}: not jitter factors (expected "
                             f"some of {list(JITTER_FACTORS)})")

    @classmethod
    def fit(cls, inferred: Tensor, true: Tensor, factors: tuple[str, ...]
            ) -> ActionCalibration:
        """Per factor in ``factors``: least squares of the true coordinate on the inferred
        one, from jitters (n, len(JITTER_FACTORS)) in factor units whose truth is known. A
        factor the search never moved (or fewer than two pairs) keeps the identity map."""
        if inferred.shape != true.shape or inferred.ndim != 2 \
                or inferred.shape[1] != len(JITTER_FACTORS):
            raise ValueError(f"inferred {tuple(inferred.shape)} and true {tuple(true.shape)}: "
                             f"expected the same (n, {len(JITTER_FACTORS)}) jitters")
        x = jitter_coordinates(inferred.double())
        y = jitter_coordinates(true.double())
        maps = {}
        for name in factors:
            j = JITTER_FACTORS.index(name)
            if len(x) < 2 or float(x[:, j].var()) <= 0:
                maps[name] = FactorMap()
                continue
            design = torch.stack([torch.ones_like(x[:, j]), x[:, j]], 1)
            intercept, slope = torch.linalg.lstsq(design, y[:, j:j + 1]).solution[:, 0].tolist()
            maps[name] = FactorMap(intercept, slope)
        return cls(maps)

    def apply(self, jitters: Tensor) -> Tensor:
        """Jitters (n, len(JITTER_FACTORS)) in factor units, mapped."""
        x = jitter_coordinates(jitters.double())
        for name, fit in self.maps.items():
            j = JITTER_FACTORS.index(name)
            x[:, j] = fit.intercept + fit.slope * x[:, j]
        return jitters_from_coordinates(x).to(jitters.dtype)

    def to_dict(self) -> dict[str, dict[str, float]]:
        """``{factor: {"intercept": ..., "slope": ...}}``, as ``iwm eval infer-action``'s
        JSON stores it under ``calibration.maps``."""
        return {name: {"intercept": m.intercept, "slope": m.slope}
                for name, m in self.maps.items()}

    @classmethod
    def from_dict(cls, maps: Mapping[str, Mapping[str, float]]) -> ActionCalibration:
        """The inverse of :meth:`to_dict`."""
        try:
            parsed = {name: FactorMap(float(m["intercept"]), float(m["slope"]))
                      for name, m in maps.items()}
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"calibration maps {dict(maps)!r}: expected "
                             "{factor: {'intercept': number, 'slope': number}}") from err
        return cls(parsed)
