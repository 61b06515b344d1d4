"""The comparison with the official I-JEPA code: its harness, on a stand-in of that code.

The official code is not on PyPI and cannot be fetched here, so the harness runs against a
small stand-in with the same module layout and call signatures (ijepa_stand_in.py); the
real comparison's figures are in docs/RESULTS.md. No timing assertions.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch
from ijepa_stand_in import forget_stand_in, write_stand_in
from scripts import load_script  # tests/benchmarks/scripts.py


@pytest.fixture(scope="module")
def script() -> ModuleType:
    return load_script("vs_official_ijepa")


@pytest.fixture
def stand_in(tmp_path: Path) -> Iterator[Path]:
    yield write_stand_in(tmp_path / "ijepa")
    forget_stand_in()


SMALL = ["--model", "vit_tiny", "--image-size", "40", "--patch-size", "4", "--batch-size",
         "4", "--pred-depth", "1", "--pred-width", "48", "--steps", "2", "--warmup", "1",
         "--rounds", "2", "--device", "cpu"]


def test_both_sides_are_timed_and_written(script, stand_in, tmp_path, capsys):
    out = tmp_path / "r.json"
    r = script.main(["--ijepa-repo", str(stand_in), *SMALL, "--json", str(out),
                     "--iwm-variant", "train.grad_accum_steps=2"])
    assert json.loads(out.read_text()) == json.loads(json.dumps(r))
    names = {"official", "collator", "iwm", "iwm train.grad_accum_steps=2"}
    assert set(r["step_time_ms"]) == names
    for name in names:  # warm-up steps dropped: `steps` per round, `rounds` rounds
        assert len(r["step_time_ms_per_round"][name]) == 2
        assert r["step_time_ms"][name] > 0
    assert r["speedup"]["iwm"] == pytest.approx(r["images_per_s"]["iwm"]
                                                / r["images_per_s"]["official"])
    assert r["images_per_s"]["official_with_collator"] < r["images_per_s"]["official"]
    assert r["flops_per_image"]["iwm"] > r["flops_per_image"]["official"] > 0  # stand-in
    assert "official" in capsys.readouterr().out


def test_iwm_side_takes_the_official_recipe(script):
    args = script.parse_args(["--ijepa-repo", "x", "--model", "vit_small"])
    cfg = script.iwm_config(args, torch.device("cpu"))
    m, k, o = cfg.model, cfg.mask, cfg.optim
    assert (m.encoder, m.predictor_heads, m.loss, m.patch_size) == ("vit_small", 6,
                                                                   "smooth_l1", 8)
    assert (k.num_targets, k.target_scale, k.wrap, k.block_sizes) == (
        4, (0.15, 0.2), False, "per_batch")
    # The official code thins contexts to the batch's smallest and predicts block by block.
    assert (k.context_tokens, k.predictor_pass) == ("thin", "per_block")
    # The official context block is always 13 x 13 on the 14 x 14 grid: so is iwm's.
    assert k.context_scale[0] == 0.85 and 13.49 < k.context_scale[1] ** 0.5 * 14 < 13.5
    assert k.min_context * (112 // 8) ** 2 == pytest.approx(10)  # the official min_keep
    assert o.grad_clip is None and o.ema == (0.996, 1.0)


def test_a_folder_that_is_no_clone_is_a_one_line_error(script, tmp_path):
    with pytest.raises(SystemExit, match="no src/helper.py.*git clone"):
        script.main(["--ijepa-repo", str(tmp_path), *SMALL])


def test_grids_the_official_collator_cannot_fill_are_refused(script, capsys):
    # 8x8 patches: its smallest target block has 9 <= min_keep=10 patches, and the
    # official collator would redraw it forever.
    assert script.smallest_target_block(8) <= script.MIN_KEEP < script.smallest_target_block(14)
    with pytest.raises(SystemExit):
        script.parse_args(["--ijepa-repo", "x", "--image-size", "64", "--patch-size", "8"])
    assert "8x8 patch grid is too small" in capsys.readouterr().err


def test_bf16_on_cpu_is_refused(script, stand_in):
    with pytest.raises(SystemExit, match="CUDA-only"):
        script.main(["--ijepa-repo", str(stand_in), *SMALL, "--bf16"])
