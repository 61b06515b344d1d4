"""The table and the findings' statistics, from cells' JSON written by hand (no training)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from iwm.errors import ConfigError
from iwm.study.grid import parse_study
from iwm.study.runner import Task, task_json
from iwm.study.summary import compare, summarise

GRID = {
    "seeds": [0, 1, 2],
    "axes": {
        "conditioning": {"none": ["model.conditioning=none"],
                         "feature": ["model.conditioning=feature"]},
        "depth": {"shallow": ["model.predictor_depth=2"], "deep": ["model.predictor_depth=6"]},
        "strength": {"jitter": ["views.strength=jitter"], "strong": ["views.strength=strong"]},
    },
    "blocks": {"all": {"conditioning": "all", "depth": "all", "strength": "all"}},
    "roles": {"invariant": "feature-shallow-jitter", "equivariant": "feature-deep-strong"},
    "scales": {"s": {"preset": "iwm-equi-tiny"}},
}
CHANCE = 0.07


def _write(out: Path, study, values: dict[str, dict[str, list[float]]]) -> None:
    for cell in study.cells("s"):
        v = values[cell.name]
        for seed in study.seeds:
            row = {"cell": cell.name, "seed": seed, "levels": cell.levels,
                   "fingerprint": cell.fingerprint(), "mrr_chance": CHANCE,
                   **{k: v[k][seed] for k in v}}
            task_json(out, Task(cell, seed)).parent.mkdir(parents=True, exist_ok=True)
            task_json(out, Task(cell, seed)).write_text(json.dumps(row))
    for seed in study.seeds:
        task_json(out, Task(None, seed)).write_text(json.dumps(
            {"cell": "baselines", "seed": seed, "pixels": 0.70 + 0.001 * seed,
             "random_encoder": 0.60 + 0.001 * seed}))


def _cell_values(mrr: float, linear: float, ft: float, rand: float) -> dict[str, list[float]]:
    jitter = np.array([-0.002, 0.0, 0.002])  # small seed noise: differences stay significant
    return {"mrr": list(mrr + jitter), "linear": list(linear + jitter),
            "finetune_predictor": list(ft + jitter), "finetune_random_predictor":
            list(rand + jitter[::-1])}


@pytest.fixture
def written(tmp_path):
    study = parse_study(GRID)
    values = {
        # The paper's orderings, except that the shallow predictor beats the deep one with
        # jitter (so that one comparison must come out "does not hold").
        "none-shallow-jitter": _cell_values(CHANCE, 0.80, 0.75, 0.70),
        "none-shallow-strong": _cell_values(CHANCE, 0.80, 0.75, 0.70),
        "none-deep-jitter": _cell_values(CHANCE, 0.80, 0.75, 0.70),
        "none-deep-strong": _cell_values(CHANCE, 0.79, 0.76, 0.70),
        "feature-shallow-jitter": _cell_values(0.30, 0.85, 0.78, 0.70),
        "feature-shallow-strong": _cell_values(0.50, 0.83, 0.80, 0.71),
        "feature-deep-jitter": _cell_values(0.20, 0.84, 0.79, 0.70),
        "feature-deep-strong": _cell_values(0.70, 0.81, 0.84, 0.72),
    }
    _write(tmp_path, study, values)
    return study, tmp_path, values


def test_table_rows_are_the_cells_means_and_stds(written):
    study, out, values = written
    paths = summarise(study, "s", out)
    summary = json.loads(paths["json"].read_text())
    rows = {r["cell"]: r for r in summary["rows"]}
    assert len(rows) == 8
    for name, v in values.items():
        for metric in ("mrr", "linear", "finetune_predictor"):
            assert rows[name][f"{metric}_mean"] == pytest.approx(np.mean(v[metric]))
            assert rows[name][f"{metric}_std"] == pytest.approx(np.std(v[metric], ddof=1))
        assert rows[name]["n"] == 3 and rows[name]["seeds"] == "0,1,2"
    table = paths["table"].read_text().split("## Findings")[0]
    assert table.count("\n| feature-") == 4 and table.count("\n| none-") == 4
    assert "81.0 ± 0.2" in table  # feature-deep-strong's linear accuracy, in %
    csv_lines = paths["csv"].read_text().strip().splitlines()
    assert len(csv_lines) == 1 + 8
    for plot in ("mrr_depth_strength", "mrr_conditioning", "linear_vs_predictor_ft"):
        assert paths[plot].stat().st_size > 1000


def test_verdicts_follow_the_numbers(written):
    study, out, _ = written
    found = json.loads(summarise(study, "s", out)["json"].read_text())["findings"]
    verdicts = {c["claim"]: c["verdict"] for f in found.values() if isinstance(f, dict)
                and "comparisons" in f for c in f["comparisons"]}
    assert verdicts["no conditioning: MRR above chance (paper: ~0, i.e. chance)"] == \
        "not significant"
    assert verdicts["feature conditioning: MRR above no conditioning"] == "holds"
    assert verdicts["strong: deep predictor above shallow"] == "holds"
    assert verdicts["jitter: deep predictor above shallow"] == "does not hold"
    assert verdicts["shallow: strong above jitter"] == "holds"
    assert verdicts["linear probe: invariant above equivariant"] == "holds"
    assert verdicts["predictor finetuning: equivariant above invariant"] == "holds"
    assert verdicts["all cells: pretrained predictor above random predictor"] == "holds"
    assert verdicts["feature-deep-strong: above raw pixels"] == "holds"
    assert verdicts["none-deep-strong: above raw pixels"] == "holds"
    corr = found["correlations"]
    assert corr["cells"] == ["feature-shallow-jitter", "feature-shallow-strong",
                             "feature-deep-jitter", "feature-deep-strong"]
    # Built so that MRR rises with predictor-finetuning accuracy and falls with linear.
    assert corr["mrr_vs_finetune_predictor"]["pearson"] > 0.9
    assert corr["mrr_vs_linear"]["pearson"] < -0.9


def test_compare_tests():
    assert compare("x", [1.0, 1.1, 0.9], [0.0, 0.1, -0.1]).verdict == "holds"
    assert compare("x", [0.0, 0.1, -0.1], [1.0, 1.1, 0.9]).verdict == "does not hold"
    assert compare("x", [0.0, 1.0, 0.5], [0.4, 0.6, 0.2]).verdict == "not significant"
    # Paired: a constant small gain on every seed is significant; unpaired it is noise.
    a, b = [0.5, 0.9, 0.1], [0.49, 0.89, 0.09]
    assert compare("x", a, b, paired=True).verdict == "holds"
    assert compare("x", a, b).verdict == "not significant"
    one = compare("x", [1.0], [0.0])
    assert one.p is None and one.verdict == "not significant"


def test_no_cells_yet_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="no finished cell yet"):
        summarise(parse_study(GRID), "s", tmp_path)


def test_world_model_table_follows_the_equivariant_roles_conditioning(tmp_path):
    # The grid's world-model cells use sequence conditioning: the depth and strength
    # verdicts must come from them, not from a hard-wired "feature".
    grid = json.loads(json.dumps(GRID).replace("feature", "sequence"))
    study = parse_study(grid)
    values = {c.name: _cell_values(CHANCE if c.levels["conditioning"] == "none" else
                                   0.3 + 0.2 * (c.levels["depth"] == "deep"), 0.8, 0.8, 0.7)
              for c in study.cells("s")}
    _write(tmp_path, study, values)
    found = json.loads(summarise(study, "s", tmp_path)["json"].read_text())["findings"]
    verdicts = {c["claim"]: c["verdict"] for c in found["2_depth_strength"]["comparisons"]}
    assert verdicts["strong: deep predictor above shallow"] == "holds"
    assert verdicts["jitter: deep predictor above shallow"] == "holds"
    cond = {c["claim"] for c in found["1_conditioning"]["comparisons"]}
    assert "sequence conditioning: MRR above no conditioning" in cond


def test_a_finding_without_cells_says_so(tmp_path):
    # A scale without the conditioning block (as cpu-color): no "none" cell beside the
    # equivariant one, so finding 1 has nothing to compare and must say so, not print an
    # empty table.
    grid = {**GRID, "blocks": {"wm": {"conditioning": ["feature"], "depth": "all",
                                      "strength": "all"}}}
    study = parse_study(grid)
    _write(tmp_path, study, {c.name: _cell_values(0.3, 0.8, 0.8, 0.7)
                             for c in study.cells("s")})
    table = summarise(study, "s", tmp_path)["table"].read_text()
    section = table.split("### 1_conditioning")[1].split("###")[0]
    assert "No comparison" in section and "| claim |" not in section
    assert "| claim |" in table.split("### 2_depth_strength")[1]
