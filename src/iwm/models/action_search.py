"""Action inference: the action that best explains a pair of images, by search.

The world model answers "what does this source look like after action a?"; inference asks
the converse, "which a maps this source onto that target?". There is no inverse network:
the answer is the action whose prediction is closest to the target's latents, found by
the cross-entropy method (CEM) over the action vector, in its own coordinates
(:mod:`iwm.data.actions`: log factor ratios, twice the hue shift in turns, flags).

- :func:`search_action` is the search alone. It knows the action layout but no model: the
  energy is any function of candidate actions (B, P, ACTION_DIM) -> (B, P), lower is
  better, evaluated for every image and candidate in one call (no per-image loop).
- :func:`action_space` is where the search may look: the jitter factors that act on the
  images' channels, bounded by the ratios the run's views could produce (the predictor
  never saw larger ones), started from the spread of the run's own training actions.
- :func:`latent_energy` is the model's energy: the per-token mean squared error, in the
  layer-normed target-encoder space, between the predicted change (the prediction for
  each candidate minus the null action's) added to the source's latents and the
  target's latents, every position predicted from context that excludes it
  (:meth:`Predictor.predict_by_halves`, as ``Pretrained.apply`` asks); or, as
  ``kind="direct"``, the training loss of the prediction itself.

docs/world_model.md, "Inferring the action", has the protocol and its cost.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from iwm.data.actions import ACTION_DIM, ACTION_FIELDS, BLUR_SIGMA_SCALE, MIN_FACTOR, build_action
from iwm.data.factors import DESTRUCTIVE_OPS, JITTER_FACTORS, acts_on
from iwm.data.views import STRENGTHS, ViewParams, ViewSampler, jitter_range
from iwm.models.predictor import Predictor

__all__ = ["ENERGY_KINDS", "Energy", "EnergyKind", "SearchBudget", "SearchResult",
           "SearchSpace", "action_space", "latent_energy", "search_action"]

Energy = Callable[[Tensor], Tensor]
"""Candidate actions (B, P, ACTION_DIM) -> energies (B, P); lower is better."""

_COLUMN = {name: i for i, name in enumerate(ACTION_FIELDS)}
_BLUR, _SIGMA = _COLUMN["blur"], _COLUMN["blur_sigma"]
# Drawn on a generator of its own, so that a run's space does not depend on the caller's
# seed; enough draws that the spread is known to about 1%.
_PRIOR_DRAWS, _PRIOR_SEED = 8192, 0


@dataclass(frozen=True)
class SearchBudget:
    """How much search each image gets: ``iterations`` rounds of ``population`` candidate
    actions, each round refitting the sampling Gaussian to its ``elites`` lowest-energy
    candidates. One energy evaluation is one predictor call on one candidate (two passes
    of :meth:`Predictor.predict_by_halves`); an image costs :attr:`evaluations` of them.

    ``final``: ``"best"`` returns the lowest-energy candidate seen, ``"mean"`` the last
    elite mean (one more evaluation, for its energy). The defaults were chosen by
    measuring accuracy against cost on a trained run (docs/world_model.md).
    """

    iterations: int = 8
    population: int = 32
    elites: int = 6
    final: Literal["best", "mean"] = "best"

    def __post_init__(self) -> None:
        if self.iterations < 1 or self.population < 2:
            raise ValueError(f"SearchBudget: iterations={self.iterations} (>= 1), "
                             f"population={self.population} (>= 2)")
        if not 1 <= self.elites < self.population:
            raise ValueError(f"SearchBudget: elites={self.elites} must be in [1, "
                             f"population={self.population})")
        if self.final not in ("best", "mean"):
            raise ValueError(f"SearchBudget: final={self.final!r}; use 'best' or 'mean'")

    @property
    def evaluations(self) -> int:
        """Energy evaluations per image."""
        return self.iterations * self.population + (self.final == "mean")


@dataclass(frozen=True)
class SearchSpace:
    """Where the search looks, per action column (ACTION_DIM,), in the action's
    coordinates. Continuous columns with ``low < high`` are searched by a Gaussian started
    at ``mean`` with ``std``, clamped into [low, high]; columns with ``low == high`` stay
    at that value. Columns in ``flags`` are Bernoulli (started at probability 1/2); the
    blur sigma column is searched between its bounds and counts only where the blur flag
    is on (the action's layout: ``blur * sigma / 2``)."""

    low: Tensor
    high: Tensor
    mean: Tensor
    std: Tensor
    flags: tuple[int, ...] = ()

    @property
    def searched(self) -> Tensor:
        """(ACTION_DIM,) bool: the continuous columns the search varies."""
        return self.high > self.low

    def factor_bounds(self) -> dict[str, tuple[float, float]]:
        """The searched jitter factors' bounds in their own units: ratios for the
        multiplicative factors, a shift in turns for hue."""
        columns = {name: _COLUMN[name] for name in JITTER_FACTORS}
        return {name: (float(_to_factor(name, self.low[i])),
                       float(_to_factor(name, self.high[i])))
                for name, i in columns.items() if self.high[i] > self.low[i]}


def _to_factor(name: str, coordinate: Tensor) -> Tensor:
    """An action coordinate in the factor's units (the inverse of build_action's)."""
    return coordinate / 2 if name == "hue" else coordinate.exp()


def _has_no_jitter(params: ViewParams) -> bool:
    return max(getattr(params, name) for name in JITTER_FACTORS) == 0


def action_space(params: ViewParams, channels: int, image_size: int,
                 destructive: bool = False) -> SearchSpace:
    """The search space of a run whose views are ``params`` (``resolve_view_params`` of
    its config) on ``channels``-channel images.

    Jitter factors that act on the channels (:func:`iwm.data.factors.acts_on`) are
    searched up to the largest ratio two of the views' draws can have (hi / lo, hue
    shifts up to twice the strength), the action's training range; the rest stay at the
    identity. The search starts at the identity with the standard deviation of the run's
    own training actions (drawn from its :class:`ViewSampler`, so the jitter probability
    counts). With ``destructive``, the source-side ops that the views draw and that act on
    the channels are Bernoulli flags, and the blur sigma is searched in the views' range.
    A run without jitter (I-JEPA) is given the 'jitter' preset's ranges: its predictor
    ignores the action, and the search then answers the identity (its first candidate).
    """
    if _has_no_jitter(params):
        jitter = STRENGTHS["jitter"]
        params = dataclasses.replace(params, jitter_p=jitter.jitter_p,
                                     **{name: getattr(jitter, name) for name in JITTER_FACTORS})
    low, high = torch.zeros(ACTION_DIM), torch.zeros(ACTION_DIM)
    for name in JITTER_FACTORS:
        if not acts_on(name, channels) or getattr(params, name) == 0:
            continue
        lo, hi = jitter_range(params, name)
        # Hue: shifts up to 2 s apart, doubled in the action, at most a full [-1, 1).
        half = (min(4 * hi, 1.0) if name == "hue"
                else math.log(hi) - math.log(max(lo, MIN_FACTOR)))
        low[_COLUMN[name]], high[_COLUMN[name]] = -half, half
    sampler = ViewSampler(params, channels, image_size)
    gen = torch.Generator().manual_seed(_PRIOR_SEED)
    drawn = build_action(sampler.sample_jitter(_PRIOR_DRAWS, gen),
                         sampler.sample_jitter(_PRIOR_DRAWS, gen, source=True),
                         sampler.sample_destructive(_PRIOR_DRAWS, gen))
    # A preset that never applies its jitter (jitter_p = 0) has no spread to start from.
    std = torch.where(drawn.std(0) > 0, drawn.std(0), high / 2)
    mean = torch.zeros(ACTION_DIM)
    flags: tuple[int, ...] = ()
    if destructive:
        # Only the ops the views draw: a flag the predictor never saw set means nothing.
        flags = tuple(_COLUMN[op] for op in DESTRUCTIVE_OPS
                      if acts_on(op, channels) and getattr(params, f"{op}_p") > 0)
    if _BLUR in flags:
        lo, hi = (s / BLUR_SIGMA_SCALE for s in params.blur_sigma)
        low[_SIGMA], high[_SIGMA] = lo, hi
        mean[_SIGMA], std[_SIGMA] = (lo + hi) / 2, (hi - lo) / 4
    return SearchSpace(low=low, high=high, mean=mean, std=std * (high > low), flags=flags)


@dataclass
class SearchResult:
    """What :func:`search_action` found: ``action`` (B, ACTION_DIM) and its ``energy``
    (B,), after ``evaluations`` energy evaluations per image."""

    action: Tensor
    energy: Tensor
    evaluations: int


# Floor of the sampling std, as a fraction of each column's initial std: without it a
# population whose elites agree stops exploring before the energy's minimum is pinned.
_MIN_STD_FRACTION = 0.02
# Weight of the elites' flag frequencies in the new flag probabilities; the rest is the
# old probability, so that one round's elites cannot rule a flag out for good.
_FLAG_RATE = 0.7


def search_action(energy: Energy, space: SearchSpace, budget: SearchBudget,
                  generator: torch.Generator, *, batch_size: int,
                  device: torch.device | str | None = None) -> SearchResult:
    """The lowest-energy action of ``space`` for each of ``batch_size`` images, by CEM.

    Every round draws ``budget.population`` candidates per image from a Gaussian per image
    (and Bernoulli flags), the first of them its current mean (so the first round always
    scores the identity), scores them all in one ``energy`` call, and refits the
    distribution to the ``budget.elites`` best of them and of the last round's elites:
    mean and std of the elites (the std shrinks as they agree, but stays at least the
    step the mean just took and 2% of the initial std), flag probabilities moved 70% of
    the way to the elites' frequencies. Draws come from ``generator`` (on its own device)
    in a fixed order, so a seed fixes the result. NaN energies count as worst.
    """
    dev = torch.device(device) if device is not None else generator.device
    b, p, k = batch_size, budget.population, budget.elites
    low, high = space.low.to(dev), space.high.to(dev)
    free = space.searched.to(dev)
    flag_cols = torch.tensor(space.flags, dtype=torch.long, device=dev)
    mean = space.mean.to(dev).expand(b, -1).clone()
    std = space.std.to(dev).expand(b, -1).clone()
    min_std = space.std.to(dev) * _MIN_STD_FRACTION
    prob = torch.full((b, len(space.flags)), 0.5, device=dev)
    best_energy = torch.full((b,), math.inf, device=dev)
    best = torch.zeros(b, ACTION_DIM, device=dev)
    rows = torch.arange(b, device=dev)

    def as_action(z: Tensor) -> Tensor:
        # The sigma column is searched on its own scale and counts only under the blur flag.
        if not space.flags:
            return z
        out = z.clone()
        out[..., _SIGMA] = z[..., _SIGMA] * z[..., _BLUR]
        return out

    kept: tuple[Tensor, Tensor] | None = None
    for _ in range(budget.iterations):
        noise = torch.randn((b, p, ACTION_DIM), generator=generator,
                            device=generator.device).to(dev)
        noise[:, 0] = 0
        z = torch.where(free, mean[:, None] + std[:, None] * noise, low)
        z = torch.minimum(torch.maximum(z, low), high)
        if space.flags:
            u = torch.rand((b, p, len(space.flags)), generator=generator,
                           device=generator.device).to(dev)
            draws = u < prob[:, None]
            draws[:, 0] = prob > 0.5
            z[..., flag_cols] = draws.float()
        candidates = as_action(z)
        e = torch.nan_to_num(energy(candidates).float(), nan=math.inf)
        low_e, low_i = e.min(1)
        better = low_e < best_energy
        best = torch.where(better[:, None], candidates[rows, low_i], best)
        best_energy = torch.where(better, low_e, best_energy)
        # Last round's elites compete again (as in iCEM): scored already, so for nothing,
        # and a round that drew only worse candidates cannot drag the mean off a minimum.
        z_all, e_all = (z, e) if kept is None else (torch.cat([z, kept[0]], 1),
                                                    torch.cat([e, kept[1]], 1))
        top = e_all.topk(k, dim=1, largest=False).indices
        elites = z_all.gather(1, top[..., None].expand(-1, -1, ACTION_DIM))
        kept = (elites, e_all.gather(1, top))
        new_mean = elites.mean(1)
        if space.flags:
            on = elites[..., _BLUR]
            # Sigma from the elites that blur; where none does, the old mean stands.
            weight = on.sum(1)
            sigma = (elites[..., _SIGMA] * on).sum(1) / weight.clamp_min(1)
            new_mean[:, _SIGMA] = torch.where(weight > 0, sigma, mean[:, _SIGMA])
            prob = (1 - _FLAG_RATE) * prob + _FLAG_RATE * elites[..., flag_cols].mean(1)
        # While the mean still moves, the minimum may lie further on: the spread stays at
        # least the step, so that a population whose elites agree early keeps going. (A
        # full covariance, refitted to so few elites, collapsed sooner in measurements.)
        spread = torch.maximum(elites.std(1) if k > 1 else std, (new_mean - mean).abs())
        mean = torch.where(free, new_mean, mean)
        std = torch.where(free, torch.maximum(spread, min_std), std)
    if budget.final == "best":
        return SearchResult(best, best_energy, budget.evaluations)
    z = mean.clone()
    if space.flags:
        z[:, flag_cols] = (prob > 0.5).float()
    final = as_action(z)
    return SearchResult(final, energy(final[:, None]).float()[:, 0], budget.evaluations)


EnergyKind = Literal["direct", "residual"]
"""How :func:`latent_energy` compares a prediction with the target: ``direct``, the
prediction against the target's latents (the training loss); ``residual``, the predicted
change (the prediction minus the null action's) added to the source's own latents."""
ENERGY_KINDS: tuple[EnergyKind, ...] = ("direct", "residual")


def latent_energy(predictor: Predictor, source_tokens: Tensor, target_tokens: Tensor,
                  tile: int, chunk_size: int = 256, kind: EnergyKind = "residual") -> Energy:
    """The world model's energy of candidate actions for each (source, target) pair, the
    per-token mean squared error between a prediction and a goal in the layer-normed
    target space; predictions are the predictor's output from ``source_tokens`` (B, N, D)
    under the action, every position predicted from context that excludes it
    (:meth:`Predictor.predict_by_halves` with squares of side ``tile``).

    ``kind="residual"`` (the default): the goal is the target minus the source (both
    layer-normed) plus the null action's prediction, i.e. the energy of ``p(a) - p(null) +
    LN(source)`` against the target. The predictor's inpainting error, which every
    candidate shares, then cancels instead of adding to every energy. ``kind="direct"``:
    the goal is the layer-normed ``target_tokens`` (B, N, D), so the energy is the
    training loss; on a full-recipe run its minima drift to the search's bounds
    (docs/world_model.md measures both). All candidates of all images go through the
    predictor as one flat batch, ``chunk_size`` rows at a time (memory grows with it, not
    with the population). Call under ``torch.no_grad``."""
    if kind not in ENERGY_KINDS:
        raise ValueError(f"energy kind {kind!r}: use one of {', '.join(ENERGY_KINDS)}")

    def predict(tokens: Tensor, actions: Tensor) -> Tensor:
        return predictor.predict_by_halves(tokens, action=actions, tile=tile).float()

    width = target_tokens.shape[-1:]
    goal = F.layer_norm(target_tokens.float(), width)
    if kind == "residual":
        null = torch.zeros(len(source_tokens), ACTION_DIM, device=source_tokens.device)
        for start in range(0, len(source_tokens), chunk_size):
            part = slice(start, start + chunk_size)
            goal[part] += predict(source_tokens[part], null[part]) - F.layer_norm(
                source_tokens[part].float(), width)

    def energy(actions: Tensor) -> Tensor:
        b, p = actions.shape[:2]
        flat = actions.reshape(b * p, ACTION_DIM)
        out = torch.empty(b * p, device=flat.device)
        for start in range(0, b * p, chunk_size):
            rows = torch.arange(start, min(b * p, start + chunk_size), device=flat.device)
            image = torch.div(rows, p, rounding_mode="floor")
            error = predict(source_tokens[image], flat[rows]) - goal[image]
            out[rows] = error.pow(2).mean((1, 2))
        return out.view(b, p)

    return energy
