"""Run the ``iwm`` CLI in forked child processes.

A child is a real process: it gets real signals (SIGTERM, SIGKILL mid-write) and exits
with a real status. Forking from the test process, which has already imported torch and
iwm, saves the ~5 s a fresh ``python -m iwm.cli.main`` spends importing them, which is what
lets the kill tests afford dozens of runs. (The console script itself is exercised in
tests/training/test_bad_inputs.py.)
"""

from __future__ import annotations

import multiprocessing
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch

# Imported here, before forking, so that children do not each pay for the import.
from torch.utils.tensorboard import SummaryWriter  # noqa: F401

from iwm.cli.main import main

_FORK = multiprocessing.get_context("fork")


def _child(argv: list[str], log: Path, own_group: bool, hook: Callable[[], None] | None
           ) -> None:
    if own_group:
        os.setpgid(0, 0)  # so the test can signal the child and its DataLoader workers only
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    # pytest replaces sys.stdout/err with its capture objects; the child writes to the log.
    sys.stdout = sys.stderr = open(fd, "w", buffering=1, closefd=False)  # noqa: SIM115
    torch.set_num_threads(1)  # an OpenMP pool inherited through fork is not usable
    if hook is not None:
        hook()
    code = main(argv)
    sys.stderr.flush()
    os._exit(code)


class ForkedCLI:
    """Start ``main(argv)`` in a forked child; its stdout+stderr go to ``log``.

    Tests make one in a fixture that also points ``IWM_DATA`` at the fake data set (the
    children inherit the environment).
    """

    def start(self, argv: list[str], log: Path, own_group: bool = False,
              hook: Callable[[], None] | None = None) -> multiprocessing.Process:
        proc = _FORK.Process(target=_child, args=(argv, log, own_group, hook))
        proc.start()
        return proc
