"""The grid file: cells from blocks, per-scale levels, and one-line errors for mistakes."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from iwm.errors import ConfigError
from iwm.study.grid import load_study, parse_study

GRID = {
    "seeds": [0, 1, 2],
    "axes": {
        "conditioning": {"none": ["model.conditioning=none"],
                         "feature": ["model.conditioning=feature"]},
        "depth": {"shallow": ["model.predictor_depth=2"], "deep": ["model.predictor_depth=6"]},
        "strength": {"none": ["views.strength=none"], "jitter": ["views.strength=jitter"]},
    },
    "blocks": {
        "cond": {"conditioning": "all", "depth": ["deep"], "strength": ["jitter"]},
        "depth": {"conditioning": ["feature"], "depth": "all", "strength": ["jitter"]},
        "ijepa": {"conditioning": ["none"], "depth": ["shallow"], "strength": ["none"]},
    },
    "roles": {"equivariant": "feature-deep-jitter"},
    "scales": {
        "small": {"preset": "iwm-equi-tiny", "overrides": ["train.epochs=1"]},
        "big": {"preset": "iwm-equi-tiny", "blocks": ["cond"],
                "levels": {"depth": {"deep": ["model.predictor_depth=8"]}}},
    },
}


def test_blocks_are_products_and_the_union_has_no_duplicates():
    study = parse_study(GRID)
    names = [c.name for c in study.cells("small")]
    # cond: 2 cells; depth: feature-shallow-jitter + feature-deep-jitter (already in cond).
    assert names == ["none-deep-jitter", "feature-deep-jitter", "feature-shallow-jitter",
                     "none-shallow-none"]
    cell = study.cells("small")[1]
    assert cell.levels == {"conditioning": "feature", "depth": "deep", "strength": "jitter"}
    assert cell.overrides == ("train.epochs=1", "model.conditioning=feature",
                              "model.predictor_depth=6", "views.strength=jitter")


def test_a_scale_replaces_levels_and_picks_blocks():
    study = parse_study(GRID)
    cells = study.cells("big")
    assert [c.name for c in cells] == ["none-deep-jitter", "feature-deep-jitter"]
    assert "model.predictor_depth=8" in cells[0].overrides
    assert "model.predictor_depth=6" not in cells[0].overrides


def test_fingerprint_follows_the_overrides():
    a = parse_study(GRID).cells("small")[1]
    b = parse_study(GRID).cells("big")[1]
    assert a.name == b.name and a.fingerprint() != b.fingerprint()
    assert a.fingerprint() == parse_study(GRID).cells("small")[1].fingerprint()


def _broken(path: list[str], value: object) -> dict:
    grid = copy.deepcopy(GRID)
    node = grid
    for key in path[:-1]:
        node = node[key]
    if value is None:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return grid


@pytest.mark.parametrize("path, value, message", [
    (["blocks", "cond", "depth"], ["medium"], "unknown level 'medium'"),
    (["blocks", "cond", "strength"], None, "picks no level of axis 'strength'"),
    (["scales", "big", "blocks"], ["nope"], "unknown block 'nope'"),
    (["roles", "equivariant"], "feature-shallow-none", "is not a cell of scale"),
    (["scales", "small", "overrides"], ["train.precision=fp8"], "cell none-deep"),
    (["scales", "small", "overrides"], ["model.encoder=vit_xl"], "'vit_xl': must be one of"),
    (["scales", "small", "workers"], 0, "workers must be >= 1"),
    (["scales", "small", "colour"], "red", "unknown key(s) colour"),
    (["seeds"], [1, 1], "without repeats"),
    (["axes"], None, "missing 'axes'"),
])
def test_mistakes_are_config_errors_naming_them(path, value, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_study(_broken(path, value))


def test_unknown_scale_lists_the_defined_ones():
    with pytest.raises(ConfigError, match="defines small, big"):
        parse_study(GRID).cells("huge")


def test_the_papers_grid_file_is_valid():
    study = load_study(Path(__file__).parents[2] / "benchmarks" / "paper" / "grid.yaml")
    assert len(study.seeds) >= 3
    cpu = [c.name for c in study.cells("cpu")]
    assert {"none-deep-strong", "sequence-deep-strong", "feature-deep-strong",
            "none-shallow-none"} <= set(cpu)
    # The gpu scale is the whole conditioning x depth x strength product, plus I-JEPA.
    assert len(study.cells("gpu")) == 3 * 2 * 3 + 1


def test_missing_or_invalid_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_study(tmp_path / "grid.yaml")
    (tmp_path / "bad.yaml").write_text("axes: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_study(tmp_path / "bad.yaml")


def test_cli_errors_are_one_line(tmp_path, capsys):
    from iwm.cli.main import main

    grid = str(Path(__file__).parents[2] / "benchmarks" / "paper" / "grid.yaml")
    assert main(["study", "run", grid, "--scale", "tpu", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "defines cpu, cpu-color, gpu, gpu-color" in err and err.count("\n") == 1
    assert main(["study", "table", grid, "--scale", "cpu", "--out", str(tmp_path)]) == 2
    assert "holds no finished cell yet" in capsys.readouterr().err
    assert not (tmp_path / "cells").exists()  # nothing was started
