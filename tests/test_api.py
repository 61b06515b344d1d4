"""iwm.load and the Pretrained object."""

import numpy as np
import pytest
import torch

import iwm
from iwm.config import load_config
from iwm.data.actions import ACTION_DIM
from iwm.data.masks import MultiBlockMaskSampler
from iwm.errors import CheckpointError, DataError
from iwm.training.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from iwm.training.loop import pretrain


@pytest.fixture(scope="module")
def run(tmp_path_factory, fake_mnist_dir_module):
    import os

    old = os.environ.get("IWM_DATA")
    os.environ["IWM_DATA"] = str(fake_mnist_dir_module)
    try:
        cfg = load_config("iwm-equi-tiny", ["train.batch_size=16", "train.epochs=0.25",
                                            "train.progress=false", "model.predictor_depth=2"])
        return pretrain(cfg, tmp_path_factory.mktemp("api") / "run")
    finally:
        if old is None:
            os.environ.pop("IWM_DATA")
        else:
            os.environ["IWM_DATA"] = old


@pytest.fixture(scope="module")
def fake_mnist_dir_module(tmp_path_factory):
    from conftest import write_fake_mnist

    folder = tmp_path_factory.mktemp("fmnist")
    write_fake_mnist(folder)
    return folder


def test_load_run_directory_and_checkpoint_file_agree(run):
    a = iwm.load(run)
    b = iwm.load(list_checkpoints(run)[-1][1])
    x = torch.rand(2, 1, 28, 28)
    torch.testing.assert_close(a.encode(x), b.encode(x))
    assert a.step == 1 and not a.model.training


def test_encode_uses_the_target_encoder_and_normalisation(run):
    model = iwm.load(run)
    x = torch.rand(3, 1, 28, 28)
    tokens = model.encode(x)
    assert tokens.shape == (3, 49, 128)
    expected = model.model.target_encoder.forward_tokens(model.normalize(x))
    torch.testing.assert_close(tokens, expected)
    torch.testing.assert_close(model.encode(x, pooled=True), tokens.mean(1))
    uint8 = (x * 255).round().to(torch.uint8)
    torch.testing.assert_close(model.encode(uint8), model.encode(uint8.float() / 255))


def test_predict_with_masks_and_null_action(run):
    model = iwm.load(run)
    tokens = model.encode(torch.rand(2, 1, 28, 28))
    masks = MultiBlockMaskSampler((7, 7), model.config.mask)(2, torch.Generator())
    pred = model.predict(tokens, masks, torch.zeros(2, ACTION_DIM))
    assert pred.shape == (*masks.targets.shape, 128)
    torch.testing.assert_close(model.predict(tokens, masks), pred)  # None = null action
    assert model.predict(tokens).shape == tokens.shape


def test_checkpoint_of_another_configuration_lists_mismatched_shapes(run, tmp_path):
    state = load_checkpoint(list_checkpoints(run)[-1][1])
    state["model"]["encoder.pos_embed"] = torch.zeros(1, 16, 128)
    bad = tmp_path / "bad.pt"
    save_checkpoint(bad, state)
    with pytest.raises(CheckpointError, match=r"encoder.pos_embed: \(1, 16, 128\)"):
        iwm.load(bad)


def test_not_a_pretraining_checkpoint(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, path)
    with pytest.raises(CheckpointError, match="not an iwm pretraining checkpoint"):
        iwm.load(path)


@pytest.mark.parametrize("make, message", [
    (lambda: torch.rand(2, 1, 224, 224), r"expected \(B, 1, 28, 28\), got \(2, 1, 224, 224\)"),
    (lambda: torch.rand(2, 3, 28, 28), r"expected \(B, 1, 28, 28\), got \(2, 3, 28, 28\)"),
    (lambda: torch.rand(1, 28, 28), r"images\[None\]"),
    (lambda: torch.rand(2, 1, 28, 28) * 255, r"must be floats in \[0, 1\].*divide uint8"),
    (lambda: torch.rand(2, 1, 28, 28) - 0.5, r"must be floats in \[0, 1\]"),
    (lambda: torch.ones(2, 1, 28, 28, dtype=torch.int64), "dtype torch.int64"),
    (lambda: [[0.5]], "expected a tensor"),
    (lambda: torch.rand(0, 1, 28, 28), "an empty batch.*at least one image"),
])
def test_bad_images_are_one_line_value_errors(run, make, message):
    model = iwm.load(run)
    with pytest.raises(ValueError, match=message) as err:
        model.encode(make())
    assert "\n" not in str(err.value)
    if "expected (B" in str(err.value):
        assert "resize to 28 x 28 px with 1 channel(s)" in str(err.value)
        assert "load_images" in str(err.value)


def test_latents_actions_and_banks_of_the_wrong_shape_are_one_line_errors(run):
    model = iwm.load(run)
    tokens = model.encode(torch.rand(2, 1, 28, 28))
    assert tokens.shape == (2, 49, 128)
    with pytest.raises(ValueError, match=r"expected encoder tokens \(B, 49, 128\), got "
                                         r"\(2, 128\)"):
        model.apply(tokens.mean(1), iwm.Action(brightness=1.2))
    with pytest.raises(ValueError, match=r"latents: expected encoder tokens"):
        model.predict(tokens[:, :10])
    with pytest.raises(ValueError, match=rf"action: expected \(2, {ACTION_DIM}\), got \(1, "):
        model.apply(tokens, iwm.Action(brightness=1.2).to_tensor(1))
    with pytest.raises(ValueError, match="width 128 but bank 64"):
        model.retrieve(tokens, torch.rand(5, 64))


def test_load_images_crops_resizes_and_converts_to_the_models_channels(run, tmp_path):
    from PIL import Image

    model = iwm.load(run)  # 1 channel, 28 px
    # RGB 60 x 100: a grey central square between white margins. The central square,
    # resized, is uniform grey; a stretch or an off-centre crop would bring white in.
    wide = np.full((60, 100, 3), 255, np.uint8)
    wide[:, 20:80] = 100
    Image.fromarray(wide).save(tmp_path / "wide.png")
    # Grayscale ("L") at the model's size: read exactly, without resampling.
    exact = np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8)
    Image.fromarray(exact).save(tmp_path / "exact.png")
    images = model.load_images([tmp_path / "wide.png", str(tmp_path / "exact.png")])
    assert images.shape == (2, 1, 28, 28) and images.dtype == torch.float32
    # atol: the luma weights (torchvision's) sum to 0.9999; a white margin would be 0.6 off.
    torch.testing.assert_close(images[0], torch.full((1, 28, 28), 100 / 255), atol=1e-4,
                               rtol=0)
    torch.testing.assert_close(images[1, 0], torch.from_numpy(exact).float() / 255,
                               atol=1e-4, rtol=0)
    assert model.load_images(tmp_path / "exact.png").shape == (1, 1, 28, 28)
    assert model.encode(images, pooled=True).shape == (2, 128)
    (tmp_path / "bad.png").write_text("not a png")
    with pytest.raises(DataError, match="bad.png: cannot read image"):
        model.load_images([tmp_path / "bad.png"])


def test_load_images_gives_a_3_channel_model_rgb(tmp_path):
    from PIL import Image

    cfg = load_config("iwm-inv-shapes", ["model.predictor_depth=1"])
    model = iwm.Pretrained.create(cfg, in_chans=3, normalization={"mean": [0.5] * 3,
                                                                  "std": [0.25] * 3})
    size = model.image_size
    rgb = np.random.default_rng(1).integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    Image.fromarray(rgb[..., 0]).save(tmp_path / "gray.png")
    Image.fromarray(np.dstack([rgb, np.full((size, size), 7, np.uint8)])).save(
        tmp_path / "rgba.png")
    images = model.load_images([tmp_path / "rgb.png", tmp_path / "gray.png",
                                tmp_path / "rgba.png"])
    assert images.shape == (3, 3, size, size)
    expected = torch.from_numpy(rgb).permute(2, 0, 1).float() / 255
    torch.testing.assert_close(images[0], expected, atol=0, rtol=0)
    torch.testing.assert_close(images[1], expected[:1].expand(3, -1, -1), atol=0, rtol=0)
    torch.testing.assert_close(images[2], expected, atol=0, rtol=0)  # alpha dropped
