"""World-model quality: Mean Reciprocal Rank (MRR) of the predictor.

Can the predictor apply a transformation in latent space? Give it a clean image's context
tokens and an action; rank the target-encoder latent of the image *really* transformed by
that action among the latents of the same image under other sampled transformations.
MRR = mean over images of 1/rank: about 1 when the predictor applies the action, chance
(:func:`~iwm.evaluation.ranking.chance_mrr`) when it ignores it. The protocol (positions,
bank, distance, ties, per-transform scores) is in docs/evaluation.md, "The MRR protocol".

This module is the driver; the ranking math is :mod:`iwm.evaluation.ranking`, the bank
and its draws :mod:`iwm.evaluation.bank`, the per-factor diagnosis
:mod:`iwm.evaluation.sensitivity`.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from iwm.data.actions import DestructiveParams
from iwm.data.factors import DESTRUCTIVE_OPS, JITTER_FACTORS, acts_on
from iwm.data.views import ViewSampler
from iwm.evaluation.bank import (
    MaskSampler,
    bank_view_params,
    draw_main_bank,
    draw_true_index,
    forced_op,
    has_no_jitter,
    no_normalization,
    only_factor,
    protocol_masks,
)
from iwm.evaluation.ranking import check_distance, ranks_from_scores, reciprocal_rank_stderr
from iwm.evaluation.results import write_result
from iwm.evaluation.sensitivity import (
    BETWEEN,
    FactorSensitivity,
    factor_sensitivity,
    summarise_sensitivity,
)
from iwm.models.iwm import IWM

__all__ = ["MRRResult", "evaluate_mrr", "run_mrr"]


@dataclass
class MRRResult:
    """MRR of a world model; ``per_transform`` values are ``None`` where not meaningful
    (the reason is in ``notes``); ``sensitivity`` has the factors that were scored. Compare
    a value with :func:`~iwm.evaluation.ranking.chance_mrr` in units of its stderr or of
    :func:`~iwm.evaluation.ranking.chance_mrr_stderr`."""

    mrr: float
    stderr: float | None
    """Standard error of ``mrr`` over the images (std of 1/rank / sqrt(n)); None from
    one image, where there is no spread to measure (and NaN is not valid JSON)."""
    bank: int
    n_images: int
    distance: str
    per_transform: dict[str, float | None]
    per_transform_stderr: dict[str, float | None]
    notes: dict[str, str] = field(default_factory=dict)
    sensitivity: dict[str, FactorSensitivity] = field(default_factory=dict)


@torch.no_grad()
def _reciprocal_ranks(model: IWM, view_sampler: ViewSampler, images: Tensor,
                      mask_sampler: MaskSampler, bank_size: int, distance: str,
                      generator: torch.Generator, chunk_size: int,
                      normalize: Callable[[Tensor], Tensor] | None, per_transform: bool,
                      ) -> tuple[dict[str, Tensor | None], dict[str, str], dict[str, Tensor]]:
    """Reciprocal ranks (B,) per setting ("all" + breakdown; None = skipped), notes, and
    the per-image sensitivity measures: (B, 3) encoder / predictor distance and alignment
    per scored factor, and the distance between images under ``BETWEEN``."""
    check_distance(distance)
    if bank_size < 2:
        raise ValueError(f"bank_size={bank_size}: a ranking needs at least 2 entries")
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size}: must be at least 1")
    if images.ndim != 4 or images.shape[1] != view_sampler.channels or not len(images):
        raise ValueError(f"expected images (B, {view_sampler.channels}, H, W) with B >= 1, "
                         f"got {tuple(images.shape)}")
    device = next(model.parameters()).device
    images = images.to(device=device, dtype=torch.float32)
    b, channels = images.shape[:2]
    notes: dict[str, str] = {}
    if has_no_jitter(view_sampler.params):
        notes["bank"] = "the run's preset has no jitter; bank drawn from the 'jitter' preset"

    # Main bank, shared by "all" and the source-side destructive checks.
    main = draw_main_bank(model, view_sampler, images, mask_sampler, bank_size, distance,
                          chunk_size, normalize or no_normalization, generator)
    ev, sampler, params = main.evaluator, main.sampler, main.sampler.params
    no_op = DestructiveParams.identity(b, device)
    names, preds = ["all"], [ev.predict(images, main.target, no_op)]
    ranks: dict[str, Tensor | None] = {}
    sens: dict[str, Tensor] = {}
    if per_transform:
        for op in DESTRUCTIVE_OPS:
            if not acts_on(op, channels):
                ranks[op] = None
                notes[op] = "no-op on 1-channel images"
                continue
            destructive = forced_op(op, b, params, generator, device)
            source = sampler.apply_destructive(images, destructive)
            names.append(op)
            preds.append(ev.predict(source, main.target, destructive))
            if getattr(view_sampler.params, f"{op}_p") == 0:
                notes[op] = f"views.{op}_p=0 in training: the action is out of distribution"
    for name, scores in zip(names, ev.scores(main.bank, preds), strict=True):
        ranks[name] = 1.0 / ranks_from_scores(scores, main.true_index).float()

    if per_transform:
        for factor in JITTER_FACTORS:
            if not acts_on(factor, channels):
                ranks[factor] = None
                notes[factor] = "no-op on 1-channel images"
                continue
            if getattr(params, factor) == 0:
                ranks[factor] = None
                notes[factor] = f"views.{factor}=0: the preset never varies it"
                continue
            bank = only_factor(sampler.sample_jitter(b * bank_size, generator, device), factor)
            true_index = draw_true_index(b, bank_size, generator, device)
            pred = ev.predict(images, ev.true_params(bank, true_index), no_op)
            (scores,) = ev.scores(bank, [pred])
            ranks[factor] = 1.0 / ranks_from_scores(scores, true_index).float()
            sens[factor] = factor_sensitivity(ev, params, factor)
        if sens:
            sens[BETWEEN] = ev.image_distance()
    return ranks, notes, sens


def _summarise(ranks: dict[str, Tensor | None], notes: dict[str, str], bank_size: int,
               distance: str, sens: dict[str, Tensor]) -> MRRResult:
    order = ["all", *JITTER_FACTORS, *DESTRUCTIVE_OPS]
    names = [name for name in order if name in ranks and name != "all"]
    per = {name: None if (r := ranks[name]) is None else float(r.mean()) for name in names}
    per_err = {name: None if (r := ranks[name]) is None else reciprocal_rank_stderr(r)
               for name in names}
    all_ranks = ranks["all"]
    assert all_ranks is not None
    return MRRResult(mrr=float(all_ranks.mean()), stderr=reciprocal_rank_stderr(all_ranks),
                     bank=bank_size, n_images=all_ranks.numel(), distance=distance,
                     per_transform=per, per_transform_stderr=per_err, notes=notes,
                     sensitivity=summarise_sensitivity(sens, notes))


def evaluate_mrr(model: IWM, view_sampler: ViewSampler, images: Tensor,
                 mask_sampler: MaskSampler, bank_size: int = 256, distance: str = "cosine",
                 generator: torch.Generator | None = None, chunk_size: int = 512,
                 normalize: Callable[[Tensor], Tensor] | None = None,
                 per_transform: bool = True) -> MRRResult:
    """MRR of ``model``'s predictor on ``images`` (B, C, H, W) float in [0, 1].

    ``view_sampler`` supplies the run's view preset, channel count and blur kernel;
    ``mask_sampler(batch, generator, device)`` the masks (e.g.
    :func:`~iwm.evaluation.bank.protocol_masks`); ``normalize`` maps [0, 1] images to
    the model's input (the run's :class:`~iwm.data.normalize.Normalizer`; identity if None);
    ``generator`` (the torch RNG every draw comes from) defaults to a CPU generator seeded
    0. ``chunk_size`` bank views are encoded per target-encoder call. The model is put in
    eval mode for the call and restored afterwards. The protocol is in docs/evaluation.md.
    """
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    was_training = model.training
    model.eval()
    try:
        ranks, notes, sens = _reciprocal_ranks(model, view_sampler, images, mask_sampler,
                                               bank_size, distance, generator, chunk_size,
                                               normalize, per_transform)
    finally:
        model.train(was_training)
    return _summarise(ranks, notes, bank_size, distance, sens)


def run_mrr(run_dir: Path, n_images: int = 256, bank_size: int = 256, distance: str = "cosine",
            device: str = "auto", seed: int = 0, batch_size: int = 64, chunk_size: int = 512,
            per_transform: bool = True, context: str = "own", progress: bool = True) -> dict:
    """MRR of a trained run on its data set's first ``n_images`` test images (centre views).

    Writes and returns ``RUN/results/mrr.json`` (the returned dict also has ``path``).
    ``batch_size`` images share one draw of masks; their banks are encoded ``chunk_size``
    views at a time, with :func:`~iwm.evaluation.bank.protocol_masks`. ``progress``: see
    :mod:`iwm.console`.
    """
    from iwm.api import load
    from iwm.console import Progress, batches_of
    from iwm.data.datasets import get_dataset
    from iwm.data.sources import iter_eval_batches
    from iwm.data.views import resolve_view_params
    from iwm.training.distributed import resolve_device

    if n_images < 1 or batch_size < 1:
        raise ValueError(f"n_images={n_images}, batch_size={batch_size}: must be at least 1")
    start = time.perf_counter()
    dev = resolve_device(device)
    pretrained = load(run_dir, device=dev)
    cfg, model = pretrained.config, pretrained.model
    model.eval()  # load() returns it in eval mode; a run dir is never resumed from here
    dataset = get_dataset(cfg.data.name, "test", cfg.data.root, holdout=cfg.data.holdout)
    views = ViewSampler(resolve_view_params(cfg.views), dataset.channels, cfg.data.image_size)
    masks = protocol_masks(model.encoder.grid, cfg.mask, context)
    # On the CPU so the masks, banks and true indices do not depend on the device.
    generator = torch.Generator().manual_seed(seed)

    collected: dict[str, list[Tensor]] = {}
    sens_parts: dict[str, list[Tensor]] = {}
    notes: dict[str, str] = {}
    seen = 0
    bar = Progress(batches_of(min(n_images, len(dataset)), batch_size), "eval mrr",
                   enabled=progress)
    for images, _ in iter_eval_batches(dataset, batch_size, cfg.data.image_size, dev):
        images = images[:n_images - seen]
        ranks, batch_notes, sens = _reciprocal_ranks(
            model, views, images, masks, bank_size, distance, generator, chunk_size,
            pretrained.normalize, per_transform)
        notes.update(batch_notes)
        for name, values in sens.items():
            sens_parts.setdefault(name, []).append(values.cpu())
        for name, rr in ranks.items():
            if rr is not None:
                collected.setdefault(name, []).append(rr.cpu())
            else:
                collected.setdefault(name, [])
        seen += images.shape[0]
        bar.update()
        if seen >= n_images:
            break
    bar.close()
    if seen == 0:
        raise ValueError(f"{cfg.data.name}: the test split has no images")
    ranks_all = {name: torch.cat(parts) if parts else None for name, parts in collected.items()}
    result = _summarise(ranks_all, notes, bank_size, distance,
                        {name: torch.cat(parts) for name, parts in sens_parts.items()})
    out = {
        **dataclasses.asdict(result),
        "seed": seed,
        "context": context,
        "step": pretrained.step,
        "bank_views": dataclasses.asdict(bank_view_params(views.params)),
        "seconds": time.perf_counter() - start,
    }
    path = write_result(run_dir, "mrr", out)
    return {**out, "path": str(path)}
