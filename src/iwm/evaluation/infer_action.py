"""Action inference scored (``iwm eval infer-action RUN``) and asked about a user's own
image pairs (``iwm infer RUN SOURCE TARGET``).

Held-out images are jittered with torchvision's own functional ops at known, independently
drawn factors (all varying together), and :meth:`iwm.api.Pretrained.infer_action` is
asked which action maps each image onto its jittered copy. Per factor: R^2 and mean
absolute error of the inferred against the true factor, beside two references: "no
change" (always the identity: the floor) and a least-squares regression on pixel
statistics (context: what the pixels alone tell). For a few images the energy along each
factor, the others at their true values, shows the landscape the search walks. The
protocol is in docs/world_model.md, "Inferring the action".
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kornia
import torch
import torchvision.transforms.v2.functional as TF
from torch import Tensor

from iwm.api import Action, Pretrained
from iwm.data.factors import IDENTITY, JITTER_FACTORS, acts_on
from iwm.evaluation.api_check import RANGES, render
from iwm.evaluation.results import write_result
from iwm.models.action_calibration import (
    CALIBRATION_DEGREES,
    ActionCalibration,
    jitter_coordinates,
    jitters_from_coordinates,
)
from iwm.models.action_search import EnergyKind, SearchBudget

__all__ = ["LANDSCAPE_IMAGES", "LANDSCAPE_POINTS", "RANGES", "RESULT_NAME", "StoredCalibration",
           "calibrate", "draw_jitters", "energy_landscape", "infer_files", "load_calibration",
           "pixel_features", "pixel_regression", "render_pairs", "run_infer_action", "score",
           "stored_calibration"]

RESULT_NAME = "infer_action"
LANDSCAPE_IMAGES = 4
LANDSCAPE_POINTS = 25
_EPS = 1e-6


def draw_jitters(n: int, channels: int, generator: torch.Generator) -> Tensor:
    """True jitters (n, len(JITTER_FACTORS)) in the factors' units (ratios, hue in turns):
    each factor that acts on ``channels`` uniform in :data:`RANGES` (the issue's: brightness
    and contrast in [0.6, 1.4], saturation [0.8, 1.2], hue [-0.1, 0.1]), independently per
    image; the others at the identity. One draw of (n, 4) whatever the channels, so a seed
    gives grey and RGB runs the same brightness and contrast."""
    u = torch.rand((n, len(JITTER_FACTORS)), generator=generator, dtype=torch.float64)
    columns = []
    for j, name in enumerate(JITTER_FACTORS):
        lo, hi = RANGES[name]
        columns.append(lo + (hi - lo) * u[:, j] if acts_on(name, channels)
                       else torch.full((n,), IDENTITY[name], dtype=torch.float64))
    return torch.stack(columns, 1)


def _action(jitter: Tensor) -> Action:
    return Action(**dict(zip(JITTER_FACTORS, jitter.tolist(), strict=True)))


def render_pairs(images: Tensor, jitters: Tensor) -> Tensor:
    """Each image under its own jitter, rendered by torchvision (api_check.render)."""
    # torchvision's functional ops take one factor per call, hence one call per image;
    # rendering is a few hundred small images, nothing beside the search.
    return torch.cat([render(images[i:i + 1], _action(j)) for i, j in enumerate(jitters)])


def pixel_features(source: Tensor, target: Tensor) -> Tensor:
    """Statistics of each (source, target) pair that a jitter moves (n, F): log ratios of
    the mean and std of luma and, on RGB, of the mean chroma (max - min over the channels,
    which saturation scales), and the circular mean hue shift in turns (per-pixel HSV hue
    differences, weighted by both images' chroma)."""

    def luma(x: Tensor) -> Tensor:
        return TF.rgb_to_grayscale(x) if x.shape[1] == 3 else x

    def log_ratio(stat_t: Tensor, stat_s: Tensor) -> Tensor:
        return stat_t.clamp_min(_EPS).log() - stat_s.clamp_min(_EPS).log()

    ls, lt = luma(source).flatten(1), luma(target).flatten(1)
    features = [log_ratio(lt.mean(1), ls.mean(1)), log_ratio(lt.std(1), ls.std(1))]
    if source.shape[1] == 3:
        chroma_s = (source.amax(1) - source.amin(1)).flatten(1)
        chroma_t = (target.amax(1) - target.amin(1)).flatten(1)
        features.append(log_ratio(chroma_t.mean(1), chroma_s.mean(1)))
        shift = (kornia.color.rgb_to_hsv(target)[:, 0] - kornia.color.rgb_to_hsv(source)[:, 0])
        weight = chroma_s * chroma_t
        angle = torch.atan2((weight * shift.flatten(1).sin()).sum(1),
                            (weight * shift.flatten(1).cos()).sum(1))
        features.append(angle / (2 * math.pi))
    return torch.stack(features, 1).double()


def pixel_regression(features: Tensor, jitters: Tensor) -> Tensor | None:
    """The pixel-statistics reference: least squares (with an intercept) of the true
    jitters' coordinates (log ratios, hue in turns) on :func:`pixel_features`, 2-fold
    cross-fitted: fitted on the first half of the images and predicted on the second, then
    the other way round, so every prediction is of an image the fit never saw. In factor
    units (n, 4); None with fewer images per half than coefficients."""
    n = len(features)
    x = torch.cat([features, torch.ones(n, 1, dtype=features.dtype)], 1)
    y = jitter_coordinates(jitters)
    half = n // 2
    if min(half, n - half) < x.shape[1]:
        return None
    out = torch.empty_like(y)
    for fit, held in ((slice(0, half), slice(half, n)), (slice(half, n), slice(0, half))):
        coef = torch.linalg.lstsq(x[fit], y[fit]).solution
        out[held] = x[held] @ coef
    return jitters_from_coordinates(out)


def score(predicted: Tensor, true: Tensor) -> dict[str, float | None]:
    """R^2 (1 - residual / total sum of squares about the true mean; None if the truth
    does not vary) and mean absolute error of ``predicted`` against ``true`` (n,)."""
    total = (true - true.mean()).pow(2).sum()
    residual = (predicted - true).pow(2).sum()
    return {"r2": float(1 - residual / total) if total > 0 else None,
            "mae": float((predicted - true).abs().mean())}


def energy_landscape(pretrained: Pretrained, source: Tensor, target: Tensor,
                     jitters: Tensor, inferred: Tensor, factors: tuple[str, ...],
                     points: int = LANDSCAPE_POINTS, bf16: bool = False,
                     energy: EnergyKind = "residual") -> dict[str, Any]:
    """Energy along each factor in ``factors`` for these pairs, the other factors at their
    true values: a grid of ``points`` over the factor's range of :data:`RANGES` widened by
    a quarter of its width on each side (within the search's bounds), with the true and
    inferred values, all in the factor's units."""
    bounds = pretrained.action_space().factor_bounds()
    truth = torch.cat([_action(j).to_tensor(1) for j in jitters]).to(pretrained.device)
    out: dict[str, Any] = {}
    for name in factors:
        lo, hi = RANGES[name]
        pad = (hi - lo) / 4
        grid = torch.linspace(max(lo - pad, bounds[name][0]), min(hi + pad, bounds[name][1]),
                              points, dtype=torch.float64)
        column = JITTER_FACTORS.index(name)
        coordinate = 2 * grid if name == "hue" else grid.log()
        actions = truth[:, None].repeat(1, points, 1)
        actions[..., column] = coordinate.float().to(actions.device)
        values = pretrained.action_energy(source, target, actions, energy=energy, bf16=bf16)
        out[name] = {"grid": grid.tolist(), "energy": values.cpu().tolist(),
                     "true": jitters[:, column].tolist(),
                     "inferred": inferred[:, column].tolist()}
    return out


def _jitter_of(actions: list[Action]) -> Tensor:
    return torch.tensor([[getattr(a, name) for name in JITTER_FACTORS] for a in actions],
                        dtype=torch.float64)


@dataclasses.dataclass
class _Searched:
    """The protocol's pairs on one split: true and inferred jitters, pixel features, the
    first batch (for the landscape) and the seconds spent searching."""

    true: Tensor
    inferred: Tensor
    features: Tensor
    first: tuple[Tensor, Tensor, Tensor, Tensor]
    seconds: float


def _search_split(pretrained: Pretrained, dataset: Any, split: str, n_images: int,
                  batch_size: int, generator: torch.Generator, budget: SearchBudget,
                  energy: EnergyKind, bf16: bool, progress: bool) -> _Searched:
    from iwm.data.sources import tracked_eval_batches

    parts: dict[str, list[Tensor]] = {"true": [], "inferred": [], "features": []}
    first: tuple[Tensor, Tensor, Tensor, Tensor] | None = None
    seconds = 0.0
    for images, _ in tracked_eval_batches(dataset, batch_size,
                                          pretrained.config.data.image_size,
                                          pretrained.device, f"eval infer-action {split}",
                                          limit=n_images, progress=progress):
        source = pretrained.check_images(images).float()
        jitters, target, inferred, spent = _search_batch(pretrained, source, generator,
                                                         budget, energy, bf16)
        seconds += spent
        if first is None:
            first = (source, target, jitters, inferred)
        parts["true"].append(jitters)
        parts["inferred"].append(inferred)
        parts["features"].append(pixel_features(source.cpu(), target.cpu()))
    if first is None:
        raise ValueError(f"{pretrained.config.data.name}: the {split} split has no images")
    return _Searched(true=torch.cat(parts["true"]), inferred=torch.cat(parts["inferred"]),
                     features=torch.cat(parts["features"]), first=first, seconds=seconds)


def _search_batch(pretrained: Pretrained, source: Tensor, generator: torch.Generator,
                  budget: SearchBudget, energy: EnergyKind, bf16: bool
                  ) -> tuple[Tensor, Tensor, Tensor, float]:
    """One batch of the protocol: true jitters drawn from ``generator``, the targets they
    render, the inferred jitters and the seconds the search took."""
    jitters = draw_jitters(len(source), pretrained.in_chans, generator)
    target = render_pairs(source, jitters).clamp(0, 1)
    search_seed = int(torch.randint(2**62, (1,), generator=generator))
    tic = time.perf_counter()
    found = pretrained.infer_action(source, target, budget=budget, seed=search_seed,
                                    energy=energy, bf16=bf16)
    return jitters, target, _jitter_of(found), time.perf_counter() - tic


def _varied(pretrained: Pretrained) -> tuple[str, ...]:
    channels = pretrained.in_chans
    if channels not in (1, 3):  # torchvision's colour ops know grey and RGB only
        raise ValueError(f"the model takes {channels}-channel images: the check needs 1 or 3")
    return tuple(f for f in JITTER_FACTORS if acts_on(f, channels))


def calibrate(pretrained: Pretrained, images: Tensor, *, seed: int = 0,
              batch_size: int = 32, budget: SearchBudget | None = None,
              energy: EnergyKind = "residual", bf16: bool = False,
              degree: int = 2) -> ActionCalibration:
    """The calibration of ``pretrained``'s action inference, fitted on ``images`` (B, C, H,
    W) in [0, 1], e.g. a few hundred of its training images: each is jittered with
    torchvision at factors drawn uniform in :data:`RANGES` (``seed`` fixes the draws and
    the searches), :meth:`~iwm.api.Pretrained.infer_action` is asked for the jitter, and
    :meth:`ActionCalibration.fit` maps the answers onto the truth (polynomials of
    ``degree`` in the action's coordinates). Pass the result as
    ``infer_action(..., calibration=...)`` with the same ``budget``, ``energy`` and
    ``bf16``: a map fits one search. Costs as much as inferring ``len(images)`` actions."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: must be at least 1")
    images = pretrained.check_images(images).float()
    if len(images) < 2:
        raise ValueError(f"{len(images)} image(s): a calibration fits a line per factor, "
                         "give it at least 2 (128 or more for a stable fit)")
    varied = _varied(pretrained)
    budget = budget if budget is not None else SearchBudget()
    generator = torch.Generator().manual_seed(seed)
    true, inferred = [], []
    for start in range(0, len(images), batch_size):
        jitters, _, found, _ = _search_batch(pretrained, images[start:start + batch_size],
                                             generator, budget, energy, bf16)
        true.append(jitters)
        inferred.append(found)
    return ActionCalibration.fit(torch.cat(inferred), torch.cat(true), varied, degree)


def load_calibration(run_or_result: str | Path) -> ActionCalibration:
    """The calibration ``iwm eval infer-action RUN`` fitted (RUN/results/infer_action.json,
    or that JSON file itself)."""
    path = Path(run_or_result)
    if path.is_dir():
        path = path / "results" / f"{RESULT_NAME}.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no action-inference result; run `iwm eval "
                                "infer-action RUN` first")
    stored = _read_calibration(path)
    if stored is None:
        raise ValueError(f"{path}: scored without calibration; run `iwm eval infer-action "
                         "RUN` again without --calibration-images 0")
    return stored.maps


@dataclass(frozen=True)
class StoredCalibration:
    """A run's calibration as ``iwm eval infer-action`` stored it, with the search it was
    fitted for: a map corrects the answers of that energy, budget and precision, at that
    checkpoint step, and no other."""

    maps: ActionCalibration
    energy: EnergyKind
    budget: SearchBudget
    bf16: bool
    step: int
    n_images: int
    degree: int


def stored_calibration(run_dir: str | Path) -> StoredCalibration | None:
    """What ``RUN/results/infer_action.json`` holds of its calibration, or None if it has
    none (no such file, or scored with ``--calibration-images 0``)."""
    path = Path(run_dir) / "results" / f"{RESULT_NAME}.json"
    return _read_calibration(path) if path.is_file() else None


def _read_calibration(path: Path) -> StoredCalibration | None:
    data = json.loads(path.read_text())
    calibration = data.get("calibration")
    if not calibration:
        return None
    fields = {f.name for f in dataclasses.fields(SearchBudget)}
    return StoredCalibration(
        maps=ActionCalibration.from_dict(calibration["maps"]), energy=data["energy"],
        budget=SearchBudget(**{k: v for k, v in data["budget"].items() if k in fields}),
        bf16=bool(data["bf16"]), step=int(data["step"]),
        n_images=int(calibration["n_images"]), degree=int(calibration.get("degree", 1)))


def infer_files(run: str | Path, pairs: list[tuple[str, str]], *, destructive: bool = False,
                raw: bool = False, seed: int = 0, device: str = "auto") -> dict[str, Any]:
    """``iwm infer``: the action that maps each (source, target) image file of ``pairs``
    onto the other through ``run``'s world model (:meth:`~iwm.api.Pretrained.search_action`,
    images read as :meth:`~iwm.api.Pretrained.load_images` reads them). Unless ``raw``, a
    run's stored calibration (:func:`stored_calibration`) maps the answers, searched with
    the settings it was fitted for; one fitted at another checkpoint step is not applied.
    Returns the answers (``raw`` and, where applied, ``calibrated``), each pair's energy,
    the search settings, the calibration's status and the seconds spent."""
    import iwm
    from iwm.api import calibrated_actions
    from iwm.training.distributed import resolve_device

    if not pairs:
        raise ValueError("no image pairs: give SOURCE TARGET, one pair or more")
    model = iwm.load(run, device=resolve_device(device))
    stored = None if raw or not Path(run).is_dir() else stored_calibration(run)
    status = "raw: asked for (--raw)" if raw else (
        "raw: no calibration stored with this run; `iwm eval infer-action RUN` fits one"
        " (docs/world_model.md)")
    if stored is not None and stored.step != model.step:
        status = (f"raw: the stored calibration was fitted at step {stored.step}, the model "
                  f"is at step {model.step}; run `iwm eval infer-action RUN` again")
        stored = None
    elif stored is not None:
        kind = "affine" if stored.degree == 1 else "quadratic"
        status = (f"calibrated: per-factor {kind} maps fitted by `iwm eval infer-action` on "
                  f"{stored.n_images} training pairs (--raw for the search's own answers)")
    # The search a map was fitted for, else the defaults of infer_action.
    energy, budget, bf16 = ((stored.energy, stored.budget, stored.bf16) if stored is not None
                            else ("residual", SearchBudget(), False))
    sources = model.load_images([s for s, _ in pairs])
    targets = model.load_images([t for _, t in pairs])
    start = time.perf_counter()
    found = model.search_action(sources, targets, destructive=destructive, budget=budget,
                                seed=seed, energy=energy, bf16=bf16)
    seconds = time.perf_counter() - start
    answers = [Action.from_vector(row) for row in found.action]
    fixed = calibrated_actions(answers, stored.maps) if stored is not None else None
    rows = [{"source": str(s), "target": str(t), "raw": dataclasses.asdict(a),
             "energy": float(e)}
            for (s, t), a, e in zip(pairs, answers, found.energy, strict=True)]
    if fixed is not None:
        for row, action in zip(rows, fixed, strict=True):
            row["calibrated"] = dataclasses.asdict(action)
    return {
        "pairs": rows, "calibration": status, "calibrated": fixed is not None, "energy": energy,
        "budget": {**dataclasses.asdict(budget), "evaluations": found.evaluations},
        "bf16": bf16, "destructive": destructive, "seed": seed, "step": model.step,
        "factors": [f for f in JITTER_FACTORS if acts_on(f, model.in_chans)],
        "seconds": seconds,
    }


_CALIBRATION_SEED_OFFSET = 1_000_003


def run_infer_action(run_dir: Path, n_images: int = 256, seed: int = 0, device: str = "auto",
                     batch_size: int = 32, progress: bool = True, bf16: bool = False,
                     budget: SearchBudget | None = None,
                     energy: EnergyKind = "residual", calibration_images: int = 128,
                     calibration_degree: int = 2) -> dict:
    """Score :meth:`~iwm.api.Pretrained.infer_action` of a run on the first ``n_images``
    test images of its data (centre views, as the API check takes them), ``batch_size``
    pairs per search. Writes and returns ``RUN/results/infer_action.json`` (the returned
    dict also has ``path``); ``progress``: see :mod:`iwm.console`; ``bf16`` runs the
    model under bf16 autocast; ``budget`` defaults to :class:`SearchBudget`'s; ``energy``
    is the kind of :func:`~iwm.models.action_search.latent_energy` searched.

    With ``calibration_images`` > 0 the same protocol first runs on that many *training*
    images (jitters of their own draw), :meth:`ActionCalibration.fit` (polynomials of
    ``calibration_degree``) maps their inferred
    factors onto the true ones, and the test answers are scored again through that map
    (``calibrated``): the world model's answers with its systematic bias removed, fitted
    without the test pairs' truth. ``model`` stays the search's own answer."""
    import iwm
    from iwm.data.datasets import get_dataset
    from iwm.training.distributed import resolve_device

    if n_images < 1 or batch_size < 1:
        raise ValueError(f"n_images={n_images}, batch_size={batch_size}: must be at least 1")
    if calibration_images < 0:
        raise ValueError(f"calibration_images={calibration_images}: must be 0 (none) or more")
    if calibration_degree not in CALIBRATION_DEGREES:
        raise ValueError(f"calibration_degree={calibration_degree}: use one of "
                         f"{', '.join(map(str, CALIBRATION_DEGREES))}")
    budget = budget if budget is not None else SearchBudget()
    start = time.perf_counter()
    dev = resolve_device(device)
    pretrained = iwm.load(run_dir, device=dev)
    cfg, channels = pretrained.config, pretrained.in_chans
    varied = _varied(pretrained)

    def search(split: str, n: int, split_seed: int) -> _Searched:
        dataset = get_dataset(cfg.data.name, split, cfg.data.root, holdout=cfg.data.holdout)
        # On the CPU, so the jitters and the searches' seeds do not depend on the device.
        return _search_split(pretrained, dataset, split, n, batch_size,
                             torch.Generator().manual_seed(split_seed), budget, energy,
                             bf16, progress)

    test = search("test", n_images, seed)
    calibration: dict[str, Any] | None = None
    calibrated: Tensor | None = None
    if calibration_images:
        fitted = search("train", calibration_images, seed + _CALIBRATION_SEED_OFFSET)
        maps = ActionCalibration.fit(fitted.inferred, fitted.true, varied, calibration_degree)
        calibration = {"n_images": len(fitted.true), "split": "train",
                       "degree": calibration_degree, "maps": maps.to_dict(),
                       "seconds": fitted.seconds}
        calibrated = maps.apply(test.inferred)
    source, target, jitters, first_inferred = test.first
    k = min(LANDSCAPE_IMAGES, len(source))
    landscape = energy_landscape(pretrained, source[:k], target[:k], jitters[:k],
                                 first_inferred[:k], varied, bf16=bf16, energy=energy)
    true, inferred = test.true, test.inferred
    pixels = pixel_regression(test.features, true)
    n = len(true)
    per_factor: dict[str, Any] = {}
    notes: dict[str, str] = {}
    for j, name in enumerate(JITTER_FACTORS):
        if name not in varied:
            per_factor[name] = None
            notes[name] = "no-op on 1-channel images"
            continue
        identity = torch.full_like(true[:, j], IDENTITY[name])
        per_factor[name] = {"model": score(inferred[:, j], true[:, j]),
                            "no_change": score(identity, true[:, j]),
                            "pixels": None if pixels is None else score(pixels[:, j],
                                                                        true[:, j])}
        if calibrated is not None:
            per_factor[name]["calibrated"] = score(calibrated[:, j], true[:, j])
    if pixels is None:
        notes["pixels"] = f"{n} images: too few to fit the pixel regression on half of them"
    pairs: dict[str, dict[str, list[float]]] = {
        kind: {f: values[:, j].tolist() for j, f in enumerate(JITTER_FACTORS) if f in varied}
        for kind, values in (("true", true), ("inferred", inferred), ("calibrated", calibrated))
        if values is not None}
    out = {
        "n_images": n, "seed": seed, "bf16": bf16, "step": pretrained.step,
        "dataset": cfg.data.name, "channels": channels, "device": str(dev),
        "threads": torch.get_num_threads(),
        "ranges": {f: RANGES[f] for f in varied},
        "search_bounds": pretrained.action_space().factor_bounds(),
        "budget": {**dataclasses.asdict(budget), "evaluations": budget.evaluations},
        "energy": energy,
        "ms_per_image": 1000 * test.seconds / n,
        "per_factor": per_factor, "notes": notes,
        "pixels": "least squares with an intercept of each factor's log ratio (hue: turns) "
                  "on the pixel statistics, 2-fold cross-fitted (fitted on one half of "
                  "the images, scored on the other, both ways)",
        "calibration": calibration,
        "pairs": pairs,
        "landscape": landscape,
        "seconds": time.perf_counter() - start,
    }
    path = write_result(run_dir, RESULT_NAME, out)
    return {**out, "path": str(path)}
