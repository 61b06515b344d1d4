"""iwm embed: pooled features of image files, in order, with the files listed beside them."""

import sys

import numpy as np
import pytest
import torch

import iwm
from conftest import write_image
from iwm.cli.main import main
from iwm.errors import DataError
from iwm.interop.embed import collect_images, embed_images, write_features
from tiny_run import make_tiny_run


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return make_tiny_run(tmp_path_factory.mktemp("embed"))


def gray(value: int, shape: tuple[int, int] = (40, 40), channels: int = 3) -> np.ndarray:
    return np.full((*shape, channels) if channels > 1 else shape, value, dtype=np.uint8)


@pytest.fixture
def images(tmp_path):
    """A nested folder of uniform-gray images in several formats, sizes and modes."""
    root = tmp_path / "images"
    write_image(root / "a.png", gray(10))
    write_image(root / "b.jpg", gray(60, (30, 50)), "JPEG")
    write_image(root / "nested" / "deeper" / "c.bmp", gray(110, channels=1))
    write_image(root / "nested" / "d.webp", gray(160, (28, 28), channels=4), "WEBP")
    write_image(root / "nested" / "e.tiff", gray(210, (64, 33)))
    (root / "nested" / "notes.txt").write_text("not an image")
    (root / ".hidden.png").write_bytes(b"")
    return root


def test_folders_are_searched_recursively_in_sorted_order(images):
    files = collect_images([images, images / "a.png"])
    names = [f.relative_to(images).as_posix() for f in files]
    # Sorted as paths (component by component), so "d.webp" comes before "deeper/".
    assert names == ["a.png", "b.jpg", "nested/d.webp", "nested/deeper/c.bmp",
                     "nested/e.tiff", "a.png"]
    with pytest.raises(DataError, match="no such file or folder"):
        collect_images([images / "missing.png"])
    (images / "empty").mkdir()
    with pytest.raises(DataError, match="no images"):
        collect_images([images / "empty"])


def test_features_match_encode_of_the_converted_images(run, images):
    model = iwm.load(run)
    files = collect_images([images])
    feats, kept = embed_images(model, files, batch_size=2, progress=False)
    assert kept == files and feats.shape == (5, 128) and feats.dtype == np.float32
    # Uniform gray images: any resize keeps them uniform and RGB -> luma keeps the value (up
    # to the luma weights' rounding), so each row must be the feature of a 1 x 28 x 28 image
    # of that gray; JPEG and WebP are lossy, hence only close.
    values = torch.tensor([10.0, 60.0, 160.0, 110.0, 210.0]) / 255
    expected = model.encode(values.view(-1, 1, 1, 1).expand(-1, 1, 28, 28), pooled=True)
    np.testing.assert_allclose(feats[[0, 3, 4]], expected[[0, 3, 4]].numpy(), atol=2e-3)
    assert np.abs(feats - expected.numpy()).max() < 0.5 * np.abs(expected.numpy()).max()


def test_cli_writes_npy_and_the_paths_sidecar(run, images, tmp_path, capsys):
    (images / "broken.png").write_text("not a png")
    out = tmp_path / "out" / "features.npy"
    with pytest.warns(UserWarning, match="broken.png"):
        code = main(["embed", str(run), str(images / "nested"), str(images / "broken.png"),
                     str(images / "a.png"), "--out", str(out), "--batch-size", "2"])
    assert code == 0
    captured = capsys.readouterr()
    assert "4 images (1 unreadable skipped) -> features (4, 128)" in captured.out
    # Not a terminal: progress as plain lines (3 batches of 2), no carriage returns.
    assert "iwm: embed batch 3/3" in captured.err and "\r" not in captured.err
    feats = np.load(out)
    paths = (tmp_path / "out" / "features.paths.txt").read_text().splitlines()
    assert feats.shape == (4, 128)
    assert [p.rsplit("/", 1)[-1] for p in paths] == ["d.webp", "c.bmp", "e.tiff", "a.png"]


def test_a_timm_export_embeds_as_its_run(run, images, tmp_path):
    timm_dir = tmp_path / "timm"
    assert main(["export", str(run), "--format", "timm", "--out", str(timm_dir)]) == 0
    for source, name in ((run, "run.npy"), (timm_dir, "timm.npy")):
        assert main(["embed", str(source), str(images), "--out", str(tmp_path / name)]) == 0
    # The export holds the run's EMA target encoder, so the features are the run's.
    np.testing.assert_array_equal(np.load(tmp_path / "timm.npy"), np.load(tmp_path / "run.npy"))
    assert (tmp_path / "timm.paths.txt").read_text() == (tmp_path / "run.paths.txt").read_text()


def test_parquet_without_pyarrow_is_a_one_line_error(run, images, tmp_path, capsys,
                                                     monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # makes `import pyarrow` fail
    assert main(["embed", str(run), str(images), "--out", str(tmp_path / "f.parquet")]) == 2
    err = capsys.readouterr().err
    assert "pip install pyarrow" in err and ".npy" in err and err.count("\n") == 1
    assert main(["embed", str(run), str(images), "--out", str(tmp_path / "f.csv")]) == 2
    assert "must end in .npy or .parquet" in capsys.readouterr().err


def test_parquet_holds_paths_and_embeddings(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    feats = np.arange(6, dtype=np.float32).reshape(3, 2)
    files = [tmp_path / f"{i}.png" for i in range(3)]
    write_features(tmp_path / "f.parquet", feats, files)
    table = pq.read_table(tmp_path / "f.parquet")
    assert table.column("path").to_pylist() == [str(f) for f in files]
    np.testing.assert_array_equal(np.array(table.column("embedding").to_pylist()), feats)
