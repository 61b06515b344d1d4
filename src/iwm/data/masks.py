"""I-JEPA multi-block masks, sampled for a whole batch at once with tensor ops.

For each image, ``cfg.num_targets`` target blocks and one context block are drawn on the
``H x W`` patch grid; the context is the context block minus the union of the targets.
Patches are numbered row-major (``index = row * W + col``), the order a ViT flattens them.
How sizes are drawn, blocks placed (on a torus by default), too-small contexts redrawn
and batches padded is in docs/masks.md. All random numbers come from the
``torch.Generator`` passed in, so a seed fixes the masks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
from torch import Tensor

from iwm.config import MaskConfig
from iwm.errors import ConfigError

__all__ = ["Masks", "MultiBlockMaskSampler", "to_device"]

#: Redraw rounds before a config is declared unable to meet ``min_context``. Each round
#: redraws only the still-failing samples, so a config accepted with probability p per
#: draw fails a sample only with probability (1 - p) ** MAX_REDRAWS.
MAX_REDRAWS = 100


@dataclass
class Masks:
    """A batch of multi-block masks as patch indices (row-major into the ``H x W`` grid).

    ``context``: (B, Kc) long, the valid entries ascending and unique per sample.
    ``context_valid``: (B, Kc) bool, False on padding (which repeats a valid index of the
    same sample's context).
    ``targets``: (B, T, Kt) long, each block's indices ascending, Kt = largest block.
    ``target_valid``: (B, T, Kt) bool, False on padding (which repeats a valid index of the
    same block).
    """

    context: Tensor
    context_valid: Tensor
    targets: Tensor
    target_valid: Tensor

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Masks:
        """On ``device``, each tensor moved by :func:`to_device`."""
        return Masks(**{f.name: to_device(getattr(self, f.name), device, non_blocking)
                        for f in fields(self)})


def to_device(t: Tensor, device: torch.device | str, non_blocking: bool = False) -> Tensor:
    """``t`` on ``device``. ``non_blocking`` from the CPU to a GPU goes through pinned
    memory, so the copy is queued on the stream like a kernel: from pageable memory it
    would still hold up the host (masks are drawn on the CPU while the GPU runs)."""
    pin = non_blocking and t.device.type == "cpu" and torch.device(device).type == "cuda"
    return (t.pin_memory() if pin else t).to(device, non_blocking=non_blocking)


class MultiBlockMaskSampler:
    """Samples I-JEPA context/target masks on a ``grid = (H, W)`` patch grid (docs/masks.md)."""

    def __init__(self, grid: tuple[int, int], cfg: MaskConfig) -> None:
        height, width = (int(v) for v in grid)
        if height < 1 or width < 1:
            raise ConfigError(f"mask grid {grid}: needs at least one patch in each direction")
        self.grid = (height, width)
        self.cfg = cfg
        self.num_patches = height * width
        self.min_context_patches = max(1, math.ceil(cfg.min_context * self.num_patches))
        # Fail at construction when even the largest context block is too small: no amount
        # of redrawing could help, and the message can say exactly why.
        h_max, w_max = self._context_size(torch.tensor(cfg.context_scale[1]))
        biggest = int(h_max) * int(w_max)
        if biggest < self.min_context_patches:
            raise ConfigError(
                f"mask.context_scale={list(cfg.context_scale)} gives a context block of at most "
                f"{biggest} of {self.num_patches} patches on a {height}x{width} grid, fewer "
                f"than mask.min_context={cfg.min_context} requires "
                f"({self.min_context_patches}): raise context_scale or lower min_context"
            )

    # ---------------------------------------------------------------- public API

    def sample_boolean(
        self, batch_size: int, generator: torch.Generator, device: torch.device | str = "cpu"
    ) -> tuple[Tensor, Tensor]:
        """Raw block masks: context (B, N) bool and targets (B, T, N) bool, row-major."""
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size}: must be at least 1")
        device = torch.device(device)
        # per_batch: the sizes are drawn once and kept by every redraw below, so the whole
        # batch shares them; only the failing rows' positions are drawn again.
        sizes = (self._batch_sizes(generator, device) if self.cfg.block_sizes == "per_batch"
                 else None)
        context, targets = self._draw(batch_size, generator, device, sizes)
        failing = context.sum(1) < self.min_context_patches
        # Kept as a tensor so the usual path syncs with an accelerator once per round only.
        draws, rejected = batch_size, failing.sum()
        for _ in range(MAX_REDRAWS):
            if not failing.any():
                return context, targets
            rows = failing.nonzero().squeeze(1)
            new_context, new_targets = self._draw(rows.numel(), generator, device, sizes)
            context[rows] = new_context
            targets[rows] = new_targets
            still = new_context.sum(1) < self.min_context_patches
            failing[rows] = still
            draws += rows.numel()
            rejected = rejected + still.sum()
        if not failing.any():
            return context, targets
        cfg = self.cfg
        raise ConfigError(
            f"mask: after {MAX_REDRAWS} redraws {int(failing.sum())} of {batch_size} samples "
            f"still had fewer than {self.min_context_patches} of {self.num_patches} context "
            f"patches (mask.min_context={cfg.min_context}); only {draws - int(rejected)} of "
            f"{draws} draws met it. The targets (num_targets={cfg.num_targets}, "
            f"target_scale={list(cfg.target_scale)}) leave too little of the context block "
            f"(context_scale={list(cfg.context_scale)}): lower mask.num_targets, "
            f"mask.target_scale or mask.min_context, or raise mask.context_scale"
        )

    def to_masks(self, context: Tensor, targets: Tensor, generator: torch.Generator) -> Masks:
        """Convert boolean masks (as from :meth:`sample_boolean`) to index form.

        The generator picks which context patches to keep when contexts are thinned.
        """
        if self.cfg.context_tokens == "thin":
            counts = context.sum(1)
            keep = int(counts.min())
            # Context patches score in [1, 2), the rest in [0, 1): the top Kc scores are a
            # uniformly random Kc-subset of the context.
            noise = torch.rand(context.shape, generator=generator,
                               device=generator.device).to(context.device)
            score = context.to(noise.dtype) + noise
            ctx_idx = score.topk(keep, dim=1, sorted=False).indices.sort(dim=1).values
            ctx_valid = torch.ones_like(ctx_idx, dtype=torch.bool)
        else:
            ctx_idx, ctx_valid = _padded_indices(context)
        if self.cfg.predictor_pass == "union":
            targets = targets.any(1, keepdim=True)
        tgt_idx, valid = _padded_indices(targets)
        return Masks(context=ctx_idx, context_valid=ctx_valid, targets=tgt_idx,
                     target_valid=valid)

    def __call__(
        self, batch_size: int, generator: torch.Generator, device: torch.device | str = "cpu"
    ) -> Masks:
        context, targets = self.sample_boolean(batch_size, generator, device)
        return self.to_masks(context, targets, generator)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(grid={self.grid}, cfg={self.cfg})"

    # ---------------------------------------------------------------- sampling

    def _rand(self, shape: tuple[int, ...], generator: torch.Generator,
              device: torch.device) -> Tensor:
        # Drawn on the generator's device so a CPU generator can feed CUDA masks and back.
        return torch.rand(shape, generator=generator, device=generator.device).to(device)

    def _context_size(self, scale: Tensor) -> tuple[Tensor, Tensor]:
        height, width = self.grid
        side = scale.sqrt()
        h = torch.round(side * height).clamp(1, height).long()
        w = torch.round(side * width).clamp(1, width).long()
        return h, w

    def _target_size(self, u_scale: Tensor, u_aspect: Tensor) -> tuple[Tensor, Tensor]:
        height, width = self.grid
        lo, hi = self.cfg.target_scale
        area = (lo + (hi - lo) * u_scale) * self.num_patches
        log_lo, log_hi = (math.log(a) for a in self.cfg.target_aspect)
        aspect = torch.exp(log_lo + (log_hi - log_lo) * u_aspect)
        h = torch.round(torch.sqrt(area * aspect)).clamp(1, height).long()
        w = torch.round(torch.sqrt(area / aspect)).clamp(1, width).long()
        return h, w

    def _corner(self, u: Tensor, size: Tensor, extent: int) -> Tensor:
        positions = torch.full_like(size, extent) if self.cfg.wrap else extent - size + 1
        corner = torch.floor(u * positions).long()
        # u < 1, but u * positions can round up to positions in float32.
        return torch.minimum(corner, positions - 1)

    def _blocks(self, top: Tensor, left: Tensor, h: Tensor, w: Tensor) -> Tensor:
        """Boolean (..., N) masks of h x w blocks at (top, left), wrapping around the edges.

        The modular test also serves in-bounds placement, where it never wraps.
        """
        height, width = self.grid
        rows = torch.arange(height, device=top.device)
        cols = torch.arange(width, device=top.device)
        in_rows = (rows - top[..., None]) % height < h[..., None]
        in_cols = (cols - left[..., None]) % width < w[..., None]
        return (in_rows[..., :, None] & in_cols[..., None, :]).flatten(-2)

    def _batch_sizes(self, generator: torch.Generator, device: torch.device
                     ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """One target block size, (1, 1) heights and widths, and one context block size,
        (1,), from the same distributions as the per-block draws."""
        u = self._rand((1, 1, 2), generator, device)
        h, w = self._target_size(u[..., 0], u[..., 1])
        lo, hi = self.cfg.context_scale
        hc, wc = self._context_size(lo + (hi - lo) * self._rand((1,), generator, device))
        return h, w, hc, wc

    def _draw(self, n: int, generator: torch.Generator, device: torch.device,
              sizes: tuple[Tensor, Tensor, Tensor, Tensor] | None = None
              ) -> tuple[Tensor, Tensor]:
        """``n`` samples; ``sizes`` (from :meth:`_batch_sizes`) fixes the block sizes for
        all of them, else each block draws its own."""
        height, width = self.grid
        # One independent number per (sample, block, quantity): scale, aspect, top, left.
        u = self._rand((n, self.cfg.num_targets, 4), generator, device)
        uc = self._rand((n, 3), generator, device)
        if sizes is None:
            h, w = self._target_size(u[..., 0], u[..., 1])
            lo, hi = self.cfg.context_scale
            hc, wc = self._context_size(lo + (hi - lo) * uc[:, 0])
        else:
            h, w = (t.expand(n, self.cfg.num_targets) for t in sizes[:2])
            hc, wc = (t.expand(n) for t in sizes[2:])
        targets = self._blocks(
            self._corner(u[..., 2], h, height), self._corner(u[..., 3], w, width), h, w
        )
        block = self._blocks(
            self._corner(uc[:, 1], hc, height), self._corner(uc[:, 2], wc, width), hc, wc
        )
        return block & ~targets.any(1), targets


def _padded_indices(members: Tensor) -> tuple[Tensor, Tensor]:
    """Boolean (..., N) sets -> ascending indices (..., K) and validity (..., K), K = the
    largest set; padding cycles through the set's own indices, so it is always in range.
    Every set must be non-empty."""
    sizes = members.sum(-1)
    width = int(sizes.max())
    # A stable sort on "not a member" lists each set's members first, in ascending order.
    order = torch.sort((~members).to(torch.uint8), dim=-1, stable=True).indices[..., :width]
    slot = torch.arange(width, device=members.device)
    valid = slot < sizes[..., None]
    return order.gather(-1, slot % sizes[..., None]), valid
