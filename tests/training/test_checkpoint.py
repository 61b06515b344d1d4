import errno
import os
import random

import numpy as np
import pytest
import torch

from iwm.errors import CheckpointError
from iwm.training import checkpoint as ckpt
from iwm.training.checkpoint import (
    capture_rng_state,
    checkpoint_path,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    prune_checkpoints,
    restore_rng_state,
    save_checkpoint,
)


class Custom:
    """Anything that needs unpickling a Python class (module-level so torch.save can pickle it)."""

    def __init__(self):
        self.x = 1


def _state(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "step": 7,
        "model": {"w": torch.randn(3, 4, generator=g), "b": torch.zeros(4, dtype=torch.bfloat16)},
        "optimizer": {"state": {0: {"exp_avg": torch.randn(2, generator=g)}},
                      "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "fused": None}]},
        "config": {"train": {"epochs": 2.0, "device": "auto"}, "crop": [0.3, 1.0]},
        "counts": torch.arange(5),
    }


def _assert_equal(a, b):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _assert_equal(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            _assert_equal(x, y)
    else:
        assert a == b


def _temp_files(folder):
    return [p for p in folder.iterdir() if p.name.endswith(".tmp")]


def test_round_trip_preserves_nested_state(tmp_path):
    path = checkpoint_path(tmp_path, 7)
    state = _state()
    save_checkpoint(path, state)
    assert path == tmp_path / "checkpoints" / "step_000007.pt"
    _assert_equal(state, load_checkpoint(path))
    assert _temp_files(path.parent) == []


def test_rng_state_survives_save_and_load(tmp_path):
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    random.gauss(0, 1)  # leaves a cached gaussian in Python's state
    path = tmp_path / "rng.pt"
    save_checkpoint(path, {"rng": capture_rng_state()})
    expected = (random.random(), random.gauss(0, 1), np.random.rand(3).tolist(),
                np.random.randn(), torch.rand(3))
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    restore_rng_state(load_checkpoint(path)["rng"])
    got = (random.random(), random.gauss(0, 1), np.random.rand(3).tolist(),
           np.random.randn(), torch.rand(3))
    assert got[:4] == expected[:4]
    assert torch.equal(got[4], expected[4])


def test_arbitrary_python_objects_are_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"model": {"w": torch.ones(2)}, "extra": Custom()}, path)
    with pytest.raises(CheckpointError, match="arbitrary Python objects.*Custom"):
        load_checkpoint(path)


def test_save_refuses_what_weights_only_loading_would_reject(tmp_path):
    path = tmp_path / "x.pt"
    with pytest.raises(TypeError, match=r"state\['loss'\].*numpy"):
        save_checkpoint(path, {"loss": np.float64(0.5)})
    with pytest.raises(TypeError, match="Custom"):
        save_checkpoint(path, {"a": [Custom()]})
    assert not path.exists() and _temp_files(tmp_path) == []


@pytest.mark.parametrize("keep_bytes", [0, 10, 200, -50])
def test_truncated_file_is_reported_as_corrupt(tmp_path, keep_bytes):
    path = tmp_path / "c.pt"
    save_checkpoint(path, _state())
    data = path.read_bytes()
    path.write_bytes(data[:keep_bytes] if keep_bytes >= 0 else data[:keep_bytes])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(path)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope.pt")
    with pytest.raises(CheckpointError, match="not a file"):
        load_checkpoint(tmp_path)


def test_non_dict_checkpoint_is_refused(tmp_path):
    torch.save(torch.ones(3), tmp_path / "t.pt")
    with pytest.raises(CheckpointError, match="not a dict"):
        load_checkpoint(tmp_path / "t.pt")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_and_previous_file_kept(tmp_path, bad):
    path = tmp_path / "ck.pt"
    save_checkpoint(path, _state(seed=0))
    before = path.read_bytes()
    diverged = _state(seed=1)
    diverged["optimizer"]["state"][0]["exp_avg"][1] = bad
    with pytest.raises(CheckpointError, match=r"\['exp_avg'\] contains NaN/inf"):
        save_checkpoint(path, diverged)
    assert path.read_bytes() == before
    assert _temp_files(tmp_path) == []


def test_disk_full_leaves_previous_checkpoint_and_no_temp_file(tmp_path, monkeypatch):
    path = tmp_path / "ck.pt"
    save_checkpoint(path, _state(seed=0))
    before = path.read_bytes()
    real_save = torch.save

    def full_disk(obj, f):
        real_save(obj, f)  # something already reached the temp file...
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # ...then the disk filled

    monkeypatch.setattr(ckpt.torch, "save", full_disk)
    with pytest.raises(CheckpointError, match=f"{path}.*No space left"):
        save_checkpoint(path, _state(seed=1))
    assert path.read_bytes() == before
    assert _temp_files(tmp_path) == []


def test_unwritable_location_is_a_checkpoint_error(tmp_path):
    blocker = tmp_path / "run"
    blocker.write_text("a file where the run directory should be")
    with pytest.raises(CheckpointError, match="cannot write checkpoint"):
        save_checkpoint(checkpoint_path(blocker, 1), _state())


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0,
                    reason="needs POSIX permissions that bind (root ignores them)")
def test_read_only_directory(tmp_path):
    path = tmp_path / "ck.pt"
    save_checkpoint(path, _state(seed=0))
    before = path.read_bytes()
    tmp_path.chmod(0o555)
    try:
        with pytest.raises(CheckpointError, match="cannot write checkpoint"):
            save_checkpoint(path, _state(seed=1))
    finally:
        tmp_path.chmod(0o755)
    assert path.read_bytes() == before


def test_latest_and_prune(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    for step in (5, 100, 20, 1_000_000):
        save_checkpoint(checkpoint_path(tmp_path, step), {"step": step})
    folder = tmp_path / "checkpoints"
    (folder / "notes.txt").write_text("not a checkpoint")
    stale = folder / ".step_000200.pt.abc.tmp"  # left by a save killed mid-write
    stale.write_bytes(b"partial")
    # Numeric, not lexicographic: the 7-digit step is the newest.
    assert latest_checkpoint(tmp_path) == checkpoint_path(tmp_path, 1_000_000)
    removed = prune_checkpoints(tmp_path, keep=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [100, 1_000_000]
    assert set(removed) == {checkpoint_path(tmp_path, 5), checkpoint_path(tmp_path, 20), stale}
    assert (folder / "notes.txt").exists()
    with pytest.raises(ValueError):
        prune_checkpoints(tmp_path, keep=0)
