"""The latent decoder: its layout, training on a tiny run, and how it travels with a model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import iwm
from iwm.cli.main import main
from iwm.errors import CheckpointError
from iwm.evaluation.decoder_eval import held_out_images, reconstruction_psnr
from iwm.interop.folder import DECODER_DIR, DECODER_META_FILE, DECODER_WEIGHTS_FILE
from iwm.models.decoder import DecoderSpec, LatentDecoder, unpatchify
from iwm.models.vit import create_encoder
from tiny_run import make_tiny_decoder_run, make_tiny_run


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return make_tiny_decoder_run(tmp_path_factory.mktemp("decoder"))


@pytest.fixture(autouse=True)
def block_data(run, monkeypatch):
    monkeypatch.setenv("IWM_DATA", str(run.parent / "fmnist"))


def _spec(**kw) -> DecoderSpec:
    encoder = create_encoder("vit_micro", img_size=28, patch_size=4, in_chans=3)
    return DecoderSpec.for_encoder(encoder, **{"width": 32, "depth": 1, "num_heads": 2, **kw})


def test_unpatchify_puts_each_tokens_pixels_in_its_patch():
    grid, p, c = (2, 3), 2, 3
    patches = torch.randn(2, 6, c * p * p)
    images = unpatchify(patches, grid, p)
    assert images.shape == (2, c, 4, 6)
    for token in range(6):
        row, col = divmod(token, grid[1])
        block = images[:, :, row * p:(row + 1) * p, col * p:(col + 1) * p]
        torch.testing.assert_close(block, patches[:, token].view(2, c, p, p))


def test_decoder_gives_images_in_the_unit_range_and_reads_the_target_space():
    torch.manual_seed(0)
    decoder = LatentDecoder(_spec()).eval()
    tokens = torch.randn(4, 49, 128) * 3 + 1
    with torch.no_grad():
        images = decoder(tokens)
        # Layer-normed tokens (predictions) and raw ones (encode) decode alike.
        torch.testing.assert_close(decoder(F.layer_norm(tokens, (128,))), images)
    assert images.shape == (4, 3, 28, 28) and images.dtype == torch.float32
    assert float(images.min()) >= 0 and float(images.max()) <= 1


def test_spec_round_trips_and_a_bad_one_names_the_fix():
    spec = _spec(width=64, depth=2)
    assert DecoderSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    with pytest.raises(CheckpointError, match="iwm decoder RUN"):
        DecoderSpec.from_dict({"width": 64})


def test_trained_decoder_beats_the_mean_image_by_a_margin(run):
    info = json.loads((run / DECODER_DIR / DECODER_META_FILE).read_text())
    train = info["train"]
    # Four random grey squares per image: their mean image scores about 11 dB.
    assert train["val_psnr"] > train["val_mean_image_psnr"] + 6, train
    model = iwm.load(run)
    assert model.decoder is not None and not model.decoder.training
    psnr, mean_image = reconstruction_psnr(model, held_out_images(model.config, 64, "cpu"))
    assert psnr == pytest.approx(train["val_psnr"], abs=1e-3)  # the saved decoder itself
    assert info["encoder_step"] == model.step == 1
    assert info["spec"]["width"] == 64 and info["train"]["decoder_config"]["depth"] == 1


def test_decode_takes_encode_and_apply_outputs(run):
    model = iwm.load(run)
    images = held_out_images(model.config, 3, "cpu")
    tokens = model.encode(images)
    for latents in (tokens, model.apply(tokens, iwm.Action(brightness=1.3))):
        out = model.decode(latents)
        assert out.shape == images.shape and 0 <= float(out.min()) <= float(out.max()) <= 1


def test_export_carries_the_decoder_and_loads_it_back(run, tmp_path):
    model = iwm.load(run)
    tokens = model.encode(held_out_images(model.config, 4, "cpu"))
    out = tmp_path / "export"
    assert main(["export", str(run), "--format", "safetensors", "--out", str(out)]) == 0
    assert (out / DECODER_WEIGHTS_FILE).is_file()
    for loaded in (iwm.from_pretrained(out), iwm.load(out)):
        assert loaded.decoder is not None
        torch.testing.assert_close(loaded.decode(tokens), model.decode(tokens), rtol=0, atol=0)
    # And save_pretrained of a loaded export writes it again.
    again = iwm.from_pretrained(out).save_pretrained(tmp_path / "again")
    torch.testing.assert_close(iwm.load(again).decode(tokens), model.decode(tokens))


def _one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


def test_a_model_without_a_decoder_still_loads_and_says_what_to_run(tmp_path):
    bare = make_tiny_run(tmp_path)
    model = iwm.load(bare)
    assert model.decoder is None
    tokens = model.encode(torch.rand(1, 1, 28, 28))
    with pytest.raises(CheckpointError) as error:
        model.decode(tokens)
    assert "run `iwm decoder RUN` first" in _one_line(error)
    out = model.save_pretrained(tmp_path / "export")
    assert not (out / DECODER_WEIGHTS_FILE).exists()
    assert iwm.from_pretrained(out).decoder is None


def test_decode_refuses_other_shapes_in_one_line(run):
    model = iwm.load(run)
    for bad in (torch.zeros(2, 48, 128), torch.zeros(49, 128), torch.zeros(2, 49, 64)):
        with pytest.raises(ValueError) as error:
            model.decode(bad)
        assert "expected encoder tokens (B, 49, 128)" in _one_line(error)
    with pytest.raises(ValueError, match="expected floats"):
        model.decode(torch.zeros(1, 49, 128, dtype=torch.long))


def test_a_decoder_of_an_older_encoder_is_refused(run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    model = iwm.load(copy)
    with torch.no_grad():
        model.encoder.norm.weight.mul_(1.01)  # as further training would move it
    assert not model.attach_decoder(copy / DECODER_DIR)
    with pytest.raises(CheckpointError) as error:
        model.decode(model.encode(torch.rand(1, 1, 28, 28)))
    message = _one_line(error)
    assert "encoder of step 1, which has changed since" in message
    assert "iwm decoder RUN" in message
    # A damaged decoder costs the decoder only: the model loads, with a warning, and
    # decode says how to remake it.
    (copy / DECODER_DIR / DECODER_META_FILE).write_text("{not json")
    with pytest.warns(UserWarning, match="unreadable decoder"):
        model = iwm.load(copy)
    with pytest.raises(CheckpointError, match="unreadable decoder.*iwm decoder RUN"):
        model.decode(model.encode(torch.rand(1, 1, 28, 28)))
