"""``iwm pretrain ... --slurm OPTIONS``: submit pretraining to SLURM through submitit.

The job runs one task per GPU. Each task turns submitit's job environment into the
torchrun variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) that
:func:`iwm.training.distributed.init_distributed` reads, then runs the same
:func:`iwm.training.loop.pretrain` as ``iwm pretrain``. The run directory is decided at
submission, so every task and every requeue writes to the same one.

Requeue: SLURM sends submitit's signal (SIGUSR2 unless ``SUBMITIT_PREEMPT_SIGNAL`` says
otherwise) ``signal_delay`` seconds before the time limit, and on preemption where the
cluster sets ``preempt_send_user_signal``. The training loop then finishes its step and
writes a checkpoint, as on SIGTERM/SIGUSR1 (:mod:`iwm.training.signals`); only then does
submitit requeue the job, which continues from that checkpoint. Timeouts are requeued at
most ``requeue`` times (submitit's ``max_num_timeout``); preemptions always are.
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time
import zlib
from dataclasses import dataclass, fields, replace
from pathlib import Path
from types import FrameType, ModuleType
from typing import TYPE_CHECKING, Any

from iwm.config import Config
from iwm.errors import ConfigError, Preempted
from iwm.training.loop import pretrain
from iwm.training.run_dir import CONFIG_FILE
from iwm.training.signals import STOP_SIGNALS, StopRequests

if TYPE_CHECKING:
    import submitit

DEFAULT_SIGNAL_DELAY_S = 180
"""Seconds between submitit's signal and the time limit, when the job is long enough: the
loop stops at its next log step (where processes agree) and then writes a checkpoint."""
MAX_SIGNAL_DELAY_S = 540
"""submitit counts a signal that comes earlier than 10 minutes before the time limit as a
preemption, and preemptions are requeued without limit; this keeps a margin for start-up."""
REQUEUE_WAIT_S = 120
"""How long ranks other than 0 wait, after their checkpoint, for rank 0's requeue."""


@dataclass(frozen=True)
class SlurmOptions:
    """What ``--slurm "nodes=2,gpus=8,partition=learn,..."`` asks for."""

    nodes: int = 1
    gpus: int = 1
    """GPUs per node, one task (training process) each; 0 = one CPU process per node."""
    partition: str | None = None
    time: int = 1440
    """Time limit in minutes."""
    cpus: int | None = None
    """CPUs per task (per GPU), for data loading; None = the cluster's default."""
    mem: int | None = None
    """GB per node; 0 = all of the node's memory."""
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    requeue: int = 3
    """Requeues after a timeout at most (preemptions are always requeued)."""
    folder: str | None = None
    """submitit's folder (job pickles and logs); None = RUN/slurm."""
    signal_delay: int | None = None
    """Seconds before the time limit that SLURM signals the job to checkpoint; None = the
    default, shortened for short jobs."""

    @property
    def tasks_per_node(self) -> int:
        return max(self.gpus, 1)

    @property
    def world_size(self) -> int:
        return self.nodes * self.tasks_per_node

    @property
    def signal_delay_s(self) -> int:
        if self.signal_delay is not None:
            return self.signal_delay
        return min(DEFAULT_SIGNAL_DELAY_S, self.time * 60 // 2)


# key -> (what the value is, for messages; smallest integer allowed, or None for text)
_KEYS: dict[str, tuple[str, int | None]] = {
    "nodes": ("N", 1),
    "gpus": ("N per node", 0),
    "partition": ("NAME", None),
    "time": ("MINUTES", 1),
    "cpus": ("N per GPU", 1),
    "mem": ("GB per node, 0 = all", 0),
    "account": ("NAME", None),
    "qos": ("NAME", None),
    "constraint": ("FEATURES", None),
    "requeue": ("max timeouts requeued", 0),
    "folder": ("PATH", None),
    "signal_delay": ("SECONDS", 1),
}
assert set(_KEYS) == {f.name for f in fields(SlurmOptions)}


def _valid_keys() -> str:
    return "valid: " + ", ".join(f"{k}={what}" for k, (what, _) in _KEYS.items())


def parse_slurm_options(text: str) -> SlurmOptions:
    """``"nodes=2,gpus=8,partition=learn,time=4320"`` (comma- or space-separated) as
    :class:`SlurmOptions`; anything unknown or malformed is a :class:`ConfigError`."""
    values: dict[str, Any] = {}
    for item in re.split(r"[,\s]+", text.strip()):
        if not item:
            continue
        key, sep, raw = item.partition("=")
        if not sep:
            raise ConfigError(f"--slurm: {item!r} is not key=value ({_valid_keys()})")
        if key not in _KEYS:
            raise ConfigError(f"--slurm: unknown option {key!r} ({_valid_keys()})")
        if key in values:
            raise ConfigError(f"--slurm: {key} is given twice ({_valid_keys()})")
        what, minimum = _KEYS[key]
        if minimum is None:
            if not raw:
                raise ConfigError(f"--slurm: {key}= needs a value ({_valid_keys()})")
            values[key] = raw
            continue
        try:
            number = int(raw)
        except ValueError:
            number = None
        if number is None or number < minimum:
            raise ConfigError(f"--slurm: {key}={raw!r} is not a whole number >= {minimum} "
                              f"({key}={what}; {_valid_keys()})")
        values[key] = number
    options = SlurmOptions(**values)
    delay = options.signal_delay_s
    if delay > MAX_SIGNAL_DELAY_S or delay * 2 > options.time * 60:
        raise ConfigError(
            f"--slurm: signal_delay={delay} s is too long for time={options.time} min: use at "
            f"most {MAX_SIGNAL_DELAY_S} s and half the time limit ({_valid_keys()})")
    return options


def _import_submitit() -> ModuleType:
    try:
        import submitit
    except ImportError:
        raise ConfigError("--slurm needs submitit, which is not installed: "
                          "pip install 'iwm[slurm]'") from None
    return submitit


def master_port(job_id: str) -> int:
    """A port for the rendezvous that every task of the job (and of its requeues) derives
    alike from the job id, in 10000-29999: below Linux's ephemeral range (32768-)."""
    return 10000 + zlib.crc32(job_id.encode()) % 20000


def torch_distributed_env(job_env: Any) -> dict[str, str]:
    """The torchrun variables for this task, from a ``submitit.JobEnvironment``."""
    return {
        "RANK": str(job_env.global_rank),
        "WORLD_SIZE": str(job_env.num_tasks),
        "LOCAL_RANK": str(job_env.local_rank),
        # SLURM places task 0 on the first node of the allocation.
        "MASTER_ADDR": str(job_env.hostnames[0]),
        "MASTER_PORT": str(master_port(str(job_env.job_id))),
    }


def requeue_signal(job_env: Any) -> signal.Signals:
    """The signal submitit requeues on, from a ``submitit.JobEnvironment`` (SIGUSR2 unless
    ``SUBMITIT_PREEMPT_SIGNAL`` says otherwise)."""
    return signal.Signals(getattr(signal, "SIG" + job_env.USR_SIG))


class _DeferredRequeue:
    """While entered, submitit's requeue signal asks the training loop to stop first.

    submitit's own handler requeues the job and exits there and then: in the middle of a
    step, losing everything since the last periodic checkpoint. Here the signal is passed to
    the loop's stop request instead (finish the step, write a checkpoint, raise
    :class:`~iwm.errors.Preempted`), after which :meth:`requeue` runs submitit's handler.
    Outside training (set-up, or after it) there is nothing to save, so submitit's handler
    runs at once. DataLoader workers forked by the training process inherit this handler
    and so ignore the signal (SLURM signals every process of the job; by default SIGUSR2
    would kill them).
    """

    def __init__(self, signum: signal.Signals) -> None:
        self.signum = signum
        self.received = False
        self._pid = os.getpid()
        self._submitit_handler: Any = None
        self._installed = False

    def __enter__(self) -> _DeferredRequeue:
        if threading.current_thread() is threading.main_thread():
            self._submitit_handler = signal.signal(self.signum, self._handle)
            self._installed = True
        return self

    def __exit__(self, *exc: object) -> None:
        if self._installed:
            previous = self._submitit_handler
            signal.signal(self.signum, signal.SIG_DFL if previous is None else previous)
            self._installed = False

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if os.getpid() != self._pid:
            return  # a forked DataLoader worker inherited this; its training process ends it
        self.received = True
        loop_handler = signal.getsignal(STOP_SIGNALS[0])
        owner = getattr(loop_handler, "__self__", None)
        if isinstance(owner, StopRequests) and callable(loop_handler):
            loop_handler(signum, frame)
        else:
            self.requeue()

    def requeue(self) -> None:
        """Run submitit's handler: on rank 0 it calls :meth:`PretrainJob.checkpoint`,
        requeues the job and exits; elsewhere it returns."""
        if callable(self._submitit_handler):
            self._submitit_handler(self.signum, None)


@dataclass
class PretrainJob:
    """The callable submitit runs in every task: ``iwm pretrain`` of ``cfg`` into
    ``run_dir``, requeued through :meth:`checkpoint`."""

    cfg: Config
    run_dir: Path
    resume: bool = False

    def __call__(self) -> Path:
        submitit = _import_submitit()
        job_env = submitit.JobEnvironment()
        os.environ.update(torch_distributed_env(job_env))
        # The run's config.yaml appears once every task has joined and set-up is done, so
        # this reads the same on every task. SLURM may requeue the original submission
        # (resume=False) itself, after a node failure or under PreemptMode=REQUEUE: it
        # must continue the run all the same.
        resume = self.resume or (self.run_dir / CONFIG_FILE).is_file()
        if job_env.global_rank == 0:
            print(f"iwm: job {job_env.job_id}: {'continuing' if resume else 'starting'} "
                  f"{self.run_dir} with {job_env.num_tasks} process(es)", flush=True)
        with _DeferredRequeue(requeue_signal(job_env)) as deferred:
            try:
                return pretrain(self.cfg, self.run_dir, resume=resume)
            except Preempted:
                if deferred.received:
                    deferred.requeue()
                    if job_env.global_rank != 0:
                        # submitit requeues from rank 0 only, which ends this task too;
                        # exiting first could make srun kill rank 0 mid-requeue.
                        time.sleep(REQUEUE_WAIT_S)
                # SIGTERM alone (scancel; a preemption without the user signal) is not a
                # request to requeue: `scancel` must end the job.
                raise

    def checkpoint(self) -> submitit.helpers.DelayedSubmission:
        """What submitit requeues: this job, continuing the run if it has started (a job
        stopped during set-up has nothing to continue and starts afresh)."""
        submitit = _import_submitit()
        started = (self.run_dir / CONFIG_FILE).is_file()
        return submitit.helpers.DelayedSubmission(replace(self, resume=started))


def submit_pretrain(cfg: Config, run_dir: Path, options: SlurmOptions, *,
                    resume: bool = False, cluster: str = "slurm") -> submitit.Job[Path]:
    """Submit :class:`PretrainJob` with ``options``; returns submitit's job.

    ``cluster`` is submitit's executor: ``slurm``, or ``debug`` (in this process, on
    :meth:`~submitit.Job.result`) for tests.
    """
    submitit = _import_submitit()
    # Absolute: the job may start in another working directory (sbatch --chdir).
    run_dir = Path(run_dir).absolute()
    cfg.train.check_batch_split(options.world_size,
                                f" (nodes={options.nodes} x gpus={options.gpus})")
    signum = requeue_signal(submitit.JobEnvironment)
    if signum in STOP_SIGNALS:
        # The loop would take the signal for itself, so nothing would tell a timeout from
        # a `scancel` (SIGTERM): the job would stop with a checkpoint but never be requeued.
        raise ConfigError(f"--slurm: SUBMITIT_PREEMPT_SIGNAL={signum.name[3:]} is one of the "
                          "signals iwm stops on (TERM, USR1): unset it (submitit's default "
                          "is USR2)")
    folder = Path(options.folder).absolute() if options.folder else run_dir / "slurm"
    try:
        executor = submitit.AutoExecutor(folder=folder, cluster=cluster,
                                         slurm_max_num_timeout=options.requeue)
    except RuntimeError as e:  # the SLURM executor refuses to start without srun
        raise ConfigError(f"--slurm: cannot submit from here ({e}): run iwm on a machine of "
                          "the SLURM cluster, e.g. its login node") from None
    params: dict[str, Any] = {
        "name": f"iwm-{run_dir.name}",
        "nodes": options.nodes,
        "tasks_per_node": options.tasks_per_node,
        "timeout_min": options.time,
        "slurm_signal_delay_s": options.signal_delay_s,
        # Also lets SLURM requeue it itself (node failure, PreemptMode=REQUEUE); the job
        # then continues the run from its directory.
        "slurm_additional_parameters": {"requeue": True},
    }
    if options.gpus:
        params["gpus_per_node"] = options.gpus
    if options.cpus is not None:
        params["cpus_per_task"] = options.cpus
    if options.mem is not None:
        # Not submitit's mem_gb, which turns 0 into "0GB": SLURM's "all memory" is --mem=0.
        params["slurm_mem"] = f"{options.mem}G" if options.mem else "0"
    for key in ("partition", "account", "qos", "constraint"):
        value = getattr(options, key)
        if value is not None:
            params[f"slurm_{key}"] = value
    executor.update_parameters(**params)
    return executor.submit(PretrainJob(cfg, run_dir, resume=resume))
