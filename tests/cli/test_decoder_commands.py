"""``iwm decoder``, ``iwm imagine`` and ``iwm eval decoder`` on a tiny run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from iwm.cli.main import main
from iwm.interop.folder import DECODER_DIR, DECODER_WEIGHTS_FILE
from tiny_run import DECODER_FAST, make_tiny_decoder_run, make_tiny_run


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return make_tiny_decoder_run(tmp_path_factory.mktemp("decoder-cli"))


@pytest.fixture(autouse=True)
def block_data(run, monkeypatch):
    monkeypatch.setenv("IWM_DATA", str(run.parent / "fmnist"))


@pytest.fixture
def image_files(tmp_path) -> list[str]:
    paths = []
    for i, level in enumerate((40, 200)):
        path = tmp_path / f"img{i}.png"
        array = np.full((30, 34), level, np.uint8)
        array[:15] = 255 - level
        Image.fromarray(array).save(path)
        paths.append(str(path))
    return paths


def _error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_decoder_command_trains_and_saves(tmp_path, capsys):
    bare = make_tiny_run(tmp_path)
    capsys.readouterr()
    assert main(["decoder", str(bare), *DECODER_FAST, "decoder.epochs=1", "--device",
                 "cpu"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("latent decoder: 8 steps in ") and "held-out PSNR" in out
    assert f"`iwm imagine {bare} IMAGE" in out
    assert (bare / DECODER_DIR / DECODER_WEIGHTS_FILE).is_file()


def test_decoder_command_refuses_what_is_not_a_run(run, tmp_path, capsys):
    assert main(["decoder", str(tmp_path / "nowhere")]) == 2
    assert "not a run directory" in _error(capsys)
    assert main(["decoder", str(tmp_path)]) == 2
    assert "no checkpoint found" in _error(capsys)
    assert main(["decoder", str(run), "decoder.widht=3", "--device", "cpu"]) == 2
    assert "did you mean 'width'" in _error(capsys)


def test_imagine_writes_the_grid(run, image_files, tmp_path, capsys):
    out = tmp_path / "grid.png"
    assert main(["imagine", str(run), *image_files, "--action", "brightness=1.3",
                 "--out", str(out), "--device", "cpu"]) == 0
    assert str(out) in capsys.readouterr().out
    with Image.open(out) as image:
        assert image.size[0] > 0 and image.format == "PNG"


def test_imagine_errors_are_one_line_and_name_the_fix(run, image_files, tmp_path, capsys):
    out = str(tmp_path / "grid.png")
    assert main(["imagine", str(run), *image_files, "--action", "brigtness=1.3",
                 "--out", out]) == 2
    assert "unknown field 'brigtness'; fields: brightness" in _error(capsys)
    assert main(["imagine", str(run), *image_files, "--action", "hue=0.1", "--out", out,
                 "--device", "cpu"]) == 2
    assert "hue do nothing to this model's 1-channel images" in _error(capsys)
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("not an image")
    assert main(["imagine", str(run), str(not_an_image), "--action", "brightness=1.3",
                 "--out", out, "--device", "cpu"]) == 2
    assert "notes.png" in _error(capsys)
    # A run without a decoder says which command makes one, with this run's path in it.
    bare = tmp_path / "bare"
    shutil.copytree(run, bare, ignore=shutil.ignore_patterns(DECODER_DIR))
    assert main(["imagine", str(bare), *image_files, "--action", "brightness=1.3",
                 "--out", out, "--device", "cpu"]) == 2
    assert f"run `iwm decoder {bare}` first" in _error(capsys)
    assert main(["eval", "decoder", str(bare), "--device", "cpu"]) == 2
    assert f"run `iwm decoder {bare}` first" in _error(capsys)


def test_eval_decoder_prints_the_table(run, capsys):
    assert main(["eval", "decoder", str(run), "--images", "16", "--device", "cpu"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("latent decoder on 16 test images: PSNR ")
    assert lines[0].endswith(str(run / "results" / "decoder.json"))
    assert lines[2].split() == ["factor", "real", "real_decoded", "predicted", "null"]
    assert [line.split()[0] for line in lines[3:]] == ["brightness", "contrast"]
    assert json.loads((run / "results" / "decoder.json").read_text())["n_images"] == 16
    assert main(["eval", "decoder", str(run), "--images", "0"]) == 2
