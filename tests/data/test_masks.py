"""Tests for iwm.data.masks: multi-block masks, their statistics and their index form."""

from __future__ import annotations

import math

import pytest
import torch

from iwm.config import MaskConfig
from iwm.data.masks import Masks, MultiBlockMaskSampler
from iwm.errors import ConfigError

GRIDS = [(14, 14), (8, 12)]


def _gen(grid: tuple[int, int] = (14, 14), **kw) -> MultiBlockMaskSampler:
    return MultiBlockMaskSampler(grid, MaskConfig(**kw))


def _rng(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _geometry(blocks: torch.Tensor, grid: tuple[int, int]) -> tuple[torch.Tensor, ...]:
    """Rows and columns spanned by (..., N) block masks, and whether each is a rectangle.

    Returns h, w, size, rectangular; rectangular means the block is exactly the product of
    a cyclic interval of rows and one of columns (a possibly wrapped h x w rectangle).
    """
    height, width = grid
    cells = blocks.unflatten(-1, (height, width))
    rows, cols = cells.any(-1), cells.any(-2)
    h, w, size = rows.sum(-1), cols.sum(-1), blocks.sum(-1)

    def cyclic_interval(line: torch.Tensor) -> torch.Tensor:
        # An interval on a circle has at most two places where membership changes.
        changes = (line != line.roll(1, dims=-1)).sum(-1)
        return changes <= 2

    rect = (size == h * w) & cyclic_interval(rows) & cyclic_interval(cols)
    return h, w, size, rect


def _relative_spread(counts: torch.Tensor) -> float:
    counts = counts.double()
    return ((counts / counts.mean()) - 1).abs().max().item()


# ------------------------------------------------------------------ coverage


@pytest.mark.parametrize("grid", GRIDS)
def test_wrapped_blocks_cover_every_patch_equally(grid):
    gen = _gen(grid)
    context, targets = gen.sample_boolean(12_000, _rng(1))
    per_block = targets.sum((0, 1))
    union = targets.any(1).sum(0)
    ctx = context.sum(0)
    # The worst patch of 196 strays by 4% at most over 20 seeds; an off-by-one corner range
    # misses border patches by about 15%, in-bounds placement by up to 80%.
    assert per_block.min() > 0
    assert _relative_spread(per_block) < 0.06
    assert _relative_spread(union) < 0.06
    assert _relative_spread(ctx) < 0.06


def test_coverage_stays_uniform_under_heavy_rejection():
    # min_context=0.45 rejects about 60% of draws; rejection is shift-invariant on the torus.
    gen = _gen(min_context=0.45)
    context, targets = gen.sample_boolean(12_000, _rng(2))
    assert (context.sum(1) >= gen.min_context_patches).all()
    assert _relative_spread(targets.sum((0, 1))) < 0.06
    assert _relative_spread(context.sum(0)) < 0.06


@pytest.mark.parametrize("grid", GRIDS)
def test_in_bounds_placement_reaches_last_row_and_column(grid):
    height, width = grid
    gen = _gen(grid, wrap=False)
    context, targets = gen.sample_boolean(4000, _rng(3))
    cells = targets.sum((0, 1)).unflatten(0, grid)
    assert (cells[-1, :] > 0).all() and (cells[:, -1] > 0).all()
    assert (cells[0, :] > 0).all() and (cells[:, 0] > 0).all()
    ctx = context.sum(0).unflatten(0, grid)
    assert (ctx[-1, :] > 0).all() and (ctx[:, -1] > 0).all()
    # In-bounds blocks never wrap: their rows and columns are ordinary intervals.
    rows = targets.unflatten(-1, grid).any(-1)
    first = rows.float().argmax(-1)
    assert (first + rows.sum(-1) <= height).all()
    cols = targets.unflatten(-1, grid).any(-2)
    assert (cols.float().argmax(-1) + cols.sum(-1) <= width).all()
    # ... and, as docs/masks.md explains, cannot cover the border as often as the
    # centre: the coverage check above does detect non-uniform placement.
    assert cells[0, 0] < 0.5 * cells[height // 2, width // 2]


def test_wrapped_blocks_do_cross_edges():
    _, targets = _gen().sample_boolean(500, _rng(4))
    rows = targets.unflatten(-1, (14, 14)).any(-1)
    crossing = rows[..., 0] & rows[..., -1] & ~rows.all(-1)
    assert crossing.any()


# ------------------------------------------------------------------ block sizes


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("wrap", [True, False])
def test_target_blocks_are_rectangles_of_the_configured_size(grid, wrap):
    cfg = MaskConfig(wrap=wrap)
    n = grid[0] * grid[1]
    _, targets = MultiBlockMaskSampler(grid, cfg).sample_boolean(2000, _rng(5))
    h, w, size, rect = _geometry(targets, grid)
    assert rect.all()
    assert (h >= 1).all() and (h <= grid[0]).all() and (w >= 1).all() and (w <= grid[1]).all()
    hf, wf = h.double(), w.double()
    (s_lo, s_hi), (a_lo, a_hi) = cfg.target_scale, cfg.target_aspect
    # Up to rounding: some real h', w' within 0.5 of h, w have scale and aspect in range.
    assert ((hf - 0.5) * (wf - 0.5) <= s_hi * n + 1e-9).all()
    assert ((hf + 0.5) * (wf + 0.5) >= s_lo * n - 1e-9).all()
    assert ((hf - 0.5) / (wf + 0.5) <= a_hi + 1e-9).all()
    assert ((hf + 0.5) / (wf - 0.5) >= a_lo - 1e-9).all()


def test_block_sizes_vary_within_a_batch_and_within_a_sample():
    cfg = MaskConfig()
    _, targets = MultiBlockMaskSampler((14, 14), cfg).sample_boolean(256, _rng(6))
    h, w, size, _ = _geometry(targets, (14, 14))
    scale = size.double() / 196
    lo, hi = cfg.target_scale
    # One size per batch (the official code) would give a single value here.
    assert len(set(zip(h.flatten().tolist(), w.flatten().tolist(), strict=True))) >= 5
    assert scale.min() <= lo + 0.2 * (hi - lo) and scale.max() >= hi - 0.2 * (hi - lo)
    aspect = (h.double() / w.double()).log()
    assert aspect.min() < 0 < aspect.max()
    # Each block of a sample draws its own size.
    distinct = ((h != h[:, :1]) | (w != w[:, :1])).any(1)
    assert distinct.float().mean() > 0.8


@pytest.mark.parametrize("wrap", [True, False])
def test_per_batch_sizes_are_shared_by_the_batch_and_drawn_afresh_per_batch(wrap):
    cfg = MaskConfig(block_sizes="per_batch", wrap=wrap, min_context=0.3,
                     predictor_pass="per_block")
    gen = MultiBlockMaskSampler((14, 14), cfg)
    draws, real_draw = [], gen._draw

    def counting_draw(n, *args):
        draws.append(n)
        return real_draw(n, *args)

    gen._draw = counting_draw
    rng, shapes = _rng(7), set()
    for _ in range(40):
        context, targets = gen.sample_boolean(64, rng)
        h, w, size, rect = _geometry(targets, (14, 14))
        # min_context=0.3 rejects some samples; their redraws keep the batch's sizes.
        assert rect.all() and (h == h[0, 0]).all() and (w == w[0, 0]).all()
        assert (context.sum(1) >= gen.min_context_patches).all()
        shapes.add((int(h[0, 0]), int(w[0, 0])))
        masks = gen.to_masks(context, targets, rng)
        assert masks.target_valid.all()  # equal blocks: no padding
    assert len(draws) > 40  # some batches had rows redrawn
    assert len(shapes) >= 5  # a new size each batch, from the per-block distribution
    lo, hi = cfg.target_scale
    assert all(lo * 196 - 14 <= a * b <= hi * 196 + 14 for a, b in shapes)


def test_per_batch_draws_the_same_sizes_as_per_block_would():
    # The one size of a batch comes from the per-block distribution: over many batches
    # the sizes' mean and spread match per-block sampling's.
    sizes = {}
    for mode in ("per_block", "per_batch"):
        gen = MultiBlockMaskSampler((14, 14), MaskConfig(block_sizes=mode))
        rng = _rng(8)
        sizes[mode] = torch.cat([gen.sample_boolean(4, rng)[1].sum(-1).flatten()
                                 for _ in range(800)]).double()
    mean, std = sizes["per_block"].mean().item(), sizes["per_block"].std().item()
    assert sizes["per_batch"].mean().item() == pytest.approx(mean, rel=0.03)
    assert sizes["per_batch"].std().item() == pytest.approx(std, rel=0.15)


def test_scale_uniform_aspect_log_uniform_and_independent():
    # A fine grid makes rounding negligible, so the realised sizes show the drawn laws.
    grid = (64, 64)
    cfg = MaskConfig(target_scale=(0.1, 0.3), target_aspect=(0.5, 3.0))
    _, targets = MultiBlockMaskSampler(grid, cfg).sample_boolean(1000, _rng(7))
    h, w, size, _ = _geometry(targets, grid)
    scale = (size.double() / (64 * 64)).flatten()
    log_aspect = (h.double() / w.double()).log().flatten()

    def ks_uniform(x: torch.Tensor, lo: float, hi: float) -> float:
        x = x.sort().values
        cdf = torch.arange(1, len(x) + 1, dtype=x.dtype) / len(x)
        return (cdf - ((x - lo) / (hi - lo)).clamp(0, 1)).abs().max().item()

    assert ks_uniform(scale, 0.1, 0.3) < 0.05
    assert ks_uniform(log_aspect, math.log(0.5), math.log(3.0)) < 0.05
    # Uniform (not log-uniform) aspect would put 20% below aspect 1, log-uniform puts 39%.
    assert abs((log_aspect < 0).double().mean().item() - math.log(2) / math.log(6)) < 0.04
    # One shared random number for scale and aspect would make this correlation near 1.
    corr = torch.corrcoef(torch.stack([scale, log_aspect]))[0, 1].item()
    assert abs(corr) < 0.06


def test_scale_and_aspect_uncorrelated_on_default_grid():
    _, targets = _gen().sample_boolean(4000, _rng(8))
    h, w, size, _ = _geometry(targets, (14, 14))
    corr = torch.corrcoef(torch.stack([size.double().flatten(),
                                       (h.double() / w.double()).log().flatten()]))[0, 1]
    assert abs(corr.item()) < 0.1


@pytest.mark.parametrize("grid", GRIDS)
def test_context_block_has_the_grid_shape_and_configured_scale(grid):
    height, width = grid
    # Single-patch targets barely dent the context block, so its rows and columns show.
    gen = _gen(grid, target_scale=(1e-9, 1e-9), context_scale=(0.5, 1.0), min_context=0.0)
    context, targets = gen.sample_boolean(1000, _rng(9))
    assert targets.sum(-1).eq(1).all()
    h, w, size, _ = _geometry(context, grid)
    assert (size <= h * w).all() and (size >= h * w - 4).all()
    scale = (h * w).double() / (height * width)
    assert scale.max() == 1.0 and scale.min() < 0.55
    assert ((h.double() + 0.5) * (w.double() + 0.5) >= 0.5 * height * width).all()
    # Same shape as the grid (aspect 1 on a square grid), up to rounding.
    assert ((h / height - w / width).abs() <= 0.5 / height + 0.5 / width + 1e-9).all()


# ------------------------------------------------------------------ context


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("min_context", [0.1, 0.45])
def test_context_is_disjoint_from_targets_and_large_enough(grid, min_context):
    gen = _gen(grid, min_context=min_context)
    context, targets = gen.sample_boolean(512, _rng(10))
    assert not (context[:, None, :] & targets).any()
    need = max(1, math.ceil(min_context * grid[0] * grid[1]))
    assert gen.min_context_patches == need
    assert (context.sum(1) >= need).all()


def test_impossible_config_raises_instead_of_looping():
    gen = _gen(target_scale=(0.9, 1.0), min_context=0.5)
    with pytest.raises(ConfigError, match="min_context"):
        gen(64, _rng())


def test_config_that_can_never_fit_the_context_fails_at_construction():
    with pytest.raises(ConfigError, match="context_scale"):
        _gen(context_scale=(0.05, 0.1), min_context=0.5)


@pytest.mark.parametrize(
    "kw",
    [
        {"num_targets": 0},
        {"target_scale": (0.0, 0.2)},
        {"target_scale": (0.3, 0.2)},
        {"context_scale": (0.85, 1.5)},
        {"target_aspect": (0.0, 1.5)},
        {"target_aspect": (2.0, 1.0)},
        {"min_context": 1.0},
        {"block_sizes": "per_sample"},
        {"context_tokens": "crop"},
        {"predictor_pass": "all"},
    ],
)
def test_bad_ranges_raise_config_error(kw):
    with pytest.raises(ConfigError, match="mask."):
        _gen(**kw)


# ------------------------------------------------------------------ index form


@pytest.mark.parametrize("grid", GRIDS)
def test_index_form_matches_boolean_masks(grid):
    n = grid[0] * grid[1]
    gen = _gen(grid, predictor_pass="per_block")
    context, targets = gen.sample_boolean(256, _rng(11))
    masks = gen.to_masks(context, targets, _rng(12))
    batch, num_targets = targets.shape[:2]

    # Each image keeps its whole context, padded to the batch's largest.
    counts = context.sum(1)
    assert masks.context.dtype == torch.long and masks.context_valid.dtype == torch.bool
    assert masks.context.shape == masks.context_valid.shape == (batch, int(counts.max()))
    assert torch.equal(masks.context_valid.sum(1), counts)
    assert context.gather(1, masks.context).all()  # padding too is the image's own context
    kept = torch.zeros_like(context, dtype=torch.long)
    kept.scatter_add_(1, masks.context, masks.context_valid.long())
    assert torch.equal(kept, context.long())
    assert torch.equal(masks.context_valid, masks.context_valid.cummin(-1).values)
    assert counts.min() < counts.max()  # the test covers padding

    sizes = targets.sum(-1)
    kt = int(sizes.max())
    assert masks.targets.dtype == torch.long and masks.target_valid.dtype == torch.bool
    assert masks.targets.shape == masks.target_valid.shape == (batch, num_targets, kt)
    assert (masks.targets >= 0).all() and (masks.targets < n).all()
    assert torch.equal(masks.target_valid.sum(-1), sizes)
    # Every entry, padding included, is a patch of its own block.
    assert targets.gather(-1, masks.targets).all()
    # The valid entries are exactly the block, each once.
    rebuilt = torch.zeros(batch, num_targets, n, dtype=torch.long)
    rebuilt.scatter_add_(-1, masks.targets, masks.target_valid.long())
    assert torch.equal(rebuilt, targets.long())
    # Valid entries come first, so a block's size is also where its padding starts.
    assert torch.equal(masks.target_valid, masks.target_valid.cummin(-1).values)


def test_thinned_context_keeps_the_batch_minimum():
    gen = _gen(context_tokens="thin")
    context, targets = gen.sample_boolean(256, _rng(11))
    masks = gen.to_masks(context, targets, _rng(12))
    assert masks.context.shape == (256, int(context.sum(1).min()))
    assert masks.context_valid.all()
    assert (masks.context.diff(dim=1) > 0).all()  # unique per sample
    assert context.gather(1, masks.context).all()


def test_union_pass_predicts_each_target_patch_once():
    gen = _gen()  # predictor_pass="union" by default
    context, targets = gen.sample_boolean(128, _rng(11))
    masks = gen.to_masks(context, targets, _rng(12))
    union = targets.any(1)
    assert masks.targets.shape[1] == 1
    rebuilt = torch.zeros_like(union, dtype=torch.long)
    rebuilt.scatter_add_(1, masks.targets[:, 0], masks.target_valid[:, 0].long())
    assert torch.equal(rebuilt, union.long())
    # Never a context patch: the context is the context block minus every target.
    assert not (context & union).any()


def test_call_is_sample_boolean_then_to_masks():
    gen = _gen()
    masks = gen(32, _rng(13))
    g = _rng(13)
    context, targets = gen.sample_boolean(32, g)
    expected = gen.to_masks(context, targets, g)
    for name in ("context", "targets", "target_valid"):
        assert torch.equal(getattr(masks, name), getattr(expected, name))


def test_context_subset_is_random_not_a_crop():
    gen = _gen(min_context=0.0, context_tokens="thin")
    context, targets = gen.sample_boolean(2000, _rng(14))
    masks = gen.to_masks(context, targets, _rng(15))
    kept = torch.zeros_like(context).scatter_(1, masks.context, True)
    # Per patch: how often it is kept when it is in the context. A random subset keeps each
    # context patch with the same chance; keeping the first Kc would favour the top rows.
    avail = context.sum(0).double()
    rate = kept.sum(0).double() / avail
    top, bottom = rate[:98][avail[:98] > 0].mean(), rate[98:][avail[98:] > 0].mean()
    assert abs(top / bottom - 1) < 0.05


def test_same_seed_same_masks_and_different_seed_different_masks():
    gen = _gen()
    a, b, c = gen(64, _rng(16)), gen(64, _rng(16)), gen(64, _rng(17))
    for name in ("context", "context_valid", "targets", "target_valid"):
        assert torch.equal(getattr(a, name), getattr(b, name))
    assert not torch.equal(a.targets, c.targets) or not torch.equal(a.context, c.context)


def test_masks_to_moves_every_tensor():
    masks = _gen()(4, _rng())
    moved = masks.to("meta")
    assert isinstance(moved, Masks)
    assert all(t.device.type == "meta" for t in (moved.context, moved.context_valid,
                                                  moved.targets, moved.target_valid))
    same = masks.to("cpu")
    assert torch.equal(same.context, masks.context)


def test_batch_size_must_be_positive():
    with pytest.raises(ValueError, match="batch_size"):
        _gen()(0, _rng())


@pytest.mark.cuda
def test_cpu_generator_feeds_cuda_masks_identically():
    gen = _gen()
    on_cpu = gen(16, _rng(18))
    on_gpu = gen(16, _rng(18), device="cuda")
    assert on_gpu.context.is_cuda and on_gpu.targets.is_cuda
    assert torch.equal(on_gpu.to("cpu").targets, on_cpu.targets)
    assert torch.equal(on_gpu.to("cpu").context, on_cpu.context)
