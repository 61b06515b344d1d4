"""The world model as a user asks it: ``iwm eval api-check RUN``.

:mod:`iwm.evaluation.mrr` measures the predictor the way it was trained (masked context,
one target block, the internal jitter sampler and action builder). This check asks the
same question through the public API only, the way the README shows it, so that a break
anywhere on that path (``iwm.Action`` -> action vector, ``Pretrained.encode`` /
``apply`` with every token as context, the normalisation, torchvision's semantics of the
factors) shows up as a low score even when the internal evaluation is fine. The protocol
(bank, query, score, rank, per-factor banks) is in docs/evaluation.md, "The world model
as a user asks it".
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torchvision.transforms.v2.functional as TF
from torch import Tensor

from iwm.api import Action, Pretrained, _pooled_direction
from iwm.data.factors import JITTER_FACTORS, acts_on
from iwm.data.views import STRENGTHS, jitter_ranges
from iwm.evaluation.ranking import chance_mrr, ranks_from_scores, reciprocal_rank_stderr
from iwm.evaluation.results import write_result

__all__ = ["RANGES", "ApiCheckResult", "render", "run_api_check", "sample_jitters",
           "world_model_api_check"]

# Uniform ranges of the jitters (hue in turns): the 'jitter' preset's, i.e. the paper's
# default ColorJitter, which every IWM preset's ranges contain, so no question is out of
# the distribution the predictor was trained on.
RANGES: dict[str, tuple[float, float]] = jitter_ranges(STRENGTHS["jitter"])
RESULT_NAME = "api_check"


@dataclass
class ApiCheckResult:
    """MRR through the public API, with the standard errors of the means over images
    (``None`` for one image); ``per_factor`` values are ``None`` where not meaningful (the
    reason is in ``notes``)."""

    mrr: float
    stderr: float | None
    bank: int
    n_images: int
    chance: float
    per_factor: dict[str, float | None]
    per_factor_stderr: dict[str, float | None]
    notes: dict[str, str] = field(default_factory=dict)


def render(images: Tensor, action: Action) -> Tensor:
    """``images`` (B, C, H, W) float in [0, 1] under the jitter ``action`` describes,
    with torchvision's functional ops in the order the action means (brightness,
    contrast, saturation, hue); its source-side fields must be at the identity."""
    if action.grayscale or action.blur_sigma > 0 or action.solarize:
        raise ValueError(f"render: {action} has a source-side op; only jitters are rendered")
    out = TF.adjust_brightness(images, action.brightness)
    out = TF.adjust_contrast(out, action.contrast)
    out = TF.adjust_saturation(out, action.saturation)  # identity on 1 channel (torchvision)
    # Hue 0 is the identity; skipped because torchvision's RGB -> HSV -> RGB round trip
    # would still move pixels by rounding, which is not part of the transformation.
    return TF.adjust_hue(out, action.hue) if action.hue != 0 else out


def sample_jitters(k: int, factors: tuple[str, ...], generator: torch.Generator) -> list[Action]:
    """``k`` actions whose ``factors`` are uniform in :data:`RANGES`, the rest identity."""
    columns = {}
    for name in factors:
        lo, hi = RANGES[name]
        u = torch.rand(k, generator=generator, dtype=torch.float64)
        columns[name] = (lo + (hi - lo) * u).tolist()
    return [Action(**{name: values[j] for name, values in columns.items()}) for j in range(k)]


def _check_inputs(pretrained: Pretrained, images: Tensor, k: int) -> None:
    if k < 2:
        raise ValueError(f"k={k}: a ranking needs at least 2 bank entries")
    c, s = pretrained.in_chans, pretrained.image_size
    if c not in (1, 3):  # torchvision's colour ops know grey and RGB only
        raise ValueError(f"the model takes {c}-channel images: the check needs 1 or 3")
    if images.ndim != 4 or tuple(images.shape[1:]) != (c, s, s) or not len(images):
        raise ValueError(f"expected images (B, {c}, {s}, {s}) with B >= 1 (the model's "
                         f"channels and image size), got {tuple(images.shape)}")


def _reciprocal_ranks(pretrained: Pretrained, images: Tensor, bank: list[Action],
                      generator: torch.Generator) -> Tensor:
    """1/rank (B,) of each image's true entry of ``bank`` (docs/evaluation.md)."""
    b, k = images.shape[0], len(bank)
    # Unit vectors (B, k, D) of the bank; pooled at once so no (B, k, N, D) is ever held.
    keys = torch.stack([_pooled_direction(pretrained.encode(render(images, a)), "bank")
                        for a in bank], 1)
    true_index = torch.randint(k, (b,), generator=generator)
    # iwm.Action holds one scalar per field: each row is one Action's vector, and apply
    # takes the (B, ACTION_DIM) stack, so the whole batch is one predictor call.
    vectors = torch.cat([a.to_tensor(1, pretrained.device) for a in bank])
    pred = pretrained.apply(pretrained.encode(images), vectors[true_index.to(vectors.device)])
    query = _pooled_direction(pred, "pred")
    # -|q - key|^2 = 2 cos - 2 for unit vectors: ranks as the cosine does, but resolves
    # near-1 cosines that a float32 dot product would round into ties (as mrr.py does).
    scores = -(query.unsqueeze(1) - keys.to(query.device)).pow(2).sum(-1)
    return 1.0 / ranks_from_scores(scores.cpu(), true_index).float()


@torch.no_grad()
def _all_reciprocal_ranks(pretrained: Pretrained, images: Tensor, k: int,
                          generator: torch.Generator,
                          ) -> tuple[dict[str, Tensor | None], dict[str, str]]:
    """Reciprocal ranks (B,) for "all" and each factor (None = not meaningful), and notes."""
    _check_inputs(pretrained, images, k)
    # The API's own conversion (uint8 -> [0, 1], range check), as encode applies it.
    images = pretrained.check_images(images).to(device=pretrained.device, dtype=torch.float32)
    varied = tuple(f for f in JITTER_FACTORS if acts_on(f, images.shape[1]))
    ranks: dict[str, Tensor | None] = {
        "all": _reciprocal_ranks(pretrained, images, sample_jitters(k, varied, generator),
                                 generator)}
    notes: dict[str, str] = {}
    for factor in JITTER_FACTORS:
        if factor not in varied:
            ranks[factor] = None
            notes[factor] = "no-op on 1-channel images"
            continue
        ranks[factor] = _reciprocal_ranks(pretrained, images,
                                          sample_jitters(k, (factor,), generator), generator)
    return ranks, notes


def _summarise(ranks: dict[str, Tensor | None], notes: dict[str, str],
               k: int) -> ApiCheckResult:
    overall = ranks["all"]
    assert overall is not None
    per = {f: None if (r := ranks[f]) is None else float(r.mean()) for f in JITTER_FACTORS}
    per_err = {f: None if (r := ranks[f]) is None else reciprocal_rank_stderr(r)
               for f in JITTER_FACTORS}
    return ApiCheckResult(mrr=float(overall.mean()), stderr=reciprocal_rank_stderr(overall),
                          bank=k, n_images=overall.numel(), chance=chance_mrr(k),
                          per_factor=per, per_factor_stderr=per_err, notes=notes)


def world_model_api_check(pretrained: Pretrained, images: Tensor, k: int = 64,
                          generator: torch.Generator | None = None) -> ApiCheckResult:
    """MRR of ``pretrained``'s world model on ``images`` (B, C, H, W), float in [0, 1] or
    uint8, at the model's channels and image size, asked only through the public API
    (docs/evaluation.md). ``generator`` defaults to a CPU generator seeded 0."""
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    ranks, notes = _all_reciprocal_ranks(pretrained, images, k, generator)
    return _summarise(ranks, notes, k)


def run_api_check(run_dir: Path, n_images: int = 256, k: int = 64, seed: int = 0,
                  device: str = "auto", batch_size: int = 64, progress: bool = True,
                  bf16: bool = False) -> dict:
    """:func:`world_model_api_check` of a run on its data set's first ``n_images`` test
    images (centre views, as :func:`~iwm.evaluation.mrr.run_mrr` takes them), each
    ``batch_size`` of them with a bank of its own. Writes and returns
    ``RUN/results/api_check.json`` (the returned dict also has ``path``); ``progress``: see
    :mod:`iwm.console`; ``bf16`` runs the model under bf16 autocast."""
    import iwm
    from iwm.data.datasets import get_dataset
    from iwm.data.sources import tracked_eval_batches
    from iwm.training.distributed import resolve_device

    if n_images < 1 or batch_size < 1:
        raise ValueError(f"n_images={n_images}, batch_size={batch_size}: must be at least 1")
    if k < 2:  # before loading anything
        raise ValueError(f"k={k}: a ranking needs at least 2 bank entries")
    start = time.perf_counter()
    dev = resolve_device(device)
    pretrained = iwm.load(run_dir, device=dev)
    cfg = pretrained.config
    dataset = get_dataset(cfg.data.name, "test", cfg.data.root, holdout=cfg.data.holdout)
    # On the CPU so the jitters and true indices do not depend on the device.
    generator = torch.Generator().manual_seed(seed)
    collected: dict[str, list[Tensor]] = {}
    notes: dict[str, str] = {}
    for images, _ in tracked_eval_batches(dataset, batch_size, cfg.data.image_size, dev,
                                          "eval api-check", limit=n_images,
                                          progress=progress):
        # Rendering is elementwise, so autocast leaves it fp32; only the model runs bf16.
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
            ranks, batch_notes = _all_reciprocal_ranks(pretrained, images, k, generator)
        notes.update(batch_notes)
        for name, rr in ranks.items():
            collected.setdefault(name, []).extend([] if rr is None else [rr])
    if not collected:
        raise ValueError(f"{cfg.data.name}: the test split has no images")
    ranks_all = {name: torch.cat(parts) if parts else None for name, parts in collected.items()}
    result = _summarise(ranks_all, notes, k)
    varied = {f: RANGES[f] for f in JITTER_FACTORS if result.per_factor[f] is not None}
    out = {**dataclasses.asdict(result), "ranges": varied, "seed": seed,
           "bf16": bf16, "step": pretrained.step, "seconds": time.perf_counter() - start}
    path = write_result(run_dir, RESULT_NAME, out)
    return {**out, "path": str(path)}
