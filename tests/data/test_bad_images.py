"""Image folders as found in the wild: every odd or broken file is converted or skipped,
counted, and reported once per epoch; a folder with nothing usable fails at the start."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from iwm.data.datasets import load_image, open_image_folder
from iwm.data.sources import MAX_SUBSTITUTES, StreamingBatchSource
from iwm.errors import DataError

RGB = (np.arange(20 * 24 * 3).reshape(20, 24, 3) % 251).astype(np.uint8)


def _save(path: Path, image: Image.Image, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kwargs)
    return path


def _convertible(folder: Path) -> dict[str, Path]:
    """One file per convertible kind, each a picture of RGB (or of its first channel)."""
    rgb = Image.fromarray(RGB)
    palette = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    wide = Image.fromarray(RGB[..., 0].astype(np.uint16) * 257)  # 16 bit, full range
    return {
        "rgb": _save(folder / "rgb.png", rgb),
        "gray": _save(folder / "gray.png", Image.fromarray(RGB[..., 0])),
        "gray_alpha": _save(folder / "la.png", Image.fromarray(RGB[..., 0]).convert("LA")),
        "rgba": _save(folder / "rgba.png", Image.fromarray(np.dstack([RGB, RGB[..., :1]]))),
        "palette": _save(folder / "palette.png", palette),
        "palette_transparent": _save(folder / "palette_t.png", palette, transparency=0),
        "gray16": _save(folder / "gray16.png", wide),
        "cmyk_jpeg": _save(folder / "cmyk.jpg", rgb.convert("CMYK"), quality=95),
        "bilevel": _save(folder / "bw.png", Image.fromarray(RGB[..., 0] > 127)),
        "tiny": _save(folder / "tiny.png", Image.fromarray(RGB[:2, :3])),
    }


def _broken(folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    png = (folder / "ok.png")
    Image.fromarray(RGB).save(png)
    Image.fromarray(RGB).save(folder / "ok.jpg", quality=95)
    data_png, data_jpg = png.read_bytes(), (folder / "ok.jpg").read_bytes()
    png.unlink()
    (folder / "ok.jpg").unlink()
    files = {
        "truncated_png": folder / "cut.png",
        "truncated_jpeg": folder / "cut.jpg",
        "text_as_png": folder / "text.png",
        "empty_jpeg": folder / "empty.jpg",
    }
    files["truncated_png"].write_bytes(data_png[: len(data_png) // 2])
    files["truncated_jpeg"].write_bytes(data_jpg[: len(data_jpg) // 2])
    files["text_as_png"].write_text("not an image")
    files["empty_jpeg"].write_bytes(b"")
    return files


def test_odd_modes_are_converted_to_rgb(tmp_path):
    files = _convertible(tmp_path)
    out = {kind: load_image(path) for kind, path in files.items()}
    for kind, img in out.items():
        assert img.dtype == torch.uint8 and img.shape[0] == 3, kind
    red = torch.from_numpy(RGB[..., 0]).int()
    assert torch.equal(out["rgb"], torch.from_numpy(RGB).permute(2, 0, 1))
    assert torch.equal(out["rgba"], out["rgb"])  # alpha dropped, colour kept
    for kind in ("gray", "gray_alpha", "gray16"):
        # 16-bit: scaled to 8 bits, not clipped at 255 (which made it almost all white).
        assert torch.equal(out[kind][0].int(), red) and torch.equal(out[kind][1], out[kind][2])
    for kind in ("palette", "palette_transparent", "cmyk_jpeg"):  # lossy, but the picture
        assert (out[kind].int() - out["rgb"].int()).abs().float().mean() < 8, kind
    assert set(out["bilevel"].unique().tolist()) <= {0, 255}
    assert out["tiny"].shape == (3, 2, 3)


def test_palette_with_transparency_converts_without_a_warning(tmp_path):
    path = _convertible(tmp_path)["palette_transparent"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_image(path)


@pytest.mark.parametrize("kind", ["truncated_png", "truncated_jpeg", "text_as_png",
                                  "empty_jpeg"])
def test_broken_files_are_a_data_error_naming_the_file(tmp_path, kind):
    path = _broken(tmp_path)[kind]
    with pytest.raises(DataError, match=f"{path.name}: cannot read image") as info:
        load_image(path)
    assert "\n" not in str(info.value)


def _messy_folder(root: Path) -> Path:
    _convertible(root / "train" / "good")
    _broken(root / "train" / "broken")
    (root / "train" / "empty").mkdir()
    (root / "train" / "good" / "notes.txt").write_text("a README among the images")
    (root / "train" / "good" / ".DS_Store").write_bytes(b"hidden: not even counted")
    return root


def test_folder_reports_empty_classes_and_other_files_once(tmp_path):
    root = _messy_folder(tmp_path / "messy")
    with pytest.warns(UserWarning) as record:
        folder = open_image_folder(root, holdout=0)
    [message] = [str(w.message) for w in record]
    assert "1 class folders without images (empty)" in message
    assert "1 files that are not images by their extension ignored (e.g. notes.txt)" in message
    assert folder.classes == ["broken", "empty", "good"]  # the empty class keeps its label
    assert len(folder) == 14  # 10 convertible + 4 broken (found unreadable only when read)


def test_training_source_skips_counts_and_reports_once_per_epoch(tmp_path):
    with pytest.warns(UserWarning):
        folder = open_image_folder(_messy_folder(tmp_path / "messy"), holdout=0)
    # Images smaller than the crop (2x3 px) are upsampled like any other.
    src = StreamingBatchSource(folder, batch_size=7, image_size=16, seed=0, num_workers=0)
    for epoch in range(2):
        with pytest.warns(UserWarning) as record:
            batches = [src.next() for _ in range(src.steps_per_epoch)]
        [message] = [str(w.message) for w in record]  # one report for the whole epoch
        assert f"epoch {epoch}: 4 unreadable files (" in message
        assert "reads) replaced by readable neighbours: " in message and "cut.jpg" in message
        assert all(x.shape == (7, 3, 16, 16) for x, _ in batches)  # batches stay full
        assert len(src.bad_files) == 4
    # Every draw of a broken file was counted (a substitute may be broken too).
    assert src.skipped >= 8
    src.close()


def test_folder_of_only_broken_files_fails_at_the_start(tmp_path):
    _broken(tmp_path / "bad" / "c")
    folder = open_image_folder(tmp_path / "bad", holdout=0)
    src = StreamingBatchSource(folder, batch_size=2, image_size=16, num_workers=0)
    with pytest.raises(DataError, match="none of 4 sampled images could be read") as info:
        _ = src.mean  # what the trainer asks for first, before any step
    assert "\n" not in str(info.value) and "cannot read image" in str(info.value)


def test_mostly_broken_folder_is_a_one_line_error_from_a_worker(tmp_path):
    for i in range(MAX_SUBSTITUTES + 4):
        (tmp_path / "bad" / "c").mkdir(parents=True, exist_ok=True)
        (tmp_path / "bad" / "c" / f"{i:02d}.png").write_text("junk")
    Image.fromarray(RGB).save(tmp_path / "bad" / "c" / "zz_good.png")
    folder = open_image_folder(tmp_path / "bad", holdout=0)
    # One batch holds every file, so it holds one followed by MAX_SUBSTITUTES broken ones.
    src = StreamingBatchSource(folder, batch_size=len(folder), image_size=16, num_workers=1)
    with pytest.raises(DataError, match=f"{MAX_SUBSTITUTES} unreadable images in a row") as info:
        src.next()
    assert "\n" not in str(info.value) and "Traceback" not in str(info.value)
    src.close()


def test_empty_folder_is_a_clear_error(tmp_path):
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    (tmp_path / "empty" / "cls" / "readme.txt").write_text("no images here")
    with pytest.raises(DataError, match="no images in"):
        open_image_folder(tmp_path / "empty")


@pytest.mark.parametrize("mode", ["RGB", "L", "CMYK"])
def test_jpeg_fast_path_decodes_what_pillow_decodes(tmp_path, mode):
    from iwm.data.datasets import _decode_jpeg

    image = Image.fromarray(RGB).convert(mode)
    path = _save(tmp_path / f"{mode}.jpg", image, quality=90)
    with Image.open(path) as im:
        reference = torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1)
    fast = _decode_jpeg(path)
    if fast is None:  # a format the fast decoder declines: Pillow's path serves it
        assert mode == "CMYK"
        return
    assert (fast.int() - reference.int()).abs().max() <= 1
    assert torch.equal(load_image(path), fast)


def test_jpeg_fast_path_declines_broken_and_other_files(tmp_path):
    from iwm.data.datasets import _decode_jpeg

    files = _broken(tmp_path)
    for kind in ("truncated_jpeg", "empty_jpeg", "text_as_png"):
        assert _decode_jpeg(files[kind]) is None, kind
    assert _decode_jpeg(_save(tmp_path / "a.png", Image.fromarray(RGB))) is None
