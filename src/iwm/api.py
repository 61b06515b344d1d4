"""Python API: load a trained run and use its encoder and world model.

    >>> import iwm
    >>> model = iwm.load("runs/iwm-inv-tiny")          # run directory or checkpoint file
    >>> images = model.load_images(["a.jpg", "b.png"])  # (B, C, H, W) in [0, 1], model-sized
    >>> tokens = model.encode(images)                  # (B, N, D) target-encoder tokens
    >>> pred = model.predict(tokens, masks, action)    # latents of the transformed image
    >>> pred = model.apply(tokens, iwm.Action(brightness=1.3))   # the same, named action
    >>> scores, idx = model.retrieve(pred, bank_tokens, k=5)    # nearest bank entries
    >>> model.save_pretrained("out")                   # config.json + model.safetensors
    >>> images = model.decode(pred)                    # (B, C, H, W) in [0, 1]; `iwm decoder`
    >>> encoder = iwm.load_encoder("timm-export")      # the encoder alone: encode, load_images

Inputs are checked at the door: images must be (B, C, H, W) of the model's channels and
size, floats in [0, 1] (uint8 is taken as 0..255 and divided by 255), and latents the
encoder's (B, N, D); anything else is a one-line ValueError saying what was expected.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from iwm.config import Config, load_config
from iwm.data.actions import (
    ACTION_DIM,
    ACTION_FIELDS,
    BLUR_SIGMA_SCALE,
    DestructiveParams,
    JitterParams,
    build_action,
)
from iwm.data.factors import JITTER_FACTORS
from iwm.data.masks import Masks
from iwm.data.normalize import Normalizer
from iwm.data.views import resolve_view_params
from iwm.errors import CheckpointError
from iwm.interop.folder import (
    DECODER_DIR,
    is_export_dir,
    is_timm_export_dir,
    normalization_lists,
    read_decoder,
    read_pretrained,
    read_timm_export,
    write_decoder,
    write_pretrained,
)
from iwm.interop.images import read_images
from iwm.models.action_calibration import ActionCalibration
from iwm.models.action_search import (
    Energy,
    EnergyKind,
    SearchBudget,
    SearchResult,
    SearchSpace,
    action_space,
    latent_energy,
    search_action,
)
from iwm.models.decoder import LatentDecoder, decoder_for
from iwm.models.encoder_io import state_shapes_mismatch
from iwm.models.iwm import IWM, build_model
from iwm.models.predictor import Predictor
from iwm.models.tokens import gather_tokens
from iwm.models.vit import Encoder, create_encoder
from iwm.training.checkpoint import CHECKPOINT_DIR, latest_checkpoint, load_checkpoint

NO_DECODER = ("no latent decoder yet: run `iwm decoder RUN` first on the run directory (an "
              "export made after it carries the decoder)")


@dataclass(frozen=True)
class Action:
    """A transformation for the world model: "the target is this jitter of the source".

    ``brightness``, ``contrast`` and ``saturation`` are multiplicative factors (1 = same),
    ``hue`` a shift in turns (0 = same), applied in that order. ``grayscale``,
    ``blur_sigma`` (pixels; 0 = none) and ``solarize`` say what was done to the SOURCE,
    which the predictor then undoes (in training they only ever hit the source).
    ``Action()`` is the identity, i.e. the null action. On 1-channel runs saturation, hue
    and grayscale are no-ops that training never varied: leave them at the identity.
    The vector layout is :mod:`iwm.data.actions`'s; this only names its inputs.
    """

    brightness: float = 1.0
    contrast: float = 1.0
    saturation: float = 1.0
    hue: float = 0.0
    grayscale: bool = False
    blur_sigma: float = 0.0
    solarize: bool = False

    def __post_init__(self) -> None:
        for name in ("brightness", "contrast", "saturation", "blur_sigma"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"Action.{name}={getattr(self, name)}: must be >= 0")

    def to_tensor(self, batch_size: int = 1,
                  device: str | torch.device | None = None) -> Tensor:
        """The (batch_size, ACTION_DIM) action vector, the same for every row."""

        def full(value: float | bool, dtype: torch.dtype = torch.float32) -> Tensor:
            return torch.full((batch_size,), value, dtype=dtype, device=device)

        target = JitterParams(brightness=full(self.brightness), contrast=full(self.contrast),
                              saturation=full(self.saturation), hue=full(self.hue),
                              applied=full(True, torch.bool))
        destructive = DestructiveParams(grayscale=full(self.grayscale, torch.bool),
                                        blur=full(self.blur_sigma > 0, torch.bool),
                                        blur_sigma=full(self.blur_sigma),
                                        solarize=full(self.solarize, torch.bool))
        return build_action(target, JitterParams.identity(batch_size, device), destructive)

    @classmethod
    def from_vector(cls, vector: Tensor) -> Action:
        """The Action a (ACTION_DIM,) vector of :func:`build_action`'s layout means (the
        inverse of :meth:`to_tensor`): factors from the log ratios, hue from its doubled
        shift, flags on above 1/2, the blur sigma only where the blur flag is on."""
        v = dict(zip(ACTION_FIELDS, vector.detach().double().cpu().tolist(), strict=True))
        blur = v["blur"] > 0.5
        factors = {name: math.exp(v[name]) for name in JITTER_FACTORS if name != "hue"}
        return cls(**factors, hue=v["hue"] / 2, grayscale=v["grayscale"] > 0.5,
                   blur_sigma=v["blur_sigma"] * BLUR_SIGMA_SCALE if blur else 0.0,
                   solarize=v["solarize"] > 0.5)


def _pooled_direction(x: Tensor, name: str) -> Tensor:
    """Unit vectors (B, D) of tokens (B, N, D) or pooled features (B, D)."""
    if x.ndim == 3:
        # Into the predictor's target space (IWM.target_tokens: per-token layer norm, no
        # affine), where predictions live; idempotent on predictions, so both sides match.
        x = F.layer_norm(x.float(), x.shape[-1:]).mean(1)
    elif x.ndim != 2:
        raise ValueError(f"{name}: expected tokens (B, N, D) or features (B, D), "
                         f"got {tuple(x.shape)}")
    return F.normalize(x.float(), dim=-1)


def _check_tokens(x: Tensor, name: str, tokens: int, dim: int) -> None:
    if not isinstance(x, Tensor) or x.ndim != 3 or tuple(x.shape[1:]) != (tokens, dim):
        got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{name}: expected encoder tokens (B, {tokens}, {dim}), got {got}; "
                         "pass model.encode(images) of this model")


@dataclass
class PretrainedEncoder:
    """A trained EMA target encoder in eval mode, with the input size, channels and
    normalisation it was trained with: what :func:`load_encoder` returns, e.g. from a timm
    export. :class:`Pretrained` (the whole model) is one too."""

    config: Config
    encoder: Encoder
    """The EMA target encoder: the one the paper evaluates and finetunes."""
    normalize: Normalizer
    step: int

    @property
    def device(self) -> torch.device:
        return next(self.encoder.parameters()).device

    @property
    def in_chans(self) -> int:
        return self.encoder.patch_embed.proj.in_channels

    @property
    def image_size(self) -> int:
        return self.config.data.image_size

    @property
    def num_tokens(self) -> int:
        height, width = self.encoder.grid
        return height * width

    def to(self, device: str | torch.device) -> PretrainedEncoder:
        self.encoder.to(device)
        self.normalize = Normalizer(self.normalize.mean.to(device), self.normalize.std.to(device))
        return self

    def check_images(self, images: Tensor) -> Tensor:
        """``images`` as the encoder takes them, float in [0, 1]; a one-line ValueError for
        another shape, channel count, dtype or value range."""
        channels, size = self.in_chans, self.image_size
        fix = (f"resize to {size} x {size} px with {channels} channel(s), or read files with "
               "model.load_images(paths)")
        if not isinstance(images, Tensor):
            raise ValueError(f"images: expected a tensor (B, {channels}, {size}, {size}), got "
                             f"{type(images).__name__}; {fix}")
        if images.ndim != 4 or tuple(images.shape[1:]) != (channels, size, size):
            hint = "; add a batch dimension: images[None]" if images.ndim == 3 else ""
            raise ValueError(f"images: expected (B, {channels}, {size}, {size}), got "
                             f"{tuple(images.shape)}; {fix}{hint}")
        if not len(images):
            raise ValueError(f"images: an empty batch (0, {channels}, {size}, {size}); pass "
                             "at least one image")
        if images.dtype == torch.uint8:
            return images.float() / 255
        if not images.is_floating_point():
            raise ValueError(f"images: dtype {images.dtype}; expected floats in [0, 1] (or "
                             "uint8 0..255)")
        low, high = (float(v) for v in torch.aminmax(images))
        if low < 0 or high > 1:
            raise ValueError(f"images must be floats in [0, 1], these span [{low:.4g}, "
                             f"{high:.4g}]; divide uint8 images by 255 (or clamp(0, 1) after "
                             "a resize that overshoots)")
        return images

    @torch.no_grad()
    def encode(self, images: Tensor, pooled: bool = False) -> Tensor:
        """Images (B, C, H, W), float in [0, 1] or uint8 -> tokens (B, N, D) or pooled (B, D)."""
        images = self.check_images(images)
        tokens = self.encoder.forward_tokens(self.normalize(images.to(self.device)))
        return tokens.mean(1) if pooled else tokens

    def load_images(self, paths: Sequence[str | os.PathLike[str]] | str | os.PathLike[str]
                    ) -> Tensor:
        """Image files (any format Pillow reads) -> (B, C, H, W) floats in [0, 1] on the
        model's device, ready for :meth:`encode`: converted to the model's channels (luma
        for 1-channel models), central square resized to :attr:`image_size` (the way
        ``iwm embed`` and the probes see images). A :class:`~iwm.errors.DataError` names a
        file that cannot be read."""
        if isinstance(paths, (str, os.PathLike)):
            paths = [paths]
        return read_images(list(paths), self.image_size, self.in_chans).to(self.device)


def calibrated_actions(actions: Sequence[Action], calibration: ActionCalibration
                       ) -> list[Action]:
    """``actions`` with their jitter factors mapped through ``calibration``'s per-factor
    maps; the source-side flags and blur sigma untouched."""
    jitters = calibration.apply(torch.tensor(
        [[getattr(a, name) for name in JITTER_FACTORS] for a in actions], dtype=torch.float64))
    return [replace(a, **dict(zip(JITTER_FACTORS, row.tolist(), strict=True)))
            for a, row in zip(actions, jitters, strict=True)]


@dataclass
class Pretrained(PretrainedEncoder):
    """A trained IWM model in eval mode, with the normalisation it was trained with."""

    model: IWM
    decoder: LatentDecoder | None = None
    """The latent decoder (``iwm decoder RUN``) that :meth:`decode` uses, if the run has one."""
    decoder_info: dict[str, Any] = field(default_factory=dict, repr=False)
    """Its ``decoder.json`` (spec, encoder step, training summary), or ``{"missing": why}``."""

    @property
    def context_encoder(self) -> Encoder:
        return self.model.encoder

    @property
    def predictor(self) -> Predictor:
        return self.model.predictor

    @classmethod
    def create(cls, config: Config, in_chans: int, normalization: Mapping[str, Sequence[float]],
               state: Mapping[str, Tensor] | None = None, step: int = 0,
               where: str | os.PathLike[str] = "state") -> Pretrained:
        """The model ``config`` describes, with ``state`` loaded (random init if None)."""
        model = build_model(config, int(in_chans))
        if state is not None:
            mismatch = state_shapes_mismatch(model.state_dict(), state)
            if mismatch:
                raise CheckpointError(f"{where}: does not match its own config: {mismatch}")
            model.load_state_dict(state)
        model.eval()
        return cls(config, model.target_encoder, _normalizer(normalization), int(step), model)

    def to(self, device: str | torch.device) -> Pretrained:
        self.model.to(device)  # the target encoder with it
        if self.decoder is not None:
            self.decoder.to(device)
        super().to(device)
        return self

    @torch.no_grad()
    def decode(self, tokens: Tensor) -> Tensor:
        """Tokens (B, N, D) of this model's grid, as :meth:`encode` or :meth:`apply` give
        them -> images (B, C, H, W) in [0, 1], rendered by the run's latent decoder. It
        shows what the latents keep: an encoder invariant to a factor leaves it out."""
        if self.decoder is None:
            why = self.decoder_info.get("missing", NO_DECODER)
            raise CheckpointError(f"cannot decode: {why}")
        _check_tokens(tokens, "tokens", self.num_tokens, self.encoder.embed_dim)
        if not tokens.is_floating_point():
            raise ValueError(f"tokens: dtype {tokens.dtype}; expected floats, e.g. "
                             "model.encode(images)")
        return self.decoder(tokens.to(self.device, torch.float32))

    def attach_decoder(self, folder: str | os.PathLike[str]) -> bool:
        """Use the decoder saved in ``folder`` (``decoder.safetensors`` + ``decoder.json``)
        if it reads this model's encoder; True if it does. Otherwise :attr:`decoder_info`
        says why, and :meth:`decode` repeats it."""
        self.decoder, self.decoder_info = None, {"missing": NO_DECODER}
        try:
            found = read_decoder(folder)
            if found is None:
                return False
            meta, state = found
            decoder, why = decoder_for(meta, state, self.encoder, str(folder))
        except CheckpointError as e:
            # The model itself is fine: only decode() needs the decoder, so it says so.
            warnings.warn(str(e), stacklevel=2)
            decoder, why = None, str(e)
        if decoder is None:
            self.decoder_info = {"missing": why}
            return False
        self.decoder, self.decoder_info = decoder.to(self.device), meta
        return True

    def encoder_only(self) -> PretrainedEncoder:
        """The target encoder alone, without the context encoder and predictor."""
        return PretrainedEncoder(self.config, self.encoder, self.normalize, self.step)

    def _check_action(self, action: Tensor | None, batch: int) -> None:
        if action is not None and (not isinstance(action, Tensor)
                                   or tuple(action.shape) != (batch, ACTION_DIM)):
            got = tuple(action.shape) if isinstance(action, Tensor) else type(action).__name__
            raise ValueError(f"action: expected ({batch}, {ACTION_DIM}), got {got}; pass "
                             "iwm.Action(...) or Action(...).to_tensor(batch_size)")

    @torch.no_grad()
    def predict(self, latents: Tensor, masks: Masks | None = None,
                action: Tensor | None = None) -> Tensor:
        """The raw predictor on encoder tokens ``latents`` (B, N, D), as training and
        downstream reuse call it; for "what would this image look like after the action"
        use :meth:`apply`.

        With ``masks``, the context tokens predict each target block: (B, T, Kt, D).
        Without, every token is context and every position is predicted in one pass, each
        query seeing its own source token: (B, N, D), the way predictor finetuning reuses
        it. ``action`` is a raw (B, ACTION_DIM) vector (:func:`iwm.data.actions.build_action`
        layout); None is the null action (identity transformation).
        """
        _check_tokens(latents, "latents", self.num_tokens, self.encoder.embed_dim)
        self._check_action(action, latents.shape[0])
        if masks is None:
            return self.predictor.predict_all(latents, action=action)
        return self.predictor.predict_blocks(gather_tokens(latents, masks.context), masks,
                                             action=action)

    @torch.no_grad()
    def apply(self, latents: Tensor, action: Action | Tensor | None,
              masks: Masks | None = None) -> Tensor:
        """The world model asked a question: latents (B, N, D) of a source image -> the
        predicted latents of that image transformed by ``action`` (an :class:`Action`, or a
        raw vector as :meth:`predict` takes), at every position (B, N, D) when ``masks`` is
        None, else at each target block as in :meth:`predict`. Unlike :meth:`predict`
        without masks, no position is ever predicted from its own token. Predictions live in
        the layer-normed target space (compare them with :meth:`retrieve`, which handles
        that).

        Without masks every position is predicted the way training poses the question:
        from context that does not contain it (two passes over a checkerboard of squares
        the size of a training target block, :meth:`Predictor.predict_by_halves`). On a
        trained demo run this scored 0.147 in ``iwm eval api-check`` against 0.094 when
        every query also saw its own source token (:meth:`predict` without masks)."""
        _check_tokens(latents, "latents", self.num_tokens, self.encoder.embed_dim)
        if isinstance(action, Action):
            action = action.to_tensor(latents.shape[0], latents.device)
        self._check_action(action, latents.shape[0])
        if masks is not None:
            return self.predict(latents, masks, action)
        return self.predictor.predict_by_halves(latents, action=action,
                                                 tile=self.apply_tile)

    @property
    def apply_tile(self) -> int:
        """Side of :meth:`apply`'s checkerboard squares: a training target block's, about
        sqrt(mean target scale x patches)."""
        height, width = self.encoder.grid
        scale = sum(self.config.mask.target_scale) / 2
        return max(1, round((scale * height * width) ** 0.5))

    def action_space(self, destructive: bool = False) -> SearchSpace:
        """Where :meth:`infer_action` looks: the factors that act on this model's channels,
        within the ratios its training views could produce (:func:`action_space`)."""
        return action_space(resolve_view_params(self.config.views), self.in_chans,
                            self.image_size, destructive)

    def _pair_energy(self, source: Tensor, target: Tensor,
                     kind: EnergyKind) -> tuple[Energy, int]:
        """The energy of candidate actions for these image pairs, and their number."""
        pair = []
        for name, images in (("source", source), ("target", target)):
            if isinstance(images, Tensor) and images.ndim == 4 and not len(images):
                raise ValueError(f"{name}: an empty batch; pass one target per source "
                                 "image, at least one")
            try:
                pair.append(self.check_images(images).to(self.device))
            except ValueError as e:
                raise ValueError(f"{name}: {e}") from None
        if len(pair[0]) != len(pair[1]):
            raise ValueError(f"source has {len(pair[0])} images, target {len(pair[1])}: "
                             "pass one target per source image, in the same order")
        return latent_energy(self.predictor, self.encode(pair[0]), self.encode(pair[1]),
                             self.apply_tile, kind=kind), len(pair[0])

    @torch.no_grad()
    def action_energy(self, source: Tensor, target: Tensor, actions: Tensor, *,
                      energy: EnergyKind = "residual", bf16: bool = False) -> Tensor:
        """The energy :meth:`infer_action` minimises, for given candidate ``actions`` (B, P,
        ACTION_DIM) of each of the B (source, target) image pairs: (B, P), the per-token
        mean squared error between the predicted change (the predictor's output from the
        source's latents under each action, minus its output under the null action) added
        to the source's layer-normed latents and the target's (``energy="direct"``: the
        prediction itself against the target, the training loss; :func:`latent_energy`).
        E.g.
        ``actions = torch.stack([a.to_tensor(1)[0] for a in candidates])[None]``."""
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bf16):
            fn, batch = self._pair_energy(source, target, energy)
            if (not isinstance(actions, Tensor) or actions.ndim != 3
                    or tuple(actions.shape[::2]) != (batch, ACTION_DIM)):
                got = (tuple(actions.shape) if isinstance(actions, Tensor)
                       else type(actions).__name__)
                raise ValueError(f"actions: expected ({batch}, P, {ACTION_DIM}), got {got}; "
                                 "stack P Action(...).to_tensor(1)[0] rows per image")
            return fn(actions.to(self.device, torch.float32))

    @torch.no_grad()
    def search_action(self, source: Tensor, target: Tensor, *, destructive: bool = False,
                      budget: SearchBudget | None = None, seed: int = 0,
                      energy: EnergyKind = "residual", bf16: bool = False) -> SearchResult:
        """:meth:`infer_action` with the raw result: action vectors (B, ACTION_DIM), their
        energies (B,) and the evaluations spent per image."""
        budget = budget if budget is not None else SearchBudget()
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bf16):
            fn, batch = self._pair_energy(source, target, energy)
            # A CPU generator: the draws, hence the answer, do not depend on the device.
            return search_action(fn, self.action_space(destructive), budget,
                                 torch.Generator().manual_seed(seed), batch_size=batch,
                                 device=self.device)

    def infer_action(self, source: Tensor, target: Tensor, *, destructive: bool = False,
                     budget: SearchBudget | None = None, seed: int = 0,
                     energy: EnergyKind = "residual", bf16: bool = False,
                     calibration: ActionCalibration | None = None) -> list[Action]:
        """The jitter (with ``destructive``, also the source-side flags and blur sigma)
        that best maps each ``source`` image's latents onto its ``target``'s through the
        world model: images (B, C, H, W) in [0, 1] as :meth:`encode` takes them, one target
        per source. The action minimising :meth:`action_energy` is searched by the
        cross-entropy method within :meth:`action_space`, ``budget`` (default
        :class:`SearchBudget`: a fixed number of predictor evaluations per image) and a
        ``seed`` that fixes the answer; ``energy`` is :func:`latent_energy`'s kind. Factors a
        model's channels do not have (saturation and hue on grey images) stay at the
        identity. ``calibration`` (``iwm.evaluation.infer_action.calibrate`` or
        ``load_calibration``) maps the jitter factors of the answers through its per-factor
        maps, the flags untouched. docs/world_model.md has the cost."""
        result = self.search_action(source, target, destructive=destructive, budget=budget,
                                    seed=seed, energy=energy, bf16=bf16)
        actions = [Action.from_vector(row) for row in result.action]
        return actions if calibration is None else calibrated_actions(actions, calibration)

    @staticmethod
    @torch.no_grad()
    def retrieve(pred: Tensor, bank: Tensor, k: int = 5) -> tuple[Tensor, Tensor]:
        """Nearest neighbours of each prediction in ``bank`` by pooled cosine similarity.

        ``pred`` (B, N, D) or (B, D); ``bank`` (M, N, D) or (M, D), e.g. ``encode(images)``
        of candidate targets, shared by all queries. Tokens are layer-normed (the predictor's
        target space) and mean-pooled first. Returns ``(scores, indices)``, both (B, min(k,
        M)), most similar first; scores are cosines in [-1, 1].
        """
        query = _pooled_direction(pred, "pred")
        keys = _pooled_direction(bank, "bank").to(query.device)
        if query.shape[1] != keys.shape[1]:
            raise ValueError(f"pred has width {query.shape[1]} but bank {keys.shape[1]}; "
                             "encode the bank with the same model")
        # One matmul against a bank shared by all queries; mrr.pairwise_scores instead
        # scores per-query banks (B, K, D) and would need the bank copied B times.
        scores, indices = (query @ keys.T).topk(min(k, keys.shape[0]), dim=1)
        return scores, indices

    def save_pretrained(self, directory: str | os.PathLike[str]) -> Path:
        """Write ``config.json`` + ``model.safetensors`` (Hugging Face layout; the whole
        model) to ``directory``; :func:`from_pretrained` and :func:`load` read it back."""
        folder = write_pretrained(
            directory, self.model.state_dict(), config=self.config.to_dict(),
            in_chans=self.in_chans, step=self.step,
            normalization=normalization_lists(self.normalize.mean, self.normalize.std))
        if self.decoder is not None:  # beside the model: a folder without one still loads
            write_decoder(folder, self.decoder.state_dict(), self.decoder_info)
        return folder


def _normalizer(normalization: Mapping[str, Sequence[float]]) -> Normalizer:
    return Normalizer.create(tuple(normalization["mean"]), tuple(normalization["std"]),
                             torch.device("cpu"))


def resolve_checkpoint(run_or_checkpoint: str | os.PathLike[str]) -> Path:
    path = Path(run_or_checkpoint)
    if path.is_dir():
        found = latest_checkpoint(path)
        if found is None:
            raise CheckpointError(f"{path}: no checkpoint found (is this a finished run?)")
        return found
    if not path.exists():
        raise CheckpointError(f"{path}: no such run directory or checkpoint file")
    return path


def load(run_or_checkpoint: str | os.PathLike[str],
         device: str | torch.device = "cpu") -> Pretrained:
    """Load a run directory (its latest checkpoint), a checkpoint file, or a folder written
    by :meth:`Pretrained.save_pretrained` / ``iwm export --format safetensors``."""
    if is_export_dir(run_or_checkpoint):
        return from_pretrained(run_or_checkpoint, device)
    path = resolve_checkpoint(run_or_checkpoint)
    state = load_checkpoint(path, map_location="cpu")
    for key in ("config", "model", "in_chans", "normalization"):
        if key not in state:
            raise CheckpointError(f"{path}: not an iwm pretraining checkpoint (no '{key}')")
    model = Pretrained.create(load_config(state["config"]), state["in_chans"],
                              state["normalization"], state["model"], state["step"],
                              where=path)
    model.attach_decoder(run_folder(path) / DECODER_DIR)
    return model.to(device)


def run_folder(checkpoint: Path) -> Path:
    """The run directory holding ``checkpoint`` (RUN/checkpoints/step_*.pt), else its folder."""
    return checkpoint.parent.parent if checkpoint.parent.name == CHECKPOINT_DIR else \
        checkpoint.parent


def from_pretrained(directory: str | os.PathLike[str],
                    device: str | torch.device = "cpu") -> Pretrained:
    """Load a folder written by :meth:`Pretrained.save_pretrained` (``config.json`` +
    ``model.safetensors``)."""
    meta, state = read_pretrained(directory)
    model = Pretrained.create(load_config(meta["config"]), meta["in_chans"],
                              meta["normalization"], state, meta["step"], where=directory)
    model.attach_decoder(directory)
    return model.to(device)


def load_encoder(source: str | os.PathLike[str],
                 device: str | torch.device = "cpu") -> PretrainedEncoder:
    """The EMA target encoder alone, from anything :func:`load` reads or from an
    ``iwm export --format timm`` folder (which holds only that encoder)."""
    if not is_timm_export_dir(source):
        return load(source, device).encoder_only()
    meta, state = read_timm_export(source)
    config = load_config(meta["iwm"]["config"])
    encoder = create_encoder(config.model.encoder, img_size=config.data.image_size,
                             patch_size=config.model.patch_size,
                             in_chans=int(meta["model_args"]["in_chans"]))
    mismatch = state_shapes_mismatch(encoder.state_dict(), state)
    if mismatch:
        raise CheckpointError(f"{source}: does not match its own config: {mismatch}")
    encoder.load_state_dict(state)
    encoder.eval()
    return PretrainedEncoder(config, encoder, _normalizer(meta["pretrained_cfg"]),
                             int(meta["iwm"]["step"])).to(device)
