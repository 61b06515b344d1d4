"""Exports: the encoder for timm, the whole model as safetensors, and torch.hub."""

import importlib.util
import json
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file

import iwm
from iwm.cli.main import main
from iwm.errors import CheckpointError, ConfigError
from iwm.interop.export import export, export_timm, timm_architecture
from iwm.models.vit import ENCODERS, create_encoder
from tiny_run import make_tiny_run

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return make_tiny_run(tmp_path_factory.mktemp("export"))


@pytest.fixture(scope="module")
def model(run):
    return iwm.load(run)


def test_timm_export_loads_with_pretrained_file_overlay(model, tmp_path):
    out = export_timm(model, tmp_path / "timm")
    cfg = json.loads((out / "config.json").read_text())
    weights = out / "model.safetensors"
    # The documented call: offline, from the weights file and the JSON's kwargs only.
    encoder = timm.create_model(cfg["architecture"], pretrained=True, num_classes=0,
                                pretrained_cfg_overlay=dict(file=str(weights)),
                                **cfg["model_args"]).eval()
    saved = load_file(weights)
    # timm loads non-strictly here (its registry head has 1000 classes), so check the keys
    # and every value ourselves.
    assert set(encoder.state_dict()) == set(saved) == set(model.encoder.state_dict())
    for key, value in encoder.state_dict().items():
        torch.testing.assert_close(value, saved[key], rtol=0, atol=0, msg=key)
    x = torch.rand(3, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(encoder(model.normalize(x)), model.encode(x, pooled=True))


def test_timm_export_loads_as_a_local_folder_with_its_preprocessing(run, tmp_path):
    out = tmp_path / "timm"
    assert main(["export", str(run), "--format", "timm", "--out", str(out)]) == 0
    encoder = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    model = iwm.load(run)
    data = timm.data.resolve_data_config({}, model=encoder)
    assert data["input_size"] == (1, 28, 28)
    assert data["mean"] == pytest.approx(model.normalize.mean.flatten().tolist())
    assert data["std"] == pytest.approx(model.normalize.std.flatten().tolist())
    x = torch.rand(2, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(encoder(model.normalize(x)), model.encode(x, pooled=True))
    with pytest.raises(CheckpointError, match="timm export.*--format safetensors") as err:
        iwm.load(out)
    assert "\n" not in str(err.value)


def test_timm_config_states_the_real_architecture(model, tmp_path):
    cfg = json.loads((export_timm(model, tmp_path / "timm") / "config.json").read_text())
    args, real = cfg["model_args"], model.encoder
    # vit_micro (patch 4, 128 wide, 6 deep, 4 heads, 28 px, 1 channel) is not in timm's
    # registry: the registered base is named, and model_args carry every real dimension.
    assert timm.is_model(cfg["architecture"])
    assert (args["patch_size"], args["img_size"], args["in_chans"]) == (4, 28, 1)
    assert (args["embed_dim"], args["depth"], args["num_heads"]) == (128, 6, 4)
    assert args["patch_size"] == real.patch_embed.patch_size[0] == model.config.model.patch_size
    assert args["embed_dim"] == real.embed_dim == cfg["num_features"]
    assert args["depth"] == len(real.blocks)
    assert args["num_heads"] == real.blocks[0].attn.num_heads
    note = cfg["iwm"]["architecture_note"]
    assert cfg["architecture"] in note and "patch 4, width 128, depth 6, 4 heads" in note
    # And timm builds exactly that from the folder.
    built = timm.create_model(f"local-dir:{tmp_path / 'timm'}", pretrained=True)
    assert built.patch_embed.patch_size == (4, 4) and built.embed_dim == 128
    assert len(built.blocks) == 6 and built.blocks[0].attn.num_heads == 4
    assert {k: v.shape for k, v in built.state_dict().items()} == {
        k: v.shape for k, v in real.state_dict().items()}


@pytest.mark.parametrize("encoder, patch, size, name", [
    ("vit_micro", 4, 28, "vit_tiny_patch16_224"),
    ("vit_base", 16, 224, "vit_base_patch16_224"),
    ("vit_small", 8, 224, "vit_small_patch8_224"),
    ("vit_base", 4, 32, "vit_base_patch16_224"),
])
def test_timm_architecture_is_the_exact_name_when_registered(encoder, patch, size, name):
    assert timm_architecture(encoder, patch, size) == name


def test_load_encoder_reads_a_timm_export_as_the_runs_target_encoder(model, tmp_path):
    out = export_timm(model, tmp_path / "timm")
    encoder = iwm.load_encoder(out)
    assert isinstance(encoder, iwm.PretrainedEncoder) and not isinstance(encoder, iwm.Pretrained)
    assert (encoder.step, encoder.in_chans, encoder.image_size) == (model.step, 1, 28)
    assert encoder.config == model.config
    x = torch.rand(3, 1, 28, 28)
    torch.testing.assert_close(encoder.encode(x), model.encode(x), rtol=0, atol=0)
    # The encoder is all a timm export needs, so it exports again, unchanged.
    again = export(out, "timm", tmp_path / "again")
    assert load_file(again / "model.safetensors").keys() == load_file(
        out / "model.safetensors").keys()
    assert json.loads((again / "config.json").read_text()) == json.loads(
        (out / "config.json").read_text())


@pytest.mark.parametrize("name", sorted(ENCODERS))
def test_every_encoder_size_has_its_timm_architecture(name):
    # Shapes only, on the meta device: vit_huge would take seconds and gigabytes otherwise.
    spec = ENCODERS[name]
    kwargs = dict(img_size=32, patch_size=16, in_chans=3, embed_dim=spec.embed_dim,
                  depth=spec.depth, num_heads=spec.num_heads, class_token=False,
                  global_pool="avg", fc_norm=False)
    with torch.device("meta"):
        ours = create_encoder(name, img_size=32, patch_size=16, in_chans=3)
        theirs = timm.create_model(spec.timm_name, num_classes=0, **kwargs)
    expected = {k: v.shape for k, v in ours.state_dict().items()}
    assert {k: v.shape for k, v in theirs.state_dict().items()} == expected


def test_save_pretrained_round_trip_is_identical(model, tmp_path):
    out = model.save_pretrained(tmp_path / "hf")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    meta = json.loads((out / "config.json").read_text())
    assert meta["in_chans"] == 1 and meta["normalization"]["mean"] == [0.286]
    for back in (iwm.from_pretrained(out), iwm.load(out)):
        assert back.step == model.step and back.config == model.config
        for key, value in model.model.state_dict().items():
            torch.testing.assert_close(back.model.state_dict()[key], value, rtol=0, atol=0)
        x = torch.rand(2, 1, 28, 28)
        tokens = model.encode(x)
        torch.testing.assert_close(back.encode(x), tokens, rtol=0, atol=0)
        action = iwm.Action(brightness=1.2)
        torch.testing.assert_close(back.apply(tokens, action), model.apply(tokens, action),
                                   rtol=0, atol=0)


def test_cli_safetensors_export_holds_all_three_networks(run, tmp_path, capsys):
    out = tmp_path / "full"
    assert main(["export", str(run), "--format", "safetensors", "--out", str(out)]) == 0
    assert "iwm.from_pretrained" in capsys.readouterr().out
    prefixes = {k.split(".")[0] for k in load_file(out / "model.safetensors")}
    assert prefixes == {"encoder", "target_encoder", "predictor"}


def test_broken_exports_are_one_line_errors(model, tmp_path, capsys):
    out = model.save_pretrained(tmp_path / "hf")
    (out / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        iwm.from_pretrained(out)
    (out / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="not an iwm export"):
        iwm.load(out)
    with pytest.raises(CheckpointError, match="no config.json"):
        iwm.from_pretrained(tmp_path)
    assert main(["export", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "no such run directory" in capsys.readouterr().err


def test_torch_hub_loads_a_run_or_builds_an_untrained_model(run, model):
    hub = torch.hub.load(str(REPO), "iwm_vit_micro", source="local", checkpoint=str(run))
    x = torch.rand(2, 1, 28, 28)
    torch.testing.assert_close(hub.encode(x), model.encode(x))
    with pytest.raises(CheckpointError, match="'iwm_vit_micro'"):
        torch.hub.load(str(REPO), "iwm_vit_tiny", source="local", checkpoint=str(run))
    # Without a checkpoint: an untrained ImageNet-shaped model (vit_micro keeps it cheap).
    fresh = torch.hub.load(str(REPO), "iwm_vit_micro", source="local")
    assert fresh.step == 0 and (fresh.in_chans, fresh.image_size) == (3, 224)
    assert fresh.encode(torch.rand(1, 3, 224, 224), pooled=True).shape == (1, 128)
    # What torch.hub.list would show (it only takes GitHub repositories): one per size.
    spec = importlib.util.spec_from_file_location("hubconf", REPO / "hubconf.py")
    hubconf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hubconf)
    entries = [n for n in dir(hubconf) if callable(getattr(hubconf, n)) and n[0] != "_"]
    assert sorted(entries) == sorted(f"iwm_{name}" for name in ENCODERS)
    with pytest.raises(ConfigError, match="unknown"):
        from iwm.interop.hub import hub_model

        hub_model("vit_gigantic")
