"""A planted world model: a ``Pretrained`` whose encoder and predictor are an exact, known
transformation of image statistics, so that the action mapping a source onto its
torchvision-jittered target is known in closed form.

The encoder reads statistics that each jitter moves by a known amount (for unclipped
images, torchvision's semantics):

- over the grey pixels (r = g = b; every pixel of a 1-channel image): log mean, which
  brightness moves by log b (contrast keeps it where the grey pixels' mean is the image's
  mean luma, which :func:`planted_images` arranges), and log std, moved by log b + log c;
- on RGB, the log mean chroma (max - min over the channels) of the coloured pixels, moved
  by log b + log c + log s (hue keeps it: an HSV hue shift keeps max and min), and the
  direction of their chroma-weighted circular mean HSV hue, which only hue rotates
  (by 2 pi h; brightness, contrast and saturation keep every pixel's hue).

Tokens are those features along orthonormal directions plus a fixed vector per position
orthogonal to them (and to the all-ones vector, so the layer norm keeps them apart). The
planted predictor shifts (and rotates) the features by the action and returns the layer
norm, so at the true action its output equals the target's layer-normed tokens exactly,
and the energy there is 0. Destructive flags move the prediction along a direction no
image has, so the truth (no destructive op) is the flags' only minimum.
"""

from __future__ import annotations

import dataclasses
import math

import kornia
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from torch import Tensor, nn

import iwm
from iwm.config import load_config
from iwm.data.actions import ACTION_FIELDS

DIM = 32
GREY_TOLERANCE = 1e-5
COLUMN = {name: i for i, name in enumerate(ACTION_FIELDS)}


def _directions(count: int, positions: int) -> tuple[Tensor, Tensor]:
    """``count`` orthonormal feature directions and one vector per position orthogonal to
    them, all orthogonal to the ones vector."""
    gen = torch.Generator().manual_seed(0)
    basis, _ = torch.linalg.qr(torch.cat([torch.ones(DIM, 1),
                                          torch.randn(DIM, count, generator=gen)], 1))
    u = basis[:, 1:].T.contiguous()  # (count, DIM)
    w = torch.randn(positions, DIM, generator=gen)
    w = w - (w @ basis) @ basis.T
    return u, 2 * w / w.norm(dim=1, keepdim=True)


def image_features(x: Tensor) -> Tensor:
    """(B, 2) grey-pixel log mean and log std, and on RGB (B, 5) also the coloured pixels'
    log mean chroma and their mean hue direction (cos, sin)."""
    chroma = x.amax(1) - x.amin(1)
    grey = (chroma < GREY_TOLERANCE).float()
    value = x[:, 0] * grey
    count = grey.sum((1, 2))
    mean = value.sum((1, 2)) / count
    var = ((x[:, 0] - mean[:, None, None]).pow(2) * grey).sum((1, 2)) / count
    out = [mean.log(), var.sqrt().log()]
    if x.shape[1] == 3:
        colour = 1 - grey
        out.append(((chroma * colour).sum((1, 2)) / colour.sum((1, 2))).log())
        hue = kornia.color.rgb_to_hsv(x)[:, 0]
        angle = torch.atan2((chroma * hue.sin()).sum((1, 2)), (chroma * hue.cos()).sum((1, 2)))
        out += [angle.cos(), angle.sin()]
    return torch.stack(out, 1)


class PlantedEncoder(nn.Module):
    def __init__(self, channels: int, grid: tuple[int, int]) -> None:
        super().__init__()
        self.grid = grid
        self.embed_dim = DIM
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(channels, 1, 1)  # where in_chans is read
        features = 2 if channels == 1 else 5
        u, w = _directions(features + 1, grid[0] * grid[1])  # + 1: the flags' direction
        self.register_buffer("u", u)
        self.register_buffer("w", w)

    def forward_tokens(self, x: Tensor) -> Tensor:
        f = image_features(x.float())
        return (f @ self.u[:f.shape[1]])[:, None] + self.w


class PlantedPredictor(nn.Module):
    """Shifts the encoder's features as the action says; the flags along the spare
    direction. ``calls`` counts the rows it was asked about."""

    def __init__(self, encoder: PlantedEncoder) -> None:
        super().__init__()
        self.encoder = encoder
        self.calls = 0

    def predict_by_halves(self, tokens: Tensor, *, action: Tensor, tile: int) -> Tensor:
        self.calls += len(tokens)
        u = self.encoder.u
        f = (tokens - self.encoder.w) @ u.T  # (B, N, F + 1): exact, u is orthonormal
        a = action.to(tokens.dtype)[:, None]
        log_b, log_c = a[..., COLUMN["brightness"]], a[..., COLUMN["contrast"]]
        shift = [log_b, log_b + log_c]
        if u.shape[0] == 6:
            shift.append(log_b + log_c + a[..., COLUMN["saturation"]])
            turn = math.pi * a[..., COLUMN["hue"]]  # the column holds 2 h; 2 pi h radians
            cos, sin = f[..., 3], f[..., 4]
            f = torch.cat([f[..., :3] + torch.stack(shift, -1),
                           torch.stack([cos * turn.cos() - sin * turn.sin(),
                                        sin * turn.cos() + cos * turn.sin()], -1),
                           f[..., 5:]], -1)
        else:
            f = torch.cat([f[..., :2] + torch.stack(shift, -1), f[..., 2:]], -1)
        flags = sum(a[..., COLUMN[name]] for name in ("grayscale", "blur", "solarize"))
        f[..., -1] = f[..., -1] + flags
        out = f @ u + self.encoder.w
        return F.layer_norm(out, out.shape[-1:])


def planted_pretrained(channels: int) -> iwm.Pretrained:
    """A ``Pretrained`` (iwm-equi-tiny's strong views for grey, iwm-equi-shapes' for RGB)
    with the planted encoder and predictor, and no normalisation."""
    preset, size = ("iwm-equi-tiny", 28) if channels == 1 else ("iwm-equi-shapes", 32)
    cfg = load_config(preset, ["model.predictor_depth=1"])
    base = iwm.Pretrained.create(cfg, channels, {"mean": [0.0] * channels,
                                                 "std": [1.0] * channels})
    encoder = PlantedEncoder(channels, (size // 4, size // 4))
    base.model.predictor = PlantedPredictor(encoder)
    return dataclasses.replace(base, encoder=encoder)


def planted_images(channels: int, n: int, seed: int = 0) -> Tensor:
    """Sources the planted encoder reads exactly and the jitters of ``RANGES`` never clip:
    grey values in [0.3, 0.55]; on RGB the left half grey and the right half coloured
    (luma about 0.45, chroma 0.06 to 0.12, any hue), the grey half's mean set to the whole
    image's mean luma (so contrast, which blends towards that, keeps it)."""
    gen = torch.Generator().manual_seed(seed)
    size = 28 if channels == 1 else 32
    grey = 0.3 + 0.25 * torch.rand(n, 1, size, size, generator=gen)
    if channels == 1:
        return grey
    hsv = torch.stack([2 * math.pi * torch.rand(n, size, size, generator=gen),
                       0.15 + 0.1 * torch.rand(n, size, size, generator=gen),
                       0.5 + 0.05 * torch.rand(n, size, size, generator=gen)], 1)
    colour = kornia.color.hsv_to_rgb(hsv)
    half = size // 2
    image = colour.clone()
    grey_part = grey[..., :half].expand(-1, 3, -1, -1)
    image[..., :half] = grey_part
    # The grey half's values shifted so that their mean is the mean luma of the whole
    # image (luma of grey g is 0.9999 g: torchvision's weights sum to 0.9999).
    weights = 0.2989 + 0.587 + 0.114
    luma_colour = TF.rgb_to_grayscale(colour[..., half:]).flatten(1).sum(1)
    n_grey, n_all = grey_part[:, 0].flatten(1).shape[1], size * size
    deviation = grey_part[:, 0] - grey_part[:, 0].flatten(1).mean(1)[:, None, None]
    # m = (weights * sum(m + d) + luma_colour) / n_all, with sum(d) = 0.
    m = luma_colour / (n_all - weights * n_grey)
    image[..., :half] = (m[:, None, None] + deviation)[:, None].expand(-1, 3, -1, -1)
    return image.contiguous()
