"""World-model quality: Mean Reciprocal Rank (MRR) of the predictor.

Can the predictor apply a transformation in latent space? Give it a clean image's context
tokens and an action; rank the target-encoder latent of the image *really* transformed by
that action among the latents of the same image under other sampled transformations.
MRR = mean over images of 1/rank: about 1 when the predictor applies the action, chance
(:func:`chance_mrr`) when it ignores it. The protocol (positions, bank, distance, ties,
per-transform scores) is in docs/evaluation.md, "The MRR protocol".
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from iwm.config import MaskConfig
from iwm.data.actions import DestructiveParams, JitterParams, build_action
from iwm.data.masks import Masks, MultiBlockMaskGenerator
from iwm.data.shard import take_rows
from iwm.data.views import STRENGTHS, ViewParams, ViewSampler, jitter_range
from iwm.evaluation.results import write_result
from iwm.models.iwm import IWM
from iwm.models.tokens import gather_tokens

__all__ = [
    "DESTRUCTIVE_OPS",
    "DISTANCES",
    "FACTORS",
    "MRR_CONTEXTS",
    "FactorSensitivity",
    "MRRResult",
    "bank_view_params",
    "chance_mrr_stderr",
    "evaluate_mrr",
    "mean_reciprocal_rank",
    "pairwise_scores",
    "protocol_masks",
    "ranks_from_scores",
    "run_mrr",
]

DISTANCES = ("cosine", "l2")
#: ``own``: each image keeps its whole context; ``batch-min``: every context is thinned to
#: the smallest of its batch, the training masks' old form (kept to compare protocols).
MRR_CONTEXTS = ("own", "batch-min")
FACTORS = ("brightness", "contrast", "saturation", "hue")
DESTRUCTIVE_OPS = ("grayscale", "blur", "solarize")
_RGB_ONLY = frozenset({"saturation", "hue", "grayscale"})

MaskFn = Callable[[int, torch.Generator, torch.device], Masks]


@dataclass
class FactorSensitivity:
    """How far one jitter factor moves the latents, from one end of its range to the other,
    as a fraction of the distance between two different images (same distance as the MRR).

    ``encoder``: the target encoder's latents of the really transformed image; near 0, the
    encoder is invariant to the factor and no predictor can rank it. ``predictor``: the
    predictor's outputs for the two actions; near 0 while ``encoder`` is not, the predictor
    ignores that field of the action. ``alignment``: cosine of the two changes (1: the
    predictor moves the way the encoder does).
    """

    encoder: float
    predictor: float
    alignment: float


@dataclass
class MRRResult:
    """MRR of a world model; ``per_transform`` values are ``None`` where not meaningful
    (the reason is in ``notes``); ``sensitivity`` has the factors that were scored. Compare
    a value with :func:`chance_mrr` in units of its stderr or of :func:`chance_mrr_stderr`."""

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


# ---------------------------------------------------------------- ranking


def chance_mrr(bank_size: int) -> float:
    """The MRR of a predictor that ignores the action: H_K / K (see "Chance level")."""
    return sum(1 / r for r in range(1, bank_size + 1)) / bank_size


def chance_mrr_stderr(bank_size: int, n_images: int) -> float:
    """Standard error of the MRR over ``n_images`` of a predictor that ignores the action.

    Its rank is uniform on 1..K, so one image's 1/rank has mean H_K / K and second moment
    H2_K / K (H2_K = sum of 1/r^2); an MRR is "above chance" by how many of these it sits
    above :func:`chance_mrr`.
    """
    if bank_size < 1 or n_images < 1:
        raise ValueError(f"bank_size={bank_size}, n_images={n_images}: must be at least 1")
    mean = chance_mrr(bank_size)
    second = sum(1 / r**2 for r in range(1, bank_size + 1)) / bank_size
    return math.sqrt(max(second - mean**2, 0.0) / n_images)


def check_distance(distance: str) -> None:
    if distance not in DISTANCES:
        raise ValueError(f"distance={distance!r}: must be one of {', '.join(DISTANCES)}")


def _entry_scores(pred: Tensor, entries: Tensor, valid: Tensor | None, distance: str) -> Tensor:
    """Closeness (higher = closer) of ``pred`` and ``entries``, both (..., T, D), over the
    T tokens marked by ``valid`` (..., T) (all if None) -> (...)."""
    pred, entries = pred.float(), entries.float()
    weights = pred.new_ones(pred.shape[-2]) if valid is None else valid.to(pred.dtype)
    weights = weights.unsqueeze(-1)  # (..., T, 1)
    count = weights.sum(-2).clamp_min(1.0)
    if distance == "cosine":
        a = (pred * weights).sum(-2) / count
        b = (entries * weights).sum(-2) / count
        # -|a - b|^2 = 2 cos - 2 for unit vectors; the subtraction form resolves near-1
        # cosines that a float32 dot product would round together.
        score = -(F.normalize(a, dim=-1) - F.normalize(b, dim=-1)).pow(2).sum(-1)
        # A zero vector has no direction: cos = 0 exactly, so a zero prediction ties with
        # every entry (rounding in |b/|b||^2 would otherwise rank them arbitrarily).
        zero = (a.abs().amax(-1) == 0) | (b.abs().amax(-1) == 0)
        return torch.where(zero, torch.full_like(score, -2.0), score)
    per_token = (pred - entries).pow(2).mean(-1, keepdim=True)
    return -((per_token * weights).sum(-2) / count).squeeze(-1)


def pairwise_scores(pred: Tensor, bank: Tensor, distance: str = "cosine",
                    valid: Tensor | None = None) -> Tensor:
    """Closeness (higher = closer) of each prediction to each of its bank entries.

    ``pred`` (B, D) or (B, T, D); ``bank`` (B, K, D) or (B, K, T, D); ``valid`` (B, T)
    optional token mask. Any dims between the leading ones and the channel dim D are
    treated as tokens. Returns (B, K).
    """
    check_distance(distance)
    b, k, d = bank.shape[0], bank.shape[1], bank.shape[-1]
    if pred.shape[0] != b or pred.shape[-1] != d or pred[0].numel() != bank[0, 0].numel():
        raise ValueError(f"pred {tuple(pred.shape)} does not match bank {tuple(bank.shape)}")
    p = pred.reshape(b, 1, -1, d)
    e = bank.reshape(b, k, -1, d)
    v = None if valid is None else valid.reshape(b, 1, -1)
    return _entry_scores(p, e, v, distance)


def ranks_from_scores(scores: Tensor, true_index: Tensor) -> Tensor:
    """1-based rank (B,) of ``scores[b, true_index[b]]`` in each row of ``scores`` (B, K),
    higher = better; ties count as the worst rank in the tie, NaN as the lowest score."""
    scores = torch.nan_to_num(scores.float(), nan=-torch.inf)
    true = scores.gather(1, true_index.long().view(-1, 1))
    return (scores >= true).sum(1)


def mean_reciprocal_rank(pred: Tensor, bank: Tensor, true_index: Tensor,
                         distance: str = "cosine", valid: Tensor | None = None) -> Tensor:
    """Reciprocal rank (B,) of the true bank entry for each prediction (mean it for MRR).

    ``pred`` (B, D...) and ``bank`` (B, K, D...) as in :func:`pairwise_scores`;
    ``true_index`` (B,) the entry each prediction should match.
    """
    scores = pairwise_scores(pred, bank, distance, valid)
    return 1.0 / ranks_from_scores(scores, true_index.to(scores.device)).float()


# ---------------------------------------------------------------- bank sampling


def _has_no_jitter(params: ViewParams) -> bool:
    return max(params.brightness, params.contrast, params.saturation, params.hue) == 0


def bank_view_params(params: ViewParams) -> ViewParams:
    """The jitter ranges a bank is drawn from: the run's, always applied (see module doc)."""
    if _has_no_jitter(params):
        jitter = STRENGTHS["jitter"]
        params = dataclasses.replace(params, brightness=jitter.brightness,
                                     contrast=jitter.contrast, saturation=jitter.saturation,
                                     hue=jitter.hue)
    return dataclasses.replace(params, jitter_p=1.0)


def _only_factor(params: JitterParams, factor: str) -> JitterParams:
    """``params`` with every factor but ``factor`` reset to the identity."""
    identity = JitterParams.identity(params.batch_size, params.applied.device)
    kept = {name: getattr(identity, name) for name in FACTORS}
    kept[factor] = getattr(params, factor)
    return JitterParams(**kept, applied=params.applied)


def _forced_op(op: str, batch: int, params: ViewParams, generator: torch.Generator,
               device: torch.device) -> DestructiveParams:
    """Destructive params with exactly ``op`` applied to every image."""
    out = DestructiveParams.identity(batch, device)
    if op == "blur":
        lo, hi = params.blur_sigma
        u = torch.rand(batch, generator=generator, device=generator.device).to(device)
        out.blur = torch.ones(batch, dtype=torch.bool, device=device)
        out.blur_sigma = lo + (hi - lo) * u
    else:
        setattr(out, op, torch.ones(batch, dtype=torch.bool, device=device))
    return out


def _range_end(params: ViewParams, factor: str, end: int, batch: int,
               device: torch.device) -> JitterParams:
    """Jitter with ``factor`` at the low (``end`` -1) or high (+1) end of the range that
    :meth:`ViewSampler.sample_jitter` draws it from, every other factor the identity.
    Hue ends are at most a quarter turn each way: shifts of -0.5 and +0.5 turn are the
    same image, and half a turn apart is as far apart as two hues get."""
    lo, hi = jitter_range(params, factor)
    if factor == "hue":
        lo, hi = max(lo, -0.25), min(hi, 0.25)
    value = lo if end < 0 else hi
    out = JitterParams.identity(batch, device)
    setattr(out, factor, torch.full((batch,), value, device=device))
    out.applied = torch.ones(batch, dtype=torch.bool, device=device)
    return out


def _change_alignment(pred_change: Tensor, target_change: Tensor, valid: Tensor) -> Tensor:
    """Cosine (B,) of two (B, T, D) changes over the valid tokens (0 where one is zero)."""
    w = valid.to(pred_change.dtype).unsqueeze(-1)
    return F.cosine_similarity((pred_change * w).flatten(1), (target_change * w).flatten(1),
                               dim=1)


# ---------------------------------------------------------------- evaluation


def no_normalization(x: Tensor) -> Tensor:
    return x


class BankEvaluator:
    """One batch of images: shared masks, predictions and chunked bank scoring."""

    def __init__(self, model: IWM, bank_sampler: ViewSampler, images: Tensor, masks: Masks,
                 bank_size: int, distance: str, chunk_size: int,
                 normalize: Callable[[Tensor], Tensor]) -> None:
        self.model = model
        self.sampler = bank_sampler
        self.images = images
        self.k = bank_size
        self.distance = distance
        self.chunk = chunk_size
        self.norm = normalize
        self.context_idx = masks.context
        self.context_valid = masks.context_valid
        self.target_idx = masks.targets[:, 0]
        self.valid = masks.target_valid[:, 0]
        b, device = images.shape[0], images.device
        self.rows = torch.arange(b, device=device)
        self.identity_source = JitterParams.identity(b, device)

    def predict(self, source: Tensor, target: JitterParams,
                destructive: DestructiveParams) -> Tensor:
        """Predictor output (B, Kt, D) at the first block, from ``source``'s context."""
        action = build_action(target, self.identity_source, destructive)
        context = self.model.encoder.forward_tokens(self.norm(source), self.context_idx,
                                                    self.context_valid)
        return self.model.predictor(context, self.context_idx, self.target_idx,
                                    context_valid=self.context_valid, target_valid=self.valid,
                                    action=action)

    def latents(self, params: JitterParams) -> Tensor:
        """Target latents (B, Kt, D) at the block of the images jittered by ``params``."""
        views = self.sampler.apply_jitter(self.images, params)
        return gather_tokens(self.model.target_tokens(self.norm(views)), self.target_idx)

    def distance_between(self, a: Tensor, b: Tensor) -> Tensor:
        """Distance (B,) between two (B, Kt, D) latents over the block's valid tokens."""
        return -_entry_scores(a.float(), b.float(), self.valid, self.distance)

    def image_distance(self) -> Tensor:
        """Distance (B,) from each image's latent to the next image's, at its positions."""
        tokens = self.model.target_tokens(self.norm(self.images))
        own = gather_tokens(tokens, self.target_idx)
        other = gather_tokens(tokens.roll(1, 0), self.target_idx)
        return self.distance_between(own, other)

    def sensitivity(self, params: ViewParams, factor: str) -> tuple[Tensor, Tensor, Tensor]:
        """Per-image distances (B,) between the two ends of ``factor``'s range, for the
        target latents and for the predictions, and the alignment of the two changes."""
        b, device = self.images.shape[0], self.images.device
        no_op = DestructiveParams.identity(b, device)
        lo, hi = (_range_end(params, factor, end, b, device) for end in (-1, 1))
        z_lo, z_hi = self.latents(lo), self.latents(hi)
        p_lo = self.predict(self.images, lo, no_op).float()
        p_hi = self.predict(self.images, hi, no_op).float()
        return (self.distance_between(z_hi, z_lo), self.distance_between(p_hi, p_lo),
                _change_alignment(p_hi - p_lo, z_hi.float() - z_lo.float(), self.valid))

    def true_params(self, bank: JitterParams, true_index: Tensor) -> JitterParams:
        return take_rows(bank, self.rows * self.k + true_index)

    def scores(self, bank: JitterParams, preds: list[Tensor]) -> list[Tensor]:
        """(B, K) closeness of each prediction in ``preds`` to every entry of ``bank``
        (B*K params, image-major), rendered and encoded ``chunk`` views at a time."""
        total = self.images.shape[0] * self.k
        out = [torch.empty(total, device=self.images.device) for _ in preds]
        for start in range(0, total, self.chunk):
            rows = torch.arange(start, min(total, start + self.chunk), device=self.images.device)
            img = torch.div(rows, self.k, rounding_mode="floor")
            views = self.sampler.apply_jitter(self.images[img], take_rows(bank, rows))
            latents = gather_tokens(self.model.target_tokens(self.norm(views)),
                                    self.target_idx[img])
            valid = self.valid[img]
            for o, pred in zip(out, preds, strict=True):
                o[start:start + rows.numel()] = _entry_scores(pred[img], latents, valid,
                                                              self.distance)
        return [o.view(-1, self.k) for o in out]


def draw_true_index(batch: int, k: int, generator: torch.Generator, device: torch.device) -> Tensor:
    return torch.randint(k, (batch,), generator=generator, device=generator.device).to(device)


@torch.no_grad()
def _reciprocal_ranks(model: IWM, view_sampler: ViewSampler, images: Tensor,
                      mask_generator: MaskFn, bank_size: int, distance: str,
                      generator: torch.Generator, chunk_size: int,
                      normalize: Callable[[Tensor], Tensor] | None, per_transform: bool,
                      ) -> tuple[dict[str, Tensor | None], dict[str, str], dict[str, Tensor]]:
    """Reciprocal ranks (B,) per setting ("all" + breakdown; None = skipped), notes, and
    the per-image sensitivity measures: (B, 3) encoder / predictor distance and alignment
    per scored factor, and the distance between images under ``"between"``."""
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
    params = bank_view_params(view_sampler.params)
    sampler = ViewSampler(params, channels, view_sampler.image_size)
    notes: dict[str, str] = {}
    if _has_no_jitter(view_sampler.params):
        notes["bank"] = "the run's preset has no jitter; bank drawn from the 'jitter' preset"

    masks = mask_generator(b, generator, device)
    ev = BankEvaluator(model, sampler, images, masks, bank_size, distance, chunk_size,
                    normalize or no_normalization)
    no_op = DestructiveParams.identity(b, device)

    # Main bank, shared by "all" and the source-side destructive checks.
    bank = sampler.sample_jitter(b * bank_size, generator, device)
    true_index = draw_true_index(b, bank_size, generator, device)
    target = ev.true_params(bank, true_index)
    names, preds = ["all"], [ev.predict(images, target, no_op)]
    ranks: dict[str, Tensor | None] = {}
    sens: dict[str, Tensor] = {}
    if per_transform:
        for op in DESTRUCTIVE_OPS:
            if op in _RGB_ONLY and channels == 1:
                ranks[op] = None
                notes[op] = "no-op on 1-channel images"
                continue
            destructive = _forced_op(op, b, params, generator, device)
            source = sampler.apply_destructive(images, destructive)
            names.append(op)
            preds.append(ev.predict(source, target, destructive))
            if getattr(view_sampler.params, f"{op}_p") == 0:
                notes[op] = f"views.{op}_p=0 in training: the action is out of distribution"
    for name, scores in zip(names, ev.scores(bank, preds), strict=True):
        ranks[name] = 1.0 / ranks_from_scores(scores, true_index).float()

    if per_transform:
        for factor in FACTORS:
            if factor in _RGB_ONLY and channels == 1:
                ranks[factor] = None
                notes[factor] = "no-op on 1-channel images"
                continue
            if getattr(params, factor) == 0:
                ranks[factor] = None
                notes[factor] = f"views.{factor}=0: the preset never varies it"
                continue
            bank = _only_factor(sampler.sample_jitter(b * bank_size, generator, device), factor)
            true_index = draw_true_index(b, bank_size, generator, device)
            pred = ev.predict(images, ev.true_params(bank, true_index), no_op)
            (scores,) = ev.scores(bank, [pred])
            ranks[factor] = 1.0 / ranks_from_scores(scores, true_index).float()
            # Draws nothing from the generator: the ranks do not depend on it.
            sens[factor] = torch.stack(ev.sensitivity(params, factor), dim=1)
        if sens:
            sens["between"] = ev.image_distance()
    return ranks, notes, sens


def _sensitivities(sens: dict[str, Tensor], notes: dict[str, str]
                   ) -> dict[str, FactorSensitivity]:
    if not sens:
        return {}
    between = float(sens["between"].mean())
    if between <= 0:
        notes["sensitivity"] = "needs two different images in a batch to scale the distances"
        return {}
    return {factor: FactorSensitivity(encoder=float(v[:, 0].mean()) / between,
                                      predictor=float(v[:, 1].mean()) / between,
                                      alignment=float(v[:, 2].mean()))
            for factor, v in sens.items() if factor != "between"}


def _summarise(ranks: dict[str, Tensor | None], notes: dict[str, str], bank_size: int,
               distance: str, sens: dict[str, Tensor]) -> MRRResult:
    order = ["all", *FACTORS, *DESTRUCTIVE_OPS]
    names = [name for name in order if name in ranks and name != "all"]
    per = {name: None if (r := ranks[name]) is None else float(r.mean()) for name in names}
    per_err = {name: None if (r := ranks[name]) is None else _stderr(r) for name in names}
    all_ranks = ranks["all"]
    assert all_ranks is not None
    return MRRResult(mrr=float(all_ranks.mean()), stderr=_stderr(all_ranks), bank=bank_size,
                     n_images=all_ranks.numel(), distance=distance, per_transform=per,
                     per_transform_stderr=per_err, notes=notes,
                     sensitivity=_sensitivities(sens, notes))


def _stderr(reciprocal_ranks: Tensor) -> float | None:
    n = reciprocal_ranks.numel()
    return float(reciprocal_ranks.float().std()) / math.sqrt(n) if n > 1 else None


def evaluate_mrr(model: IWM, view_sampler: ViewSampler, images: Tensor, mask_generator: MaskFn,
                 bank_size: int = 256, distance: str = "cosine",
                 generator: torch.Generator | None = None, chunk_size: int = 512,
                 normalize: Callable[[Tensor], Tensor] | None = None,
                 per_transform: bool = True) -> MRRResult:
    """MRR of ``model``'s predictor on ``images`` (B, C, H, W) float in [0, 1].

    ``view_sampler`` supplies the run's view preset, channel count and blur kernel;
    ``mask_generator(batch, generator, device)`` the masks (e.g. a
    :class:`~iwm.data.masks.MultiBlockMaskGenerator`); ``normalize`` maps [0, 1] images to
    the model's input (the run's :class:`~iwm.data.normalize.Normalizer`; identity if None);
    ``generator`` defaults to a CPU generator seeded 0. ``chunk_size`` bank views are
    encoded per target-encoder call. The model is put in eval mode for the call and
    restored afterwards. The protocol is in docs/evaluation.md.
    """
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    was_training = model.training
    model.eval()
    try:
        ranks, notes, sens = _reciprocal_ranks(model, view_sampler, images, mask_generator,
                                               bank_size, distance, generator, chunk_size,
                                               normalize, per_transform)
    finally:
        model.train(was_training)
    return _summarise(ranks, notes, bank_size, distance, sens)


def protocol_masks(grid: tuple[int, int], cfg: MaskConfig, context: str = "own"
                   ) -> MultiBlockMaskGenerator:
    """The protocol's masks: the run's multi-block masks with one pass per block, whatever
    the run trained with, so that every run is asked the same question; ``context`` is one
    of :data:`MRR_CONTEXTS`."""
    if context not in MRR_CONTEXTS:
        raise ValueError(f"context={context!r}: must be one of {', '.join(MRR_CONTEXTS)}")
    return MultiBlockMaskGenerator(grid, dataclasses.replace(
        cfg, predictor_pass="per_block", context_tokens="thin" if context == "batch-min"
        else "pad"))


def run_mrr(run_dir: Path, n_images: int = 256, bank_size: int = 256, distance: str = "cosine",
            device: str = "auto", seed: int = 0, batch_size: int = 64, chunk_size: int = 512,
            per_transform: bool = True, context: str = "own", progress: bool = True) -> dict:
    """MRR of a trained run on its data set's first ``n_images`` test images (centre views).

    Writes and returns ``RUN/results/mrr.json`` (the returned dict also has ``path``).
    ``batch_size`` images share one draw of masks; their banks are encoded ``chunk_size``
    views at a time, with :func:`protocol_masks`. ``progress``: see :mod:`iwm.console`.
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
