import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from iwm.config import load_config
from iwm.data.actions import JitterParams
from iwm.data.factors import DESTRUCTIVE_OPS, JITTER_FACTORS
from iwm.data.masks import MultiBlockMaskSampler
from iwm.data.views import ViewParams, ViewSampler, resolve_view_params
from iwm.evaluation.bank import bank_view_params, protocol_masks
from iwm.evaluation.mrr import MRRResult, evaluate_mrr, run_mrr
from iwm.evaluation.ranking import chance_mrr_stderr
from iwm.evaluation.sensitivity import range_end
from iwm.models.iwm import build_model
from iwm.models.tokens import gather_tokens

SIZE = 16
BANK = 16


def harmonic(k: int) -> float:
    return sum(1.0 / r for r in range(1, k + 1))


def normalize(x: Tensor) -> Tensor:
    return (x - 0.5) / 0.25


# ---------------------------------------------------------------- evaluate_mrr


def _setup(channels: int, conditioning: str = "feature", strength: str = "destructive"):
    torch.manual_seed(0)
    cfg = load_config("iwm-inv-tiny", [
        f"data.image_size={SIZE}", "model.predictor_depth=1", "model.predictor_width=64",
        f"model.conditioning={conditioning}", f"views.strength={strength}",
    ])
    model = build_model(cfg, in_chans=channels)
    views = ViewSampler(resolve_view_params(cfg.views), channels, SIZE)
    masks = MultiBlockMaskSampler(model.encoder.grid, cfg.mask)
    return model, views, masks


def _images(n: int, channels: int, seed: int = 0) -> Tensor:
    return torch.rand(n, channels, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def _decode_target(action: Tensor) -> JitterParams:
    """Target jitter from an action whose source jitter is the identity (see actions.py)."""
    return JitterParams(brightness=action[:, 0].exp(), contrast=action[:, 1].exp(),
                        saturation=action[:, 2].exp(), hue=action[:, 3] / 2,
                        applied=torch.ones(action.shape[0], dtype=torch.bool))


class OraclePredictor(nn.Module):
    """Returns the target encoder's latent of the CLEAN image under the action's target
    jitter, at the target positions: the best any world model could do. ``shift`` rolls
    the actions across the batch, so each image gets another image's transformation."""

    def __init__(self, model, images: Tensor, views: ViewSampler, shift: int = 0) -> None:
        super().__init__()
        self.images = images
        self.views = views
        self.shift = shift
        # A plain function, not a submodule: registering the model inside its own
        # predictor would make .eval() recurse forever.
        self.encode = lambda x: model.target_tokens(normalize(x))

    def forward(self, context, context_idx, target_idx, *, action, context_valid=None,
                target_valid=None):
        action = action.roll(self.shift, 0)
        rendered = self.views.apply_jitter(self.images, _decode_target(action))
        return gather_tokens(self.encode(rendered), target_idx)


@pytest.mark.parametrize(("channels", "distance"), [(3, "cosine"), (1, "l2")])
def test_oracle_predictor_scores_one_everywhere(channels, distance):
    model, views, masks = _setup(channels)
    images = _images(8, channels)
    model.predictor = OraclePredictor(model, images, views)
    result = evaluate_mrr(model, views, images, masks, bank_size=BANK, distance=distance,
                          generator=torch.Generator().manual_seed(0), chunk_size=50,
                          normalize=normalize)
    assert result.mrr == 1.0
    assert all(v == 1.0 for v in result.per_transform.values() if v is not None)
    # Every rank is 1: nothing varies over the images.
    assert result.stderr == 0.0
    assert all(v == 0.0 for v in result.per_transform_stderr.values() if v is not None)


def test_each_setting_asks_for_the_right_action():
    # The predictor's calls, in order: the null action (for the residual), the main bank,
    # each source-side op on the same bank and true entries, the main bank's oracle (null
    # action), then per factor: one bank where only that factor varies, its oracle, and
    # the two ends of its range (the sensitivity measure).
    model, views, masks = _setup(3)
    images = _images(5, 3)
    oracle = OraclePredictor(model, images, views)
    actions = []

    def record(context, context_idx, target_idx, *, action, context_valid=None,
               target_valid=None):
        actions.append(action.clone())
        return oracle(context, context_idx, target_idx, action=action,
                      context_valid=context_valid, target_valid=target_valid)

    model.predictor.forward = record
    evaluate_mrr(model, views, images, masks, bank_size=4, normalize=normalize)
    assert len(actions) == 3 + len(DESTRUCTIVE_OPS) + 4 * len(JITTER_FACTORS)
    null, actions = actions[0], actions[1:]
    oracles = [actions.pop(1 + len(DESTRUCTIVE_OPS))]
    for i in range(len(JITTER_FACTORS)):
        oracles.append(actions.pop(1 + len(DESTRUCTIVE_OPS) + 3 * i + 1))
    assert all(bool((a == 0).all()) for a in [null, *oracles])
    main = actions[0]
    assert bool((main[:, 4:] == 0).all())
    assert bool((main[:, :4] != 0).all())
    for i, op in enumerate(DESTRUCTIVE_OPS, start=1):
        torch.testing.assert_close(actions[i][:, :4], main[:, :4])
        flags = actions[i][:, [4, 5, 7]]
        expected = torch.zeros(3)
        expected[("grayscale", "blur", "solarize").index(op)] = 1
        assert bool((flags == expected).all()), op
        assert bool((actions[i][:, 6] > 0).all()) == (op == "blur")
    params = views.params
    for i, factor in enumerate(JITTER_FACTORS):
        col = JITTER_FACTORS.index(factor)
        bank, low, high = actions[1 + len(DESTRUCTIVE_OPS) + 3 * i:][:3]
        for action in (bank, low, high):
            varied = action[:, :4] != 0
            assert bool(varied[:, col].all()), factor
            assert not bool(varied[:, [c for c in range(4) if c != col]].any()), factor
            assert bool((action[:, 4:] == 0).all())
        strength = getattr(params, factor)
        ends = ((-2 * strength, 2 * strength) if factor == "hue"
                else (math.log(1 - strength), math.log(1 + strength)))
        torch.testing.assert_close(low[:, col], torch.full((5,), ends[0]))
        torch.testing.assert_close(high[:, col], torch.full((5,), ends[1]))


def test_shuffled_action_scores_low():
    model, views, masks = _setup(3)
    images = _images(32, 3)
    model.predictor = OraclePredictor(model, images, views, shift=1)
    result = evaluate_mrr(model, views, images, masks, bank_size=BANK,
                          generator=torch.Generator().manual_seed(0), normalize=normalize,
                          per_transform=False)
    # Another image's transformation is independent of this image's true entry: chance.
    assert result.mrr < 0.45
    assert abs(result.mrr - harmonic(BANK) / BANK) < 0.15


def test_action_blind_predictor_is_near_chance():
    # Conditioning "none" (I-JEPA): the prediction cannot depend on the action, the true
    # index is uniform and independent of it, so E[1/rank] = H_K / K (0.211 for K = 16;
    # one image's 1/rank has std ~0.23, so 64 images give a std of ~0.03).
    model, views, masks = _setup(1, conditioning="none")
    images = _images(64, 1)
    result = evaluate_mrr(model, views, images, masks, bank_size=BANK,
                          generator=torch.Generator().manual_seed(0), normalize=normalize,
                          per_transform=False)
    chance = harmonic(BANK) / BANK
    assert result.mrr < 0.5
    assert abs(result.mrr - chance) < 0.12
    # Its measured standard error is the one of random ranks, and it is at chance by it.
    assert result.stderr == pytest.approx(chance_mrr_stderr(BANK, 64), rel=0.3)
    assert abs(result.mrr - chance) < 4 * result.stderr


def test_result_fields_and_per_transform_entries():
    model, views, masks = _setup(1, strength="jitter")
    result = evaluate_mrr(model, views, _images(3, 1), masks, bank_size=4, normalize=normalize)
    assert isinstance(result, MRRResult)
    assert (result.bank, result.n_images, result.distance) == (4, 3, "cosine")
    assert 0.25 <= result.mrr <= 1.0
    assert set(result.per_transform) == set(JITTER_FACTORS) | set(DESTRUCTIVE_OPS)
    assert set(result.per_transform_stderr) == set(result.per_transform)
    for name in ("saturation", "hue", "grayscale"):
        assert result.per_transform[name] is None
        assert result.per_transform_stderr[name] is None
        assert "1-channel" in result.notes[name]
    for name in ("brightness", "contrast", "blur", "solarize"):
        assert 0.25 <= result.per_transform[name] <= 1.0
    # The jitter preset never trains with blur/solarize: scored, but flagged.
    assert "out of distribution" in result.notes["blur"]

    model, views, masks = _setup(3)
    result = evaluate_mrr(model, views, _images(2, 3), masks, bank_size=4, normalize=normalize)
    assert all(v is not None for v in result.per_transform.values())
    # One image has no spread: no error rather than a NaN that JSON cannot hold.
    result = evaluate_mrr(model, views, _images(1, 3), masks, bank_size=4, normalize=normalize)
    assert result.stderr is None and set(result.per_transform_stderr.values()) == {None}
    assert model.training  # restored after the call


def test_sensitivity_of_an_oracle_matches_the_encoder():
    model, views, masks = _setup(3)
    images = _images(8, 3)
    model.predictor = OraclePredictor(model, images, views)
    result = evaluate_mrr(model, views, images, masks, bank_size=4, normalize=normalize)
    assert set(result.sensitivity) == set(JITTER_FACTORS)
    for factor, s in result.sensitivity.items():
        assert s.encoder > 1e-4, factor
        assert s.predictor == pytest.approx(s.encoder, rel=1e-4), factor
        assert s.alignment == pytest.approx(1.0, abs=1e-4), factor


def test_sensitivity_of_an_action_blind_predictor_is_zero():
    model, views, masks = _setup(3, conditioning="none")
    result = evaluate_mrr(model, views, _images(8, 3), masks, bank_size=4, normalize=normalize)
    for factor, s in result.sensitivity.items():
        assert s.encoder > 1e-4, factor
        assert s.predictor == 0.0 and s.alignment == 0.0, factor


def test_sensitivity_finds_the_factor_an_encoder_is_invariant_to():
    # torchvision's hue rotation keeps each pixel's max and min over the channels, so an
    # encoder that only sees the channel max cannot see hue, but sees the rest.
    model, views, masks = _setup(3)
    images = _images(8, 3)
    target_tokens = model.target_tokens
    model.target_tokens = lambda x: target_tokens(x.amax(1, keepdim=True).expand_as(x))
    model.predictor = OraclePredictor(model, images, views)
    result = evaluate_mrr(model, views, images, masks, bank_size=4, normalize=normalize)
    s = result.sensitivity
    assert s["hue"].encoder < 1e-6 and s["hue"].predictor < 1e-6
    for factor in ("brightness", "contrast", "saturation"):
        assert s[factor].encoder > 1e-3, factor
    # The per-factor MRR says the same thing: the hue bank is all ties, the worst rank.
    assert result.per_transform["hue"] < 0.3 < result.per_transform["brightness"]


def test_sensitivity_of_a_full_hue_circle_compares_opposite_hues():
    # With hue 0.5 the range ends (-0.5 and +0.5 turn) are the same image: the measure
    # must compare hues half a turn apart instead, or it would read 0 for any encoder.
    model, views, masks = _setup(3)
    views = ViewSampler(dataclasses.replace(views.params, hue=0.5), 3, SIZE)
    images = _images(8, 3)
    model.predictor = OraclePredictor(model, images, views)
    result = evaluate_mrr(model, views, images, masks, bank_size=4, normalize=normalize)
    assert result.sensitivity["hue"].encoder > 1e-3
    low, high = (range_end(views.params, "hue", end, 2, torch.device("cpu"))
                 for end in (-1, 1))
    assert low.hue.tolist() == [-0.25, -0.25] and high.hue.tolist() == [0.25, 0.25]


def test_no_sensitivity_without_per_transform_or_a_second_image():
    model, views, masks = _setup(3)
    result = evaluate_mrr(model, views, _images(4, 3), masks, bank_size=4,
                          normalize=normalize, per_transform=False)
    assert result.sensitivity == {}
    result = evaluate_mrr(model, views, _images(1, 3), masks, bank_size=4, normalize=normalize)
    assert result.sensitivity == {} and "two different images" in result.notes["sensitivity"]


def test_chunking_does_not_change_the_result():
    model, views, masks = _setup(3, conditioning="sequence")
    images = _images(6, 3)
    results = [
        evaluate_mrr(model, views, images, masks, bank_size=BANK, chunk_size=chunk,
                     generator=torch.Generator().manual_seed(5), normalize=normalize)
        for chunk in (7, 10_000)
    ]
    assert results[0] == results[1]


def test_bank_always_applies_jitter():
    params = bank_view_params(ViewParams(jitter_p=0.8, brightness=0.4))
    assert (params.jitter_p, params.brightness, params.contrast) == (1.0, 0.4, 0.0)
    # I-JEPA's preset has no jitter: the bank falls back to the default jitter ranges.
    params = bank_view_params(ViewParams())
    assert params.jitter_p == 1.0 and params.brightness == 0.4 and params.hue == 0.1
    views = ViewSampler(params, 3, SIZE)
    sampled = views.sample_jitter(100, torch.Generator().manual_seed(0))
    assert bool(sampled.applied.all())


def _untrained_run(run: Path, fake_mnist_dir, preset: str, step: int) -> Path:
    """A run directory holding one checkpoint of an untrained small ``preset`` model."""
    from iwm.training.checkpoint import checkpoint_path, save_checkpoint

    cfg = load_config(preset, [f"data.root={fake_mnist_dir}", f"data.image_size={SIZE}",
                               "model.predictor_depth=1", "model.predictor_width=64"])
    save_checkpoint(checkpoint_path(run, step), {
        "step": step, "model": build_model(cfg, in_chans=1).state_dict(),
        "config": cfg.to_dict(), "in_chans": 1, "normalization": {"mean": [0.5], "std": [0.25]},
    })
    return run


def test_run_mrr_writes_results(tmp_path, fake_mnist_dir):
    run = _untrained_run(tmp_path / "run", fake_mnist_dir, "iwm-inv-tiny", step=3)
    out = run_mrr(run, n_images=6, bank_size=4, device="cpu", batch_size=4)
    saved = json.loads((run / "results" / "mrr.json").read_text())
    for key in ("mrr", "stderr", "bank", "n_images", "per_transform", "distance"):
        assert saved[key] == out[key]
    assert (saved["n_images"], saved["bank"], saved["distance"]) == (6, 4, "cosine")
    assert saved["per_transform"]["hue"] is None and saved["step"] == 3
    # Gray images: only brightness and contrast vary, so only they are measured.
    assert set(saved["sensitivity"]) == {"brightness", "contrast"}
    assert set(saved["sensitivity"]["contrast"]) == {"encoder", "predictor", "alignment"}


def test_all_does_not_depend_on_the_breakdown(tmp_path, fake_mnist_dir):
    torch.manual_seed(0)
    run = _untrained_run(tmp_path / "run", fake_mnist_dir, "iwm-equi-tiny", step=1)
    # Three batches: the breakdown's draws once shifted every later batch's main bank.
    kw = dict(n_images=12, bank_size=16, device="cpu", batch_size=4, progress=False)
    with_breakdown = run_mrr(run, per_transform=True, **kw)
    alone = run_mrr(run, per_transform=False, **kw)
    assert with_breakdown["mrr"] == alone["mrr"] and alone["per_transform"] == {}
    assert with_breakdown["per_transform"]["brightness"] is not None
    # Another seed draws other banks: the equality above is not a constant score.
    assert run_mrr(run, per_transform=False, seed=1, **kw)["mrr"] != alone["mrr"]


# ---------------------------------------------------------------- protocol: blocks, ties


def test_union_blocks_score_every_target_block():
    cfg = load_config("iwm-inv-tiny", [f"data.image_size={SIZE}"])
    grid = (SIZE // 4, SIZE // 4)
    union = protocol_masks(grid, cfg.mask, blocks="union")(8, torch.Generator().manual_seed(2))
    first = protocol_masks(grid, cfg.mask, blocks="first")(8, torch.Generator().manual_seed(2))
    assert union.targets.shape[1] == 1 and first.targets.shape[1] == cfg.mask.num_targets
    assert torch.equal(union.context, first.context)
    for i in range(8):
        blocks = set(first.targets[i][first.target_valid[i]].tolist())
        assert set(union.targets[i, 0][union.target_valid[i, 0]].tolist()) == blocks
    with pytest.raises(ValueError, match="blocks"):
        protocol_masks(grid, cfg.mask, blocks="all")


def test_indistinguishable_entries_count_as_the_truth():
    # White images: every brightness above 1 renders the same white image, so ranking
    # those entries against each other is a coin flip between identical latents.
    model, views, masks = _setup(1, strength="jitter")
    images = torch.ones(16, 1, SIZE, SIZE)
    model.predictor = OraclePredictor(model, images, views)
    kw = dict(bank_size=BANK, normalize=normalize, per_transform=True)
    rank = evaluate_mrr(model, views, images, masks, ties="rank",
                        generator=torch.Generator().manual_seed(0), **kw)
    truth = evaluate_mrr(model, views, images, masks, ties="truth",
                         generator=torch.Generator().manual_seed(0), **kw)
    # Contrast on a constant image is the identity: the whole bank is one image.
    assert truth.tied["contrast"] == pytest.approx(1.0)
    assert truth.per_transform["contrast"] == 1.0 == truth.per_transform_chance["contrast"]
    assert rank.per_transform["contrast"] == pytest.approx(1 / BANK)
    assert 0 < truth.tied["brightness"] < 1
    assert truth.per_transform["brightness"] == 1.0 > rank.per_transform["brightness"]
    # Chance rises with the ties, to exactly H_n / n of the entries left competing.
    assert truth.per_transform_chance["brightness"] > harmonic(BANK) / BANK
    assert rank.chance == pytest.approx(harmonic(BANK) / BANK)
    assert (truth.ties, truth.blocks, rank.ties) == ("truth", "union", "rank")


def test_action_blind_predictor_sits_at_its_own_chance_with_ties():
    # Half-white images make brightness ties common; an action-blind predictor's MRR must
    # still be the chance level the ties leave, not above it.
    model, views, masks = _setup(1, conditioning="none", strength="jitter")
    images = _images(64, 1).clamp_min(0.5)
    r = evaluate_mrr(model, views, images, masks, bank_size=BANK, normalize=normalize,
                     generator=torch.Generator().manual_seed(0))
    chance, mrr = r.per_transform_chance["brightness"], r.per_transform["brightness"]
    assert chance > harmonic(BANK) / BANK
    assert abs(mrr - chance) < 4 * r.per_transform_stderr["brightness"]


def test_decomposition_and_recovered_factors():
    model, views, masks = _setup(3)
    images = _images(16, 3)
    model.predictor = OraclePredictor(model, images, views)
    r = evaluate_mrr(model, views, images, masks, bank_size=BANK, normalize=normalize)
    # A perfect world model: its residual is its own prediction, and the nearest entry's
    # factor is the requested one.
    assert set(r.decomposition) == {"all", *JITTER_FACTORS}
    for name, d in r.decomposition.items():
        assert d.residual == 1.0, name
    for factor, rec in r.recovered.items():
        assert rec.slope == pytest.approx(1.0) and rec.r2 == pytest.approx(1.0), factor
    # An action-blind one: the residual is the clean latents, the same for every action,
    # so it ranks no better than chance, and the nearest entry does not follow the factor.
    model, views, masks = _setup(3, conditioning="none")
    r = evaluate_mrr(model, views, _images(64, 3), masks, bank_size=BANK,
                     normalize=normalize)
    assert r.decomposition["brightness"].residual < 0.45
    assert abs(r.recovered["brightness"].slope) < 0.3


def test_oracle_setting_gives_the_transformed_image_and_the_null_action():
    model, views, masks = _setup(3)
    images = _images(4, 3)
    seen = []
    forward_tokens = model.encoder.forward_tokens
    model.encoder.forward_tokens = lambda x, *a, **k: (seen.append(x.clone()),
                                                       forward_tokens(x, *a, **k))[1]
    evaluate_mrr(model, views, images, masks, bank_size=4, normalize=lambda x: x,
                 per_transform=False)
    # Calls: null action and main prediction on the clean images, then the oracle on the
    # true entries rendered.
    assert len(seen) == 3
    assert torch.equal(seen[0], images) and torch.equal(seen[1], images)
    assert not torch.equal(seen[2], images)
    assert seen[2].shape == images.shape


def test_bf16_encodes_rank_as_fp32_does():
    model, views, masks = _setup(3, conditioning="sequence")
    images = _images(16, 3)
    runs = [evaluate_mrr(model, views, images, masks, bank_size=BANK, normalize=normalize,
                         generator=torch.Generator().manual_seed(1), per_transform=False,
                         bf16=bf16) for bf16 in (False, True)]
    assert runs[0] != runs[1]  # bf16 really ran
    assert abs(runs[0].mrr - runs[1].mrr) < 0.1
    model.predictor = OraclePredictor(model, images, views)
    assert evaluate_mrr(model, views, images, masks, bank_size=BANK, normalize=normalize,
                        per_transform=False, bf16=True).mrr == 1.0
