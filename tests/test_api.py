"""iwm.load and the Pretrained object."""

import pytest
import torch

import iwm
from iwm.config import load_config
from iwm.data.actions import ACTION_DIM
from iwm.data.masks import MultiBlockMaskGenerator
from iwm.errors import CheckpointError
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
    masks = MultiBlockMaskGenerator((7, 7), model.config.mask)(2, torch.Generator())
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
