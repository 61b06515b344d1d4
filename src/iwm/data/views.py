"""Source and target views for IWM, drawn batched from one shared crop.

The crop and flip are done before (elsewhere), once per image, so the only spatial
difference between the views is the source mask. Here:

- source = destructive(jitter_s(crop))
- target = jitter_rel(jitter_s(crop)), where jitter_rel takes jitter_s to an independently
  drawn jitter_t (:func:`~iwm.data.actions.relative_jitter`): the ``relative`` pairing,
  the default; or target = jitter_t(crop), the ``independent`` pairing

and the action (see :mod:`iwm.data.actions`) records how to go from source to target. Both
pairings give the same actions; they differ only where a jitter clips (pixels pushed past
0 or 1) or where saturation and hue do not commute, and there only the relative pairing's
target is what the action makes of the source (:func:`unexplained_fraction` measures it).

All randomness comes from the ``torch.Generator`` passed in, drawn for the whole batch in
a fixed order (target jitter, source jitter, destructive), so a run that saves and
restores its generator state reproduces its views exactly.

Blur kernel size: ``round(0.1 * image_size)`` made odd, at least 3 (SimCLR's "10% of the
side"): 3 for 28-32 px, 7 for 64 px, 23 for 224 px.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor

from iwm.config import Pairing, Strength, ViewsConfig, check_view_values
from iwm.data import photometric as P
from iwm.data.actions import DestructiveParams, JitterParams, build_action, relative_jitter
from iwm.data.factors import JITTER_FACTORS
from iwm.data.shard import SINGLE, Shard, take_rows

SOLARIZE_THRESHOLD = 0.5


@dataclass(frozen=True)
class ViewParams:
    """Strengths of the photometric views (torchvision ColorJitter semantics).

    ``jitter_p`` is the probability that a view's colour jitter is applied (the source's:
    ``source_jitter_p`` where set, so that some sources stay clean crops); ``brightness``,
    ``contrast`` and ``saturation`` draw a factor from U[max(0, 1 - s), 1 + s] and ``hue``
    a shift from U[-h, h]. ``grayscale_p``, ``blur_p`` and ``solarize_p`` are per-sample
    probabilities of the source-only destructive transforms; the blur's sigma is drawn
    from U[blur_sigma]. Invalid values raise :class:`~iwm.errors.ConfigError` naming the
    ``views.`` key (:func:`iwm.config.check_view_values`, the rules of ``views.*`` too).
    """

    jitter_p: float = 0.0
    brightness: float = 0.0
    contrast: float = 0.0
    saturation: float = 0.0
    hue: float = 0.0
    grayscale_p: float = 0.0
    blur_p: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_p: float = 0.0
    pairing: Pairing = "relative"
    source_jitter_p: float | None = None

    def __post_init__(self) -> None:
        # YAML gives lists; a frozen dataclass must hold a hashable tuple.
        object.__setattr__(self, "blur_sigma", tuple(float(s) for s in self.blur_sigma))
        check_view_values(self)


_JITTER = ViewParams(jitter_p=0.8, brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)
_DESTRUCTIVE = dataclasses.replace(
    _JITTER, grayscale_p=0.2, blur_p=0.2, blur_sigma=(0.1, 2.0), solarize_p=0.1
)

STRENGTHS: dict[Strength, ViewParams] = {
    # I-JEPA: no photometric views, source == target, action == null action.
    "none": ViewParams(),
    # The paper's default ColorJitter on both views.
    "jitter": _JITTER,
    # + source-only grayscale/blur/solarize (the paper's appendix; solarize 0.1, its
    # text also says 0.2 once).
    "destructive": _DESTRUCTIVE,
    # The paper's "strong jitter" ranges were not published; these are the project's:
    # always applied, ~2x the default ranges. Hue 0.2 keeps target-source hue differences
    # under half a turn, so the action's hue field stays unambiguous.
    "strong": dataclasses.replace(
        _DESTRUCTIVE, jitter_p=1.0, brightness=0.8, contrast=0.8, saturation=0.8, hue=0.2
    ),
}


def resolve_view_params(cfg: ViewsConfig) -> ViewParams:
    """The preset named by ``cfg.strength`` with every non-None field of ``cfg`` applied."""
    overrides = {
        f.name: getattr(cfg, f.name)
        for f in dataclasses.fields(ViewParams)
        if getattr(cfg, f.name, None) is not None
    }
    return dataclasses.replace(STRENGTHS[cfg.strength], **overrides)


def jitter_range(params: ViewParams, factor: str) -> tuple[float, float]:
    """The interval :meth:`ViewSampler.sample_jitter` draws ``factor`` from: a torchvision
    factor in [max(0, 1 - s), 1 + s], or a hue shift in [-s, s] turns."""
    strength = getattr(params, factor)
    if factor == "hue":
        return -strength, strength
    return max(0.0, 1.0 - strength), 1.0 + strength


def jitter_ranges(params: ViewParams) -> dict[str, tuple[float, float]]:
    """:func:`jitter_range` of every factor of :data:`~iwm.data.factors.JITTER_FACTORS`."""
    return {factor: jitter_range(params, factor) for factor in JITTER_FACTORS}


def blur_kernel_size(image_size: int) -> int:
    """About 10% of the side, odd (a centred kernel), at least 3 (smaller is a no-op)."""
    return max(3, int(round(0.1 * image_size)) | 1)


@dataclass
class Views:
    """A batch of source/target views and everything that produced them."""

    source: Tensor
    target: Tensor
    action: Tensor
    target_jitter: JitterParams
    source_jitter: JitterParams
    destructive: DestructiveParams


class ViewSampler:
    """Draws and applies the photometric views for batches of crops.

    ``channels`` is the images' channel count (1 or 3): on 1-channel images saturation,
    hue and grayscale are no-ops, so they are never drawn there and the action never
    claims a change that did not happen.
    """

    def __init__(self, params: ViewParams, channels: int, image_size: int) -> None:
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        self.params = params
        self.channels = channels
        self.image_size = image_size
        self.kernel_size = blur_kernel_size(image_size)

    def __repr__(self) -> str:
        return (f"ViewSampler({self.params}, channels={self.channels}, "
                f"image_size={self.image_size}, kernel_size={self.kernel_size})")

    @staticmethod
    def _uniform(
        shape: tuple[int, ...], generator: torch.Generator, device: torch.device | str | None
    ) -> Tensor:
        # Drawn on the generator's device so the stream does not depend on where the
        # images live (a CPU generator gives the same views for CPU and GPU runs).
        u = torch.rand(shape, generator=generator, device=generator.device)
        return u.to(device if device is not None else generator.device)

    def sample_jitter(
        self,
        batch_size: int,
        generator: torch.Generator,
        device: torch.device | str | None = None,
        source: bool = False,
    ) -> JitterParams:
        """Per-sample ColorJitter parameters; identity where the jitter is not applied.
        ``source``: a source view's, applied with ``source_jitter_p`` where that is set (the
        same draws either way: only the threshold differs)."""
        p = self.params
        u = self._uniform((5, batch_size), generator, device)
        chance = p.source_jitter_p if source and p.source_jitter_p is not None else p.jitter_p
        applied = u[0] < chance

        def factor(name: str, v: Tensor) -> Tensor:
            lo, hi = jitter_range(p, name)
            return torch.where(applied, lo + (hi - lo) * v, torch.ones_like(v))

        hue = torch.where(applied, p.hue * (2.0 * u[4] - 1.0), torch.zeros_like(u[4]))
        saturation = factor("saturation", u[3])
        if self.channels == 1:
            saturation = torch.ones_like(saturation)
            hue = torch.zeros_like(hue)
        return JitterParams(
            brightness=factor("brightness", u[1]),
            contrast=factor("contrast", u[2]),
            saturation=saturation,
            hue=hue,
            applied=applied,
        )

    def sample_destructive(
        self,
        batch_size: int,
        generator: torch.Generator,
        device: torch.device | str | None = None,
    ) -> DestructiveParams:
        """Per-sample source-only transforms (grayscale only on RGB images)."""
        p = self.params
        u = self._uniform((4, batch_size), generator, device)
        grayscale = u[0] < p.grayscale_p
        if self.channels == 1:
            grayscale = torch.zeros_like(grayscale)
        blur = u[1] < p.blur_p
        lo, hi = p.blur_sigma
        sigma = torch.where(blur, lo + (hi - lo) * u[2], torch.zeros_like(u[2]))
        return DestructiveParams(
            grayscale=grayscale, blur=blur, blur_sigma=sigma, solarize=u[3] < p.solarize_p
        )

    def apply_jitter(self, x: Tensor, params: JitterParams) -> Tensor:
        """Brightness, contrast, saturation, hue, in this fixed order (see actions.py)."""
        out = P.adjust_brightness(x, params.brightness)
        out = P.adjust_contrast(out, params.contrast)
        out = P.adjust_saturation(out, params.saturation)
        out = P.adjust_hue(out, params.hue)
        # Non-jittered samples must stay bit-identical (the HSV round trip is not exact).
        return torch.where(params.applied.to(x.device).view(-1, 1, 1, 1), out, x)

    def apply_destructive(self, x: Tensor, params: DestructiveParams) -> Tensor:
        """Grayscale, blur, solarize, in this fixed order (see actions.py)."""
        gray = params.grayscale.to(x.device).view(-1, 1, 1, 1)
        out = torch.where(gray, P.to_grayscale(x), x)
        sigma = torch.where(params.blur, params.blur_sigma, torch.zeros_like(params.blur_sigma))
        out = P.gaussian_blur(out, sigma, self.kernel_size)
        return P.solarize(out, params.solarize, threshold=SOLARIZE_THRESHOLD)

    def __call__(self, crops: Tensor, generator: torch.Generator, shard: Shard = SINGLE
                 ) -> Views:
        """Views of a batch of crops ``(B, C, H, W)`` in [0, 1], both from the same crop.

        With a ``shard``, ``crops`` are that shard's rows of a global batch: parameters are
        drawn for the whole global batch (as one process would) and this shard's rows kept.
        """
        if crops.ndim != 4 or crops.shape[1] != self.channels:
            raise ValueError(
                f"expected crops (B, {self.channels}, H, W), got {tuple(crops.shape)}"
            )
        b, device = crops.shape[0], crops.device
        rows = shard.rows(b)
        target_jitter = take_rows(self.sample_jitter(b * shard.count, generator, device), rows)
        source_jitter = take_rows(self.sample_jitter(b * shard.count, generator, device,
                                                     source=True), rows)
        destructive = take_rows(self.sample_destructive(b * shard.count, generator, device),
                                rows)
        # Ops a preset never draws are skipped (their parameters are identities, so the
        # result is the same) to spare the I-JEPA and jitter-only presets their cost.
        p = self.params
        jitter = max(p.jitter_p, p.source_jitter_p or 0.0) > 0
        destroy = p.blur_p > 0 or p.solarize_p > 0 or (p.grayscale_p > 0 and self.channels == 3)
        source = self.apply_jitter(crops, source_jitter) if jitter else crops
        if not jitter:
            target = crops
        elif p.pairing == "relative":
            target = self.apply_jitter(source, relative_jitter(target_jitter, source_jitter))
        else:
            target = self.apply_jitter(crops, target_jitter)
        if destroy:
            source = self.apply_destructive(source, destructive)
        return Views(
            source=source,
            target=target,
            action=build_action(target_jitter, source_jitter, destructive),
            target_jitter=target_jitter,
            source_jitter=source_jitter,
            destructive=destructive,
        )


def unexplained_fraction(sampler: ViewSampler, crops: Tensor, views: Views) -> Tensor:
    """Per pair (B,): how much of the difference between the target and the source (before
    its destructive ops) the action leaves unexplained, ``|y - a(x)|^2 / |y - x|^2`` with
    ``a(x)`` the action's jitter applied to that source; 0 where target and source are
    the same. 0 for every pair of the ``relative`` pairing; under ``independent`` pairing,
    clipping makes it large for bright images at strong jitter (docs/method.md)."""
    source = sampler.apply_jitter(crops, views.source_jitter)
    moved = sampler.apply_jitter(source, relative_jitter(views.target_jitter,
                                                         views.source_jitter))
    left = (views.target - moved).float().pow(2).flatten(1).sum(1)
    total = (views.target - source).float().pow(2).flatten(1).sum(1)
    return torch.where(total > 0, left / total.clamp_min(1e-12), torch.zeros_like(total))
