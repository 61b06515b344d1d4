"""Data parallelism and gradient accumulation are exact: N processes or N micro-batches
make the update one process makes with the whole global batch."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from iwm.config import load_config
from iwm.data.datasets import get_dataset
from iwm.data.masks import MultiBlockMaskSampler
from iwm.data.shard import Shard, take_rows
from iwm.data.sources import make_source
from iwm.training.checkpoint import list_checkpoints, load_checkpoint
from iwm.training.step import Trainer
from tiny_run import tiny_trainer

TINY = ["train.batch_size=16", "model.predictor_depth=2", "train.progress=false",
        "train.device=cpu"]


def test_gradient_accumulation_makes_the_whole_batch_update():
    crops = torch.rand(3, 16, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    whole, micro = tiny_trainer(), tiny_trainer("train.grad_accum_steps=4")
    for step in range(3):
        a, _ = whole.step(step, crops[step])
        b, _ = micro.step(step, crops[step])
        assert b.loss.item() == pytest.approx(a.loss.item(), rel=1e-5)
    sa, sb = whole.model.state_dict(), micro.model.state_dict()
    for key in sa:
        torch.testing.assert_close(sb[key], sa[key], rtol=1e-4, atol=1e-5, msg=key)
    # And it trained: the weights moved from their initialisation.
    assert not torch.equal(sa["encoder.patch_embed.proj.weight"],
                           tiny_trainer().model.state_dict()["encoder.patch_embed.proj.weight"])


def test_masks_are_drawn_for_the_global_batch():
    cfg = load_config("iwm-equi-tiny", TINY)
    gen = MultiBlockMaskSampler((7, 7), cfg.mask)
    whole = gen(8, torch.Generator().manual_seed(0))
    halves = [take_rows(gen(8, torch.Generator().manual_seed(0)), Shard(i, 2).rows(4))
              for i in range(2)]
    for field in ("context", "targets", "target_valid"):
        assert torch.equal(torch.cat([getattr(h, field) for h in halves]),
                           getattr(whole, field))


@pytest.mark.parametrize("kind", ["memory", "folder"])
def test_sharded_sources_return_the_rows_of_one_source(kind, fake_mnist_dir, image_folder,
                                                       monkeypatch):
    monkeypatch.setenv("IWM_DATA", str(fake_mnist_dir))
    name = "fashion-mnist" if kind == "memory" else f"imagefolder:{image_folder}"
    cfg = load_config("iwm-equi-tiny", [*TINY, f"data.name={name}", "data.num_workers=0",
                                        "data.image_size=8", "model.patch_size=4"])
    dataset = get_dataset(cfg.data.name, "train", cfg.data.root)
    batch = 16 if kind == "memory" else 4

    def source(shard: Shard):
        return make_source(cfg.data, batch, "cpu", seed=3, dataset=dataset, shard=shard)

    whole, parts = source(Shard()), [source(Shard(i, 2)) for i in range(2)]
    for _ in range(whole.steps_per_epoch + 1):  # into the second epoch
        crops, labels = whole.next()
        got = [p.next() for p in parts]
        assert torch.equal(torch.cat([g[0] for g in got]), crops)
        assert torch.equal(torch.cat([g[1] for g in got]), labels)
    assert parts[0].steps_per_epoch == whole.steps_per_epoch


def _pretrain(run_dir, data_dir, nproc: int, *extra: str) -> None:
    env = {**os.environ, "IWM_DATA": str(data_dir), "OMP_NUM_THREADS": "1"}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    launch = ([sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={nproc}"] if nproc > 1 else [sys.executable])
    cmd = [*launch, "-m", "iwm.cli.main", "pretrain", "iwm-equi-tiny", *TINY,
           "train.epochs=1", "train.checkpoint_every=4", *extra, "--run-dir", str(run_dir)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def test_two_gloo_processes_match_one_process(tmp_path, fake_mnist_dir):
    """The same global batch of 16 over 1 process, or 2 processes of 8 (gloo), trains to
    the same weights: 4 steps, with views, masks and an optimiser that amplifies any
    difference in the data or the gradients."""
    _pretrain(tmp_path / "one", fake_mnist_dir, 1)
    _pretrain(tmp_path / "two", fake_mnist_dir, 2)
    (step_a, a), = list_checkpoints(tmp_path / "one")
    (step_b, b), = list_checkpoints(tmp_path / "two")
    assert step_a == step_b == 4
    one, two = load_checkpoint(a)["model"], load_checkpoint(b)["model"]
    init = tiny_trainer().model.state_dict()
    moved = 0
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=1e-5, msg=key)
        moved += not torch.equal(one[key], init[key])
    assert moved > len(one) // 2  # the comparison is between trained weights


def test_fsdp_matches_one_process_and_resumes_exactly(tmp_path, fake_mnist_dir):
    """FSDP (parameters and optimiser state sharded over 2 gloo processes) trains the
    one-process weights; its checkpoints hold full tensors that load anywhere, and a run
    resumed from one continues exactly."""
    from iwm.api import load

    fsdp = ["train.data_parallel=fsdp", "train.keep_checkpoints=5"]
    _pretrain(tmp_path / "one", fake_mnist_dir, 1, "train.epochs=2")
    _pretrain(tmp_path / "fsdp", fake_mnist_dir, 2, "train.epochs=2", *fsdp)
    (_, a4), (_, a8) = list_checkpoints(tmp_path / "one")
    (_, b4), (_, b8) = list_checkpoints(tmp_path / "fsdp")
    one, two = load_checkpoint(a8), load_checkpoint(b8)
    assert two["optimizer_format"] == "fqn"
    for key in one["model"]:
        torch.testing.assert_close(two["model"][key], one["model"][key], rtol=1e-4,
                                   atol=1e-5, msg=key)
    assert load(tmp_path / "fsdp").step == 8  # a plain, full checkpoint

    # Interrupted after step 4: resuming gives the uninterrupted run's step 8.
    part = tmp_path / "part"
    (part / "checkpoints").mkdir(parents=True)
    for name in ("config.yaml", "metrics.csv"):
        (part / name).write_bytes((tmp_path / "fsdp" / name).read_bytes())
    (part / "checkpoints" / b4.name).write_bytes(b4.read_bytes())
    _pretrain(part, fake_mnist_dir, 2, "train.epochs=2", *fsdp, "--resume")
    resumed = load_checkpoint(part / "checkpoints" / b8.name)
    for key in two["model"]:
        assert torch.equal(resumed["model"][key], two["model"][key]), key
    assert resumed["optimizer"].keys() == two["optimizer"].keys()


@pytest.mark.cuda
def test_a_training_step_never_waits_for_the_gpu():
    """Masks are drawn on the CPU and copied asynchronously; nothing in the step reads a
    device value on the host (the loop does that only at log and checkpoint steps)."""
    torch.manual_seed(0)
    cfg = load_config("iwm-equi-tiny", [*TINY[:-1], "train.device=cuda"])
    trainer = Trainer.create(cfg, channels=1, mean=(0.5,), std=(0.25,),
                             device=torch.device("cuda"), steps_per_epoch=4)
    trainer.model.train()
    crops = torch.rand(16, 1, 28, 28, device="cuda")
    trainer.step(0, crops)  # first step: lazy initialisation may synchronise
    torch.cuda.set_sync_debug_mode("error")
    try:
        trainer.step(1, crops)
    finally:
        torch.cuda.set_sync_debug_mode(0)


def test_fsdp_on_a_torch_without_fully_shard_says_which_torch(monkeypatch):
    from iwm.errors import ConfigError
    from iwm.models.iwm import build_model
    from iwm.training.fsdp import shard_model

    model = build_model(load_config("iwm-equi-tiny", TINY), in_chans=1)
    monkeypatch.setitem(sys.modules, "torch.distributed.fsdp", None)  # import fails
    with pytest.raises(ConfigError, match=r"needs torch >= 2\.6.*train\.data_parallel=ddp"):
        shard_model(model)
