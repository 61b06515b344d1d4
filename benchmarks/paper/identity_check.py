"""Does a pretrained predictor reproduce the image's latents when given the identity
action? Predictor finetuning feeds it the null action (all zeros, "no jitter applied");
a predictor pretrained with jitter applied to every image (``views.strength=strong``)
never saw that vector, so this compares it with the same identity written with the
"applied" flags set, which it did see.

    python benchmarks/paper/identity_check.py RUN [RUN ...] [--images 256]

Prints, per run, the mean cosine between the predictor's output (every token context,
every position predicted, as in finetuning) and the target encoder's normalised tokens
of the same clean test images.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from iwm.api import load
from iwm.data.actions import ACTION_FIELDS, null_action
from iwm.data.datasets import get_dataset
from iwm.data.sources import iter_eval_batches


@torch.no_grad()
def identity_cosines(run: str, n_images: int) -> dict[str, float]:
    pretrained = load(run)
    model = pretrained.model.eval()
    cfg = pretrained.config
    data = get_dataset(cfg.data.name, "test", cfg.data.root, holdout=cfg.data.holdout)
    images, _ = next(iter(iter_eval_batches(data, n_images, cfg.data.image_size, "cpu",
                                            limit=n_images)))
    tokens = model.target_encoder.forward_tokens(pretrained.normalize(images))
    target = F.layer_norm(tokens, tokens.shape[-1:])
    out = {}
    for name in ("null", "applied"):
        action = null_action(len(images))
        if name == "applied":
            for field in ("target_jitter", "source_jitter"):
                action[:, ACTION_FIELDS.index(field)] = 1.0
        pred = model.predictor.predict_all(tokens, action=action)
        out[name] = F.cosine_similarity(pred, target, dim=-1).mean().item()
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+")
    p.add_argument("--images", type=int, default=256)
    args = p.parse_args(argv)
    for run in args.runs:
        c = identity_cosines(run, args.images)
        print(f"{run}: cos(prediction, target) null action {c['null']:.3f}, identity with "
              f"'applied' flags {c['applied']:.3f}")


if __name__ == "__main__":
    main()
