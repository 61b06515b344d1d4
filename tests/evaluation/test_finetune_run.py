"""``iwm finetune`` on a run directory (iwm.evaluation.finetune_run): result files and
their names, baselines found, computed or named as missing (per task of a multitask
result too), the report's finetuning table, image-folder tasks, one-line errors."""

import json
import shutil
from pathlib import Path

import pytest

from iwm.cli.main import main
from iwm.data.datasets import open_image_folder
from tiny_run import copy_without_outputs, make_tiny_run_with_mnist

# Two steps of 8 images per task and 8 test images: the plumbing, not the accuracy.
FT = ["finetune.epochs=1", "finetune.batch_size=8", "finetune.train_limit=16",
      "finetune.test_limit=8"]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return make_tiny_run_with_mnist(tmp_path_factory.mktemp("ft-run"))


@pytest.fixture(autouse=True)
def data_env(run, monkeypatch):
    monkeypatch.setenv("IWM_DATA", str(run.parent / "fmnist"))


def test_cli_writes_the_results(run, capsys):
    assert main(["finetune", str(run), "--protocol", "predictor", *FT]) == 0
    single = json.loads((run / "results" / "finetune_predictor.json").read_text())
    assert {"accuracy", "protocol", "trainable_params", "seconds", "epochs",
            "train_flops", "lr", "dataset"} <= single.keys()
    assert single["protocol"] == "predictor" and single["dataset"] == "fashion-mnist"

    assert main(["finetune", str(run), "--protocol", "predictor", "--tasks",
                 "fashion-mnist,mnist", "--compare-separate", *FT]) == 0
    multi = json.loads((run / "results" / "finetune_multitask.json").read_text())
    assert set(multi["tasks"]) == set(multi["separate"]["tasks"]) == {"fashion-mnist", "mnist"}
    # One shared predictor instead of two.
    assert multi["trainable_params"] < multi["separate"]["trainable_params"]
    assert "separate predictors" in capsys.readouterr().out

    assert main(["finetune", str(run), "--protocol", "random-predictor", "--task",
                 "segmentation", *FT]) == 0
    seg = json.loads((run / "results" / "segment_random-predictor.json").read_text())
    assert 0 <= seg["miou"] <= 1 and set(seg["per_class_iou"]) == {"background", "edge",
                                                                   "interior"}
    capsys.readouterr()
    assert main(["finetune", str(run), "--protocol", "scrach", *FT]) == 2
    err = capsys.readouterr().err
    assert "did you mean 'scratch'" in err and err.count("\n") == 1


@pytest.fixture
def run_copy(run, tmp_path) -> Path:
    """The tiny run without results, for tests that read what earlier commands wrote."""
    return copy_without_outputs(run, tmp_path)


def read_result(run: Path, name: str) -> dict:
    return json.loads((run / "results" / f"{name}.json").read_text())


def test_baselines_are_computed_once_and_shown_beside_every_result(run_copy, capsys):
    assert main(["finetune", str(run_copy), "--protocol", "predictor", *FT]) == 0
    out = capsys.readouterr().out
    base = read_result(run_copy, "finetune_predictor")["baselines"]
    assert set(base) == {"scratch", "linear_probe", "raw_pixels"}
    assert all("accuracy" not in b for b in base.values())
    assert "--protocol scratch" in base["scratch"]["missing"]
    assert "--baselines" in base["linear_probe"]["missing"] and "scratch missing" in out

    assert main(["finetune", str(run_copy), "--protocol", "encoder", "--baselines", *FT]) == 0
    assert "beside it: scratch 0." in capsys.readouterr().out
    r = read_result(run_copy, "finetune_encoder")
    base = r["baselines"]
    scratch = read_result(run_copy, "finetune_scratch")
    assert base["scratch"]["accuracy"] == scratch["accuracy"]
    assert base["scratch"]["trainable_params"] == r["trainable_params"]
    # Scratch, trained as a baseline, is a result of its own beside the same probes.
    assert scratch["baselines"]["linear_probe"] == base["linear_probe"]
    for key in ("linear_probe", "raw_pixels"):  # on the finetuning's own images
        assert base[key]["source"] == "computed" and 0 <= base[key]["accuracy"] <= 1
        assert (base[key]["n_train"], base[key]["n_test"]) == (16, 8)
    assert base["raw_pixels"]["feature_dim"] == 28 * 28
    assert base["linear_probe"]["step"] == r["pretrain_step"]
    assert (run_copy / "results" / "finetune_encoder_curve.png").stat().st_size > 0
    assert (run_copy / "results" / "finetune_scratch_curve.png").stat().st_size > 0

    # Found again, nothing recomputed; scratch only for the same recipe.
    assert main(["finetune", str(run_copy), "--protocol", "random-predictor", *FT]) == 0
    again = read_result(run_copy, "finetune_random-predictor")["baselines"]
    assert again["scratch"]["source"].endswith("finetune_scratch.json")
    assert again["linear_probe"] == {**base["linear_probe"],
                                     "source": str(run_copy / "results" / "finetune_encoder.json")}
    assert main(["finetune", str(run_copy), "--protocol", "random-predictor", *FT,
                 "finetune.epochs=2"]) == 0
    other = read_result(run_copy, "finetune_random-predictor")["baselines"]
    assert "another recipe (epochs 1.0 there, 2.0 here)" in other["scratch"]["missing"]
    assert "finetune.epochs=2" in other["scratch"]["missing"]
    assert "accuracy" in other["linear_probe"]  # same images: still a baseline
    # A scratch result written before head_init existed reads as head_init=random: still
    # the baseline of a random-init head, not of a probe-initialised one.
    path = run_copy / "results" / "finetune_scratch.json"
    old = json.loads(path.read_text())
    del old["finetune_config"]["head_init"]
    path.write_text(json.dumps(old))
    assert main(["finetune", str(run_copy), "--protocol", "random-predictor", *FT]) == 0
    assert "accuracy" in read_result(run_copy, "finetune_random-predictor")["baselines"][
        "scratch"]
    # One written before crop_ratio existed drew the data's ratios (3/4-4/3): not a
    # baseline of today's square crops.
    old = json.loads(path.read_text())
    del old["finetune_config"]["crop_ratio"]
    path.write_text(json.dumps(old))
    assert main(["finetune", str(run_copy), "--protocol", "random-predictor", *FT]) == 0
    legacy = read_result(run_copy, "finetune_random-predictor")["baselines"]["scratch"]
    assert "crop_ratio (0.75, 1.3333333333333333) there, (1.0, 1.0) here" in legacy["missing"]
    assert main(["finetune", str(run_copy), "--protocol", "random-predictor", *FT,
                 "finetune.head_init=probe"]) == 0
    probed = read_result(run_copy, "finetune_random-predictor")["baselines"]["scratch"]
    assert "head_init 'random' there, 'probe' here" in probed["missing"]
    assert "head initialised as a linear probe" in capsys.readouterr().out

    # The report: every protocol beside its baselines, and its curve.
    assert main(["report", str(run_copy), "--bank", "4", "--images", "2"]) == 0
    page = (run_copy / "report" / "index.html").read_text()
    assert "<h2>Finetuning against its baselines</h2>" in page
    lp, px = (f"{base[k]['accuracy']:.4f}" for k in ("linear_probe", "raw_pixels"))
    row = (f"<tr><td>encoder</td><td>fashion-mnist</td><td>attentive</td>"
           f"<td class=num>{r['accuracy']:.4f}</td>"
           f"<td class=num>{lp}</td><td class=num>{px}</td>"
           f"<td class=num>{scratch['accuracy']:.4f}</td>"
           f"<td class=num>{r['trainable_params']:,}</td>")
    assert row in page
    assert 'src="finetune_encoder_curve.png"' in page
    assert (run_copy / "report" / "finetune_encoder_curve.png").is_file()
    # Every protocol of the data set on one figure, shown before the single curves.
    compare = "finetune_compare_fashion-mnist_curve.png"
    assert page.index(f'src="{compare}"') < page.index('src="finetune_encoder_curve.png"')
    assert (run_copy / "report" / compare).stat().st_size > 0
    assert "another recipe" in page  # the random predictor's missing scratch, and why
    assert "<td>random-predictor</td><td>fashion-mnist</td><td>attentive, probe init</td>" in page


def test_a_probe_from_another_encoder_is_not_a_baseline(run_copy):
    from iwm.api import load

    assert main(["finetune", str(run_copy), "--protocol", "encoder", "--baselines", *FT]) == 0
    probe = read_result(run_copy, "finetune_encoder")["baselines"]["linear_probe"]
    assert probe["encoder_fingerprint"] == load(run_copy).encoder.fingerprint()
    # Results copied in from another seed's run at the same step (a study that reuses one
    # scratch result for two presets): one with that encoder's fingerprint, one written
    # before probes carried one. Neither is this encoder's probe.
    results = run_copy / "results"
    for name, changed in (("finetune_encoder", {"encoder_fingerprint": "another"}),
                          ("finetune_scratch", {})):
        path = results / f"{name}.json"
        r = json.loads(path.read_text())
        r["baselines"]["linear_probe"] = {
            **{k: v for k, v in probe.items() if k != "encoder_fingerprint"},
            "accuracy": 2.0, **changed}
        path.write_text(json.dumps(r))
    assert main(["finetune", str(run_copy), "--protocol", "predictor", "--baselines", *FT]) == 0
    found = read_result(run_copy, "finetune_predictor")["baselines"]["linear_probe"]
    assert found["source"] == "computed"
    assert found["accuracy"] == pytest.approx(probe["accuracy"])


def test_each_task_of_a_multitask_result_has_its_probes(run_copy, capsys):
    tasks = ["--tasks", "fashion-mnist,mnist"]
    assert main(["finetune", str(run_copy), "--protocol", "predictor", *tasks, *FT]) == 0
    missing = read_result(run_copy, "finetune_multitask")["tasks"]["mnist"]["baselines"]
    assert "--baselines --tasks fashion-mnist,mnist" in missing["linear_probe"]["command"]
    out = capsys.readouterr().out
    assert "  mnist: beside it: no baselines yet (linear probe, raw pixels missing)" in out
    # The command that makes them all, once, not once per task and probe.
    [line] = [x for x in out.splitlines() if "missing baselines: run `" in x]
    assert missing["linear_probe"]["command"] in line

    assert main(["finetune", str(run_copy), "--protocol", "predictor", *tasks, "--baselines",
                 *FT]) == 0
    out = capsys.readouterr().out
    multi = read_result(run_copy, "finetune_multitask")
    for name, task in multi["tasks"].items():
        base = task["baselines"]
        assert set(base) == {"linear_probe", "raw_pixels"}  # no single-task scratch to match
        for probe in base.values():
            assert probe["source"] == "computed" and probe["dataset"] == name
            assert (probe["n_train"], probe["n_test"]) == (task["n_train"], task["n_test"])
        assert f"  {name}: beside it: linear probe {base['linear_probe']['accuracy']:.4f}" in out
    # Found again by a single-task finetuning on the same images: nothing recomputed.
    assert main(["finetune", str(run_copy), "--protocol", "predictor", "--tasks", "mnist",
                 *FT]) == 0
    single = read_result(run_copy, "finetune_predictor_mnist")["baselines"]["linear_probe"]
    assert single["source"] == str(run_copy / "results" / "finetune_multitask.json")
    assert single["accuracy"] == multi["tasks"]["mnist"]["baselines"]["linear_probe"][
        "accuracy"]
    # The report: a row per task of the multitask result, beside that task's probes.
    assert main(["report", str(run_copy), "--bank", "4", "--images", "2"]) == 0
    page = (run_copy / "report" / "index.html").read_text()
    mnist = multi["tasks"]["mnist"]
    lp, px = (f"{mnist['baselines'][k]['accuracy']:.4f}" for k in ("linear_probe", "raw_pixels"))
    assert (f"<tr><td>predictor (multitask)</td><td>mnist</td><td>attentive</td>"
            f"<td class=num>{mnist['accuracy']:.4f}</td><td class=num>{lp}</td>"
            f"<td class=num>{px}</td><td class=num>–</td>") in page
    # The shared predictor's curve once (a test line per task), not once per task row.
    assert page.count('src="finetune_multitask_curve.png"') == 1
    assert (run_copy / "report" / "finetune_multitask_curve.png").stat().st_size > 0


def write_folder(root: Path, per_class: int, split: bool) -> None:
    """Dark and bright noisy PNGs in <class>/ folders (in train/ and test/ if ``split``)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for c, cls in enumerate(("dark", "bright")):
        for i in range(per_class):
            sub = ("train" if i % 3 else "test") if split else ""
            path = root / sub / cls / f"{i:02d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            pixels = rng.integers(0, 60, (20, 20, 3)) + 150 * c
            Image.fromarray(pixels.astype(np.uint8)).save(path)


@pytest.mark.parametrize("split", [True, False], ids=["train-test", "automatic"])
def test_finetuning_on_an_image_folder(run_copy, tmp_path, split, capsys):
    folder = tmp_path / "pets"
    write_folder(folder, 12, split)
    task = f"imagefolder:{folder}"
    assert main(["finetune", str(run_copy), "--protocol", "encoder", "--tasks", task,
                 "--baselines", *FT, "data.num_workers=0", "data.holdout=0.25"]) == 0
    capsys.readouterr()
    # Named after the task: never overwrites the run's own finetune_encoder.json.
    (path,) = (run_copy / "results").glob("finetune_encoder_pets-*.json")
    r = json.loads(path.read_text())
    assert r["dataset"] == task and not (run_copy / "results" / "finetune_encoder.json").exists()
    # The test/ folder's 8 images, or the slice of the 24 that data.holdout's hash split
    # holds out (the rest is the train split, of which the limit's 16 are used).
    held = len(open_image_folder(folder, "test", 0.25))
    assert r["n_test"] == (8 if split else min(held, 8)) and (split or 0 < held < 24)
    assert r["n_train"] == min(16, 16 if split else 24 - held)
    assert 0 <= r["accuracy"] <= 1
    assert all("accuracy" in r["baselines"][k] for k in ("scratch", "linear_probe", "raw_pixels"))
    assert r["baselines"]["raw_pixels"]["feature_dim"] == 3 * 28 * 28  # the folder's RGB
    assert (path.parent / path.name.replace("_encoder_", "_scratch_")).is_file()
    assert path.with_name(f"{path.stem}_curve.png").is_file()


def test_errors_are_one_line_naming_the_fix(run_copy, tmp_path, capsys):
    one = tmp_path / "one" / "cat"
    write_folder(tmp_path / "both", 3, split=False)
    shutil.copytree(tmp_path / "both" / "dark", one)
    cases = [
        (["--tasks", "fashion-mnsit"], "unknown data set 'fashion-mnsit' (did you mean "
                                       "'fashion-mnist'?)"),
        (["--tasks", f"imagefolder:{one}"], "has no class sub-folders; put its images in "
                                            "<class>/ sub-folders"),
        (["--tasks", f"imagefolder:{one.parent}"], "has a single class (cat)"),
        (["--task", "segmentation", "--baselines"], "--baselines: the linear probe and "
                                                    "raw-pixel baselines are of "
                                                    "classification tasks"),
    ]
    for args, message in cases:
        assert main(["finetune", str(run_copy), "--protocol", "encoder", *args, *FT]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert main(["finetune", str(run_copy), "--protocol", "end-2-end", *FT]) == 2
    assert "did you mean 'end-to-end'" in capsys.readouterr().err
