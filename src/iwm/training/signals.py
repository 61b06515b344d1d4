"""Graceful stop on SIGTERM / SIGUSR1, the signals a cluster sends before it preempts a job.

SLURM sends SIGTERM to every process of a job it preempts or cancels, then SIGKILL after
``KillWait`` seconds; ``sbatch --signal=USR1@120`` sends SIGUSR1 two minutes before the
time limit. Killing the process there and then would lose everything since the last
periodic checkpoint, so while training runs these signals only *request* a stop: the loop
finishes the step it is in, writes a checkpoint and raises :class:`~iwm.errors.Preempted`,
which the CLI turns into exit status :data:`~iwm.errors.Preempted.exit_code` (75,
``EX_TEMPFAIL``) for a requeue script to recognise. ``iwm pretrain RUN --resume`` then
continues from that checkpoint.

Ctrl-C (SIGINT) asks for the same stop, but the loop raises
:class:`~iwm.errors.Interrupted` (exit status 130, as a shell reports Ctrl-C), not
``Preempted``: a requeue script must not restart a run its user stopped. A second Ctrl-C
quits at once (:class:`KeyboardInterrupt`), for when the step or the save takes too long.
"""

from __future__ import annotations

import os
import signal
import threading
from types import FrameType, TracebackType
from typing import Any

STOP_SIGNALS: tuple[signal.Signals, ...] = tuple(
    getattr(signal, name) for name in ("SIGTERM", "SIGUSR1") if hasattr(signal, name))
"""The signals that request a stop (SIGUSR1 does not exist on Windows)."""

INTERRUPT_NOTE = (b"iwm: Ctrl-C: stopping after this step and writing a checkpoint; "
                  b"press Ctrl-C again to quit at once\n")


class StopRequests:
    """While entered, :data:`STOP_SIGNALS` and a first SIGINT set :attr:`signal` instead of
    ending the process; a second SIGINT raises :class:`KeyboardInterrupt`. ``note``: say
    so on stderr at the first SIGINT (the main process only, not every rank).

    Handlers can only be installed from the main thread; elsewhere (a training run started
    from a worker thread) this does nothing and the signals keep their usual effect. The
    previous handlers are restored on exit, so a library user's own handlers survive.
    (DataLoader workers, which get the signal too when a whole job is signalled, ignore it:
    see ``iwm.data.sources._worker_ignores_stop_signals``.)
    """

    def __init__(self, note: bool = True) -> None:
        self.signal: signal.Signals | None = None
        """The first stop signal received, or None."""
        self._note = note
        self._interrupts = 0
        self._previous: dict[signal.Signals, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signal is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        # Only a flag: the handler runs between two bytecodes of the training step, where
        # writing a checkpoint could see half-updated state.
        if self.signal is None:
            self.signal = signal.Signals(signum)

    def _interrupt(self, signum: int, frame: FrameType | None) -> None:
        self._interrupts += 1
        if self._interrupts > 1:
            raise KeyboardInterrupt
        self._handle(signum, frame)
        if self._note:
            # os.write, not print: the handler may run inside a print to stderr, and
            # Python's buffered streams refuse re-entrant writes.
            os.write(2, INTERRUPT_NOTE)

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
            self._previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._interrupt)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
