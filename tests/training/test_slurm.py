"""``iwm pretrain --slurm``: options, the sbatch script submitit writes, the job's torchrun
environment, and requeue after a checkpoint. No SLURM here: ``sbatch`` and ``srun`` are
stand-ins on PATH, and the runs use submitit's in-process debug executor."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import write_fake_mnist
from iwm.cli.main import main
from iwm.config import load_config
from iwm.errors import ConfigError, Preempted
from iwm.training import slurm
from iwm.training.checkpoint import list_checkpoints, load_checkpoint
from iwm.training.metrics import read_metrics
from iwm.training.signals import StopRequests
from iwm.training.slurm import PretrainJob, parse_slurm_options, submit_pretrain
from iwm.training.step import Trainer

submitit = pytest.importorskip("submitit")

TINY = ["train.batch_size=16", "train.epochs=0.25", "train.progress=false",
        "model.predictor_depth=2", "train.device=cpu"]
DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture
def dist_env(monkeypatch):
    """The torchrun variables unset now, and restored after the test."""
    for name in DIST_VARS:
        monkeypatch.setenv(name, "-")
        monkeypatch.delenv(name)


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch) -> Path:
    """``srun`` (which submitit looks for) and an ``sbatch`` that answers with job 4242."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in (("sbatch", 'echo "Submitted batch job 4242"'), ("srun", "exit 1")):
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return bin_dir


# ---------------------------------------------------------------- options


def test_options_parse_commas_and_spaces():
    o = parse_slurm_options("nodes=2,gpus=8, partition=learn time=4320,cpus=10,mem=0,"
                            "account=x,qos=y,constraint=volta32gb&ib requeue=5,folder=/logs")
    assert o == slurm.SlurmOptions(nodes=2, gpus=8, partition="learn", time=4320, cpus=10,
                                   mem=0, account="x", qos="y", constraint="volta32gb&ib",
                                   requeue=5, folder="/logs")
    assert (o.tasks_per_node, o.world_size, o.signal_delay_s) == (8, 16, 180)
    defaults = parse_slurm_options("")
    assert (defaults.nodes, defaults.gpus, defaults.time, defaults.requeue) == (1, 1, 1440, 3)
    # CPU-only: one process per node. A short job is told to checkpoint earlier than 180 s
    # before its limit would allow, so it gets at most half its time.
    cpu = parse_slurm_options("gpus=0,time=4")
    assert (cpu.tasks_per_node, cpu.signal_delay_s) == (1, 120)


@pytest.mark.parametrize("text, problem", [
    ("nodes=2,gpu=8", "unknown option 'gpu'"),
    ("nodes=2,partition", "'partition' is not key=value"),
    ("nodes=two", "nodes='two' is not a whole number >= 1"),
    ("nodes=0", "nodes='0' is not a whole number >= 1"),
    ("gpus=-1", "gpus='-1' is not a whole number >= 0"),
    ("time=1.5", "time='1.5' is not a whole number >= 1"),
    ("requeue=", "requeue='' is not a whole number >= 0"),
    ("partition=", "partition= needs a value"),
    ("nodes=1,nodes=2", "nodes is given twice"),
    ("signal_delay=600", "signal_delay=600 s is too long"),
    ("time=5,signal_delay=200", "signal_delay=200 s is too long for time=5 min"),
])
def test_options_errors_name_the_problem_and_the_valid_keys(text, problem):
    with pytest.raises(ConfigError) as e:
        parse_slurm_options(text)
    message = str(e.value)
    assert problem in message and "\n" not in message
    assert all(f"{key}=" in message for key in ("nodes", "gpus", "partition", "requeue",
                                                "folder", "constraint", "signal_delay"))


# ---------------------------------------------------------------- submission


def test_submission_writes_the_sbatch_script_and_pickles_the_run(fake_slurm, tmp_path):
    cfg = load_config("iwm-equi-tiny", TINY)
    run_dir = tmp_path / "run"
    options = parse_slurm_options("nodes=2,gpus=8,partition=learn,time=4320,cpus=10,mem=0,"
                                  "account=x,qos=y,constraint=volta32gb,requeue=5")
    job = submit_pretrain(cfg, run_dir, options)
    assert job.job_id == "4242"
    assert job.paths.folder == run_dir / "slurm"  # the default folder: inside the run
    script = job.paths.submission_file.read_text()
    for line in ("--nodes=2", "--ntasks-per-node=8", "--gpus-per-node=8", "--cpus-per-task=10",
                 "--mem=0", "--time=4320", "--partition=learn", "--account=x", "--qos=y",
                 "--constraint=volta32gb", "--requeue", "--signal=USR2@180",
                 "--job-name=iwm-run"):
        assert f"#SBATCH {line}\n" in script, line
    assert "srun" in script and "submitit.core._submit" in script

    delayed = submitit.helpers.DelayedSubmission.load(job.paths.submitted_pickle)
    assert delayed._timeout_countdown == 5 and delayed._timeout_min == 4320  # requeue=5
    launched = delayed.function
    assert isinstance(launched, PretrainJob)
    assert (launched.run_dir, launched.resume, launched.cfg) == (run_dir, False, cfg)

    # mem in GB otherwise, and another folder for the logs.
    job = submit_pretrain(cfg, run_dir, parse_slurm_options(f"mem=64,folder={tmp_path / 'l'}"))
    assert "#SBATCH --mem=64G\n" in job.paths.submission_file.read_text()
    assert job.paths.folder == tmp_path / "l"


def test_submission_refusals(fake_slurm, tmp_path, monkeypatch):
    cfg = load_config("iwm-equi-tiny", TINY)  # batch 16
    with pytest.raises(ConfigError, match=r"batch_size=16 \(the global batch\) cannot be split "
                                          r"evenly over 24 process\(es\) \(nodes=3 x gpus=8\)"):
        submit_pretrain(cfg, tmp_path / "run", parse_slurm_options("nodes=3,gpus=8"))
    # Each of the 16 processes would have to split its 1 image into 2 micro-batches.
    accum = load_config("iwm-equi-tiny", TINY + ["train.grad_accum_steps=2"])
    with pytest.raises(ConfigError, match="use a multiple of 32"):
        submit_pretrain(accum, tmp_path / "run", parse_slurm_options("nodes=2,gpus=8"))

    with monkeypatch.context() as m:  # the loop would take it: no requeue, ever
        m.setattr(submitit.JobEnvironment, "USR_SIG", "USR1")
        with pytest.raises(ConfigError, match="SUBMITIT_PREEMPT_SIGNAL=USR1 is one of the"):
            submit_pretrain(cfg, tmp_path / "run", parse_slurm_options("gpus=1"))

    monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))  # no srun: not a SLURM machine
    with pytest.raises(ConfigError, match="cannot submit from here.*srun"):
        submit_pretrain(cfg, tmp_path / "run", parse_slurm_options("gpus=1"))

    monkeypatch.setitem(sys.modules, "submitit", None)  # not installed
    with pytest.raises(ConfigError, match=r"pip install 'iwm\[slurm\]'"):
        submit_pretrain(cfg, tmp_path / "run", parse_slurm_options("gpus=1"))


def test_cli_submits_and_prints_job_run_dir_and_logs(fake_slurm, tmp_path, capsys):
    run_dir = tmp_path / "cli-run"
    assert main(["pretrain", "iwm-equi-tiny", *TINY, "--run-dir", str(run_dir),
                 "--slurm", "nodes=1,gpus=2,partition=p"]) == 0
    out = capsys.readouterr().out
    assert "submitted SLURM job 4242 (1 node(s) x 2 process(es))" in out
    assert f"run directory: {run_dir}" in out and f"logs: {run_dir / 'slurm'}" in out
    assert not (run_dir / "checkpoints").exists()  # submitted, not trained here

    assert main(["pretrain", "iwm-equi-tiny", "--slurm", "gpus=8,gpu=1"]) == 2
    assert "unknown option 'gpu'" in capsys.readouterr().err


# ---------------------------------------------------------------- inside the job


def _job_env(rank: int, local_rank: int, job_id: str = "31337") -> SimpleNamespace:
    return SimpleNamespace(job_id=job_id, global_rank=rank, local_rank=local_rank,
                           num_tasks=16, num_nodes=2, hostnames=["gpu-a7", "gpu-b3"],
                           USR_SIG="USR2")


def test_torchrun_environment_from_the_job_environment(dist_env, monkeypatch, tmp_path):
    env = slurm.torch_distributed_env(_job_env(rank=11, local_rank=3))
    port = slurm.master_port("31337")
    assert env == {"RANK": "11", "WORLD_SIZE": "16", "LOCAL_RANK": "3",
                   "MASTER_ADDR": "gpu-a7", "MASTER_PORT": str(port)}
    # Every task, and every requeue, of a job meets at the same port; other jobs elsewhere.
    assert slurm.master_port("31337") == port and 10000 <= port < 30000
    assert len({slurm.master_port(str(j)) for j in range(31337, 31347)}) > 5

    seen = {}

    def fake_pretrain(cfg, run_dir, resume):
        seen.update({k: os.environ[k] for k in DIST_VARS}, resume=resume)
        return run_dir

    monkeypatch.setattr(submitit, "JobEnvironment", lambda: _job_env(rank=11, local_rank=3))
    monkeypatch.setattr(slurm, "pretrain", fake_pretrain)
    cfg = load_config("iwm-equi-tiny", TINY)
    assert PretrainJob(cfg, tmp_path / "run")() == tmp_path / "run"
    assert seen == {**env, "resume": False}


def test_checkpoint_requeues_a_job_that_resumes(dist_env, monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(submitit, "JobEnvironment", lambda: _job_env(rank=0, local_rank=0))
    monkeypatch.setattr(slurm, "pretrain", lambda cfg, run_dir, resume: calls.append(resume))
    run_dir = tmp_path / "run"
    job = PretrainJob(load_config("iwm-equi-tiny", TINY), run_dir)

    # Stopped during set-up: nothing to continue yet, so the requeued job starts afresh.
    again = job.checkpoint()
    assert isinstance(again, submitit.helpers.DelayedSubmission)
    assert again.function.resume is False

    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("{}")  # the run has started
    again = job.checkpoint()
    assert isinstance(again.function, PretrainJob) and again.function is not job
    assert (again.function.resume, again.function.run_dir) == (True, run_dir)
    assert job.resume is False  # the running job itself is unchanged
    again.result()
    # SLURM requeues the original submission itself (node failure): it continues too.
    job()
    assert calls == [True, True]


@pytest.fixture
def fake_submitit_handler():
    """What submitit's process_job installs on its signal before calling the job: here it
    records the call and asks the job for its requeue, as submitit's handler does."""
    signum = slurm.requeue_signal(submitit.JobEnvironment)
    calls = []
    before = signal.signal(signum, lambda s, frame: calls.append(s))
    yield signum, calls
    signal.signal(signum, before)


def test_the_requeue_signal_waits_for_the_training_loop(fake_submitit_handler):
    signum, calls = fake_submitit_handler
    with slurm._DeferredRequeue(signum) as deferred:
        with StopRequests() as stop:
            signal.raise_signal(signum)  # during training: the loop is asked to stop
            assert stop.signal == signum and deferred.received and calls == []
        deferred.requeue()  # once the checkpoint is written
        assert calls == [signum]
        signal.raise_signal(signum)  # outside training: submitit requeues at once
        assert calls == [signum, signum]
    assert signal.getsignal(signum) is not deferred._handle  # submitit's handler is back


def test_preempted_job_checkpoints_requeues_and_continues(dist_env, fake_submitit_handler,
                                                          tmp_path, monkeypatch):
    """submitit's signal at step 2 of 4: a checkpoint at step 2, then the requeue, whose
    job (built by checkpoint()) runs steps 3 and 4 of the same run."""
    signum, calls = fake_submitit_handler
    write_fake_mnist(tmp_path / "data")
    monkeypatch.setenv("IWM_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("SUBMITIT_DEBUG_JOB_ID", "77")  # submitit's job environment: debug
    real_step = Trainer.step

    def step_then_signal(self, step, crops, *args, **kwargs):
        out = real_step(self, step, crops, *args, **kwargs)
        if step == 1:
            signal.raise_signal(signum)
        return out

    monkeypatch.setattr(Trainer, "step", step_then_signal)
    cfg = load_config("iwm-equi-tiny", [*TINY, "train.epochs=1", "train.log_every=1",
                                        "train.checkpoint_every=100"])  # 4 steps
    run_dir = tmp_path / "run"
    job = PretrainJob(cfg, run_dir)
    with pytest.raises(Preempted, match="stopped by SIGUSR2 at step 2/4"):
        job()
    assert calls == [signum]  # submitit's handler ran, after the checkpoint
    assert [s for s, _ in list_checkpoints(run_dir)] == [2]

    monkeypatch.setattr(Trainer, "step", real_step)
    assert job.checkpoint().result() == run_dir
    [(step, path)] = list_checkpoints(run_dir)[-1:]
    assert step == 4 and load_checkpoint(path)["step"] == 4
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2, 3, 4]


def test_debug_executor_pretrains_into_the_run_dir(dist_env, tmp_path, monkeypatch):
    write_fake_mnist(tmp_path / "data")
    monkeypatch.setenv("IWM_DATA", str(tmp_path / "data"))
    run_dir = tmp_path / "run"
    job = submit_pretrain(load_config("iwm-equi-tiny", TINY), run_dir,
                          parse_slurm_options("nodes=1,gpus=1,time=10"), cluster="debug")
    assert not run_dir.exists() or not list_checkpoints(run_dir)  # runs on result()
    assert job.result() == run_dir
    [(step, path)] = list_checkpoints(run_dir)
    assert step == 1 and load_checkpoint(path)["step"] == 1
    assert (run_dir / "config.yaml").is_file()
    assert "RANK" not in os.environ  # the job's torchrun variables stayed in the job
