"""What the world model imagines: actions from text, the grid, and the decoder's scores."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import Tensor

import iwm
from iwm.config import load_config
from iwm.data import photometric as P
from iwm.data.actions import JitterParams
from iwm.data.views import ViewParams, ViewSampler
from iwm.errors import ConfigError
from iwm.evaluation.decoder_eval import (
    RANGES,
    SETTINGS,
    evaluate_decoder,
    held_out_images,
    run_decoder_eval,
)
from iwm.evaluation.imagine import (
    COLUMNS,
    describe_action,
    imagine,
    parse_action,
    plot_imagine,
    render_jitter,
    showcase_actions,
)
from tiny_run import make_tiny_decoder_run


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return make_tiny_decoder_run(tmp_path_factory.mktemp("imagine"))


@pytest.fixture(autouse=True)
def block_data(run, monkeypatch):
    monkeypatch.setenv("IWM_DATA", str(run.parent / "fmnist"))


def test_parse_action_reads_every_field():
    assert parse_action("brightness=1.3, hue=-0.1") == iwm.Action(brightness=1.3, hue=-0.1)
    assert parse_action("grayscale=true,blur_sigma=1.5,solarize=0") == iwm.Action(
        grayscale=True, blur_sigma=1.5)
    assert parse_action("") == iwm.Action()


@pytest.mark.parametrize("text, message", [
    ("brigtness=1.3", "unknown field 'brigtness'; fields: brightness (number), contrast"),
    ("brightness", "'brightness' is not field=value"),
    ("brightness=lots", "brightness='lots': expected a number"),
    ("contrast=-1", "Action.contrast=-1.0: must be >= 0"),
    ("grayscale=maybe", "grayscale='maybe': expected true or false"),
])
def test_a_bad_action_is_one_line_naming_the_fields(text, message):
    with pytest.raises(ConfigError) as error:
        parse_action(text)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_describe_action():
    assert describe_action(iwm.Action()) == "null action"
    assert describe_action(iwm.Action(brightness=1.3, solarize=True)) == \
        "brightness=1.3, solarize"


def test_render_jitter_is_the_training_jitter_in_its_order():
    x = 0.2 + 0.6 * torch.rand(3, 3, 12, 12, generator=torch.Generator().manual_seed(0))
    factors = {"brightness": torch.tensor([1.3, 0.7, 1.0]),
               "contrast": torch.tensor([0.8, 1.2, 1.1]),
               "saturation": torch.tensor([1.2, 0.5, 0.9]),
               "hue": torch.tensor([0.1, -0.2, 0.05])}
    params = JitterParams(**factors, applied=torch.ones(3, dtype=torch.bool))
    expected = ViewSampler(ViewParams(), 3, 12).apply_jitter(x, params)
    torch.testing.assert_close(render_jitter(x, factors), expected)
    assert torch.equal(render_jitter(x, {"hue": 0.0, "brightness": 1.0}), x)  # untouched


def test_showcase_actions_take_the_visible_end_of_the_runs_ranges():
    grey = showcase_actions(load_config("iwm-equi-tiny"), 1)  # 'strong' views
    assert [describe_action(a) for a in grey] == ["null action", "brightness=1.8",
                                                 "contrast=0.2"]
    colour = showcase_actions(load_config("iwm-equi-shapes"), 3)  # 'destructive': the jitter
    assert [describe_action(a) for a in colour[1:]] == [
        "brightness=1.4", "contrast=0.6", "saturation=0.8", "hue=0.1"]


def test_imagine_draws_the_four_columns(run, tmp_path):
    model = iwm.load(run)
    images = held_out_images(model.config, 2, "cpu")
    result = imagine(model, images, [iwm.Action(brightness=1.3), iwm.Action(blur_sigma=1.0)])
    assert torch.equal(result.source[0], images[0])  # a jitter leaves the source alone
    assert not torch.equal(result.source[1], images[1])  # ...a blur is done to it
    torch.testing.assert_close(result.real[0], P.adjust_brightness(images[:1], 1.3)[0])
    assert torch.equal(result.real[1], images[1])  # the target of "unblur" is the clean image
    for pictures in (result.predicted, result.real_decoded):
        assert pictures.shape == images.shape
        assert 0 <= float(pictures.min()) <= float(pictures.max()) <= 1
    png = plot_imagine(result, tmp_path / "sub" / "grid.png", title="test")
    with Image.open(png) as image:
        width, height = image.size
    assert width > height  # 2 rows of len(COLUMNS) = 4 pictures
    assert len(COLUMNS) == 4
    with pytest.raises(ValueError, match="3 actions for 2 images"):
        imagine(model, images, [iwm.Action()] * 3)


class _PixelWorld:
    """A model whose tokens are the pixels and whose world model is exact: what the real
    transformed image is, the prediction is, so every setting's fit is known."""

    def __init__(self) -> None:
        self.device = torch.device("cpu")
        self.decoder = object()  # "has a decoder"
        self.decoder_info: dict = {}

    def check_images(self, images: Tensor) -> Tensor:
        self.shape = images.shape[1:]
        return images

    def encode(self, images: Tensor) -> Tensor:
        return images.flatten(1)[:, None]

    def decode(self, tokens: Tensor) -> Tensor:
        return tokens.reshape(-1, *self.shape)

    def apply(self, tokens: Tensor, action: Tensor | None) -> Tensor:
        if action is None:
            return tokens
        factors = {"brightness": action[:, 0].exp(), "contrast": action[:, 1].exp(),
                   "saturation": action[:, 2].exp(), "hue": action[:, 3] / 2}
        return self.encode(render_jitter(self.decode(tokens), factors))


def test_decoder_scores_know_the_truth_from_no_world_model():
    # Mid-range pixels: no factor of RANGES clips, so the real images move exactly as asked.
    images = 0.3 + 0.3 * torch.rand(40, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    result = evaluate_decoder(_PixelWorld(), images, batch_size=16)
    assert result["psnr"] == pytest.approx(100.0)  # perfect reconstruction (MSE floor)
    assert result["n_images"] == 40 and result["notes"] == {}
    assert set(result["factors"]) == set(RANGES)
    for factor, entry in result["factors"].items():
        for name in ("real", "real_decoded", "predicted"):
            assert entry[name]["slope"] == pytest.approx(1.0, abs=2e-3), (factor, name)
            assert entry[name]["r2"] == pytest.approx(1.0, abs=1e-4), (factor, name)
        assert entry["null"]["slope"] == pytest.approx(0.0, abs=1e-4), factor
        assert entry["space"] == ("turns" if factor == "hue" else "log")
        assert entry["psnr_to_real"]["predicted"] == pytest.approx(100.0)
        assert entry["psnr_to_real"]["null"] < 60
    assert set(SETTINGS) == {"real", "real_decoded", "predicted", "null"}


def test_run_decoder_eval_writes_its_result(run):
    r = run_decoder_eval(run, n_images=16, seed=3, device="cpu")
    saved = json.loads((run / "results" / "decoder.json").read_text())
    assert r["path"] == str(run / "results" / "decoder.json")
    assert saved["n_images"] == 16 and saved["seed"] == 3 and saved["step"] == 1
    assert saved["psnr"] > saved["mean_image_psnr"] + 6
    # 1-channel images: only brightness and contrast can be asked.
    assert set(saved["factors"]) == {"brightness", "contrast"}
    assert set(saved["notes"]) == {"saturation", "hue"}
    fit = saved["factors"]["brightness"]["real"]
    assert fit["n"] == 16 and not math.isnan(fit["slope"])
    assert saved["decoder_val_psnr"] is not None
