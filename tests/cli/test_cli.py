"""The iwm command: errors are one line without traceback; commands chain end to end."""

import argparse
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import FAKE_TEST
from iwm.cli.main import build_parser, main
from iwm.config import preset_description, preset_names
from iwm.data.datasets import open_image_folder

TINY = ["train.batch_size=16", "train.epochs=0.5", "train.progress=false",
        "model.predictor_depth=2"]


@pytest.fixture(autouse=True)
def fake_fashion_mnist(fake_mnist_dir, monkeypatch):
    monkeypatch.setenv("IWM_DATA", str(fake_mnist_dir))


def test_config_lists_presets_and_prints_resolved_values(capsys):
    assert main(["config"]) == 0
    lines = capsys.readouterr().out.splitlines()[1:]
    # One line per preset: its name, then what its YAML's opening comment says it is.
    assert [line.split()[0] for line in lines] == preset_names()
    inv = next(line for line in lines if line.split()[0] == "iwm-inv-tiny")
    assert inv.split(None, 1)[1] == preset_description("iwm-inv-tiny")
    assert "invariant encoder" in inv
    assert main(["config", "iwm-inv-tiny", "model.predictor_depth=9"]) == 0
    assert "predictor_depth: 9" in capsys.readouterr().out


@pytest.mark.parametrize("override, message", [
    ("model.predictor_dept=3", "did you mean 'predictor_depth'"),
    ("train.epochs=lots", "train.epochs='lots': expected a number"),
    ("model.patch_size=5", "model.patch_size=5 does not divide data.image_size=28"),
    ("views.strength=extreme", "views.strength='extreme': must be one of"),
    ("mask.target_scale=[0.5,1.5]", "mask.target_scale"),
    ("model.predictor_heads=5", "not divisible by model.predictor_heads=5"),
    ("notakey", "expected key=value"),
])
def test_bad_config_is_one_line_error(override, message, capsys, tmp_path):
    code = main(["pretrain", "iwm-inv-tiny", override, "--run-dir", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "r").exists()


def test_version_is_the_installed_package_version(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out == f"iwm {version('iwm')}\n"


def _parsers(parser: argparse.ArgumentParser, name: str = "iwm"):
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                yield from _parsers(sub, f"{name} {sub_name}")


def test_every_option_of_every_command_has_help():
    missing = [f"{name}: {action.option_strings or action.dest}"
               for name, parser in _parsers(build_parser())
               for action in parser._actions
               if not isinstance(action, argparse._SubParsersAction) and not action.help]
    assert missing == []


def test_debug_flag_shows_the_exception():
    from iwm.errors import ConfigError

    with pytest.raises(ConfigError):
        main(["--debug", "config", "no-such-preset"])


def test_pretrain_probe_and_mrr_end_to_end(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["pretrain", "iwm-inv-tiny", *TINY, "--run-dir", str(run)]) == 0
    # A second pretrain into the same directory must not overwrite it.
    assert main(["pretrain", "iwm-inv-tiny", *TINY, "--run-dir", str(run)]) == 2
    assert "--resume" in capsys.readouterr().err

    assert main(["probe", str(run), "probe.max_iter=20", "probe.batch_size=16"]) == 0
    probe = json.loads((run / "results" / "probe_linear.json").read_text())
    assert 0.0 <= probe["accuracy"] <= 1.0 and probe["n_test"] == 16
    # Progress of the feature extraction: plain lines in a log (no terminal here), the
    # last of each split at 100%.
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = [line.split()[:5] for line in err.splitlines()]
    assert ["iwm:", "features", "of", "train", "batch"] in lines
    assert err.count("features of train batch 4/4 ") == 1
    assert err.count("features of test batch 1/1 ") == 1

    assert main(["eval", "mrr", str(run), "--bank", "8", "--images", "4"]) == 0
    mrr = json.loads((run / "results" / "mrr.json").read_text())
    assert {"mrr", "bank", "n_images", "per_transform"} <= mrr.keys()
    assert mrr["bank"] == 8 and mrr["n_images"] == 4
    assert "iwm: eval mrr batch 1/1 elapsed " in capsys.readouterr().err
    # Only the main bank: within one batch its draws come first, so the same score.
    assert main(["eval", "mrr", str(run), "--bank", "8", "--images", "4",
                 "--no-per-transform"]) == 0
    main_only = json.loads((run / "results" / "mrr.json").read_text())
    assert main_only["mrr"] == mrr["mrr"] and mrr["per_transform"]
    assert main_only["per_transform"] == {} and main_only["sensitivity"] == {}


def test_flat_image_folder_end_to_end(tmp_path, capsys):
    # A folder of images, no split or class sub-folders: the evaluations use its held-out
    # slice, the label-free ones work, the probe says what it needs.
    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for i in range(40):
        Image.fromarray(rng.integers(0, 256, (28, 28, 3), dtype=np.uint8)).save(
            photos / f"{i:02d}.png")
    held_out = len(open_image_folder(photos, "test"))
    run = tmp_path / "run"
    data = [f"data.name=imagefolder:{photos}", "data.num_workers=0"]
    assert main(["pretrain", "iwm-inv-tiny", *TINY, *data, "--run-dir", str(run)]) == 0
    capsys.readouterr()

    assert main(["eval", "mrr", str(run), "--bank", "4", "--images", "4"]) == 0
    assert json.loads((run / "results" / "mrr.json").read_text())["n_images"] == min(4, held_out)
    assert main(["eval", "api-check", str(run), "--bank", "4", "--images", "4"]) == 0
    capsys.readouterr()  # the evaluations' progress lines
    assert main(["probe", str(run)]) == 2
    err = capsys.readouterr().err
    assert "a probe needs labelled images" in err and "<class>/ sub-folders" in err
    assert err.count("\n") == 1

    assert main(["report", str(run), "--bank", "4", "--images", "2"]) == 0
    page = (run / "report" / "index.html").read_text()
    assert 'src="retrieval.png"' in page and 'src="mrr.png"' in page
    assert "could not be made" not in page
    assert main(["report", str(photos)]) == 2
    assert "is not a run directory" in capsys.readouterr().err
    assert sorted(p.name for p in photos.iterdir()) == [f"{i:02d}.png" for i in range(40)]

    photos.rename(tmp_path / "moved")  # the data gone: the page still has its curves
    with pytest.warns(UserWarning, match="report: 'The world model at work: retrieval' left "
                                         "out: imagefolder:.* is not a folder$") as record:
        assert main(["report", str(run), "--bank", "4", "--images", "2"]) == 0
    assert "\n" not in str(record[0].message)
    page = (run / "report" / "index.html").read_text()
    assert 'src="curves.png"' in page and "could not be made" in page


def test_resume_from_run_directory_extends_training(tmp_path):
    run = tmp_path / "run"
    assert main(["pretrain", "iwm-inv-tiny", *TINY, "--run-dir", str(run)]) == 0
    assert main(["pretrain", str(run), "--resume", "train.epochs=1"]) == 0
    steps = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert steps[-1] == "step_000004.pt"


def test_resume_of_what_is_not_a_run_says_so_and_what_to_do(tmp_path, capsys):
    missing = tmp_path / "runs" / "nosuch"
    assert main(["pretrain", str(missing), "--resume"]) == 2
    [line] = capsys.readouterr().err.splitlines()
    assert line == (f"iwm: error: --resume: {missing} is not a run directory (no such "
                    "folder); pass the folder of an earlier run (e.g. runs/NAME), or a preset "
                    "or YAML file with --run-dir DIR")
    (tmp_path / "empty").mkdir()
    assert main(["pretrain", str(tmp_path / "empty"), "--resume"]) == 2
    [line] = capsys.readouterr().err.splitlines()
    assert f"{tmp_path / 'empty'} is not a run directory (no config.yaml in it): pass " in line
    assert not (tmp_path / "empty" / "checkpoints").exists()


def test_probe_of_missing_run_is_a_clear_error(tmp_path, capsys):
    assert main(["probe", str(tmp_path / "nope")]) == 2
    assert "no such run directory" in capsys.readouterr().err


def test_finetune_protocols_are_named_in_help_and_a_typo_fails_first(tmp_path, capsys):
    from iwm.evaluation.finetune import PROTOCOLS

    # --protocol is checked by the library, not argparse: its help must not drift from it.
    parser = dict(_parsers(build_parser()))["iwm finetune"]
    (text,) = (a.help for a in parser._actions if "--protocol" in a.option_strings)
    assert all(f"{p}:" in text or f"{p} " in text for p in PROTOCOLS)
    # Before the run is even loaded (this one does not exist).
    assert main(["finetune", str(tmp_path / "nope"), "--protocol", "encodr"]) == 2
    err = capsys.readouterr().err
    assert "--protocol 'encodr': must be one of" in err and "did you mean 'encoder'" in err


def test_demo_quick_runs_end_to_end(tmp_path, capsys):
    from iwm.cli.demo import run_demo

    summary = run_demo(tmp_path / "demo", quick=True, device="cpu")
    out = capsys.readouterr().out
    for line in ("random-init encoder", "linear probe, raw pixels", "per transform",
                 "world model via the API (bank 64)", "per factor"):
        assert line in out, line
    assert re.search(r"per transform\s*: brightness (\d\.\d{3}|n/a), contrast", out)
    for key in ("probe_linear", "probe_linear_random_encoder", "probe_linear_raw_pixels"):
        assert 0 <= summary[key]["accuracy"] <= 1, key
    assert summary["probe_linear_raw_pixels"]["feature_dim"] == 28 * 28  # the pixels
    api = summary["api_check"]
    # --quick asks for 64 images; the generated test split has only FAKE_TEST.
    assert api["bank"] == 64 and api["n_images"] == min(64, FAKE_TEST)
    assert 0 < api["mrr"] <= 1
    assert {"brightness", "contrast", "saturation", "hue"} == api["per_factor"].keys()
    assert set(summary["mrr_per_transform"]) >= {"brightness", "contrast"}
    # The wall split: its parts add up to (at most) the whole, and it is printed.
    wall = summary["wall"]
    assert set(wall) == {"train", "evaluate", "finetune", "report"} and min(wall.values()) > 0
    assert sum(wall.values()) <= summary["seconds"]
    assert re.search(r"wall time\s*: \d+ s \(train \d+ s, evaluate \d+ s, finetune \d+ s, "
                     r"report \d+ s\)", out)
    # Reusing the world model, pretrained against random predictor, on the linear probe's
    # images: each result carries the demo's own probe and raw pixels as its baselines.
    assert set(summary["finetune"]) == {"predictor", "random-predictor"}
    assert re.search(r"predictor finetuning, pretrained\s*: \d+\.\d\d% \(\d+ steps", out)
    assert re.search(r"predictor finetuning, random init\s*: \d+\.\d\d% \(the same", out)
    for protocol, tuned in summary["finetune"].items():
        assert 0 <= tuned["accuracy"] <= 1 and tuned["steps"] > 0
        saved_ft = json.loads((Path(summary["run_dir"]) / "results" /
                               f"finetune_{protocol}.json").read_text())
        assert saved_ft["protocol"] == protocol and saved_ft["frozen_unchanged"]
        assert saved_ft["accuracy"] == tuned["accuracy"]
        base = saved_ft["baselines"]
        assert base["linear_probe"]["accuracy"] == summary["probe_linear"]["accuracy"]
        assert base["raw_pixels"]["accuracy"] == summary["probe_linear_raw_pixels"]["accuracy"]
    results = Path(summary["run_dir"]) / "results"
    saved = json.loads((results / "demo_summary.json").read_text())
    assert saved["api_check"] == api
    assert saved["probe_linear_raw_pixels"] == summary["probe_linear_raw_pixels"]
    raw = json.loads((results / "probe_linear_raw_pixels.json").read_text())
    assert raw["encoder"] == "raw pixels (baseline)"
    assert json.loads((results / "api_check.json").read_text())["mrr"] == api["mrr"]
    report = Path(summary["report"]).read_text()
    assert "probe_linear_raw_pixels" in report and "api_check" in report
