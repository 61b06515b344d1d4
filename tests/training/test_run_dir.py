"""The run directory's config: written once, read back by ``--resume``."""

import pytest

from iwm.config import load_config
from iwm.errors import ConfigError
from iwm.training.run_dir import load_run_config, new_run_dir, save_run_config


def test_a_saved_config_reads_back_with_overrides(tmp_path):
    cfg = load_config("iwm-inv-tiny", ["train.batch_size=16"])
    save_run_config(cfg, tmp_path / "run")
    assert load_run_config(tmp_path / "run") == cfg
    assert load_run_config(tmp_path / "run", ["train.batch_size=8"]).train.batch_size == 8
    with pytest.raises(ConfigError, match="not a run directory"):
        load_run_config(tmp_path)


def test_a_new_run_dir_is_named_by_the_run_or_the_time(tmp_path):
    named = load_config("iwm-inv-tiny", [f"train.out_dir={tmp_path}", "train.run_name=mine"])
    assert new_run_dir(named, "iwm-inv-tiny") == tmp_path / "mine"
    unnamed = load_config("iwm-inv-tiny", [f"train.out_dir={tmp_path}"])
    assert new_run_dir(unnamed, "iwm-inv-tiny").name.startswith("iwm-inv-tiny-20")
