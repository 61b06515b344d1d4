"""Import a checkpoint of the official I-JEPA code (facebookresearch/ijepa) as an iwm run.

That code saves ``torch.save({"encoder", "predictor", "target_encoder", "opt", "scaler",
"epoch", "loss", "batch_size", "world_size", "lr"})``, the three model entries being state
dicts of DDP-wrapped modules (keys start with ``module.``). :func:`import_ijepa` maps them
onto the iwm model and writes a run directory (``config.yaml`` + one checkpoint) that
``iwm probe``, ``iwm eval``, ``iwm finetune``, ``iwm export``, :func:`iwm.load` and
``model.init_from`` read like any other run. docs/evaluation.md, "Importing I-JEPA
checkpoints", says which checkpoints and what data config to give.

What the mapping rests on:

* the encoder: I-JEPA's ViT and timm's (which :class:`~iwm.models.vit.Encoder` is) share
  the key names, the block layout (qkv with bias, GELU MLP, LayerNorm eps 1e-6) and the
  absence of a class token, so every tensor is copied to the same name, the fixed
  ``pos_embed`` included: iwm's encoder outputs equal I-JEPA's;
* the predictor: same block layout under other names (``predictor_blocks`` -> ``blocks``,
  ...). Its fixed positions are not stored by iwm, which computes them, and the two codes
  order the sin-cos channels differently (I-JEPA: column, then row; iwm: row, then
  column). Permuting the channels of the predictor's residual stream is an exact
  symmetry of a transformer, so every predictor tensor is permuted by the half swap that
  turns one order into the other, and the iwm predictor computes I-JEPA's function (up to
  its LayerNorm eps, 1e-5 against I-JEPA's 1e-6);
* the I-JEPA predictor takes no action, so the run is ``model.conditioning=none``: every
  parameter comes from the checkpoint and nothing is random. ``model.init_from`` starts
  an IWM pretraining from it, where the conditioning parameters start fresh.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from iwm.config import Config, load_config, parse_overrides
from iwm.errors import CheckpointError, ConfigError, IWMError
from iwm.models.iwm import build_model
from iwm.models.tokens import sincos_pos_embed
from iwm.models.vit import ENCODERS
from iwm.training.checkpoint import checkpoint_path, load_weights_only, save_checkpoint
from iwm.training.run_dir import is_run_dir, save_run_config

MODEL_KEYS = ("encoder", "predictor", "target_encoder")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
"""The normalisation of I-JEPA's training transforms (torchvision's ImageNet statistics)."""
BASE_PRESET = "ijepa-vitb16"
"""The preset whose optimiser, mask and training settings the imported run carries (the
model and image size come from the checkpoint)."""

_BLOCK_PARTS = ("norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias",
                "attn.proj.weight", "attn.proj.bias", "norm2.weight", "norm2.bias",
                "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias")


def encoder_keys(depth: int) -> Iterator[tuple[str, str]]:
    """``(I-JEPA key, iwm encoder key)`` of every encoder tensor."""
    for name in ("pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"):
        yield name, name
    for i in range(depth):
        for part in _BLOCK_PARTS:
            yield f"blocks.{i}.{part}", f"blocks.{i}.{part}"
    yield "norm.weight", "norm.weight"
    yield "norm.bias", "norm.bias"


def predictor_keys(depth: int) -> Iterator[tuple[str, str]]:
    """``(I-JEPA key, iwm predictor key)`` of every predictor tensor iwm stores
    (``predictor_pos_embed`` is checked, not stored: iwm computes it)."""
    yield "predictor_embed.weight", "embed.weight"
    yield "predictor_embed.bias", "embed.bias"
    yield "mask_token", "mask_token"
    for i in range(depth):
        for part in _BLOCK_PARTS:
            yield f"predictor_blocks.{i}.{part}", f"blocks.{i}.{part}"
    for part in ("weight", "bias"):
        yield f"predictor_norm.{part}", f"norm.{part}"
        yield f"predictor_proj.{part}", f"proj.{part}"


# Which axes of each predictor tensor run over the predictor width, i.e. get permuted.
# Linear weights are (out, in): the stream's writers permute rows, its readers columns.
_WIDTH_AXES = {
    "embed.weight": (0,), "embed.bias": (0,), "mask_token": (2,),
    "norm1.weight": (0,), "norm1.bias": (0,), "attn.qkv.weight": (1,), "attn.qkv.bias": (),
    "attn.proj.weight": (0,), "attn.proj.bias": (0,), "norm2.weight": (0,), "norm2.bias": (0,),
    "mlp.fc1.weight": (1,), "mlp.fc1.bias": (), "mlp.fc2.weight": (0,), "mlp.fc2.bias": (0,),
    "norm.weight": (0,), "norm.bias": (0,), "proj.weight": (1,), "proj.bias": (),
}


def _half_swap(width: int) -> Tensor:
    """iwm channel i of the sin-cos positions is I-JEPA channel ``perm[i]``."""
    half = width // 2
    return torch.cat([torch.arange(half, width), torch.arange(half)])


def _permute_width(key: str, tensor: Tensor, perm: Tensor) -> Tensor:
    part = key.split(".", 2)[-1] if key.startswith("blocks.") else key
    for axis in _WIDTH_AXES[part]:
        tensor = tensor.index_select(axis, perm)
    return tensor


def _one_line(path: Path, problem: str) -> IWMError:
    return CheckpointError(f"{path}: {problem}; pass a checkpoint written by the official "
                           "I-JEPA code (facebookresearch/ijepa)")


def read_ijepa(path: str | Path) -> tuple[dict[str, dict[str, Tensor]], dict[str, Any]]:
    """The three model state dicts of an I-JEPA checkpoint, ``module.`` removed, and the
    rest of its entries that are plain numbers (epoch, loss, lr, ...)."""
    path = Path(path)
    # Mapped: the file also holds the optimiser's two moments, which are never read.
    state = load_weights_only(path, mmap=True, corrupt_fix="download it again, or pass a "
                              "checkpoint of the official I-JEPA code")
    if not isinstance(state, dict):
        raise _one_line(path, f"holds a {type(state).__name__}, not a checkpoint dict")
    missing = [k for k in MODEL_KEYS if k not in state]
    if missing:
        raise _one_line(path, f"no {', '.join(repr(k) for k in missing)} entry "
                              f"(its entries: {', '.join(map(str, list(state)[:8]))})")
    models = {}
    for name in MODEL_KEYS:
        sd = state[name]
        if not isinstance(sd, Mapping) or not all(isinstance(v, Tensor) for v in sd.values()):
            raise _one_line(path, f"'{name}' is not a state dict of tensors")
        # DDP's wrapper adds the prefix; a checkpoint saved without DDP has none.
        models[name] = {str(k).removeprefix("module."): v for k, v in sd.items()}
    info = {k: v for k, v in state.items()
            if k not in MODEL_KEYS and isinstance(v, (int, float, str)) and not isinstance(v, bool)}
    return models, info


def _shape(path: Path, sd: Mapping[str, Tensor], key: str, ndim: int, where: str) -> Tensor:
    if key not in sd:
        raise _one_line(path, f"'{where}' has no '{key}'")
    t = sd[key]
    if t.ndim != ndim:
        raise _one_line(path, f"'{where}.{key}' has shape {tuple(t.shape)}, expected "
                              f"{ndim} dimensions")
    return t


def infer_model(path: Path, models: Mapping[str, Mapping[str, Tensor]]) -> dict[str, Any]:
    """The ``model`` and ``data.image_size`` keys (and input channels) the shapes imply."""
    enc, pred = models["target_encoder"], models["predictor"]
    for name in ("encoder", "target_encoder"):
        if "cls_token" in models[name]:
            raise _one_line(path, f"'{name}' has a class token (cls_token), which I-JEPA's "
                                  "ViT does not")
    conv = _shape(path, enc, "patch_embed.proj.weight", 4, "target_encoder")
    width, in_chans, patch, patch_w = conv.shape
    if in_chans != 3:
        raise _one_line(path, f"its encoder takes {in_chans}-channel images, not RGB")
    if patch != patch_w:
        raise _one_line(path, f"non-square patches {patch}x{patch_w}")
    pos = _shape(path, enc, "pos_embed", 3, "target_encoder")
    n = pos.shape[1]
    side = math.isqrt(n)
    if side * side != n or pos.shape[0] != 1 or pos.shape[2] != width:
        raise _one_line(path, f"'pos_embed' has shape {tuple(pos.shape)}, not (1, H*W, "
                              f"{width}) of a square grid without class token")
    depth = 0
    while f"blocks.{depth}.norm1.weight" in enc:
        depth += 1
    names = [n for n, s in ENCODERS.items() if (s.embed_dim, s.depth) == (width, depth)]
    if not names:
        sizes = ", ".join(f"{n} ({s.embed_dim} x {s.depth})" for n, s in ENCODERS.items())
        raise _one_line(path, f"its encoder, width {width} and depth {depth}, is none of "
                              f"iwm's: {sizes}")
    embed = _shape(path, pred, "predictor_embed.weight", 2, "predictor")
    pred_width = embed.shape[0]
    pred_depth = 0
    while f"predictor_blocks.{pred_depth}.norm1.weight" in pred:
        pred_depth += 1
    if pred_depth == 0:
        raise _one_line(path, "'predictor' has no predictor_blocks")
    return {
        "model": {"encoder": names[0], "patch_size": int(patch),
                  "predictor_depth": pred_depth, "predictor_width": int(pred_width),
                  # I-JEPA's predictor has as many heads as its encoder (src/helper.py
                  # there); the shapes cannot tell, as q, k and v share one matrix.
                  "predictor_heads": ENCODERS[names[0]].num_heads,
                  "conditioning": "none"},
        "data": {"image_size": int(side * patch)},
        "in_chans": int(in_chans),
    }


def _check_pos(path: Path, found: Tensor, grid: tuple[int, int], key: str) -> None:
    """``found`` must be I-JEPA's fixed sin-cos positions, which the mapping assumes."""
    width = found.shape[-1]
    if width % 4:
        raise _one_line(path, f"'{key}' is {width} wide, not a multiple of 4 (2-D sin-cos)")
    expected = sincos_pos_embed(grid, width)[:, _half_swap(width)]
    if found.shape[-2:] != expected.shape or not torch.allclose(
            found.reshape(expected.shape).float(), expected, atol=1e-4):
        raise _one_line(path, f"'{key}' is not the fixed 2-D sin-cos embedding of a "
                              f"{grid[0]}x{grid[1]} grid")


def convert_state(path: Path, models: Mapping[str, Mapping[str, Tensor]],
                  cfg: Config, in_chans: int) -> dict[str, Tensor]:
    """The iwm model's state dict holding the I-JEPA tensors (a :class:`CheckpointError`
    naming the first key that is missing, left over or of another shape)."""
    model = build_model(cfg, in_chans)
    expected = model.state_dict()
    grid = model.encoder.grid
    out: dict[str, Tensor] = {}

    def take(source: str, mapping: Iterator[tuple[str, str]], prefix: str) -> None:
        sd, used = models[source], set()
        for official, ours in mapping:
            if official not in sd:
                raise _one_line(path, f"'{source}' has no '{official}'")
            t = sd[official]
            if prefix == "predictor.":
                t = _permute_width(ours, t, perm)
            want = expected[prefix + ours]
            if tuple(t.shape) != tuple(want.shape):
                raise _one_line(path, f"'{source}.{official}' has shape {tuple(t.shape)}, "
                                      f"expected {tuple(want.shape)}")
            out[prefix + ours] = t.to(want.dtype).contiguous()
            used.add(official)
        extra = sorted(set(sd) - used - {"predictor_pos_embed"})
        if extra:
            more = f" (+{len(extra) - 3} more)" if len(extra) > 3 else ""
            raise _one_line(path, f"'{source}' has keys iwm's model lacks: "
                                  f"{', '.join(extra[:3])}{more}")

    depth = len(model.encoder.blocks)
    perm = _half_swap(cfg.model.predictor_width)
    for source, prefix in (("encoder", "encoder."), ("target_encoder", "target_encoder.")):
        take(source, encoder_keys(depth), prefix)
    pred = models["predictor"]
    if "predictor_pos_embed" not in pred:
        raise _one_line(path, "'predictor' has no 'predictor_pos_embed'")
    _check_pos(path, pred["predictor_pos_embed"], grid, "predictor.predictor_pos_embed")
    take("predictor", predictor_keys(cfg.model.predictor_depth), "predictor.")
    missing = sorted(set(expected) - set(out))
    if missing:  # pragma: no cover - the key lists above cover the whole model
        raise _one_line(path, f"nothing maps to {', '.join(missing[:3])}")
    return out


def import_ijepa(checkpoint: str | Path, out: str | Path,
                 overrides: list[str] | None = None) -> tuple[Path, Config]:
    """``iwm import-ijepa``: write the I-JEPA ``checkpoint`` as the run directory ``out``.

    ``overrides`` set the data (``data.name=...``; the image size comes from the
    checkpoint) and anything else but the model, which the shapes fix.
    """
    path, run_dir = Path(checkpoint), Path(out)
    if is_run_dir(run_dir):
        raise IWMError(f"{run_dir} already holds a run: choose another --out")
    models, info = read_ijepa(path)
    inferred = infer_model(path, models)
    in_chans = inferred.pop("in_chans")
    given = parse_overrides(overrides or [])
    for section, keys in inferred.items():
        for key, value in keys.items():
            if key in given.get(section, {}) and given[section][key] != value:
                raise ConfigError(f"{section}.{key}={given[section][key]}: the checkpoint "
                                  f"fixes it to {value}; drop the override")
    fixed = [f"{s}.{k}={v}" for s, keys in inferred.items() for k, v in keys.items()]
    cfg = load_config(BASE_PRESET, [*(overrides or []), *fixed])
    if cfg.model.init_from is not None:
        raise ConfigError("model.init_from: an imported run takes its weights from the "
                          "checkpoint; drop the override")
    state = convert_state(path, models, cfg, in_chans)
    save_run_config(cfg, run_dir)
    save_checkpoint(checkpoint_path(run_dir, 0), {
        "model": state, "step": 0, "config": cfg.to_dict(), "in_chans": in_chans,
        "normalization": {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
        "imported": {"format": "ijepa", "path": str(path.resolve()), **info},
    })
    return run_dir, cfg
