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

from iwm.data.actions import DestructiveParams, JitterParams
from iwm.data.factors import DESTRUCTIVE_OPS, JITTER_FACTORS, acts_on
from iwm.data.views import ViewSampler
from iwm.evaluation.bank import (
    MRR_TIES,
    BankScores,
    MainBank,
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
from iwm.evaluation.ranking import (
    chance_reciprocal_rank,
    check_distance,
    ranks_from_scores,
    reciprocal_rank_stderr,
)
from iwm.evaluation.results import write_result
from iwm.evaluation.sensitivity import (
    BETWEEN,
    FactorSensitivity,
    factor_sensitivity,
    summarise_sensitivity,
)
from iwm.models.iwm import IWM

__all__ = ["Decomposition", "MRRResult", "Recovered", "evaluate_mrr", "run_mrr"]


@dataclass
class Decomposition:
    """Why a setting scores what it does, on the same bank: ``oracle``, the MRR of the
    predictor given the really transformed image's context and the null action (the
    inpainting ceiling: what a perfect world model could reach through this predictor);
    ``residual``, the MRR of p(a) - p(null) + z_clean (the action's effect on the
    prediction, added to the clean image's true latents: the world model without its
    inpainting error). A factor weak in MRR but strong in residual is held back by
    inpainting; weak in both, by the world model; weak in the oracle too, by the encoder
    (see the sensitivity) or the bank."""

    oracle: float
    residual: float


@dataclass
class Recovered:
    """The factor of the bank entry nearest each prediction against the requested one
    (log factor; hue in turns), over the images of a one-factor bank: the OLS ``slope``
    (1: the prediction moves as far as asked; below 1: it hedges towards the middle) and
    ``r2``."""

    slope: float | None
    r2: float | None


@dataclass
class MRRResult:
    """MRR of a world model; ``per_transform`` values are ``None`` where not meaningful
    (the reason is in ``notes``); ``sensitivity`` has the factors that were scored. Compare
    a value with its ``chance`` in units of its stderr or of
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
    chance: float
    """MRR of an action-blind predictor on these banks: H_K / K with ``ties="rank"``,
    higher with ``ties="truth"``, where entries that render as the truth do not compete."""
    per_transform_chance: dict[str, float | None] = field(default_factory=dict)
    tied: dict[str, float] = field(default_factory=dict)
    """Per setting, the fraction of bank entries that render as the true one (they are
    the same answer under ``ties="truth"``)."""
    decomposition: dict[str, Decomposition] = field(default_factory=dict)
    recovered: dict[str, Recovered] = field(default_factory=dict)
    blocks: str = "union"
    ties: str = "truth"
    notes: dict[str, str] = field(default_factory=dict)
    sensitivity: dict[str, FactorSensitivity] = field(default_factory=dict)


@dataclass
class _Measures:
    """Per-image measures (first dim B) of one or more batches, keyed by setting."""

    ranks: dict[str, Tensor | None] = field(default_factory=dict)
    chance: dict[str, Tensor] = field(default_factory=dict)
    tied: dict[str, Tensor] = field(default_factory=dict)
    oracle: dict[str, Tensor] = field(default_factory=dict)
    residual: dict[str, Tensor] = field(default_factory=dict)
    nearest: dict[str, Tensor] = field(default_factory=dict)
    """(B, 2): requested factor value, and the nearest entry's (log factor / turns)."""
    sens: dict[str, Tensor] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)

    def extend(self, other: _Measures) -> None:
        """Append ``other``'s images (on the CPU)."""
        self.notes.update(other.notes)
        for name in ("ranks", "chance", "tied", "oracle", "residual", "nearest", "sens"):
            mine, theirs = getattr(self, name), getattr(other, name)
            for key, value in theirs.items():
                if value is None or mine.get(key, 0) is None:
                    mine[key] = None
                elif key in mine:
                    mine[key] = torch.cat([mine[key], value.cpu()])
                else:
                    mine[key] = value.cpu()


def _factor_value(params: JitterParams, factor: str) -> Tensor:
    value = getattr(params, factor).float()
    return value if factor == "hue" else value.clamp_min(1e-6).log()


class _Ranker:
    """Ranks one batch's banks under the protocol's tie rule, with the decomposition."""

    def __init__(self, main: MainBank, ties: str) -> None:
        self.ev, self.ties = main.evaluator, ties
        b, device = self.ev.images.shape[0], self.ev.images.device
        self.identity = JitterParams.identity(b, device)
        self.no_op = DestructiveParams.identity(b, device)
        # Shared by every bank of the batch: the null action's prediction and the clean
        # image's own latents.
        self.null = self.ev.predict(self.ev.images, self.identity, self.no_op).float()
        self.clean = self.ev.clean_latents().float()

    def rank(self, m: _Measures, bank: JitterParams, true_index: Tensor,
             settings: dict[str, Tensor], decompose: str | None = None) -> BankScores:
        """Reciprocal ranks of each prediction in ``settings`` (name -> (B, Kt, D)) into
        ``m``; with ``decompose``, also the oracle's and residual's of that setting."""
        ev, k = self.ev, self.ev.k
        preds = dict(settings)
        if decompose is not None:
            target = ev.true_params(bank, true_index)
            truth = ev.sampler.apply_jitter(ev.images, target)
            preds["oracle"] = ev.predict(truth, self.identity, self.no_op)
            preds["residual"] = settings[decompose].float() - self.null + self.clean
        scored = ev.scores(bank, list(preds.values()), true_index)
        equivalent = scored.equivalent if self.ties == "truth" else None
        others = scored.equivalent.sum(1) - 1  # the true entry is always its own twin
        competing = k - others if self.ties == "truth" else torch.full_like(others, k)
        for name, scores in zip(preds, scored.scores, strict=True):
            rr = 1.0 / ranks_from_scores(scores, true_index, equivalent).float()
            if name in ("oracle", "residual"):
                getattr(m, name)[decompose or ""] = rr
                continue
            m.ranks[name] = rr
            m.chance[name] = chance_reciprocal_rank(competing)
            m.tied[name] = others.float() / max(k - 1, 1)
        return scored


@torch.no_grad()
def _measure(model: IWM, view_sampler: ViewSampler, images: Tensor,
             mask_sampler: MaskSampler, bank_size: int, distance: str,
             generator: torch.Generator, chunk_size: int,
             normalize: Callable[[Tensor], Tensor] | None, per_transform: bool,
             ties: str, bf16: bool = False, breakdown: torch.Generator | None = None
             ) -> _Measures:
    """Every per-image measure of one batch: ranks per setting ("all" + breakdown; None =
    skipped), chance, ties, decomposition, recovered factors, and the sensitivity
    measures ((B, 3) encoder / predictor distance and alignment per scored factor, and the
    distance between images under ``BETWEEN``).

    ``generator`` draws the masks and the main bank, ``breakdown`` the per-transform banks
    and ops, so that "all" is the same with and without ``per_transform`` over any number
    of batches; None: a generator seeded from one draw of ``generator``, made whether or
    not ``per_transform`` is set."""
    check_distance(distance)
    if bank_size < 2:
        raise ValueError(f"bank_size={bank_size}: a ranking needs at least 2 entries")
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size}: must be at least 1")
    if ties not in MRR_TIES:
        raise ValueError(f"ties={ties!r}: must be one of {', '.join(MRR_TIES)}")
    if images.ndim != 4 or images.shape[1] != view_sampler.channels or not len(images):
        raise ValueError(f"expected images (B, {view_sampler.channels}, H, W) with B >= 1, "
                         f"got {tuple(images.shape)}")
    device = next(model.parameters()).device
    images = images.to(device=device, dtype=torch.float32)
    b, channels = images.shape[:2]
    m = _Measures()
    if has_no_jitter(view_sampler.params):
        m.notes["bank"] = "the run's preset has no jitter; bank drawn from the 'jitter' preset"

    # Main bank, shared by "all" and the source-side destructive checks.
    main = draw_main_bank(model, view_sampler, images, mask_sampler, bank_size, distance,
                          chunk_size, normalize or no_normalization, generator, bf16)
    ev, sampler, params = main.evaluator, main.sampler, main.sampler.params
    if breakdown is None:
        seed = int(torch.randint(2**62, (1,), generator=generator, device=generator.device))
        breakdown = torch.Generator(device=generator.device).manual_seed(seed)
    ranker = _Ranker(main, ties)
    no_op = ranker.no_op
    settings = {"all": ev.predict(images, main.target, no_op)}
    if per_transform:
        for op in DESTRUCTIVE_OPS:
            if not acts_on(op, channels):
                m.ranks[op] = None
                m.notes[op] = "no-op on 1-channel images"
                continue
            destructive = forced_op(op, b, params, breakdown, device)
            source = sampler.apply_destructive(images, destructive)
            settings[op] = ev.predict(source, main.target, destructive)
            if getattr(view_sampler.params, f"{op}_p") == 0:
                m.notes[op] = f"views.{op}_p=0 in training: the action is out of distribution"
    ranker.rank(m, main.bank, main.true_index, settings, decompose="all")

    if per_transform:
        for factor in JITTER_FACTORS:
            if not acts_on(factor, channels):
                m.ranks[factor] = None
                m.notes[factor] = "no-op on 1-channel images"
                continue
            if getattr(params, factor) == 0:
                m.ranks[factor] = None
                m.notes[factor] = f"views.{factor}=0: the preset never varies it"
                continue
            bank = only_factor(sampler.sample_jitter(b * bank_size, breakdown, device), factor)
            true_index = draw_true_index(b, bank_size, breakdown, device)
            pred = ev.predict(images, ev.true_params(bank, true_index), no_op)
            scored = ranker.rank(m, bank, true_index, {factor: pred}, decompose=factor)
            values = _factor_value(bank, factor).view(b, bank_size)
            nearest = values.gather(1, scored.scores[0].argmax(1, keepdim=True))[:, 0]
            m.nearest[factor] = torch.stack([values.gather(1, true_index.view(-1, 1))[:, 0],
                                             nearest], dim=1)
            m.sens[factor] = factor_sensitivity(ev, params, factor)
        if m.sens:
            m.sens[BETWEEN] = ev.image_distance()
    return m


def _recovered(pairs: Tensor) -> Recovered:
    x, y = pairs[:, 0].double(), pairs[:, 1].double()
    var = (x - x.mean()).square().mean()
    if x.numel() < 2 or var <= 0:
        return Recovered(None, None)
    cov = ((x - x.mean()) * (y - y.mean())).mean()
    var_y = (y - y.mean()).square().mean()
    r2 = float(cov.square() / (var * var_y)) if var_y > 0 else None
    return Recovered(float(cov / var), r2)


def _summarise(m: _Measures, bank_size: int, distance: str, blocks: str, ties: str
               ) -> MRRResult:
    order = ["all", *JITTER_FACTORS, *DESTRUCTIVE_OPS]
    names = [name for name in order if name in m.ranks and name != "all"]
    per = {name: None if (r := m.ranks[name]) is None else float(r.mean()) for name in names}
    per_err = {name: None if (r := m.ranks[name]) is None else reciprocal_rank_stderr(r)
               for name in names}
    per_chance = {name: float(m.chance[name].mean()) if name in m.chance else None
                  for name in names}
    all_ranks = m.ranks["all"]
    assert all_ranks is not None
    return MRRResult(
        mrr=float(all_ranks.mean()), stderr=reciprocal_rank_stderr(all_ranks),
        bank=bank_size, n_images=all_ranks.numel(), distance=distance, per_transform=per,
        per_transform_stderr=per_err, chance=float(m.chance["all"].mean()),
        per_transform_chance=per_chance,
        tied={name: float(v.mean()) for name, v in m.tied.items()},
        decomposition={name: Decomposition(oracle=float(m.oracle[name].mean()),
                                           residual=float(m.residual[name].mean()))
                       for name in m.oracle},
        recovered={name: _recovered(pairs) for name, pairs in m.nearest.items()},
        blocks=blocks, ties=ties, notes=m.notes,
        sensitivity=summarise_sensitivity(m.sens, m.notes))


def evaluate_mrr(model: IWM, view_sampler: ViewSampler, images: Tensor,
                 mask_sampler: MaskSampler, bank_size: int = 256, distance: str = "cosine",
                 generator: torch.Generator | None = None, chunk_size: int = 512,
                 normalize: Callable[[Tensor], Tensor] | None = None,
                 per_transform: bool = True, ties: str = "truth", bf16: bool = False
                 ) -> MRRResult:
    """MRR of ``model``'s predictor on ``images`` (B, C, H, W) float in [0, 1].

    ``view_sampler`` supplies the run's view preset, channel count and blur kernel;
    ``mask_sampler(batch, generator, device)`` the masks (e.g.
    :func:`~iwm.evaluation.bank.protocol_masks`, whose ``blocks`` decides what is scored);
    ``normalize`` maps [0, 1] images to the model's input (the run's
    :class:`~iwm.data.normalize.Normalizer`; identity if None); ``generator`` (the torch
    RNG every draw comes from) defaults to a CPU generator seeded 0; ``ties`` is one of
    :data:`~iwm.evaluation.bank.MRR_TIES`. ``chunk_size`` bank views are encoded per
    target-encoder call; ``bf16`` runs the model under bf16 autocast (about twice as fast
    where bf16 is native; the ranks can differ where two entries are within rounding). The
    model is put in eval mode for the call and restored afterwards. The protocol is in
    docs/evaluation.md.
    """
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    was_training = model.training
    model.eval()
    try:
        m = _measure(model, view_sampler, images, mask_sampler, bank_size, distance,
                     generator, chunk_size, normalize, per_transform, ties, bf16)
    finally:
        model.train(was_training)
    blocks = getattr(getattr(mask_sampler, "cfg", None), "predictor_pass", "per_block")
    return _summarise(m, bank_size, distance, "union" if blocks == "union" else "first", ties)


def run_mrr(run_dir: Path, n_images: int = 256, bank_size: int = 256, distance: str = "cosine",
            device: str = "auto", seed: int = 0, batch_size: int = 64, chunk_size: int = 512,
            per_transform: bool = True, context: str = "own", blocks: str = "union",
            ties: str = "truth", progress: bool = True, bf16: bool = False) -> dict:
    """MRR of a trained run on ``n_images`` test images of its data set (centre views; an
    in-memory set's first ones, a folder's spread over its classes, as every evaluation
    takes them).

    Writes and returns ``RUN/results/mrr.json`` (the returned dict also has ``path``).
    ``batch_size`` images share one draw of masks; their banks are encoded ``chunk_size``
    views at a time, with :func:`~iwm.evaluation.bank.protocol_masks`. ``blocks="first"``
    and ``ties="rank"`` together are the protocol before 2026-12-02. ``progress``: see
    :mod:`iwm.console`.
    """
    from iwm.api import load
    from iwm.data.datasets import get_dataset
    from iwm.data.sources import derive_seed, tracked_eval_batches
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
    masks = protocol_masks(model.encoder.grid, cfg.mask, context, blocks)
    # On the CPU so the masks, banks and true indices do not depend on the device. The
    # breakdown's draws have their own stream: before 2026-12-07 they shared this one, so
    # each batch after the first drew a different main bank with per_transform than
    # without (Shapes, bank 256, one checkpoint: "all" 0.424 with, 0.477 without).
    generator = torch.Generator().manual_seed(seed)
    breakdown = torch.Generator().manual_seed(derive_seed(seed, "mrr-breakdown"))

    measures = _Measures()
    seen = 0
    # The images every evaluation takes (a folder's spread over its classes, as the API
    # check's and the report's; an in-memory set's first n_images).
    for images, _ in tracked_eval_batches(dataset, batch_size, cfg.data.image_size, dev,
                                          "eval mrr", limit=n_images, progress=progress):
        measures.extend(_measure(model, views, images, masks, bank_size, distance, generator,
                                 chunk_size, pretrained.normalize, per_transform, ties,
                                 bf16, breakdown))
        seen += images.shape[0]
    if seen == 0:
        raise ValueError(f"{cfg.data.name}: the test split has no images")
    result = _summarise(measures, bank_size, distance, blocks, ties)
    out = {
        **dataclasses.asdict(result),
        "seed": seed,
        "context": context,
        "bf16": bf16,
        "step": pretrained.step,
        "bank_views": dataclasses.asdict(bank_view_params(views.params)),
        "seconds": time.perf_counter() - start,
    }
    path = write_result(run_dir, "mrr", out)
    return {**out, "path": str(path)}
