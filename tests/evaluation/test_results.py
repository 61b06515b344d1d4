import json

from iwm.evaluation.results import write_result


def test_a_run_directory_gets_its_results_folder(tmp_path):
    path = write_result(tmp_path / "run", "mrr", {"mrr": 0.5})
    assert path == tmp_path / "run" / "results" / "mrr.json"
    assert json.loads(path.read_text()) == {"mrr": 0.5}


def test_a_checkpoint_writes_beside_its_run_without_overwriting_it(tmp_path):
    ckpt = tmp_path / "run" / "checkpoints" / "step_000750.pt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"")
    final = write_result(tmp_path / "run", "mrr", {"step": 1500})
    path = write_result(ckpt, "mrr", {"step": 750})
    assert path == tmp_path / "run" / "results" / "mrr_step_000750.json"
    assert json.loads(final.read_text()) == {"step": 1500}
    loose = tmp_path / "elsewhere" / "model.pt"
    loose.parent.mkdir()
    loose.write_bytes(b"")
    assert write_result(loose, "probe_linear", {}) == (
        tmp_path / "elsewhere" / "results" / "probe_linear_model.json")
