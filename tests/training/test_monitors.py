"""The collapse monitors: RankMe against a direct reference, the logged metrics, and the
warning of a collapsed run (and its absence from a healthy one)."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from torch import Tensor

from conftest import FAKE_TEST, FAKE_TRAIN
from iwm.config import load_config
from iwm.data.fetch import write_idx
from iwm.errors import ConfigError
from iwm.models.vit import Encoder
from iwm.training.metrics import read_metrics
from iwm.training.monitors import (
    RANK_EPS,
    TARGET_STD_COLLAPSE,
    Measured,
    collapse_warning,
    effective_rank,
)
from tiny_run import TINY


def reference_rank(x: Tensor) -> float:
    """RankMe as Garrido et al. write it, straight from the singular values."""
    s = torch.linalg.svdvals(x.double())
    p = s / s.sum() + RANK_EPS
    return float(torch.exp(-(p * p.log()).sum()))


@pytest.mark.parametrize("name", ["identity", "rank1", "random", "wide"])
def test_effective_rank_matches_the_reference(name: str) -> None:
    gen = torch.Generator().manual_seed(0)
    x = {"identity": torch.eye(32),
         "rank1": torch.randn(64, 1, generator=gen) @ torch.randn(1, 16, generator=gen),
         "random": torch.randn(64, 16, generator=gen),
         "wide": torch.randn(8, 40, generator=gen)}[name]
    got = float(effective_rank(x))
    assert got == pytest.approx(reference_rank(x), rel=1e-4)
    expected = {"identity": 32.0, "rank1": 1.0}.get(name)
    if expected is not None:
        assert got == pytest.approx(expected, rel=1e-3)
    assert 1.0 - 1e-4 <= got <= min(x.shape) * (1 + 1e-4)  # eps lifts it a hair


def test_a_constant_embedding_has_rank_one_and_zeros_do_not_fail() -> None:
    assert float(effective_rank(torch.ones(50, 12))) == pytest.approx(1.0, rel=1e-4)
    assert torch.isfinite(effective_rank(torch.zeros(50, 12)))


def test_the_warning_names_each_sign_and_only_when_there_is_one() -> None:
    healthy = Measured(rankme=4.2, ceiling=128, knn_acc=0.5, seconds=1.0)
    collapsed = Measured(rankme=1.2, ceiling=128, knn_acc=0.1, seconds=1.0)
    assert collapse_warning(10, healthy, 0.3) is None
    assert collapse_warning(10, None, None) is None
    rank = collapse_warning(10, collapsed, 0.3)
    assert rank is not None and "step 10" in rank and "effective rank 1.20 of 128" in rank
    std = collapse_warning(10, None, TARGET_STD_COLLAPSE / 2)
    assert std is not None and "target_std" in std and "effective rank" not in std
    assert "\n" not in rank


def _pretrain(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *extra: str) -> Path:
    from iwm.training.loop import pretrain

    # Noise images: the fake MNIST's (a value plus one gradient) are a one-parameter
    # family, on which even an untrained encoder has an effective rank near 1.
    data = tmp_path / "fmnist"
    gen = torch.Generator().manual_seed(0)
    for prefix, n in (("train", FAKE_TRAIN), ("t10k", FAKE_TEST)):
        write_idx(data / f"{prefix}-images-idx3-ubyte.gz",
                  torch.randint(0, 256, (n, 28, 28), generator=gen, dtype=torch.uint8))
        write_idx(data / f"{prefix}-labels-idx1-ubyte.gz",
                  torch.randint(0, 10, (n,), generator=gen, dtype=torch.uint8))
    monkeypatch.setenv("IWM_DATA", str(data))
    return pretrain(load_config("iwm-inv-tiny", [*TINY, "train.log_every=1", *extra]),
                    tmp_path / "run")


def test_a_healthy_run_logs_the_monitors_and_no_warning(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run = _pretrain(tmp_path, monkeypatch, "train.progress=true", "train.epochs=1",
                        "train.monitor_every=3")
    assert "monitors: rankme, knn_acc of the target encoder on 16 images of the test split" \
        in capsys.readouterr().err
    assert not [w for w in caught if "collapse" in str(w.message)]
    rows = [r for r in read_metrics(run) if "rankme" in r]
    # 64 images at batch 16: 4 steps; every 3rd and the last.
    assert [int(r["step"]) for r in rows] == [3, 4]
    for r in rows:
        assert 2.0 <= r["rankme"] <= 16  # 16 held-out images bound it
        assert r["rankme_ratio"] == pytest.approx(r["rankme"] / 16)
        assert 0.0 <= r["knn_acc"] <= 1.0 and r["monitor_s"] > 0
    assert all("loss" in r for r in rows)  # a monitor shares its step's log row


def test_a_collapsed_run_is_warned_about(tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    def constant(self: Encoder, x: Tensor, keep: Tensor | None = None,
                 keep_valid: Tensor | None = None) -> Tensor:
        tokens = keep.shape[1] if keep is not None else self.grid[0] * self.grid[1]
        # Through the weights, so the step still has gradients; every image the same.
        return self.norm.bias.expand(x.shape[0], tokens, -1) + 1.0

    monkeypatch.setattr(Encoder, "forward_tokens", constant)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _pretrain(tmp_path, monkeypatch, "train.epochs=1", "train.monitor_every=1")
    said = [str(w.message) for w in caught if "possible collapse" in str(w.message)]
    assert len(said) == 1, said  # once, not at each of the 4 steps
    assert said[0].startswith("possible collapse at step 1: effective rank 1.00 of 16 "
                              "(below 2) and target_std 0 (below 0.05)")


def test_monitor_every_zero_turns_the_monitors_off(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = _pretrain(tmp_path, monkeypatch, "train.monitor_every=0")
    assert not any("rankme" in r for r in read_metrics(run))


def test_monitor_every_must_not_be_negative() -> None:
    with pytest.raises(ConfigError, match=r"train.monitor_every=-1"):
        load_config("iwm-inv-tiny", ["train.monitor_every=-1"])
