"""The report's "What the world model imagines" section (the latent decoder)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from PIL import Image

from iwm.evaluation.decoder_eval import run_decoder_eval
from iwm.evaluation.report import IMAGINE_PNG, build_report
from iwm.interop.folder import DECODER_DIR
from tiny_run import copy_without_outputs, make_tiny_decoder_run

HEADING = "<h2>What the world model imagines</h2>"


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return make_tiny_decoder_run(tmp_path_factory.mktemp("report-decoder"))


@pytest.fixture
def fresh_run(run, tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("IWM_DATA", str(run.parent / "fmnist"))
    return copy_without_outputs(run, tmp_path)


def _section(page: Path) -> str:
    text = page.read_text()
    assert HEADING in text
    return text.split(HEADING, 1)[1].split("<h2>", 1)[0]


def _build(run_dir: Path) -> Path:
    return build_report(run_dir, n_images=2, bank_size=4, top_k=2, device="cpu")


def test_without_a_decoder_the_section_says_what_to_run(fresh_run):
    shutil.rmtree(fresh_run / DECODER_DIR)
    section = _section(_build(fresh_run))
    assert f"no latent decoder yet: run `iwm decoder {fresh_run}` first" in section
    assert f"then <code>iwm eval decoder {fresh_run}</code>" in section
    assert IMAGINE_PNG not in section


def test_the_grid_has_a_row_per_factor_then_the_measurements(fresh_run):
    page = _build(fresh_run)
    section = _section(page)
    assert f'<img src="{IMAGINE_PNG}"' in section
    assert f"not measured yet — run <code>iwm eval decoder {fresh_run}</code>" in section
    with Image.open(page.parent / IMAGINE_PNG) as image:
        width, height = image.size
    # Null action, brightness and contrast (a 1-channel run): 3 rows of 4 pictures.
    assert 0.6 < height / width < 0.95
    run_decoder_eval(fresh_run, n_images=8, device="cpu")
    section = _section(_build(fresh_run))
    assert "Reconstruction of 8 test images: PSNR" in section
    rows = re.findall(r"<tr><td>(\w+)</td><td>\[", section)
    assert rows == ["brightness", "contrast"]
    assert "real_decoded" in section and "not measured yet" not in section
