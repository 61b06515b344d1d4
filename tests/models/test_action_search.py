"""The action search alone (iwm.models.action_search), on energies of known minimum."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch
from torch import Tensor

from iwm.data.actions import ACTION_DIM, ACTION_FIELDS, BLUR_SIGMA_SCALE
from iwm.data.factors import JITTER_FACTORS, RGB_ONLY
from iwm.data.views import STRENGTHS, jitter_ranges
from iwm.models.action_search import (
    SearchBudget,
    SearchSpace,
    action_space,
    latent_energy,
    search_action,
)
from iwm.models.predictor import Predictor

COLUMN = {name: i for i, name in enumerate(ACTION_FIELDS)}
JITTER = [COLUMN[name] for name in JITTER_FACTORS]


def quadratic(minimum: Tensor, seen: list[Tensor] | None = None):
    """Energy (B, P): squared distance to each image's ``minimum`` (B, ACTION_DIM); the
    candidates it is asked about are appended to ``seen``."""

    def energy(actions: Tensor) -> Tensor:
        if seen is not None:
            seen.append(actions.clone())
        return (actions - minimum[:, None]).pow(2).sum(-1)

    return energy


def jitter_minimum(space: SearchSpace, n: int, seed: int = 0, reach: float = 0.4) -> Tensor:
    """Minima inside the space: each searched jitter column uniform in ``reach`` of its
    bounds, the rest 0."""
    gen = torch.Generator().manual_seed(seed)
    u = 2 * torch.rand(n, ACTION_DIM, generator=gen) - 1
    return (u * reach * space.high) * space.searched * torch.isin(
        torch.arange(ACTION_DIM), torch.tensor(JITTER))


def search(energy, space: SearchSpace, n: int, budget: SearchBudget | None = None,
           seed: int = 0):
    return search_action(energy, space, budget or SearchBudget(),
                         torch.Generator().manual_seed(seed), batch_size=n)


def eval_range_minimum(n: int, channels: int, seed: int = 0) -> Tensor:
    """Minima at the jitters ``iwm eval infer-action`` asks about (brightness and contrast
    in [0.6, 1.4], saturation [0.8, 1.2], hue [-0.1, 0.1] turns), in action coordinates."""
    gen = torch.Generator().manual_seed(seed)
    u = 2 * torch.rand(n, 4, generator=gen) - 1
    out = torch.zeros(n, ACTION_DIM)
    out[:, JITTER] = u * torch.tensor([math.log(1.4), math.log(1.4), math.log(1.2), 0.2])
    if channels == 1:
        out[:, JITTER[2:]] = 0
    return out


@pytest.mark.parametrize("preset, channels", [("strong", 1), ("strong", 3),
                                              ("destructive", 3)])
@pytest.mark.parametrize("final", ["best", "mean"])
def test_finds_the_minimum_of_a_quadratic_energy(preset, channels, final):
    # The presets' spaces: iwm-equi-tiny's (strong, grey) and iwm-equi-shapes' (destructive,
    # RGB), and strong on RGB, the widest: ratios up to 9 either way.
    space = action_space(STRENGTHS[preset], channels, 32)
    minimum = eval_range_minimum(32, channels)
    budget = SearchBudget(final=final)
    result = search(quadratic(minimum), space, 32, budget)
    assert result.action.shape == (32, ACTION_DIM) and result.energy.shape == (32,)
    error = (result.action - minimum).abs()
    assert error.median() < 0.01 and error.amax() < 0.05, error.amax(1)
    torch.testing.assert_close(result.energy, quadratic(minimum)(result.action[:, None])[:, 0])
    assert result.evaluations == budget.evaluations == 8 * 32 + (final == "mean")


def test_scores_every_image_and_candidate_in_one_call_per_round():
    space = action_space(STRENGTHS["jitter"], 1, 28)
    seen: list[Tensor] = []
    budget = SearchBudget(iterations=3, population=10, elites=3)
    search(quadratic(jitter_minimum(space, 5), seen), space, 5, budget)
    assert [tuple(s.shape) for s in seen] == [(5, 10, ACTION_DIM)] * 3
    # The first round's first candidate is the identity, the null action.
    assert (seen[0][:, 0] == 0).all()


def test_stays_within_the_bounds_and_stops_at_them():
    space = action_space(STRENGTHS["jitter"], 3, 32)
    seen: list[Tensor] = []
    minimum = torch.zeros(4, ACTION_DIM)
    minimum[:, COLUMN["brightness"]] = 5.0  # far beyond a ratio the views could make
    minimum[:, COLUMN["hue"]] = -3.0
    result = search(quadratic(minimum, seen), space, 4)
    everything = torch.cat([s.flatten(0, 1) for s in seen])
    assert (everything >= space.low - 1e-7).all() and (everything <= space.high + 1e-7).all()
    torch.testing.assert_close(result.action[:, COLUMN["brightness"]],
                               space.high[COLUMN["brightness"]].expand(4))
    torch.testing.assert_close(result.action[:, COLUMN["hue"]],
                               space.low[COLUMN["hue"]].expand(4))


def test_the_bounds_are_the_ratios_the_views_could_make():
    params = STRENGTHS["strong"]
    space = action_space(params, 3, 32)
    ranges = jitter_ranges(params)
    for name in ("brightness", "contrast", "saturation"):
        lo, hi = ranges[name]
        assert space.high[COLUMN[name]] == pytest.approx(math.log(hi / lo), rel=1e-6)
        assert space.low[COLUMN[name]] == pytest.approx(-math.log(hi / lo), rel=1e-6)
    assert space.high[COLUMN["hue"]] == pytest.approx(4 * ranges["hue"][1])
    bounds = space.factor_bounds()
    assert bounds["brightness"][0] == pytest.approx(ranges["brightness"][0] / 1.8)
    assert bounds["hue"] == pytest.approx((-0.4, 0.4))


def test_grey_images_never_vary_saturation_hue_or_flags():
    space = action_space(STRENGTHS["strong"], 1, 28)
    assert {ACTION_FIELDS[i] for i in space.searched.nonzero().flatten().tolist()} == {
        "brightness", "contrast"}
    seen: list[Tensor] = []
    minimum = torch.zeros(3, ACTION_DIM)
    minimum[:, JITTER] = 0.3  # the energy would like them all moved
    result = search(quadratic(minimum, seen), space, 3)
    everything = torch.cat([s.flatten(0, 1) for s in seen])
    fixed = [i for i, name in enumerate(ACTION_FIELDS) if name not in ("brightness",
                                                                      "contrast")]
    assert (everything[:, fixed] == 0).all()
    assert (result.action[:, fixed] == 0).all()
    assert set(RGB_ONLY) & {"saturation", "hue"} == {"saturation", "hue"}


def test_destructive_flags_and_blur_sigma_are_searched_when_asked():
    space = action_space(STRENGTHS["strong"], 3, 32, destructive=True)
    assert space.flags == (COLUMN["grayscale"], COLUMN["blur"], COLUMN["solarize"])
    minimum = jitter_minimum(space, 8)
    minimum[:4, COLUMN["blur"]] = 1.0
    minimum[:4, COLUMN["blur_sigma"]] = 1.2 / BLUR_SIGMA_SCALE
    minimum[4:, COLUMN["solarize"]] = 1.0
    result = search(quadratic(minimum), space, 8, SearchBudget(iterations=6))
    flags = list(space.flags)
    assert torch.equal(result.action[:, flags], minimum[:, flags])
    assert (result.action[:, COLUMN["blur_sigma"]] - minimum[:, COLUMN["blur_sigma"]]
            ).abs().amax() < 0.05
    # The sigma counts only under the blur flag, as in the action's layout.
    assert (result.action[4:, COLUMN["blur_sigma"]] == 0).all()


def test_only_the_ops_the_views_draw_are_flags():
    assert action_space(STRENGTHS["jitter"], 3, 32, destructive=True).flags == ()
    grey = action_space(STRENGTHS["destructive"], 1, 28, destructive=True)
    assert grey.flags == (COLUMN["blur"], COLUMN["solarize"])  # no grayscale on grey
    assert action_space(STRENGTHS["destructive"], 3, 32).flags == ()


def test_a_run_without_jitter_gets_the_jitter_presets_space():
    none, jitter = action_space(STRENGTHS["none"], 3, 32), action_space(STRENGTHS["jitter"],
                                                                        3, 32)
    torch.testing.assert_close(none.high, jitter.high)
    # An energy that ignores the action: the answer is the first candidate, the identity.
    result = search(lambda a: torch.zeros(a.shape[:2]), none, 2)
    assert (result.action == 0).all()


def test_a_seed_fixes_the_result():
    space = action_space(STRENGTHS["strong"], 3, 32)
    minimum = jitter_minimum(space, 6)
    a = search(quadratic(minimum), space, 6, seed=3).action
    torch.testing.assert_close(search(quadratic(minimum), space, 6, seed=3).action, a,
                               rtol=0, atol=0)
    assert not torch.equal(search(quadratic(minimum), space, 6, seed=4).action, a)


def test_nan_energies_count_as_worst():
    space = action_space(STRENGTHS["jitter"], 1, 28)
    minimum = jitter_minimum(space, 4)

    def energy(actions: Tensor) -> Tensor:
        e = quadratic(minimum)(actions)
        return torch.where(actions[..., COLUMN["brightness"]] > 0, torch.nan, e)

    result = search(energy, space, 4)
    assert torch.isfinite(result.energy).all()
    assert (result.action[:, COLUMN["brightness"]] <= 0).all()


@pytest.mark.parametrize("kwargs, match", [
    ({"iterations": 0}, "iterations"), ({"population": 1, "elites": 1}, "population"),
    ({"elites": 32}, "elites"), ({"final": "median"}, "final"),
])
def test_a_budget_that_cannot_search_is_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SearchBudget(**kwargs)


def _energy_case() -> tuple[Predictor, Tensor, Tensor, Tensor]:
    """A small predictor, 3 (source, target) token pairs (16 positions, width 16) and 5
    candidate actions per pair."""
    torch.manual_seed(0)
    predictor = Predictor(grid=(4, 4), embed_dim=16, width=16, depth=1, num_heads=2,
                          action_dim=ACTION_DIM, conditioning="sequence").eval()
    source, target = torch.randn(3, 16, 16), torch.randn(3, 16, 16)
    actions = torch.randn(3, 5, ACTION_DIM) * 0.3
    return predictor, source, target, actions


def test_latent_energy_is_the_training_loss_of_the_prediction_by_halves():
    predictor, source, target, actions = _energy_case()
    with torch.no_grad():
        energy = latent_energy(predictor, source, target, tile=2, chunk_size=4,
                               kind="direct")(actions)
        truth = torch.nn.functional.layer_norm(target, (16,))
        expected = torch.stack([
            torch.stack([(predictor.predict_by_halves(source[i:i + 1], action=actions[i, j:j + 1],
                                                      tile=2) - truth[i]).pow(2).mean()
                         for j in range(5)]) for i in range(3)])
        whole = latent_energy(predictor, source, target, tile=2, chunk_size=1000,
                              kind="direct")(actions)
    assert energy.shape == (3, 5)
    torch.testing.assert_close(energy, expected)
    torch.testing.assert_close(whole, energy)  # chunking changes memory, not the answer


def test_the_residual_energy_adds_the_predicted_change_to_the_source():
    predictor, source, target, actions = _energy_case()
    ln = partial(torch.nn.functional.layer_norm, normalized_shape=(16,))
    with torch.no_grad():
        energy = latent_energy(predictor, source, target, tile=2, chunk_size=2,
                               kind="residual")(actions)
        null = predictor.predict_by_halves(source, action=torch.zeros(3, ACTION_DIM), tile=2)
        expected = torch.stack([
            torch.stack([(predictor.predict_by_halves(source[i:i + 1], action=actions[i, j:j + 1],
                                                      tile=2)[0] - null[i] + ln(source[i])
                          - ln(target[i])).pow(2).mean() for j in range(5)]) for i in range(3)])
    torch.testing.assert_close(energy, expected)
    # The null action explains a pair exactly as far as the clean latents do.
    zero = latent_energy(predictor, source, target, tile=2, kind="residual")(
        torch.zeros(3, 1, ACTION_DIM))
    torch.testing.assert_close(zero[:, 0], (ln(source) - ln(target)).pow(2).mean((1, 2)))
