"""A per-factor increasing map that removes a world model's systematic bias in inferred actions.

Action inference (:meth:`iwm.api.Pretrained.infer_action`) answers with the action whose
predicted latents sit nearest the target's. Where the predictor's energy has its minimum
off the truth by the same amount for every image (it under-applies contrast, say), the
answers are biased though well ordered. :class:`ActionCalibration` is fitted on pairs of
known jitter (``iwm.evaluation.infer_action.calibrate``) and maps answers back; it cannot
undo image-to-image scatter. Maps act on the action's own coordinates: log ratios for the
multiplicative factors, turns for hue: affine or quadratic there, increasing.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from iwm.data.factors import JITTER_FACTORS

__all__ = ["CALIBRATION_DEGREES", "ActionCalibration", "FactorMap", "jitter_coordinates",
           "jitters_from_coordinates"]

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


CALIBRATION_DEGREES = (1, 2)
"""Degrees of the per-factor maps: 1, affine (a constant bias and a gain); 2, quadratic (a
bias that grows towards one end of the range, as contrast answers that saturate where a
dark background clips)."""


@dataclass(frozen=True)
class FactorMap:
    """``true = sum_k coefficients[k] * inferred^k`` in one factor's coordinate, on the
    inferred values it was fitted on, ``[low, high]``; beyond them it continues along its
    tangent at the nearer end, so a quadratic never turns back outside its data."""

    coefficients: tuple[float, ...] = (0.0, 1.0)
    low: float = -math.inf
    high: float = math.inf

    def __post_init__(self) -> None:
        values = (*self.coefficients, self.low, self.high)
        if not self.coefficients or any(math.isnan(v) for v in values) or not all(
                math.isfinite(c) for c in self.coefficients) or self.low > self.high:
            raise ValueError(f"{self}: coefficients must be finite numbers and low <= high")

    def derivative(self, x: Tensor) -> Tensor:
        return sum((k * c * x ** (k - 1) for k, c in enumerate(self.coefficients) if k),
                   torch.zeros_like(x))

    def __call__(self, x: Tensor) -> Tensor:
        inside = x.clamp(self.low, self.high)
        value = sum((c * inside ** k for k, c in enumerate(self.coefficients)),
                    torch.zeros_like(x))
        return value + self.derivative(inside) * (x - inside)


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
    def fit(cls, inferred: Tensor, true: Tensor, factors: tuple[str, ...],
            degree: int = 2) -> ActionCalibration:
        """Per factor in ``factors``: least squares of the true coordinate on a polynomial of
        ``degree`` in the inferred one, from jitters (n, len(JITTER_FACTORS)) in factor
        units whose truth is known. A quadratic that would not be increasing over the
        fitted range falls back to the affine fit (a calibration must keep the answers'
        order); a factor the search never moved, or fewer pairs than coefficients, keeps
        the identity map."""
        if degree not in CALIBRATION_DEGREES:
            raise ValueError(f"calibration degree {degree}: use one of "
                             f"{', '.join(map(str, CALIBRATION_DEGREES))}")
        if inferred.shape != true.shape or inferred.ndim != 2 \
                or inferred.shape[1] != len(JITTER_FACTORS):
            raise ValueError(f"inferred {tuple(inferred.shape)} and true {tuple(true.shape)}: "
                             f"expected the same (n, {len(JITTER_FACTORS)}) jitters")
        x = jitter_coordinates(inferred.double())
        y = jitter_coordinates(true.double())
        maps = {}
        for name in factors:
            j = JITTER_FACTORS.index(name)
            maps[name] = _fit_factor(x[:, j], y[:, j], degree)
        return cls(maps)

    def apply(self, jitters: Tensor) -> Tensor:
        """Jitters (n, len(JITTER_FACTORS)) in factor units, mapped."""
        x = jitter_coordinates(jitters.double())
        for name, fit in self.maps.items():
            j = JITTER_FACTORS.index(name)
            x[:, j] = fit(x[:, j])
        return jitters_from_coordinates(x).to(jitters.dtype)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """``{factor: {"coefficients": [...], "low": ..., "high": ...}}`` (infinite bounds
        as None), as ``iwm eval infer-action``'s JSON stores it under
        ``calibration.maps``."""
        def bound(v: float) -> float | None:
            return v if math.isfinite(v) else None

        return {name: {"coefficients": list(m.coefficients), "low": bound(m.low),
                       "high": bound(m.high)} for name, m in self.maps.items()}

    @classmethod
    def from_dict(cls, maps: Mapping[str, Mapping[str, Any]]) -> ActionCalibration:
        """The inverse of :meth:`to_dict`; also reads the affine maps of earlier results,
        ``{factor: {"intercept": ..., "slope": ...}}``."""
        def parse(m: Mapping[str, Any]) -> FactorMap:
            if "coefficients" not in m:
                return FactorMap((float(m["intercept"]), float(m["slope"])))
            low, high = m.get("low"), m.get("high")
            return FactorMap(tuple(float(c) for c in m["coefficients"]),
                             -math.inf if low is None else float(low),
                             math.inf if high is None else float(high))

        try:
            parsed = {name: parse(m) for name, m in maps.items()}
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"calibration maps {dict(maps)!r}: expected "
                             "{factor: {'coefficients': [numbers], 'low': number, "
                             "'high': number}}") from err
        return cls(parsed)


def _fit_factor(x: Tensor, y: Tensor, degree: int) -> FactorMap:
    if len(x) < 2 or float(x.var()) <= 0:
        return FactorMap()
    low, high = float(x.min()), float(x.max())
    for d in range(min(degree, len(x) - 1), 0, -1):
        design = torch.stack([x ** k for k in range(d + 1)], 1)
        coefficients = tuple(torch.linalg.lstsq(design, y[:, None]).solution[:, 0].tolist())
        fitted = FactorMap(coefficients, low, high)
        ends = fitted.derivative(torch.tensor([low, high], dtype=torch.float64))
        if d == 1 or bool((ends > 0).all()):
            return fitted
    return FactorMap()
