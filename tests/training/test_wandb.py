"""``train.logger=wandb``: a tiny run in W&B's offline mode (no network) writes the same
scalars as metrics.csv, the resolved config and the run name into its offline run file;
without the package, one line naming the extra."""

from __future__ import annotations

import json
import struct
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from conftest import write_fake_mnist
from iwm.config import load_config
from iwm.errors import ConfigError
from iwm.training.loop import pretrain
from iwm.training.metrics import WANDB_ID_FILE, read_metrics
from tiny_run import TINY

BLOCK = 32768
"""W&B's run file is a LevelDB-format log: 32 KiB blocks of (crc, length, type) records."""


def _records(path: Path) -> list[Any]:
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    pos, records, pending = 7, [], b""  # after W&B's 7-byte file header
    while pos + 7 <= len(data):
        if BLOCK - pos % BLOCK < 7:  # a block's tail too short for a header is padding
            pos += BLOCK - pos % BLOCK
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:
            break
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk  # full/first, middle/last
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def test_an_offline_run_holds_the_scalars_config_and_name(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("wandb")
    pytest.importorskip("wandb.proto.wandb_internal_pb2")
    for var, value in {"WANDB_MODE": "offline", "WANDB_DIR": tmp_path / "wandb-home",
                       "WANDB_CONFIG_DIR": tmp_path / "wandb-config",
                       "WANDB_CACHE_DIR": tmp_path / "wandb-cache",
                       "WANDB_DATA_DIR": tmp_path / "wandb-data", "WANDB_SILENT": "true"
                       }.items():
        monkeypatch.setenv(var, str(value))
    write_fake_mnist(tmp_path / "fmnist")
    monkeypatch.setenv("IWM_DATA", str(tmp_path / "fmnist"))
    run = pretrain(load_config("iwm-inv-tiny", [*TINY, "train.epochs=0.5", "train.log_every=1",
                                                "train.logger=[tensorboard,wandb]",
                                                "train.run_name=tiny-wandb"]),
                   tmp_path / "run")
    assert (run / "tensorboard").is_dir()  # both loggers, and the CSV as always
    [path] = (run / "wandb").glob("offline-run-*/run-*.wandb")
    assert path.name == f"run-{(run / WANDB_ID_FILE).read_text().strip()}.wandb"
    # W&B's service process may still be writing the file when finish() returns.
    deadline = time.monotonic() + 60
    records = _records(path)
    while not any(r.WhichOneof("record_type") == "exit" for r in records):
        assert time.monotonic() < deadline, "the offline run file never got its exit record"
        time.sleep(0.2)
        records = _records(path)
    history = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            items = {"/".join(i.nested_key) or i.key: json.loads(i.value_json)
                     for i in r.history.item}
            history.setdefault(r.history.step.num, {}).update(items)
    assert sorted(history) == [1, 2]
    for row in read_metrics(run):
        logged = history[int(row["step"])]
        for key, value in row.items():
            if key != "step":
                assert logged[key] == pytest.approx(value), key
    assert {"loss", "target_std", "rankme", "knn_acc"} <= set(history[2])
    [started] = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert started.display_name == "tiny-wandb" and started.project == "iwm"
    config = {i.key: json.loads(i.value_json) for i in started.config.update}
    assert config["train"]["logger"] == ["tensorboard", "wandb"]
    assert config["model"]["encoder"] == "vit_micro"


def test_without_the_package_the_error_names_the_extra(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)  # find_spec then finds nothing
    with pytest.raises(ConfigError, match=r"^train.logger=wandb needs the wandb package: "
                                          r"pip install 'iwm\[wandb\]'$"):
        pretrain(load_config("iwm-inv-tiny", [*TINY, "train.logger=wandb"]), tmp_path / "run")
    assert not (tmp_path / "run").exists()  # refused before anything was set up
