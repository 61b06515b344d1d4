import socket

import pytest
import torch
import torch.multiprocessing as mp

from iwm.errors import ConfigError
from iwm.training.distributed import (
    DistInfo,
    all_reduce_mean,
    barrier,
    cleanup_distributed,
    init_distributed,
)

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture
def no_torchrun(monkeypatch):
    for var in TORCHRUN_VARS:
        monkeypatch.delenv(var, raising=False)


def test_single_process_defaults(no_torchrun):
    info, device = init_distributed("cpu")
    assert info == DistInfo(rank=0, world_size=1, local_rank=0)
    assert info.is_main and not info.distributed
    assert device == torch.device("cpu")
    assert not torch.distributed.is_initialized()
    x = torch.tensor([1.0, 2.0])
    assert torch.equal(all_reduce_mean(x), x)
    barrier()
    cleanup_distributed()  # nothing to clean up: must not raise


def test_auto_picks_an_available_device(no_torchrun):
    _, device = init_distributed("auto")
    expected = "cuda" if torch.cuda.is_available() else None
    if expected:
        assert device.type == expected
    else:
        assert device.type in ("cpu", "mps")


@pytest.mark.parametrize("pref", ["tpu", "not-a-device", "cuda:99"])
def test_unusable_devices_are_config_errors(no_torchrun, pref):
    with pytest.raises(ConfigError, match="train.device"):
        init_distributed(pref)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_without_cuda_is_a_config_error(no_torchrun):
    with pytest.raises(ConfigError, match="CUDA is not available"):
        init_distributed("cuda")


def test_bad_torchrun_environment(no_torchrun, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ConfigError, match="WORLD_SIZE"):
        init_distributed("cpu")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "5")
    with pytest.raises(ConfigError, match="inconsistent"):
        init_distributed("cpu")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(ConfigError, match="MASTER_ADDR"):
        init_distributed("cpu")


def _worker(rank: int, world_size: int, port: int, results) -> None:
    import os

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    try:
        info, device = init_distributed("cpu")
        x = torch.tensor([float(rank + 1), 10.0 * rank])
        mean = all_reduce_mean(x)
        results.put((info.rank, info.world_size, info.is_main, str(device),
                     mean.tolist(), x.tolist()))
    finally:
        cleanup_distributed()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_gloo_all_reduce_mean():
    # fork: the children inherit the imported torch instead of importing it again (spawn
    # costs seconds per process on a small machine). Safe here: the children only touch
    # tiny CPU tensors, never CUDA or OpenMP-parallel kernels.
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    ctx = mp.get_context(method)
    results = ctx.Queue()
    mp.start_processes(_worker, args=(2, _free_port(), results), nprocs=2, join=True,
                       start_method=method)
    got = sorted(results.get(timeout=30) for _ in range(2))
    assert got == [
        (0, 2, True, "cpu", [1.5, 5.0], [1.0, 0.0]),
        (1, 2, False, "cpu", [1.5, 5.0], [2.0, 10.0]),  # input left unmodified
    ]


def _shard_reader(rank: int, world_size: int, port: int, pattern: str, results) -> None:
    import os

    from iwm.config import DataConfig
    from iwm.data.shard import Shard
    from iwm.data.sources import make_source

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    try:
        info, _ = init_distributed("cpu")
        cfg = DataConfig(name=f"shards:{pattern}", image_size=8, crop_scale=(1.0, 1.0),
                         crop_ratio=(1.0, 1.0), hflip=False, num_workers=2)
        src = make_source(cfg, 12, "cpu", seed=0, shard=Shard(info.rank, info.world_size))
        seen = []
        for _ in range(2 * src.steps_per_epoch):
            x, _ = src.next()
            seen.append((x[:, 0].flatten(1).mean(1) * 255 / 5).round().long().tolist())
        src.close()
        barrier()
        results.put((info.rank, seen))
    finally:
        cleanup_distributed()


def test_two_gloo_processes_read_disjoint_shard_samples(coloured_shards):
    # Each process reads its own part of the shards with 2 DataLoader workers; together
    # they see every one of the 48 images once per epoch (4 steps of 2 x 6).
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    results = mp.get_context(method).Queue()
    mp.start_processes(_shard_reader, args=(2, _free_port(), coloured_shards, results),
                       nprocs=2, join=True, start_method=method)
    seen = dict(results.get(timeout=30) for _ in range(2))
    for epoch in range(2):
        ids = [i for r in (0, 1) for batch in seen[r][4 * epoch:4 * epoch + 4] for i in batch]
        assert sorted(ids) == list(range(48))
    assert seen[0][:4] != seen[0][4:]
