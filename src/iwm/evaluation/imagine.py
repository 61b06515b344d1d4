"""``iwm imagine``: what the world model predicts an image would look like, decoded.

Per image, four pictures: the source; the world model's prediction for the action,
rendered by the run's latent decoder (``decode(apply(encode(source), action))``); the
image really transformed by the action (:mod:`iwm.data.photometric`, in the action's op
order); and that real image encoded and decoded, which is as close as the decoder can
get: the ceiling against which to read the prediction. The jitter fields of an
:class:`~iwm.api.Action` describe the target; its source-side fields (grayscale,
blur_sigma, solarize) are applied to the source the model sees, as in training, and
the real image is the clean one jittered.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from iwm.api import Action, Pretrained
from iwm.config import Config
from iwm.data import photometric as P
from iwm.data.actions import DestructiveParams
from iwm.data.factors import IDENTITY, JITTER_FACTORS, acts_on
from iwm.data.views import ViewParams, ViewSampler, jitter_range, resolve_view_params
from iwm.errors import CheckpointError, ConfigError
from iwm.evaluation.plotting import pyplot, show_image

__all__ = ["ImagineResult", "describe_action", "imagine", "parse_action", "plot_imagine",
           "render_jitter", "require_decoder", "run_imagine", "showcase_actions"]

_OPS = {"brightness": P.adjust_brightness, "contrast": P.adjust_contrast,
        "saturation": P.adjust_saturation, "hue": P.adjust_hue}
COLUMNS = ("source", "prediction, decoded", "real transformed", "real, decoded")


def _fields() -> dict[str, type]:
    return {f.name: bool if isinstance(f.default, bool) else float
            for f in dataclasses.fields(Action)}


def parse_action(text: str) -> Action:
    """``"brightness=1.3,hue=0.1"`` -> ``Action(brightness=1.3, hue=0.1)``; a one-line
    :class:`~iwm.errors.ConfigError` names a bad field or value and lists the fields."""
    fields = _fields()
    listed = ", ".join(f"{k} ({'true/false' if t is bool else 'number'})"
                       for k, t in fields.items())
    values: dict[str, Any] = {}
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        key, sep, raw = (s.strip() for s in item.partition("="))
        if not sep or key not in fields:
            what = f"unknown field {key!r}" if sep else f"{item!r} is not field=value"
            raise ConfigError(f"--action {text!r}: {what}; fields: {listed}")
        if fields[key] is bool:
            if raw.lower() not in ("true", "false", "1", "0"):
                raise ConfigError(f"--action {key}={raw!r}: expected true or false")
            values[key] = raw.lower() in ("true", "1")
            continue
        try:
            values[key] = float(raw)
        except ValueError:
            raise ConfigError(f"--action {key}={raw!r}: expected a number; fields: "
                              f"{listed}") from None
    try:
        return Action(**values)
    except ValueError as e:
        raise ConfigError(f"--action {text!r}: {e}") from None


def describe_action(action: Action) -> str:
    """The fields of ``action`` that differ from the identity, e.g. ``brightness=1.3``."""
    parts = [f"{f.name}={getattr(action, f.name):g}" if not isinstance(f.default, bool)
             else f.name for f in dataclasses.fields(Action)
             if getattr(action, f.name) != f.default]
    return ", ".join(parts) or "null action"


def render_jitter(images: Tensor, factors: Mapping[str, Tensor | float]) -> Tensor:
    """``images`` (B, C, H, W) in [0, 1] jittered by ``factors`` (per image (B,) or one
    value), in the order of :data:`~iwm.data.factors.JITTER_FACTORS`. Factors at their
    identity are skipped, so an untouched image stays bit-identical (the HSV round trip
    of hue would move it by rounding)."""
    unknown = set(factors) - set(JITTER_FACTORS)
    if unknown:
        raise ValueError(f"unknown jitter factors {sorted(unknown)}; {JITTER_FACTORS}")
    out = images
    for name in JITTER_FACTORS:
        value = torch.as_tensor(factors.get(name, IDENTITY[name]), dtype=images.dtype)
        if bool((value != IDENTITY[name]).any()):
            out = _OPS[name](out, value.to(images.device))
    return out


def _source_side(images: Tensor, actions: Sequence[Action]) -> Tensor:
    """The source the model sees: the actions' grayscale, blur and solarize applied."""
    if not any(a.grayscale or a.blur_sigma > 0 or a.solarize for a in actions):
        return images

    def column(name: str, dtype: torch.dtype) -> Tensor:
        return torch.tensor([getattr(a, name) for a in actions], dtype=dtype,
                            device=images.device)

    sigma = column("blur_sigma", torch.float32)
    params = DestructiveParams(grayscale=column("grayscale", torch.bool), blur=sigma > 0,
                               blur_sigma=sigma, solarize=column("solarize", torch.bool))
    sampler = ViewSampler(ViewParams(), images.shape[1], images.shape[-1])
    return sampler.apply_destructive(images, params)


@dataclass
class ImagineResult:
    """The four columns of the grid, each (B, C, H, W) in [0, 1] on the CPU."""

    source: Tensor
    predicted: Tensor
    real: Tensor
    real_decoded: Tensor
    actions: list[Action]


def require_decoder(model: Pretrained, run: str | Path = "RUN") -> None:
    """A one-line :class:`~iwm.errors.CheckpointError` naming the command to run, if
    ``model`` has no usable latent decoder."""
    if model.decoder is None:
        why = model.decoder_info.get("missing", "no latent decoder")
        raise CheckpointError(f"{run}: {why}".replace("`iwm decoder RUN`",
                                                      f"`iwm decoder {run}`"))


@torch.no_grad()
def imagine(model: Pretrained, images: Tensor, actions: Action | Sequence[Action]
            ) -> ImagineResult:
    """The grid's pictures for ``images`` (B, C, H, W), float in [0, 1] or uint8, under
    one action for all or one per image."""
    require_decoder(model)
    x = model.check_images(images).to(model.device, torch.float32)
    per_image = [actions] * len(x) if isinstance(actions, Action) else list(actions)
    if len(per_image) != len(x):
        raise ValueError(f"{len(per_image)} actions for {len(x)} images: give one, or one "
                         "per image")
    source = _source_side(x, per_image)
    vectors = torch.cat([a.to_tensor(1, model.device) for a in per_image])
    predicted = model.decode(model.apply(model.encode(source), vectors))
    factors = {name: torch.tensor([getattr(a, name) for a in per_image])
               for name in JITTER_FACTORS}
    real = render_jitter(x, factors)
    real_decoded = model.decode(model.encode(real))
    return ImagineResult(source.cpu(), predicted.cpu(), real.cpu(), real_decoded.cpu(),
                         per_image)


def showcase_actions(cfg: Config, channels: int) -> list[Action]:
    """The null action, then one action per factor the run's images let vary, at the end
    of the run's own range that shows most (brighter, flatter, greyer, hue-turned)."""
    from iwm.evaluation.bank import bank_view_params

    params = bank_view_params(resolve_view_params(cfg.views))
    ends = {"brightness": 1, "contrast": 0, "saturation": 0, "hue": 1}
    actions = [Action()]
    for name in JITTER_FACTORS:
        if acts_on(name, channels):
            field: dict[str, Any] = {name: round(jitter_range(params, name)[ends[name]], 3)}
            actions.append(Action(**field))
    return actions


def plot_imagine(result: ImagineResult, path: str | Path, title: str | None = None,
                 labels: Sequence[str] | None = None) -> Path:
    """The grid as a PNG: one row per image, :data:`COLUMNS` as columns; ``labels`` name
    the rows (default: each row's action)."""
    plt = pyplot()

    rows = len(result.source)
    labels = list(labels) if labels is not None else [describe_action(a)
                                                       for a in result.actions]
    fig, axes = plt.subplots(rows, len(COLUMNS), figsize=(2.0 * len(COLUMNS), 2.1 * rows + 0.4),
                             squeeze=False)
    pictures = (result.source, result.predicted, result.real, result.real_decoded)
    for r in range(rows):
        for c, images in enumerate(pictures):
            ax = axes[r][c]
            show_image(ax, images[r])
            if r == 0:
                ax.set_title(COLUMNS[c], fontsize=9)
        axes[r][0].set_ylabel(labels[r].replace(", ", "\n"), fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def run_imagine(run: str | Path, paths: Sequence[str | Path], action: Action,
                out: str | Path, device: str = "auto") -> Path:
    """``iwm imagine RUN IMAGE... --action ... --out grid.png``: load the run (or an
    export), read the image files, draw the grid; returns the PNG's path."""
    from iwm.api import load
    from iwm.training.distributed import resolve_device

    model = load(run, device=resolve_device(device))
    require_decoder(model, run)
    idle = [f.name for f in dataclasses.fields(Action)
            if not acts_on(f.name, model.in_chans) and getattr(action, f.name) != f.default]
    if idle:
        raise ConfigError(f"--action: {', '.join(idle)} do nothing to this model's "
                          f"{model.in_chans}-channel images (training never varied them); "
                          "leave them out")
    images = model.load_images(list(paths))
    result = imagine(model, images, action)
    return plot_imagine(result, out, title=f"{describe_action(action)} "
                                           f"(step {model.step})",
                        labels=[Path(p).name for p in paths])
