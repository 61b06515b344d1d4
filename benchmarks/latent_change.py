"""Does the world model predict the latent change a jitter makes, token by token?

For ``--images`` test images of a run and each value of one jitter factor, the true change
is ``LN(encode(target)) - LN(encode(source))`` and the predicted change ``apply(source,
action) - apply(source, null)``, both (B, N, D) in the layer-normed target space. Printed
per value: the mean per-token cosine of the two, the norms, and the same split into the
tokens whose patch pixels the jitter leaves unchanged (at most 1/255 anywhere: a black
background a contrast increase clips at 0) and the tokens whose pixels move; then where
the residual energy along the factor is lowest, the median over images of its argmin on a
grid (the value action inference would settle on with the other factors known).

``--lift contrast=0.6`` first renders every source at that jitter (a lifted background that
no longer clips), a counterfactual that separates clipping from the factor itself.

    python benchmarks/latent_change.py runs/full/iwm-equi-tiny-s1 --factor contrast
    python benchmarks/latent_change.py RUN --factor contrast --lift contrast=0.6
    python benchmarks/latent_change.py RUN --factor brightness --json out.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

import iwm
from iwm.api import Action, Pretrained
from iwm.data.datasets import get_dataset
from iwm.data.factors import IDENTITY, JITTER_FACTORS
from iwm.data.sources import iter_eval_batches
from iwm.evaluation.api_check import render

UNCHANGED = 1 / 255
"""A patch whose pixels all move by at most this (one 8-bit level) counts as unchanged."""


def changed_patches(source: Tensor, target: Tensor, grid: tuple[int, int]) -> Tensor:
    """(B, N) bool: whether any pixel of each patch moved by more than :data:`UNCHANGED`."""
    moved = (target - source).abs().amax(1, keepdim=True)
    height, width = grid
    per_patch = F.adaptive_max_pool2d(moved, (height, width))
    return per_patch.flatten(1) > UNCHANGED


def alignment(pretrained: Pretrained, source: Tensor, target: Tensor,
              action: Action) -> dict[str, float]:
    """Cosine and norms of predicted against true latent change, all tokens and split by
    :func:`changed_patches`."""
    s_tokens, t_tokens = pretrained.encode(source), pretrained.encode(target)
    width = s_tokens.shape[-1:]
    true = F.layer_norm(t_tokens, width) - F.layer_norm(s_tokens, width)
    pred = pretrained.apply(s_tokens, action) - pretrained.apply(s_tokens, Action())
    cos = F.cosine_similarity(pred, true, dim=-1)
    moved = changed_patches(source, target, pretrained.encoder.grid).to(cos.device)
    out: dict[str, float] = {"unchanged_tokens": float((~moved).float().mean())}
    for name, where in (("all", torch.ones_like(moved)), ("unchanged", ~moved),
                        ("changed", moved)):
        if not where.any():
            out.update({f"cos_{name}": float("nan"), f"true_{name}": float("nan"),
                        f"pred_{name}": float("nan")})
            continue
        out[f"cos_{name}"] = float(cos[where].mean())
        out[f"true_{name}"] = float(true.norm(dim=-1)[where].mean())
        out[f"pred_{name}"] = float(pred.norm(dim=-1)[where].mean())
    return out


def energy_argmin(pretrained: Pretrained, source: Tensor, target: Tensor, factor: str,
                  grid: Tensor) -> float:
    """Median over images of the grid value with the lowest residual energy along
    ``factor``, the other factors at the identity (they are: only ``factor`` varies)."""
    # Through Action, which alone knows how a factor becomes the action's coordinate.
    candidates = torch.cat([Action(**{factor: float(v)}).to_tensor(1) for v in grid])
    energy = pretrained.action_energy(source, target,
                                      candidates.expand(len(source), -1, -1))
    return float(grid[energy.argmin(1).cpu()].median())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--factor", default="contrast", choices=JITTER_FACTORS)
    parser.add_argument("--values", type=float, nargs="+",
                        default=[0.6, 0.75, 0.9, 1.1, 1.25, 1.4])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--lift", default=None, metavar="FACTOR=VALUE",
                        help="render every source at this jitter first, e.g. contrast=0.6")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args()

    pretrained = iwm.load(args.run, device="cpu")
    cfg = pretrained.config
    data = get_dataset(cfg.data.name, "test", cfg.data.root, holdout=cfg.data.holdout)
    source = next(iter_eval_batches(data, args.images, cfg.data.image_size))[0]
    if args.lift:
        name, _, value = args.lift.partition("=")
        if name not in JITTER_FACTORS or not value:
            parser.error(f"--lift {args.lift!r}: expected FACTOR=VALUE, FACTOR one of "
                         f"{', '.join(JITTER_FACTORS)}")
        source = render(source, Action(**{name: float(value)})).clamp(0, 1)
    identity = IDENTITY[args.factor]
    lo, hi = min(args.values + [identity]), max(args.values + [identity])
    pad = (hi - lo) / 4
    grid = torch.linspace(max(lo - pad, 1e-3) if args.factor != "hue" else lo - pad,
                          hi + pad, 41, dtype=torch.float64)
    rows = []
    print(f"{args.run}: {args.factor}, {len(source)} images"
          + (f", sources lifted by {args.lift}" if args.lift else ""))
    print("| value | unchanged tokens | cos all | cos unchanged / changed | |true| "
          "unchanged / changed | |pred| unchanged / changed | energy argmin |")
    print("|---|---|---|---|---|---|---|")
    for value in args.values:
        action = Action(**{args.factor: value})
        target = render(source, action).clamp(0, 1)
        row = {"value": value, **alignment(pretrained, source, target, action),
               "energy_argmin": energy_argmin(pretrained, source, target, args.factor, grid)}
        rows.append(row)
        print(f"| {value:g} | {row['unchanged_tokens']:.0%} | {row['cos_all']:.2f} | "
              f"{row['cos_unchanged']:.2f} / {row['cos_changed']:.2f} | "
              f"{row['true_unchanged']:.3f} / {row['true_changed']:.3f} | "
              f"{row['pred_unchanged']:.3f} / {row['pred_changed']:.3f} | "
              f"{row['energy_argmin']:.3g} |")
    if args.json:
        args.json.write_text(json.dumps({"run": str(args.run), "factor": args.factor,
                                         "lift": args.lift, "images": len(source),
                                         "rows": rows}, indent=1))


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
