from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest

from iwm.cli.main import main
from iwm.data.datasets import get_dataset, open_image_folder
from iwm.data.tarshards import (
    INDEX_FILE,
    expand_braces,
    iter_samples,
    open_shards,
    shard_paths,
    write_shards,
)
from iwm.errors import DataError

# The fixture's notes.txt files, reported when the folder is indexed.
pytestmark = pytest.mark.filterwarnings("ignore:.*not images by their extension")


def test_expand_braces():
    assert expand_braces("a.tar") == ["a.tar"]
    assert expand_braces("s-{000..002}.tar") == ["s-000.tar", "s-001.tar", "s-002.tar"]
    assert expand_braces("{9..11}") == ["9", "10", "11"]
    assert expand_braces("{a,b{1..2}}/x") == ["a/x", "b1/x", "b2/x"]
    assert expand_braces("{x,y}{0..1}") == ["x0", "x1", "y0", "y1"]
    with pytest.raises(DataError, match="unbalanced"):
        expand_braces("s-{000..002.tar")


def _all_samples(shards):
    return [s for path, n in zip(shards.paths, shards.counts, strict=True)
            for s in iter_samples(path, n, lambda o: True)]


def test_round_trip_gives_the_folders_images_and_labels(image_folder, tmp_path):
    out = tmp_path / "shards"
    written = write_shards(image_folder, out, shard_size=5)
    assert written == {"train": 14, "test": 10}
    for split in ("train", "test"):
        folder = open_image_folder(image_folder, split)
        shards = open_shards(f"{out / split}/shard-{{000000..00000{(len(folder) - 1) // 5}}}.tar")
        assert shards.classes == folder.classes == ["cat", "dog"]
        assert len(shards) == len(folder) and shards.counts[0] == 5
        expected = sorted((Path(p).read_bytes(), label) for p, label in folder.samples)
        got = _all_samples(shards)
        assert sorted((data, label) for _, _, data, label in got) == expected
        # The writer shuffles: the folder lists its images class by class, the shards not.
        labels = [label for *_, label in got]
        assert labels != sorted(labels)
        index = json.loads((out / split / INDEX_FILE).read_text())
        assert index["channels"] == 3 and tuple(index["mean"]) == folder.mean == shards.mean
        assert index["image_size"]["min"] == [9.0, 10.0]
        assert index["image_size"]["max"] == [16.0, 20.0]


def test_writing_is_reproducible_and_refuses_a_full_folder(image_folder, tmp_path):
    write_shards(image_folder, tmp_path / "a", shard_size=5)
    write_shards(image_folder, tmp_path / "b", shard_size=5)
    for name in ("shard-000000.tar", "shard-000002.tar", INDEX_FILE):
        a, b = (tmp_path / x / "train" / name for x in "ab")
        assert a.read_bytes() == b.read_bytes().replace(b"/b/", b"/a/")
    with pytest.raises(DataError, match="not empty; write the shards to a new folder"):
        write_shards(image_folder, tmp_path / "a")


def test_limit_keeps_whole_leading_shards(coloured_shards):
    shards = open_shards(coloured_shards)
    assert shards.counts == [7] * 6 + [6] and shards.offsets[:3] == [0, 7, 14]
    small = shards.subset(10)
    assert small.counts == [7, 3] and len(small) == 10 and small.paths == shards.paths[:2]


def test_cli_writes_shards(image_folder, tmp_path, capsys):
    assert main(["shards", str(image_folder), str(tmp_path / "out"), "--shard-size", "4"]) == 0
    assert "train: 14 images" in capsys.readouterr().out
    assert len(open_shards(f"{tmp_path}/out/train/*.tar").paths) == 4


def _one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def test_pattern_errors(coloured_shards, tmp_path):
    with pytest.raises(DataError, match="matches no files") as e:
        shard_paths(f"{tmp_path}/nothing-*.tar")
    _one_line(e)
    with pytest.raises(DataError, match="shard-000007.tar does not exist"):
        shard_paths(coloured_shards.replace("*", "{000005..000009}"))
    lone = tmp_path / "elsewhere" / "x.tar"
    lone.parent.mkdir()
    lone.write_bytes(Path(shard_paths(coloured_shards)[0]).read_bytes())
    with pytest.raises(DataError, match=f"no {INDEX_FILE} beside the shards") as e:
        open_shards(str(lone))
    _one_line(e)
    with pytest.raises(DataError, match="pretraining only"):
        get_dataset(f"shards:{coloured_shards}", "test")


def test_a_shard_cut_short_or_not_indexed_is_refused_when_opened(coloured_shards):
    paths = shard_paths(coloured_shards)
    paths[2].write_bytes(paths[2].read_bytes()[:-1024])
    with pytest.raises(DataError, match="shard-000002.tar: .* the shard changed or was cut short"):
        open_shards(coloured_shards)
    paths[2].rename(paths[2].with_name("shard-extra.tar"))
    with pytest.raises(DataError, match="shard-extra.tar: not in .*index.json"):
        open_shards(coloured_shards)


def test_a_corrupt_shard_is_a_one_line_error_when_read(coloured_shards):
    path = shard_paths(coloured_shards)[1]
    size = path.stat().st_size
    path.write_bytes(b"\x00garbage" * (size // 8) + b"\x00" * (size % 8))
    shards = open_shards(coloured_shards)  # the same size: only reading can tell
    with pytest.raises(DataError, match="shard-000001.tar: corrupt tar shard") as e:
        list(iter_samples(path, 7, lambda o: True))
    _one_line(e)
    assert shards.counts[1] == 7


def test_a_shard_without_images_is_a_one_line_error(coloured_shards):
    path = shard_paths(coloured_shards)[0]
    with tarfile.open(path, "w") as tar:
        for name, data in (("a.txt", b"text"), ("a.cls", b"1"), ("b.json", b"{}")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with pytest.raises(DataError, match="shard-000000.tar: no images in the shard") as e:
        list(iter_samples(path, 7, lambda o: True))
    _one_line(e)
